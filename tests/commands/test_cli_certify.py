"""``smoothtransfer certify|predict``: end to end on a tiny checkpoint and ImageFolder, and bad input.

Bad input must fail with one line (``error: ...``, exit 2) before anything is created or overwritten.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from smoothtransfer.commands import certify, predict
from smoothtransfer.errors import UserError

SIZE = 8


def _imagefolder(root, classes, n_per_class=3, size=SIZE):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                arr = (rng.random((size, size, 3)) * 80 + 80 * k).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from smoothtransfer.models.checkpoint import save_checkpoint
    from smoothtransfer.models.factory import create_classifier

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = create_classifier("resnet20", num_classes=2, input_size=SIZE)
    ckpt = save_checkpoint(root / "ckpt.pt", model, classes=["cat", "dog"], dataset="tiny", config={})
    big = save_checkpoint(root / "big.pt", create_classifier("resnet20", num_classes=2, input_size=16),
                          classes=["cat", "dog"], dataset="tiny", config={})
    return {
        "root": root, "ckpt": str(ckpt), "big": str(big),
        "data": _imagefolder(root / "data2", ["cat", "dog"]),
        "data3": _imagefolder(root / "data3", ["a", "b", "c"]),
        "data_names": _imagefolder(root / "datan", ["car", "ship"]),
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def _base(setup, out, *extra, data="data", ckpt="ckpt"):
    return ["--checkpoint", setup[ckpt], "--dataset", setup[data], "--sigma", "0.25", "0.5", "--n0", "8",
            "--n", "32", "--batch-size", "16", "--max", "3", "--device", "cpu", "--out", str(out),
            "--no-progress", *extra]


def test_certify_end_to_end_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert certify.run(_args(certify, _base(setup, out))) == 0
    printed = capsys.readouterr().out
    assert "| run" in printed and "ACR" in printed and "images/s" in printed
    for tag in ("0.25", "0.50"):
        lines = (out / f"sigma_{tag}.tsv").read_text().splitlines()
        assert len(lines) == 4 and lines[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime")
        side = json.loads((out / f"sigma_{tag}.json").read_text())
        assert side["checkpoint"].endswith("ckpt.pt") and side["split"] == "test"
        assert len(side["checkpoint_sha256"]) == 64 and side["dataset"] == setup["data"]
    summary = json.loads((out / "summary.json").read_text())
    assert [e["num_done"] for e in summary["sigmas"]] == [3, 3]
    before = (out / "sigma_0.25.tsv").read_text()
    assert certify.run(_args(certify, _base(setup, out))) == 0  # resume of a complete run: nothing to do
    assert (out / "sigma_0.25.tsv").read_text() == before


def test_predict_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "pred"
    argv = [a for a in _base(setup, out) if a not in ("--n0", "8")]
    assert predict.run(_args(predict, argv)) == 0
    assert "accuracy %" in capsys.readouterr().out
    assert len((out / "predict_sigma_0.25.tsv").read_text().splitlines()) == 4


@pytest.mark.slow
def test_compile_flag_gives_the_same_certificates(setup, tmp_path):
    """certify --compile (torch.compile, ~1 min to compile on CPU): same predictions, radii equal up to the
    float rounding of compiled convolutions (which can move a vote only for a sample on a decision boundary)."""
    plain, comp = tmp_path / "plain", tmp_path / "comp"
    assert certify.run(_args(certify, _base(setup, plain))) == 0
    assert certify.run(_args(certify, _base(setup, comp, "--compile"))) == 0
    for tag in ("0.25", "0.50"):
        rows_p = [r.split("\t")[:4] for r in (plain / f"sigma_{tag}.tsv").read_text().splitlines()[1:]]
        rows_c = [r.split("\t")[:4] for r in (comp / f"sigma_{tag}.tsv").read_text().splitlines()[1:]]
        assert [r[:3] for r in rows_p] == [r[:3] for r in rows_c]
        assert [float(r[3]) for r in rows_p] == pytest.approx([float(r[3]) for r in rows_c], abs=0.05)


def test_sequential_flag(setup, tmp_path):
    pytest.importorskip("smoothtransfer.smoothing.sequential")
    out = tmp_path / "seq"
    argv = _base(setup, out, "--sequential", "--radius-grid", "0", "0.1")
    assert certify.run(_args(certify, argv)) == 0
    assert json.loads((out / "sigma_0.25.json").read_text())["certifier"] == "sequential"


def test_denoiser_flag(setup, tmp_path):
    from smoothtransfer.models.denoisers import MSEDenoiser

    den = tmp_path / "den"
    MSEDenoiser.create("tiny", channels=3, image_size=SIZE).save_pretrained(den)
    out = tmp_path / "dn"
    assert certify.run(_args(certify, _base(setup, out, "--denoiser", str(den), "--max", "1"))) == 0
    side = json.loads((out / "sigma_0.50.json").read_text())
    assert side["denoiser"] == str(den.resolve()) and len((out / "sigma_0.50.tsv").read_text().splitlines()) == 2


BAD = [
    (["--sigma", "0"], "--sigma must be > 0"),
    (["--sigma", "-0.5"], "--sigma must be > 0"),
    (["--sigma", "1e-300"], "--sigma 1e-300 is too small"),
    (["--n0", "64"], "--n0 (64) must not exceed --n (32)"),
    (["--n0", "0"], "--n0 must be >= 1"),
    (["--alpha", "0"], "--alpha must lie strictly between 0 and 1"),
    (["--alpha", "1.5"], "--alpha must lie strictly between 0 and 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--skip", "0"], "--skip must be >= 1"),
    (["--radius-grid", "0.1"], "--radius-grid only applies with --sequential"),
    (["--shard", "4/4"], "--shard must be K/NUM"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "many"], "--workers must be a positive integer or 'auto'"),
    (["--pack", "0"], "--pack must be >= 1"),
    (["--skip", "5", "--max", "-1", "--shard", "2/3"], "is empty"),
    (["--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--dataset", "no-such-dataset"], "unknown dataset"),
    (["--denoiser", "/nonexistent/denoiser"], "does not exist"),
]


@pytest.mark.parametrize("extra, msg", BAD)
def test_bad_input_fails_before_writing(setup, tmp_path, extra, msg):
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        certify.run(_args(certify, _base(setup, out, *extra)))
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_dataset_checkpoint_mismatches(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"checkpoint has 2 classes but dataset imagefolder:.* has 3"):
        certify.run(_args(certify, _base(setup, out, data="data3")))
    with pytest.raises(UserError, match="class 0 is 'cat' in the checkpoint but 'car' in the dataset"):
        certify.run(_args(certify, _base(setup, out, data="data_names")))
    with pytest.raises(UserError, match="has 3x8x8 images but the checkpoint's model takes 3x16x16"):
        certify.run(_args(certify, _base(setup, out, ckpt="big")))
    assert not out.exists()


def test_existing_results_are_not_overwritten(setup, tmp_path):
    out = tmp_path / "run"
    certify.run(_args(certify, _base(setup, out, "--max", "1")))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"holds results for other settings \(n=32 there, 40 now\)"):
        certify.run(_args(certify, _base(setup, out, "--max", "1", "--n", "40")))
    with pytest.raises(UserError, match="--n0"):  # bad input together with --overwrite: still nothing touched
        certify.run(_args(certify, _base(setup, out, "--max", "1", "--n0", "99", "--overwrite")))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_main_prints_one_line_and_exits_2(setup, tmp_path, capsys):
    from smoothtransfer.cli import main

    out = tmp_path / "out"
    code = main(["certify", *_base(setup, out, "--sigma", "-1")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --sigma must be > 0")
    assert not out.exists()


def test_torchrun_environment_selects_the_shard(setup, tmp_path, monkeypatch):
    args = _args(certify, _base(setup, tmp_path / "o"))
    assert certify.torchrun_shard(args) is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert certify.torchrun_shard(args) == (2, 4)
    args.shard = "1/3"  # an explicit --shard wins
    assert certify.torchrun_shard(args) == (1, 3)


def test_manual_shards_merge_when_the_last_one_finishes(setup, tmp_path):
    out = tmp_path / "sh"
    for k in (0, 1):
        assert certify.run(_args(certify, _base(setup, out, "--shard", f"{k}/2", "--workers", "1"))) == 0
    plain = tmp_path / "plain"
    assert certify.run(_args(certify, _base(setup, plain, "--workers", "2", "--pack", "2"))) == 0
    for tag in ("0.25", "0.50"):
        merged = [r.split("\t")[:5] for r in (out / f"sigma_{tag}.merged.tsv").read_text().splitlines()]
        single = [r.split("\t")[:5] for r in (plain / f"sigma_{tag}.tsv").read_text().splitlines()]
        assert merged == single and len(merged) == 4


def test_unwritable_out_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """A read-only (or full) disk printed a 27-line OSError traceback; now one line, exit 2, nothing lost."""
    import errno
    import os

    from smoothtransfer.cli import main

    ro = tmp_path / "ro"
    ro.mkdir()
    mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    code = main(["certify", *_base(setup, ro / "run", "--max", "1", "--workers", "1")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write {ro / 'run'}: Read-only file system"), err


def test_finished_certify_reruns_without_writing(setup, tmp_path, capsys, monkeypatch):
    """Rerunning a finished certify reprints its table and writes nothing, so it works in a read-only folder."""
    import tempfile

    out = tmp_path / "run"
    argv = _base(setup, out, "--max", "2", "--workers", "1")
    assert certify.run(_args(certify, argv)) == 0
    first = capsys.readouterr().out
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}

    def no_writes(*args, **kwargs):
        raise AssertionError("a finished run wrote a file")

    monkeypatch.setattr(tempfile, "mkstemp", no_writes)
    assert certify.run(_args(certify, argv)) == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stamps
    assert capsys.readouterr().out.split("\n")[:4] == first.split("\n")[:4]  # the same table


def test_sigterm_exits_like_ctrl_c(tmp_path):
    """SIGTERM (kill, a scheduler's limit) is handled like Ctrl-C: the clean-up runs, one line, exit 143."""
    import os
    import subprocess
    import sys

    code = ("import os, signal, sys, time\n"
            "import smoothtransfer.commands.report as report\n"
            "from smoothtransfer.cli import main\n"
            "def run(args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "report.run = run\n"
            "sys.exit(main(['report', 'x']))\n")
    src = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("terminated (SIGTERM): rerun the same command") and proc.stderr.count("\n") == 1


def test_new_sigma_with_another_checkpoint_is_refused(setup, tmp_path):
    """A new σ certified into an --out holding another checkpoint's results mixed two models in summary.json."""
    import torch

    from smoothtransfer.models.checkpoint import save_checkpoint
    from smoothtransfer.models.factory import create_classifier

    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.pt", create_classifier("resnet20", num_classes=2, input_size=SIZE),
                            classes=["cat", "dog"], dataset="tiny", config={})
    out = tmp_path / "run"
    one = ["--max", "2", "--workers", "1"]
    assert certify.run(_args(certify, [*_base(setup, out, *one), "--sigma", "0.25"])) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"holds σ=0.25 results of another checkpoint .*use another --out"):
        certify.run(_args(certify, [*_base(setup, out, *one), "--sigma", "0.5", "--checkpoint", str(other)]))
    with pytest.raises(UserError, match=r"σ=0.25 results of other settings \(seed=0 there, 1 now\)"):
        certify.run(_args(certify, [*_base(setup, out, *one), "--sigma", "0.5", "--seed", "1"]))
    with pytest.raises(UserError, match=r"σ=0.25 results for other images \(2 selected there, 3 now\)"):
        certify.run(_args(certify, [*_base(setup, out, "--max", "3", "--workers", "1"), "--sigma", "0.5"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("resolved", ["none", "bf16"])
def test_amp_auto_records_what_it_resolved_to(setup, tmp_path, monkeypatch, resolved):
    """--amp auto = bf16 on CUDA and AMX CPUs, fp32 elsewhere; the sidecar names the precision used."""
    import smoothtransfer.smoothing.jobs as jobs

    monkeypatch.setattr(jobs, "auto_amp", lambda device: resolved)
    out = tmp_path / resolved
    assert certify.run(_args(certify, _base(setup, out, "--amp", "auto"))) == 0
    assert json.loads((out / "sigma_0.25.json").read_text())["amp"] == resolved
