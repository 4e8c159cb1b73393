"""RxRx2's size: score and report with the real 433 treatments, and the pieces of `rxray bench scale`."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest

from rxray import layout
from rxray.bench.scale import (PROSE_MARKER, BenchScaleConfig, growth, markdown, pipeline_document, plates_for,
                               subset_root, with_prose)
from rxray.config import ReportConfig, ScoreConfig, SynthConfig, load_config
from rxray.data.synth import metadata_csv
from rxray.data.synth_design import build_sites, build_treatments, stable_rng

FEATURES = 16


def _planted_embeddings(cfg: SynthConfig) -> tuple[pd.DataFrame, np.ndarray, dict[str, bool]]:
    """Metadata of an RxRx2-layout screen and embeddings with a plate offset and each treatment's planted effect.

    A treatment moves its sites along its own direction by its planted strength times
    the dose fraction; planted nulls do not move. Returns (metadata, features, null by treatment).
    """
    treatments = {t.name: t for t in build_treatments(cfg)}
    meta = pd.read_csv(io.StringIO(metadata_csv(build_sites(cfg, list(treatments.values())))),
                       dtype={"site_id": str}, keep_default_na=False)
    rng = stable_rng(cfg.seed, "features")
    X = rng.normal(0.0, 1.0, (len(meta), FEATURES))
    plates = meta["experiment"] + "/" + meta["plate"].astype(str)
    for plate in plates.unique():
        X[(plates == plate).to_numpy()] += stable_rng(cfg.seed, "plate", plate).normal(0.0, 0.7, FEATURES)
    for name, treatment in treatments.items():
        rows = (meta["treatment"] == name).to_numpy()
        if treatment.null:
            continue
        direction = stable_rng(cfg.seed, "direction", name).normal(0.0, 1.0, FEATURES)
        dose = meta.loc[rows, "treatment_conc"].astype(float).to_numpy() / treatment.concentrations[-1]
        X[rows] += 8.0 * abs(treatment.top_strength) * dose[:, None] * direction / np.linalg.norm(direction)
    return meta, X.astype(np.float32), {name: t.null for name, t in treatments.items()}


@pytest.fixture(scope="module")
def midsize_screen(tmp_path_factory):
    """RxRx2's layout on its first plate of each experiment, 2 sites per well: 5,520 sites, 433 treatments."""
    cfg = load_config(SynthConfig, values=dict(out="x", preset="rxrx2", plates=1, sites=2, missing_sites=0, seed=5))
    meta, X, nulls = _planted_embeddings(cfg)
    root = tmp_path_factory.mktemp("midsize")
    meta.to_csv(root / layout.METADATA_FILE, index=False)
    features = pd.DataFrame(X, columns=[f"feature_{i}" for i in range(FEATURES)])
    pd.concat([meta[["site_id"]], features], axis=1).to_csv(root / layout.EMBEDDINGS_FILE, index=False)
    return root, meta, nulls


@pytest.mark.slow  # 433 treatment tasks on the session's local Ray
def test_score_and_report_read_at_433_treatments(midsize_screen, tmp_path, ray_local, capfd):
    from rxray.batch.score import score
    from rxray.report.page import report

    root, meta, nulls = midsize_screen
    assert len(meta) == 5_520 and meta["treatment"].nunique() == 434
    run = tmp_path / "run"
    summary = score(load_config(ScoreConfig, values={
        "embeddings": str(root / layout.EMBEDDINGS_FILE), "out": str(run / "score"), "correct": ["center"],
        "trees": 10, "folds": 2, "permutations": 50, "map_permutations": 20}))
    assert "score: 433/433 treatment scores" in capfd.readouterr().err  # progress while the tasks run
    table = pd.read_parquet(run / "score" / "scores.parquet")
    assert len(table) == 433 and table["map"].notna().all()
    active = table.set_index("treatment")["active"]
    assert active[layout.TREATMENT_GROUPS["interferons"]].all()
    null_names = [name for name, null in nulls.items() if null]
    # Benjamini-Hochberg bounds the false share of the calls, not each null's chance of a call: with ~85% of the
    # treatments active a null is called at p <= ~0.04, so of 65 nulls 4 or more are called on ~30% of draws and 7
    # or more on ~2-4% (binomial). 10% catches anti-conservative p-values without failing a third of the draws.
    assert len(null_names) > 50 and active[null_names].mean() <= 0.10
    assert active[[n for n, null in nulls.items() if not null]].mean() > 0.5
    assert summary.summary["treatment_map"]["center"]["n_treatments"] == 433

    result = report(load_config(ReportConfig, values={"run": str(run), "out": str(tmp_path / "report")}))
    assert result.problems == []
    folder = tmp_path / "report"
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files]
    assert sum(sizes) < 8 * 2 ** 20 and os.path.getsize(result.report) < 2 ** 20
    page = open(result.report).read()
    assert "score-score-volcano" in page and "first 200 of 433 rows" in page
    assert "sorted by value (too many treatments to name)" in page  # no figure with a bar per treatment


def test_subset_root_keeps_whole_plates_in_screen_order(tmp_path):
    cfg = load_config(SynthConfig, values=dict(out="x", preset="rxrx2", wells=200, sites=1, missing_sites=0))
    full = tmp_path / "full"
    full.mkdir()
    (full / layout.METADATA_FILE).write_text(metadata_csv(build_sites(cfg, build_treatments(cfg))))
    (full / "images").mkdir()
    rows = subset_root(str(full), str(tmp_path / "third"), plates_for(1 / 8))
    subset = pd.read_csv(tmp_path / "third" / layout.METADATA_FILE, keep_default_na=False)
    assert rows == len(subset) == 3 * 200
    assert sorted(set(zip(subset["experiment"], subset["plate"]))) == [("HUVEC-1", 1), ("HUVEC-1", 2),
                                                                       ("HUVEC-1", 3)]
    assert os.path.islink(tmp_path / "third" / "images")
    assert (subset["treatment_conc"] == "").sum() == 3 * cfg.controls  # controls keep an empty treatment_conc


def test_growth_exponents_and_the_table():
    frame = pd.DataFrame([
        {"step": "score", "sites": 1000, "seconds": 10.0, "sites_per_second": 100.0, "peak_mib": 500,
         "driver_peak_mib": 200, "output_mib": 1.0},
        {"step": "score", "sites": 4000, "seconds": 40.0, "sites_per_second": 100.0, "peak_mib": 500,
         "driver_peak_mib": 200, "output_mib": 4.0},
        {"step": "embed", "sites": 1000, "seconds": 10.0, "sites_per_second": 100.0, "peak_mib": 400,
         "driver_peak_mib": 100, "output_mib": 1.0},
        {"step": "embed", "sites": 4000, "seconds": 160.0, "sites_per_second": 25.0, "peak_mib": 1600,
         "driver_peak_mib": 100, "output_mib": 4.0},
    ])
    grown = growth(frame).set_index("step")
    assert grown.loc["score", "time exponent"] == 1.0 and grown.loc["score", "memory exponent"] == 0.0
    assert grown.loc["embed", "time exponent"] == 2.0 and grown.loc["embed", "driver memory exponent"] == 0.0
    cfg = load_config(BenchScaleConfig, values={"fractions": [0.125, 1.0]})
    text = markdown(frame, {"seconds": 12.0, "sites": 131_953, "bytes": 2 ** 30}, cfg)
    assert "Steps growing faster than sites^1.25: embed." in text and "131,953 sites" in text
    document = pipeline_document(cfg, "run", "source")
    assert list(document) == ["pipeline", *cfg.steps] and document["pretrain"]["epochs"] == 1


def test_a_rerun_keeps_the_prose_written_under_the_tables(tmp_path):
    path = str(tmp_path / "scale.md")
    first = with_prose("# tables v1\n", path)
    assert first.endswith(PROSE_MARKER + "\n")
    (tmp_path / "scale.md").write_text(first + "\n## Projection\n\nby hand\n")
    second = with_prose("# tables v2\n", path)
    assert second.startswith("# tables v2") and second.endswith("## Projection\n\nby hand\n")
    assert "v1" not in second


def test_the_gpu_check_plans_a_valid_gpu_pipeline_and_refuses_a_machine_without_one(tmp_path, capsys):
    import torch
    import yaml

    from rxray.bench.gpu import SIZES
    from rxray.bench.gpu import pipeline_document as gpu_pipeline
    from rxray.cli import main
    from rxray.pipeline import load_pipeline, plan_pipeline

    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(gpu_pipeline(str(tmp_path / "run"), str(tmp_path / "data"),
                                                SIZES["gpu"]["pipeline"], gpu=True)))
    plan = plan_pipeline(load_pipeline(str(path)))
    on_gpu = {s.step for s in plan.steps if getattr(s.config, "gpu", False)}
    assert on_gpu == {"pretrain", "finetune", "embed", "explain"}
    if not torch.cuda.is_available():
        assert main(["bench", "gpu", "--workdir", str(tmp_path / "work")]) == 2
        assert "--tiny rehearses the same script on CPU" in capsys.readouterr().err
