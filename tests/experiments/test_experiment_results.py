"""The experiment results store and tables: intervals, paper rows, best-over-σ view and computed verdicts.

Run directories are fabricated (certify TSV + sidecar summarised by the real ``summarize_dir``, a noise
profile, a training summary), so nothing is trained.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from smoothtransfer.errors import UserError
from smoothtransfer.experiments import collect, load_experiment, plan, render_tables, store, update_results_md
from smoothtransfer.experiments.tables import BEST_NOTE
from smoothtransfer.reporting.compare import CONTRADICTED, REPRODUCED, UNRESOLVED
from smoothtransfer.smoothing.runner import summarize_dir


def _spec(tables: list[dict]) -> dict:
    return {
        "name": "tiny", "title": "tiny",
        "paper_settings": "ResNet-152 on ImageNet-32, N=100k",
        "defaults": {
            "pretrain": {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet20"}, "objective": {"name": "clean"}},
            "certify": {"dataset": "cifar10", "split": "test", "sigmas": [0.25, 0.5], "n0": 10, "n": 100,
                        "alpha": 0.001, "skip": 20, "max": 200},
        },
        "scales": {"cpu-small": {}},
        "runs": {"good": {"stage": "pretrain", "evaluate": ["certify"], "label": "good model"},
                 "bad": {"stage": "pretrain", "evaluate": ["certify"], "label": "bad model"}},
        "tables": tables,
    }


def _fake_run(out, rid: str, correct: np.ndarray, radius: np.ndarray, sigmas=(0.25, 0.5)) -> None:
    """A finished run directory: train summary, certify TSV + sidecar per σ, summary.json, noise profile."""
    d = out / rid
    (d / "train").mkdir(parents=True)
    (d / "train" / "train_summary.json").write_text(json.dumps({"val_acc": 0.5}))
    (d / "train" / "run_info.json").write_text(json.dumps({"env": {"cpu": "Test CPU", "cpu_count": 2},
                                                            "amp": {"asked": "auto", "used": "bf16"}}))
    cdir = d / "certify"
    cdir.mkdir()
    n_img = len(correct)
    for s in sigmas:
        rows = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
        for i in range(n_img):
            rows.append(f"{i * 20}\t1\t{1 if correct[i] else 2}\t{radius[i] * s / 0.25:.4f}\t{int(correct[i])}\t0.1")
        (cdir / f"sigma_{s:.2f}.tsv").write_text("\n".join(rows) + "\n")
        (cdir / f"sigma_{s:.2f}.json").write_text(json.dumps({
            "kind": "certify", "sigma": s, "n0": 10, "n": 100, "alpha": 0.001, "seed": 0, "num_images": n_img}))
    (cdir / "summary.json").write_text(json.dumps(summarize_dir(cdir)))
    (d / "noise_profile").mkdir()
    (d / "noise_profile" / "noise_profile.json").write_text(json.dumps(
        {"accuracy": {"0": 0.9, "0.25": 0.6, "0.5": 0.4}, "n": n_img}))


@pytest.fixture
def grid(tmp_path, monkeypatch):
    """A two-run grid whose results exist in a run directory; 200 images; 'good' certifies 60%, 'bad' 20%."""
    from smoothtransfer.experiments import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_check_data", lambda exp: None)  # no datasets needed: nothing trains

    def make(tables: list[dict]):
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(_spec(tables), allow_unicode=True))
        return load_experiment(str(path), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "results")

    rng = np.random.default_rng(0)
    good = rng.random(200) < 0.6
    bad = good & (rng.random(200) < 0.33)  # a subset of good's images: strongly paired
    _fake_run(tmp_path / "runs", "good", good, np.full(200, 0.4))
    _fake_run(tmp_path / "runs", "bad", bad, np.full(200, 0.4))
    return make


def _table(**kw) -> dict:
    t = {"id": "t1", "title": "T1", "columns": ["base", "base_noisy", "clean", "cert:0.25", "cert:0.5"],
         "rows": [{"run": "good", "sigma": 0.25}, {"run": "bad", "sigma": 0.25}]}
    t.update(kw)
    return t


def test_cells_carry_intervals_and_base_accuracy(grid):
    exp = grid([_table()])
    text = render_tables(exp, collect(exp))
    row = next(line for line in text.splitlines() if line.startswith("| good model"))
    # base clean accuracy 90% of 200 images with its Clopper-Pearson interval; smoothed clean distinct
    assert "| 90.0 [85.0, 93.8] |" in row and "| 60.0 [" in row
    assert "base clean acc." in text and "smoothed clean" in text
    assert "Clopper-Pearson" in text


def test_paper_rows_and_settings(grid, tmp_path):
    exp = grid([_table(paper={"source": "Qiu et al., Table 1", "rows": [
        {"label": "Mixed → Clean", "values": {"base": 98.0, "cert:0.25": 71.4}}]})])
    results = collect(exp)
    text = render_tables(exp, results)
    assert "| _paper: Mixed → Clean_ | – | 98.0 | – | – | 71.4 | – |" in text
    assert "Qiu et al., Table 1" in text
    update_results_md(tmp_path / "RESULTS.md", exp, results)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Paper settings that differ from ours: ResNet-152" in md and "Test CPU (2 cores)" in md


def test_verdicts_are_computed_from_paired_intervals(grid):
    claims = [
        {"claim": "good beats bad", "a": {"run": "good", "sigma": 0.25}, "b": {"run": "bad", "sigma": 0.25},
         "metric": "cert:0.25", "expect": ">", "paper": "71.4 vs 10.1"},
        {"claim": "bad beats good", "a": {"run": "bad", "sigma": 0.25}, "b": {"run": "good", "sigma": 0.25},
         "metric": "cert:0.25", "expect": ">"},
        {"claim": "good equals itself", "a": {"run": "good", "sigma": 0.25}, "b": {"run": "good", "sigma": 0.5},
         "metric": "clean", "expect": "≈", "margin": 5},
        {"claim": "a radius nobody certifies", "a": {"run": "good", "sigma": 0.25},
         "b": {"run": "bad", "sigma": 0.25}, "metric": "cert:0.5", "expect": ">"},
    ]
    exp = grid([_table(claims=claims)])
    text = render_tables(exp, collect(exp))
    lines = [ln for ln in text.splitlines() if ln.startswith("- **")]
    assert lines[0].startswith(f"- **{REPRODUCED}** — good beats bad") and "paper: 71.4 vs 10.1" in lines[0]
    assert lines[1].startswith(f"- **{CONTRADICTED}** — bad beats good")
    assert lines[2].startswith(f"- **{REPRODUCED}** — good equals itself")
    assert lines[3].startswith(f"- **{UNRESOLVED}**")  # radius 0.4 < 0.5: both 0%


def test_best_over_sigma_view(grid):
    exp = grid([_table(best_over_sigma=True, columns=["base", "cert:0.25", "cert:0.75"],
                       rows=[{"run": "good"}])])
    text = render_tables(exp, collect(exp))
    # the σ=0.5 curve has radii 0.8 (scaled in the fixture), so it is the best at 0.75
    assert "@0.5" in text and BEST_NOTE in text


def test_store_reuses_complete_runs_without_their_run_directories(grid, tmp_path):
    exp = grid([_table()])
    assert sorted(r.id for r in plan(exp)) == ["bad", "good"]  # nothing stored yet
    for run in exp.runs.values():
        store.export_run(exp, run)
    assert plan(exp) == []
    before = render_tables(exp, collect(exp))
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: only the committed store is left
    assert plan(exp) == []
    assert render_tables(exp, collect(exp)) == before
    stored = {p.relative_to(tmp_path / "results").as_posix() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert "tiny/cpu-small/good/certify/sigma_0.25.tsv" in stored and not any(p.endswith(".pt") for p in stored)
    # other settings: the stored results no longer count as complete
    settings = tmp_path / "results" / "tiny" / "cpu-small" / "good" / "settings.json"
    s = json.loads(settings.read_text())
    s["evaluate"]["certify"]["n"] = 1000
    settings.write_text(json.dumps(s))
    assert [r.id for r in plan(exp)] == ["good"]


def test_bad_claims_are_refused(grid):
    with pytest.raises(UserError, match="unknown run 'nope'"):
        grid([_table(claims=[{"claim": "x", "a": {"run": "nope"}, "b": {"run": "bad"}}])])
    with pytest.raises(UserError, match="needs margin"):
        grid([_table(claims=[{"claim": "x", "a": {"run": "good"}, "b": {"run": "bad"}, "expect": "≈"}])])
    with pytest.raises(UserError, match="unknown table column"):
        grid([_table(columns=["bogus"])])


def test_changed_upstream_makes_stored_fine_tunes_stale(tmp_path, monkeypatch):
    """A stored fine-tune records the settings of the run it starts from: change the upstream, re-run both."""
    from smoothtransfer.experiments import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_check_data", lambda exp: None)
    spec = _spec([])
    spec["defaults"]["finetune"] = {"data": {"dataset": "cifar10"}, "objective": {"name": "clean"}}
    spec["runs"] = {"up": {"stage": "pretrain"}, "ft": {"stage": "finetune", "init": "up"}}
    path = tmp_path / "g.yaml"

    def load(epochs: int):
        spec["runs"]["up"]["epochs"] = epochs
        path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        return load_experiment(str(path), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "results")

    exp = load(1)
    rng = np.random.default_rng(1)
    _fake_run(tmp_path / "runs", "ft", rng.random(20) < 0.5, np.full(20, 0.3))
    (tmp_path / "runs" / "up" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "up" / "train" / "train_summary.json").write_text("{}")
    for run in exp.runs.values():
        store.export_run(exp, run)
    assert plan(exp) == []
    shutil.rmtree(tmp_path / "runs")
    assert sorted(r.id for r in plan(load(2))) == ["ft", "up"]


def test_a_retrained_upstream_reruns_every_stored_run_downstream_of_it(tmp_path, monkeypatch):
    """Fresh clone of a finished grid plus one new fine-tune: the upstream's weights are gone, so it trains
    again, and the stored fine-tunes of the *old* upstream run again too (else one table would pair a
    fine-tune of the new model with results of the old one); with the upstream's weights present, nothing
    but the new run runs."""
    from smoothtransfer.experiments import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_check_data", lambda exp: None)
    spec = _spec([])
    spec["defaults"]["finetune"] = {"data": {"dataset": "cifar10"}, "objective": {"name": "clean"}}
    path = tmp_path / "g.yaml"

    def load(runs: dict):
        spec["runs"] = runs
        path.write_text(yaml.safe_dump(spec, allow_unicode=True))
        return load_experiment(str(path), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "results")

    chain = {"up": {"stage": "pretrain"}, "ft": {"stage": "finetune", "init": "up"},
             "ft2": {"stage": "finetune", "init": "ft"}}
    exp = load(chain)
    rng = np.random.default_rng(1)
    for rid in ("ft", "ft2"):
        _fake_run(tmp_path / "runs", rid, rng.random(20) < 0.5, np.full(20, 0.3))
    (tmp_path / "runs" / "up" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "up" / "train" / "train_summary.json").write_text("{}")
    for run in exp.runs.values():
        store.export_run(exp, run)
    assert plan(exp) == []
    grown = load({**chain, "new": {"stage": "finetune", "init": "up"}})
    with monkeypatch.context() as m:  # the upstream's finished model still in its run directory: only the new run
        m.setattr("smoothtransfer.experiments.runner.has_final_weights", lambda e, rid: rid == "up")
        assert [r.id for r in plan(grown)] == ["new"]
    shutil.rmtree(tmp_path / "runs")  # fresh clone: up trains anew, and so does everything that started from it
    assert sorted(r.id for r in plan(grown)) == ["ft", "ft2", "new", "up"]


def test_a_config_key_added_since_a_run_was_stored_counts_at_its_default(tmp_path, monkeypatch):
    """A run stored before TrainConfig had a key (the mixed-noise grid predates ``compile``) stays complete
    while the grid leaves that key at its default, for itself and for runs that start from it; a stored
    value that differs from the grid's still makes it stale."""
    from smoothtransfer.experiments import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_check_data", lambda exp: None)
    spec = _spec([])
    spec["defaults"]["finetune"] = {"data": {"dataset": "cifar10"}, "objective": {"name": "clean"}}
    spec["runs"] = {"up": {"stage": "pretrain"}, "ft": {"stage": "finetune", "init": "up"}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    exp = load_experiment(str(path), "cpu-small", out=tmp_path / "runs", results_dir=tmp_path / "results")
    _fake_run(tmp_path / "runs", "ft", np.random.default_rng(1).random(20) < 0.5, np.full(20, 0.3))
    (tmp_path / "runs" / "up" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "up" / "train" / "train_summary.json").write_text("{}")
    for run in exp.runs.values():
        store.export_run(exp, run)
    assert plan(exp) == []

    def edit(rid: str, fn) -> None:
        f = tmp_path / "results" / "tiny" / "cpu-small" / rid / "settings.json"
        s = json.loads(f.read_text())
        fn(s)
        f.write_text(json.dumps(s))

    edit("up", lambda s: s["train"].pop("compile"))  # stored before the key existed
    edit("ft", lambda s: (s["train"].pop("compile"), s["needs"]["up"]["train"].pop("compile")))
    assert plan(exp) == []
    edit("ft", lambda s: s["train"].update(compile=True))  # a real difference
    assert store.is_complete(exp, exp.runs["up"]) and not store.is_complete(exp, exp.runs["ft"])
    edit("ft", lambda s: s["train"].update(compile=False, gone_key=1))  # a key the config no longer has
    assert not store.is_complete(exp, exp.runs["ft"])
    edit("ft", lambda s: s["train"].pop("gone_key"))
    assert store.is_complete(exp, exp.runs["ft"])


def test_a_partly_certified_run_is_not_complete(grid, tmp_path):
    """summary.json is written after every σ: a run stored while a σ is unfinished must run again."""
    exp = grid([_table()])
    for run in exp.runs.values():
        store.export_run(exp, run)
    assert plan(exp) == []
    summary = tmp_path / "results" / "tiny" / "cpu-small" / "good" / "certify" / "summary.json"
    s = json.loads(summary.read_text())
    s["sigmas"][-1]["complete"] = False
    summary.write_text(json.dumps(s))
    assert [r.id for r in plan(exp)] == ["good"]


def test_psnr_column_reads_the_denoiser_run_of_a_row(tmp_path):
    """A row certified through a grid's denoiser run shows that denoiser's PSNR at the row's σ (from its
    psnr.json in the store); a row without a denoiser shows '–'."""
    from smoothtransfer.experiments.tables import cell

    exp = load_experiment("ftcadis", scale="cpu", out=tmp_path / "runs", results_dir=tmp_path / "store")
    d = exp.results_dir / "dn" / "denoiser"
    d.mkdir(parents=True)
    (d / "psnr.json").write_text(json.dumps({"psnr": [
        {"sigma": 0.25, "denoised_db": 24.04, "noisy_db": 12.1, "gain_db": 11.94},
        {"sigma": 0.5, "denoised_db": 19.5, "noisy_db": 6.1, "gain_db": 13.4}]}))
    res = collect(exp)
    assert cell(res, {"run": "offshelf-dds", "sigma": 0.25}, "psnr") == "24.0 (input 12.1)"
    assert cell(res, {"run": "offshelf-dds", "sigma": 0.5}, "psnr") == "19.5 (input 6.1)"
    assert cell(res, {"run": "offshelf-dds", "sigma": 1.0}, "psnr") == "–"
    assert cell(res, {"run": "offshelf", "sigma": 0.25}, "psnr") == "–"  # Gaussian smoothing: no denoiser
    assert "denoiser PSNR dB" in render_tables(exp, res)  # Table 1a shows the column
