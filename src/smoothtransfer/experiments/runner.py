"""Running an experiment grid: train (reusing finished runs and stored results), evaluate, store, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smoothtransfer.config import replace, to_dict
from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.denoiser_quality import PSNR_FILE
from smoothtransfer.evaluation.jobs import run_attack, run_noise_profile
from smoothtransfer.experiments import store
from smoothtransfer.experiments.parallel import available_cores, run_parallel
from smoothtransfer.experiments.spec import Experiment, Run
from smoothtransfer.experiments.tables import collect, write_report
from smoothtransfer.job_configs import AttackConfig, CertifyConfig, DenoiserConfig, NoiseProfileConfig
from smoothtransfer.smoothing.jobs import certify_run
from smoothtransfer.train.denoiser import finished_epochs, measure_psnr, train_denoiser
from smoothtransfer.train.engine import CHECKPOINT, read_train_state
from smoothtransfer.train.loop import check_out_dir, run_training
from smoothtransfer.utils import atomic_write_json, environment_info, git_revision, resolve_device

RESULT_FILES = {"attack": "attack.json", "noise_profile": "noise_profile.json"}


def _given(d: dict) -> dict:
    """The settings a grid gives (None and False leave the config's default, as an absent flag did)."""
    return {k: v for k, v in d.items() if v is not None and v is not False}


def run_eval(kind: str, ckpt: Path, out: Path, e: dict, device: str | None = None, progress: bool = True) -> int:
    """Certify, attack or noise-profile ``ckpt`` with the settings ``e`` into ``out`` through the library
    (:func:`~smoothtransfer.smoothing.certify_run`, :func:`~smoothtransfer.evaluation.run_attack`,
    :func:`~smoothtransfer.evaluation.run_noise_profile`). Certify resumes by itself; an attack or noise profile
    whose result file exists with the same settings is reused. Returns 0, or 1 for a certificate check that
    found violations (then a UserError is raised after the settings are recorded)."""
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
    common = {"checkpoint": str(ckpt), "out": str(out), **({"device": device} if device else {}), **_given(e)}
    rc = 0
    if kind == "certify":
        result = certify_run(CertifyConfig(**common, progress=progress))
        print(result.table(), end="")
    elif kind == "attack":
        res = run_attack(AttackConfig(**common, progress=progress))
        print(res.line)
        rc = 1 if res.violations else 0
    elif kind == "noise_profile":
        print(run_noise_profile(NoiseProfileConfig(**common, overwrite=replace_old)).line)
    else:
        raise UserError(f"unknown evaluation '{kind}'")
    atomic_write_json(settings_file, settings)
    if rc != 0:
        raise UserError(f"{kind.replace('_', '-')} on {ckpt} exited with status {rc}")
    return rc


def _denoiser_config(run: Run, out: Path, **kw: Any) -> DenoiserConfig:
    """The ``train-denoiser`` config of a ``denoiser`` run writing to ``out``."""
    return DenoiserConfig(**_given(dict(run.denoiser_args or {})), out=str(out), **kw)


def run_denoiser(run: Run, out: Path, progress: bool = True) -> None:
    """Train the denoiser of a ``denoiser`` run (:func:`~smoothtransfer.train.train_denoiser`), resumed when
    ``out`` holds an unfinished run; a finished one (also of an earlier version's layout) is reused."""
    cfg = _denoiser_config(run, out, resume=True, progress=progress)
    if finished_epochs(out) >= cfg.epochs:
        # trained already (perhaps before denoisers measured their PSNR, or interrupted while measuring it)
        if cfg.psnr_images and not (out / PSNR_FILE).is_file():
            measure_psnr(cfg.validate(), out, resolve_device(cfg.device))
        return
    train_denoiser(cfg)


def has_final_weights(exp: Experiment, run_id: str) -> bool:
    """The run directory of ``run_id`` holds its finished model (an interrupted run's resume checkpoint does not
    count: a run started from it would start from a half-trained model)."""
    run, d = exp.runs[run_id], exp.out / run_id
    if not run.trains:  # no model of its own (and no run starts from it)
        return False
    if run.stage == "denoiser":
        return finished_epochs(d / "denoiser") >= _denoiser_config(run, d / "denoiser").epochs
    state = read_train_state(d / "train")
    return bool(state and state.get("finished"))


def plan(exp: Experiment) -> list[Run]:
    """The runs that must execute: those the store does not hold complete, plus any run they start from whose
    finished model is not in its run directory (a stored run keeps its results, not its weights), plus the
    evaluate runs of every training run that runs (their stored results are of the model it replaces), plus
    every run downstream of a model that is trained anew (its run directory lacks the finished model).

    Why the last: a model trained again is not, bit for bit, the model the stored downstream runs started
    from or evaluated (another CPU, another precision, another thread count), so keeping their stored results
    would pair, in one table, a fine-tune of the new model with evaluations of the old one."""
    todo = {r.id for r in exp.runs.values() if not store.is_complete(exp, r)}
    grew = True
    while grew:
        grew = False
        for rid in list(todo):
            for dep in exp.runs[rid].needs:
                if dep not in todo and not has_final_weights(exp, dep):
                    todo.add(dep)
                    grew = True
            retrained = exp.runs[rid].trains and not has_final_weights(exp, rid)
            for r in exp.runs.values():
                if r.id in todo:
                    continue
                # a model trained again is not the model its stored evaluate runs evaluated, nor the one its
                # stored downstream runs started from (or denoised with): run them again
                if (not r.trains and r.init == rid) or (retrained and rid in r.needs):
                    todo.add(r.id)
                    grew = True
    return [r for r in exp.order() if r.id in todo]


def run_one(exp: Experiment, run_id: str, progress: bool = True) -> None:
    """Train and evaluate one run of the grid (its dependencies must be done), time it and store its results."""
    run = exp.runs[run_id]
    with store.timed(exp, run.id):  # wall time, counted across interruptions and sessions
        if run.stage == "denoiser":
            run_denoiser(run, exp.out / run.id / "denoiser", progress)
        elif run.stage == "evaluate":  # the init run's final model, evaluated with this run's settings
            if not has_final_weights(exp, run.init):
                raise UserError(f"run '{run.id}' evaluates the model of '{run.init}', which has no finished model "
                                f"in {exp.out / run.init / 'train'}")
            check_out_dir(exp.runs[run.init].train, resume=True)  # its weights are of its current settings
            ckpt = exp.out / run.init / "train" / CHECKPOINT
            for kind, e in run.evaluate.items():
                run_eval(kind, ckpt, exp.out / run.id / kind, e, device=run.train.device, progress=progress)
        else:
            cfg = run.train if progress else replace(run.train, progress=False)
            ckpt = run_training(cfg, resume=True)
            for kind, e in run.evaluate.items():
                run_eval(kind, ckpt, exp.out / run.id / kind, e, device=run.train.device, progress=progress)
    store.export_run(exp, run)


def run_experiment(exp: Experiment, progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Train and evaluate every run (reusing finished runs and complete stored results), keep the small
    result files in the store, then write the tables. Returns the results.

    ``jobs`` > 1 runs independent runs side by side, each in its own process on its own cores (0: one per
    core, at most one per independent chain; :mod:`~smoothtransfer.experiments.parallel`; progress bars are
    then off and output lines carry the run id). Results are the same up to the CPU kernels' sums over fewer threads (see ``parallel``)."""
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
    if jobs == 0:  # auto: one process per core, no more than the independent chains of runs to do
        ids = {r.id for r in todo}
        jobs = min(len(available_cores()), max(1, sum(1 for r in todo if not set(r.needs) & ids)))
    if jobs > 1 and len(todo) > 1:
        n = len(todo)
        position = {r.id: i for i, r in enumerate(todo, 1)}

        def announce(run: Run, cores: list[int]) -> None:
            print(f"[{exp.name}/{exp.scale}] run {position[run.id]}/{n}: {run.id} ({run.stage}) on core(s) "
                  f"{','.join(map(str, cores))}", flush=True)

        run_parallel(todo, needs=lambda r: r.needs, key=lambda r: r.id, target=run_one,
                     args_of=lambda r: (exp, r.id, False), jobs=jobs,
                     done={r.id for r in exp.runs.values()} - {r.id for r in todo}, announce=announce)
    else:
        for i, run in enumerate(todo, 1):
            print(f"[{exp.name}/{exp.scale}] run {i}/{len(todo)}: {run.id} ({run.stage})", flush=True)
            run_one(exp, run.id, progress)
    results = collect(exp)
    write_report(exp, results)
    return results
