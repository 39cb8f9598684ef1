"""Experiment grids: ``configs/experiments/NAME.yaml`` → pretrain → finetune → certify/attack runs → tables.

An experiment file holds
- ``defaults``: TrainConfig keys per stage (``pretrain``, ``finetune``) and evaluation settings (``certify``,
  ``attack``, ``noise_profile``);
- ``scales``: per scale (``cpu-small``, ``gpu``, ``paper``) overrides of the same sections;
- ``runs``: ``id -> {stage, init: <run id>, <TrainConfig keys>, evaluate: [certify, attack, ...]}``;
- ``tables``: markdown tables laid out like the paper's, each row a (run, σ) and each column a metric.

Everything is resolved and validated before the first step (unknown keys, unknown runs, missing datasets
are UserErrors). Runs live in ``OUT/<run id>/{train,certify,attack,noise_profile}`` and are reused when
finished with the same settings, so runs shared by several tables are trained once, and an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from smoothtransfer.config import TrainConfig, from_dict, load_yaml, to_dict
from smoothtransfer.errors import UserError
from smoothtransfer.utils import atomic_write_json, atomic_write_text, environment_info, git_revision

SCALES = ("cpu-small", "cpu", "gpu", "paper")
EVAL_KINDS = ("certify", "attack", "noise_profile")
TOP_KEYS = {"name", "title", "paper", "description", "defaults", "scales", "runs", "tables", "notes", "scale_notes"}
DENOISER_KEYS = {"kind", "dataset", "data_root", "size", "sigmas", "epochs", "batch_size", "lr", "weight_decay",
                 "grad_clip", "max_train", "seed", "device"}
CERTIFY_KEYS = {"dataset", "split", "sigmas", "n0", "n", "alpha", "batch_size", "skip", "max", "seed", "amp",
                "data_root", "denoiser", "sequential"}
ATTACK_KEYS = {"dataset", "split", "attack", "eps", "steps", "max", "skip", "batch_size", "seed", "data_root"}
NOISE_KEYS = {"dataset", "split", "sigmas", "max", "skip", "batch_size", "seed", "data_root"}


def experiments_dir() -> Path:
    return Path(str(resources.files("smoothtransfer") / "configs" / "experiments"))


def available() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def find_experiment(name: str) -> Path:
    """A bundled experiment name, or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    path = experiments_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown experiment '{name}'; choose from: {', '.join(available())} (or a YAML path)")
    return path


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class Run:
    """One node of the grid: a ``pretrain``/``finetune`` training run (``train``) or a ``denoiser`` run
    (``denoiser_args``: the flags of ``smoothtransfer train-denoiser``), plus its evaluations."""

    id: str
    stage: str
    init: str | None
    train: TrainConfig | None
    evaluate: dict[str, dict] = field(default_factory=dict)
    label: str = ""
    denoiser_args: dict | None = None
    needs: list[str] = field(default_factory=list)


@dataclass
class Experiment:
    name: str
    scale: str
    out: Path
    spec: dict
    runs: dict[str, Run]
    tables: list[dict]

    def order(self) -> list[Run]:
        """Runs in dependency order (an ``init`` run before the runs fine-tuned from it)."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(rid: str) -> None:
            if rid in done:
                return
            if rid in visiting:
                raise UserError(f"experiment {self.name}: runs form a cycle through '{rid}'")
            visiting.add(rid)
            for dep in self.runs[rid].needs:
                visit(dep)
            done.append(rid)

        for rid in self.runs:
            visit(rid)
        return [self.runs[r] for r in done]


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    import difflib

    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown key '{k}' in {where}{hint}")


def load_experiment(name: str, scale: str = "cpu-small", out: str | Path | None = None,
                    overrides: list[str] | None = None, data_root: str | None = None,
                    device: str | None = None, only: list[str] | None = None) -> Experiment:
    """Resolve and validate an experiment grid. Nothing runs here."""
    from smoothtransfer.config import apply_overrides

    path = find_experiment(name)
    spec = load_yaml(path)
    _check_keys(spec, TOP_KEYS, f"{path.name}")
    scales = spec.get("scales") or {}
    if scale not in scales:
        raise UserError(f"experiment {spec.get('name', name)} has no scale '{scale}'; choose from: "
                        f"{', '.join(scales)}")
    scale_spec = dict(scales[scale] or {})
    # a scale may run a subset of the grid (e.g. the headline rows at `cpu`): ``runs: [id, ...]``
    scale_runs = scale_spec.pop("runs", None)
    sections = _merge(spec.get("defaults") or {}, scale_spec)
    for sec in sections:
        if sec not in ("pretrain", "finetune", "denoiser", *EVAL_KINDS):
            raise UserError(f"unknown section '{sec}' in {path.name} defaults/scales.{scale}")
    exp_name = spec.get("name", path.stem)
    out = Path(out) if out else runs_root() / "experiments" / exp_name / scale
    runs_spec = spec.get("runs") or {}
    if not runs_spec:
        raise UserError(f"experiment {exp_name} defines no runs")
    runs: dict[str, Run] = {}
    for rid, rspec in runs_spec.items():
        rspec = dict(rspec or {})
        stage = rspec.pop("stage", None)
        if stage not in ("pretrain", "finetune", "denoiser"):
            raise UserError(f"run '{rid}' in {path.name}: stage must be pretrain, finetune or denoiser, "
                            f"got {stage!r}")
        if stage == "denoiser":
            label = rspec.pop("label", rid)
            args = _merge(sections.get("denoiser", {}), rspec)
            _check_keys(args, DENOISER_KEYS, f"{path.name} run '{rid}'")
            if data_root:
                args["data_root"] = data_root
            if device:
                args["device"] = device
            runs[rid] = Run(id=rid, stage=stage, init=None, train=None, label=label, denoiser_args=args)
            continue
        init = rspec.pop("init", None)
        evaluate = rspec.pop("evaluate", ["certify"] if stage == "finetune" else [])
        label = rspec.pop("label", rid)
        per_run_eval = {k: rspec.pop(k) for k in EVAL_KINDS if k in rspec}
        if stage == "finetune" and init not in runs_spec:
            raise UserError(f"run '{rid}' in {path.name}: init must name another run, got {init!r}")
        needs = [init] if init else []
        train_dict = _merge(sections.get(stage, {}), rspec)
        if train_dict.get("denoiser"):  # a denoiser run of this grid (FT-CADIS fine-tuning through it)
            dn = train_dict["denoiser"]
            if dn not in runs_spec:
                raise UserError(f"run '{rid}' in {path.name}: denoiser must name a denoiser run, got {dn!r}")
            needs.append(dn)
            train_dict["denoiser"] = str(out / dn / "denoiser")
        train_dict["stage"] = stage
        train_dict["out"] = str(out / rid / "train")
        train_dict["init"] = str(out / init / "train" / "checkpoint.pt") if init else None
        if data_root:
            train_dict.setdefault("data", {})["data_root"] = data_root
        if device:
            train_dict["device"] = device
        train_dict = apply_overrides(train_dict, [o for o in (overrides or []) if not o.startswith(EVAL_KINDS)])
        try:
            train_cfg = from_dict(TrainConfig, train_dict)
            if stage == "finetune":
                train_cfg.validate()
            else:
                from smoothtransfer.config import replace

                replace(train_cfg, init=None).validate()
        except UserError as e:
            raise UserError(f"run '{rid}' in {path.name}: {e}") from None
        evals: dict[str, dict] = {}
        for kind in evaluate:
            if kind not in EVAL_KINDS:
                raise UserError(f"run '{rid}' in {path.name}: unknown evaluation '{kind}'; choose from "
                                f"{', '.join(EVAL_KINDS)}")
            e = _merge(sections.get(kind, {}), per_run_eval.get(kind, {}))
            e = apply_overrides(e, [o.split(".", 1)[1] for o in (overrides or []) if o.startswith(kind + ".")])
            _check_keys(e, {"certify": CERTIFY_KEYS, "attack": ATTACK_KEYS, "noise_profile": NOISE_KEYS}[kind],
                        f"{path.name} run '{rid}' {kind}")
            e.setdefault("dataset", train_cfg.data.dataset)
            if kind == "certify" and e.get("denoiser"):
                if e["denoiser"] not in runs_spec:
                    raise UserError(f"run '{rid}' in {path.name}: certify.denoiser must name a denoiser run, "
                                    f"got {e['denoiser']!r}")
                needs.append(e["denoiser"])
                e["denoiser"] = str(out / e["denoiser"] / "denoiser")
            if data_root:
                e["data_root"] = data_root
            evals[kind] = e
        if "certify" in evals and "noise_profile" not in evals:
            evals["noise_profile"] = base_accuracy_eval(evals["certify"])
        runs[rid] = Run(id=rid, stage=stage, init=init, train=train_cfg, evaluate=evals, label=label, needs=needs)
    tables = spec.get("tables") or []
    for t in tables:
        _check_keys(t, {"id", "title", "caption", "row_header", "columns", "headers", "rows", "paper_rows",
                        "discussion"}, f"{path.name} table '{t.get('id')}'")
        for row in t.get("rows", []):
            if row.get("run") not in runs:
                raise UserError(f"table '{t.get('id')}' in {path.name} names unknown run {row.get('run')!r}")
    if scale_runs is not None:
        runs = _closure(runs, scale_runs, f"scales.{scale}.runs in {path.name}")
        tables = [dict(t, rows=[r for r in t.get("rows", []) if r["run"] in runs]) for t in tables]
        tables = [t for t in tables if t["rows"]]
    if only:
        runs = _closure(runs, only, "--only")
        tables = [t for t in tables if all(row["run"] in runs for row in t.get("rows", []))]
    exp = Experiment(name=exp_name, scale=scale, out=out, spec=spec, runs=runs, tables=tables)
    _check_data(exp)
    return exp


def base_accuracy_eval(cert: dict) -> dict:
    """The noise-profile evaluation that gives a certified run its base-classifier accuracy ("Clean Acc." of
    Qiu et al.: the base model on clean images, σ = 0) and its accuracy under noise at each certified σ, on
    exactly the test images that ``cert`` certifies (same dataset, split, skip, max)."""
    e = {k: cert[k] for k in ("dataset", "split", "skip", "max", "data_root") if cert.get(k) is not None}
    # with a denoiser, the classifier alone under noise is not the smoothed model's base: clean only
    e["sigmas"] = [0.0] if cert.get("denoiser") else [0.0, *sorted({float(s) for s in cert.get("sigmas", [])})]
    e["seed"] = int(cert.get("seed", 0))
    return e


def runs_root() -> Path:
    """Where experiment run directories live: ``$SMOOTHTRANSFER_RUNS``, else ``./runs``. Long grids should live
    outside a work tree that may be laid anew (e.g. ``SMOOTHTRANSFER_RUNS=~/smoothtransfer-runs``)."""
    env = os.environ.get("SMOOTHTRANSFER_RUNS")
    return Path(env).expanduser() if env else Path("runs")


def _closure(runs: dict[str, Run], ids: list[str], where: str) -> dict[str, Run]:
    """``runs`` restricted to ``ids`` and every run they start from, in the grid's order."""
    keep: set[str] = set()
    for rid in ids:
        if rid not in runs:
            raise UserError(f"{where} names unknown run '{rid}'")
        todo = [rid]
        while todo:
            r = todo.pop()
            keep.add(r)
            todo += runs[r].needs
    return {k: v for k, v in runs.items() if k in keep}


def _check_data(exp: Experiment) -> None:
    """Fail before any work if a dataset of the grid is missing."""
    from smoothtransfer.data.datasets import check_available

    seen = set()
    for run in exp.runs.values():
        if run.train is None:
            pairs = [(run.denoiser_args.get("dataset", "cifar10"), run.denoiser_args.get("data_root"), "train")]
        else:
            pairs = [(run.train.data.dataset, run.train.data.data_root, run.train.data.split)]
        pairs += [(e["dataset"], e.get("data_root"), e.get("split", "test")) for e in run.evaluate.values()]
        for name, root, split in pairs:
            if (name, root, split) in seen:
                continue
            seen.add((name, root, split))
            check_available(name, (split,) if split else (), root=root)


# ----------------------------------------------------------------------------------------------------
# running


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
    import importlib

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
    if kind in RESULT_FILES and (out / RESULT_FILES[kind]).exists():
        if settings_file.exists() and json.loads(settings_file.read_text()) == json.loads(json.dumps(settings)):
            return 0
        raise UserError(f"{out} holds {kind} results for other settings; remove it or use another --out")
    argv = [cmd, *_eval_argv(kind, ckpt, out, e, device, progress)]
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


def run_experiment(exp: Experiment, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every run (reusing finished ones), then write the tables. Returns the results."""
    from smoothtransfer.train.loop import run_training

    exp.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp.out / "experiment.json", {
        "name": exp.name, "scale": exp.scale, "git_rev": git_revision(), "env": environment_info(),
        "runs": {r.id: {"stage": r.stage, "init": r.init, "train": to_dict(r.train) if r.train else None,
                        "denoiser": r.denoiser_args, "evaluate": r.evaluate}
                 for r in exp.runs.values()},
    })
    timings = _load_timings(exp.out)
    order = exp.order()
    for i, run in enumerate(order, 1):
        print(f"[{exp.name}/{exp.scale}] run {i}/{len(order)}: {run.id} ({run.stage})", flush=True)
        t0 = time.time()
        if run.stage == "denoiser":
            run_denoiser(run, exp.out / run.id / "denoiser", progress)
            continue
        cfg = run.train if progress else _no_progress(run.train)
        ckpt = run_training(cfg, resume=True)
        for kind, e in run.evaluate.items():
            run_eval(kind, ckpt, exp.out / run.id / kind, e, device=run.train.device, progress=progress)
        timings.setdefault(run.id, 0.0)
        timings[run.id] += time.time() - t0
        atomic_write_json(exp.out / "timings.json", timings)
    results = collect(exp)
    write_report(exp, results)
    return results


def _no_progress(cfg: TrainConfig) -> TrainConfig:
    from smoothtransfer.config import replace

    return replace(cfg, progress=False)


def _load_timings(out: Path) -> dict[str, float]:
    p = out / "timings.json"
    return json.loads(p.read_text()) if p.exists() else {}


# ----------------------------------------------------------------------------------------------------
# results and tables


def _sigma_key(s: float) -> str:
    from smoothtransfer.smoothing.runner import sigma_tag

    return sigma_tag(float(s))


def collect(exp: Experiment) -> dict[str, Any]:
    """Per run: certify summary per σ, attack and noise-profile results (whatever exists on disk)."""
    results: dict[str, Any] = {}
    for run in exp.runs.values():
        if run.train is None:
            continue
        r: dict[str, Any] = {}
        for kind in EVAL_KINDS:
            d = exp.out / run.id / kind
            if kind == "certify" and (d / "summary.json").exists():
                r["certify"] = json.loads((d / "summary.json").read_text())
            elif kind == "attack" and (d / "attack.json").exists():
                r["attack"] = json.loads((d / "attack.json").read_text())
            elif kind == "noise_profile" and (d / "noise_profile.json").exists():
                r["noise_profile"] = json.loads((d / "noise_profile.json").read_text())
        ts = exp.out / run.id / "train" / "train_summary.json"
        if ts.exists():
            r["train"] = json.loads(ts.read_text())
        results[run.id] = r
    return results


def _sigma_summary(cert: dict, sigma: float) -> dict | None:
    """The per-σ entry of a certify summary.json."""
    per = cert.get("per_sigma") or cert.get("sigmas") or {}
    if isinstance(per, dict):
        for k, v in per.items():
            try:
                if abs(float(k) - float(sigma)) < 1e-9:
                    return v
            except ValueError:
                if k == _sigma_key(sigma):
                    return v
    if isinstance(per, list):
        for v in per:
            if abs(float(v.get("sigma", -1)) - float(sigma)) < 1e-9:
                return v
    return None


def _cert_at(s: dict, radius: float) -> float | None:
    table = s.get("certified_accuracy") or {}
    if isinstance(table, dict):
        for k, v in table.items():
            if abs(float(k) - radius) < 1e-9:
                return float(v)
    return None


def cell(results: dict, row: dict, column: str) -> str:
    """One table cell. Columns: ``cert:R`` → "(clean)cert" at radius R; ``certacc:R``; ``clean``; ``acr``;
    ``sa`` / ``ra`` (attack); ``noise:S`` (noise profile); ``abstain``."""
    from smoothtransfer.reporting.tables import cap_mark, format_cell

    r = results.get(row["run"], {})
    if column in ("sa", "ra"):
        a = r.get("attack")
        if not a:
            return "–"
        v = a.get("standard_acc" if column == "sa" else "robust_acc")
        return f"{100 * v:.1f}" if v is not None else "–"
    if column.startswith("noise:"):
        npf = (r.get("noise_profile") or {}).get("accuracy") or {}
        s = float(column.split(":", 1)[1])
        for k, v in npf.items():
            if abs(float(k) - s) < 1e-12:
                return f"{100 * v:.1f}"
        return "–"
    cert = r.get("certify")
    if not cert:
        return "–"
    s = _sigma_summary(cert, row.get("sigma", 0.25))
    if s is None:
        return "–"
    clean = _cert_at(s, 0.0)
    if column == "clean":
        return f"{100 * clean:.1f}" if clean is not None else "–"
    if column == "acr":
        return f"{s.get('acr', float('nan')):.3f}"
    if column == "abstain":
        return f"{100 * s.get('abstain_rate', float('nan')):.1f}"
    kind, _, rad = column.partition(":")
    acc = _cert_at(s, float(rad))
    if acc is None:
        return "–"
    mark = cap_mark(float(rad), s.get("max_certifiable_radius"))  # as `report` marks them
    if kind == "cert":
        return format_cell(clean, acc) + mark
    return f"{100 * acc:.1f}" + mark


def render_tables(exp: Experiment, results: dict) -> str:
    from smoothtransfer.reporting.tables import CAP_NOTE

    lines: list[str] = []
    for t in exp.tables:
        cols = t.get("columns", ["cert:0.25", "cert:0.5", "cert:0.75", "cert:1.0"])
        headers = t.get("headers") or [_header(c) for c in cols]
        lines.append(f"### {t.get('title', t.get('id', 'table'))}")
        lines.append("")
        if t.get("caption"):
            lines += [t["caption"], ""]
        lines.append("| " + " | ".join([t.get("row_header", "setting"), "σ", *headers]) + " |")
        lines.append("|" + "---|" * (len(headers) + 2))
        capped = False
        for row in t.get("rows", []):
            label = row.get("label") or exp.runs[row["run"]].label
            cells = [cell(results, row, c) for c in cols]
            lines.append("| " + " | ".join([label, str(row.get("sigma", "–")), *cells]) + " |")
            capped = capped or any(c.endswith("†") for c in cells)
        for prow in t.get("paper_rows", []) or []:
            lines.append("| " + " | ".join([f"paper: {prow['label']}", str(prow.get('sigma', '–')),
                                             *map(str, prow['cells'])]) + " |")
        lines.append("")
        if capped:
            lines += [CAP_NOTE, ""]
        # the discussion is written after looking at a scale's measured table, so it is kept per scale
        disc = t.get("discussion")
        if isinstance(disc, dict):
            disc = disc.get(exp.scale)
        if disc:
            lines += [f"_Discussion ({exp.scale})_: {str(disc).strip()}", ""]
    return "\n".join(lines)


def _header(col: str) -> str:
    if col.startswith("cert:"):
        return f"ε={col.split(':')[1]}"
    if col.startswith("certacc:"):
        return f"cert ε={col.split(':')[1]}"
    if col.startswith("noise:"):
        return f"σ={col.split(':')[1]}"
    return {"clean": "clean", "acr": "ACR", "sa": "SA", "ra": "RA", "abstain": "abstain %"}.get(col, col)


def settings_line(exp: Experiment) -> str:
    """Scale, hardware, wall time, N, α, number of certified images — stated with every table."""
    env = environment_info()
    hw = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores, {env.get('num_threads')} threads)"
    timings = _load_timings(exp.out)
    certs = [r.evaluate["certify"] for r in exp.runs.values() if "certify" in r.evaluate]
    parts = [f"scale `{exp.scale}`", f"hardware: {hw}", f"wall time {sum(timings.values()) / 60:.1f} min"]
    if certs:
        c = certs[0]
        parts.append(f"N={c.get('n')}, n0={c.get('n0')}, α={c.get('alpha')}, "
                     f"{_n_images(exp)} certified test images per σ")
    parts.append(f"git {git_revision()[:12]}")
    return "; ".join(parts)


def _n_images(exp: Experiment) -> str:
    for r in exp.runs.values():
        sfile = exp.out / r.id / "certify" / "summary.json"
        if sfile.exists():
            s = json.loads(sfile.read_text())
            n = s.get("num_images") or s.get("n_images")
            if n is None:
                per = s.get("per_sigma") or {}
                first = next(iter(per.values()), {}) if isinstance(per, dict) else {}
                n = first.get("num_images") or first.get("n_images")
            if n is not None:
                return str(n)
    return "?"


def _notes(exp: Experiment) -> list[str]:
    out = []
    scale_note = (exp.spec.get("scale_notes") or {}).get(exp.scale)
    if scale_note:
        out += [f"Scale `{exp.scale}`: {scale_note.strip()}", ""]
    if exp.spec.get("notes"):
        out += [str(exp.spec["notes"]).strip(), ""]
    return out


def write_report(exp: Experiment, results: dict) -> Path:
    """``OUT/report.md`` (tables + settings) and ``OUT/certified_accuracy.png`` (curves of every certified run)."""
    title = exp.spec.get("title", exp.name)
    body = [f"# {title}", "", f"_{settings_line(exp)}_", ""]
    if exp.spec.get("paper"):
        body += [f"Paper: {exp.spec['paper']}", ""]
    body += _notes(exp)
    body.append(render_tables(exp, results))
    png = exp.out / "certified_accuracy.png"
    try:
        from smoothtransfer.reporting.plots import plot_certified_accuracy
        from smoothtransfer.reporting.tables import load_run

        runs = [load_run(exp.out / r.id / "certify") for r in exp.runs.values()
                if (exp.out / r.id / "certify" / "summary.json").exists()]
        if runs:
            plot_certified_accuracy(runs, png)
            body += ["", f"![certified accuracy]({png.name})", ""]
    except Exception as e:  # the tables are the result; a plotting problem must not lose them
        body += ["", f"(plot not written: {e})", ""]
    atomic_write_text(exp.out / "report.md", "\n".join(body))
    return exp.out / "report.md"


def update_results_md(path: Path, exp: Experiment, results: dict) -> None:
    """Replace (or add) this experiment+scale's section of RESULTS.md, generated from the run directories."""
    begin, end = f"<!-- BEGIN {exp.name} {exp.scale} -->", f"<!-- END {exp.name} {exp.scale} -->"
    section = "\n".join([begin, f"## {exp.spec.get('title', exp.name)} — scale `{exp.scale}`", "",
                         f"_{settings_line(exp)}_", "", *_notes(exp), render_tables(exp, results), end])
    text = path.read_text() if path.exists() else "# Results\n\nGenerated by `smoothtransfer experiment NAME --scale S --results RESULTS.md` from run directories; never edited by hand.\n\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(path, text)
