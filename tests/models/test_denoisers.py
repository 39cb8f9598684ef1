"""Denoisers (one-shot diffusion, σ-conditioned DnCNN), their training objectives and train-denoiser."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.denoisers import (
    DenoisedClassifier,
    DiffusionDenoiser,
    MSEDenoiser,
    check_compatible,
    create_ddpm_scheduler,
    create_diffusion_unet,
    load_denoiser,
)
from smoothtransfer.objectives.denoiser import DDPMObjective, MSEDenoisingObjective, denoiser_objective


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return create_diffusion_unet(16, 3, "tiny")


@pytest.fixture(scope="module")
def tiny_diffusion(tiny_unet):
    return DiffusionDenoiser(tiny_unet, create_ddpm_scheduler()).eval()


class OracleUNet(nn.Module):
    """Stub UNet that predicts the true standard-normal noise draw ``n`` of ``x_noisy = x + σ·n``.

    Records what it was called with, to check the input scaling √ᾱ_t·(2·x_noisy − 1).
    """

    def __init__(self, noise: torch.Tensor, channels: int = 3, size: int = 8) -> None:
        super().__init__()
        self.noise = noise
        self.config = argparse.Namespace(sample_size=size, in_channels=channels, out_channels=channels)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, return_dict=True):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return (self.noise.clone(),)


# ---------------------------------------------------------------------------------------------------- σ → t


def test_timestep_matches_scheduler_alphas(tiny_diffusion):
    acp = torch.as_tensor(tiny_diffusion.scheduler.alphas_cumprod, dtype=torch.float64)
    ratio = (1 - acp) / acp
    ts = []
    for sigma in [0.0, 0.01, 0.12, 0.25, 0.5, 0.75, 1.0, 2.0, 10.0]:
        t = tiny_diffusion.timestep_for_sigma(sigma)
        assert t == int(torch.argmin((ratio - (2 * sigma) ** 2).abs()))
        # the chosen t is at least as close as both neighbours (nearest over the whole grid)
        for nb in (t - 1, t + 1):
            if 0 <= nb < len(ratio):
                assert abs(ratio[t] - (2 * sigma) ** 2) <= abs(ratio[nb] - (2 * sigma) ** 2)
        ts.append(t)
    assert ts == sorted(ts) and ts[0] == 0
    grid = [tiny_diffusion.timestep_for_sigma(s) for s in torch.linspace(0, 5, 200).tolist()]
    assert all(a <= b for a, b in zip(grid, grid[1:]))


def test_sigma_out_of_range(tiny_diffusion):
    top = tiny_diffusion.max_sigma
    assert math.isclose(top, math.sqrt(max(tiny_diffusion._ratios)) / 2)
    tiny_diffusion.timestep_for_sigma(top * 0.999)
    for bad in (top * 1.01, 1e6, -0.1, float("nan")):
        with pytest.raises(UserError):
            tiny_diffusion.timestep_for_sigma(bad)
    with pytest.raises(UserError):
        tiny_diffusion(torch.rand(1, 3, 16, 16), top * 2)
    with pytest.raises(UserError):
        DenoisedClassifier(tiny_diffusion, nn.Flatten(), top * 2)


# ---------------------------------------------------------------------------------------------------- one-shot


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_oracle_unet_recovers_clean_image(sigma):
    """Algorithm 2 with an ε-oracle: x_t = √ᾱ(2(x+σn)−1), ε̂ = n  ⇒  x̂ = x up to the t-grid mismatch."""
    g = torch.Generator().manual_seed(1)
    x = 0.2 + 0.6 * torch.rand(4, 3, 8, 8, generator=g)  # away from 0/1 so the final clamp is inactive
    n = torch.randn(x.shape, generator=g)
    den = DiffusionDenoiser(OracleUNet(n), create_ddpm_scheduler())
    out = den(x + sigma * n, sigma)
    t = den.timestep_for_sigma(sigma)
    a = float(den.alphas_cumprod[t])
    # UNet input is √ᾱ_t·(2·x_noisy − 1) (DESIGN rule 7)
    x_t, t_used = den.unet.calls[-1]
    assert torch.equal(t_used, torch.full((4,), t))
    torch.testing.assert_close(x_t, math.sqrt(a) * (2 * (x + sigma * n) - 1), atol=1e-5, rtol=1e-5)
    # x̂_0 = (2x−1) + (2σ − √((1−ᾱ)/ᾱ))·n exactly; the mismatch is one step of the σ grid
    mismatch = abs(2 * sigma - math.sqrt((1 - a) / a))
    expected = x + 0.5 * (2 * sigma - math.sqrt((1 - a) / a)) * n
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert mismatch < 0.01 * max(sigma, 0.25)
    assert (out - x).abs().max() < 0.02
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_oracle_unet_is_exact_on_the_grid():
    """At σ exactly on the schedule's grid the oracle recovers x to float precision."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 8, 8, generator=g)
    n = torch.randn(x.shape, generator=g)
    sched = create_ddpm_scheduler()
    a = float(sched.alphas_cumprod[200])
    sigma = math.sqrt((1 - a) / a) / 2
    den = DiffusionDenoiser(OracleUNet(n), sched)
    assert den.timestep_for_sigma(sigma) == 200
    torch.testing.assert_close(den(x + sigma * n, sigma), x, atol=2e-5, rtol=0)


def test_per_sample_sigma_and_gradients(tiny_diffusion):
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    sig = torch.tensor([0.25, 0.5, 0.25])
    out = tiny_diffusion(x, sig)
    assert out.shape == (3, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    out.sum().backward()  # attacks on the smoothed classifier differentiate through the denoiser
    assert x.grad is not None and torch.isfinite(x.grad).all()
    single = tiny_diffusion(x[1:2].detach(), 0.5)
    torch.testing.assert_close(out[1:2].detach(), single, atol=1e-5, rtol=1e-4)


def test_unet_sizes():
    n = sum(p.numel() for p in create_diffusion_unet(32, 3, "ddpm-cifar10").parameters())
    assert abs(n / 1e6 - 35.7) < 0.1  # Ho et al.'s CIFAR-10 UNet
    assert sum(p.numel() for p in create_diffusion_unet(32, 3, "tiny").parameters()) < 1e6
    with pytest.raises(UserError):
        create_diffusion_unet(32, 3, "huge")
    with pytest.raises(UserError):
        create_diffusion_unet(30, 3, "ddpm-cifar10")


# ---------------------------------------------------------------------------------------------------- persistence


def test_diffusion_save_load_roundtrip(tmp_path, tiny_diffusion):
    tiny_diffusion.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "denoiser.json").read_text())
    assert meta["kind"] == "diffusion" and meta["image_size"] == 16 and meta["channels"] == 3
    assert (tmp_path / "d" / "unet" / "config.json").exists()
    assert (tmp_path / "d" / "scheduler" / "scheduler_config.json").exists()
    loaded = load_denoiser(tmp_path / "d")
    assert isinstance(loaded, DiffusionDenoiser) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.25), tiny_diffusion(x, 0.25))


def test_hub_root_layout_loads_locally(tmp_path, tiny_diffusion):
    """google/ddpm-cifar10-32 keeps config.json and scheduler_config.json at the repo root."""
    root = tmp_path / "hub"
    tiny_diffusion.unet.save_pretrained(root)
    tiny_diffusion.scheduler.save_pretrained(root)
    d = DiffusionDenoiser.from_pretrained(root)
    assert d.image_size == 16 and d.timestep_for_sigma(0.5) == tiny_diffusion.timestep_for_sigma(0.5)
    assert isinstance(load_denoiser(root), DiffusionDenoiser)  # no denoiser.json: a bare diffusers dir


def test_load_errors(tmp_path):
    with pytest.raises(UserError):
        load_denoiser(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        load_denoiser(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "denoiser.json").write_text('{"kind": "magic"}')
    with pytest.raises(UserError):
        load_denoiser(tmp_path / "bad")
    with pytest.raises(UserError):
        DiffusionDenoiser.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------- MSE denoiser


def test_mse_denoiser_forward_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    d = MSEDenoiser.create("tiny", channels=3, image_size=8)
    x = torch.rand(4, 3, 8, 8)
    y = d(x + 0.5 * torch.randn_like(x), 0.5)
    assert y.shape == (4, 3, 8, 8) and y.min() >= 0 and y.max() <= 1
    raw = d(x + 2.0, torch.tensor([0.0, 0.25, 0.5, 1.0]), clamp=False)
    assert raw.shape == (4, 3, 8, 8) and raw.max() > 1  # unclamped output for training
    with pytest.raises(UserError):
        d(torch.rand(4, 1, 8, 8), 0.5)
    with pytest.raises(UserError):
        d(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(UserError):
        MSEDenoiser.create("huge")
    d.eval().save_pretrained(tmp_path / "m")
    loaded = load_denoiser(tmp_path / "m")
    assert isinstance(loaded, MSEDenoiser) and loaded.depth == d.depth
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.25), d(x, 0.25))


# ---------------------------------------------------------------------------------------------------- composition


class SpecNet(nn.Module):
    def __init__(self, spec, k=4):
        super().__init__()
        self.spec = spec
        self.fc = nn.Linear(3, k)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_check_compatible(tiny_diffusion):
    check_compatible(tiny_diffusion, {"input_size": 16, "in_chans": 3})
    check_compatible(tiny_diffusion, SpecNet({"input_size": 16, "in_chans": 3, "input_range": [0, 1]}))
    for spec in ({"input_size": 32, "in_chans": 3}, {"input_size": 16, "in_chans": 1},
                 {"input_size": 16, "in_chans": 3, "input_range": [-1, 1]}):
        with pytest.raises(UserError):
            check_compatible(tiny_diffusion, spec)
    with pytest.raises(UserError):
        DenoisedClassifier(tiny_diffusion, SpecNet({"input_size": 32, "in_chans": 3}), 0.25)


def test_denoised_classifier(tiny_diffusion):
    clf = SpecNet({"input_size": 16, "in_chans": 3})
    model = DenoisedClassifier(tiny_diffusion, clf, 0.5)
    assert not model.training and not any(p.requires_grad for p in model.denoiser.parameters())
    x = torch.rand(5, 3, 16, 16, requires_grad=True)
    logits = model(x)
    assert logits.shape == (5, 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, clf(tiny_diffusion(x, 0.5)))
    logits.sum().backward()
    assert x.grad is not None and clf.fc.weight.grad is not None


# ---------------------------------------------------------------------------------------------------- objectives


def test_ddpm_objective(tiny_diffusion):
    unet = tiny_diffusion.unet
    unet.requires_grad_(True).train()
    try:
        loss, logs = DDPMObjective()(tiny_diffusion, torch.rand(4, 3, 16, 16))
        assert loss.ndim == 0 and torch.isfinite(loss) and logs["loss"] == pytest.approx(float(loss.detach()))
        loss.backward()
        grads = [p.grad for p in unet.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False).eval()


def test_ddpm_objective_target_is_the_noise():
    """With the ε-oracle that knows the noise the objective drew, the loss is zero."""
    torch.manual_seed(3)
    x = torch.rand(2, 3, 8, 8)
    g = torch.Generator().manual_seed(5)
    torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    den = DiffusionDenoiser(OracleUNet(noise), create_ddpm_scheduler())
    loss, _ = DDPMObjective()(den, x, generator=torch.Generator().manual_seed(5))
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_mse_objective_trains():
    torch.manual_seed(0)
    d = MSEDenoiser.create("tiny", image_size=8)
    obj = denoiser_objective("mse", [0.25, 0.5])
    assert isinstance(obj, MSEDenoisingObjective)
    x = torch.rand(16, 3, 8, 8)
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, logs = obj(d, x)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and float(loss.detach()) < first
    with pytest.raises(UserError):
        MSEDenoisingObjective([])
    with pytest.raises(UserError):
        denoiser_objective("gan")


# ---------------------------------------------------------------------------------------------------- command


class _TinyDataset:
    def __init__(self, n=12, size=16, channels=3):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
        self.targets = torch.zeros(n, dtype=torch.int64)


def _parse(argv):
    from smoothtransfer.commands import train_denoiser

    p = argparse.ArgumentParser()
    train_denoiser.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("kind,size", [("diffusion", "tiny"), ("mse", "tiny")])
def test_train_denoiser_runs_and_resumes(tmp_path, monkeypatch, kind, size):
    import smoothtransfer.data.datasets as datasets
    from smoothtransfer.commands import train_denoiser

    monkeypatch.setattr(datasets, "get_dataset", lambda name, split, root=None, **kw: _TinyDataset())
    monkeypatch.setattr(datasets, "check_available", lambda *a, **kw: None)
    out = tmp_path / "run"
    base = ["--kind", kind, "--size", size, "--dataset", "tiny", "--batch-size", "4", "--max-train", "8",
            "--device", "cpu", "--seed", "1", "--out", str(out), "--no-progress"]
    assert train_denoiser.run(_parse(base + ["--epochs", "1"])) == 0
    # the run directory holds the training engine's checkpoint (the one resume format) and the export
    # (adapted from the epoch-NNNN/ + latest.json layout of the denoiser's own loop before the shared engine)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    state = ckpt["train_state"]
    assert state["epoch"] == 1 and state["finished"] and (out / "denoiser.json").exists()
    assert state["optimizer"]["state"]  # AdamW moments were saved
    d1 = load_denoiser(out)
    assert d1.kind == kind and d1.image_size == 16
    # an existing run is not overwritten silently
    with pytest.raises(UserError):
        train_denoiser.run(_parse(base + ["--epochs", "2"]))
    # resuming with other data settings is refused
    with pytest.raises(UserError):
        train_denoiser.run(_parse([a if a != "8" else "6" for a in base] + ["--epochs", "2", "--resume"]))
    assert train_denoiser.run(_parse(base + ["--epochs", "2", "--resume"])) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    summary = json.loads((out / "train_summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert not list(out.glob(".*"))  # no temp files left behind
    d2 = load_denoiser(out)
    p1 = dict(d1.named_parameters())
    assert any(not torch.equal(p1[n], p) for n, p in d2.named_parameters())  # epoch 2 trained
    # resuming a finished run is a no-op
    assert train_denoiser.run(_parse(base + ["--epochs", "2", "--resume"])) == 0


def test_train_denoiser_bad_args(tmp_path):
    from smoothtransfer.commands import train_denoiser

    with pytest.raises(UserError):
        train_denoiser.run(_parse(["--kind", "mse", "--size", "ddpm-cifar10", "--out", str(tmp_path)]))
    with pytest.raises(UserError):
        train_denoiser.run(_parse(["--kind", "diffusion", "--size", "dncnn", "--out", str(tmp_path)]))
    with pytest.raises(UserError):
        train_denoiser.run(_parse(["--epochs", "0", "--out", str(tmp_path)]))
