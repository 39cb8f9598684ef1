"""The README's Python API example (training, certifying a whole dataset, reporting) runs as written.

It runs against a tiny stand-in for CIFAR-10 (10 classes x 2 images of 32x32 px, the same zip layout as the
real one) in a fresh working directory, so it takes seconds; only the data are smaller.
"""

from __future__ import annotations

import re
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _tiny_cifar10(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "cifar10").mkdir(parents=True)
    for split in ("train", "test"):
        with zipfile.ZipFile(root / "cifar10" / f"{split}.zip", "w") as z:
            for k in range(10):
                for i in range(2):
                    buf = BytesIO()
                    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
                    z.writestr(f"class{k}/{i}.png", buf.getvalue())


def test_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    _tiny_cifar10(tmp_path / "data")
    monkeypatch.setenv("SMOOTHTRANSFER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = _python_api_example()
    assert "certify_run(CertifyConfig(" in code and "run_training(TrainConfig(" in code and "report(" in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "| run" in out and "report.md" in out
    cert = tmp_path / "runs" / "py-gaussian" / "certify"
    assert (cert / "sigma_0.25.tsv").exists() and (cert / "summary.json").exists() and (cert / "report.md").exists()
