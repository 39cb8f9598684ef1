"""experiments.spec: the keys of a grid's blocks come from the config dataclasses; the ``matrix`` construct."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from smoothtransfer.config import opt
from smoothtransfer.errors import UserError
from smoothtransfer.experiments import load_experiment, spec
from smoothtransfer.job_configs import CertifyConfig


@pytest.fixture(scope="module")
def data_root() -> str:
    from smoothtransfer.data.datasets import resolve_data_root

    try:
        root = resolve_data_root(os.environ.get("SMOOTHTRANSFER_DATA"))
    except UserError:
        pytest.skip("datasets folder not found (set SMOOTHTRANSFER_DATA)")
    if not (root / "cifar10").is_dir():
        pytest.skip(f"no cifar10 in {root}")
    return str(root)


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
