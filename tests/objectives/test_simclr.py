"""SimCLR objective: NT-Xent against explicit loops, batched augmentation, a toy optimisation, DDP gather."""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.objectives.base import OBJECTIVES, build_objective
from smoothtransfer.objectives.simclr import SimCLRAugment, SimCLRObjective, nt_xent


class ToyEncoder(nn.Module):
    """Stand-in for a Classifier: ``forward_features (B,3,H,W) -> (B,16)``."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward_features(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))


def nt_xent_loops(z1, z2, tau):
    """Chen et al. (2020) eq. 1 written out: l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = torch.cat([z1, z2]).double()
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        cos = [float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) for k in range(n)]
        denom = sum(math.exp(cos[k] / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(cos[j] / tau) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_nt_xent_matches_hand_computed(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    loss, logits, pos = nt_xent(z1, z2, tau)
    assert loss.item() == pytest.approx(nt_xent_loops(z1, z2, tau), rel=1e-5)
    assert logits.shape == (6, 6)
    assert torch.isinf(logits.diagonal()).all()
    assert pos.tolist() == [3, 4, 5, 0, 1, 2]


def test_nt_xent_perfect_pairs_beat_random():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 32, generator=g)
    good = nt_xent(z, z + 0.01 * torch.randn(8, 32, generator=g), 0.5)[0]
    bad = nt_xent(z, torch.randn(8, 32, generator=g), 0.5)[0]
    assert good < bad


def test_augment_range_shape_and_per_sample_randomness():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    aug = SimCLRAugment()
    out = aug(x, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    # a batch of identical images must come out different per image (per-sample parameters)
    same = aug(x[:1].expand(16, -1, -1, -1).contiguous(), generator=g)
    assert (same[1:] - same[:1]).abs().flatten(1).amax(1).min() > 1e-3
    # seeded generator -> reproducible
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # grayscale inputs keep one channel
    gray = aug(torch.rand(8, 1, 28, 28, generator=g), generator=g)
    assert gray.shape == (8, 1, 28, 28) and gray.min() >= 0 and gray.max() <= 1


def test_augment_identity_and_flip_settings():
    x = torch.rand(4, 3, 16, 16)
    ident = SimCLRAugment(scale=(1, 1), ratio=(1, 1), p_jitter=0, p_gray=0, p_flip=0)
    assert torch.allclose(ident(x), x, atol=1e-6)
    flip = SimCLRAugment(scale=(1, 1), ratio=(1, 1), p_jitter=0, p_gray=0, p_flip=1)
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-6)


def test_registered_and_bad_params():
    assert "simclr" in OBJECTIVES
    obj = build_objective("simclr", feature_dim=16)
    assert obj.uses_labels is False
    with pytest.raises(UserError, match="feature_dim"):
        build_objective("simclr")
    with pytest.raises(UserError):
        build_objective("simclr", feature_dim=16, temperature=0.0)
    with pytest.raises(UserError):
        build_objective("simclr", feature_dim=16, nonsense=1)
    with pytest.raises(UserError, match="feature_dim"):
        SimCLRObjective(feature_dim=8)(ToyEncoder(), torch.rand(4, 3, 8, 8), None)


def test_loss_finite_and_gradients_reach_model_and_head():
    torch.manual_seed(0)
    model, obj = ToyEncoder(), SimCLRObjective(feature_dim=16, proj_dim=8)
    out = obj(model, torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (6, 12)
    assert set(out.logs) == {"nt_xent", "pos_acc"}
    out.loss.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.projector.parameters())
    assert model.head.weight.grad is None  # the classifier head is not part of pre-training


def test_positives_ranked_above_negatives_after_training():
    """Separable toy data (8 distinct colours): a few steps rank every view's partner above all negatives."""
    torch.manual_seed(0)
    colours = torch.tensor(list(itertools.product((0.15, 0.85), repeat=3))).view(8, 3, 1, 1)
    x = (colours + 0.02 * torch.randn(8, 3, 8, 8)).clamp(0, 1)
    model, obj = ToyEncoder(), SimCLRObjective(feature_dim=16, proj_dim=16, temperature=0.2)
    obj.augment = SimCLRAugment(scale=(0.5, 1.0), strength=0.1, p_gray=0.0)
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=2e-2)

    def margin(out):
        logits, pos = out.logits, torch.arange(8) + 8  # first view's rows; partner in column B + i
        neg = logits.clone()
        neg[torch.arange(8), pos] = float("-inf")
        return (logits[torch.arange(8), pos] - neg.amax(1)).min().item()

    first = obj(model, x, None)
    for _ in range(40):
        out = obj(model, x, None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    obj.eval()
    with torch.no_grad():
        last = obj(model, x, None)
    assert last.logs["nt_xent"] < 0.5 * first.logs["nt_xent"]
    assert last.logs["pos_acc"] == 1.0
    assert margin(last) > 0 and margin(last) > margin(first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, z1, z2, tau, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = nt_xent(a1, a2, tau)[0]
        loss.backward()
        q.put((rank, loss.item(), a1.grad.tolist(), a2.grad.tolist()))  # lists: no shared-memory fds
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gather_matches_single_process_gradient():
    """Two gloo ranks: the rank-mean loss and the summed gradients equal the single-process global batch's."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    world, b, tau = 2, 3, 0.5
    z1, z2 = torch.randn(world * b, 4, generator=g), torch.randn(world * b, 4, generator=g)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_ddp_worker, args=(world, _free_port(), z1, z2, tau, q), nprocs=world, join=True)
    results = sorted(q.get() for _ in range(world))
    # single process over the whole batch; a rank's queries are a permutation-invariant subset of the rows
    s1, s2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    nt_xent(s1, s2, tau, gather=False)[0].backward()
    assert sum(r[1] for r in results) / world == pytest.approx(
        nt_xent(z1, z2, tau, gather=False)[0].item(), rel=1e-5
    )
    for rank, _, g1, g2 in results:
        g1, g2 = torch.tensor(g1), torch.tensor(g2)
        # DDP averages parameter gradients over ranks, so each rank's input gradient is world x the global one
        torch.testing.assert_close(g1 / world, s1.grad[rank * b : (rank + 1) * b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g2 / world, s2.grad[rank * b : (rank + 1) * b], rtol=1e-4, atol=1e-6)
