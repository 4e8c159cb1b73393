"""The report's section per step: what each step output shows, gathered from its manifest and small files.

A section reads the output's manifest, its small tables and its per-epoch metrics,
draws the figures of :mod:`rxray.report.figures`, copies the PNGs and tables the
step wrote into the report's folder and returns the HTML of its block. Big inputs are
read in part: the embedding scatter reads ``max_points`` sampled rows and only the
columns it draws. A step's row in the registry (:mod:`rxray.steps`) names its section's title and
renderer (one of the functions here); :func:`renderer` finds it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from rxray import storage
from rxray.config import ReportConfig
from rxray.layout import CHANNEL_NAMES, CONTROL
from rxray.report.findings import (headline_correction, interval_summary, read_table, rounded_interval,
                                   score_table_uri)
from rxray.evaluate.plots import plot_confusion_matrix
from rxray.evaluate.probe_step import PROBE_TABLE
from rxray.report.folder import ReportFolder
from rxray.report.html import escape, figure_html, format_value, html_table, kv_table, link_html
from rxray.train.predictions import COMPOUNDS_FILE
from rxray.report.figures import (MAX_BAR_TREATMENTS, MAX_LEGEND, activity_volcano, channel_intensity_bars,
                                  embedding_pca_scatter, score_bars, similarity_heatmap, step_time_bars,
                                  training_curves)
from rxray.report.step_outputs import (StepOutput, list_entries, step_figures, step_timings, total_seconds,
                                         training_history)
from rxray.evaluate.treatment_map import MAP_FILES
from rxray.steps import get_step, pipeline_steps, resolve

# Score rows shown in the page; the full table is linked as CSV.
MAX_TABLE_ROWS = 200
SAMPLE_SEED = 0


def pipeline_position(step: str) -> tuple[int, str]:
    """Sort key putting steps in pipeline order (synth first, unknown steps last, by name)."""
    order = list(pipeline_steps())
    return (order.index(step) if step in order else len(order), step)


@dataclass
class Context:
    """What every section needs: the config, the output folder and the problems met so far."""

    cfg: ReportConfig
    folder: ReportFolder
    problems: list[str] = field(default_factory=list)
    highlight: list[str] = field(default_factory=list)  # the most active treatments, most active first


def ingest_html(output: StepOutput, ctx: Context) -> str:
    """Counts, throughput and per-channel intensity statistics of one ingest output."""
    result = output.result
    parts = [kv_table({**result.counts, "sites_per_second": result.sites_per_second,
                       "image_shape": result.image_shape})]
    if result.channel_mean and result.channel_std:
        figure = channel_intensity_bars(result.channel_mean, result.channel_std,
                                        result.channel_names or CHANNEL_NAMES)
        parts.append(figure_html(ctx.folder.save_figure(figure, f"ingest-{output.label}-channels"),
                                 "Per-channel intensity mean and standard deviation (normalisation statistics)"))
    return "".join(parts)


def pretrain_html(output: StepOutput, ctx: Context) -> str:
    """Loss, top-1 retrieval and images/s per epoch of one SimCLR run."""
    result = output.result
    parts = [kv_table({k: getattr(result, k) for k in ("status", "epochs_completed", "resumed_from", "checkpoint")})]
    history = training_history(output)
    if history:
        figure = training_curves(history, "SimCLR pretraining per epoch")
        parts.append(figure_html(ctx.folder.save_figure(figure, f"pretrain-{output.label}-curves"),
                                 "NT-Xent loss, top-1 positive retrieval and images/s per epoch", wide=True))
        parts.append(html_table(pd.DataFrame(history)))
    else:
        parts.append('<p class="not-run">no per-epoch metrics file</p>')
    return "".join(parts)


def probe_html(output: StepOutput, ctx: Context) -> str:
    """The probe comparison (balanced accuracy of the trained encoder, the random-init ones, the margin)."""
    result = output.result
    if not result.comparison:
        return '<p class="not-run">no probe comparison in the manifest</p>'
    frame = pd.DataFrame([{**row, "random_init": ", ".join(f"{b:.3f}" for b in row["random_init"])}
                          for row in result.comparison])
    counts = result.counts
    note = (f"<p>Balanced accuracy of plate-grouped probes on {counts.get('sites', '?')} sites of "
            f"{counts.get('plates', '?')} plates (held-out plates; margin = trained minus the best random-init "
            f"encoder).</p>")
    parts = [note, html_table(frame)]
    if PROBE_TABLE in output.files:
        link = ctx.folder.write_table(read_table(storage.join(output.uri, PROBE_TABLE)), f"probe-{output.label}")
        parts.append(f"<p>Every score: {link_html(link, 'CSV')}</p>")
    return "".join(parts)


def _class_names(metrics: dict[str, Any], n: int) -> list[str]:
    """The n class names a metrics dict records (labels, classes or per-class keys), else 0..n-1."""
    for key in ("labels", "classes", "class_names"):
        if isinstance(metrics.get(key), list) and len(metrics[key]) == n:
            return [str(v) for v in metrics[key]]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and len(per_class) == n:
        return [str(k) for k in per_class]
    return [str(k) for k in range(n)]


def _with_roc_auc_interval(headline: dict[str, Any], metrics: dict[str, Any], positive: str | None) -> dict[str, Any]:
    """The headline metrics with the ROC-AUC's bootstrap interval (binary tasks) in the row after the ROC-AUC."""
    interval = rounded_interval(metrics.get("roc_auc_interval"))
    summary = interval_summary(interval, positive)
    if summary is None:
        return headline
    rows = list(headline.items())
    rows.insert(list(headline).index("roc_auc") + 1 if "roc_auc" in headline else len(rows),
                (f"roc_auc {interval['level']:.0%} CI", f"{summary} (bootstrap)"))
    return dict(rows)


def finetune_html(output: StepOutput, ctx: Context) -> str:
    """Test metrics, per-class detail, confusion matrix, PR and ROC curves and training curves of one classifier."""
    config = output.config
    setup = {k: config.get(k) for k in ("task", "label_col", "positive", "negative", "freeze", "channels",
                                        "split_by") if k in config}
    parts = [kv_table(setup)] if setup else []
    metrics = json.loads(storage.read_text(storage.join(output.uri, "metrics.json"))) \
        if "metrics.json" in output.files else None
    figures = step_figures(output)
    if metrics is None:
        parts.append('<p class="not-run">no metrics.json</p>')
    else:
        headline = {k: metrics.get(k) for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc",
                                                "precision_macro", "recall_macro", "f1_macro", "n")
                    if k in metrics}
        parts.append("<h4>Test split</h4>" + kv_table(_with_roc_auc_interval(headline, metrics,
                                                                             config.get("positive"))))
        per_class = metrics.get("per_class")
        if isinstance(per_class, dict) and per_class and all(isinstance(v, dict) for v in per_class.values()):
            frame = pd.DataFrame([{"class": name, **values} for name, values in per_class.items()])
            parts.append(html_table(frame))
        compounds = metrics.get("compounds") or {}
        if compounds.get("n"):
            held_out = "held out of training" if config.get("split_by") == "treatment" else "on the test split"
            parts.append(f"<p>Per compound ({compounds['n']} {held_out}; a compound's call is the class of its "
                         f"highest mean probability over its sites): accuracy {format_value(compounds['accuracy'])}."
                         f"</p>")
            if COMPOUNDS_FILE in output.files:
                parts.append(html_table(read_table(storage.join(output.uri, COMPOUNDS_FILE))))
        if metrics.get("unlabelled"):
            parts.append("<p>Compounds without a label, as this classifier calls them:</p>"
                         + html_table(pd.DataFrame(metrics["unlabelled"])))
        matrix = metrics.get("confusion_matrix")
        if matrix is not None and not any("confusion" in p.lower() for p in figures):
            cm = np.asarray(matrix, dtype=np.int64)
            relative = ctx.folder.draw(f"finetune-{output.label}-confusion",
                                       lambda uri: plot_confusion_matrix(cm, _class_names(metrics, len(cm)), uri))
            parts.append(figure_html(relative, "Confusion matrix (test split), drawn from metrics.json"))
    for path in figures:
        relative = ctx.folder.copy_figure(storage.join(output.uri, path), f"finetune-{output.label}-{path}")
        parts.append(figure_html(relative, path))
    history = training_history(output)
    if history:
        figure = training_curves(history, "Classifier training per epoch")
        parts.append(figure_html(ctx.folder.save_figure(figure, f"finetune-{output.label}-curves"),
                                 "Per-epoch training and validation metrics", wide=True))
    return "".join(parts)


def sample_sites(sites_uri: str, columns: list[str], max_points: int,
                 seed: int = SAMPLE_SEED) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(metadata, embeddings) of at most ``max_points`` seeded-random sites, and the total site count.

    Reads only ``columns`` plus ``embedding`` and only the sampled rows' data, never the whole table.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    from rxray.batch.embed import EMBEDDING_COLUMN, embedding_matrix

    fs, path = storage.pyarrow_filesystem(sites_uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    total = dataset.count_rows()
    take = min(max_points, total)
    indices = np.sort(np.random.default_rng(seed).choice(total, size=take, replace=False))
    present = [c for c in columns if c in dataset.schema.names]
    table = dataset.take(pa.array(indices), columns=[*present, EMBEDDING_COLUMN])
    return table.select(present).to_pandas(), embedding_matrix(table.column(EMBEDDING_COLUMN)), total


def embed_html(output: StepOutput, ctx: Context) -> str:
    """PCA of a seeded sample of site embeddings, coloured by treatment and by plate."""
    from sklearn.decomposition import PCA

    from rxray.evaluate.profiles import plate_keys

    result = output.result
    parts = [kv_table({**result.counts, "dim": result.dim, "images_per_s": result.images_per_s,
                       "backbone": result.model.get("backbone"), "checkpoint": result.model.get("uri")})]
    sites_uri = storage.join(output.uri, result.layout.get("sites") or "sites")
    meta, vectors, total = sample_sites(sites_uri, ["treatment", "experiment", "plate"], ctx.cfg.max_points)
    if len(vectors) < 3:
        return "".join(parts) + '<p class="not-run">fewer than 3 sites: no PCA</p>'
    pca = PCA(n_components=2, random_state=SAMPLE_SEED)
    xy = pca.fit_transform(vectors)
    sampled = f"{len(vectors)} of {total} sites (seeded sample)" if len(vectors) < total else f"all {total} sites"
    # With more treatments than legend entries, the ones named are the most active (when a score ran).
    named = ctx.highlight if meta["treatment"].nunique() > MAX_LEGEND + 1 and ctx.highlight else None
    colourings = [("treatment", "treatment" if named is None else "the most active treatments",
                   meta["treatment"].to_numpy(), (CONTROL,), named)]
    if {"experiment", "plate"} <= set(meta.columns):
        colourings.append(("plate", "plate", plate_keys(meta).to_numpy(), (), None))
    for key, name, labels, grey, legend in colourings:
        figure = embedding_pca_scatter(xy, labels, name, grey, pca.explained_variance_ratio_, legend)
        parts.append(figure_html(ctx.folder.save_figure(figure, f"embed-{output.label}-pca-{key}"),
                                 f"PCA of {sampled}, coloured by {name}"))
    return "".join(parts)


def score_html(output: StepOutput, ctx: Context) -> str:
    """Per-correction summary, per-treatment RF F1 / ROC-AUC and mAP bars, and the score table."""
    uri = score_table_uri(output)
    if uri is None:
        return '<p class="not-run">no score table</p>'
    frame = read_table(uri)
    if "correction" not in frame.columns:
        frame["correction"] = "none"
    summary = frame.groupby("correction", sort=False).agg(
        treatments=("treatment", "nunique"),
        active=("active", "sum") if "active" in frame.columns else ("treatment", "size"),
        mean_f1=("f1", "mean"), mean_roc_auc=("roc_auc", "mean"), mean_map=("map", "mean")).reset_index()
    if "active" in frame.columns:
        summary["active_fraction"] = summary["active"] / summary["treatments"]
    parts = [html_table(summary)]
    metrics = [(c, t) for c, t in (("f1", "RF F1"), ("roc_auc", "RF ROC-AUC"), ("map", "mAP"))
               if c in frame.columns]
    if metrics:
        figure = score_bars(frame, metrics)
        many = frame["treatment"].nunique() > MAX_BAR_TREATMENTS
        caption = ("Random-Forest F1 and ROC-AUC (EMPTY vs treatment, plate-grouped folds) and mAP per treatment, "
                   + ("sorted by value (too many treatments to name)" if many else "one bar per correction"))
        parts.append(figure_html(ctx.folder.save_figure(figure, f"score-{output.label}-bars"), caption, wide=True))
    correction = headline_correction(frame["correction"])
    if correction is not None and {"map", "q_value"} <= set(frame.columns):
        fdr = float(output.config.get("fdr") or 0.05)
        figure = activity_volcano(frame[frame["correction"] == correction], fdr, correction)
        parts.append(figure_html(ctx.folder.save_figure(figure, f"score-{output.label}-volcano"),
                                 "Each treatment's mAP against its q-value; the most significant are named"))
    table_link = ctx.folder.write_table(frame, f"score-{output.label}-scores")
    shown = [c for c in ("treatment", "correction", "f1", "roc_auc", "map", "q_value", "active", "n_treated",
                         "n_replicates", "status") if c in frame.columns]
    ordered = frame.sort_values(["correction", "map"], ascending=[True, False]) if "map" in frame.columns \
        else frame
    note = f"all {len(frame)} rows" if len(frame) <= MAX_TABLE_ROWS else \
        f"first {MAX_TABLE_ROWS} of {len(frame)} rows by mAP"
    parts.append(f"<p>Score table ({escape(note)}; full table: {link_html(table_link, 'CSV')})</p>")
    parts.append(html_table(ordered[shown].head(MAX_TABLE_ROWS)))
    parts.append(treatment_map_html(output, ctx))
    return "".join(parts)


def treatment_map_html(output: StepOutput, ctx: Context) -> str:
    """The clustered treatment similarity heatmap of the headline correction, and each treatment's neighbours."""
    if MAP_FILES["similarity"] not in output.files or MAP_FILES["clusters"] not in output.files:
        return ""
    clusters = read_table(storage.join(output.uri, MAP_FILES["clusters"]))
    correction = headline_correction(clusters["correction"])
    if correction is None:
        return ""
    shown = clusters[clusters["correction"] == correction].sort_values("leaf_order")
    if "related" in shown and shown["related"].any():  # the map relates active treatments only
        shown = shown[shown["related"].astype(bool)]
    order = shown["treatment"].tolist()
    pairs = read_table(storage.join(output.uri, MAP_FILES["similarity"]))
    pairs = pairs[pairs["correction"] == correction]
    matrix = pairs.pivot(index="treatment_a", columns="treatment_b", values="cosine").reindex(index=order,
                                                                                               columns=order)
    figure = similarity_heatmap(matrix.to_numpy(), order, f"Treatment map ({correction} correction)")
    parts = ['<h4 id="treatment-map">Treatment map</h4>',
             figure_html(ctx.folder.save_figure(figure, f"score-{output.label}-treatment-map"),
                         "Cosine similarity of the consensus profiles of the treatments called active, in "
                         "hierarchical-clustering order (average linkage); a treatment without a detectable "
                         "phenotype is not related to any other")]
    if MAP_FILES["neighbors"] in output.files:
        neighbors = read_table(storage.join(output.uri, MAP_FILES["neighbors"]))
        neighbors = neighbors[(neighbors["correction"] == correction) & (neighbors["rank"] <= 3)]
        table = neighbors.assign(neighbor=neighbors["neighbor"] + " (" + neighbors["cosine"].round(2).astype(str)
                                 + ")").pivot(index="treatment", columns="rank", values="neighbor")
        table.columns = [f"nearest {c}" for c in table.columns]
        link = ctx.folder.write_table(neighbors, f"score-{output.label}-neighbors")
        parts.append(f"<p>Nearest treatments (full table: {link_html(link, 'CSV')})</p>"
                     + html_table(table.reset_index().head(MAX_TABLE_ROWS)))
    return "".join(parts)


def _spread_panels(panels: list[str], limit: int) -> list[str]:
    """At most ``limit`` panel paths, taken in turn from each treatment (panels are named treatment__site)."""
    by_treatment: dict[str, list[str]] = {}
    for path in sorted(panels):
        by_treatment.setdefault(posixpath.basename(path).split("__", 1)[0], []).append(path)
    chosen: list[str] = []
    queues = list(by_treatment.values())
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def explain_html(output: StepOutput, ctx: Context) -> str:
    """Channel-importance chart and table, planted-channel check, and up to ``max_panels`` Grad-CAM panels."""
    result = output.result
    parts = [kv_table({**{k: v for k, v in result.counts.items() if k != "per_target"},
                       "importance_method": result.importance_method, "images_per_s": result.images_per_s})]
    importance_png = "channel_importance.png"
    if importance_png in output.files:
        relative = ctx.folder.copy_figure(storage.join(output.uri, importance_png),
                                          f"explain-{output.label}-channel-importance")
        parts.append(figure_html(relative, "Channel importance per treatment (mean attribution share)"))
    table_name = (result.tables.get("channel_importance") or {}).get("csv") or "channel_importance.csv"
    if table_name in output.files:
        table = read_table(storage.join(output.uri, table_name))
        link = ctx.folder.write_table(table, f"explain-{output.label}-channel-importance")
        wide = table.pivot(index="treatment", columns="stain", values="importance")
        wide = wide[[s for s in CHANNEL_NAMES if s in wide.columns]]
        wide.insert(0, "top stain", wide.idxmax(axis=1))
        parts.append(f"<p>Mean attribution share per stain (full table: {link_html(link, 'CSV')})</p>")
        parts.append(html_table(wide.reset_index().head(MAX_TABLE_ROWS)))
    planted = result.planted
    if planted:
        parts.append(f"<p>Planted channel ranked first for {escape(planted.get('ranked_first'))} of "
                     f"{escape(planted.get('with_planted_channel'))} treatments with a planted channel.</p>")
    panels = [p for p in result.figures if p.startswith("panels/")] or None
    if panels is None and "panels" in output.dirs:
        files, _ = list_entries(storage.join(output.uri, "panels"))
        panels = [f"panels/{name}" for name in files if name.endswith(".png")]
    chosen = _spread_panels(list(panels or []), ctx.cfg.max_panels)
    if chosen:
        parts.append(f"<h4>Grad-CAM panels ({len(chosen)} of {len(panels)})</h4>")
    for path in chosen:
        relative = ctx.folder.copy_figure(storage.join(output.uri, path), f"explain-{output.label}-{path}")
        parts.append(figure_html(relative, posixpath.basename(path), wide=True))
    return "".join(parts)


def other_html(output: StepOutput, ctx: Context) -> str:
    """Counts of a step this report has no section for (e.g. synth)."""
    counts = output.result.counts
    return kv_table(counts) if isinstance(counts, dict) and counts else ""


def timings_html(outputs: list[StepOutput], ctx: Context) -> str:
    """Wall time of every step output (bar chart) and its phases (table)."""
    rows = []
    for output in outputs:
        timings = step_timings(output)
        if timings:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total")
            rows.append({"step": output.step, "folder": output.label, "seconds": total_seconds(timings),
                         "phases (s)": phases})
    if not rows:
        return '<p class="not-run">no step recorded timings</p>'
    frame = pd.DataFrame(rows)
    figure = step_time_bars([f"{r.step} ({r.folder})" for r in frame.itertuples()], frame["seconds"])
    return figure_html(ctx.folder.save_figure(figure, "timings"), "Wall time per step output") + html_table(frame)


def renderer(step: str) -> Callable[[StepOutput, Context], str]:
    """How the report shows one output of a step: the renderer its registry row names, else :func:`other_html`."""
    try:
        ref = get_step(step).report_renderer
    except KeyError:  # an output of a step this build does not know
        ref = None
    return resolve(ref) if ref else other_html
