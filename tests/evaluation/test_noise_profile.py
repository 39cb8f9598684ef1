"""noise_profile on a linear stand-in, whose accuracy under noise is Phi(margin / sigma) in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm as normal
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.noise_profile import DEFAULT_SIGMAS, markdown_table, noise_profile

D = 48


class Linear2(nn.Module):
    """logits ``(w.x + b, 0)`` with ``||w|| = 1``, plus a dropout so that eval mode is observable."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(D, generator=torch.Generator().manual_seed(0))
        self.w = nn.Parameter(w / w.norm())
        self.b = nn.Parameter(-0.5 * self.w.detach().sum().reshape(()))
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        m = self.drop(x.flatten(1)) @ self.w + self.b
        return torch.stack([m, torch.zeros_like(m)], dim=1)


class DS(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def dataset_at_margin(model, t: float, n: int) -> DS:
    """``n`` images (3,4,4) at signed distance ``t`` from the boundary, labelled with their class."""
    x0 = 0.5 + 0.05 * torch.randn(n, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = x0 + (t - (x0 @ model.w + model.b))[:, None] * model.w[None]
    return DS(x.view(n, 3, 4, 4), torch.full((n,), int(t <= 0)))


@pytest.mark.statistical
def test_matches_closed_form_accuracy():
    """Each image is right with probability Phi(t/sigma); 4.5 binomial SDs -> false failure rate < 1e-4."""
    model = Linear2().train()  # eval mode must be switched on inside (dropout 0.9 would wreck accuracy)
    n, t = 4000, 0.25
    ds = dataset_at_margin(model, t, n)
    prof = noise_profile(
        model, ds, sigmas=(0.0,) + DEFAULT_SIGMAS, batch_size=1000, generator=torch.Generator().manual_seed(0)
    )
    assert list(prof) == [0.0, *DEFAULT_SIGMAS]
    assert prof[0.0] == 1.0 and prof[0.001] == 1.0
    for s, acc in prof.items():
        if s > 0:
            p = normal.cdf(t / s)
            assert abs(acc - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, (s, acc, p)
    assert model.training and model.drop.training  # flags restored


def test_reproducible_subset_loader_and_table():
    model = Linear2()
    ds = dataset_at_margin(model, -0.2, 64)
    a = noise_profile(model, ds, (0.5,), batch_size=16, generator=torch.Generator().manual_seed(3))
    b = noise_profile(model, ds, (0.5,), batch_size=16, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert noise_profile(model, ds, (0.0,), indices=[0, 5, 9]) == {0.0: 1.0}
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    assert noise_profile(model, loader, (0.0, 0.001)) == {0.0: 1.0, 0.001: 1.0}
    table = markdown_table({0.25: 0.5, 1.0: 0.123}, "model")
    assert table.splitlines() == ["| σ | 0.25 | 1 |", "|---|---|---|", "| model | 50.0 | 12.3 |"]


def test_bad_inputs():
    model = Linear2()
    ds = dataset_at_margin(model, 0.1, 4)
    for sigmas in ((), (-0.1,), (float("inf"),), ("a",)):
        with pytest.raises(UserError):
            noise_profile(model, ds, sigmas)
    with pytest.raises(UserError, match="batch_size"):
        noise_profile(model, ds, (0.1,), batch_size=0)
    model.spec = {"num_classes": 0}
    with pytest.raises(UserError, match="no classifier head"):
        noise_profile(model, ds, (0.1,))


def test_noise_profile_command(tmp_path, monkeypatch, capsys):
    import json

    from smoothtransfer.cli import main
    from smoothtransfer.commands import noise_profile as cmd
    from smoothtransfer.evaluation import noise_profile as lib
    from tests.evaluation.test_attacks import make_run

    assert cmd.DEFAULT_SIGMAS == lib.DEFAULT_SIGMAS
    ds, ck = make_run(tmp_path, monkeypatch)
    out = tmp_path / "np"
    argv = [
        "noise-profile",
        "--checkpoint",
        ck,
        "--dataset",
        ds,
        "--sigmas",
        "0",
        "0.25",
        "1",
        "--max",
        "5",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    res = json.loads((out / "noise_profile.json").read_text())
    assert list(res["accuracy"]) == ["0", "0.25", "1"] and res["n"] == 5
    assert all(0 <= a <= 1 for a in res["accuracy"].values())
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| σ | 0 | 0.25 | 1 |" and printed[2].startswith("| model |")
    assert main(argv) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    for bad in (["--sigmas", "-1"], ["--batch-size", "0"], ["--skip", "0"]):
        assert main(argv[:5] + bad + ["--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1
