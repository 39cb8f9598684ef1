"""Base-classifier training objectives: finite losses and gradients, and each method's defining property."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.objectives.adversarial import AdversarialObjective
from smoothtransfer.objectives.base import OBJECTIVES, build_objective
from smoothtransfer.objectives.clean import CleanObjective
from smoothtransfer.objectives.consistency import ConsistencyObjective, consistency_terms
from smoothtransfer.objectives.gaussian import GaussianObjective
from smoothtransfer.objectives.macer import macer_terms
from smoothtransfer.objectives.mixed import MixedSigmaObjective
from smoothtransfer.objectives.smoothadv import SmoothAdvObjective, smoothed_nll

B, K = 6, 4
NAMES = ["clean", "gaussian", "mixed", "consistency", "smoothadv", "macer", "adversarial"]
SMALL = {"macer": {"num_noise": 4}, "smoothadv": {"m": 2}}  # keep the test fast


class TinyNet(nn.Module):
    """[0,1] input -> normalise -> conv -> BatchNorm -> ReLU -> pool -> linear; ``(B,3,8,8) -> (B,K)``."""

    def __init__(self, num_classes: int = K) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv((x - self.mean) / self.std)))
        return self.fc(h.mean((2, 3)))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 8, 8, generator=g)
    y = torch.arange(B) % K
    return x, y


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet()


def test_all_registered():
    assert set(NAMES) <= set(OBJECTIVES.names())


@pytest.mark.parametrize("name", NAMES)
def test_finite_loss_and_gradients(name, model, batch):
    x, y = batch
    x = x.contiguous(memory_format=torch.channels_last)  # the trainer's layout on CUDA
    torch.manual_seed(1)
    objective = build_objective(name, **SMALL.get(name, {}))
    out = objective(model.train(), x, y)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (B, K)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["smoothadv", "adversarial"])
def test_attacks_restore_each_module_mode(name, model, batch):
    # fixed-feature fine-tuning keeps BatchNorm in eval inside a model in train mode (design rule 9)
    model.train()
    model.bn.eval()
    build_objective(name, **SMALL.get(name, {}))(model, *batch)
    assert model.training and model.conv.training and not model.bn.training


def test_mixed_with_only_zero_sigma_is_clean_ce(model, batch):
    x, y = batch
    model.eval()
    clean = CleanObjective()(model, x, y).loss
    mixed = MixedSigmaObjective(sigmas=(0.0,))(model, x, y)
    assert torch.equal(mixed.loss, clean)
    assert mixed.logs["sigma_mean"] == 0.0


def test_mixed_draws_from_the_set(model, batch):
    out = MixedSigmaObjective(sigmas=(0.5,), generator=torch.Generator().manual_seed(0))(model.eval(), *batch)
    assert out.logs["sigma_mean"] == pytest.approx(0.5)


def test_gaussian_is_deterministic_under_a_seeded_generator(model, batch):
    x, y = batch
    model.eval()
    losses = [GaussianObjective(0.5, generator=torch.Generator().manual_seed(3))(model, x, y).loss
              for _ in range(2)]
    other = GaussianObjective(0.5, generator=torch.Generator().manual_seed(4))(model, x, y).loss
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], other)


def test_consistency_without_regularisers_is_mean_ce_over_copies(model, batch):
    x, y = batch
    model.eval()  # BatchNorm in eval: the m copies are then independent forward passes
    m, sigma = 3, 0.25
    out = ConsistencyObjective(sigma=sigma, m=m, lbd=0.0, eta=0.0,
                               generator=torch.Generator().manual_seed(5))(model, x, y)
    g = torch.Generator().manual_seed(5)
    from smoothtransfer.data.noise import gaussian_noise

    x_rep = x.repeat(m, 1, 1, 1)
    noisy = x_rep + gaussian_noise(x_rep, sigma, generator=g)
    expected = torch.stack([F.cross_entropy(model(c), y) for c in noisy.view(m, *x.shape)]).mean()
    torch.testing.assert_close(out.loss, expected)
    # and the regularisers are non-negative, so turning them on cannot lower the loss
    reg = ConsistencyObjective(sigma=sigma, m=m, generator=torch.Generator().manual_seed(5))(model, x, y)
    assert reg.loss >= out.loss and reg.logs["loss_kl"] >= 0 and reg.logs["entropy"] >= 0


def test_consistency_terms_match_the_reference_form():
    # jh-jeong/smoothing-consistency: kl_div(logit_i, p̂) = F.kl_div(log_softmax, p̂).sum(1); entropy of p̂
    logits = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(8))
    p_bar = logits.softmax(-1).mean(0)
    kl_ref = sum(F.kl_div(lg.log_softmax(1), p_bar, reduction="none").sum(1) for lg in logits) / 3
    ent_ref = -(p_bar * p_bar.clamp(min=1e-20).log()).sum(1)
    kl, entropy = consistency_terms(logits)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(entropy, ent_ref)


def test_smoothadv_point_in_ball_and_increases_smoothed_loss(model, batch):
    x, y = batch
    model.eval()
    eps = 0.5
    objective = SmoothAdvObjective(sigma=0.25, epsilon=eps, steps=2, m=2)
    noises = 0.25 * torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(6))
    x_adv = objective.attack(model, x, y, noises)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert smoothed_nll(model, x_adv, y, noises).sum() > smoothed_nll(model, x, y, noises).sum()
    assert all(p.grad is None for p in model.parameters())  # the attack leaves parameter grads alone


def test_smoothadv_epsilon_warmup():
    objective = SmoothAdvObjective(epsilon=1.0, warmup=10)
    assert objective.current_epsilon == 1.0  # before the trainer calls set_epoch
    objective.set_epoch(0)
    assert objective.current_epsilon == pytest.approx(0.1)
    objective.set_epoch(4)
    assert objective.current_epsilon == pytest.approx(0.5)
    objective.set_epoch(30)
    assert objective.current_epsilon == 1.0
    no_warmup = SmoothAdvObjective(epsilon=1.0, warmup=0)
    no_warmup.set_epoch(0)
    assert no_warmup.current_epsilon == 1.0


def _logits_from_probs(p: list[list[float]], k: int = 3) -> torch.Tensor:
    """``(k,B,K)`` logits whose softmax (β = 1) is ``p`` in every noisy copy."""
    return torch.tensor(p).log().unsqueeze(0).repeat(k, 1, 1)


def test_macer_hinge_zero_beyond_gamma():
    y = torch.tensor([0, 0])
    # ξ = Φ⁻¹(0.9) − Φ⁻¹(0.05) ≈ 2.93 for the first sample; the second is misclassified
    logits = _logits_from_probs([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    xi = (torch.special.ndtri(torch.tensor(0.9)) - torch.special.ndtri(torch.tensor(0.05))).item()
    _, robust, in_hinge = macer_terms(logits, y, sigma=0.5, gamma=2.0, beta=1.0)
    assert not in_hinge.any() and torch.equal(robust, torch.zeros(2))  # margin beyond γ: no hinge loss
    cls, robust, in_hinge = macer_terms(logits, y, sigma=0.5, gamma=8.0, beta=1.0)
    assert in_hinge.tolist() == [True, False]  # misclassified samples never enter the hinge
    torch.testing.assert_close(robust, torch.tensor([0.25 * (8.0 - xi), 0.0]))
    torch.testing.assert_close(cls, -torch.tensor([0.9, 0.2]).log())


def test_macer_saturated_probabilities_give_zero_hinge_and_finite_grads():
    # β·logits saturates softmax to exactly 1: Φ⁻¹ = ∞, the sample leaves the hinge and grads stay finite
    saturated, moderate = [60.0, 0.0, 0.0], [0.1, 0.0, 0.0]
    logits = torch.tensor([[saturated, moderate]] * 2, requires_grad=True)  # (k=2,B=2,K=3)
    cls, robust, in_hinge = macer_terms(logits, torch.tensor([0, 0]), sigma=0.25, gamma=8.0, beta=16.0)
    assert in_hinge.tolist() == [False, True] and robust[0] == 0 and robust[1] > 0
    (cls.sum() + robust.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_macer_matches_the_reference_form():
    # RuntianZ/macer macer.py on one batch: loss = (Σ cl + λ Σ rl) / B with its isinf/isnan/|·|≤γ filter
    k, sigma, lbd, gamma, beta = 4, 0.25, 12.0, 8.0, 16.0
    logits = 0.3 * torch.randn(k, 8, K, generator=torch.Generator().manual_seed(9))
    y = torch.arange(8) % K
    normal = torch.distributions.Normal(torch.tensor([0.0]), torch.tensor([1.0]))
    cl = F.nll_loss(torch.log(logits.softmax(2).mean(0) + 1e-10), y, reduction="sum")
    top2_score, top2_idx = torch.topk((logits * beta).softmax(2).mean(0), 2)
    correct = top2_idx[:, 0] == y
    out0, out1 = top2_score[correct, 0], top2_score[correct, 1]
    rl = normal.icdf(out1) - normal.icdf(out0)
    keep = ~torch.isnan(rl) & ~torch.isinf(rl) & (torch.abs(rl) <= gamma)
    rl = (normal.icdf(out1[keep]) - normal.icdf(out0[keep]) + gamma).sum() * sigma / 2
    reference = (cl + lbd * rl) / len(y)
    cls, robust, in_hinge = macer_terms(logits, y, sigma, gamma, beta)
    assert in_hinge.sum() == keep.sum() > 0
    torch.testing.assert_close(cls.mean() + lbd * robust.mean(), reference)


def test_adversarial_within_ball_and_increases_loss(model, batch):
    x, y = batch
    model.eval()
    torch.manual_seed(7)
    objective = AdversarialObjective(epsilon=0.5, steps=3)
    assert objective.step_size == pytest.approx(2 * 0.5 / 3)
    x_adv = objective.attack(model, x, y)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) >= F.cross_entropy(model(x), y)


@pytest.mark.parametrize(("name", "params"), [
    ("gaussian", {"sigma": -0.1}),
    ("gaussian", {"sigma": float("nan")}),
    ("mixed", {"sigmas": ()}),
    ("mixed", {"sigmas": "0.5"}),
    ("mixed", {"sigmas": (0.25, -1.0)}),
    ("mixed", {"sigmas": (0.25, 0.5), "weights": (1.0,)}),
    ("consistency", {"m": 1}),
    ("consistency", {"lbd": -1.0}),
    ("consistency", {"eta": -0.5}),
    ("smoothadv", {"epsilon": 0.0}),
    ("smoothadv", {"m": 0}),
    ("smoothadv", {"steps": 1.5}),
    ("smoothadv", {"warmup": -1}),
    ("macer", {"num_noise": 0}),
    ("macer", {"sigma": 0.0}),
    ("macer", {"beta": 0.0}),
    ("adversarial", {"epsilon": -1.0}),
    ("adversarial", {"steps": 0}),
    ("adversarial", {"step_size": 0.0}),
])
def test_invalid_parameters_raise_user_error(name, params):
    with pytest.raises(UserError):
        build_objective(name, **params)


def test_build_objective():
    objective = build_objective("gaussian", sigma=0.5)
    assert isinstance(objective, GaussianObjective) and objective.sigma == 0.5
    with pytest.raises(UserError, match="foo"):
        build_objective("gaussian", foo=1)
