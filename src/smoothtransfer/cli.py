"""``smoothtransfer <command>``: wiring only. Each command lives in ``smoothtransfer.commands.<module>``
with ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from smoothtransfer import __version__
from smoothtransfer.errors import UserError

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the whole pipeline in one command: mixed-noise pre-train, fine-tune, certify, report"),
    "pretrain": ("pretrain", "pre-train a classifier upstream (mixed noise, Gaussian, consistency, SimCLR, ...)"),
    "finetune": ("finetune", "fine-tune a pre-trained checkpoint downstream (full, fixed, head, LoRA)"),
    "certify": ("certify", "CERTIFY a dataset with the smoothed classifier (Cohen et al.), several σ at once"),
    "predict": ("predict", "PREDICT a dataset with the smoothed classifier (abstains when unsure)"),
    "report": ("report", "markdown table and certified-accuracy plot from certify run directories"),
    "experiment": ("experiment", "run a paper experiment grid from configs/experiments/NAME.yaml"),
    "attack": ("attack", "empirical robustness: AutoPGD-L2 / PGD-L2 / attacks on the smoothed classifier"),
    "noise-profile": ("noise_profile", "base-classifier accuracy under Gaussian noise at several σ"),
    "train-denoiser": ("train_denoiser", "train a diffusion or MSE denoiser for denoised smoothing"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothtransfer",
        description="Certifiably robust image classifiers by transfer learning, certified with randomized smoothing.")
    parser.add_argument("--version", action="version", version=f"smoothtransfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            importlib.import_module(f"smoothtransfer.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # lazy like the commands: utils imports torch, which `smoothtransfer --help` does not need
    from smoothtransfer.utils import WRITE_ERRNOS, Terminated, set_progress, sigterm_as_interrupt, write_error

    # --no-progress: ``progress=False`` in a job config's flags, ``no_progress`` in the training commands'
    set_progress(getattr(args, "progress", True) and not getattr(args, "no_progress", False))
    try:
        module = importlib.import_module(f"smoothtransfer.commands.{COMMANDS[args.command][0]}")
        with sigterm_as_interrupt():  # SIGTERM (kill, a scheduler) stops like Ctrl-C: workers, files cleaned up
            return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, full disk, no permission: one line, not a traceback
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: rerun the same command (with --resume where it applies) to continue", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
