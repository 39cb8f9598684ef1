"""train_denoiser through the shared training engine: exact resume, the run directory, loading it, and the
run directories of the denoiser's own loop before the engine (latest.json + epoch-NNNN/)."""

from __future__ import annotations

import json

import pytest
import torch

from smoothtransfer.errors import UserError
from smoothtransfer.job_configs import DenoiserConfig
from smoothtransfer.models.denoisers import DiffusionDenoiser, MSEDenoiser, load_denoiser
from smoothtransfer.train.denoiser import finished_epochs, train_denoiser

N, BATCH = 12, 4  # 3 steps per epoch


class _TinyDataset:
    def __init__(self, n=N, size=16, channels=3):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
        self.targets = torch.zeros(n, dtype=torch.int64)


@pytest.fixture(autouse=True)
def _tiny_data(monkeypatch):
    import smoothtransfer.data.datasets as datasets

    monkeypatch.setattr(datasets, "get_dataset", lambda name, split, root=None, **kw: _TinyDataset())
    monkeypatch.setattr(datasets, "check_available", lambda *a, **kw: None)


def _cfg(out, kind, epochs=2, seed=1, **kw) -> DenoiserConfig:
    return DenoiserConfig(out=str(out), kind=kind, size="tiny", dataset="tiny", epochs=epochs, batch_size=BATCH,
                          device="cpu", seed=seed, progress=False, **kw)


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-epoch runs of both kinds: ``{kind: out}``."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        import smoothtransfer.data.datasets as datasets

        mp.setattr(datasets, "get_dataset", lambda name, split, root=None, **kw: _TinyDataset())
        mp.setattr(datasets, "check_available", lambda *a, **kw: None)
        for kind in ("mse", "diffusion"):
            out = tmp_path_factory.mktemp(f"ref_{kind}")
            train_denoiser(_cfg(out, kind))
            runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", ["mse", "diffusion"])
@pytest.mark.parametrize("stop_after", [3, 4])  # after epoch 1 (an epoch boundary), and mid epoch 2
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, reference, kind, stop_after):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(_cfg(out, kind), _stop_after_steps=stop_after)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]
    assert not state["finished"] and (state["epoch"], state["step_in_epoch"]) == divmod(stop_after, 3)
    assert not (out / "denoiser.json").exists()  # the export is written when the run finishes
    assert finished_epochs(out) == 1
    with pytest.raises(UserError, match="--resume"):  # an interrupted run is not overwritten
        train_denoiser(_cfg(out, kind))
    train_denoiser(_cfg(out, kind, resume=True))
    ref = reference[kind]
    _assert_same(_weights(ref), _weights(out))
    ref_state = torch.load(ref / "checkpoint.pt", weights_only=True)["train_state"]
    got_state = torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]
    assert got_state["finished"] and got_state["epoch"] == 2
    assert [h["train_loss"] for h in got_state["history"]] == [h["train_loss"] for h in ref_state["history"]]
    # the export equals the checkpoint's weights
    exported = (DiffusionDenoiser if kind == "diffusion" else MSEDenoiser).from_pretrained(out)
    _assert_same(_weights(out), exported.state_dict())


def test_run_directory_and_loading(tmp_path, reference):
    out = reference["mse"]
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint.pt", "run.json", "train_summary.json", "denoiser.json", "model.safetensors"} <= names
    assert not any(n.startswith(".") or n.startswith("epoch-") or n == "latest.json" for n in names)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert finished_epochs(out) == 2
    # load_denoiser reads the run directory or its checkpoint file, without moving the caller's RNG
    before = torch.get_rng_state()
    d = load_denoiser(out)
    assert torch.equal(before, torch.get_rng_state())
    assert isinstance(d, MSEDenoiser) and not d.training and not any(p.requires_grad for p in d.parameters())
    _assert_same(d.state_dict(), load_denoiser(out / "checkpoint.pt").state_dict())
    diff = load_denoiser(reference["diffusion"])
    assert isinstance(diff, DiffusionDenoiser) and diff.image_size == 16
    _assert_same(diff.state_dict(), _weights(reference["diffusion"]))
    # a finished run is reused; more epochs need --resume; other settings are one line
    train_denoiser(_cfg(out, "mse", resume=True))
    with pytest.raises(UserError, match="--resume"):
        train_denoiser(_cfg(out, "mse", epochs=3))
    with pytest.raises(UserError, match="cannot resume .*seed=1.*seed=2"):
        train_denoiser(_cfg(out, "mse", epochs=3, seed=2, resume=True))


def test_checkpoints_are_not_mixed_up(tmp_path, reference):
    from smoothtransfer.models.checkpoint import load_classifier

    with pytest.raises(UserError, match="denoiser"):
        load_classifier(reference["mse"] / "checkpoint.pt")


def test_run_directory_of_earlier_version_loads_but_does_not_resume(tmp_path):
    """The layout of the denoiser's own loop before the shared engine: epoch-NNNN/ exports + latest.json."""
    torch.manual_seed(0)
    den = MSEDenoiser.create("tiny", image_size=16)
    out = tmp_path / "old"
    den.eval().save_pretrained(out / "epoch-0002")
    (out / "latest.json").write_text(json.dumps({"path": "epoch-0002", "epoch": 2, "config": {},
                                                 "history": [{"epoch": 1}, {"epoch": 2}]}))
    loaded = load_denoiser(out)
    _assert_same(loaded.state_dict(), den.state_dict())
    assert finished_epochs(out) == 2
    for resume in (False, True):
        with pytest.raises(UserError, match="earlier version.*start afresh"):
            train_denoiser(_cfg(out, "mse", resume=resume))


def test_finished_run_reports_psnr_per_sigma(tmp_path, reference):
    """psnr.json: one entry per σ (diffusion: 0.25/0.5/1.0; mse: its training σ), the noisy input's PSNR near
    −20·log10 σ (random uint8 images: clipping is not applied, so only the image count limits agreement), and a
    finished run whose psnr.json is missing measures it again without training."""
    import math

    for kind, sigmas in (("diffusion", [0.25, 0.5, 1.0]), ("mse", list(DenoiserConfig(out="x").sigmas))):
        rec = json.loads((reference[kind] / "psnr.json").read_text())
        assert [e["sigma"] for e in rec["psnr"]] == sigmas
        assert rec["num_images"] == N and rec["split"] == "test"
        for e in rec["psnr"]:
            # 12 images x 768 pixels: the mean per-image PSNR of pure noise is within 0.5 dB of -20 log10 σ
            assert e["noisy_db"] == pytest.approx(-20 * math.log10(e["sigma"]), abs=0.5)
            assert e["gain_db"] == pytest.approx(e["denoised_db"] - e["noisy_db"])
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(reference["mse"], out)
    before = json.loads((out / "psnr.json").read_text())
    (out / "psnr.json").unlink()
    weights = _weights(out)
    with pytest.MonkeyPatch.context() as mp:
        import smoothtransfer.data.datasets as datasets

        mp.setattr(datasets, "get_dataset", lambda name, split, root=None, **kw: _TinyDataset())
        mp.setattr(datasets, "check_available", lambda *a, **kw: None)
        train_denoiser(_cfg(out, "mse", resume=True))
    assert json.loads((out / "psnr.json").read_text()) == before  # seeded: the same figures again
    _assert_same(weights, _weights(out))


def test_psnr_images_zero_skips(tmp_path):
    train_denoiser(_cfg(tmp_path / "r", "mse", epochs=1, psnr_images=0))
    assert not (tmp_path / "r" / "psnr.json").exists()
    with pytest.raises(UserError, match="psnr-images"):
        _cfg(tmp_path / "s", "mse", psnr_images=-1).validate()


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_amp_is_recorded_and_trains(tmp_path, amp):
    out = tmp_path / "run"
    train_denoiser(_cfg(out, "diffusion", epochs=1, amp=amp))
    record = json.loads((out / "run.json").read_text())["config"]
    assert record["amp"] == amp and record["compile"] is False
    losses = [h["train_loss"] for h in json.loads((out / "train_summary.json").read_text())["history"]]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow  # torch.compile of the UNet takes a minute or more on 2 cores
def test_compiled_training_saves_plain_weights(tmp_path):
    """``compile=True`` gives the same training as eager mode (up to kernel rounding) and the run directory's
    checkpoint and export hold the plain UNet's weights (no ``_orig_mod.`` prefixes)."""
    out, eager = tmp_path / "run", tmp_path / "eager"
    train_denoiser(_cfg(eager, "diffusion", amp="none"))
    train_denoiser(_cfg(out, "diffusion", compile=True, amp="none"))
    ref = _weights(eager)
    got = _weights(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-3), k
    exported = DiffusionDenoiser.from_pretrained(out)
    _assert_same(got, exported.state_dict())


@pytest.mark.parametrize("every, saves", [(0, 1), (1, 3)])  # 3 steps, 1 epoch: the final save, or also after steps 1, 2
def test_checkpoint_every_saves_within_an_epoch(tmp_path, monkeypatch, every, saves):
    import smoothtransfer.train.engine as engine

    calls = []
    real = engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    train_denoiser(_cfg(tmp_path / "run", "mse", epochs=1, checkpoint_every=every))
    assert len(calls) == saves
