"""Every bundled experiment grid (configs/experiments/*.yaml) resolves at every scale it declares.

Nothing is trained: ``load_experiment`` only resolves and validates (keys, runs, datasets). Needs the
datasets folder (``$SMOOTHTRANSFER_DATA`` or ``../shared/datasets``); skipped without it.
"""

from __future__ import annotations

import inspect

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
        if run.init and run.stage == "evaluate":  # evaluates the init run's model: trains nothing itself
            assert run.init in run.needs and run.train is exp.runs[run.init].train
        elif run.init:
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
                elif col == "psnr":  # the row's denoiser's PSNR: '–' for rows without one (Gaussian smoothing)
                    assert any(r.stage == "denoiser" for r in exp.runs.values()), where
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


def _certified_images(c: dict, n_test: int) -> tuple[int, int]:
    """(number of test images, index of the last one) a certify/noise-profile section selects."""
    n = -(-n_test // c["skip"])
    if c.get("max", -1) not in (None, -1):
        n = min(n, c["max"])
    return n, (n - 1) * c["skip"]


def _claim_keys(exp) -> set[tuple]:
    return {(c["a"]["run"], float(c["a"]["sigma"]), c["b"]["run"], float(c["b"]["sigma"]), c["metric"])
            for t in exp.tables for c in t.get("claims") or []}


def _check_scale_claims(exp) -> None:
    """Every claim left at a scale compares two runs of that scale, at a σ each certifies."""
    for t in exp.tables:
        for c in t.get("claims") or []:
            for side in ("a", "b"):
                run = exp.runs[c[side]["run"]]
                assert float(c[side]["sigma"]) in [float(s) for s in run.evaluate["certify"]["sigmas"]]


def test_robust_transfer_study_cpu_scale(data_root, tmp_path):
    """The decisive CPU scale: Table 5 (CR pre-train → CR vs random init → CR on EuroSAT 50 and 500 per
    class) and Table 7 (clean last layer vs CR fine-tune), upstream on all 200 classes, >= 500 test images."""
    exp = _load("robust-transfer-study", "cpu", data_root, tmp_path)
    runs = exp.runs
    headline = ["cr-scratch-es50", "cr-cr-es50", "head-cr-es50", "cr-scratch-es500", "cr-cr-es500", "head-cr-es500",
                "cr-scratch-es50-long", "cr-scratch-es500-long"]
    assert set(runs) == {*headline, "pre-cr"}  # the rest of the grid is not run at this scale
    pre = runs["pre-cr"].train
    assert pre.data.dataset == "tiny-imagenet-32" and pre.data.max_classes is None and pre.data.max_train is None
    assert pre.objective.name == "consistency" and pre.objective.params["sigma"] == 0.5
    for rid in headline:
        run = runs[rid]
        assert run.train.data.dataset == "eurosat-32" and run.train.data.max_train is None
        c = run.evaluate["certify"]
        assert c["dataset"] == "eurosat-32" and c["sigmas"] == [0.5] and c["n"] >= 1000
        n, last = _certified_images(c, 2700)
        assert n >= 500 and last >= 2700 * 0.9, (rid, c)  # the class-sorted test split: every class
        npf = run.evaluate["noise_profile"]  # base accuracy on the certified images
        assert (npf["skip"], npf["max"]) == (c["skip"], c["max"]) and 0.0 in npf["sigmas"]
    for k in (50, 500):
        scratch, ft = runs[f"cr-scratch-es{k}"].train, runs[f"cr-cr-es{k}"].train
        assert scratch.data.shots_per_class == ft.data.shots_per_class == k
        # random init and CR fine-tune take the same optimiser steps on the same images
        assert (scratch.epochs, scratch.batch_size) == (ft.epochs, ft.batch_size)
        assert runs[f"head-cr-es{k}"].train.mode == "fixed" and runs[f"head-cr-es{k}"].init == "pre-cr"
        # the longer random-init baseline: the same run but for its epochs (the paper trains to a plateau)
        long = runs[f"cr-scratch-es{k}-long"].train
        assert long.epochs > scratch.epochs and long.data == scratch.data and long.objective == scratch.objective
        assert runs[f"cr-scratch-es{k}-long"].evaluate == runs[f"cr-scratch-es{k}"].evaluate
    _check_scale_claims(exp)
    claims = _claim_keys(exp)
    for k in (50, 500):
        assert (f"cr-cr-es{k}", 0.5, f"cr-scratch-es{k}", 0.5, "cert:0.5") in claims
        assert (f"head-cr-es{k}", 0.5, f"cr-cr-es{k}", 0.5, "cert:0.5") in claims
        assert (f"cr-cr-es{k}", 0.5, f"cr-scratch-es{k}-long", 0.5, "cert:0.5") in claims


def test_ftcadis_cpu_scale(data_root, tmp_path):
    """The decisive CPU scale: FT-CADIS vs the same classifier under plain denoised smoothing at σ = 0.25 and
    0.5, with an off-the-shelf classifier trained on all of CIFAR-10, >= 500 test images spanning every class."""
    exp = _load("ftcadis", "cpu", data_root, tmp_path)
    runs = exp.runs
    assert set(runs) == {"dn", "offshelf", "offshelf-dds", "ftcadis-s025", "ftcadis-s050"}
    assert runs["dn"].denoiser_args["kind"] == "diffusion" and runs["dn"].denoiser_args.get("max_train") is None
    off = runs["offshelf"].train
    assert off.data.dataset == "cifar10" and off.data.max_train is None and off.epochs >= 10
    for rid in ("offshelf", "offshelf-dds", "ftcadis-s025", "ftcadis-s050"):
        c = runs[rid].evaluate["certify"]
        n, last = _certified_images(c, 10000)
        assert n >= 500 and last >= 10000 * 0.9 and c["n"] >= 1000, (rid, c)
    dds = runs["offshelf-dds"].evaluate["certify"]
    for sigma in (0.25, 0.5):
        ft = runs[f"ftcadis-s{int(sigma * 100):03d}"]
        params = ft.train.objective.params
        assert (params["m"], params["steps"], params["epsilon"]) == (4, 4, 0.125)  # the paper's M, T, ε
        c = ft.evaluate["certify"]
        assert c["denoiser"] == dds["denoiser"] and sigma in dds["sigmas"]
        assert {k: c[k] for k in ("n", "n0", "alpha", "skip", "max", "seed", "amp")} == \
            {k: dds[k] for k in ("n", "n0", "alpha", "skip", "max", "seed", "amp")}
    _check_scale_claims(exp)
    claims = _claim_keys(exp)
    assert ("ftcadis-s025", 0.25, "offshelf-dds", 0.25, "cert:0.25") in claims
    assert ("ftcadis-s050", 0.5, "offshelf-dds", 0.5, "cert:0.5") in claims
    assert any(t.get("best_over_sigma") for t in exp.tables)


def test_compile_is_on_at_the_cpu_scales_and_set_turns_it_off(data_root, tmp_path):
    """The cpu scales train, denoise and certify under torch.compile; `--set compile=false --set
    denoiser.compile=false --set certify.compile=false` (the no-C++-compiler recipe in the YAML) turns every one
    off, and a denoiser override reaches denoiser runs only."""
    on = _load("ftcadis", "cpu", data_root, tmp_path)
    assert on.runs["dn"].denoiser_args["compile"] is True
    assert all(r.train.compile and r.evaluate["certify"]["compile"] for r in on.runs.values() if r.train)
    off = load_experiment("ftcadis", "cpu", out=tmp_path / "off", data_root=data_root,
                          overrides=["compile=false", "denoiser.compile=false", "denoiser.epochs=1",
                                     "certify.compile=false"])
    assert off.runs["dn"].denoiser_args["compile"] is False and off.runs["dn"].denoiser_args["epochs"] == 1
    assert not any(r.train.compile or r.evaluate["certify"]["compile"] for r in off.runs.values() if r.train)
    assert all(r.train.epochs == on.runs[k].train.epochs for k, r in off.runs.items() if r.train)
    with pytest.raises(UserError, match="dn"):
        load_experiment("ftcadis", "cpu", out=tmp_path / "bad", data_root=data_root,
                        overrides=["denoiser.epochz=1"])
    for name in ("robust-transfer-study", "demo"):
        scale = "quick" if name == "demo" else "cpu"
        assert all(r.train.compile for r in _load(name, scale, data_root, tmp_path).runs.values() if r.train)


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
