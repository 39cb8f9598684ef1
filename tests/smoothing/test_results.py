"""The results module: one reader, one schema, versioned (sidecars and summaries of a newer version refused, files
without a version read as before), and the committed result store read as it was written."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import results
from smoothtransfer.smoothing.results import (
    FORMAT,
    FORMAT_VERSION,
    check_version,
    complete_sigmas,
    load_run,
    read_summary,
    summarize_dir,
)
from smoothtransfer.smoothing.runner import certify_dataset
from tests.toys import TinyCNN

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "smoothtransfer"


class Images:
    """Six 3x8x8 images with labels from the toy model (so some certify, some abstain or miss)."""

    classes = ["a", "b", "c"]

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = torch.rand(6, 3, 8, 8, generator=g)
        with torch.no_grad():
            self.labels = TinyCNN(3).eval()(self.images).argmax(1).tolist()
        self.labels[0] = (self.labels[0] + 1) % 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _certify(out: Path, indices=range(6), sigmas=(0.25, 0.5)) -> dict:
    return certify_dataset(TinyCNN(3).eval(), Images(), sigmas=sigmas, n0=4, n=32, alpha=0.01, batch_size=32,
                           out_dir=out, indices=list(indices), progress=False)


def _rows(tsv: Path) -> list[list[str]]:
    """TSV rows without the ``time`` column (seconds differ between runs)."""
    lines = [ln.split("\t") for ln in tsv.read_text().splitlines()]
    t = lines[0].index("time")
    return [ln[:t] + ln[t + 1:] for ln in lines]


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _same_summary(a: dict, b: dict) -> bool:
    """Equal but for the time stamp (compared as JSON text: NaN entries equal each other)."""
    def text(d: dict) -> str:
        return json.dumps(_without(d, "updated"), sort_keys=True, default=str)

    return text(a) == text(b)


def _set_version(path: Path, version) -> None:
    data = json.loads(path.read_text())
    if version is None:
        data.pop("format", None)
        data.pop("version", None)
    else:
        data["version"] = version
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results") / "run"
    _certify(out)
    return out


def test_sidecars_and_summary_record_format_and_version(run_dir):
    for name in ("sigma_0.25.json", "sigma_0.50.json", "summary.json"):
        data = json.loads((run_dir / name).read_text())
        assert (data["format"], data["version"]) == (FORMAT, FORMAT_VERSION)


def test_the_one_reader_returns_typed_results_per_sigma(run_dir):
    run = load_run(run_dir, name="toy")
    summary = read_summary(run_dir)
    assert run.name == "toy" and [r.sigma for r in run.results] == [0.25, 0.5]
    for res in run.results:
        entry = results.summary_entry(summary, res.sigma)
        assert res.num_done == res.num_images == entry["num_done"] == 6
        assert res.columns["idx"].dtype == np.int64 and res.radii.dtype == np.float64
        assert res.clean_accuracy == pytest.approx(entry["clean_accuracy"])
        assert res.certified_accuracy([0.25])[0] == pytest.approx(entry["certified_accuracy"]["0.25"])
        assert res.acr == pytest.approx(entry["acr"])
        assert res.sidecar["n"] == 32 and res.sidecar["version"] == FORMAT_VERSION
    assert run.at(0.5) is run.results[1] and run.at(0.3) is None
    assert results.summary_sigmas(summary) == [0.25, 0.5]
    assert complete_sigmas(run_dir) == {0.25, 0.5}


def test_old_places_import_the_same_reader():
    """Report, experiments and users all read through smoothing.results; the old import places still work."""
    import smoothtransfer.reporting as reporting
    import smoothtransfer.reporting.tables as tables
    import smoothtransfer.smoothing.runner as runner

    assert reporting.load_run is tables.load_run is results.load_run
    assert reporting.read_tsv is tables.read_tsv is results.read_tsv
    assert reporting.Run is results.Run and reporting.SigmaResult is results.SigmaResult
    for name in ("read_rows", "summarize_dir", "merge_shards", "sigma_tag", "CERTIFY_COLUMNS", "PREDICT_COLUMNS",
                 "FORMAT", "FORMAT_VERSION", "SUMMARY_FILE", "PREDICT_SUMMARY_FILE"):
        assert getattr(runner, name) is getattr(results, name), name


def test_no_second_reader_or_writer_of_result_files():
    """Only smoothing/results splits TSV lines or defines the readers: one schema, one place to change it."""
    owners = SRC / "smoothing" / "results"
    readers = {"read_tsv", "read_rows", "load_run", "summarize_dir", "merge_shards", "read_summary"}
    found = []
    for f in sorted(SRC.rglob("*.py")):
        if owners in f.parents:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.lstrip("_") in readers:
                found.append(f"{f.relative_to(SRC)}: def {node.name}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "split" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "\t":
                found.append(f"{f.relative_to(SRC)}:{node.lineno} splits a TSV line")
    assert found == []


def test_unversioned_files_read_and_resume_as_before(run_dir, tmp_path):
    """Files written before the version was recorded (no ``format``/``version``) read identically, and a
    partial run of them resumes into the same rows as an uninterrupted run."""
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    for side in (*old.glob("sigma_*.json"), old / "summary.json"):
        _set_version(side, None)
    a, b = load_run(run_dir), load_run(old)
    for ra, rb in zip(a.results, b.results, strict=True):
        assert ra.sigma == rb.sigma and _without(ra.sidecar, "format", "version") == rb.sidecar
        assert all(np.array_equal(ra.columns[k], rb.columns[k]) for k in ra.columns)
    assert _same_summary(summarize_dir(old), summarize_dir(run_dir))
    assert complete_sigmas(old) == {0.25, 0.5}
    assert "version" not in read_summary(old)

    tsv = old / "sigma_0.25.tsv"
    tsv.write_text("\n".join(tsv.read_text().split("\n")[:3]) + "\n")  # header + 2 rows: an interrupted run
    summary = _certify(old)
    assert _rows(tsv) == _rows(run_dir / "sigma_0.25.tsv")
    side = json.loads((old / "sigma_0.25.json").read_text())
    assert side["version"] == FORMAT_VERSION and side["sessions"][-1]["resumed_after_rows"] == 2
    assert [e["num_done"] for e in summary["sigmas"]] == [6, 6]


@pytest.mark.parametrize("where", ["sidecar", "summary"])
def test_a_newer_format_version_is_refused_in_one_line(run_dir, tmp_path, where):
    new = tmp_path / "new"
    shutil.copytree(run_dir, new)
    _set_version(new / ("sigma_0.25.json" if where == "sidecar" else "summary.json"), FORMAT_VERSION + 1)
    calls = [lambda: read_summary(new), lambda: complete_sigmas(new)] if where == "summary" else [
        lambda: load_run(new), lambda: summarize_dir(new), lambda: _certify(new),
        lambda: _certify(new, sigmas=(1.0,))]  # another σ into the directory: its sidecars are compared
    for call in calls:
        with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}; this smoothtransfer reads "
                                            f"versions up to {FORMAT_VERSION}: upgrade") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (new / "sigma_1.00.json").exists()


@pytest.mark.parametrize("record, ok", [
    ({"format": FORMAT, "version": FORMAT_VERSION}, True),
    ({"kind": "certify"}, True),  # written before versions were recorded
    ({"format": "another-tool", "version": 7}, True),  # not ours to judge
    ({"format": FORMAT, "version": "2"}, False),
    ({"format": FORMAT, "version": 0}, False),
    ({"version": FORMAT_VERSION + 1}, False),
])
def test_check_version(record, ok):
    if ok:
        check_version(record, "x.json")
    else:
        with pytest.raises(UserError, match="x.json"):
            check_version(record, "x.json")


def test_committed_results_read_as_they_were_written():
    """The committed store (results/NAME/SCALE/RUN/certify) reads through the one reader, and its summaries
    are what summarize_dir computes from its TSVs and sidecars today."""
    dirs = sorted(ROOT.glob("results/*/*/*/certify"))
    if not dirs:
        pytest.skip("no committed certify results")
    for d in dirs:
        stored = read_summary(d)
        assert _same_summary(summarize_dir(d), stored), d
        run = load_run(d)
        assert [r.sigma for r in run.results] == results.summary_sigmas(stored)
        for res in run.results:
            entry = results.summary_entry(stored, res.sigma)
            assert res.num_done == entry["num_done"] and res.clean_accuracy == pytest.approx(entry["clean_accuracy"])
