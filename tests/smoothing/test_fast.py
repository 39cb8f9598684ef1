"""The library's fast path (``smoothing.prepare`` / ``Smooth(fast=True)``): same certificates, CLI speed-ups.

What must hold: the noise is drawn and added in float32 and only then cast (soundness rule 6); micro-batching
and the automatic batch size change nothing but speed; float32 fast results equal the plain path's; bf16 is
chosen only where the hardware has bf16 matrix units.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import FastClassifier, Smooth, prepare, resolve_amp
from smoothtransfer.smoothing import fast as fast_mod
from tests.toys import TinyCNN

SHAPE = (3, 8, 8)


class Recorder(nn.Module):
    """Records the dtype of its input and the autocast state it runs under; logits from a fixed linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 3)
        self.seen: list[tuple[torch.dtype, bool, int]] = []

    def forward(self, x):
        self.seen.append((x.dtype, torch.is_autocast_enabled(x.device.type), x.shape[0]))
        return self.lin(x.flatten(1))


def test_resolve_amp(monkeypatch):
    monkeypatch.setattr(fast_mod, "cpu_has_amx_bf16", lambda: True)
    assert resolve_amp("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(fast_mod, "cpu_has_amx_bf16", lambda: False)
    assert resolve_amp("auto", "cpu") is None  # no matrix units: bf16 is no faster, keep float32
    assert resolve_amp(None, "cpu") is None and resolve_amp(torch.float32, "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16 and resolve_amp(torch.float16, "cpu") is torch.float16
    with pytest.raises(UserError, match="amp"):
        resolve_amp("int8", "cpu")


def test_prepare_wraps_once_and_sets_channels_last():
    model = TinyCNN().train()
    fast = prepare(model, amp=None)
    assert isinstance(fast, FastClassifier) and fast.model is model and prepare(fast) is fast
    w = model.body[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert model.training  # flags left alone: Smooth runs eval mode per call
    with pytest.raises(UserError, match="micro_batch"):
        prepare(TinyCNN(), micro_batch=0)


def test_noise_is_float32_and_cast_inside_the_base_classifier():
    rec = Recorder()
    smooth = Smooth(rec, 3, 0.5, amp_dtype=torch.bfloat16)
    smooth.certify(torch.rand(SHAPE), 10, 300, 0.01, batch_size=300)
    # the sampler hands float32 noisy images to the base classifier, which casts under autocast inside
    assert rec.seen and all(dtype == torch.float32 and autocast for dtype, autocast, _ in rec.seen)
    assert max(b for *_, b in rec.seen) == 128  # 300 requested, micro-batches of the CPU's 128 at 32 px and below
    rec.seen.clear()
    Smooth(rec, 3, 0.5, fast=False).certify(torch.rand(SHAPE), 10, 300, 0.01, 300)
    assert all(dtype == torch.float32 and not autocast for dtype, autocast, _ in rec.seen)
    assert max(b for *_, b in rec.seen) == 300  # fast=False: the batch as asked


def test_micro_batches_change_nothing_but_speed():
    model = TinyCNN().eval()
    x = torch.rand(300, *SHAPE)
    with torch.no_grad():
        whole = model(x)
        chunked = FastClassifier(model, None, micro_batch=128)(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_fast_float32_certificates_equal_the_plain_path():
    """Same seed: fast (channels_last, micro-batches, automatic batch size) == plain, for every image."""
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    plain = Smooth(TinyCNN(), 4, 0.25, fast=False)
    fast = Smooth(TinyCNN(), 4, 0.25, amp_dtype=None)
    assert fast.amp_dtype is None and fast.batch_size_for(SHAPE, "cpu") == 128
    for i in range(4):
        a = plain.certify_full(x[i], 20, 500, 0.01, 400, generator=torch.Generator().manual_seed(i))
        b = fast.certify_full(x[i], 20, 500, 0.01, generator=torch.Generator().manual_seed(i))
        assert (a.prediction, a.count) == (b.prediction, b.count)
    batched = fast.certify_batch(x, 20, 500, 0.01, generators=[torch.Generator().manual_seed(i) for i in range(4)])
    assert [c.count for c in batched] == [
        plain.certify_full(x[i], 20, 500, 0.01, 64, generator=torch.Generator().manual_seed(i)).count
        for i in range(4)
    ]


def test_bf16_fast_path_agrees_with_float32_within_sampling_noise():
    """bf16 certifies the bf16 classifier; on a smooth CNN its votes match float32's up to a few flips."""
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2))
    f32 = Smooth(TinyCNN(), 4, 0.25, amp_dtype=None).certify_full(x, 20, 2000, 0.01,
                                                                 generator=torch.Generator().manual_seed(0))
    b16 = Smooth(TinyCNN(), 4, 0.25, amp_dtype=torch.bfloat16).certify_full(
        x, 20, 2000, 0.01, generator=torch.Generator().manual_seed(0))
    assert b16.prediction == f32.prediction
    assert abs(b16.count - f32.count) <= 100  # 5% of the votes; both certificates are sound either way


def test_auto_amp_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(fast_mod, "cpu_has_amx_bf16", lambda: True)
    assert Smooth(TinyCNN(), 4, 0.25).amp_dtype is torch.bfloat16
    monkeypatch.setattr(fast_mod, "cpu_has_amx_bf16", lambda: False)
    assert Smooth(TinyCNN(), 4, 0.25).amp_dtype is None
    assert Smooth(TinyCNN(), 4, 0.25, fast=False).amp_dtype is None  # fast=False: nothing automatic


def test_a_prepared_classifier_is_used_as_it_is():
    fast = prepare(TinyCNN(), amp=torch.bfloat16)
    smooth = Smooth(fast, 4, 0.25)
    assert smooth.base_classifier is fast and smooth.amp_dtype is torch.bfloat16
    with pytest.raises(UserError, match="prepare"):
        Smooth(fast, 4, 0.25, amp_dtype=None)


@pytest.mark.slow
def test_compiled_fast_path_matches_eager():
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    eager = Smooth(TinyCNN(), 4, 0.25, amp_dtype=None)
    compiled = Smooth(prepare(TinyCNN(), amp=None, compile=True), 4, 0.25)
    assert compiled.base_classifier.compiled
    a = eager.certify_full(x, 20, 300, 0.01, generator=torch.Generator().manual_seed(0))
    b = compiled.certify_full(x, 20, 300, 0.01, generator=torch.Generator().manual_seed(0))
    assert a.prediction == b.prediction and abs(a.count - b.count) <= 3  # float rounding near the boundary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_on_cuda():
    """On a GPU the defaults pick bf16 where supported and a memory-sized batch; certificates agree with the
    plain float32 path up to sampling noise, and the base classifier still receives float32 noisy inputs."""
    x = torch.rand(SHAPE, device="cuda")
    smooth = Smooth(TinyCNN().cuda(), 4, 0.25)
    assert smooth.amp_dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert smooth.batch_size_for(SHAPE, x.device) >= 64
    fast = smooth.certify_full(x, 20, 4000, 0.01, generator=torch.Generator(device="cuda").manual_seed(0))
    plain = Smooth(TinyCNN().cuda(), 4, 0.25, fast=False).certify_full(
        x, 20, 4000, 0.01, 500, generator=torch.Generator(device="cuda").manual_seed(0))
    assert fast.prediction == plain.prediction and abs(fast.count - plain.count) <= 200
    rec = Recorder().cuda()
    Smooth(rec, 3, 0.5).certify(x, 10, 300, 0.01)
    assert rec.seen and all(dtype == torch.float32 for dtype, _, _ in rec.seen)
