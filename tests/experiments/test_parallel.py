"""experiment --jobs: independent runs side by side in pinned processes give the same result files as one
after the other; a failing run is named and stops the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from smoothtransfer.errors import UserError
from smoothtransfer.experiments import load_experiment, run_experiment
from smoothtransfer.experiments.parallel import core_slots


def _folder(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(10):
                a = np.clip(rng.normal(60 + 130 * c, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _grid(tmp_path: Path, data: Path, bad: bool = False) -> Path:
    spec = {
        "name": "par", "title": "parallel check",
        "defaults": {
            "pretrain": {"data": {"dataset": f"imagefolder:{data}", "val_fraction": 0.2}, "model": {"arch": "resnet20"},
                         "objective": {"name": "clean"}, "epochs": 1, "batch_size": 4},
            "finetune": {"data": {"dataset": f"imagefolder:{data}", "val_fraction": 0.2}, "epochs": 1, "batch_size": 4},
            "certify": {"split": "test", "sigmas": [0.25], "n0": 8, "n": 32, "alpha": 0.001, "seed": 0,
                        "batch_size": 40, "max": 6},
        },
        "scales": {"cpu-small": {}},
        "runs": {
            "a": {"stage": "pretrain", "evaluate": ["certify"],
                  "objective": {"name": "gaussian", "params": {"sigma": 0.25}}},
            "b": {"stage": "pretrain", "evaluate": ["certify"],
                  **({"optim": {"name": "sgd", "lr": 1e30}} if bad else {})},  # diverges: a run-time error
            "a-ft": {"stage": "finetune", "init": "a", "evaluate": ["certify"]},
        },
        "tables": [],
    }
    path = tmp_path / ("bad.yaml" if bad else "par.yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(d: Path) -> list[list[str]]:
    lines = (d / "certify" / "sigma_0.25.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [[v for k, v in zip(head, ln.split("\t")) if k != "time"] for ln in lines]


def test_core_slots_are_disjoint():
    assert core_slots(2, [0, 1, 2, 3]) == [[0, 2], [1, 3]]
    assert core_slots(5, [0, 1]) == [[0], [1]]
    assert core_slots(1, [3, 5]) == [[3, 5]]


@pytest.mark.skipif(len(core_slots(2)) < 2, reason="needs two cores")
def test_two_jobs_give_the_same_results_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data", 0)
    path = _grid(tmp_path, data)
    res = {}
    for jobs in (1, 2):
        exp = load_experiment(str(path), "cpu-small", out=tmp_path / f"runs{jobs}", results_dir=tmp_path / f"st{jobs}")
        run_experiment(exp, progress=False, jobs=jobs)
        res[jobs] = {r: _rows(exp.results_dir / r) for r in ("a", "b", "a-ft")}
        assert all(len(v) == 7 for v in res[jobs].values())  # header + 6 images: every run finished and stored
    assert res[1] == res[2]


@pytest.mark.skipif(len(core_slots(2)) < 2, reason="needs two cores")
def test_a_failing_run_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data", 0)
    exp = load_experiment(str(_grid(tmp_path, data, bad=True)), "cpu-small", out=tmp_path / "runs", results_dir=None)
    with pytest.raises(UserError, match="run 'b' failed"):
        run_experiment(exp, progress=False, jobs=2)


def test_plan_retrains_an_upstream_run_left_half_trained(tmp_path, monkeypatch):
    """A stored-complete upstream run whose run directory holds only an interrupted checkpoint is run again
    before its dependents start from it (before: any checkpoint.pt counted, e.g. one of epoch 3 of 15)."""
    from smoothtransfer.experiments import runner, store

    data = _folder(tmp_path / "data", 0)
    exp = load_experiment(str(_grid(tmp_path, data)), "cpu-small", out=tmp_path / "runs", results_dir=None)
    monkeypatch.setattr(store, "is_complete", lambda e, r: r.id != "a-ft")
    for state, expect in (({"finished": False, "epoch": 3}, ["a", "a-ft"]), ({"finished": True}, ["a-ft"]),
                          (None, ["a", "a-ft"])):
        monkeypatch.setattr(runner, "read_train_state", lambda out, s=state: s)
        assert [r.id for r in runner.plan(exp)] == expect
