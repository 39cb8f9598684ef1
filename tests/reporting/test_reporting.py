"""Paper-style tables, TSV loading (ours and Cohen's), plots and the ``report`` command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from smoothtransfer.commands import report
from smoothtransfer.errors import UserError
from smoothtransfer.reporting import (
    certified_rows,
    certified_table,
    format_cell,
    load_run,
    markdown_table,
    plot_certified_accuracy,
    read_tsv,
)

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount\tn_used\tp_lower\n"


def _write_run(d, sigma, rows, n=1000, alpha=0.001, partial=""):
    """rows: (radius, correct, predict) per image."""
    d.mkdir(parents=True, exist_ok=True)
    tag = f"{sigma:.2f}"
    lines = [f"{i}\t0\t{p}\t{r}\t{c}\t0.5\t990\t{n}\t0.99\n" for i, (r, c, p) in enumerate(rows)]
    (d / f"sigma_{tag}.tsv").write_text(HEADER + "".join(lines) + partial)
    (d / f"sigma_{tag}.json").write_text(json.dumps({
        "kind": "certify", "sigma": sigma, "n0": 100, "n": n, "alpha": alpha, "seed": 0,
        "num_images": len(rows), "dataset": "cifar10", "split": "test"}))


ROWS = [(0.6, 1, 0), (0.2, 1, 0), (0.9, 0, 1), (0.0, 0, -1), (0.3, 1, 0)]


def test_format_cell():
    assert format_cell(0.72, 0.45) == "(72.0)45.0"
    assert format_cell(0.7234, 0.4512, digits=2) == "(72.34)45.12"
    assert format_cell(float("nan"), 0.1) == "(–)10.0"


def test_markdown_table_layout():
    md = markdown_table([{"a": "x", "b": 1.5}, {"a": "yy"}], ["a", "b"])
    lines = md.splitlines()
    assert lines[0].startswith("| a") and lines[1].startswith("|:") and lines[1].endswith(":|")
    assert "1.5" in lines[2] and "–" in lines[3]
    assert len({len(ln) for ln in lines}) == 1  # padded columns


def test_load_run_and_rows(tmp_path):
    _write_run(tmp_path / "runA", 0.25, ROWS, partial="5\t0\t0\t0.")
    _write_run(tmp_path / "runA", 0.5, ROWS[:2])
    run = load_run(tmp_path / "runA")
    assert run.name == "runA" and [r.sigma for r in run.results] == [0.25, 0.5]
    res = run.results[0]
    assert res.num_done == 5  # the partial last line is ignored
    np.testing.assert_allclose(res.certified_accuracy([0.0, 0.25, 0.5]), [0.6, 0.4, 0.2])
    assert res.acr == pytest.approx(1.1 / 5)
    rows = certified_rows([run], radii=[0.25, 0.5])
    assert rows[0]["0.25"] == "(60.0)40.0" and rows[0]["0.5"] == "(60.0)20.0"
    assert rows[0]["ACR"] == "0.220" and rows[0]["N"] == 1000 and rows[0]["σ"] == 0.25
    assert rows[1]["0.25"] == "(100.0)50.0"


def test_radius_beyond_n_cap_is_marked(tmp_path):
    _write_run(tmp_path / "r", 0.25, ROWS, n=100)  # N=100, α=0.001 caps the radius at 0.375
    rows = certified_rows([load_run(tmp_path / "r")], radii=[0.25, 0.5])
    assert not rows[0]["0.25"].endswith("†") and rows[0]["0.5"].endswith("†")


def test_read_cohen_format(tmp_path):
    f = tmp_path / "noise_0.50" / "test" / "sigma_0.50"
    f.parent.mkdir(parents=True)
    f.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.512\t1\t0:00:01.500000\n"
                 "20\t8\t-1\t0.0\t0\t1 day, 0:00:02\n")
    cols = read_tsv(f)
    assert cols["time"].tolist() == [1.5, 86402.0]
    assert cols["predict"].dtype == np.int64
    run = load_run(f)
    assert run.results[0].sigma == 0.5 and run.results[0].clean_accuracy == 0.5
    assert "(50.0)50.0" in certified_table([run], radii=[0.5])


def test_report_on_a_folder_of_cohen_files_without_tsv_suffix(tmp_path, capsys):
    d = tmp_path / "noise_0.25" / "test"
    d.mkdir(parents=True)
    head = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    (d / "sigma_0.25").write_text(head + "0\t3\t3\t0.512\t1\t0:00:01.500000\n1\t2\t-1\t0.0\t0\t0:00:01.2\n")
    (d / "sigma_0.50").write_text(head + "0\t3\t3\t0.9\t1\t0:00:01.5\n")
    (d / "sigma_notes").write_text("not results\n")  # a name that fits but no results header: ignored
    run = load_run(d)
    assert [r.sigma for r in run.results] == [0.25, 0.5] and [r.num_done for r in run.results] == [2, 1]
    assert report.run(_report_args([str(d), "--radii", "0.5"])) == 0
    assert "(50.0)50.0" in capsys.readouterr().out and (d / "report.md").exists()


@pytest.mark.parametrize("damage, msg", [
    ("text", r"sigma_0.25.tsv line 3: radius 'abc' is not a number"),
    ("short", r"sigma_0.25.tsv line 4 has 4 fields, the header has 9"),
    ("long", r"sigma_0.25.tsv line 2 has 10 fields, the header has 9"),
])
def test_report_refuses_a_damaged_tsv(tmp_path, damage, msg):
    """A field that is not a number, or a row with the wrong number of fields, is refused with the line number
    (it used to raise ValueError, or skip the row and silently change the table)."""
    _write_run(tmp_path / "a", 0.25, ROWS)
    tsv = tmp_path / "a" / "sigma_0.25.tsv"
    lines = tsv.read_text().split("\n")
    if damage == "text":
        lines[2] = lines[2].replace("\t0.2\t", "\tabc\t")
    elif damage == "short":
        lines[3] = "\t".join(lines[3].split("\t")[:4])
    else:
        lines[1] += "\textra"
    tsv.write_text("\n".join(lines))
    with pytest.raises(UserError, match=msg) as e:
        report.run(_report_args([str(tmp_path / "a")]))
    assert "\n" not in str(e.value) and not (tmp_path / "a" / "report.md").exists()


def test_load_run_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no sigma_"):
        load_run(tmp_path / "empty")


def test_plot_writes_png(tmp_path):
    _write_run(tmp_path / "a", 0.25, ROWS)
    _write_run(tmp_path / "b", 0.5, ROWS[:3])
    path = plot_certified_accuracy([load_run(tmp_path / "a"), load_run(tmp_path / "b")], tmp_path / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _report_args(argv):
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    return p.parse_args(argv)


def test_report_command(tmp_path, capsys):
    _write_run(tmp_path / "a", 0.25, ROWS)
    _write_run(tmp_path / "a", 0.5, ROWS)
    _write_run(tmp_path / "b", 0.25, ROWS[:2])
    assert report.run(_report_args([str(tmp_path / "a"), str(tmp_path / "b"), "--radii", "0.25", "0.5"])) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| run" in md and "(60.0)40.0" in md and "ACR" in md and "certified_accuracy.png" in md
    assert "(60.0)40.0" in printed
    assert md.count("\n| a ") == 2 and md.count("\n| b ") == 1
    png = tmp_path / "a" / "certified_accuracy.png"
    assert png.stat().st_size > 0
    out = tmp_path / "rep"
    assert report.run(_report_args([str(tmp_path / "b"), "--out", str(out), "--names", "mine"])) == 0
    assert (out / "report.md").exists() and (out / "certified_accuracy.png").stat().st_size > 0
    assert "| mine" in (out / "report.md").read_text()


def test_report_rerun_writes_nothing_and_unwritable_out_is_one_line(tmp_path, monkeypatch):
    """report.md and the plot were rewritten on every run: a rerun into a read-only folder failed."""
    import errno

    _write_run(tmp_path / "a", 0.25, ROWS)
    assert report.run(_report_args([str(tmp_path / "a")])) == 0
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert report.run(_report_args([str(tmp_path / "a")])) == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()} == stamps
    with pytest.raises(UserError, match=r"cannot write .*: Read-only file system; choose a writable folder") as e:
        report.run(_report_args([str(tmp_path / "a"), "--radii", "0.5"]))  # another table: must write
    assert "\n" not in str(e.value)


def test_report_bad_input_writes_nothing(tmp_path):
    _write_run(tmp_path / "a", 0.25, ROWS)
    with pytest.raises(UserError, match="no such file"):
        report.run(_report_args([str(tmp_path / "a"), str(tmp_path / "nope")]))
    with pytest.raises(UserError, match="--radii"):
        report.run(_report_args([str(tmp_path / "a"), "--radii", "-1"]))
    with pytest.raises(UserError, match="--names"):
        report.run(_report_args([str(tmp_path / "a"), "--names", "x", "y"]))
    assert not (tmp_path / "a" / "report.md").exists()
