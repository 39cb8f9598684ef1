"""What installing smoothtransfer does to a user's environment, and what a missing extra says.

``pip install smoothtransfer`` must not pin or cap packages the user's environment shares (it once pinned
``requests`` to 2.25.1 through torchattacks): the fast tests read the declared requirements (pyproject.toml
and the installed metadata of every dependency reachable from ``smoothtransfer[all]``); the slow test
installs ``requests>=2.32`` into a fresh virtual environment and asks pip what ``pip install -e .`` would
change there.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "torchvision", "timm", "numpy", "scipy", "tqdm", "pyyaml", "matplotlib", "pillow"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, list[str]]:
    project = PYPROJECT["project"]
    return {"core": project["dependencies"], **project["optional-dependencies"]}


def test_core_install_is_certification_and_training_only():
    groups = _declared()
    assert {_name(r) for r in groups["core"]} == CORE
    assert {_name(r) for r in groups["diffusion"]} == {"diffusers"}
    assert {_name(r) for r in groups["lora"]} == {"peft"}
    assert {_name(r) for r in groups["tensorboard"]} == {"tensorboard"}
    assert groups["attacks"] == []  # the attacks are our own code
    assert groups["all"] == ["smoothtransfer[diffusion,lora,tensorboard,attacks]"]
    assert "smoothtransfer[all]" in groups["dev"] and {"pytest", "ruff"} <= {_name(r) for r in groups["dev"]}


def test_no_declared_dependency_pins_requests_or_an_attack_library():
    for group, reqs in _declared().items():
        for req in reqs:
            assert _name(req) not in ("requests", "torchattacks"), (group, req)
            # lower bounds only: an upper bound on a shared package downgrades users' environments
            assert not re.search(r"(<|~=|==)", req), (group, req)


def _upper_bounded(spec) -> bool:
    return any(s.operator in ("<", "<=", "==", "~=", "===") for s in spec)


def test_no_installed_dependency_caps_requests():
    """Walk the installed dependency closure of smoothtransfer[all]: nothing in it caps requests."""
    requirements = pytest.importorskip("packaging.requirements")
    markers_env = {"extra": ""}
    seen: set[str] = set()
    groups = ("core", "diffusion", "lora", "tensorboard", "attacks")  # = smoothtransfer[all]
    todo = [requirements.Requirement(r) for g in groups for r in _declared()[g]]
    caps = []
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key == "requests" and _upper_bounded(req.specifier):
            caps.append(str(req))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist_reqs = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (an extra left out): nothing to inspect
        for text in dist_reqs:
            sub = requirements.Requirement(text)
            if sub.marker is None or sub.marker.evaluate(markers_env):
                todo.append(sub)
    assert not caps, f"these dependencies cap requests: {caps}"


def test_installed_metadata_matches_pyproject():
    """The editable install's metadata declares what pyproject.toml does (a stale install would hide a pin)."""
    try:
        installed = md.requires("smoothtransfer") or []
    except md.PackageNotFoundError:
        pytest.skip("smoothtransfer is not installed (tests run from the source tree)")
    assert not [r for r in installed if _name(r) in ("requests", "torchattacks")], installed


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("peft", "from smoothtransfer.models import create_classifier; from smoothtransfer.models.lora import "
                 "apply_lora; apply_lora(create_classifier('resnet20', 2, input_size=8))", "lora"),
        ("diffusers", "from smoothtransfer.models.denoisers import create_diffusion_unet; "
                      "create_diffusion_unet()", "diffusion"),
    ],
)
def test_missing_extra_names_the_pip_install(module, call, extra):
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"  # as if not installed: importing it raises ImportError
        "from smoothtransfer.errors import UserError\n"
        f"try:\n    {call}\nexcept UserError as e:\n    print(e)\nelse:\n    print('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and f'pip install "smoothtransfer[{extra}]"' in out, out


def test_certification_imports_no_optional_dependency():
    code = (
        "import sys\n"
        "for m in ('diffusers', 'peft', 'tensorboard', 'torchattacks'): sys.modules[m] = None\n"
        "import smoothtransfer.cli, smoothtransfer.smoothing, smoothtransfer.evaluation.attacks\n"
        "import smoothtransfer.models, smoothtransfer.objectives, smoothtransfer.train.loop\n"
        "import smoothtransfer.commands.certify, smoothtransfer.models.denoisers, smoothtransfer.models.lora\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_pip_install_leaves_a_current_requests_alone(tmp_path):
    """A fresh venv with requests>=2.32: ``pip install --dry-run -e .`` must not touch requests.

    Needs a package index (or the local wheel index pip is configured with); skipped when pip cannot get
    requests>=2.32 at all. Only the dry run's resolution is checked; nothing is installed but requests.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    got = subprocess.run([str(py), "-m", "pip", "install", "-q", "requests>=2.32"], capture_output=True,
                         text=True, env=env)
    if got.returncode != 0:
        pytest.skip(f"pip cannot install requests>=2.32 here: {got.stderr.strip().splitlines()[-1:]}")
    report = tmp_path / "report.json"
    dry = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          "-e", f"{ROOT}[all]"], capture_output=True, text=True, env=env, timeout=1800)
    assert dry.returncode == 0, dry.stderr[-2000:]
    plan = json.loads(report.read_text())
    touched = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in plan["install"]}
    assert "requests" not in touched, f"pip would change requests to {touched.get('requests')}"
    assert "torchattacks" not in touched
