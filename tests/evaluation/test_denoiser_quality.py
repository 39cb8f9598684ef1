"""denoiser_psnr on denoisers whose PSNR is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.denoiser_quality import (
    denoiser_psnr,
    expected_noisy_psnr,
    psnr_per_image,
    psnr_table,
)


class DS(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


class Shrink(nn.Module):
    """``D(y) = c + a·(y − c)``: on images equal to ``c`` everywhere the error is ``a·δ``, so the denoised PSNR
    is the noisy PSNR plus ``−20·log10(a)`` dB, per image and exactly."""

    def __init__(self, c: float, a: float) -> None:
        super().__init__()
        self.c, self.a = c, a
        self.p = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.drop = nn.Dropout(0.5)  # makes eval mode observable

    def forward(self, y, sigma):
        assert not self.training
        return self.c + self.a * (y - self.c)


def gray(n=40, c=0.5):
    return DS(torch.full((n, 3, 8, 8), c))


def test_shrinkage_gain_is_exact():
    res = denoiser_psnr(Shrink(0.5, 0.5), gray(), [0.25, 0.5, 1.0], batch_size=16,
                        generator=torch.Generator().manual_seed(0))
    assert [r.sigma for r in res] == [0.25, 0.5, 1.0]
    for r in res:
        assert r.images == 40
        assert r.gain == pytest.approx(-20 * math.log10(0.5), abs=1e-3)
        # 40 images x 192 pixels: the mean per-image PSNR is within 0.3 dB of -20 log10(sigma) (seeded)
        assert r.noisy == pytest.approx(expected_noisy_psnr(r.sigma), abs=0.3)


def test_identity_has_no_gain_and_eval_mode_is_restored():
    class Identity(Shrink):
        def forward(self, y, sigma):
            assert not self.training
            return y

    d = Identity(0.0, 1.0).train()
    res = denoiser_psnr(d, gray(8), [0.5], generator=torch.Generator().manual_seed(1))
    assert res[0].gain == pytest.approx(0.0, abs=1e-9)
    assert d.training


def test_seeded_and_indices():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = denoiser_psnr(Shrink(0.5, 0.3), gray(), [0.25], generator=g(), indices=range(10))
    b = denoiser_psnr(Shrink(0.5, 0.3), gray(), [0.25], generator=g(), indices=range(10))
    assert a == b and a[0].images == 10


def test_psnr_per_image_closed_form_and_table():
    x = torch.zeros(2, 1, 2, 2)
    est = torch.stack([torch.full((1, 2, 2), 0.1), torch.zeros(1, 2, 2)])
    p = psnr_per_image(est, x)
    assert p[0] == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert p[1] == pytest.approx(100.0)  # exact output: capped
    res = denoiser_psnr(Shrink(0.5, 0.5), gray(4), [0.25], generator=torch.Generator().manual_seed(0))
    assert "| 0.25 |" in psnr_table(res) and "(mean over 4 images)" in psnr_table(res)


def test_bad_sigma_is_a_user_error():
    with pytest.raises(UserError, match="sigma"):
        denoiser_psnr(Shrink(0.5, 0.5), gray(4), [-1.0])
