"""`rxray report`: one HTML page with the figures and tables of every step output under a run.

Step outputs are found by their ``_manifest.json`` (whatever their folders are called)
in a shallow walk of the run URI that never lists bulk folders (images, shards'
bookkeeping, heatmaps, site tables), so it costs a few listings even on object
storage. Outputs are grouped by the manifest's ``step``; a step with no output gets
a "not run" section. Output layout under ``out``:

- ``report.html``: the page, with relative links only, so the folder opens locally
  even when the run lives on s3://;
- ``figures/*.png``: figures drawn here (embedding PCA, score bars, training curves,
  timings) and copies of the figures the steps wrote (confusion matrices, PR and ROC
  curves, Grad-CAM panels, channel importance);
- ``tables/*.csv``: copies of the steps' small result tables, linked from the page;
- ``_manifest.json``: step "report", config, what was found, timings.

Big inputs are read in part: the embedding scatter reads ``max_points`` sampled rows
and only the columns it draws.
"""

from __future__ import annotations

import html
import json
import math
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.ticker import MaxNLocator

from rxray import storage
from rxray.config import ConfigError, ReportConfig, config_to_dict
from rxray.data.layout import CHANNEL_NAMES, CONTROL
from rxray.evaluate.findings import collect_findings, headline_correction, read_table, score_table_uri
from rxray.evaluate.plots import figure_png, new_figure, similarity_heatmap
from rxray.evaluate.probe import PROBE_TABLE
from rxray.evaluate.treatment_map import MAP_FILES
from rxray.runtime import Timer, write_manifest

MANIFEST = "_manifest.json"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
# Sections in pipeline order; steps not listed here go to "Other step outputs".
SECTIONS = (("ingest", "Ingest"), ("pretrain", "SimCLR pretraining"),
            ("probe", "Probes: trained vs random-init encoder"), ("finetune", "Classifiers (finetune)"),
            ("embed", "Embeddings"), ("score", "Random-Forest scores and mAP"),
            ("explain", "Grad-CAM and channel importance"))
# Folder levels below the run searched for manifests: run/<step>/<variant>/<sub> covers every layout
# the steps write, and bounds the listings on object storage.
SEARCH_DEPTH = 4
# Folders that hold bulk data or step bookkeeping, never a step output: listing them on S3 would
# page through up to ~800k objects.
BULK_DIRS = frozenset({"images", "heatmaps", "panels", "sites", "wells", "tensorboard", FIGURES_DIR,
                       TABLES_DIR})
# Folders inside a step output that may hold its PNG figures (besides its top level).
FIGURE_SUBDIRS = ("plots", "figures")
# Score rows shown in the page; the full table is linked as CSV.
MAX_TABLE_ROWS = 200
# Above this many treatments per-treatment bars are unreadable: draw ranked values instead.
MAX_BAR_TREATMENTS = 40
# Categories named in a scatter legend; the rest are drawn as "other".
MAX_LEGEND = 19
SAMPLE_SEED = 0
# Per-epoch metrics of training runs: rxray.train.loop.METRICS_FILE, named here because importing
# that module loads torch, seconds of start-up for a report that never trains anything.
TRAINING_METRICS_FILE = "metrics.jsonl"
# Bookkeeping fields of per-epoch training metrics that are not worth a curve.
HISTORY_SKIP = frozenset({"epoch", "steps", "seconds", "data_wait_s"})
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 90%; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figure.wide img { max-width: 1150px; }
figcaption { font-size: 85%; color: #555; max-width: 600px; }
.not-run { color: #999; font-style: italic; } .problem { color: #b00; }
code { background: #f6f6f6; padding: 0 .2em; } nav a { margin-right: 1em; }
"""


# --------------------------------------------------------------------------- finding step outputs


def pipeline_position(step: str) -> tuple[int, str]:
    """Sort key putting steps in pipeline order (synth first, unknown steps last, by name)."""
    order = ["synth", *(name for name, _ in SECTIONS)]
    return (order.index(step) if step in order else len(order), step)


@dataclass
class StepOutput:
    """One completed step output: its folder URI, path under the run, manifest and top-level listing."""

    uri: str
    relative: str
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    @property
    def step(self) -> str:
        """The step that wrote it (the manifest's ``step``)."""
        return str(self.manifest.get("step") or "unknown")

    @property
    def label(self) -> str:
        """A short name for headings: the folder under the run ('.' for the run itself)."""
        return self.relative or "."


def list_entries(uri: str) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly under a folder URI, sorted; empty if it does not exist."""
    fs, path = storage.filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    files, dirs = [], []
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if not name or entry["name"].rstrip("/") == path.rstrip("/"):
            continue  # some object stores list the prefix itself
        (dirs if entry.get("type") == "directory" else files).append(name)
    return sorted(files), sorted(dirs)


def _skipped(name: str) -> bool:
    """Folders never searched: bulk data, Ray Train checkpoints, hidden and bookkeeping folders."""
    return name in BULK_DIRS or name.startswith((".", "_", "checkpoint_"))


def find_step_outputs(run: str, depth: int = SEARCH_DEPTH, exclude: str | None = None) -> list[StepOutput]:
    """Every folder under ``run`` (itself included, ``depth`` levels down) that holds a step manifest.

    ``exclude`` is a folder URI not to search (the report's own output when it lies inside the run).
    Report manifests are left out. Sorted by path.
    """
    excluded = storage.strip_scheme(exclude).rstrip("/") if exclude else None
    found: list[StepOutput] = []
    pending = [(run, "", 0)]
    while pending:
        uri, relative, level = pending.pop()
        if excluded and storage.strip_scheme(uri).rstrip("/") == excluded:
            continue
        files, dirs = list_entries(uri)
        if MANIFEST in files:
            manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
            if manifest.get("step") != "report":
                found.append(StepOutput(uri, relative, manifest, files, dirs))
        if level < depth:
            pending += [(storage.join(uri, name), posixpath.join(relative, name) if relative else name, level + 1)
                        for name in dirs if not _skipped(name)]
    return sorted(found, key=lambda output: (output.relative, output.step))


# --------------------------------------------------------------------------- the output folder


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


class ReportFolder:
    """The report's output folder: figures and tables get unique names and relative links."""

    def __init__(self, out: str):
        self.out = out
        self.figures = 0  # PNGs written so far
        self._names: set[str] = set()

    def _relative(self, folder: str, stem: str, suffix: str) -> str:
        base, n = _slug(re.sub(rf"{re.escape(suffix)}$", "", stem, flags=re.IGNORECASE)), 1
        name = f"{base}{suffix}"
        while f"{folder}/{name}" in self._names:
            n += 1
            name = f"{base}-{n}{suffix}"
        self._names.add(f"{folder}/{name}")
        return f"{folder}/{name}"

    def draw(self, stem: str, write_png: Callable[[str], Any]) -> str:
        """Call ``write_png(uri)`` for a new figure in figures/ (helpers that write PNGs); returns its path."""
        relative = self._relative(FIGURES_DIR, stem, ".png")
        write_png(storage.join(self.out, relative))
        self.figures += 1
        return relative

    def save_figure(self, figure, stem: str) -> str:
        """Render a matplotlib figure into figures/; returns its relative path."""
        return self.draw(stem, lambda uri: storage.write_bytes(uri, figure_png(figure)))

    def copy_figure(self, uri: str, stem: str) -> str:
        """Copy a step's PNG into figures/; returns its relative path."""
        return self.draw(stem, lambda target: storage.write_bytes(target, storage.read_bytes(uri)))

    def write_table(self, frame: pd.DataFrame, stem: str) -> str:
        """Write a table as CSV into tables/; returns its relative path."""
        relative = self._relative(TABLES_DIR, stem, ".csv")
        storage.write_text(storage.join(self.out, relative), frame.to_csv(index=False))
        return relative


# --------------------------------------------------------------------------- HTML pieces


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (np.floating,)):
        return _format(float(value))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def html_table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table, every cell escaped; text columns left-aligned."""
    text_columns = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])}
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{_esc(c)}</th>' for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text_columns else ""}">{_esc(_format(v))}</td>'
                        for c, v in zip(frame.columns, values))
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def kv_table(values: dict[str, Any]) -> str:
    """A two-column (name, value) table."""
    return html_table(pd.DataFrame({"name": list(values), "value": [_format(v) for v in values.values()]}))


def figure_html(relative: str, caption: str, wide: bool = False) -> str:
    """An image that links to itself, with a caption."""
    src = _esc(relative)
    return (f'<figure class="{"wide" if wide else ""}"><a href="{src}"><img src="{src}" alt="{_esc(caption)}">'
            f"</a><figcaption>{_esc(caption)}</figcaption></figure>")


def link_html(relative: str, text: str) -> str:
    """A relative link."""
    return f'<a href="{_esc(relative)}">{_esc(text)}</a>'


def provenance_html(output: StepOutput) -> str:
    """The manifest's config and versions, folded away."""
    detail = {"config": output.manifest.get("config"), "versions": output.manifest.get("versions"),
              "created": output.manifest.get("created")}
    return (f"<details><summary>config and versions</summary><pre>"
            f"{_esc(json.dumps(detail, indent=2, default=str))}</pre></details>")


# --------------------------------------------------------------------------- shared readers and figures


def step_timings(manifest: dict[str, Any]) -> dict[str, float]:
    """Named seconds of a manifest (``timings`` or ``seconds``: a dict of phases or one number)."""
    value = manifest.get("timings", manifest.get("seconds"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"total": float(value)}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


def total_seconds(timings: dict[str, float]) -> float:
    """The step's wall time: its ``total`` if recorded, else the sum of its phases."""
    return timings["total"] if "total" in timings else float(sum(timings.values()))


def plot_history(history: list[dict[str, Any]], title: str):
    """One small panel per numeric per-epoch metric (loss, top-1, images/s, ...) against epoch."""
    keys = [k for k in dict.fromkeys(k for entry in history for k in entry)
            if k not in HISTORY_SKIP and all(isinstance(e.get(k), (int, float)) for e in history if k in e)]
    epochs = [entry.get("epoch", i + 1) for i, entry in enumerate(history)]
    columns = min(4, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / columns))
    figure = new_figure(3.6 * columns, 2.8 * rows)
    figure.set_layout_engine("constrained")  # keeps the suptitle clear of the panel titles
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, key in zip(axes, keys):
        points = [(x, e[key]) for x, e in zip(epochs, history) if key in e]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return figure


def categorical_scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str, grey: Iterable[str] = ()) -> None:
    """Scatter coloured by category: the most frequent ones named in the legend, the rest as 'other'.

    Categories in ``grey`` (controls) are drawn first, in grey, so treatments stay visible on top.
    """
    labels = np.asarray(labels).astype(str)
    grey = [g for g in grey if g in set(labels)]
    names, counts = np.unique(labels[~np.isin(labels, grey)], return_counts=True)
    named = list(names[np.argsort(-counts, kind="stable")][:MAX_LEGEND])
    other = ~np.isin(labels, named + grey)
    for g in grey:
        mask = labels == g
        ax.scatter(xy[mask, 0], xy[mask, 1], s=4, c="#bbbbbb", label=f"{g} ({mask.sum()})", linewidths=0)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="#e0c9a6",
                   label=f"other {len(names) - len(named)} ({other.sum()})", linewidths=0)
    # tab10, then tab20's light shades: neighbours in the legend never get two shades of one hue.
    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    for index, name in enumerate(named):
        mask = labels == name
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, color=palette[index % len(palette)],
                   label=f"{name} ({mask.sum()})", linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


# --------------------------------------------------------------------------- sections, one per step


@dataclass
class Context:
    """What every section needs: the config, the output folder and the problems met so far."""

    cfg: ReportConfig
    folder: ReportFolder
    problems: list[str] = field(default_factory=list)


def ingest_html(output: StepOutput, ctx: Context) -> str:
    """Counts, throughput and per-channel intensity statistics of one ingest output."""
    manifest = output.manifest
    parts = [kv_table({**manifest.get("counts", {}), "sites_per_second": manifest.get("sites_per_second"),
                       "image_shape": manifest.get("image_shape")})]
    mean, std = manifest.get("channel_mean"), manifest.get("channel_std")
    if mean and std:
        names = manifest.get("channel_names") or CHANNEL_NAMES
        figure = new_figure(6.5, 3.2)
        ax = figure.subplots()
        positions = np.arange(len(mean))
        ax.bar(positions, mean, yerr=std, capsize=3, color="#4c72b0")
        ax.set_xticks(positions)
        ax.set_xticklabels([f"w{i + 1} {n}" for i, n in enumerate(names[:len(mean)])], rotation=20, ha="right")
        ax.set_ylabel("intensity (uint8)")
        ax.set_title("Channel mean ± std over written sites", fontsize=10)
        parts.append(figure_html(ctx.folder.save_figure(figure, f"ingest-{output.label}-channels"),
                                 "Per-channel intensity mean and standard deviation (normalisation statistics)"))
    return "".join(parts)


def _training_history(output: StepOutput) -> list[dict[str, Any]]:
    """The per-epoch metrics a training run wrote (metrics.jsonl), or [] if it wrote none."""
    if TRAINING_METRICS_FILE not in output.files:
        return []
    text = storage.read_text(storage.join(output.uri, TRAINING_METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pretrain_html(output: StepOutput, ctx: Context) -> str:
    """Loss, top-1 retrieval and images/s per epoch of one SimCLR run."""
    manifest = output.manifest
    parts = [kv_table({k: manifest.get(k) for k in ("status", "epochs_completed", "resumed_from", "checkpoint")})]
    history = _training_history(output)
    if history:
        figure = plot_history(history, "SimCLR pretraining per epoch")
        parts.append(figure_html(ctx.folder.save_figure(figure, f"pretrain-{output.label}-curves"),
                                 "NT-Xent loss, top-1 positive retrieval and images/s per epoch", wide=True))
        parts.append(html_table(pd.DataFrame(history)))
    else:
        parts.append('<p class="not-run">no per-epoch metrics file</p>')
    return "".join(parts)


def probe_html(output: StepOutput, ctx: Context) -> str:
    """The probe comparison (balanced accuracy of the trained encoder, the random-init ones, the margin)."""
    comparison = output.manifest.get("comparison") or []
    if not comparison:
        return '<p class="not-run">no probe comparison in the manifest</p>'
    frame = pd.DataFrame([{**row, "random_init": ", ".join(f"{b:.3f}" for b in row["random_init"])}
                          for row in comparison])
    counts = output.manifest.get("counts") or {}
    note = (f"<p>Balanced accuracy of plate-grouped probes on {counts.get('sites', '?')} sites of "
            f"{counts.get('plates', '?')} plates (held-out plates; margin = trained minus the best random-init "
            f"encoder).</p>")
    parts = [note, html_table(frame)]
    if PROBE_TABLE in output.files:
        link = ctx.folder.write_table(read_table(storage.join(output.uri, PROBE_TABLE)), f"probe-{output.label}")
        parts.append(f"<p>Every score: {link_html(link, 'CSV')}</p>")
    return "".join(parts)


def _manifest_figure_paths(value: Any) -> list[str]:
    """Relative PNG paths named anywhere in a manifest's ``figures`` field (str, list or dict)."""
    if isinstance(value, str):
        return [value] if value.lower().endswith(".png") else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [p for item in value for p in _manifest_figure_paths(item)]
    return []


def step_figures(output: StepOutput) -> list[str]:
    """Relative paths of a step's PNG figures: those its manifest names, at its top level and in plots/."""
    paths = _manifest_figure_paths(output.manifest.get("figures"))
    paths += [name for name in output.files if name.lower().endswith(".png")]
    for folder in FIGURE_SUBDIRS:
        if folder in output.dirs:
            files, _ = list_entries(storage.join(output.uri, folder))
            paths += [f"{folder}/{name}" for name in files if name.lower().endswith(".png")]
    return list(dict.fromkeys(p.strip("/") for p in paths))


def _class_names(metrics: dict[str, Any], n: int) -> list[str]:
    for key in ("labels", "classes", "class_names"):
        if isinstance(metrics.get(key), list) and len(metrics[key]) == n:
            return [str(v) for v in metrics[key]]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and len(per_class) == n:
        return [str(k) for k in per_class]
    return [str(k) for k in range(n)]


def finetune_html(output: StepOutput, ctx: Context) -> str:
    """Test metrics, per-class detail, confusion matrix, PR and ROC curves and training curves of one classifier."""
    from rxray.evaluate.plots import plot_confusion_matrix

    config = output.manifest.get("config") or {}
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
        parts.append("<h4>Test split</h4>" + kv_table(headline))
        per_class = metrics.get("per_class")
        if isinstance(per_class, dict) and per_class and all(isinstance(v, dict) for v in per_class.values()):
            frame = pd.DataFrame([{"class": name, **values} for name, values in per_class.items()])
            parts.append(html_table(frame))
        matrix = metrics.get("confusion_matrix")
        if matrix is not None and not any("confusion" in p.lower() for p in figures):
            cm = np.asarray(matrix, dtype=np.int64)
            relative = ctx.folder.draw(f"finetune-{output.label}-confusion",
                                       lambda uri: plot_confusion_matrix(cm, _class_names(metrics, len(cm)), uri))
            parts.append(figure_html(relative, "Confusion matrix (test split), drawn from metrics.json"))
    for path in figures:
        relative = ctx.folder.copy_figure(storage.join(output.uri, path), f"finetune-{output.label}-{path}")
        parts.append(figure_html(relative, path))
    history = _training_history(output)
    if history:
        figure = plot_history(history, "Classifier training per epoch")
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

    manifest = output.manifest
    layout = manifest.get("layout") or {}
    model = manifest.get("model") or {}
    parts = [kv_table({**(manifest.get("counts") or {}), "dim": manifest.get("dim"),
                       "images_per_s": manifest.get("images_per_s"), "backbone": model.get("backbone"),
                       "checkpoint": model.get("uri")})]
    sites_uri = storage.join(output.uri, layout.get("sites") or "sites")
    meta, vectors, total = sample_sites(sites_uri, ["treatment", "experiment", "plate"], ctx.cfg.max_points)
    if len(vectors) < 3:
        return "".join(parts) + '<p class="not-run">fewer than 3 sites: no PCA</p>'
    pca = PCA(n_components=2, random_state=SAMPLE_SEED)
    xy = pca.fit_transform(vectors)
    share = pca.explained_variance_ratio_
    sampled = f"{len(vectors)} of {total} sites (seeded sample)" if len(vectors) < total else f"all {total} sites"
    colourings = [("treatment", meta["treatment"].to_numpy(), (CONTROL,))]
    if {"experiment", "plate"} <= set(meta.columns):
        colourings.append(("plate", plate_keys(meta).to_numpy(), ()))
    for name, labels, grey in colourings:
        figure = new_figure(7.5, 5.0)
        ax = figure.subplots()
        categorical_scatter(ax, xy, labels, f"Embedding PCA coloured by {name}", grey)
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0%} of variance)")
        parts.append(figure_html(ctx.folder.save_figure(figure, f"embed-{output.label}-pca-{name}"),
                                 f"PCA of {sampled}, coloured by {name}"))
    return "".join(parts)


def plot_scores(frame: pd.DataFrame, metrics: list[tuple[str, str]]):
    """Per-treatment bars of each metric, one bar per correction; ranked values when treatments are many."""
    corrections = list(dict.fromkeys(frame["correction"]))
    treatments = sorted(set(frame["treatment"]))
    many = len(treatments) > MAX_BAR_TREATMENTS
    height = 4.0 if many else max(3.0, 0.28 * len(treatments) * max(1, len(corrections)) ** 0.5 + 1.0)
    figure = new_figure(4.2 * len(metrics), height)
    axes = np.atleast_1d(figure.subplots(1, len(metrics), sharey=not many))
    width = 0.8 / max(1, len(corrections))
    for ax, (column, title) in zip(axes, metrics):
        for i, correction in enumerate(corrections):
            values = frame[frame["correction"] == correction].set_index("treatment")[column]
            if many:
                ranked = np.sort(values.dropna().to_numpy())[::-1]
                ax.plot(np.arange(1, len(ranked) + 1), ranked, label=str(correction))
            else:
                positions = np.arange(len(treatments)) + (i - (len(corrections) - 1) / 2) * width
                ax.barh(positions, values.reindex(treatments).to_numpy(dtype=float), height=width,
                        label=str(correction))
        if many:
            ax.set_xlabel("treatment rank")
        else:
            ax.set_yticks(np.arange(len(treatments)))
            ax.set_yticklabels(treatments, fontsize=7)
            ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    axes[-1].legend(fontsize=7, title="correction", title_fontsize=7)
    return figure


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
        figure = plot_scores(frame, metrics)
        many = frame["treatment"].nunique() > MAX_BAR_TREATMENTS
        caption = ("Random-Forest F1 and ROC-AUC (EMPTY vs treatment, plate-grouped folds) and mAP per treatment, "
                   + ("sorted by value (too many treatments to name)" if many else "one bar per correction"))
        parts.append(figure_html(ctx.folder.save_figure(figure, f"score-{output.label}-bars"), caption, wide=True))
    table_link = ctx.folder.write_table(frame, f"score-{output.label}-scores")
    shown = [c for c in ("treatment", "correction", "f1", "roc_auc", "map", "q_value", "active", "n_treated",
                         "n_replicates", "status") if c in frame.columns]
    ordered = frame.sort_values(["correction", "map"], ascending=[True, False]) if "map" in frame.columns \
        else frame
    note = f"all {len(frame)} rows" if len(frame) <= MAX_TABLE_ROWS else \
        f"first {MAX_TABLE_ROWS} of {len(frame)} rows by mAP"
    parts.append(f"<p>Score table ({_esc(note)}; full table: {link_html(table_link, 'CSV')})</p>")
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
    order = clusters[clusters["correction"] == correction].sort_values("leaf_order")["treatment"].tolist()
    pairs = read_table(storage.join(output.uri, MAP_FILES["similarity"]))
    pairs = pairs[pairs["correction"] == correction]
    matrix = pairs.pivot(index="treatment_a", columns="treatment_b", values="cosine").reindex(index=order,
                                                                                               columns=order)
    figure = similarity_heatmap(matrix.to_numpy(), order, f"Treatment map ({correction} correction)")
    parts = ['<h4 id="treatment-map">Treatment map</h4>',
             figure_html(ctx.folder.save_figure(figure, f"score-{output.label}-treatment-map"),
                         "Cosine similarity of the treatments' consensus profiles, in hierarchical-clustering order "
                         "(average linkage)")]
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
    manifest = output.manifest
    figures = manifest.get("figures") or {}
    parts = [kv_table({**{k: v for k, v in (manifest.get("counts") or {}).items() if k != "per_target"},
                       "importance_method": manifest.get("importance_method"),
                       "images_per_s": manifest.get("images_per_s")})]
    importance_png = figures.get("channel_importance") or "channel_importance.png"
    if importance_png in output.files:
        relative = ctx.folder.copy_figure(storage.join(output.uri, importance_png),
                                          f"explain-{output.label}-channel-importance")
        parts.append(figure_html(relative, "Channel importance per treatment (mean attribution share)"))
    table_name = ((manifest.get("tables") or {}).get("channel_importance") or {}).get("csv") or \
        "channel_importance.csv"
    if table_name in output.files:
        table = read_table(storage.join(output.uri, table_name))
        link = ctx.folder.write_table(table, f"explain-{output.label}-channel-importance")
        wide = table.pivot(index="treatment", columns="stain", values="importance")
        wide = wide[[s for s in CHANNEL_NAMES if s in wide.columns]]
        wide.insert(0, "top stain", wide.idxmax(axis=1))
        parts.append(f"<p>Mean attribution share per stain (full table: {link_html(link, 'CSV')})</p>")
        parts.append(html_table(wide.reset_index().head(MAX_TABLE_ROWS)))
    planted = manifest.get("planted")
    if planted:
        parts.append(f"<p>Planted channel ranked first for {_esc(planted.get('ranked_first'))} of "
                     f"{_esc(planted.get('with_planted_channel'))} treatments with a planted channel.</p>")
    panels = figures.get("panels")
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
    counts = output.manifest.get("counts")
    return kv_table(counts) if isinstance(counts, dict) and counts else ""


def timings_html(outputs: list[StepOutput], ctx: Context) -> str:
    """Wall time of every step output (bar chart) and its phases (table)."""
    rows = []
    for output in outputs:
        timings = step_timings(output.manifest)
        if timings:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total")
            rows.append({"step": output.step, "folder": output.label, "seconds": total_seconds(timings),
                         "phases (s)": phases})
    if not rows:
        return '<p class="not-run">no step recorded timings</p>'
    frame = pd.DataFrame(rows)
    figure = new_figure(7.0, 1.0 + 0.35 * len(frame))
    ax = figure.subplots()
    ax.barh(np.arange(len(frame)), frame["seconds"], color="#55a868")
    ax.set_yticks(np.arange(len(frame)))
    ax.set_yticklabels([f"{r.step} ({r.folder})" for r in frame.itertuples()], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Step wall time", fontsize=10)
    return figure_html(ctx.folder.save_figure(figure, "timings"), "Wall time per step output") + html_table(frame)


SECTION_RENDERERS: dict[str, Callable[[StepOutput, Context], str]] = {
    "ingest": ingest_html, "pretrain": pretrain_html, "probe": probe_html, "finetune": finetune_html,
    "embed": embed_html, "score": score_html, "explain": explain_html,
}


# --------------------------------------------------------------------------- the page


def findings_html(findings: dict[str, Any]) -> str:
    """The Findings section: activity, ranked treatments, the map, the probe's verdict, classifiers, warnings."""
    parts = []
    if findings["warnings"]:
        parts.append('<ul class="problem">' + "".join(f"<li>{_esc(w)}</li>" for w in findings["warnings"]) + "</ul>")
    activity = findings.get("activity")
    if activity:
        parts.append(f"<p><b>{activity['n_active']} of {activity['n_tested']} treatments active</b> (mAP against "
                     f"same-plate controls, Benjamini-Hochberg q &le; {_esc(activity['fdr'])}, "
                     f"{_esc(activity['correction'])} correction).</p>")
        columns = {"map": "mAP", "q_value": "q", "roc_auc": "RF ROC-AUC", "top_stain": "top stain"}
        ranked = pd.DataFrame(activity["ranked"]).fillna({"top_stain": "-"}).rename(columns=columns)
        parts.append(html_table(ranked))
    treatment_map = findings.get("treatment_map")
    if treatment_map:
        benchmark = treatment_map.get("benchmark") or {}
        if "recall_top" in benchmark:
            parts.append(f"<p>Treatment map ({_esc(treatment_map['correction'])}): same-MoA recall among the 5% most "
                         f"similar pairs {_format(benchmark['recall_top'])} against a permutation null of "
                         f"{_format(benchmark.get('null_mean'))} (p = {_format(benchmark.get('p_value'))}).</p>")
        if treatment_map.get("clusters"):
            items = "".join(f"<li>{_esc(', '.join(members))}</li>" for members in treatment_map["clusters"][:10])
            parts.append(f"<p>Clusters of similar treatments:</p><ul>{items}</ul>")
    probe = findings.get("probe")
    if probe:
        verdict = "beats" if probe["beats_random_init"] else "does not beat"
        parts.append(f"<p>Probe: the SimCLR encoder {verdict} every random-init encoder at telling treated from "
                     f"control sites on held-out plates.</p>" + html_table(pd.DataFrame(probe["rows"])))
    if findings.get("classifiers"):
        parts.append("<p>Classifiers on held-out plates:</p>" + html_table(pd.DataFrame(findings["classifiers"])))
    return "".join(parts) or '<p class="not-run">no score, probe or classifier output to summarise</p>'


def output_html(output: StepOutput, ctx: Context, render: Callable[[StepOutput, Context], str]) -> str:
    """One step output's block; a broken artifact becomes a visible error, not a missing report."""
    heading = f"<h3>{_esc(output.step)}: <code>{_esc(output.label)}</code></h3>"
    try:
        body = render(output, ctx)
    except Exception as exc:  # noqa: BLE001 - one unreadable artifact must not hide every other figure
        problem = f"{output.step} at {output.uri}: {type(exc).__name__}: {exc}"
        ctx.problems.append(problem)
        body = f'<p class="problem">could not render: {_esc(problem)}</p>'
    return heading + body + provenance_html(output)


def render_page(run: str, outputs: list[StepOutput], ctx: Context) -> str:
    """The whole report page."""
    outputs = sorted(outputs, key=lambda o: (pipeline_position(o.step), o.relative))
    by_step: dict[str, list[StepOutput]] = {}
    for output in outputs:
        by_step.setdefault(output.step, []).append(output)
    others = [o for o in outputs if o.step not in SECTION_RENDERERS]
    nav = [("findings", "Findings"), *SECTIONS] + ([("other", "Other step outputs")] if others else []) + \
        [("timings", "Step timings")]
    body = [f"<h1>rxray report</h1><p>Run: <code>{_esc(run)}</code> &middot; written "
            f"{_esc(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))} &middot; {len(outputs)} step outputs</p>",
            "<nav>" + "".join(link_html(f"#{key}", title) for key, title in nav) + "</nav>"]
    found = pd.DataFrame([{"step": o.step, "folder": o.label, "created": o.manifest.get("created"),
                           "git": (o.manifest.get("versions") or {}).get("git")} for o in outputs])
    body.append('<h2 id="findings">Findings</h2>')
    try:
        body.append(findings_html(collect_findings(outputs)))
    except Exception as exc:  # noqa: BLE001 - as in output_html
        ctx.problems.append(f"findings: {type(exc).__name__}: {exc}")
        body.append(f'<p class="problem">could not summarise the findings: {_esc(exc)}</p>')
    body.append("<details><summary>Step outputs found</summary>" + html_table(found) + "</details>")
    for step, title in SECTIONS:
        body.append(f'<h2 id="{step}">{_esc(title)}</h2>')
        instances = by_step.get(step, [])
        if not instances:
            body.append('<p class="not-run">not run</p>')
        body += [output_html(o, ctx, SECTION_RENDERERS[step]) for o in instances]
    if others:
        body.append('<h2 id="other">Other step outputs</h2>')
        body += [output_html(o, ctx, other_html) for o in others]
    body.append('<h2 id="timings">Step timings</h2>')
    try:
        body.append(timings_html(outputs, ctx))
    except Exception as exc:  # noqa: BLE001 - as in output_html
        ctx.problems.append(f"timings: {type(exc).__name__}: {exc}")
        body.append(f'<p class="problem">could not render timings: {_esc(exc)}</p>')
    if ctx.problems:
        body.append("<h2>Problems</h2><ul>" + "".join(f"<li>{_esc(p)}</li>" for p in ctx.problems) + "</ul>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>rxray report: {_esc(run)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Find every step output under ``cfg.run`` and write report.html with its figures under ``cfg.out``."""
    timer = Timer()
    if not storage.exists(cfg.run):
        raise ConfigError("report.run", f"not found: {cfg.run}")
    with timer.time("find"):
        outputs = find_step_outputs(cfg.run, exclude=cfg.out)
    if not outputs:
        raise ConfigError("report.run", f"no step output ({MANIFEST}) within {SEARCH_DEPTH} folder levels of "
                                        f"{cfg.run}")
    # Figures of an earlier report here are replaced, not mixed with this one's.
    previous = storage.join(cfg.out, MANIFEST)
    if storage.exists(previous) and json.loads(storage.read_text(previous)).get("step") == "report":
        for stale in (MANIFEST, FIGURES_DIR, TABLES_DIR):
            storage.remove(storage.join(cfg.out, stale), recursive=True)
    storage.makedirs(cfg.out)
    ctx = Context(cfg, ReportFolder(cfg.out))
    with timer.time("render"):
        page = render_page(cfg.run, outputs, ctx)
    report_uri = storage.join(cfg.out, REPORT_FILE)
    storage.write_text(report_uri, page)
    found = sorted({o.step for o in outputs}, key=pipeline_position)
    not_run = [step for step, _ in SECTIONS if step not in found]
    write_manifest(cfg.out, "report", config_to_dict(cfg),
                   counts={"step_outputs": len(outputs), "figures": ctx.folder.figures},
                   outputs=[{"step": o.step, "uri": o.uri} for o in outputs], not_run=not_run,
                   problems=ctx.problems, timings=timer.seconds)
    return {"report": report_uri, "figures": ctx.folder.figures, "steps": found, "not_run": not_run,
            "problems": ctx.problems}
