"""Checkpoints: atomic, weights_only round trips, and clear errors for missing/corrupt/foreign files."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models import apply_lora, create_classifier
from smoothtransfer.models import checkpoint as ckpt_mod
from smoothtransfer.models.checkpoint import (
    FORMAT,
    VERSION,
    capture_rng_state,
    load_checkpoint,
    load_classifier,
    restore_rng_state,
    save_checkpoint,
    to_weights_only,
)
from smoothtransfer.models.lora import randomize_lora_

CLASSES = ["airplane", "automobile", "bird", "cat"]


@dataclasses.dataclass(frozen=True)
class _Config:
    lr: float = 0.1
    out: Path = Path("runs/x")
    sigmas: tuple = (0.25, 0.5)


def _trained_model(name="resnet20", norm="batch", **kw):
    """A model whose BatchNorm statistics and weights differ from a fresh one."""
    torch.manual_seed(0)
    model = create_classifier(name, len(CLASSES), norm=norm, **kw)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    return model.eval()


def _save(path, model, **kw):
    args = {"classes": CLASSES, "dataset": "cifar10", "config": {"lr": 0.1}}
    args.update(kw)
    return save_checkpoint(path, model, **args)


def test_round_trip_identical_outputs(tmp_path):
    model = _trained_model()
    path = _save(tmp_path / "run" / "model.pt", model, epoch=3, extra={"best_val_acc": 0.5})
    assert path == tmp_path / "run" / "model.pt"
    loaded, ckpt = load_classifier(path, device="cpu")
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.spec == model.spec
    assert ckpt["format"] == FORMAT and ckpt["version"] == VERSION
    assert ckpt["classes"] == CLASSES and ckpt["dataset"] == "cifar10" and ckpt["epoch"] == 3
    assert ckpt["config"] == {"lr": 0.1} and ckpt["extra"] == {"best_val_acc": 0.5}
    assert isinstance(ckpt["git_rev"], str) and ckpt["git_rev"]
    assert "normalize.mean" in ckpt["state_dict"]


def test_round_trip_after_reset_head_and_wrappers(tmp_path):
    model = _trained_model(norm="layer")
    model.reset_head(2)
    # DataParallel (and torch.compile) prefix the keys; the checkpoint stores the plain model.
    path = _save(tmp_path / "m.pt", nn.DataParallel(model), classes=["a", "b"])
    loaded, ckpt = load_classifier(path)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert loaded.num_classes == 2
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_lora_round_trip(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(create_classifier("vit_tiny_patch4_32", 4, depth=2)).eval()
    randomize_lora_(model, generator=torch.Generator().manual_seed(0))
    loaded, ckpt = load_classifier(_save(tmp_path / "lora.pt", model))
    assert ckpt["model_spec"]["lora"]["targets"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_train_state_survives_weights_only(tmp_path):
    model = _trained_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[2])
    ema = torch.optim.swa_utils.AveragedModel(model)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    ema.update_parameters(model)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ema": ema.state_dict(),
                   "rng": rng, "step": 7, "scaler": None}
    config = _Config()
    path = _save(tmp_path / "m.pt", model, config=config, epoch=1, train_state=train_state,
                 extra={"np_scalar": np.float64(0.25), "path": Path("a/b")})
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"lr": 0.1, "out": "runs/x", "sigmas": (0.25, 0.5)}
    assert ckpt["extra"] == {"np_scalar": 0.25, "path": "a/b"} and type(ckpt["extra"]["np_scalar"]) is float
    state = ckpt["train_state"]
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)
    sched2 = torch.optim.lr_scheduler.SequentialLR(
        opt2, [torch.optim.lr_scheduler.LinearLR(opt2, start_factor=0.1, total_iters=2),
               torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)], milestones=[2])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == sched.last_epoch
    ema2 = torch.optim.swa_utils.AveragedModel(create_classifier("resnet20", len(CLASSES)))
    ema2.load_state_dict(state["ema"])
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_unsafe_objects_are_refused_before_writing(tmp_path):
    path = tmp_path / "m.pt"
    with pytest.raises(TypeError, match=r"train_state\]\['rng'\] is a numpy.ndarray.*torch.as_tensor"):
        to_weights_only({"rng": np.zeros(3)}, "train_state]")
    with pytest.raises(TypeError, match="weights_only"):
        _save(path, _trained_model(), train_state={"fn": lambda: 0})
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = _trained_model()
    path = _save(tmp_path / "m.pt", model, epoch=1)
    _save(path, model, epoch=2)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert load_checkpoint(path)["epoch"] == 2

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(path, model, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert load_checkpoint(path)["epoch"] == 2


def test_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A full disk gave `OSError` / `RuntimeError: [enforce fail at inline_container.cc]` tracebacks (finetune)."""
    import os
    import tempfile

    model = _trained_model()
    path = _save(tmp_path / "m.pt", model, epoch=1)
    mkstemp = tempfile.mkstemp

    def full_disk(*args, **kwargs):  # the temporary file lands on /dev/full: the OS answers ENOSPC
        fd, name = mkstemp(*args, **kwargs)
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return fd, name

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", full_disk)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*m\.pt: No space left on device") as e:
        _save(path, model, epoch=2)
    assert "\n" not in str(e.value)
    monkeypatch.undo()

    def torch_writer_fails(obj, f, *args, **kwargs):  # how torch's own writer reports it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod.torch, "save", torch_writer_fails)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*m\.pt: .*inline_container") as e:
        _save(path, model, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"] and load_checkpoint(path)["epoch"] == 1


def test_missing_and_directory(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not a file"):
        load_classifier(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "text", "empty", "garble"])
def test_corrupt_files(tmp_path, damage):
    path = _save(tmp_path / "m.pt", _trained_model())
    data = path.read_bytes()
    bad = {"truncate": data[: len(data) // 2], "text": b"hello world\n", "empty": b"",
           "garble": data[:64] + bytes(range(256)) + data[320:]}[damage]
    path.write_bytes(bad)
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_checkpoint(path)


def test_foreign_files(tmp_path):
    model = _trained_model()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="plain state_dict"):
        load_classifier(tmp_path / "plain.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"not a smoothtransfer checkpoint.*'epoch', 'model'"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": FORMAT, "version": 1, "state_dict": np.zeros(2)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "pickled.pt")


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_with_that_reason(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": FORMAT, "version": 1, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_classifier(tmp_path / "evil.pt")
    msg = str(e.value)
    assert "refused: it would run code on load (only weights are loaded)" in msg, msg
    assert "corrupt" not in msg and "\n" not in msg and not marker.exists()


def test_unusable_contents(tmp_path):
    model = _trained_model()
    path = _save(tmp_path / "m.pt", model)
    ckpt = load_checkpoint(path)

    def write(**changes):
        torch.save({**ckpt, **changes}, tmp_path / "x.pt")
        return tmp_path / "x.pt"

    with pytest.raises(UserError, match="newer smoothtransfer"):
        load_checkpoint(write(version=VERSION + 1))
    with pytest.raises(UserError, match="lacks a model_spec"):
        load_checkpoint(write(model_spec=None))
    with pytest.raises(UserError, match=r"x\.pt: unknown model 'resnet999'"):
        load_classifier(write(model_spec={**ckpt["model_spec"], "arch": "resnet999"}))
    with pytest.raises(UserError, match="do not fit the model spec"):
        load_classifier(write(model_spec={**ckpt["model_spec"], "arch": "resnet56"}))
    with pytest.raises(UserError, match="do not fit the model spec"):
        load_classifier(write(model_spec={**ckpt["model_spec"], "num_classes": 3}))
    with pytest.raises(UserError, match="normalisation in the weights differs"):
        load_classifier(write(model_spec={**ckpt["model_spec"], "mean": [0.0, 0.0, 0.0]}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path):
    model = _trained_model().cuda()
    loaded, _ = load_classifier(_save(tmp_path / "m.pt", model), device="cuda")
    x = torch.rand(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    cpu_model, _ = load_classifier(tmp_path / "m.pt")
    assert next(cpu_model.parameters()).device.type == "cpu"
