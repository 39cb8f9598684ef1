"""Every bundled experiment grid (configs/experiments/*.yaml) resolves at every scale it declares.

Nothing is trained: ``load_experiment`` only resolves and validates (keys, runs, datasets). Needs the
datasets folder (``$SMOOTHTRANSFER_DATA`` or ``../shared/datasets``); skipped without it.
"""

from __future__ import annotations

import inspect
import os

import pytest
import yaml

from smoothtransfer.errors import UserError
from smoothtransfer.experiments import EVAL_KINDS, experiments_dir, load_experiment

CERTIFY_COLUMNS = ("clean", "acr", "abstain")


def _grids() -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(experiments_dir().glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        for scale in spec.get("scales") or {}:
            pairs.append((path.stem, scale))
    return pairs


GRIDS = _grids()


@pytest.fixture(scope="module")
def data_root() -> str:
    from smoothtransfer.data.datasets import resolve_data_root

    try:
        root = resolve_data_root(os.environ.get("SMOOTHTRANSFER_DATA"))
    except UserError:
        pytest.skip("datasets folder not found (set SMOOTHTRANSFER_DATA)")
    if not root.is_dir():
        pytest.skip(f"datasets folder {root} does not exist")
    return str(root)


def _load(name: str, scale: str, data_root: str, tmp_path, **kw):
    return load_experiment(name, scale, out=tmp_path / name / scale, data_root=data_root, **kw)


def test_bundled_experiments_found():
    names = {name for name, _ in GRIDS}
    assert {"demo", "mixed-noise-transfer", "robust-transfer-study", "ftcadis"} <= names


@pytest.mark.parametrize("name,scale", GRIDS, ids=[f"{n}-{s}" for n, s in GRIDS])
def test_grid_loads(name, scale, data_root, tmp_path):
    exp = _load(name, scale, data_root, tmp_path)
    assert exp.runs and exp.scale == scale

    # run order respects dependencies: init, fine-tuning denoiser and certify denoiser runs come first
    order = [r.id for r in exp.order()]
    assert sorted(order) == sorted(exp.runs)
    for i, rid in enumerate(order):
        run = exp.runs[rid]
        for dep in run.needs:
            assert dep in exp.runs, f"{rid} needs unknown run {dep}"
            assert order.index(dep) < i, f"{rid} runs before {dep}"
        if run.init:
            assert run.init in run.needs
            assert run.train.init.endswith(f"{run.init}/train/checkpoint.pt")

    # objective params are accepted by the objective (caught at load time only once training starts)
    import smoothtransfer.objectives  # noqa: F401  (registers every objective)
    from smoothtransfer.objectives.base import OBJECTIVES

    for run in exp.runs.values():
        if run.train is None:
            continue
        cls = OBJECTIVES.get(run.train.objective.name)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(run.train.objective.params) - accepted
        assert not unknown, f"run {run.id}: objective {run.train.objective.name} does not take {unknown}"
        for kind in run.evaluate:
            assert kind in EVAL_KINDS

    # every table row names a run that evaluates what its columns show
    for table in exp.tables:
        columns = table.get("columns", ["cert:0.25", "cert:0.5", "cert:0.75", "cert:1.0"])
        if table.get("headers"):
            assert len(table["headers"]) == len(columns), table.get("id")
        for row in table.get("rows", []):
            run = exp.runs[row["run"]]
            where = f"table {table.get('id')} row {row['run']}"
            for col in columns:
                if col in ("base", "base_noisy"):
                    # the base classifier on the certified images: at σ=0, and at the row's σ
                    assert "noise_profile" in run.evaluate, where
                    sigmas = [float(s) for s in run.evaluate["noise_profile"].get("sigmas", [])]
                    want = 0.0 if col == "base" else float(row.get("sigma", 0.25))
                    assert any(abs(s - want) < 1e-12 for s in sigmas), f"{where}: {col}"
                elif col in ("sa", "ra"):
                    assert "attack" in run.evaluate, where
                elif col.startswith("noise:"):
                    assert "noise_profile" in run.evaluate, where
                    sigmas = [float(s) for s in run.evaluate["noise_profile"].get("sigmas", [])]
                    assert any(abs(s - float(col.split(":")[1])) < 1e-12 for s in sigmas), f"{where}: {col}"
                elif col in CERTIFY_COLUMNS or col.startswith(("cert:", "certacc:")):
                    assert "certify" in run.evaluate, where
                    sigmas = [float(s) for s in run.evaluate["certify"]["sigmas"]]
                    assert any(abs(s - float(row.get("sigma", 0.25))) < 1e-12 for s in sigmas), \
                        f"{where}: σ={row.get('sigma')} is not certified (certify sigmas {sigmas})"
                else:
                    raise AssertionError(f"{where}: unknown column {col!r}")
        # the paper's numbers are data in the table's own columns, with their source
        paper = table.get("paper") or {}
        if paper:
            assert paper.get("source"), table.get("id")
        for prow in paper.get("rows") or []:
            assert prow.get("label"), table.get("id")
            assert set(prow.get("values") or {}) <= set(columns), f"table {table.get('id')} paper row {prow['label']}"
        # a claim compares two certified rows of this grid at a σ each certifies
        for claim in table.get("claims") or []:
            for side in ("a", "b"):
                run = exp.runs[claim[side]["run"]]
                sigmas = [float(s) for s in run.evaluate["certify"]["sigmas"]]
                assert float(claim[side].get("sigma", 0.25)) in sigmas, (table.get("id"), claim["claim"])


@pytest.mark.parametrize("name", sorted({n for n, _ in GRIDS}))
def test_only_keeps_dependencies(name, data_root, tmp_path):
    scale = next(s for n, s in GRIDS if n == name)
    full = _load(name, scale, data_root, tmp_path)
    last = full.order()[-1].id
    exp = _load(name, scale, data_root, tmp_path, only=[last])
    todo, want = [last], set()
    while todo:
        rid = todo.pop()
        want.add(rid)
        todo += full.runs[rid].needs
    assert set(exp.runs) == want
    for table in exp.tables:
        assert all(row["run"] in exp.runs for row in table.get("rows", []))


def test_robust_transfer_study_settings(data_root, tmp_path):
    exp = _load("robust-transfer-study", "cpu-small", data_root, tmp_path)
    runs = exp.runs
    # low-data downstream: 50 and 500 images per class, never capped by the scale's max_train
    for rid, k in [("cr-cr-es50", 50), ("cr-simclr-es500", 500), ("cr-scratch-es50", 50), ("at-at-es500", 500)]:
        assert runs[rid].train.data.dataset == "eurosat-32"
        assert runs[rid].train.data.shots_per_class == k and runs[rid].train.data.max_train is None
    assert runs["cr-scratch-es50"].stage == "pretrain" and runs["cr-scratch-es50"].init is None
    # mode: head in the YAML is the alias of fixed (last-layer fine-tuning), normalised in the config
    assert runs["head-cr-es50"].train.mode == "fixed" and runs["head-cr-es50"].train.objective.name == "clean"
    assert runs["at-at-c10"].evaluate["attack"]["attack"] == "apgd-l2"
    # the certified test images span every class of the (class-sorted) test splits
    for rid, n_test in [("cr-cr-es50", 2700), ("cr-cr-c10", 10000)]:
        c = runs[rid].evaluate["certify"]
        last = (min(c["max"], -(-n_test // c["skip"])) - 1) * c["skip"]
        assert last >= n_test * 0.9, (rid, c)


def test_ftcadis_settings(data_root, tmp_path):
    exp = _load("ftcadis", "cpu-small", data_root, tmp_path)
    runs = exp.runs
    assert runs["dn"].stage == "denoiser"
    assert runs["offshelf"].evaluate["certify"].get("denoiser") is None
    assert runs["offshelf-dds"].evaluate["certify"]["denoiser"].endswith("dn/denoiser")
    assert runs["offshelf-dds"].train == runs["offshelf"].train.__class__(
        **{**runs["offshelf"].train.__dict__, "out": runs["offshelf-dds"].train.out})
    for sigma, lbd in [(0.25, 1.0), (0.5, 2.0), (1.0, 4.0)]:
        tag = f"s{int(sigma * 100):03d}"
        ft = runs[f"ftcadis-{tag}"]
        assert ft.train.denoiser.endswith("dn/denoiser") and "dn" in ft.needs
        assert ft.train.objective.params["sigma"] == sigma and ft.train.objective.params["lbd"] == lbd
        assert ft.evaluate["certify"]["sigmas"] == [sigma]
        ce = runs[f"ce-{tag}"].train.objective.params
        assert ce["use_nh"] is False and ce["lbd"] == 0
        assert ft.train.objective.params["epsilon"] == 0.125  # the reference code's effective radius
    # Table 3's ablations at σ = 1.0, as in the paper
    for rid, key in [("ftcadis-s100-nonh", "use_nh"), ("ftcadis-s100-nomask", "use_mask")]:
        params = runs[rid].train.objective.params
        assert params[key] is False and params["sigma"] == 1.0 and params["lbd"] == 4.0
        assert runs[rid].evaluate["certify"]["sigmas"] == [1.0]
    table3 = next(t for t in exp.tables if t["id"] == "table3")
    assert {row["sigma"] for row in table3["rows"]} == {1.0}


def _tiny_spec(table: dict) -> dict:
    return {
        "name": "tiny", "title": "tiny",
        "defaults": {"pretrain": {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet20"},
                                  "objective": {"name": "clean"}}},
        "scales": {"cpu-small": {}, "gpu": {}},
        "runs": {"a": {"stage": "pretrain"}},
        "tables": [table],
    }


def test_table_key_typo_is_rejected(data_root, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny_spec({"id": "t", "rows": [{"run": "a"}], "discusion": "x"})))
    with pytest.raises(UserError, match="unknown key 'discusion'.*did you mean 'discussion'"):
        load_experiment(str(path), "cpu-small", out=tmp_path / "out", data_root=data_root)


def test_discussion_is_per_scale(data_root, tmp_path):
    from smoothtransfer.experiments import render_tables

    table = {"id": "t", "columns": ["clean"], "rows": [{"run": "a", "sigma": 0.25}],
             "discussion": {"cpu-small": "effect shows at this scale"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny_spec(table)))
    small = load_experiment(str(path), "cpu-small", out=tmp_path / "o1", data_root=data_root)
    gpu = load_experiment(str(path), "gpu", out=tmp_path / "o2", data_root=data_root)
    assert "effect shows at this scale" in render_tables(small, {})
    assert "effect shows" not in render_tables(gpu, {})


def test_tables_mark_radii_beyond_the_n_cap(data_root, tmp_path):
    """A radius above the largest one N can certify gets † and the table a footnote; others do not."""
    from smoothtransfer.experiments import render_tables
    from smoothtransfer.reporting.tables import CAP_NOTE

    table = {"id": "t", "columns": ["cert:0.5", "cert:0.75", "certacc:0.75"], "rows": [{"run": "a", "sigma": 0.25}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny_spec(table)))
    exp = load_experiment(str(path), "cpu-small", out=tmp_path / "o", data_root=data_root)
    summary = {"sigma": 0.25, "max_certifiable_radius": 0.6158, "acr": 0.1,
               "certified_accuracy": {"0": 0.27, "0.5": 0.14, "0.75": 0.0}}
    text = render_tables(exp, {"a": {"certify": {"sigmas": [summary]}}})
    assert "| (27.0)14.0 | (27.0)0.0† | 0.0† |" in text
    assert CAP_NOTE in text
    summary["max_certifiable_radius"] = 0.953
    text = render_tables(exp, {"a": {"certify": {"sigmas": [summary]}}})
    assert "†" not in text.replace(CAP_NOTE, "") and CAP_NOTE not in text


def test_missing_dataset_fails_before_any_run(tmp_path):
    """A data root without the grid's zips: one clear error at load time, nothing created."""
    empty = tmp_path / "data"
    (empty / "cifar10").mkdir(parents=True)
    with pytest.raises(UserError, match=r"missing '.*tiny-imagenet-32/train.zip' for tiny-imagenet-32"):
        load_experiment("demo", "quick", out=tmp_path / "out", data_root=str(empty))
    assert not (tmp_path / "out").exists()
