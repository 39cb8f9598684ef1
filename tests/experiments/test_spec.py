"""experiments.spec: the keys of a grid's blocks come from the config dataclasses; the ``matrix`` construct."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from smoothtransfer.config import opt
from smoothtransfer.errors import UserError
from smoothtransfer.experiments import load_experiment, spec
from smoothtransfer.experiments.matrix import expand_matrix, expand_runs
from smoothtransfer.job_configs import CertifyConfig


def _grid(tmp_path, runs: dict, defaults: dict | None = None, scales: dict | None = None) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny",
        "defaults": {"pretrain": {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet20"}},
                     "finetune": {"data": {"dataset": "cifar10"}},
                     "certify": {"sigmas": [0.25], "n": 100, "n0": 10}, **(defaults or {})},
        "scales": scales or {"cpu-small": {}},
        "runs": runs,
    }, allow_unicode=True, sort_keys=False))
    return str(path)


def _load(path: str, tmp_path, scale: str = "cpu-small"):
    return load_experiment(path, scale, out=tmp_path / "out", data_root=os.environ.get("SMOOTHTRANSFER_DATA"))


# ---------------------------------------------------------------------------------- keys from the configs


def test_block_keys_are_the_config_fields_less_the_runners():
    for kind, cls in spec.BLOCK_CONFIGS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert spec.block_keys(kind) <= names
        assert {"checkpoint", "out", "progress", "overwrite"}.isdisjoint(spec.block_keys(kind))
    # keys the hand-written lists lacked are accepted now: they are CertifyConfig / AttackConfig fields
    assert {"workers", "pack", "compile", "radius_grid"} <= spec.block_keys("certify")
    assert {"restarts", "sigma", "m", "eps_fraction"} <= spec.block_keys("attack")
    assert "device" in spec.block_keys("denoiser") and "device" not in spec.block_keys("certify")


@pytest.mark.parametrize("where, runs, defaults, needle", [
    ("run certify block", {"a": {"stage": "pretrain", "evaluate": ["certify"], "certify": {"nn": 5}}}, None,
     "unknown key 'nn' in tiny.yaml run 'a' certify at scale cpu-small (did you mean 'n'?)"),
    ("run attack block", {"a": {"stage": "pretrain", "evaluate": ["attack"], "attack": {"epz": 1}}}, None,
     "unknown key 'epz' in tiny.yaml run 'a' attack at scale cpu-small (did you mean 'eps'?)"),
    ("defaults", {"a": {"stage": "pretrain"}}, {"noise_profile": {"sigmaz": [0.0]}},
     "unknown key 'sigmaz' in tiny.yaml defaults.noise_profile (did you mean 'sigmas'?)"),
    ("train key of a run", {"a": {"stage": "pretrain", "optim": {"lrr": 1}}}, None,
     "run 'a' in tiny.yaml at scale cpu-small: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("train key of defaults", {"a": {"stage": "pretrain"}}, {"finetune": {"epoch": 2}},
     "tiny.yaml defaults.finetune: unknown config key 'epoch' (did you mean 'epochs'?)"),
    ("runner's key", {"a": {"stage": "pretrain", "evaluate": ["certify"], "certify": {"checkpoint": "x"}}}, None,
     "unknown key 'checkpoint' in tiny.yaml run 'a' certify"),
])
def test_unknown_key_is_one_line_naming_it(where, runs, defaults, needle, data_root, tmp_path):
    with pytest.raises(UserError) as e:
        _load(_grid(tmp_path, runs, defaults), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), where


def test_scale_block_is_checked_and_named(data_root, tmp_path):
    path = _grid(tmp_path, {"a": {"stage": "pretrain"}}, scales={"cpu-small": {}, "cpu": {"certify": {"mx": 3}}})
    _load(path, tmp_path)  # the other scale's block is not this scale's business
    with pytest.raises(UserError, match=r"unknown key 'mx' in tiny.yaml scales.cpu.certify \(did you mean 'max'"):
        _load(path, tmp_path, "cpu")


def test_a_new_config_field_is_accepted_without_touching_the_spec(data_root, tmp_path, monkeypatch):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NewCertify(CertifyConfig):
        new_knob: int = opt(3, help="a field added to CertifyConfig")

    path = _grid(tmp_path, {"a": {"stage": "pretrain", "evaluate": ["certify"], "certify": {"new_knob": 5}}})
    with pytest.raises(UserError, match="unknown key 'new_knob'"):
        _load(path, tmp_path)
    monkeypatch.setitem(spec.BLOCK_CONFIGS, "certify", NewCertify)
    assert _load(path, tmp_path).runs["a"].evaluate["certify"]["new_knob"] == 5


def test_scale_per_run_changes_one_run_at_that_scale_only(data_root, tmp_path):
    runs = {"up": {"stage": "pretrain", "objective": {"name": "consistency", "params": {"sigma": 0.5, "eta": 0.5}}},
            "ft": {"stage": "finetune", "init": "up", "objective": {"name": "consistency", "params": {"eta": 0.5}}}}
    per_run = {"up": {"objective": {"params": {"eta": 0.0}}, "label": "η=0", "certify": {"n": 50},
                      "evaluate": ["certify"]}}
    path = _grid(tmp_path, runs, scales={"cpu-small": {}, "cpu": {"per_run": per_run}})
    small, cpu = _load(path, tmp_path), _load(path, tmp_path, "cpu")
    assert small.runs["up"].train.objective.params == {"sigma": 0.5, "eta": 0.5} and not small.runs["up"].evaluate
    up = cpu.runs["up"]
    assert up.train.objective.params == {"sigma": 0.5, "eta": 0.0} and up.label == "η=0"  # merged, not replaced
    assert up.evaluate["certify"]["n"] == 50 and up.evaluate["certify"]["n0"] == 10
    assert cpu.runs["ft"].train.objective.params == {"eta": 0.5}  # other runs untouched


def test_rows_of_a_sigma_a_scale_does_not_certify_are_dropped(data_root, tmp_path):
    runs = {"a": {"stage": "pretrain", "evaluate": ["certify"], "certify": {"sigmas": [0.25, 1.0]}}}
    table = {"id": "t", "title": "t", "columns": ["cert:0.25"],
             "rows": [{"run": "a", "sigma": 0.25}, {"run": "a", "sigma": 1.0}, {"run": "a"}],
             "claims": [{"claim": "c", "a": {"run": "a", "sigma": 1.0}, "b": {"run": "a", "sigma": 0.25},
                         "metric": "cert:0.25", "expect": ">"}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "defaults": {"pretrain": {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet20"}},
                                     "certify": {"n": 100, "n0": 10}},
        "scales": {"cpu-small": {}, "cpu": {"per_run": {"a": {"certify": {"sigmas": [0.25]}}}}},
        "runs": runs, "tables": [table]}, allow_unicode=True, sort_keys=False))
    small, cpu = _load(str(path), tmp_path), _load(str(path), tmp_path, "cpu")
    assert len(small.tables[0]["rows"]) == 3 and len(small.tables[0]["claims"]) == 1
    assert cpu.tables[0]["rows"] == [{"run": "a", "sigma": 0.25}, {"run": "a"}] and cpu.tables[0]["claims"] == []


@pytest.mark.parametrize("per_run, needle", [
    ({"upp": {"epochs": 1}}, r"scales.cpu.per_run in tiny.yaml names unknown run 'upp' \(did you mean 'up'\?\)"),
    ({"up": {"stage": "finetune"}}, "a scale cannot change a run's stage"),
    ({"up": 3}, "must map run ids to run keys"),
    ({"up": {"epoch": 2}}, "unknown config key 'epoch'"),
])
def test_scale_per_run_errors_are_one_line(per_run, needle, data_root, tmp_path):
    path = _grid(tmp_path, {"up": {"stage": "pretrain"}}, scales={"cpu": {"per_run": per_run}})
    with pytest.raises(UserError, match=needle):
        _load(path, tmp_path, "cpu")


# ---------------------------------------------------------------------------------- the matrix construct

TABLE1 = {
    "stage": "finetune", "init": "pre-{pre}", "label": "{pre.text} → {ft.text}, {mode}",
    "matrix": {
        "mode": {"full": {}, "fixed": {"set": {"mode": "fixed", "optim": {"lr": 0.005}}}},
        "pre": {"clean": {"text": "clean"}, "g025": {"text": "σ=0.25"}},
        "ft": {"clean": {"text": "clean"},
               "g025": {"text": "σ=0.25", "set": {"objective": {"name": "gaussian", "params": {"sigma": 0.25}}}}},
    },
    "per_run": {"ft-clean-clean-full": {"certify": {"sigmas": [0.25, 0.5]}}},
}


def test_matrix_names_labels_and_order():
    runs = expand_matrix("ft-{pre}-{ft}-{mode}", TABLE1, "t.yaml")
    assert list(runs) == ["ft-clean-clean-full", "ft-clean-g025-full", "ft-g025-clean-full", "ft-g025-g025-full",
                          "ft-clean-clean-fixed", "ft-clean-g025-fixed", "ft-g025-clean-fixed", "ft-g025-g025-fixed"]
    assert runs["ft-g025-clean-fixed"] == {"stage": "finetune", "init": "pre-g025", "label": "σ=0.25 → clean, fixed",
                                           "mode": "fixed", "optim": {"lr": 0.005}}
    assert runs["ft-clean-g025-full"]["objective"] == {"name": "gaussian", "params": {"sigma": 0.25}}
    assert runs["ft-clean-clean-full"]["certify"] == {"sigmas": [0.25, 0.5]}  # per_run
    assert "certify" not in runs["ft-g025-g025-full"]
    assert TABLE1["matrix"]["mode"]["fixed"]["set"] == {"mode": "fixed", "optim": {"lr": 0.005}}  # not modified


def test_matrix_variables_keep_their_type_inside_text_they_format():
    entry = {"objective": {"params": {"sigma": "{s.sigma}"}}, "certify": {"sigmas": ["{s.sigma}"]},
             "label": "σ={s.sigma} ({s.sigma:.2f}), {{literal}}", "matrix": {"s": {"g1": {"sigma": 1.0}}}}
    run = expand_matrix("x-{s}", entry, "t.yaml")["x-g1"]
    assert run["objective"]["params"]["sigma"] == 1.0 and isinstance(run["objective"]["params"]["sigma"], float)
    assert run["certify"]["sigmas"] == [1.0]
    assert run["label"] == "σ=1.0 (1.00), {literal}"
    assert list(expand_matrix("m-{mode}", {"matrix": {"mode": ["full", "fixed"]}}, "t.yaml")) == ["m-full", "m-fixed"]


@pytest.mark.parametrize("runs, needle", [
    ({"ft-clean-g025-full": {"stage": "finetune"}, "ft-{pre}-{ft}-{mode}": TABLE1},
     "run 'ft-clean-g025-full' in t.yaml is defined twice: by 'ft-clean-g025-full' and by 'ft-{pre}-{ft}-{mode}'"),
    ({"ft-{pre}-{ft}-{mode}": TABLE1, "ft-{pre}-{ft}-full": {**TABLE1, "matrix": {**TABLE1["matrix"], "mode": ["x"]},
                                                              "per_run": {}}},
     "run 'ft-clean-clean-full' in t.yaml is defined twice"),
    ({"ft-{pre}-{ft}": TABLE1}, "two combinations make the run id 'ft-clean-clean'; put every axis in the id"),
    ({"ft-{pre}-{ft}-{mode}": {**TABLE1, "per_run": {"ft-x": {}}}}, "per_run names 'ft-x', which is not a run"),
    ({"ft-{pre}-{ft}-{mood}": TABLE1}, "'{mood}' names no axis of the matrix (mode, pre, ft)"),
    ({"ft-{pre}-{ft}-{mode}": {**TABLE1, "label": "{pre.txt}"}}, "value 'clean' of axis 'pre' has no variable 'txt'"),
    ({"a-{m}": {"matrix": {"m": "full"}}}, "matrix axis 'm' must map value ids"),
])
def test_matrix_errors_are_one_line(runs, needle):
    with pytest.raises(UserError) as e:
        expand_runs(runs, "t.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_matrix_runs_are_ordinary_runs_of_the_grid(data_root, tmp_path):
    path = _grid(tmp_path, {
        "pre-{up}": {"stage": "pretrain", "objective": {"name": "gaussian", "params": {"sigma": "{up.sigma}"}},
                     "matrix": {"up": {"a": {"sigma": 0.25}, "b": {"sigma": 0.5}}}},
        "ft-{up}": {"stage": "finetune", "init": "pre-{up}", "label": "from {up}", "matrix": {"up": ["a", "b"]},
                    "per_run": {"ft-b": {"certify": {"sigmas": [0.5]}}}},
    })
    exp = _load(path, tmp_path)
    assert list(exp.runs) == ["pre-a", "pre-b", "ft-a", "ft-b"]
    assert exp.runs["pre-b"].train.objective.params == {"sigma": 0.5}
    assert exp.runs["ft-b"].needs == ["pre-b"] and exp.runs["ft-b"].label == "from b"
    assert exp.runs["ft-a"].evaluate["certify"]["sigmas"] == [0.25]
    assert exp.runs["ft-b"].evaluate["certify"]["sigmas"] == [0.5]
    assert [r.id for r in load_experiment(path, "cpu-small", out=tmp_path / "o", only=["ft-b"]).order()] == \
        ["pre-b", "ft-b"]


def test_bundled_table1_grid_expands_to_the_named_runs(data_root, tmp_path):
    exp = load_experiment("mixed-noise-transfer", "cpu-small", out=tmp_path / "o")
    t1 = [f"ft-{p}-{f}-{m}" for m in ("full", "fixed") for p in ("clean", "g025", "mixed") for f in ("clean", "g025")]
    ids = list(exp.runs)
    assert ids[ids.index(t1[0]):ids.index(t1[0]) + 12] == t1
    run = exp.runs["ft-mixed-g025-fixed"]
    assert run.label == "mixed → σ=0.25, fixed" and run.init == "pre-mixed"
    assert (run.train.mode, run.train.optim.lr, run.train.objective.params) == ("fixed", 0.005, {"sigma": 0.25})
    assert exp.runs["scratch-g100"].evaluate["certify"]["sigmas"] == [1.0]
    assert exp.runs["ft1-mixed-gn"].label == "mixed (GN) → clean, 1 epoch"
