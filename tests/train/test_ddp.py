"""Two-process DDP smoke test on CPU (gloo), launched exactly as a user would:
``python -m torch.distributed.run --nproc_per_node=2 -m smoothtransfer.cli pretrain ...``.

A ``sitecustomize`` module put on the ranks' PYTHONPATH captures each rank's model (by wrapping
``smoothtransfer.train.loop.prepare``) and saves its final state_dict at exit, so the test can check that
both replicas ended with identical weights, equal to the checkpoint rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SITECUSTOMIZE = textwrap.dedent("""
    import atexit, os
    if os.environ.get("STX_DUMP_DIR") and "RANK" in os.environ:
        import torch
        import smoothtransfer.train.loop as _loop
        _captured = {}
        _orig_prepare = _loop.prepare

        def _prepare(cfg, device):
            prep = _orig_prepare(cfg, device)
            _captured["model"] = prep.model
            _save("init", prep.model)
            return prep

        def _save(tag, model):
            path = os.path.join(os.environ["STX_DUMP_DIR"], "%s%s.pt" % (tag, os.environ["RANK"]))
            torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)

        _loop.prepare = _prepare

        @atexit.register
        def _dump():
            if "model" in _captured:
                _save("final", _captured["model"])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_imagefolder(root: Path, n_classes: int = 3, per_class: int = 12, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(rng.normal(40 + 80 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_cli_module_has_main_guard():
    src = Path(__import__("smoothtransfer.cli", fromlist=["x"]).__file__).read_text()
    assert 'if __name__ == "__main__":' in src


def test_ddp_two_process_cpu_pretrain(tmp_path):
    data = _tiny_imagefolder(tmp_path / "data")
    out, dump, site = tmp_path / "run", tmp_path / "dump", tmp_path / "site"
    dump.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, SMOOTHTRANSFER_CACHE=str(tmp_path / "cache"), STX_DUMP_DIR=str(dump),
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "smoothtransfer.cli", "pretrain", "--dataset", f"imagefolder:{data}", "--model", "resnet20",
           "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--device", "cpu", "--amp", "none",
           "--threads", "1", "--no-progress", "--out", str(out), "--set", "checkpoint_every=0"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (out / "checkpoint.pt").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["n_train"] == 27
    summary = json.loads((out / "train_summary.json").read_text())
    (record,) = summary["history"]
    assert 0.0 <= record["val_acc"] <= 1.0 and np.isfinite(record["train_loss"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["train_state"]["finished"] and ckpt["epoch"] == 1

    # both replicas trained in lock-step: identical parameters, and rank 0's state is the checkpoint's.
    # (BatchNorm running stats -- resnet20's default norm -- are buffers that DDP broadcasts from rank 0 before
    # each forward; the last forward updates them locally, so they legitimately differ at the end.)
    r0 = torch.load(dump / "final0.pt", weights_only=True)
    r1 = torch.load(dump / "final1.pt", weights_only=True)
    assert r0.keys() == r1.keys() == ckpt["state_dict"].keys()
    assert ckpt["model_spec"]["norm"] == "batch"
    params = [k for k in r0 if "running_" not in k and "num_batches_tracked" not in k]
    assert any(k.endswith("conv1.weight") for k in params)
    for k in params:
        assert torch.equal(r0[k], r1[k]), k
    for k in r0:
        assert torch.equal(r0[k], ckpt["state_dict"][k]), k
    # ... although each rank built its model from another seed (so the agreement is DDP's doing), and the
    # weights did train
    i0 = torch.load(dump / "init0.pt", weights_only=True)
    i1 = torch.load(dump / "init1.pt", weights_only=True)
    assert any(not torch.equal(i0[k], i1[k]) for k in i0)
    assert any(not torch.equal(i0[k], r0[k]) for k in i0 if k.endswith("weight"))


def test_torchrun_certify_shards_and_merges(tmp_path):
    """``torchrun --nproc_per_node=2 -m smoothtransfer.cli certify``: each rank certifies its slice of the images
    (RANK/WORLD_SIZE, no --shard needed), rank 0 merges after a barrier; the merged rows equal a one-process run."""
    from smoothtransfer.models.checkpoint import save_checkpoint
    from smoothtransfer.models.factory import create_classifier

    data = _tiny_imagefolder(tmp_path / "data", n_classes=2, per_class=3, size=8)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", create_classifier("resnet20", num_classes=2, input_size=8),
                           classes=["class0", "class1"], dataset="tiny", config={})
    env = dict(os.environ, SMOOTHTRANSFER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    common = ["certify", "--checkpoint", str(ckpt), "--dataset", f"imagefolder:{data}", "--split", ".",
              "--sigma", "0.25", "--N0", "8", "--N", "40", "--batch-size", "16", "--device", "cpu", "--workers", "1",
              "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "smoothtransfer.cli", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "smoothtransfer.cli", *common, "--out", str(tmp_path / "one")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = tmp_path / "two"
    assert (two / "sigma_0.25.shard0of2.tsv").exists() and (two / "sigma_0.25.shard1of2.tsv").exists()

    def rows(p):
        return [r.split("\t")[:5] for r in p.read_text().splitlines()]

    assert rows(two / "sigma_0.25.merged.tsv") == rows(tmp_path / "one" / "sigma_0.25.tsv")
    summary = json.loads((two / "summary.json").read_text())["sigmas"][0]
    assert summary["num_done"] == summary["num_images"] == 6 and summary["complete"]
