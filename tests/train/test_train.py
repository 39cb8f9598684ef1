"""The trainer (train/loop.py) end to end on a tiny in-tmp ImageFolder dataset and resnet20, on CPU.

Covers: exact resume after an interruption (mid-epoch and at an epoch boundary), reuse of a finished run,
refusal to overwrite another run, fine-tuning modes (fixed = head / full / lora), every training objective for a
step, and the ``pretrain`` / ``finetune`` CLI (files written, one-line errors with exit code 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smoothtransfer.config import load_train_config
from smoothtransfer.errors import UserError
from smoothtransfer.train import loop as loop_mod
from smoothtransfer.train.loop import run_training

SIZE = 16
# 3 classes x 12 images; val_fraction 0.25 leaves 27 training images -> 3 steps/epoch at batch size 8.
UP_CLASSES, UP_PER_CLASS = 3, 12
DOWN_CLASSES, DOWN_PER_CLASS = 2, 12
STEPS_PER_EPOCH = (UP_CLASSES * UP_PER_CLASS * 3 // 4) // 8


def make_imagefolder(root: Path, n_classes: int, per_class: int, seed: int, ext: str = "png") -> Path:
    """Class folders of random-ish 16x16 RGB images whose brightness depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 170 * c / max(1, n_classes - 1)
            a = np.clip(rng.normal(base, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from smoothtransfer.data.datasets import get_dataset

    base = tmp_path_factory.mktemp("tiny_data")
    d = {
        "up": make_imagefolder(base / "up", UP_CLASSES, UP_PER_CLASS, seed=0),
        "down": make_imagefolder(base / "down", DOWN_CLASSES, DOWN_PER_CLASS, seed=1, ext="jpg"),
        "cache": base / "cache",
    }
    with pytest.MonkeyPatch.context() as mp:  # decode once into the cache (no progress bar in later stderr)
        mp.setenv("SMOOTHTRANSFER_CACHE", str(d["cache"]))
        assert len(get_dataset(f"imagefolder:{d['up']}", "train")) == UP_CLASSES * UP_PER_CLASS
        assert len(get_dataset(f"imagefolder:{d['down']}", "train")) == DOWN_CLASSES * DOWN_PER_CLASS
    return d


@pytest.fixture(autouse=True)
def _cache(data, monkeypatch):
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(data["cache"]))


BASE = ["model.arch=resnet20", "batch_size=8", "eval_batch_size=64", "progress=false", "tensorboard=false",
        "device=cpu", "data.val_fraction=0.25", "checkpoint_every=0", "optim.lr=0.05", "amp=none"]


def make_cfg(dataset: Path, out: Path, *overrides: str, stage: str = "pretrain"):
    return load_train_config(None, [*BASE, f"stage={stage}", f"data.dataset=imagefolder:{dataset}",
                                    f"out={out}", *overrides])


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def metric_history(ckpt: dict) -> list[dict]:
    """The per-epoch records minus wall-clock fields (seconds, images/s)."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
            for h in ckpt["train_state"]["history"]]


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def file_fingerprint(path: Path) -> tuple[int, bytes]:
    return path.stat().st_mtime_ns, path.read_bytes()


# ----------------------------------------------------------------------------------------------------
# 1. resume / reuse / refusal


RESUME_SETTINGS = ["epochs=2", "objective.name=gaussian", "objective.params.sigma=0.25"]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """The uninterrupted 2-epoch run that interrupted runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("run_a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOOTHTRANSFER_CACHE", str(data["cache"]))
        path = run_training(make_cfg(data["up"], out, *RESUME_SETTINGS))
    return out, load(path)


@pytest.mark.parametrize("stop_after, expect_epoch, expect_step", [
    (1, 0, 1),                                  # mid epoch 1
    (STEPS_PER_EPOCH, 1, 0),                    # exactly at the epoch boundary
    (STEPS_PER_EPOCH + 1, 1, 1),                # mid epoch 2
])
def test_resume_matches_uninterrupted_run(data, tmp_path, reference_run, stop_after, expect_epoch, expect_step):
    _, ref = reference_run
    cfg = make_cfg(data["up"], tmp_path / "b", *RESUME_SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, _stop_after_steps=stop_after)
    partial = load(tmp_path / "b" / "checkpoint.pt")
    st = partial["train_state"]
    assert not st["finished"]
    assert (st["epoch"], st["step_in_epoch"]) == (expect_epoch, expect_step)
    # the interrupted weights really differ from the final ones (so the comparison below means something)
    assert any(not torch.equal(partial["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])

    path = run_training(cfg, resume=True)
    got = load(path)
    assert got["train_state"]["finished"]
    assert_state_equal(ref["state_dict"], got["state_dict"])
    assert metric_history(got) == metric_history(ref)
    assert len(metric_history(got)) == 2
    # optimiser state (momentum buffers) resumed exactly too
    so_ref, so_got = ref["train_state"]["optimizer"]["state"], got["train_state"]["optimizer"]["state"]
    assert so_ref.keys() == so_got.keys()
    for k in so_ref:
        assert_state_equal(so_ref[k], so_got[k])
    summary = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert [h["train_loss"] for h in summary["history"]] == [h["train_loss"] for h in metric_history(ref)]


def test_resume_is_exact_with_ema_warmup_and_best_selection(data, tmp_path):
    settings = ["epochs=2", "optim.ema=0.9", "optim.warmup_epochs=0.5", "select=best",
                "objective.name=consistency", "objective.params.m=2"]
    ref = load(run_training(make_cfg(data["up"], tmp_path / "a", *settings)))
    cfg = make_cfg(data["up"], tmp_path / "b", *settings)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, _stop_after_steps=STEPS_PER_EPOCH + 1)
    got = load(run_training(cfg, resume=True))
    assert_state_equal(ref["state_dict"], got["state_dict"])  # the (EMA) weights selected
    assert_state_equal(ref["train_state"]["raw_model"], got["train_state"]["raw_model"])
    assert_state_equal(ref["train_state"]["ema"], got["train_state"]["ema"])
    assert metric_history(got) == metric_history(ref)


def test_finished_run_is_reused_without_training(data, reference_run, monkeypatch):
    out, ref = reference_run
    before = {n: file_fingerprint(out / n) for n in ("checkpoint.pt", "config.yaml", "run_info.json")}

    def boom(*a, **k):
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr(loop_mod, "prepare", boom)
    # device/progress/threads do not count as different settings
    path = run_training(make_cfg(data["up"], out, *RESUME_SETTINGS, "threads=1", "progress=true"))
    assert path == out / "checkpoint.pt"
    assert {n: file_fingerprint(out / n) for n in before} == before


def test_other_settings_in_same_out_dir_raise_and_overwrite_nothing(data, reference_run, monkeypatch):
    out, _ = reference_run
    names = ("checkpoint.pt", "config.yaml", "run_info.json", "train_summary.json", "best.pt")
    before = {n: file_fingerprint(out / n) for n in names}
    with pytest.raises(UserError, match="other settings"):
        run_training(make_cfg(data["up"], out, *RESUME_SETTINGS, "optim.lr=0.01"))
    with pytest.raises(UserError, match="other settings"):  # --resume does not bypass the check
        run_training(make_cfg(data["up"], out, *RESUME_SETTINGS, "objective.params.sigma=0.5"), resume=True)
    assert {n: file_fingerprint(out / n) for n in names} == before


def test_interrupted_run_without_resume_raises(data, tmp_path):
    cfg = make_cfg(data["up"], tmp_path, "epochs=1")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, _stop_after_steps=1)
    before = file_fingerprint(tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="--resume"):
        run_training(cfg)
    assert file_fingerprint(tmp_path / "checkpoint.pt") == before


def test_overwrite_replaces_a_run_with_other_settings(data, tmp_path):
    run_training(make_cfg(data["up"], tmp_path, "epochs=1"))
    path = run_training(make_cfg(data["up"], tmp_path, "epochs=1", "optim.lr=0.01"), overwrite=True)
    assert load(path)["config"]["train"]["optim"]["lr"] == 0.01


# ----------------------------------------------------------------------------------------------------
# 2. fine-tuning modes


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A BatchNorm resnet20 pre-trained for one epoch on the 3-class data."""
    out = tmp_path_factory.mktemp("pre_bn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOOTHTRANSFER_CACHE", str(data["cache"]))
        path = run_training(make_cfg(data["up"], out, "model.norm=batch", "epochs=1"))
    return path, load(path)


def head_keys(state: dict) -> set[str]:
    from smoothtransfer.models import build_from_spec

    spec = dict(state["model_spec"], lora=None)
    m = build_from_spec(spec)
    ids = {id(p) for p in m.head_parameters()}
    return {n for n, p in m.named_parameters() if id(p) in ids}


def finetune(data, tmp_path, init: Path, mode: str, *extra: str) -> dict:
    cfg = make_cfg(data["down"], tmp_path / mode, f"init={init}", f"mode={mode}", "epochs=1", *extra,
                   stage="finetune")
    return load(run_training(cfg))


def test_fixed_finetune_changes_only_the_head(data, tmp_path, pretrained):
    init, pre = pretrained
    heads = head_keys(pre)
    assert heads and all(k in pre["state_dict"] for k in heads)
    ft = finetune(data, tmp_path, init, "fixed")
    sd_pre, sd_ft = pre["state_dict"], ft["state_dict"]
    assert sd_ft.keys() == sd_pre.keys()
    body = [k for k in sd_pre if k not in heads]
    assert any("running_mean" in k for k in body) and any("num_batches_tracked" in k for k in body)
    for k in body:  # parameters and BN running_mean/var/num_batches_tracked alike
        assert torch.equal(sd_pre[k], sd_ft[k]), k
    weight = next(k for k in heads if k.endswith("weight"))
    assert sd_ft[weight].shape[0] == DOWN_CLASSES != sd_pre[weight].shape[0]
    assert ft["model_spec"]["num_classes"] == DOWN_CLASSES
    assert ft["classes"] == [f"class{c}" for c in range(DOWN_CLASSES)]
    # the head really trained: both runs start from the same (seeded) fresh head, so a different lr can only
    # give a different head if the optimiser moved it
    ft2 = finetune(data, tmp_path / "other", init, "fixed", "optim.lr=0.5")
    assert not torch.equal(ft2["state_dict"][weight], sd_ft[weight])


def test_head_mode_is_fixed(data, tmp_path, pretrained):
    from dataclasses import replace

    from smoothtransfer.config import MODES, TrainConfig, from_dict

    init, _ = pretrained
    # one mode under two names: normalised wherever a config is built, so a run directory says "fixed"
    assert "head" not in MODES
    assert from_dict(TrainConfig, {"mode": "head"}).mode == "fixed"
    assert replace(TrainConfig(), mode="head").mode == "fixed"
    with pytest.raises(UserError, match="mode must be one of full, fixed, lora"):
        make_cfg(data["down"], tmp_path, f"init={init}", "mode=linear", stage="finetune")
    head = finetune(data, tmp_path, init, "head")
    fixed = finetune(data, tmp_path, init, "fixed")
    assert head["config"]["train"]["mode"] == "fixed"
    assert "mode: fixed" in (tmp_path / "head" / "config.yaml").read_text()
    for k, v in fixed["state_dict"].items():  # the same training, bit for bit
        assert torch.equal(head["state_dict"][k], v), k


def test_full_finetune_changes_the_body(data, tmp_path, pretrained):
    init, pre = pretrained
    heads = head_keys(pre)
    ft = finetune(data, tmp_path, init, "full")
    sd_pre, sd_ft = pre["state_dict"], ft["state_dict"]
    changed = [k for k in sd_pre if k not in heads and not torch.equal(sd_pre[k], sd_ft[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    assert any("running_mean" in k for k in changed)
    weight = next(k for k in heads if k.endswith("weight"))
    assert sd_ft[weight].shape[0] == DOWN_CLASSES


def test_lora_finetune_changes_only_adapters_and_head(data, tmp_path, pretrained):
    from smoothtransfer.models import build_from_spec
    from smoothtransfer.models.lora import apply_lora

    init, pre = pretrained
    ft = finetune(data, tmp_path, init, "lora", "optim.lr=0.2")
    assert ft["model_spec"]["lora"]
    # the pre-trained model with adapters (B = 0) and the new head shape: same keys as the fine-tuned one
    start = build_from_spec(pre["model_spec"])
    start.load_state_dict(pre["state_dict"])
    start.reset_head(DOWN_CLASSES)
    apply_lora(start, rank=ft["model_spec"]["lora"]["rank"], alpha=ft["model_spec"]["lora"]["alpha"])
    sd0, sd1 = start.state_dict(), ft["state_dict"]
    assert sd0.keys() == sd1.keys()
    head = {n for n, p in start.named_parameters() if any(p is h for h in start.head_parameters())}
    adapters = {n for n in sd0 if ".lora_A." in n or ".lora_B." in n}
    assert adapters and head
    params = {n for n, _ in start.named_parameters()}
    changed = {n for n in params if not torch.equal(sd0[n], sd1[n])}
    assert changed <= adapters | head, sorted(changed - adapters - head)[:5]
    assert changed & adapters, "no adapter was trained"
    assert any(n in changed for n in head), "the head was not trained"
    assert sd1[next(n for n in head if n.endswith("weight"))].shape[0] == DOWN_CLASSES


def test_finetune_with_another_model_is_a_user_error(data, tmp_path, pretrained):
    init, _ = pretrained
    cfg = make_cfg(data["down"], tmp_path, f"init={init}", "model.arch=resnet56", stage="finetune")
    with pytest.raises(UserError, match="resnet20"):
        run_training(cfg)
    cfg = make_cfg(data["down"], tmp_path, f"init={init}", "model.norm=group", stage="finetune")
    with pytest.raises(UserError, match="norm"):
        run_training(cfg)
    assert not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------------------------------
# 3. every objective trains through the loop


OBJECTIVES = {
    "clean": [],
    "gaussian": ["objective.params.sigma=0.25"],
    "mixed": ["objective.params.sigmas=[0.0, 0.5]"],
    "consistency": ["objective.params.m=2", "objective.params.sigma=0.25"],
    "macer": ["objective.params.num_noise=2"],
    "smoothadv": ["objective.params.m=1", "objective.params.steps=1"],
    "adversarial": ["objective.params.steps=1"],
    "simclr": ["objective.params.proj_dim=16"],
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_trains_with_finite_loss(data, tmp_path, name):
    cfg = make_cfg(data["up"], tmp_path, f"objective.name={name}", *OBJECTIVES[name], "epochs=1",
                   "data.max_train=16", "batch_size=8")
    ckpt = load(run_training(cfg))
    (record,) = ckpt["train_state"]["history"]
    assert math.isfinite(record["train_loss"])
    assert ckpt["train_state"]["finished"]
    if name == "simclr":  # label-free: no accuracy, but its projection head is part of the state
        assert "val_acc" not in record
        assert any(k.startswith("projector") for k in ckpt["train_state"]["objective"])
    else:
        assert 0.0 <= record["val_acc"] <= 1.0


def test_trainer_calls_objective_set_epoch_every_epoch(data, tmp_path, monkeypatch):
    # the per-epoch hook that FT-CADIS (ε doubling) and SmoothAdv (ε warm-up) rely on
    from smoothtransfer.objectives.base import OBJECTIVES

    seen: list[int] = []
    monkeypatch.setattr(OBJECTIVES.get("clean"), "set_epoch", lambda self, e: seen.append(e), raising=False)
    run_training(make_cfg(data["up"], tmp_path, "objective.name=clean", "epochs=2", "data.max_train=8"))
    assert seen == [0, 1]


# ----------------------------------------------------------------------------------------------------
# 4. CLI


def cli_common(dataset: Path, out: Path) -> list[str]:
    return ["--dataset", f"imagefolder:{dataset}", "--model", "resnet20", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out), "--val-fraction", "0.25",
            "--amp", "none"]


def test_cli_pretrain_then_finetune(data, tmp_path, capsys):
    from smoothtransfer.cli import main

    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", *cli_common(data["up"], pre), "--objective", "mixed", "--sigmas", "0", "0.25",
                 "--norm", "batch"]) == 0
    assert main(["finetune", *cli_common(data["down"], ft), "--init", str(pre / "checkpoint.pt"),
                 "--mode", "fixed", "--set", "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {ft / 'checkpoint.pt'}" in out
    for run, stage in ((pre, "pretrain"), (ft, "finetune")):
        for name in ("checkpoint.pt", "config.yaml", "run_info.json", "train_summary.json"):
            assert (run / name).is_file(), run / name
        assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
        assert f"stage: {stage}" in (run / "config.yaml").read_text()
        summary = json.loads((run / "train_summary.json").read_text())
        assert len(summary["history"]) == 1 and "val_acc" in summary["history"][0]
    info = json.loads((ft / "run_info.json").read_text())
    assert info["classes"] == ["class0", "class1"] and info["world_size"] == 1
    ck = load(ft / "checkpoint.pt")
    assert ck["config"]["train"]["mode"] == "fixed" and ck["config"]["train"]["optim"]["lr"] == 0.01
    assert ck["config"]["train"]["init"] == str(pre / "checkpoint.pt")
    pre_cfg = load(pre / "checkpoint.pt")["config"]["train"]
    assert pre_cfg["objective"] == {"name": "mixed", "params": {"sigmas": [0.0, 0.25]}}


@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "--objective", "nope"], "nope"),
    (["pretrain", "--objective", "mixed", "--sigmas", "-1"], "sigma"),
    (["pretrain", "--set", "optim.lrr=1"], "optim.lrr"),
    (["finetune", "--init", "MISSING"], "missing.pt"),
])
def test_cli_bad_input_is_one_error_line(data, tmp_path, capsys, argv, needle):
    from smoothtransfer.cli import main

    argv = [a.replace("MISSING", str(tmp_path / "missing.pt")) for a in argv]
    cmd, rest = argv[0], argv[1:]
    src = data["down"] if cmd == "finetune" else data["up"]
    rc = main([cmd, *cli_common(src, tmp_path / "run"), *rest])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow  # torch.compile takes about a minute per mode on 2 cores
def test_compiled_training_matches_eager_and_saves_plain_weights(data, tmp_path):
    """``compile=true`` trains the same model as eager mode (fp32: the same losses up to kernel rounding, 0.1%
    after two epochs here) and
    its checkpoint loads into the plain architecture (no ``_orig_mod.`` prefixes)."""
    from smoothtransfer.models import build_from_spec

    settings = ["epochs=2", "data.max_train=32", "objective.name=gaussian", "objective.params.sigma=0.25"]
    eager = load(run_training(make_cfg(data["up"], tmp_path / "eager", *settings)))
    compiled = load(run_training(make_cfg(data["up"], tmp_path / "compiled", *settings, "compile=true")))
    assert compiled["state_dict"].keys() == eager["state_dict"].keys()
    assert not any("_orig_mod" in k for k in compiled["state_dict"])
    build_from_spec(compiled["model_spec"]).load_state_dict(compiled["state_dict"])
    for e, c in zip(eager["train_state"]["history"], compiled["train_state"]["history"], strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-2)  # kernels round differently
        assert c["val_acc"] == pytest.approx(e["val_acc"], abs=0.1)
    info = json.loads((tmp_path / "compiled" / "run_info.json").read_text())
    assert info["compile"] is True


def test_amp_auto_trains_in_bf16_on_avx512_bf16_and_records_it(data, tmp_path, monkeypatch):
    """``amp: auto`` takes the training rule (bf16 on an AVX512-BF16 CPU, where certification stays fp32) and
    run_info.json says what it chose."""
    from smoothtransfer import utils

    monkeypatch.setattr(utils, "cpu_info", lambda: {"model": "x", "bf16_units": "avx512_bf16", "avx512": True})
    out = tmp_path / "auto"
    run_training(make_cfg(data["up"], out, "amp=auto", "epochs=1"))
    assert json.loads((out / "run_info.json").read_text())["amp"] == {"asked": "auto", "used": "bf16"}
