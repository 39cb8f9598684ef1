"""store.timed: wall time per run counted in slices, so a killed run keeps what it spent."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from smoothtransfer.experiments import store


def _read(d):
    p = d / "timings.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def test_slices_are_written_while_running_and_the_rest_on_interrupt(tmp_path):
    exp = SimpleNamespace(out=tmp_path / "runs", results_dir=tmp_path / "store")
    store.add_timing(exp, "a", 100.0)  # time of an earlier session
    with pytest.raises(KeyboardInterrupt):
        with store.timed(exp, "a", every=0.05):
            time.sleep(0.4)
            during = _read(exp.out)["a"]  # a SIGKILL here would keep this much
            raise KeyboardInterrupt
    assert during > 100.2  # slices of 0.05 s were already on disk
    for d in (exp.out, exp.results_dir):
        assert 100.4 <= _read(d)["a"] < 102.0  # the whole block, added once: no slice counted twice


def test_other_runs_entries_are_kept(tmp_path):
    exp = SimpleNamespace(out=tmp_path / "runs", results_dir=None)
    store.add_timing(exp, "b", 5.0)
    with store.timed(exp, "a", every=10):
        pass
    t = _read(exp.out)
    assert t["b"] == 5.0 and 0 <= t["a"] < 1
