"""Dataset certification runner: result files, summary, exact resumption, settings checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.runner import (
    CERTIFY_COLUMNS,
    PREDICT_COLUMNS,
    certify_dataset,
    image_seed,
    predict_dataset,
    read_rows,
    sigma_tag,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")
SHAPE = (3, 4, 4)


class TinyLinear(nn.Module):
    """A fixed linear 3-class classifier on 3x4x4 images: smoothing keeps most of its predictions."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(48, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 48, generator=g) * 0.5)
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


class TinyDataset:
    """In-memory stand-in for ``ImageDataset``: ``.images`` uint8 (N,C,H,W), ``.targets``, ``.classes``."""

    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = (torch.rand(n, *SHAPE, generator=g) * 255).to(torch.uint8)
        with torch.no_grad():
            self.targets = TinyLinear()(self.images.float() / 255).argmax(1)
        self.targets[::4] = (self.targets[::4] + 1) % 3  # some wrong labels
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i].float() / 255, int(self.targets[i])


KW = dict(n0=8, n=64, alpha=0.01, batch_size=32, seed=3, progress=False)


def _certify(out, sigmas=(0.25,), indices=None, **kw):
    args = {**KW, **kw}
    return certify_dataset(TinyLinear(), TinyDataset(), sigmas=list(sigmas), out_dir=out, indices=indices, **args)


def _rows_wo_time(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    t = lines[0].split("\t").index("time")
    return [[f for j, f in enumerate(ln.split("\t")) if j != t] for ln in lines]


def test_files_columns_and_summary(tmp_path):
    summary = _certify(tmp_path, sigmas=(0.25, 0.5), indices=list(range(0, 12, 2)))
    for s in ("0.25", "0.50"):
        tsv = tmp_path / f"sigma_{s}.tsv"
        lines = tsv.read_text().splitlines()
        assert lines[0].split("\t") == list(CERTIFY_COLUMNS)
        assert lines[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime")  # Cohen's analyze.py columns
        assert len(lines) == 1 + 6
        assert [int(ln.split("\t")[0]) for ln in lines[1:]] == [0, 2, 4, 6, 8, 10]
        side = json.loads((tmp_path / f"sigma_{s}.json").read_text())
        for key in ("sigma", "n0", "n", "alpha", "seed", "git_rev", "settings", "environment"):
            assert key in side
        assert side["n"] == 64 and side["n0"] == 8 and side["alpha"] == 0.01 and side["seed"] == 3
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert [e["sigma"] for e in on_disk["sigmas"]] == [0.25, 0.5]
    e = summary["sigmas"][0]
    for key in ("certified_accuracy", "acr", "abstain_rate", "clean_accuracy", "images_per_s",
                "samples_per_s", "n", "n0", "alpha", "sigma", "num_images", "max_certifiable_radius"):
        assert key in e, key
    assert e["num_images"] == e["num_done"] == 6 and e["complete"]
    radii = [float(k) for k in e["certified_accuracy"]]
    accs = list(e["certified_accuracy"].values())
    assert radii[:2] == [0.0, 0.25] and e["certified_accuracy"]["0"] == e["clean_accuracy"]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert radii[-1] >= 1.0 and radii[-1] > e["max_certifiable_radius"] and accs[-1] == 0.0
    assert on_disk["num_images"] == 6
    assert "radius 0 from CERTIFY" in on_disk["note"]
    # Rows agree with the model: abstentions have radius 0 and are wrong; radius <= the cap of n samples.
    cols = read_rows(tmp_path / "sigma_0.25.tsv")
    for pred, rad, cor, lab in zip(cols["predict"], cols["radius"], cols["correct"], cols["label"]):
        assert int(cor) == int(int(pred) == int(lab))
        assert float(rad) <= e["max_certifiable_radius"] + 1e-6
        if int(pred) == -1:
            assert float(rad) == 0.0 and int(cor) == 0


def test_resume_after_partial_line_is_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _certify(full, indices=list(range(6)))
    _certify(part, indices=list(range(6)))
    tsv = part / "sigma_0.25.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    # 3 complete rows + half of the 4th (a kill -9 in the middle of a write)
    tsv.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    _certify(part, indices=list(range(6)))
    assert _rows_wo_time(tsv) == _rows_wo_time(full / "sigma_0.25.tsv")
    assert len(_rows_wo_time(tsv)) == 1 + 6
    side = json.loads((part / "sigma_0.25.json").read_text())
    assert [s["resumed_after_rows"] for s in side["sessions"]] == [0, 3]


def test_resume_of_complete_run_is_a_noop_and_extending_max_appends(tmp_path):
    _certify(tmp_path, indices=[0, 1, 2])
    before = (tmp_path / "sigma_0.25.tsv").read_text()
    _certify(tmp_path, indices=[0, 1, 2])
    assert (tmp_path / "sigma_0.25.tsv").read_text() == before
    _certify(tmp_path, indices=[0, 1, 2, 3, 4])  # a larger --max continues the same selection
    other = tmp_path / "other"
    _certify(other, indices=[0, 1, 2, 3, 4])
    assert _rows_wo_time(tmp_path / "sigma_0.25.tsv") == _rows_wo_time(other / "sigma_0.25.tsv")


def test_killed_during_header_restarts_file(tmp_path):
    _certify(tmp_path, indices=[0, 1])
    tsv = tmp_path / "sigma_0.25.tsv"
    tsv.write_text("idx\tlab")
    _certify(tmp_path, indices=[0, 1])
    assert len(tsv.read_text().splitlines()) == 3


def test_mismatched_settings_raise_before_writing(tmp_path):
    _certify(tmp_path, indices=[0, 1, 2])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=r"holds results for other settings \(n=64 there, 128 now\).*--overwrite"):
        _certify(tmp_path, indices=[0, 1, 2], n=128)
    with pytest.raises(UserError, match="seed=3 there, 4 now"):
        _certify(tmp_path, indices=[0, 1, 2], seed=4)
    with pytest.raises(UserError, match="other settings"):
        _certify(tmp_path, indices=[0, 1, 2], identity={"checkpoint_sha256": "abc"})
    with pytest.raises(UserError, match="other images"):
        _certify(tmp_path, indices=[5, 6, 7])
    # a second σ in the same call must not be started either when the first one mismatches
    with pytest.raises(UserError, match="other settings"):
        _certify(tmp_path, sigmas=(0.5, 0.25), indices=[0, 1, 2], alpha=0.05)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _certify(tmp_path, indices=[0, 1], n=128, overwrite=True)
    assert len((tmp_path / "sigma_0.25.tsv").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "sigma_0.25.json").read_text())["n"] == 128


def test_foreign_files_are_not_touched(tmp_path):
    (tmp_path / "sigma_0.25.tsv").write_text("something else\n")
    with pytest.raises(UserError, match="without its sidecar"):
        _certify(tmp_path, indices=[0])
    assert (tmp_path / "sigma_0.25.tsv").read_text() == "something else\n"


@pytest.mark.parametrize("kw, msg", [
    (dict(sigmas=(0.0,)), "--sigma must be > 0"),
    (dict(sigmas=(0.25, 0.25)), "twice"),
    (dict(sigmas=(1e-300,)), "too small"),  # zero noise in float32: the certificate would certify nothing
    (dict(sigmas=(1e-9,)), "too small"),
    (dict(n0=100), "must not exceed"),
    (dict(n0=0), "--n0 must be >= 1"),
    (dict(alpha=1.0), "--alpha"),
    (dict(batch_size=0), "--batch-size"),
    (dict(indices=[]), "no images selected"),
    (dict(indices=[99]), "out of range"),
])
def test_bad_arguments(tmp_path, kw, msg):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=msg):
        _certify(out, **kw)
    assert not out.exists()


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, 0.25, 7) == image_seed(0, 0.25, 7)
    seeds = {image_seed(s, sig, i) for s in (0, 1) for sig in (0.25, 0.5) for i in range(50)}
    assert len(seeds) == 200
    assert image_seed(0, 0.25, 7, "predict") != image_seed(0, 0.25, 7)
    assert sigma_tag(0.25) == "0.25" and sigma_tag(1.0) == "1.00" and sigma_tag(0.125) == "0.125"


def test_per_sigma_model_factory_and_amp(tmp_path):
    built = []

    def factory(sigma):
        built.append(sigma)
        return TinyLinear()

    certify_dataset(factory, TinyDataset(), sigmas=[0.25, 0.5], out_dir=tmp_path, indices=[0, 1],
                    amp_dtype=torch.bfloat16, **KW)
    assert built == [0.25, 0.5]
    assert json.loads((tmp_path / "sigma_0.25.json").read_text())["amp"] == "bf16"


def test_predict_dataset(tmp_path):
    summary = predict_dataset(TinyLinear(), TinyDataset(), sigmas=[0.25], n=64, alpha=0.01, batch_size=32,
                              out_dir=tmp_path, indices=[0, 1, 2, 3], seed=0, progress=False)
    lines = (tmp_path / "predict_sigma_0.25.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(PREDICT_COLUMNS) and len(lines) == 5
    e = summary["sigmas"][0]
    assert 0 <= e["accuracy"] <= 1 and 0 <= e["abstain_rate"] <= 1 and e["num_done"] == 4
    assert (tmp_path / "predict_summary.json").exists() and not (tmp_path / "summary.json").exists()


def test_certify_fn_hook_sequential(tmp_path):
    seq = pytest.importorskip("smoothtransfer.smoothing.sequential")

    def fn(smooth, x, generator):
        return seq.certify_sequential(smooth, x, 8, 256, 0.01, 64, [0.0, 0.1, 0.2], n_first=32,
                                      generator=generator)

    summary = _certify(tmp_path, indices=[0, 1, 2], n=256, certify_fn=fn, certifier="sequential")
    cols = read_rows(tmp_path / "sigma_0.25.tsv")
    assert all(32 <= int(v) <= 256 for v in cols["n_used"])
    assert summary["sigmas"][0]["samples"] == sum(8 + int(v) for v in cols["n_used"])


def test_shards_merge_to_the_unsharded_run(tmp_path):
    from smoothtransfer.reporting import load_run

    _certify(tmp_path / "one", indices=list(range(7)))
    for k in range(3):
        _certify(tmp_path / "three", indices=list(range(7)), shard=(k, 3))
    assert (tmp_path / "three" / "sigma_0.25.shard2of3.tsv").exists()
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["sigmas"][0]
    three = json.loads((tmp_path / "three" / "summary.json").read_text())["sigmas"][0]
    assert three["num_images"] == three["num_done"] == 7 and three["complete"]
    for key in ("certified_accuracy", "acr", "clean_accuracy", "abstain_rate"):
        assert three[key] == one[key], key
    # per-image seeds: the same image gets the same certificate whichever shard certifies it
    merged = load_run(tmp_path / "three").results[0]
    single = load_run(tmp_path / "one").results[0]
    assert merged.columns["idx"].tolist() == list(range(7))
    for key in ("predict", "radius", "count"):
        assert merged.columns[key].tolist() == single.columns[key].tolist()
    with pytest.raises(UserError, match="split into 3 shard"):
        _certify(tmp_path / "three", indices=list(range(7)), shard=(0, 2))
    with pytest.raises(UserError, match="n=64 there, 32 now"):
        _certify(tmp_path / "three", indices=list(range(7)), shard=(1, 3), n=32)
    with pytest.raises(UserError, match="another shard"):
        _certify(tmp_path / "three", indices=list(range(7)), shard=(1, 3), n=32, overwrite=True)
    with pytest.raises(UserError, match="--shard"):
        _certify(tmp_path / "bad", indices=[0], shard=(3, 3))


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_runner import TinyLinear, TinyDataset, KW
    from smoothtransfer.smoothing.runner import certify_dataset

    class Slow(TinyLinear):
        def forward(self, x):
            time.sleep(0.02)
            return super().forward(x)

    certify_dataset(Slow(), TinyDataset(), sigmas=[0.25], out_dir=sys.argv[1], indices=list(range(12)), **KW)
""")


@pytest.mark.slow
def test_kill_9_and_resume(tmp_path):
    """A real SIGKILL mid-run, then a resume: same rows as an uninterrupted run, none lost or duplicated."""
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    tsv = out / "sigma_0.25.tsv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if tsv.exists() and len(tsv.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(tsv.read_text().splitlines()) - 1
    assert 3 <= done_before < 12
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "full")], env=env, check=True)
    assert _rows_wo_time(tsv) == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")


@pytest.mark.parametrize("workers, pack", [(1, 4), (2, 1), (2, 3)])
def test_workers_and_packing_change_no_result(tmp_path, workers, pack):
    """Forked CPU workers and packed batches give the rows of the plain one-image-at-a-time run."""
    plain, other = tmp_path / "plain", tmp_path / "other"
    _certify(plain, sigmas=(0.25, 0.5), indices=list(range(10)), pack=1)
    summary = _certify(other, sigmas=(0.25, 0.5), indices=list(range(10)), workers=workers, pack=pack)
    for tag in ("0.25", "0.50"):
        assert _rows_wo_time(other / f"sigma_{tag}.tsv") == _rows_wo_time(plain / f"sigma_{tag}.tsv")
    assert [e["workers"] for e in summary["sigmas"]] == [workers, workers]
    side = json.loads((other / "sigma_0.25.json").read_text())
    assert side["sessions"][-1]["workers"] == workers


def test_predict_packed_with_workers_matches_plain(tmp_path):
    kw = dict(sigmas=[0.5], n=64, alpha=0.01, batch_size=32, seed=1, progress=False, indices=list(range(9)))
    predict_dataset(TinyLinear(), TinyDataset(), out_dir=tmp_path / "a", pack=1, **kw)
    predict_dataset(TinyLinear(), TinyDataset(), out_dir=tmp_path / "b", pack=4, workers=2, **kw)
    assert _rows_wo_time(tmp_path / "a" / "predict_sigma_0.50.tsv") == \
        _rows_wo_time(tmp_path / "b" / "predict_sigma_0.50.tsv")


def test_resume_with_another_number_of_workers(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _certify(full, indices=list(range(8)))
    _certify(part, indices=list(range(3)), workers=1)
    _certify(part, indices=list(range(8)), workers=2, pack=2)  # the larger --max continues, in 2 workers
    assert _rows_wo_time(part / "sigma_0.25.tsv") == _rows_wo_time(full / "sigma_0.25.tsv")


def test_bad_workers_and_pack(tmp_path):
    with pytest.raises(UserError, match="--workers must be an integer >= 1"):
        _certify(tmp_path / "w", indices=[0], workers=0)
    with pytest.raises(UserError, match="--pack must be an integer >= 1"):
        _certify(tmp_path / "p", indices=[0], pack=0)
    assert not (tmp_path / "w").exists() and not (tmp_path / "p").exists()


def test_merge_shards_writes_one_tsv_in_index_order(tmp_path):
    from smoothtransfer.smoothing.runner import merge_shards

    _certify(tmp_path / "one", indices=list(range(7)))
    _certify(tmp_path / "two", indices=list(range(7)), shard=(0, 2))
    merge_shards(tmp_path / "two")
    assert not (tmp_path / "two" / "sigma_0.25.merged.tsv").exists()  # shard 1 missing: nothing merged yet
    _certify(tmp_path / "two", indices=list(range(7)), shard=(1, 2))
    summary = merge_shards(tmp_path / "two")
    assert _rows_wo_time(tmp_path / "two" / "sigma_0.25.merged.tsv") == \
        _rows_wo_time(tmp_path / "one" / "sigma_0.25.tsv")
    assert summary["sigmas"][0]["num_done"] == 7 and summary["sigmas"][0]["complete"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["sigmas"][0]["num_done"] == 7
    from smoothtransfer.reporting import load_run

    run = load_run(tmp_path / "two")  # the merged TSV repeats the shards' rows: counted once
    assert [(r.sigma, r.num_done) for r in run.results] == [(0.25, 7)]


# ------------------------------------------------------------------- concurrent writers, orphans, dead workers

_HELD_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_runner import TinyLinear, TinyDataset, KW
    from smoothtransfer.errors import UserError
    from smoothtransfer.smoothing.runner import certify_dataset

    out, hold, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Held(TinyLinear):
        def forward(self, x):
            while os.path.exists(hold):  # the test lets the run go on by deleting this file
                time.sleep(0.01)
            return super().forward(x)

    try:
        certify_dataset(Held(), TinyDataset(), sigmas=[0.25], out_dir=out, indices=list(range(12)), workers=workers,
                        **{{**KW, "pack": 2}})
    except UserError as e:
        print(f"error: {{e}}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def _start_held(tmp_path, out, workers=1):
    """A certify process (real, separate) that has written its TSV header and blocks until ``hold`` goes."""
    script = tmp_path / "held.py"
    script.write_text(_HELD_SCRIPT.format(tests=str(Path(__file__).parent)))
    hold = tmp_path / f"hold-{out.name}"
    hold.write_text("")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(hold), str(workers)], env=env)
    deadline = time.time() + 60
    while not (out / "sigma_0.25.tsv").exists():
        assert proc.poll() is None and time.time() < deadline, "the held run did not start"
        time.sleep(0.05)
    return proc, hold


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (its new parent may not reap it at once)


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_second_writer_on_the_same_out_is_refused(tmp_path):
    """Two certify processes on one --out and σ at once (two terminals, a retried job): one is refused with one
    line while the other holds the lock, whose rows are then neither duplicated nor interleaved."""
    out = tmp_path / "run"
    script = tmp_path / "held.py"
    script.write_text(_HELD_SCRIPT.format(tests=str(Path(__file__).parent)))
    hold = tmp_path / "hold"
    hold.write_text("")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(out), str(hold), "1"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 60  # both block on `hold` unless one is refused
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        refused = next((p for p in procs if p.poll() is not None), None)
        hold.unlink()
        codes = sorted(p.wait(timeout=120) for p in procs)
        err = refused.stderr.read() if refused is not None else ""
        assert codes == [0, 2] and "another process (pid" in err and "is writing" in err, (codes, err)
        assert err.count("\n") == 1, err
    finally:
        hold.unlink(missing_ok=True)
        _kill([p.pid for p in procs])
    _certify(tmp_path / "full", indices=list(range(12)))
    assert _rows_wo_time(out / "sigma_0.25.tsv") == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")
    assert not list(out.glob(".*.lock"))  # released and removed


def test_lock_dies_with_its_process(tmp_path):
    """kill -9 of the writer releases its lock (the OS does): a rerun resumes at once."""
    out = tmp_path / "run"
    proc, hold = _start_held(tmp_path, out)
    proc.kill()
    proc.wait(timeout=30)
    hold.unlink()
    _certify(out, indices=list(range(12)))
    _certify(tmp_path / "full", indices=list(range(12)))
    assert _rows_wo_time(out / "sigma_0.25.tsv") == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")


def _workers_of(proc, n: int = 2, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while len(kids := _children(proc.pid)) < n:
        assert proc.poll() is None and time.time() < deadline, "the worker processes did not start"
        time.sleep(0.05)
    return kids


def _wait_gone(pids, timeout: float = 20) -> list[int]:
    deadline = time.time() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.time() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of a `--workers 2` run must not leave its workers alive under PID 1 (they held ~450 MB each)."""
    proc, hold = _start_held(tmp_path, tmp_path / "run", workers=2)
    kids = []
    try:
        kids = _workers_of(proc)
        proc.kill()
        proc.wait(timeout=30)
        assert _wait_gone(kids) == []
    finally:
        hold.unlink(missing_ok=True)
        _kill([proc.pid, *kids])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_like_ctrl_c(tmp_path):
    """SIGTERM (kill, a scheduler's time limit) shuts down like Ctrl-C: KeyboardInterrupt in the parent, workers
    stopped, complete rows only; the rerun resumes to the uninterrupted result."""
    out = tmp_path / "run"
    proc, hold = _start_held(tmp_path, out, workers=2)
    kids = []
    try:
        kids = _workers_of(proc)
        proc.terminate()
        assert proc.wait(timeout=60) == 130  # the script maps KeyboardInterrupt to 130; SIGTERM's default is -15
        assert _wait_gone(kids) == []
    finally:
        hold.unlink(missing_ok=True)
        _kill([proc.pid, *kids])
    assert (out / "sigma_0.25.tsv").read_text().endswith("\n")
    _certify(out, indices=list(range(12)))
    _certify(tmp_path / "full", indices=list(range(12)))
    assert _rows_wo_time(out / "sigma_0.25.tsv") == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")


class _DiesInWorker(TinyLinear):
    """Killed by SIGKILL (as by the out-of-memory killer) when it runs in a forked worker on image 5."""

    def __init__(self, parent: int) -> None:
        super().__init__()
        self.parent = parent

    def forward(self, x):
        if os.getpid() != self.parent and getattr(self, "victim", False):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def test_a_worker_killed_by_the_oom_killer_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    import smoothtransfer.smoothing.runner as runner_mod

    model = _DiesInWorker(os.getpid())
    rows = runner_mod._Engine.rows

    def rows_and_die_on_5(self, idxs):
        model.victim = 5 in idxs
        return rows(self, idxs)

    monkeypatch.setattr(runner_mod._Engine, "rows", rows_and_die_on_5)
    with pytest.raises(UserError) as e:
        certify_dataset(model, TinyDataset(), sigmas=[0.25], out_dir=tmp_path, indices=list(range(12)), workers=2,
                        **{**KW, "pack": 1})
    msg = str(e.value)
    assert re.search(r"worker process \d+ was killed by SIGKILL \(the out-of-memory killer", msg), msg
    assert "rerun the same command to resume" in msg and "\n" not in msg
    monkeypatch.undo()
    done = len((tmp_path / "sigma_0.25.tsv").read_text().splitlines()) - 1
    assert done < 12
    _certify(tmp_path, indices=list(range(12)), workers=2)
    _certify(tmp_path / "full", indices=list(range(12)))
    assert _rows_wo_time(tmp_path / "sigma_0.25.tsv") == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")


# ------------------------------------------------------------------------------ one model's run per directory


def test_a_new_sigma_from_another_model_seed_or_images_is_refused(tmp_path):
    """summary.json and report show a directory as one run: a new σ must match the σ already there."""
    ck = {"checkpoint_sha256": "a" * 64, "dataset": "tiny", "split": "test"}
    _certify(tmp_path, indices=[0, 1, 2], identity=ck)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=r"holds σ=0.25 results of another checkpoint \(sha256 aaaaaaaaaaaa"):
        _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 2], identity={**ck, "checkpoint_sha256": "b" * 64})
    with pytest.raises(UserError, match=r"σ=0.25 results of other settings \(seed=3 there, 4 now\)"):
        _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 2], identity=ck, seed=4)
    with pytest.raises(UserError, match=r"σ=0.25 results for other images \(3 selected there, 4 now\)"):
        _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 2, 3], identity=ck)
    with pytest.raises(UserError, match=r"other images \(3 selected there, 3 now, not the same ones\)"):
        _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 3], identity=ck)
    with pytest.raises(UserError, match="another checkpoint"):  # --overwrite of a new σ does not make it one run
        _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 2], identity={**ck, "checkpoint_sha256": "b" * 64},
                 overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _certify(tmp_path, sigmas=(0.5,), indices=[0, 1, 2], identity=ck, n=128)  # same model: N may differ per σ
    _certify(tmp_path, sigmas=(0.5, 0.25), indices=[0, 1, 2, 3], identity=ck, n=128, overwrite=True)
    # all σ replaced together by another model: one run again
    _certify(tmp_path, sigmas=(0.25, 0.5), indices=[0, 1], identity={**ck, "checkpoint_sha256": "b" * 64},
             overwrite=True)


# ---------------------------------------------------------------------------- read-only and full disks


def _stamps(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir()}


def test_rerun_of_a_finished_run_writes_nothing(tmp_path):
    """summary.json was rewritten on every rerun, so a finished run could not be reprinted from a read-only
    folder; now nothing is written (no lock file either) unless something changed."""
    _certify(tmp_path, sigmas=(0.25, 0.5), indices=[0, 1, 2])
    before = _stamps(tmp_path)
    time.sleep(0.01)
    summary = _certify(tmp_path, sigmas=(0.25, 0.5), indices=[0, 1, 2])
    assert _stamps(tmp_path) == before
    assert [e["num_done"] for e in summary["sigmas"]] == [3, 3]


def test_disk_full_mid_run_is_one_line_and_keeps_the_rows(tmp_path, monkeypatch):
    import errno

    from smoothtransfer.smoothing.results.write import RowWriter

    write = RowWriter.write
    calls = []

    def write_until_full(self, line):
        calls.append(line)
        if len(calls) > 4:  # header + 3 rows fit
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "sigma_0.25.tsv"))
        write(self, line)

    monkeypatch.setattr(RowWriter, "write", write_until_full)
    with pytest.raises(UserError) as e:
        _certify(tmp_path, indices=list(range(6)))
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / 'sigma_0.25.tsv'}: No space left on device") and "\n" not in msg
    assert "rerun the same command to resume" in msg
    monkeypatch.undo()
    assert len((tmp_path / "sigma_0.25.tsv").read_text().splitlines()) == 4
    _certify(tmp_path, indices=list(range(6)))
    _certify(tmp_path / "full", indices=list(range(6)))
    assert _rows_wo_time(tmp_path / "sigma_0.25.tsv") == _rows_wo_time(tmp_path / "full" / "sigma_0.25.tsv")
