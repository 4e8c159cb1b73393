"""`rxray report`: finds step outputs by manifest, renders every section, and links only figures that exist.

The fake run mirrors what each step writes (its manifest fields and file layout), built
with the steps' own helpers where they are cheap (the metrics dict, the channel-importance
table, the score table's columns); figures the steps draw are stand-in PNGs, since the
report only copies them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rxray import storage
from rxray.evaluate.treatment_map import MAP_FILES
from rxray.cli import main
from rxray.config import ConfigError, ReportConfig, load_config
from rxray import layout
from rxray.report import step_outputs
from rxray.evaluate.metrics import classification_metrics, roc_auc_interval
from rxray.report.page import report
from rxray.report.step_outputs import find_step_outputs
from rxray.outputs import write_manifest
from rxray.results import (CompareResult, EmbedResult, ExplainResult, FeaturesResult, FinetuneResult, IngestResult,
                           PretrainResult, ProbeResult, ScoreResult, SynthResult)

TREATMENTS = ["EMPTY", "IFN-beta", "IFN-gamma", "TNF-alpha"]
N_SITES = 150
DIM = 8
PANELS = ["panels/IFN-beta__HUVEC-1_1_B02_1.png", "panels/IFN-beta__HUVEC-1_1_B02_2.png",
          "panels/IFN-gamma__HUVEC-1_1_C03_1.png", "panels/IFN-gamma__HUVEC-1_1_C03_2.png"]
ALL_STEPS = ["ingest", "pretrain", "probe", "finetune", "embed", "features", "score", "compare", "explain"]


# --------------------------------------------------------------------------- a fake run, one writer per step


def _put_png(uri: str, seed: int = 0) -> None:
    """A small PNG standing in for a figure a step drew (the report copies it, never reads it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    sink = io.BytesIO()
    Image.fromarray(pixels).save(sink, format="PNG")
    storage.write_bytes(uri, sink.getvalue())


def _put_parquet(table: pa.Table, uri: str) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue())


def _site_metadata(n: int) -> pd.DataFrame:
    """n sites, 3 per well, one treatment per well, wells spread over 2 experiments x 3 plates."""
    rows = []
    for k in range(n):
        w = k // 3
        experiment, plate, well = ("HUVEC-1", "HUVEC-2")[w % 2], 1 + (w // 2) % 3, f"A{w:02d}"
        rows.append({"site_id": layout.make_site_id(experiment, plate, well, k % 3 + 1),
                     "well_id": layout.make_well_id(experiment, plate, well), "cell_type": "HUVEC",
                     "experiment": experiment, "plate": plate, "well": well, "site": k % 3 + 1,
                     "treatment": TREATMENTS[(w // 6) % len(TREATMENTS)], "treatment_conc": 1.0})
    return pd.DataFrame(rows)


def write_ingest(uri: str) -> None:
    storage.write_text(storage.join(uri, "_shards", "part-000000.json"), "{}")
    storage.write_text(storage.join(uri, "_rejects.csv"), "site_id,path,reason\n")
    write_manifest(uri, "ingest", {"source": "s3://rxrx2", "size": 64}, IngestResult(
        counts={"selected": N_SITES, "written": N_SITES - 2, "rejected": 2, "shards": 2, "shards_resumed": 0},
        timings={"plan": 0.2, "pipeline": 3.1, "finalize": 0.1, "total": 3.4},
        sites_per_second=44.0, channel_mean=[20.0, 30, 40, 25, 35, 15], channel_std=[5.0, 6, 7, 5, 6, 4],
        channel_names=layout.CHANNEL_NAMES, image_shape=[6, 64, 64], image_dtype="uint8"))


def write_synth(uri: str) -> None:
    storage.write_text(storage.join(uri, "metadata.csv"), "site_id\n")
    storage.write_bytes(storage.join(uri, "images", "HUVEC-1", "Plate1", "A01_s1_w1.png"), b"not listed")
    write_manifest(uri, "synth", {"out": uri},
                   SynthResult(counts={"sites": N_SITES, "pngs": 6 * N_SITES}, timings={"total": 5.0}))


def write_pretrain(uri: str) -> None:
    from rxray.train.epoch_log import METRICS_FILE

    assert METRICS_FILE == step_outputs.TRAINING_METRICS_FILE
    history = [{"epoch": e, "loss": 4.0 - 0.5 * e, "top1": 0.2 * e, "images_per_s": 90.0 + e, "steps": 3,
                "seconds": 1.5, "data_wait_s": 0.1} for e in range(1, 4)]
    storage.write_text(storage.join(uri, METRICS_FILE), "".join(json.dumps(h) + "\n" for h in history))
    storage.write_bytes(storage.join(uri, "simclr", "checkpoint_000003", "checkpoint.pt"), b"weights")
    write_manifest(uri, "pretrain", {"data": "shards", "epochs": 3}, PretrainResult(
        status="trained", epochs_completed=3, resumed_from=0, checkpoint=storage.join(uri, "simclr", "checkpoint_000003"),
        final_metrics=history[-1], timings={"fit": 6.0, "total": 7.0}))


def write_probe(uri: str) -> None:
    rows = [{"encoder": encoder, "task": task, "method": "logistic", "score": score, "roc_auc": 0.8,
             "f1_macro": 0.7, "accuracy": 0.7, "chance": chance, "n": 96, "groups": 4, "folds": 4}
            for task, chance in (("control", 0.5), ("treatment", 0.25))
            for encoder, score in (("trained", 0.8), ("random_init_seed0", 0.6), ("random_init_seed1", 0.65))]
    storage.write_text(storage.join(uri, "probe.csv"), pd.DataFrame(rows).to_csv(index=False))
    comparison = [{"task": task, "method": "logistic", "trained": 0.8, "random_init": [0.6, 0.65], "margin": 0.15,
                   "chance": chance} for task, chance in (("control", 0.5), ("treatment", 0.25))]
    write_manifest(uri, "probe", {"data": "shards", "model": "ssl"}, ProbeResult(
        counts={"sites": 96, "plates": 4}, comparison=comparison, timings={"embed": 2.0, "probes": 0.5}))


def write_finetune(uri: str, with_plots: bool) -> None:
    rng = np.random.default_rng(2)
    labels = ["EMPTY", "IFN-beta"] if with_plots else ["EMPTY", "IFN-beta", "IFN-gamma"]
    y_true = rng.integers(len(labels), size=40)
    scores = rng.dirichlet(np.ones(len(labels)), size=40)
    scores[np.arange(40), y_true] += 0.5
    scores /= scores.sum(axis=1, keepdims=True)
    metrics = classification_metrics([labels[i] for i in y_true], scores if len(labels) > 2 else scores[:, 1],
                                     labels)
    if len(labels) == 2:  # as rxray.train.predictions.write_evaluation adds it: two sites a well
        metrics["roc_auc_interval"] = roc_auc_interval(y_true == 1, scores[:, 1], np.arange(40) // 2)
    storage.write_text(storage.join(uri, "metrics.json"), json.dumps(metrics))
    if with_plots:
        for name in ("confusion_matrix.png", "pr_curve.png", "roc_curve.png"):
            _put_png(storage.join(uri, name))
        storage.write_text(storage.join(uri, "metrics.jsonl"),
                           "".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_f1": 0.5 + 0.1 * e}) + "\n"
                                   for e in range(1, 4)))
    config = {"task": "binary" if with_plots else "multiclass", "label_col": "treatment",
              "positive": "IFN-beta" if with_plots else None}
    write_manifest(uri, "finetune", config, FinetuneResult(task=config["task"],
                                                           timings={"fit": 4.0, "evaluate": 1.0, "total": 5.5}))


def write_embed(uri: str) -> None:
    from ray.data.extensions import ArrowTensorArray

    meta = _site_metadata(N_SITES)
    vectors = np.random.default_rng(3).normal(size=(N_SITES, DIM)).astype(np.float32)
    vectors[meta["treatment"].to_numpy() == "IFN-beta", 0] += 4.0
    table = pa.Table.from_pandas(meta, preserve_index=False)
    half = N_SITES // 2
    for index, rows in enumerate((slice(0, half), slice(half, N_SITES))):
        part = table.slice(rows.start, rows.stop - rows.start)
        part = part.append_column("embedding", ArrowTensorArray.from_numpy(vectors[rows]))
        _put_parquet(part, storage.join(uri, "sites", f"part-{index}.parquet"))
    write_manifest(uri, "embed", {"data": "shards", "model": "pretrain"}, EmbedResult(
        model={"uri": "pretrain/checkpoint.pt", "epoch": 3, "backbone": "resnet18", "stem": "adapt"},
        counts={"rows_in": N_SITES, "rows_out": N_SITES, "wells": None}, dim=DIM,
        layout={"sites": "sites", "wells": None, "embedding_column": "embedding"},
        timings={"embed": 2.0, "total": 2.5}, images_per_s=75.0))


def write_score(uri: str) -> list[str]:
    from rxray.batch.score import COLUMNS

    rng = np.random.default_rng(4)
    rows = []
    for correction in ("none", "center"):
        for treatment in TREATMENTS[1:]:
            row = {c: float(rng.uniform()) for c in COLUMNS}
            row.update(treatment=treatment, correction=correction, active=bool(treatment == "IFN-beta"),
                       status="ok", n_treated=12, n_control=12, n_plates=3, n_replicates=4)
            rows.append(row)
    frame = pd.DataFrame(rows)[COLUMNS]
    outputs = [storage.join(uri, "scores.parquet"), storage.join(uri, "scores.csv")]
    sink = io.BytesIO()
    frame.to_parquet(sink, index=False)
    storage.write_bytes(outputs[0], sink.getvalue())
    storage.write_text(outputs[1], frame.to_csv(index=False))
    write_manifest(uri, "score", {"embeddings": "embed"}, ScoreResult(
        counts={"input_sites": N_SITES}, outputs=outputs, timings={"load": 0.5, "score": 3.0, "write": 0.1}))
    return outputs


def write_features(uri: str) -> None:
    write_manifest(uri, "features", {"data": "shards"}, FeaturesResult(
        counts={"rows_in": N_SITES, "rows_out": N_SITES, "sites_without_cells": 0}, size=64,
        measurements=["sizeshape", "intensity"], stains=["DNA", "ER", "Actin", "RNA", "Mito", "Golgi"],
        features_measured=328, features_kept=140, sites_per_s=19.3, timings={"profile": 33.0, "total": 56.0}))


def write_compare(uri: str) -> None:
    rows = [{"representation": name, "dims": dims, "treatments_scored": 3, "active_treatments": active,
             "mean_map_annotated": 0.8, "map_same_moa_recall": recall, "map_same_moa_pairs": 1, "map_p_value": 0.2,
             "moa_top1": top1, "moa_p_value": 0.1, "probe_balanced_accuracy": None, "seconds_to_compute": 5.0,
             "source": name}
            for name, dims, active, recall, top1 in [("simclr", DIM, 1, 0.5, 0.5), ("random-init-0", DIM, 0, None, None),
                                                      ("cellprofiler", 140, 2, 1.0, 1.0)]]
    write_manifest(uri, "compare", {"embeddings": "emb"}, CompareResult(
        counts={"representations": 3}, correction="center", leaderboard=rows, outputs=["leaderboard.csv"],
        timings={"score_cellprofiler": 1.0}))


def write_explain(uri: str) -> None:
    from rxray.batch.attribution import channel_importance

    rng = np.random.default_rng(5)
    treatments = np.repeat(["IFN-beta", "IFN-gamma"], 4)
    shares = rng.dirichlet(np.ones(6), size=len(treatments))
    table = channel_importance(treatments, treatments, shares, np.zeros_like(shares), np.full(len(treatments), 0.8),
                               planted={"IFN-beta": 3, "IFN-gamma": 5})
    storage.write_text(storage.join(uri, "channel_importance.csv"), table.to_csv(index=False))
    _put_parquet(pa.Table.from_pandas(table, preserve_index=False), storage.join(uri, "channel_importance.parquet"))
    _put_png(storage.join(uri, "channel_importance.png"))
    for seed, path in enumerate(PANELS):
        _put_png(storage.join(uri, path), seed)
    storage.write_bytes(storage.join(uri, "heatmaps", "part-0.parquet"), b"never read")
    write_manifest(uri, "explain", {"data": "shards", "n": 4}, ExplainResult(
        counts={"targets": 2, "chosen": 8, "explained": 8, "panels": len(PANELS)},
        timings={"select": 0.1, "explain": 2.0, "importance": 0.1, "plots": 0.3}, images_per_s=4.0,
        importance_method="gradient x input", figures=["channel_importance.png", *PANELS],
        tables={"channel_importance": {"csv": "channel_importance.csv", "parquet": "channel_importance.parquet"}},
        layout={"heatmaps": "heatmaps", "panels": "panels"},
        planted={"ranked_first": 1, "with_planted_channel": 2, "treatments": {}, "planted_null": []}))


def build_run(root: str, steps=tuple(ALL_STEPS)) -> str:
    """A run folder (local or s3://) with the outputs of `steps` under arbitrary folder names."""
    writers = {"ingest": lambda: write_ingest(storage.join(root, "data", "shards")),
               "pretrain": lambda: write_pretrain(storage.join(root, "ssl")),
               "probe": lambda: write_probe(storage.join(root, "ssl-probe")),
               "finetune": lambda: (write_finetune(storage.join(root, "clf", "ifn-beta"), with_plots=True),
                                    write_finetune(storage.join(root, "clf", "multi"), with_plots=False)),
               "embed": lambda: write_embed(storage.join(root, "emb")),
               "features": lambda: write_features(storage.join(root, "cp")),
               "score": lambda: write_score(storage.join(root, "rf")),
               "compare": lambda: write_compare(storage.join(root, "board")),
               "explain": lambda: write_explain(storage.join(root, "cam"))}
    write_synth(storage.join(root, "data", "rxrx2"))
    for step in steps:
        writers[step]()
    return root


# --------------------------------------------------------------------------- reading the page back


class PageLinks(HTMLParser):
    """Every img src, a href and element id of a page, plus its text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def read_page(path: str) -> tuple[PageLinks, str]:
    """The parsed page and its raw HTML."""
    with open(path, encoding="utf-8") as handle:
        page = handle.read()
    parser = PageLinks()
    parser.feed(page)
    return parser, page


def section(page: str, step: str) -> str:
    """The HTML of one step's section (from its heading to the next)."""
    start = page.index(f'<h2 id="{step}">')
    end = page.find("<h2", start + 1)
    return page[start:end if end >= 0 else None]


def assert_links_resolve(out: str, parser: PageLinks) -> None:
    """Every image and link is relative and its target exists (fragments name an element)."""
    assert parser.images
    for target in parser.images + parser.links:
        if target.startswith("#"):
            assert target[1:] in parser.ids, target
            continue
        assert "://" not in target and not os.path.isabs(target), target
        path = os.path.join(out, target)
        assert os.path.isfile(path), target
        if target.endswith(".png"):
            with Image.open(path) as image:
                image.verify()


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> str:
    """A run with an output of every step (two finetune runs), built once for the module."""
    return build_run(str(tmp_path_factory.mktemp("report") / "run"))


def test_report_renders_and_links_every_figure(full_run, tmp_path):
    out = str(tmp_path / "report")
    result = report(load_config(ReportConfig, values={"run": full_run, "out": out, "max_points": 100,
                                                      "max_panels": 3}))

    assert result.report == os.path.join(out, "report.html")
    assert result.steps == ["synth"] + ALL_STEPS
    assert result.not_run == [] and result.problems == []
    parser, page = read_page(result.report)
    assert_links_resolve(out, parser)
    figures = sorted(os.listdir(os.path.join(out, "figures")))
    assert result.counts["figures"] == len(figures)
    assert sorted({os.path.basename(src) for src in parser.images}) == figures  # every figure is shown
    assert "not run" not in page

    # What each section must show.
    assert len([f for f in figures if f.startswith("embed-") and "pca" in f]) == 2
    assert "100 of 150 sites (seeded sample)" in page
    assert len([f for f in figures if f.startswith("finetune-clf_ifn-beta")]) == 4  # 3 copied PNGs + curves
    assert len([f for f in figures if f.startswith("finetune-clf_multi") and "confusion" in f]) == 1
    # The binary classifier's interval, in its section and in the Findings' classifier table; the multiclass has none.
    assert page.count("roc_auc 95% CI") == 2 and '&quot;low&quot;' not in page
    assert len([f for f in figures if "panels" in f]) == 3  # max_panels
    assert {"IFN-beta", "IFN-gamma"} <= {f.split("panels_")[1].split("__")[0] for f in figures if "panels" in f}
    assert any(f.startswith("pretrain-") for f in figures) and "timings.png" in figures
    assert any(f.startswith("score-") for f in figures) and any(f.startswith("ingest-") for f in figures)
    tables = os.listdir(os.path.join(out, "tables"))
    assert len(tables) == 3
    assert "+0.150" in section(page, "probe") or "0.15" in section(page, "probe")
    scores = pd.read_csv(os.path.join(out, "tables", [t for t in tables if t.startswith("score")][0]))
    assert len(scores) == 2 * (len(TREATMENTS) - 1)

    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert manifest["step"] == "report" and manifest["counts"]["figures"] == result.counts["figures"]
    # synth, ingest, pretrain, probe, 2 finetune, embed, features, score, compare, explain
    assert manifest["counts"]["step_outputs"] == 11
    assert any(f.startswith("compare-") for f in figures) and "140" in section(page, "features")


def test_findings_come_first_and_warn_when_a_check_fails(full_run, tmp_path):
    from rxray.report.findings import collect_findings, findings_lines

    out = str(tmp_path / "report")
    result = report(load_config(ReportConfig, values={"run": full_run, "out": out, "max_points": 100}))
    _, page = read_page(result.report)
    findings = section(page, "findings")
    assert page.index('<h2 id="findings">') < page.index('<h2 id="ingest">')
    assert "1 of 3 treatments active" in findings and "center correction" in findings
    assert "IFN-beta" in findings and "beats every random-init encoder" in findings
    assert 'class="problem"' not in findings  # every check passed: no warning
    assert findings.index("Which representation") < findings.index("treatments active")
    assert "Most active treatments found by: cellprofiler 2 of 3, simclr 1 of 3" in findings

    found = collect_findings(find_step_outputs(full_run))
    assert found["activity"]["active"] == ["IFN-beta"] and found["probe"]["beats_random_init"]
    assert [c["name"] for c in found["classifiers"]] == ["clf/ifn-beta", "clf/multi"]
    assert any(line.startswith("active treatments: 1 of 3") for line in findings_lines(found))

    weak = build_run(str(tmp_path / "weak"), steps=("probe", "score"))
    probe_manifest = json.loads(storage.read_text(storage.join(weak, "ssl-probe", "_manifest.json")))
    for row in probe_manifest["comparison"]:
        row["margin"] = -0.05
    storage.write_text(storage.join(weak, "ssl-probe", "_manifest.json"), json.dumps(probe_manifest))
    warnings = collect_findings(find_step_outputs(weak))["warnings"]
    assert any("does not beat every random-init encoder" in w for w in warnings)

    summary_uri = storage.join(weak, "rf", MAP_FILES["summary"])  # a score step's map summary, as it writes it
    summary = {"corrections": {"center": {"n_related": 9, "n_pairs": 36, "n_selected_pairs": 2, "recall_top": 0.1,
                                          "null_mean": 0.05}}}
    for p_floor, pairs, expected in (
            (0.001, 6, "does not recover known MoA relationships (p = 0.3, 6 same-MoA pairs)"),
            (0.06, 6, "too few related treatments to test the treatment map: its top 5% holds 2 of 36 pairs"),
            (0.001, 3, "too few related treatments to test the treatment map: 3 same-MoA pair(s) among the 9 active "
                       "treatments, fewer than the 5 the recall test needs")):
        summary["corrections"]["center"].update(p_value=0.3, p_floor=p_floor, n_same_moa_pairs=pairs)
        storage.write_text(summary_uri, json.dumps(summary))
        warnings = collect_findings(find_step_outputs(weak))["warnings"]
        assert sum("treatment map" in w for w in warnings) == 1 and any(expected in w for w in warnings), warnings

    missed = build_run(str(tmp_path / "missed"), steps=("finetune",))  # a good ranking, a cut above its positives
    finetune_uri = storage.join(missed, "clf", "ifn-beta", "_manifest.json")
    finetune_manifest = json.loads(storage.read_text(finetune_uri))
    finetune_manifest.update(task="binary", test={"f1": 0.0, "roc_auc": 1.0, "threshold": 0.953, "n": 20})
    storage.write_text(finetune_uri, json.dumps(finetune_manifest))
    warnings = collect_findings(find_step_outputs(missed))["warnings"]
    assert any("clf/ifn-beta ranks its test sites well (ROC-AUC 1.0) but its decision threshold (probability "
               "0.953) calls few of its positives (F1 0.0)" in w for w in warnings), warnings
    assert not any("clf/multi" in w for w in warnings)

    summary["corrections"]["center"].update(n_same_moa_pairs=6)
    summary["corrections"]["center"]["top_pairs"] = [  # the most similar pairs, as score writes them
        {"treatment_a": "IFN-beta", "treatment_b": "isoproterenol", "cosine": 0.96, "moa_a": "interferon",
         "moa_b": "GPCR", "same_moa": False},
        {"treatment_a": "thapsigargin", "treatment_b": "tunicamycin", "cosine": 0.88, "moa_a": "ER stress",
         "moa_b": "ER stress", "same_moa": True},
        {"treatment_a": "IFN-gamma", "treatment_b": "cmpd-0009", "cosine": 0.7, "moa_a": "interferon",
         "moa_b": None, "same_moa": None}]
    storage.write_text(summary_uri, json.dumps(summary))
    found = collect_findings(find_step_outputs(weak))
    assert ("most similar treatments: IFN-beta ~ isoproterenol 0.96 (two MoAs), thapsigargin ~ tunicamycin 0.88 "
            "(same MoA), IFN-gamma ~ cmpd-0009 0.70") in findings_lines(found)
    _, page = read_page(report(load_config(ReportConfig, values={"run": weak, "out": str(tmp_path / "r2")})).report)
    findings = section(page, "findings")
    assert "Most similar pairs" in findings and "isoproterenol" in findings and "GPCR" in findings


def test_partial_run_says_not_run_via_cli(tmp_path, capsys):
    run = build_run(str(tmp_path / "run"), steps=("ingest", "score"))
    out = str(tmp_path / "report")
    assert main(["report", "--run", run, "--out", out]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == ["synth", "ingest", "score"]
    assert result["not_run"] == ["pretrain", "probe", "finetune", "embed", "features", "compare", "explain"]
    parser, page = read_page(result["report"])
    assert_links_resolve(out, parser)
    for step in result["not_run"]:
        assert "not run" in section(page, step)
    for step in ("ingest", "score"):
        assert "not run" not in section(page, step)


def test_search_skips_bulk_folders_and_report_outputs(full_run, tmp_path, monkeypatch):
    full_run = shutil.copytree(full_run, tmp_path / "run")  # adds outputs: leave the shared run as it is
    full_run = str(full_run)
    listed: list[str] = []
    real_list = step_outputs.list_entries
    monkeypatch.setattr(step_outputs, "list_entries", lambda uri: listed.append(uri) or real_list(uri))
    earlier_report = os.path.join(full_run, "reports", "first")
    write_manifest(earlier_report, "report", {})
    excluded = os.path.join(full_run, "reports", "second")
    write_manifest(os.path.join(excluded, "nested"), "ingest", {})
    # A step's own outputs inside its folder (compare's score of each representation) are its parts, not the run's.
    write_manifest(os.path.join(full_run, "board", "representations", "cellprofiler", "score"), "score", {})
    outputs = find_step_outputs(full_run, exclude=excluded)
    assert sorted(o.step for o in outputs) == sorted(ALL_STEPS + ["finetune", "synth"])
    assert {o.relative for o in outputs if o.step == "finetune"} == {"clf/ifn-beta", "clf/multi"}
    bulk = {"images", "_shards", "sites", "heatmaps", "panels", "checkpoint_000003", "second"}
    searched = {part for uri in listed for part in os.path.relpath(uri, full_run).split(os.sep)}
    assert not bulk & searched, bulk & searched
    # ssl, ssl-probe, emb, cp, rf, board, cam; data/* and clf/* deeper
    assert len(find_step_outputs(full_run, depth=1)) == 7
    assert len(find_step_outputs(os.path.join(full_run, "rf"))) == 1  # the run URI may be one step's output


def test_broken_artifact_is_reported_not_fatal(tmp_path):
    run = build_run(str(tmp_path / "run"), steps=("score", "explain"))
    storage.write_bytes(os.path.join(run, "rf", "scores.parquet"), b"not parquet")
    out = str(tmp_path / "report")
    result = report(load_config(ReportConfig, values={"run": run, "out": out}))
    assert len(result.problems) == 1 and "score" in result.problems[0]
    parser, page = read_page(result.report)
    assert_links_resolve(out, parser)
    assert "could not render" in section(page, "score")
    assert "Mean attribution share" in section(page, "explain")


def test_run_without_outputs_is_a_config_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError):
        report(load_config(ReportConfig, values={"run": str(tmp_path / "empty"), "out": str(tmp_path / "r")}))
    assert main(["report", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "report.run" in capsys.readouterr().err


def test_run_on_s3_gives_a_local_folder_that_works(s3_bucket, tmp_path):
    run = build_run(f"{s3_bucket}/runs/one", steps=("finetune", "explain", "embed"))
    out = str(tmp_path / "report")
    result = report(load_config(ReportConfig, values={"run": run, "out": out, "max_panels": 2}))
    assert result.steps == ["synth", "finetune", "embed", "explain"] and result.problems == []
    parser, _ = read_page(result.report)
    assert_links_resolve(out, parser)
    assert len([src for src in parser.images if "panels" in src]) == 2


@pytest.mark.slow  # starts the session's local Ray for a real `rxray score`
def test_report_of_a_real_score_output(full_run, tmp_path, ray_local):
    from rxray.batch.score import score
    from rxray.config import ScoreConfig

    run = str(shutil.copytree(full_run, tmp_path / "run"))
    score(load_config(ScoreConfig, values={"embeddings": os.path.join(run, "emb"), "out": os.path.join(run, "rf"),
                                           "trees": 10, "folds": 2, "permutations": 20,
                                           "correct": ["none", "center"]}))
    out = str(tmp_path / "report")
    result = report(load_config(ReportConfig, values={"run": run, "out": out}))
    assert result.problems == []
    parser, page = read_page(result.report)
    assert_links_resolve(out, parser)
    assert any(os.path.basename(src).startswith("score-rf") for src in parser.images)
    assert "IFN-beta" in section(page, "score")


def test_findings_lines_say_when_no_two_treatments_share_an_moa():
    """A screen with no same-MoA pair has no recall (NaN, null in JSON): the summary says so instead of failing."""
    from rxray.report.findings import findings_lines

    benchmark = {"recall_top": None, "null_mean": None, "p_value": None, "n_annotated": 4, "top_pairs": []}
    assert findings_lines({"treatment_map": {"benchmark": benchmark}}) == [
        "treatment map: no two treatments share an MoA (4 annotated): nothing to benchmark"]


def test_a_classifier_line_gives_the_roc_auc_interval_and_the_wells_behind_it():
    """One held-out plate holds a handful of positive wells: the line says how many, and how far the ROC-AUC could move."""
    from rxray.report.findings import findings_lines

    interval = {"low": 0.875, "high": 1.0, "level": 0.95, "unit": "wells", "positive_groups": 3, "negative_groups": 8}
    classifier = {"name": "finetune/ifn-beta", "task": "binary", "positive": "IFN-beta", "split_by": "plate",
                  "f1": 0.8, "roc_auc": 0.969, "roc_auc_interval": interval, "compound_accuracy": None}
    assert findings_lines({"classifiers": [classifier]}) == [
        "classifier finetune/ifn-beta (held-out plates): test F1 0.8, ROC-AUC 0.969 (95% CI 0.875-1.0 over 3 IFN-beta "
        "and 8 negative wells)"]
    classifier.update(roc_auc_interval=None)  # a run from before the interval, or a multiclass task
    assert findings_lines({"classifiers": [classifier]}) == [
        "classifier finetune/ifn-beta (held-out plates): test F1 0.8, ROC-AUC 0.969"]


def test_the_probe_line_names_the_method_that_decides_the_verdict():
    """A tie by one method fails the verdict even where another wins: the console line shows the tie, not the win."""
    from rxray.report.findings import findings_lines

    rows = [{"method": "logistic", "trained": 0.6484, "random_init": [0.6484, 0.623], "margin": 0.0},
            {"method": "knn", "trained": 0.6934, "random_init": [0.6406, 0.627], "margin": 0.0527}]
    assert findings_lines({"probe": {"beats_random_init": False, "rows": rows}}) == [
        "SimCLR encoder does NOT beat random init (treated vs control; weakest method logistic: 0.648 vs 0.648)"]
    rows[0].update(trained=0.672, margin=0.024)
    assert findings_lines({"probe": {"beats_random_init": True, "rows": rows}}) == [
        "SimCLR encoder beats random init (treated vs control; weakest method logistic: 0.672 vs 0.648)"]


def test_findings_lines_open_with_the_mechanisms_of_the_unannotated_compounds():
    """The mechanism of each unannotated active compound comes first, then how often the vote is right."""
    from rxray.report.findings import findings_lines

    mechanisms = {"unannotated": [
        {"treatment": "oligomycin", "predicted_moa": "mitochondrial", "confidence": 0.71, "nearest_similarity": 0.53,
         "neighbours": "rotenone (mitochondrial, 0.53); FCCP (mitochondrial, 0.40); tunicamycin (ER stress, 0.20)",
         "status": "predicted"},
        {"treatment": "cmpd-0031", "predicted_moa": None, "confidence": None, "nearest_similarity": None,
         "neighbours": "", "status": "no similar annotated treatment"}],
        "inactive_unannotated": ["cmpd-0040"], "testable": True,
        "benchmark": {"top1": 0.8, "top3": 0.95, "n_evaluable": 20, "null_mean": 0.18, "p_value": 0.001},
        "retrieval": {"not_same_compound": 0.61, "not_same_compound_or_batch": 0.52}}
    lines = findings_lines({"mechanisms": mechanisms, "probe": None})
    assert lines == [
        "mechanism of oligomycin (unannotated): mitochondrial (vote share 0.71; nearest annotated, sphered cosine: "
        "rotenone 0.53, FCCP 0.40, tunicamycin 0.20)",
        "mechanism of cmpd-0031 (unannotated): none predicted (no similar annotated treatment)",
        "unannotated without a phenotype (no mechanism predicted): cmpd-0040",
        "MoA prediction, each annotated compound left out in turn: top-1 0.80, top-3 0.95 of 20 compounds (shuffled "
        "labels 0.18, p = 0.001); MoA mAP, not same compound 0.61; not same compound or batch 0.52"]
