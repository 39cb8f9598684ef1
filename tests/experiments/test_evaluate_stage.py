"""``stage: evaluate``: a run that trains nothing and evaluates its init run's final model with settings of its
own (FT-CADIS's Gaussian vs denoised smoothing of one off-the-shelf classifier, not of two trainings)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from smoothtransfer.errors import UserError
from smoothtransfer.experiments import load_experiment, plan, run_experiment, store
from tests.experiments.test_parallel import _folder


def _grid(tmp_path, data, ev: dict | None = None, extra: dict | None = None) -> str:
    spec = {
        "name": "ev", "title": "evaluate stage",
        "defaults": {
            "pretrain": {"data": {"dataset": f"imagefolder:{data}", "val_fraction": 0.2}, "model": {"arch": "resnet20"},
                         "objective": {"name": "clean"}, "epochs": 1, "batch_size": 4},
            "certify": {"split": "test", "sigmas": [0.25], "n0": 8, "n": 32, "alpha": 0.001, "seed": 0,
                        "batch_size": 40, "max": 4},
        },
        "scales": {"cpu-small": {}},
        # the evaluate run comes first in the file: it must still take the config of the run it evaluates
        "runs": {"up-again": ev if ev is not None else {"stage": "evaluate", "init": "up", "certify": {"sigmas": [0.5]}},
                 "up": {"stage": "pretrain", "evaluate": ["certify"]}, **(extra or {})},
        "tables": [],
    }
    path = tmp_path / "ev.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))  # decoded datasets stay in tmp_path


def test_evaluate_run_takes_the_init_model_and_its_own_settings(tmp_path):
    data = _folder(tmp_path / "data", 0)
    exp = load_experiment(_grid(tmp_path, data), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "st")
    ev, up = exp.runs["up-again"], exp.runs["up"]
    assert ev.stage == "evaluate" and ev.needs == ["up"] and ev.train is up.train
    assert ev.evaluate["certify"]["sigmas"] == [0.5] and up.evaluate["certify"]["sigmas"] == [0.25]
    assert list(exp.runs) == ["up-again", "up"] and [r.id for r in exp.order()] == ["up", "up-again"]


@pytest.mark.parametrize("ev, needle", [
    ({"stage": "evaluate", "init": "nope"}, "init must name a pretrain or finetune run"),
    ({"stage": "evaluate"}, "init must name a pretrain or finetune run"),
    ({"stage": "evaluate", "init": "up", "epochs": 3}, "trains nothing; training keys epochs belong to its init run 'up'"),
    ({"stage": "train", "init": "up"}, "stage must be pretrain, finetune, denoiser or evaluate"),
    ({"stage": "evaluate", "init": "up", "certfy": {}}, r"unknown key 'certfy' .*did you mean 'certify'"),
    ({"stage": "evaluate", "init": "up", "evaluate": []}, "needs evaluate: \\[certify"),
    ({"stage": "pretrain", "evaluate": ["certify"], "certify": {"denoiser": "up"}}, "must name a denoiser run"),
    ("nope", "must be a mapping of keys"),
])
def test_bad_evaluate_runs_are_one_line_errors(tmp_path, ev, needle):
    data = _folder(tmp_path / "data", 0)
    with pytest.raises(UserError, match=needle):
        load_experiment(_grid(tmp_path, data, ev), "cpu-small", out=tmp_path / "runs")


def test_nothing_starts_from_an_evaluate_run(tmp_path):
    data = _folder(tmp_path / "data", 0)
    with pytest.raises(UserError, match="run 'ft' .*init must name a pretrain or finetune run, got 'up-again'"):
        load_experiment(_grid(tmp_path, data, extra={"ft": {"stage": "finetune", "init": "up-again"}}), "cpu-small",
                        out=tmp_path / "runs")


def test_evaluate_run_certifies_the_trained_model_once_and_is_stored(tmp_path):
    data = _folder(tmp_path / "data", 0)
    exp = load_experiment(_grid(tmp_path, data), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "st")
    run_experiment(exp, progress=False)
    runs = tmp_path / "runs"
    assert not (runs / "up-again" / "train").exists()  # nothing trained for it
    settings = json.loads((runs / "up-again" / "certify" / "experiment_settings.json").read_text())
    assert settings["checkpoint"] == str(runs / "up" / "train" / "checkpoint.pt")  # the init run's own model

    def sha(rid: str, sigma: str) -> str:
        return json.loads((runs / rid / "certify" / f"sigma_{sigma}.json").read_text())["checkpoint_sha256"]

    assert sha("up-again", "0.50") == sha("up", "0.25")  # what certify loaded: the very same weights
    assert not (tmp_path / "st" / "ev" / "cpu-small" / "up-again" / "train").exists()
    assert len((runs / "up-again" / "certify" / "sigma_0.50.tsv").read_text().splitlines()) == 5  # 4 images
    assert store.is_complete(exp, exp.runs["up-again"]) and plan(exp) == []
    # a fresh clone: the store alone still counts it complete; a changed upstream makes it stale
    shutil.rmtree(runs)
    assert plan(exp) == []
    # the upstream's own evaluations may change without making the evaluate run stale (same model) ...
    spec = yaml.safe_load(open(tmp_path / "ev.yaml"))
    spec["runs"]["up"]["certify"] = {"n": 64}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    exp1 = load_experiment(str(tmp_path / "ev.yaml"), "cpu-small", out=runs, results_dir=tmp_path / "st")
    assert store.is_complete(exp1, exp1.runs["up-again"]) and not store.is_complete(exp1, exp1.runs["up"])
    # ... but training it again (its weights are gone) makes a new model: the evaluate run runs again too
    assert [r.id for r in plan(exp1)] == ["up", "up-again"]
    spec = yaml.safe_load(open(tmp_path / "ev.yaml"))
    spec["runs"]["up"]["epochs"] = 2
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    exp2 = load_experiment(str(tmp_path / "ev.yaml"), "cpu-small", out=runs, results_dir=tmp_path / "st")
    assert [r.id for r in plan(exp2)] == ["up", "up-again"]


def test_evaluate_run_without_a_finished_init_model_is_refused(tmp_path):
    from smoothtransfer.experiments import runner

    data = _folder(tmp_path / "data", 0)
    exp = load_experiment(_grid(tmp_path, data), "cpu-small", out=tmp_path / "runs", results_dir=None)
    with pytest.raises(UserError, match="evaluates the model of 'up', which has no finished model"):
        runner.run_one(exp, "up-again", progress=False)
