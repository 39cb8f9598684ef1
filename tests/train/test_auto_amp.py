"""``amp: auto``: which precision each CPU kind gets for training and for certification (utils.auto_amp)."""

import pytest
import torch

from smoothtransfer import utils


@pytest.mark.parametrize("units, train, infer", [
    ("amx", "bf16", "bf16"),             # AMX tiles: bf16 pays for both
    ("avx512_bf16", "bf16", "none"),     # measured: training 1.7-2.0x fp32, certification within 10%
    (None, "none", "none"),              # bf16 emulated: slower
])
def test_auto_amp_per_cpu_kind(monkeypatch, units, train, infer):
    monkeypatch.setattr(utils, "cpu_info", lambda: {"model": "x", "bf16_units": units, "avx512": True})
    cpu = torch.device("cpu")
    assert utils.auto_amp(cpu, training=True) == train
    assert utils.auto_amp(cpu) == infer
    assert utils.amp_dtype("auto", cpu, training=True) == utils.AMP_DTYPES[train]
    assert utils.amp_dtype("none", cpu, training=True) is None   # an explicit choice is never overridden
    assert utils.amp_dtype("bf16", cpu) == torch.bfloat16
