"""Dataset certification runner: result files, summary, exact resumption, settings checks."""

from __future__ import annotations

import json
import os
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

SRC = str(Path(__file__).resolve().parents[1] / "src")
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
