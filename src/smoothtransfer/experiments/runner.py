"""Running an experiment grid: train (reusing finished runs and stored results), evaluate, store, report."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

from smoothtransfer.config import replace, to_dict
from smoothtransfer.errors import UserError
from smoothtransfer.experiments import store
from smoothtransfer.experiments.spec import Experiment, Run
from smoothtransfer.experiments.tables import collect, write_report
from smoothtransfer.utils import atomic_write_json, environment_info, git_revision


def _eval_argv(kind: str, ckpt: Path, out: Path, e: dict, device: str | None, progress: bool) -> list[str]:
    argv = ["--checkpoint", str(ckpt), "--out", str(out)]
    for k, v in e.items():
        if v is None or v is False:
            continue
        # certify takes one or more σ as --sigma (Cohen's flag); noise-profile takes --sigmas
        flag = "--sigma" if (kind == "certify" and k == "sigmas") else "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    if device:
        argv += ["--device", device]
    return argv


RESULT_FILES = {"attack": "attack.json", "noise_profile": "noise_profile.json"}


def _run_command(argv: list[str]) -> int:
    """Run a ``smoothtransfer`` command exactly as a user would (same parser, same checks)."""
    # lazy: the CLI imports this package (``smoothtransfer experiment``), so a top-level import would be a circle
    from smoothtransfer.cli import COMMANDS, build_parser

    args = build_parser(load=argv[0]).parse_args(argv)
    module = importlib.import_module(f"smoothtransfer.commands.{COMMANDS[argv[0]][0]}")
    return int(module.run(args) or 0)


def run_eval(kind: str, ckpt: Path, out: Path, e: dict, device: str | None = None, progress: bool = True) -> int:
    """``smoothtransfer certify|attack|noise-profile`` on ``ckpt``. Certify resumes by itself; an attack or
    noise profile whose result file exists with the same settings is reused."""
    cmd = {"certify": "certify", "attack": "attack", "noise_profile": "noise-profile"}[kind]
    settings_file = out / "experiment_settings.json"
    settings = {"checkpoint": str(ckpt), **e}
    replace_old = False
    if kind in RESULT_FILES and (out / RESULT_FILES[kind]).exists():
        if settings_file.exists() and json.loads(settings_file.read_text()) == json.loads(json.dumps(settings)):
            return 0
        if kind != "noise_profile":
            raise UserError(f"{out} holds {kind} results for other settings; remove it or use another --out")
        # a noise profile takes seconds and is seeded: one for other σ (the grid now certifies more σ) is
        # recomputed rather than refused
        replace_old = True
    argv = [cmd, *_eval_argv(kind, ckpt, out, e, device, progress)]
    if replace_old:
        argv.append("--overwrite")
    if not progress and kind != "noise_profile":
        argv.append("--no-progress")
    rc = _run_command(argv)
    atomic_write_json(settings_file, settings)
    if rc != 0:
        raise UserError(f"{cmd} on {ckpt} exited with status {rc}")
    return rc


def run_denoiser(run: Run, out: Path, progress: bool = True) -> None:
    """``smoothtransfer train-denoiser`` (resumed when ``out`` holds an unfinished or finished run)."""
    args = dict(run.denoiser_args or {})
    argv = ["train-denoiser", "--out", str(out)]
    for k, v in args.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        argv += [flag, *map(str, v)] if isinstance(v, (list, tuple)) else [flag, str(v)]
    if (out / "latest.json").exists():
        latest = json.loads((out / "latest.json").read_text())
        if len(latest.get("history", [])) >= int(args.get("epochs", 10)):
            return
        argv.append("--resume")
    if not progress:
        argv.append("--no-progress")
    _run_command(argv)


def plan(exp: Experiment) -> list[Run]:
    """The runs that must execute: those the store does not hold complete, plus any run they start from whose
    checkpoint is not in its run directory (a stored run keeps its results, not its weights)."""
    todo = {r.id for r in exp.runs.values() if not store.is_complete(exp, r)}
    grew = True
    while grew:
        grew = False
        for rid in list(todo):
            for dep in exp.runs[rid].needs:
                d = exp.out / dep
                have = (d / "train" / "checkpoint.pt").is_file() or (d / "denoiser" / "latest.json").is_file()
                if dep not in todo and not have:
                    todo.add(dep)
                    grew = True
    return [r for r in exp.order() if r.id in todo]


def run_experiment(exp: Experiment, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every run (reusing finished runs and complete stored results), keep the small
    result files in the store, then write the tables. Returns the results."""
    # lazy: training pulls in models, objectives and data; loading and reporting a grid does not need them
    from smoothtransfer.train.loop import run_training

    exp.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp.out / "experiment.json", {
        "name": exp.name, "scale": exp.scale, "git_rev": git_revision(), "env": environment_info(),
        "runs": {r.id: {"stage": r.stage, "init": r.init, "train": to_dict(r.train) if r.train else None,
                        "denoiser": r.denoiser_args, "evaluate": r.evaluate}
                 for r in exp.runs.values()},
    })
    todo = plan(exp)
    for run in exp.order():
        if run not in todo:
            print(f"[{exp.name}/{exp.scale}] {run.id}: complete in {exp.results_dir}; reusing it", flush=True)
    for i, run in enumerate(todo, 1):
        print(f"[{exp.name}/{exp.scale}] run {i}/{len(todo)}: {run.id} ({run.stage})", flush=True)
        t0 = time.time()
        if run.stage == "denoiser":
            run_denoiser(run, exp.out / run.id / "denoiser", progress)
        else:
            cfg = run.train if progress else replace(run.train, progress=False)
            ckpt = run_training(cfg, resume=True)
            for kind, e in run.evaluate.items():
                run_eval(kind, ckpt, exp.out / run.id / kind, e, device=run.train.device, progress=progress)
        store.add_timing(exp, run.id, time.time() - t0)
        store.export_run(exp, run)
    results = collect(exp)
    write_report(exp, results)
    return results
