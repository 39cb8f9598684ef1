"""Experiment grids: ``configs/experiments/NAME.yaml`` resolved and validated into runs (nothing runs here).

An experiment file holds
- ``defaults``: TrainConfig keys per stage (``pretrain``, ``finetune``), evaluation settings (``certify``,
  ``attack``, ``noise_profile``) and the settings of ``denoiser`` runs;
- ``scales``: per scale (``cpu-small``, ``cpu``, ``gpu``, ``paper``) overrides of the same sections, and
  optionally ``runs: [id, ...]``, the part of the grid that scale runs (with what those runs start from), and
  ``per_run: {id: {<run keys>}}``, changes to single runs at that scale (merged over the run's own keys);
- ``runs``: ``id -> {stage, init: <run id>, label, <TrainConfig keys>, evaluate: [certify, attack, ...],
  <certify/attack/noise_profile blocks: this run's evaluation settings, used where the run makes that
  evaluation>}``; an entry with a ``matrix:`` is a
  template standing for one run per combination of its axes' values (ids and labels from format strings,
  ``per_run`` settings for single runs; :mod:`smoothtransfer.experiments.matrix`); ``stage: evaluate``
  trains nothing: it evaluates the final model of its ``init`` run with evaluation settings of its own (e.g. the
  same classifier certified with and without a denoiser — one model, as the papers compare, not two trainings);
- ``tables``: markdown tables laid out like the paper's, each row a (run, σ) and each column a metric, with
  the paper's numbers (``paper``) and its claims (``claims``) as data; see ``experiments.tables``.

Everything is resolved and validated before the first step (unknown keys, unknown runs, missing datasets
are UserErrors). The keys a block may hold come from the config it becomes, not from lists kept here: a
``pretrain``/``finetune`` block holds :class:`~smoothtransfer.config.TrainConfig` keys, and a ``certify``,
``attack``, ``noise_profile`` or ``denoiser`` block the fields of ``CertifyConfig``, ``AttackConfig``,
``NoiseProfileConfig`` or ``DenoiserConfig`` (:data:`BLOCK_CONFIGS`) less those the runner sets
(:data:`RUNNER_KEYS`: checkpoint, out, progress, ...). An unknown key is one line naming it, the block, and
the run or the scale.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from smoothtransfer.config import TrainConfig, apply_overrides, from_dict, load_yaml, replace
from smoothtransfer.data.datasets import check_available
from smoothtransfer.errors import UserError
from smoothtransfer.experiments.matrix import expand_runs, merge
from smoothtransfer.job_configs import AttackConfig, CertifyConfig, DenoiserConfig, NoiseProfileConfig

SCALES = ("cpu-small", "cpu", "gpu", "paper")
EVAL_KINDS = ("certify", "attack", "noise_profile")
TOP_KEYS = {"name", "title", "paper", "description", "defaults", "scales", "runs", "tables", "notes", "scale_notes",
            "paper_settings"}
#: the config each evaluation (and denoiser) block of a grid becomes in ``experiments.runner``: its keys are
#: the config's fields, so a new field is a valid grid key without touching this module
BLOCK_CONFIGS: dict[str, type] = {"certify": CertifyConfig, "attack": AttackConfig,
                                  "noise_profile": NoiseProfileConfig, "denoiser": DenoiserConfig}
#: fields the runner sets itself, never a grid: where the model and the results are (checkpoint, out), resuming
#: and replacing results (resume, overwrite), the progress bar, the device of an evaluation (its run's training
#: device) and shards (a grid evaluates each run in one process)
RUNNER_KEYS = {"checkpoint", "out", "overwrite", "resume", "progress", "shard"}
RUNNER_EVAL_KEYS = RUNNER_KEYS | {"device"}
#: TrainConfig keys the grid sets for each run (``stage`` and ``init`` are run keys naming runs; ``out`` is the
#: run directory)
TRAIN_SPEC_KEYS = {"stage", "out", "init"}
TABLE_KEYS = {"id", "title", "caption", "row_header", "columns", "headers", "rows", "paper", "claims",
              "best_over_sigma", "discussion"}
CLAIM_KEYS = {"claim", "a", "b", "metric", "expect", "margin", "paper"}


def block_keys(kind: str) -> set[str]:
    """The keys a grid's ``kind`` block (certify, attack, noise_profile, denoiser) may set: the fields of its
    config (:data:`BLOCK_CONFIGS`) less those the runner sets."""
    owned = RUNNER_KEYS if kind == "denoiser" else RUNNER_EVAL_KEYS
    return {f.name for f in fields(BLOCK_CONFIGS[kind])} - owned


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


@dataclass
class Run:
    """One node of the grid: a ``pretrain``/``finetune`` training run (``train``), a ``denoiser`` run
    (``denoiser_args``: the flags of ``smoothtransfer train-denoiser``), or an ``evaluate`` run (``train``: the
    config of the ``init`` run whose final model it evaluates; it trains nothing), plus its evaluations."""

    id: str
    stage: str
    init: str | None
    train: TrainConfig | None
    evaluate: dict[str, dict] = field(default_factory=dict)
    label: str = ""
    denoiser_args: dict | None = None
    needs: list[str] = field(default_factory=list)

    @property
    def trains(self) -> bool:
        """Whether the run trains a model of its own; an ``evaluate`` run only evaluates its init run's model
        (so it has no weights, no ``train/`` results, and its store key holds the init run's model settings)."""
        return self.stage != "evaluate"


@dataclass
class Experiment:
    name: str
    scale: str
    out: Path
    spec: dict
    runs: dict[str, Run]
    tables: list[dict]
    #: where the small result files of every run are kept (committed; see experiments.store); None: nowhere
    results_dir: Path | None = None

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
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown key '{k}' in {where}{hint}")


def _check_section(sec: str, body: object, where: str) -> None:
    """A ``defaults``/``scales.<scale>`` section: a pretrain/finetune one holds TrainConfig keys (less those the
    grid sets per run), an evaluation or denoiser one the keys of its config (:func:`block_keys`)."""
    if sec not in ("pretrain", "finetune", *BLOCK_CONFIGS):
        raise UserError(f"unknown section '{sec}' in {where}")
    where = f"{where}.{sec}"
    if not isinstance(body, dict):
        raise UserError(f"{where} must be a mapping of keys, got {body!r}")
    if sec not in ("pretrain", "finetune"):
        _check_keys(body, block_keys(sec), where)
        return
    for k in TRAIN_SPEC_KEYS & set(body):
        raise UserError(f"'{k}' in {where} is set by the grid for each run (stage and init are run keys; out is "
                        f"the run directory)")
    try:
        from_dict(TrainConfig, body)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load_experiment(name: str, scale: str = "cpu-small", out: str | Path | None = None,
                    overrides: list[str] | None = None, data_root: str | None = None,
                    device: str | None = None, only: list[str] | None = None,
                    results_dir: str | Path | None = None) -> Experiment:
    """Resolve and validate an experiment grid. Nothing runs here.

    ``results_dir``: a results store (e.g. ``results/``); the grid keeps its small result files in
    ``results_dir/NAME/SCALE`` and reuses them instead of re-running (see :mod:`experiments.store`)."""
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
    # ... and change single runs there: ``per_run: {id: {<run keys>}}``, merged over the run's own keys (e.g. a
    # hyper-parameter a CPU budget cannot afford, an evaluation a scale leaves out)
    scale_per_run = scale_spec.pop("per_run", None) or {}
    if not isinstance(scale_per_run, dict) or not all(isinstance(v, dict) for v in scale_per_run.values()):
        raise UserError(f"scales.{scale}.per_run in {path.name} must map run ids to run keys")
    for where, block in (("defaults", spec.get("defaults") or {}), (f"scales.{scale}", scale_spec)):
        for sec, body in block.items():
            _check_section(sec, body, f"{path.name} {where}")
    sections = merge(spec.get("defaults") or {}, scale_spec)
    at = f"at scale {scale}"
    exp_name = spec.get("name", path.stem)
    out = Path(out) if out else runs_root() / "experiments" / exp_name / scale
    runs_spec = spec.get("runs") or {}
    if not isinstance(runs_spec, dict):
        raise UserError(f"runs in {path.name} must map run ids to runs")
    runs_spec = expand_runs(runs_spec, path.name)  # a `matrix:` entry stands for the runs of its product
    for rid, extra in scale_per_run.items():
        if rid not in runs_spec:
            close = difflib.get_close_matches(str(rid), list(runs_spec), n=1)
            raise UserError(f"scales.{scale}.per_run in {path.name} names unknown run '{rid}'"
                            + (f" (did you mean '{close[0]}'?)" if close else ""))
        if "stage" in extra:
            raise UserError(f"scales.{scale}.per_run.{rid} in {path.name}: a scale cannot change a run's stage")
        if runs_spec[rid] is None or isinstance(runs_spec[rid], dict):  # anything else is refused below
            runs_spec[rid] = merge(runs_spec[rid] or {}, extra)
    if not runs_spec:
        raise UserError(f"experiment {exp_name} defines no runs")
    runs: dict[str, Run] = {}
    # evaluate runs last: each takes the training config of the run it evaluates
    for rid, rspec in sorted(runs_spec.items(),
                             key=lambda kv: isinstance(kv[1], dict) and kv[1].get("stage") == "evaluate"):
        if rspec is not None and not isinstance(rspec, dict):
            raise UserError(f"run '{rid}' in {path.name} must be a mapping of keys, got {rspec!r}")
        rspec = dict(rspec or {})
        stage = rspec.pop("stage", None)
        if stage not in ("pretrain", "finetune", "denoiser", "evaluate"):
            raise UserError(f"run '{rid}' in {path.name}: stage must be pretrain, finetune, denoiser or evaluate, "
                            f"got {stage!r}")
        if stage == "denoiser":
            label = rspec.pop("label", rid)
            _check_keys(rspec, block_keys("denoiser"), f"{path.name} run '{rid}' {at}")
            args = merge(sections.get("denoiser", {}), rspec)
            args = apply_overrides(args, [o.split(".", 1)[1] for o in (overrides or []) if o.startswith("denoiser.")])
            _check_keys(args, block_keys("denoiser"), f"{path.name} run '{rid}' {at}")
            if data_root:
                args["data_root"] = data_root
            if device:
                args["device"] = device
            runs[rid] = Run(id=rid, stage=stage, init=None, train=None, label=label, denoiser_args=args)
            continue
        init = rspec.pop("init", None)
        evaluate = rspec.pop("evaluate", ["certify"] if stage in ("finetune", "evaluate") else [])
        label = rspec.pop("label", rid)
        per_run_eval = {k: rspec.pop(k) or {} for k in EVAL_KINDS if k in rspec}
        for kind, block in per_run_eval.items():
            _check_keys(block, block_keys(kind), f"{path.name} run '{rid}' {kind} {at}")
        if "out" in rspec:
            raise UserError(f"run '{rid}' in {path.name}: 'out' is set by the grid (the run directory)")
        if stage == "finetune" and _stage_of(runs_spec, init) not in ("pretrain", "finetune"):
            raise UserError(f"run '{rid}' in {path.name}: init must name a pretrain or finetune run, got {init!r}")
        needs = [init] if init else []
        if stage == "evaluate":
            if init not in runs or runs[init].stage not in ("pretrain", "finetune"):
                raise UserError(f"run '{rid}' in {path.name}: an evaluate run's init must name a pretrain or "
                                f"finetune run (the model it evaluates), got {init!r}")
            training = sorted(k for k in rspec if k in {f.name for f in fields(TrainConfig)})
            if training:
                raise UserError(f"run '{rid}' in {path.name}: an evaluate run trains nothing; training keys "
                                f"{', '.join(training)} belong to its init run '{init}'")
            _check_keys(rspec, set(EVAL_KINDS), f"{path.name} run '{rid}'")
            if not evaluate:
                raise UserError(f"run '{rid}' in {path.name}: an evaluate run needs evaluate: [certify, ...]")
            train_cfg = runs[init].train
            evals = _evaluations(rid, evaluate, sections, per_run_eval, overrides, train_cfg, runs_spec, out,
                                 data_root, needs, path.name, at)
            runs[rid] = Run(id=rid, stage=stage, init=init, train=train_cfg, evaluate=evals, label=label,
                            needs=needs)
            continue
        train_dict = merge(sections.get(stage, {}), rspec)
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
        # certify.X / attack.X / noise_profile.X go to the evaluations, denoiser.X to denoiser runs (a
        # classifier's own `denoiser=PATH` has no dot)
        train_dict = apply_overrides(train_dict, [o for o in (overrides or [])
                                                  if not o.startswith((*EVAL_KINDS, "denoiser."))])
        try:
            train_cfg = from_dict(TrainConfig, train_dict)
            if stage == "finetune":
                train_cfg.validate()
            else:
                replace(train_cfg, init=None).validate()
        except UserError as e:
            raise UserError(f"run '{rid}' in {path.name} {at}: {e}") from None
        evals = _evaluations(rid, evaluate, sections, per_run_eval, overrides, train_cfg, runs_spec, out, data_root,
                             needs, path.name, at)
        runs[rid] = Run(id=rid, stage=stage, init=init, train=train_cfg, evaluate=evals, label=label, needs=needs)
    runs = {rid: runs[rid] for rid in runs_spec}  # the file's order again
    tables = spec.get("tables") or []
    for t in tables:
        _check_keys(t, TABLE_KEYS, f"{path.name} table '{t.get('id')}'")
        for row in t.get("rows", []):
            if row.get("run") not in runs:
                raise UserError(f"table '{t.get('id')}' in {path.name} names unknown run {row.get('run')!r}")
        for c in t.get("claims", []) or []:
            _check_keys(c, CLAIM_KEYS, f"{path.name} table '{t.get('id')}' claim")
            for side in ("a", "b"):
                if (c.get(side) or {}).get("run") not in runs:
                    raise UserError(f"a claim of table '{t.get('id')}' in {path.name} names unknown run "
                                    f"{(c.get(side) or {}).get('run')!r}")
    tables = _drop_uncertified_rows(tables, runs)
    if scale_runs is not None:
        runs = _closure(runs, scale_runs, f"scales.{scale}.runs in {path.name}")
        tables = _restrict_tables(tables, runs)
    if only:
        runs = _closure(runs, only, "--only")
        tables = _restrict_tables(tables, runs)
    store = Path(results_dir) / exp_name / scale if results_dir else None
    exp = Experiment(name=exp_name, scale=scale, out=out, spec=spec, runs=runs, tables=tables, results_dir=store)
    _check_data(exp)
    return exp


def _stage_of(runs_spec: dict, rid: object) -> str | None:
    """The stage of run ``rid`` as the grid file gives it (None: no such run)."""
    r = runs_spec.get(rid) if isinstance(rid, str) else None
    return r.get("stage") if isinstance(r, dict) else None


def _evaluations(rid: str, evaluate: list[str], sections: dict, per_run_eval: dict, overrides: list[str] | None,
                 train_cfg: TrainConfig, runs_spec: dict, out: Path, data_root: str | None, needs: list[str],
                 file: str, at: str) -> dict[str, dict]:
    """The evaluation settings of run ``rid``: the grid's sections, the run's own blocks, then ``--set kind.X``;
    a certify denoiser named by run id becomes its directory (and a dependency, appended to ``needs``)."""
    evals: dict[str, dict] = {}
    for kind in evaluate:
        if kind not in EVAL_KINDS:
            raise UserError(f"run '{rid}' in {file}: unknown evaluation '{kind}'; choose from "
                            f"{', '.join(EVAL_KINDS)}")
        e = merge(sections.get(kind, {}), per_run_eval.get(kind, {}))
        e = apply_overrides(e, [o.split(".", 1)[1] for o in (overrides or []) if o.startswith(kind + ".")])
        _check_keys(e, block_keys(kind), f"{file} run '{rid}' {kind} {at}")
        e.setdefault("dataset", train_cfg.data.dataset)
        if kind == "certify" and e.get("denoiser"):
            if _stage_of(runs_spec, e["denoiser"]) != "denoiser":
                raise UserError(f"run '{rid}' in {file}: certify.denoiser must name a denoiser run, "
                                f"got {e['denoiser']!r}")
            needs.append(e["denoiser"])
            e["denoiser"] = str(out / e["denoiser"] / "denoiser")
        if data_root:
            e["data_root"] = data_root
        evals[kind] = e
    if "certify" in evals and "noise_profile" not in evals:
        evals["noise_profile"] = base_accuracy_eval(evals["certify"])
    return evals


def base_accuracy_eval(cert: dict) -> dict:
    """The noise-profile evaluation that gives a certified run its base-classifier accuracy ("Clean Acc." of
    Qiu et al.: the base model on clean images, σ = 0) and its accuracy under noise at each certified σ, on
    exactly the test images that ``cert`` certifies (same dataset, split, skip, max)."""
    e = {k: cert[k] for k in ("dataset", "split", "skip", "max", "data_root") if cert.get(k) is not None}
    # with a denoiser, the classifier alone under noise is not the smoothed model's base: clean only
    e["sigmas"] = [0.0] if cert.get("denoiser") else [0.0, *sorted({float(s) for s in cert.get("sigmas", [])})]
    e["seed"] = int(cert.get("seed", 0))
    return e


def _certifies(runs: dict[str, Run], ref: dict) -> bool:
    """Whether the (run, σ) a table row or claim side names is certified at this scale: a row with a σ its run
    does not certify (a scale's ``per_run`` may certify fewer σ) has nothing to show."""
    run = runs.get(ref.get("run"))
    if run is None or ref.get("sigma") is None or "certify" not in run.evaluate:
        return True
    return any(abs(float(s) - float(ref["sigma"])) < 1e-9 for s in run.evaluate["certify"].get("sigmas", []))


def _drop_uncertified_rows(tables: list[dict], runs: dict[str, Run]) -> list[dict]:
    """Tables without the rows and claims naming a σ their run does not certify (see :func:`_certifies`)."""
    return _filter_tables(tables, lambda ref: _certifies(runs, ref))


def _restrict_tables(tables: list[dict], runs: dict[str, Run]) -> list[dict]:
    """Tables cut to the rows and claims of ``runs``; a paper row tied to one of our runs goes with it."""
    return _filter_tables(tables, lambda ref: ref["run"] in runs,
                          keep_paper=lambda p: p.get("run") is None or p["run"] in runs)


def _filter_tables(tables: list[dict], keep, keep_paper=None) -> list[dict]:
    """Tables with the rows and claims (both sides) that ``keep`` accepts, and the paper rows that
    ``keep_paper`` accepts (all when None); a table left without rows is dropped."""
    out = []
    for t in tables:
        rows = [r for r in t.get("rows", []) if keep(r)]
        claims = [c for c in t.get("claims", []) or [] if keep(c["a"]) and keep(c["b"])]
        paper = dict(t.get("paper") or {})
        if keep_paper is not None and paper.get("rows"):
            paper["rows"] = [p for p in paper["rows"] if keep_paper(p)]
        if rows:
            out.append(dict(t, rows=rows, claims=claims, **({"paper": paper} if paper else {})))
    return out


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


