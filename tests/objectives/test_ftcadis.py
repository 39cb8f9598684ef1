"""FT-CADIS (Jang et al., Algorithm 1): selective CE, cold start, masked adversarial loss, PGD ball, LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.objectives.base import OBJECTIVES, build_objective
from smoothtransfer.objectives.ftcadis import FTCADISObjective

K, M = 3, 4


class FixedDenoiser(nn.Module):
    """Stub D: ignores its (noisy) input and returns preset denoised copies ``(M·B,C,H,W)``."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images
        self.calls = 0

    def forward(self, x_noisy, sigma):
        assert x_noisy.shape == self.images.shape
        self.calls += 1
        return self.images.clone()


class ChannelMean(nn.Module):
    """Stub f: logits = W·(per-channel mean) + b, W = 8·I, so argmax = the brightest channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, K)
        with torch.no_grad():
            self.fc.weight.copy_(8 * torch.eye(K))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def copies(classes: list[list[int]], size: int = 4) -> torch.Tensor:
    """Denoised copies whose predicted class is ``classes[b][i]``: copy-major layout ``(M·B,3,H,W)``.

    The winning channel's brightness differs per copy, so the M predictions differ in confidence.
    """
    b = len(classes)
    out = torch.full((M, b, 3, size, size), 0.2)
    for j, row in enumerate(classes):
        for i, c in enumerate(row):
            out[i, j, c] = 0.5 + 0.1 * i
    return out.reshape(M * b, 3, size, size)


def make(classes, **kw):
    den = FixedDenoiser(copies(classes))
    kw = {"sigma": 0.25, "m": M, "steps": 2, "epsilon": 0.25, "lbd": 1.0, **kw}
    return FTCADISObjective(den, **kw), den


def per_copy_ce(model, images, y):
    b = len(y)
    with torch.no_grad():
        return F.cross_entropy(model(images), y.repeat(M), reduction="none").view(M, b).t()


X = torch.full((1, 3, 4, 4), 0.3)
Y = torch.tensor([0])


# ---------------------------------------------------------------------------------------------------- masking


def test_all_nonhallucinated_activates_madv():
    f = ChannelMean()
    obj, den = make([[0, 0, 0, 0]])
    out = obj(f, X, Y)
    ce = per_copy_ce(f, den.images, Y)
    assert out.logs["nh_fraction"] == 1.0 and out.logs["madv_active"] == 1.0
    assert out.logs["l_sce"] == pytest.approx(float(ce.sum() / M), rel=1e-5)
    assert out.logs["l_madv"] > 0
    assert out.loss.item() == pytest.approx(out.logs["l_sce"] + 1.0 * out.logs["l_madv"], rel=1e-5)
    assert out.logits.shape == (1, K)


def test_madv_is_the_max_kl_at_the_attacked_points():
    """With steps=0, η* = η_i: L_MAdv = max_i KL(ŷ ‖ f(x + η_i)) = max_i KL(ŷ ‖ f(x̂_i))."""
    f = ChannelMean()
    obj, den = make([[0, 0, 0, 0]], steps=0)
    out = obj(f, X, Y)
    with torch.no_grad():
        p = F.softmax(f(den.images), dim=1)
        y_hat = p.mean(0, keepdim=True)
        kl = (y_hat * (y_hat.log() - p.log())).sum(1)
    assert out.logs["l_madv"] == pytest.approx(float(kl.max()), rel=1e-4)


def test_partial_nonhallucinated_masks_madv_and_sums_dnh_over_m():
    f = ChannelMean()
    obj, den = make([[0, 1, 0, 2]])
    out = obj(f, X, Y)
    ce = per_copy_ce(f, den.images, Y)[0]
    assert out.logs["nh_fraction"] == 0.5 and out.logs["madv_active"] == 0.0
    assert out.logs["l_madv"] == 0.0
    assert out.loss.item() == pytest.approx(float((ce[0] + ce[2]) / M), rel=1e-5)


def test_empty_dnh_uses_lowest_ce_copy_only():
    f = ChannelMean()
    obj, den = make([[1, 2, 1, 2]])
    ce = per_copy_ce(f, den.images, Y)[0]
    out = obj(f, X, Y)
    assert out.logs["nh_fraction"] == 0.0 and out.logs["l_madv"] == 0.0
    assert out.loss.item() == pytest.approx(float(ce.min() / M), rel=1e-5)
    # without the warm start the example contributes nothing
    obj2, _ = make([[1, 2, 1, 2]], warm_start=False)
    assert obj2(f, X, Y).loss.item() == 0.0


def test_mask_is_per_example():
    """Batch of three: all-correct, partly correct, none correct; L_MAdv only on the first."""
    f = ChannelMean()
    classes = [[0, 0, 0, 0], [1, 0, 1, 2], [0, 1, 0, 1]]
    y = torch.tensor([0, 1, 2])
    x = torch.full((3, 3, 4, 4), 0.3)
    obj, den = make(classes, steps=0)
    out = obj(f, x, y)
    ce = per_copy_ce(f, den.images, y)
    expected_sce = torch.stack([ce[0].sum() / M, (ce[1, 0] + ce[1, 2]) / M, ce[2].min() / M])
    obj_only_first, _ = make(classes[:1], steps=0)
    madv0 = obj_only_first(f, x[:1], y[:1]).logs["l_madv"]
    assert out.logs["madv_active"] == pytest.approx(1 / 3)
    assert out.logs["l_sce"] == pytest.approx(float(expected_sce.mean()), rel=1e-5)
    assert out.logs["l_madv"] == pytest.approx(madv0 / 3, rel=1e-4)
    assert out.loss.item() == pytest.approx(float(expected_sce.mean()) + madv0 / 3, rel=1e-4)


def test_ablations():
    f = ChannelMean()
    classes = [[0, 1, 0, 2]]
    ce = per_copy_ce(f, copies(classes), Y)[0]
    no_nh, _ = make(classes, use_nh=False, lbd=0.0)  # CE on all M denoised images
    assert no_nh(f, X, Y).loss.item() == pytest.approx(float(ce.mean()), rel=1e-5)
    no_mask, _ = make(classes, use_mask=False)  # L_MAdv even though |D_nh| < M
    out = no_mask(f, X, Y)
    assert out.logs["madv_active"] == 1.0 and out.logs["l_madv"] > 0


# ---------------------------------------------------------------------------------------------------- PGD


class SmallNet(nn.Module):
    def __init__(self, k=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_pgd_stays_in_the_ball_and_increases_kl():
    torch.manual_seed(0)
    f = SmallNet().train()
    obj = FTCADISObjective(FixedDenoiser(torch.zeros(1)), sigma=0.5, m=3, steps=4, epsilon=0.3)
    x = torch.rand(2, 3, 8, 8)
    eta0 = 0.2 * torch.randn(3, 2, 3, 8, 8)
    with torch.no_grad():
        target = F.softmax(f.eval()((x.unsqueeze(0) + eta0).view(6, 3, 8, 8)), 1).view(3, 2, -1).mean(0)
    f.train()
    stats = f.bn.running_mean.clone()
    eta = obj.attack(f, x, eta0, target)
    assert eta.shape == eta0.shape and not eta.requires_grad
    dist = (eta - eta0).flatten(2).norm(dim=2)
    assert (dist <= 0.3 * (1 + 1e-5)).all() and (dist > 0.1).all()
    # the classifier's state is restored and untouched: train mode, trainable, BN statistics, no grads
    assert f.training and all(p.requires_grad for p in f.parameters())
    assert torch.equal(f.bn.running_mean, stats) and all(p.grad is None for p in f.parameters())

    def kl(e):
        with torch.no_grad():
            logp = F.log_softmax(f.eval()((x.unsqueeze(0) + e).view(6, 3, 8, 8)), 1)
            return float(F.kl_div(logp, target.repeat(3, 1), reduction="sum"))

    assert kl(eta) > kl(eta0)
    f.train()


def test_loss_finite_and_gradients_only_on_the_classifier():
    from smoothtransfer.models.denoisers import (
        DiffusionDenoiser,
        create_ddpm_scheduler,
        create_diffusion_unet,
    )

    torch.manual_seed(0)
    den = DiffusionDenoiser(create_diffusion_unet(8, 3, "tiny"), create_ddpm_scheduler())
    den.unet.requires_grad_(True)  # even if a caller left it trainable, D must receive no gradient
    f = SmallNet(k=4).train()
    obj = build_objective("ftcadis", denoiser=den, sigma=0.25, m=2, steps=1, use_mask=False)
    assert obj.lbd == 1.0  # λ = 4σ
    assert list(obj.parameters()) == [] and obj.state_dict() == {}  # D is not part of the objective's state
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    out = obj(f, x, y)
    assert torch.isfinite(out.loss) and out.logits.shape == (3, 4)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
    assert all(p.grad is None for p in den.parameters())
    assert not den.training and not any(p.requires_grad for p in den.parameters())


def test_constructor_validation():
    from smoothtransfer.models.denoisers import DiffusionDenoiser, create_ddpm_scheduler

    assert OBJECTIVES.get("ftcadis") is FTCADISObjective
    d = FixedDenoiser(torch.zeros(1))
    assert FTCADISObjective(d, sigma=0.5).lbd == 2.0 and FTCADISObjective(d, sigma=1.0).lbd == 4.0
    assert FTCADISObjective(d, sigma=0.5, lbd=0.3).lbd == 0.3
    with pytest.raises(UserError):
        build_objective("ftcadis", sigma=0.25)  # no denoiser
    with pytest.raises(UserError):
        build_objective("ftcadis", denoiser=d, sigma=0.25, lamda=1.0)  # unknown parameter
    for bad in ({"m": 0}, {"steps": -1}, {"epsilon": -1.0}, {"sigma": 0.0}, {"lbd": -1.0}):
        with pytest.raises(UserError):
            FTCADISObjective(d, **{"sigma": 0.25, **bad})

    class Unet(nn.Module):
        config = type("C", (), {"sample_size": 8, "in_channels": 3, "out_channels": 3})

    with pytest.raises(UserError):  # σ beyond the diffusion schedule
        FTCADISObjective(DiffusionDenoiser(Unet(), create_ddpm_scheduler()), sigma=100.0)


def test_epsilon_default_and_doubling_after_10_epochs_at_sigma_1():
    d = FixedDenoiser(torch.zeros(1))
    # the reference code's effective radius: --eps 64 / 256 on [-1,1] images = 0.125 in [0,1] pixels
    assert FTCADISObjective(d, sigma=0.5).epsilon == 0.125
    s100, s050 = FTCADISObjective(d, sigma=1.0), FTCADISObjective(d, sigma=0.5)
    assert s100.eps_double_epoch == 10 and s050.eps_double_epoch is None
    assert s100.current_epsilon == 0.125  # before the trainer calls set_epoch
    for epoch, want in [(0, 0.125), (9, 0.125), (10, 0.25), (29, 0.25)]:
        s100.set_epoch(epoch)
        s050.set_epoch(epoch)
        assert s100.current_epsilon == want, epoch
        assert s050.current_epsilon == 0.125, epoch  # σ = 0.5: never doubled
    never = FTCADISObjective(d, sigma=1.0, eps_double_epoch=None)
    early = FTCADISObjective(d, sigma=0.25, epsilon=0.2, eps_double_epoch=2)
    never.set_epoch(20)
    early.set_epoch(2)
    assert never.current_epsilon == 0.125 and early.current_epsilon == 0.4
    assert build_objective("ftcadis", denoiser=d, sigma=1.0, eps_double_epoch=3).eps_double_epoch == 3
    for bad in (-1, 1.5, "always", True):
        with pytest.raises(UserError, match="eps_double_epoch"):
            FTCADISObjective(d, sigma=1.0, eps_double_epoch=bad)


def test_pgd_uses_the_doubled_radius():
    torch.manual_seed(0)
    f = SmallNet().train()
    obj = FTCADISObjective(FixedDenoiser(torch.zeros(1)), sigma=1.0, m=2, steps=4, epsilon=0.1)
    x, eta0 = torch.rand(2, 3, 8, 8), 0.2 * torch.randn(2, 2, 3, 8, 8)
    target = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]])
    dist = {}
    for epoch in (9, 10):
        obj.set_epoch(epoch)
        dist[epoch] = (obj.attack(f, x, eta0, target) - eta0).flatten(2).norm(dim=2)
    assert (dist[9] <= 0.1 * (1 + 1e-5)).all() and (dist[10] <= 0.2 * (1 + 1e-5)).all()
    assert (dist[10] > 0.1 * (1 + 1e-3)).any()  # step 2ε/T with the doubled ε leaves the old ball


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_finetuning_changes_only_adapters_and_head():
    try:
        from smoothtransfer.models.factory import create_classifier
        from smoothtransfer.models.lora import apply_lora
    except ImportError as e:  # pragma: no cover - depends on modules written in parallel
        pytest.xfail(f"smoothtransfer.models.lora not available yet: {e}")
    torch.manual_seed(0)
    model = create_classifier("vit_tiny_patch4_32", num_classes=3, input_size=32)
    model = apply_lora(model, rank=4, alpha=4)
    with torch.no_grad():  # LoRA's B starts at zero: perturb it so adapter gradients reach A as well
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {id(p) for p in model.head_parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    assert trainable and all("lora_" in n or n in head_names for n in trainable)

    class Blur(nn.Module):  # a cheap stand-in denoiser: average each noisy pixel with its neighbours
        def forward(self, x, sigma):
            return F.avg_pool2d(x, 3, stride=1, padding=1).clamp(0, 1)

    obj = FTCADISObjective(Blur(), sigma=0.25, m=2, steps=1, use_mask=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = obj(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(out.loss) and out.logs["l_madv"] > 0
    out.loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable
    assert any("lora_" in n for n in changed) and any(n in head_names for n in changed)
