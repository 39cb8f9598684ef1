"""The ``pretrain``/``finetune`` flags are generated from TrainConfig's fields (config.py ``opt``)."""

from __future__ import annotations

import argparse

import pytest

from smoothtransfer.commands._flags import train_flags
from smoothtransfer.commands._train_args import add_common, config_from_args
from smoothtransfer.config import NORM_CHOICES, TrainConfig, from_dict, to_dict
from smoothtransfer.errors import UserError

#: the flags as they were written by hand before they were generated (names must not change)
PRETRAIN = {"--dataset", "--data-root", "--model", "--norm", "--objective", "--sigma", "--sigmas", "--param",
            "--epochs", "--batch-size", "--lr", "--optimizer", "--weight-decay", "--warmup-epochs", "--ema",
            "--grad-clip", "--max-train", "--val-fraction", "--shots-per-class", "--eval-sigmas", "--select",
            "--amp", "--device", "--threads", "--seed", "--out", "--no-progress",
            "--compile"}  # added later, not renamed
FINETUNE_ONLY = {"--init", "--mode", "--lora-rank", "--lora-alpha", "--denoiser"}


def _parse(stage: str, argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_common(p, stage)
    return config_from_args(p.parse_args(argv), stage)


def test_flag_names_are_kept():
    assert {f.flag for f in train_flags("pretrain")} == PRETRAIN
    assert {f.flag for f in train_flags("finetune")} == PRETRAIN | FINETUNE_ONLY


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_flag_sets_a_trainconfig_key(stage):
    """Each flag's dotted key is a key of TrainConfig (a dict field's keys for --sigma/--sigmas/--param)."""
    default = to_dict(TrainConfig())
    for fl in train_flags(stage):
        node = default
        parts = fl.key.split(".")
        for part in parts[:-1]:
            node = node[part]
        assert parts[-1] in node or isinstance(node, dict) and parts[-2:-1] == ["params"], fl


def test_norm_choices_are_the_registered_norms():
    from smoothtransfer.models import NORMS

    assert sorted(NORM_CHOICES) == sorted(NORMS.names())


def test_flags_map_onto_keys():
    cfg = _parse("finetune", [
        "--init", "ck.pt", "--model", "resnet56", "--optimizer", "adamw", "--objective", "consistency", "--sigma",
        "0.5", "--param", "m=2", "--eval-sigmas", "0.25", "0.5", "--no-progress", "--mode", "head", "--max-train",
        "10", "--set", "optim.momentum=0.5"])
    assert cfg.model.arch == "resnet56" and cfg.optim.name == "adamw" and cfg.optim.momentum == 0.5
    assert cfg.objective.name == "consistency" and cfg.objective.params == {"sigma": 0.5, "m": 2}
    assert cfg.eval_sigmas == (0.25, 0.5) and cfg.progress is False and cfg.mode == "fixed"
    assert cfg.data.max_train == 10 and cfg.init == "ck.pt" and cfg.stage == "finetune"


def test_config_file_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nbatch_size: 9\noptim: {lr: 0.3}\n")
    cfg = _parse("pretrain", ["--config", str(path), "--epochs", "2", "--lr", "0.2", "--set", "optim.lr=0.01"])
    assert (cfg.epochs, cfg.batch_size, cfg.optim.lr) == (2, 9, 0.01)
    # a flag not given leaves the file's value and the default alone
    assert _parse("pretrain", ["--config", str(path)]) == from_dict(TrainConfig, {"epochs": 7, "batch_size": 9,
                                                                                "optim": {"lr": 0.3}})


def test_finetune_needs_init_and_pretrain_has_no_init(capsys):
    with pytest.raises(SystemExit):
        _parse("finetune", [])
    with pytest.raises(SystemExit):
        _parse("pretrain", ["--init", "x.pt"])
    capsys.readouterr()
    with pytest.raises(UserError, match="--param 'm' must look like key=value"):
        _parse("pretrain", ["--param", "m"])
