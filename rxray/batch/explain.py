"""`rxray explain`: Grad-CAM maps and per-stain attributions of a trained classifier, on a Ray actor pool.

For each target treatment the driver picks ``n`` sites from the shard metadata alone
(seeded, independent of shard order), and Ray Data streams just those rows through
the inference pool (:mod:`rxray.batch.pool`; :class:`ExplainBatch`, the classifier loaded
once per actor). Each image gets the inputs the classifier was trained on, plate gains
included (:mod:`rxray.models.inputs`), and is explained for the logit of its own class
(its ``label_col`` value) by :mod:`rxray.batch.attribution`: a Grad-CAM ``heatmap``,
per-stain ``attribution`` shares and, with ``--occlusion``, per-stain ``occlusion`` drops.
Output layout under ``out``:

- ``heatmaps/*.parquet``: one row per explained image: the metadata columns, ``target_class``,
  ``target_index``, ``target_prob``, ``predicted_class``, ``predicted_prob``, ``heatmap``
  (H, W), ``attribution`` (6,), ``occlusion`` (6,), ``panel`` (its PNG path relative to
  ``out``, or "").
- ``panels/<treatment>__<site_id>.png``: ``--panels`` per target: six stains titled with their
  attribution share, an RGB composite, the heatmap overlay.
- ``channel_importance.csv`` / ``.parquet``: one row per (treatment, stain), see
  :func:`~rxray.batch.attribution.channel_importance`; ``channel_importance.png``: its bar chart.
- ``_manifest.json``: config, model, counts, timings, the importance method, and ``figures``
  (paths relative to ``out``) for the report; written last.
"""

from __future__ import annotations

import re
import zlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rxray import storage
from rxray.batch.attribution import (IMPORTANCE_METHOD, channel_importance, gradcam_batch, occlusion_batch,
                                     planted_ranks, top_stains)
from rxray.batch.pool import InferenceActor, PoolPlan, map_batches, plan_pool
from rxray.config import ConfigError, ExplainConfig
from rxray.layout import CONTROL, METADATA_COLUMNS, N_CHANNELS
from rxray.data.shards import IMAGE_COLUMN, read_shards, source_file
from rxray.errors import StepFailed
from rxray.models.checkpoints import CLASSIFIER_KEYS, model_provenance, require_checkpoint
from rxray.results import ExplainResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

HEATMAPS_DIR = "heatmaps"
PANELS_DIR = "panels"
IMPORTANCE_TABLE = "channel_importance"
IMPORTANCE_FIGURE = "channel_importance.png"
TRUTH_FILE = "truth.json"  # written by `rxray synth` beside metadata.csv
# Class names that stand for "no treatment"; they are never default targets.
CONTROL_CLASSES = (CONTROL, "control")
# One actor by default on CPUs: a run explains a few images per target, and every further
# actor would load its own copy of the classifier for a share of them.
DEFAULT_CPU_ACTORS = 1


# --------------------------------------------------------------------------- the actor


def _slug(value: Any) -> str:
    """A file-name-safe form of a treatment name or site id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._") or "_"


def panel_path(treatment: str, site_id: str) -> str:
    """Path of an image's panel PNG relative to the explain output."""
    return f"{PANELS_DIR}/{_slug(treatment)}__{_slug(site_id)}.png"


class ExplainBatch(InferenceActor):
    """Ray Data callable class: shard rows in, per-image heatmap, attributions, probabilities (and panels) out.

    The classifier loads once per actor. The class to explain for a row is its
    ``label_col`` value, looked up in ``class_index``. Rows in ``panel_ids`` also get a
    PNG panel written straight to storage, so no image ever reaches the driver. No autocast:
    Grad-CAM and gradient x input read gradients, which bf16 would round to 8 significant bits.
    """

    def __init__(self, checkpoint_uri: str, class_index: dict[str, int], label_col: str, out: str,
                 panel_ids: Sequence[str] = (), occlusion: bool = True, gpu: bool = False,
                 threads: int | None = None):
        from rxray.models.classifier import load_classifier
        from rxray.models.inputs import InputRecipe

        super().__init__(gpu, threads)
        model, checkpoint = load_classifier(checkpoint_uri)
        self.model = model.to(self.device).eval()
        self.classes = [str(c) for c in checkpoint["classes"]]
        # Six-stain statistics and plate gains: the classifier's inputs as `rxray finetune` made them.
        self.recipe = InputRecipe.from_checkpoint(checkpoint)
        self.mean, self.std = list(self.recipe.mean), list(self.recipe.std)
        self.class_index = dict(class_index)
        self.label_col = label_col
        self.out = out
        self.panel_ids = frozenset(panel_ids)
        self.occlusion = occlusion

    def _write_panel(self, image: np.ndarray, heatmap: np.ndarray, row: dict[str, Any]) -> str:
        from rxray.evaluate.plots import plot_explain_panel

        relative = panel_path(row["treatment"], row["site_id"])
        title = (f"{row['treatment']} (conc {row['treatment_conc']:g})  {row['site_id']}  "
                 f"target {row['target_class']}  p={row['target_prob']:.2f}")
        plot_explain_panel(image, heatmap, storage.join(self.out, relative), title=title,
                           attribution=row["attribution"])
        return relative

    def model_images(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The batch's images as the classifier saw them in training: scaled by their plate's stain gains, if any."""
        return self.recipe.scaled_images(batch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's metadata columns plus the explanation columns (``image`` dropped)."""
        images = self.model_images(batch)
        targets = np.array([self.class_index[str(label)] for label in batch[self.label_col]], dtype=np.int64)
        conc = batch["treatment_conc"] if self.model.with_conc else None
        heatmaps, attributions, probs = gradcam_batch(self.model, images, self.mean, self.std, targets, conc)
        if self.occlusion:
            drops = occlusion_batch(self.model, images, self.mean, self.std, targets, conc)
        else:
            drops = np.full((len(targets), N_CHANNELS), np.nan, dtype=np.float32)
        rows = np.arange(len(targets))
        predicted = probs.argmax(axis=1)
        out = {name: values for name, values in batch.items() if name != IMAGE_COLUMN}
        out["target_class"] = np.array([self.classes[t] for t in targets], dtype=object)
        out["target_index"] = targets
        out["target_prob"] = probs[rows, targets].astype(np.float32)
        out["predicted_class"] = np.array([self.classes[p] for p in predicted], dtype=object)
        out["predicted_prob"] = probs[rows, predicted].astype(np.float32)
        out["heatmap"] = heatmaps
        out["attribution"] = attributions
        out["occlusion"] = drops
        panels = []
        for i, site_id in enumerate(batch["site_id"]):
            if site_id not in self.panel_ids:
                panels.append("")
                continue
            row = {"site_id": site_id, "treatment": batch["treatment"][i],
                   "treatment_conc": float(batch["treatment_conc"][i]), "target_class": out["target_class"][i],
                   "target_prob": float(out["target_prob"][i]), "attribution": attributions[i]}
            panels.append(self._write_panel(np.asarray(batch[IMAGE_COLUMN][i]), heatmaps[i], row))
        out["panel"] = np.array(panels, dtype=object)
        return out


# --------------------------------------------------------------------------- choosing what to explain


def target_classes(classes: Sequence[str], labels_by_treatment: dict[str, str],
                   targets: Sequence[str] | None) -> dict[str, str]:
    """Treatment -> the class explained for its images; ConfigError for an explicit target that cannot be.

    The class is the treatment's label (its ``label_col`` value). By default every
    treatment whose label is a non-control class of the model is a target.
    """
    classes = [str(c) for c in classes]
    if targets is None:
        return {t: label for t, label in sorted(labels_by_treatment.items())
                if label in classes and label not in CONTROL_CLASSES}
    chosen = {}
    for treatment in targets:
        if treatment not in labels_by_treatment:
            raise ConfigError("explain.targets", f"treatment {treatment!r} has no sites in the shards")
        label = labels_by_treatment[treatment]
        if label not in classes:
            raise ConfigError("explain.targets", f"treatment {treatment!r} has label {label!r}, which is not a "
                                                 f"class of the model ({', '.join(classes)})")
        chosen[treatment] = label
    return chosen


def choose_sites(site_ids: Sequence[str], treatments: Sequence[str], targets: Sequence[str], n: int,
                 seed: int, panels: int) -> tuple[dict[str, list[str]], list[str]]:
    """Up to ``n`` site ids per target treatment, and the first ``panels`` of each to draw.

    Deterministic for a seed: each target's sites are sorted before a draw from a
    generator keyed by (seed, treatment), so shard order and the other targets do not matter.
    """
    site_ids, treatments = np.asarray(site_ids, dtype=object), np.asarray(treatments, dtype=object)
    chosen: dict[str, list[str]] = {}
    panel_ids: list[str] = []
    for treatment in targets:
        pool = np.sort(site_ids[treatments == treatment])
        rng = np.random.default_rng([seed, zlib.crc32(str(treatment).encode())])
        picked = [str(s) for s in pool[rng.permutation(len(pool))[:n]]]
        panel_ids.extend(picked[:panels])
        chosen[treatment] = sorted(picked)
    return chosen, panel_ids


def _labels_by_treatment(meta: "pd.DataFrame", label_col: str) -> dict[str, str]:
    """Each treatment's label; ConfigError if a treatment carries more than one."""
    if label_col == "treatment":
        return {str(t): str(t) for t in meta["treatment"].unique()}
    pairs = meta[["treatment", label_col]].astype(str).drop_duplicates()
    repeated = pairs["treatment"][pairs["treatment"].duplicated()].unique()
    if len(repeated):
        raise ConfigError("explain.model", f"label column {label_col!r} is not constant within treatment(s) "
                                           f"{', '.join(map(str, repeated[:5]))}")
    return dict(zip(pairs["treatment"], pairs[label_col]))


# --------------------------------------------------------------------------- the pipeline


def explain_dataset(shards: "ray.data.Dataset", site_ids: Sequence[str], checkpoint_uri: str, *,
                    class_index: dict[str, int], label_col: str, out: str, panel_ids: Sequence[str],
                    occlusion: bool, batch_size: int, plan: PoolPlan) -> "ray.data.Dataset":
    """The lazy Ray Dataset of explanations for the shard rows whose site_id is in ``site_ids``."""
    from ray.data.expressions import col

    # An expression (not a Python predicate) so the reader can drop unselected rows itself.
    selected = shards.filter(expr=col("site_id").is_in(list(site_ids)))
    return map_batches(selected, ExplainBatch, plan, batch_size=batch_size, checkpoint_uri=checkpoint_uri,
                       class_index=class_index, label_col=label_col, out=out, panel_ids=list(panel_ids),
                       occlusion=occlusion)


def _read_metadata(uri: str, label_col: str) -> tuple["pd.DataFrame", list[str]]:
    """site_id, treatment and label columns of every shard row (no images), and all shard column names.

    Plain pyarrow, not Ray Data: a few string columns of every row fit the driver at any
    scale (a few MB for all of RxRx2) and Parquet reads just those column chunks.
    """
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = dataset.schema.names
        if not dataset.files:
            raise FileNotFoundError("no Parquet files")
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError("explain.data", f"no ingest shards at {uri}: {str(exc).splitlines()[0]}") from None
    for required in (IMAGE_COLUMN, "site_id", "treatment", label_col):
        if required not in names:
            raise ConfigError("explain.data", f"{uri} has no {required!r} column (the model's label column is "
                                              f"{label_col!r})")
    columns = list(dict.fromkeys(["site_id", "treatment", label_col]))
    return dataset.to_table(columns=columns).to_pandas(), names


def _planted_channels(cfg: ExplainConfig) -> tuple[dict[str, int | None] | None, str | None]:
    """Treatment -> planted 1-based channel from a synthetic dataset's truth.json, and its URI, if any."""
    import json

    uri = cfg.truth
    if uri is None:
        uri = source_file(cfg.data, TRUTH_FILE)
        if uri is None:
            return None, None
    elif not storage.exists(uri):
        raise ConfigError("explain.truth", f"file not found: {uri}")
    truth = json.loads(storage.read_text(uri))
    # The stain of the stronger planted component (truth files before leading_channel: the individual one).
    return {name: entry.get("leading_channel", entry.get("channel"))
            for name, entry in truth.get("treatments", {}).items()}, uri


def _read_explanations(uri: str) -> "pd.DataFrame":
    """The heatmap table without the heatmaps, with attribution/occlusion as (6,) arrays per row."""
    import pyarrow.dataset as pads

    from rxray.batch.embed import embedding_matrix

    fs, path = storage.pyarrow_filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=[c for c in dataset.schema.names if c != "heatmap"])
    frame = table.drop_columns(["attribution", "occlusion"]).to_pandas()
    frame["attribution"] = list(embedding_matrix(table.column("attribution")))
    frame["occlusion"] = list(embedding_matrix(table.column("occlusion")))
    return frame


def _write_table(frame: "pd.DataFrame", out: str, name: str) -> dict[str, str]:
    """A table as ``name.csv`` and ``name.parquet`` under ``out``; returns their relative paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_text(storage.join(out, f"{name}.csv"), frame.to_csv(index=False))
    fs, path = storage.pyarrow_filesystem(storage.join(out, f"{name}.parquet"))
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs)
    return {"csv": f"{name}.csv", "parquet": f"{name}.parquet"}


@step_function("explain")
def explain(cfg: ExplainConfig) -> ExplainResult:
    """Grad-CAM, stain attributions and panels for ``n`` images per target, and the importance tables."""
    from rxray.evaluate.plots import plot_channel_importance

    ensure_ray()
    timer = Timer()
    checkpoint = require_checkpoint(cfg.model, "explain.model", CLASSIFIER_KEYS, "a classifier",
                                    "; run `rxray finetune` first")
    checkpoint_uri = checkpoint["uri"]
    classes = [str(c) for c in checkpoint["classes"]]
    label_col = checkpoint.get("label_col") or "treatment"
    planted, truth_uri = _planted_channels(cfg)

    with timer.time("select"):
        meta, shard_columns = _read_metadata(cfg.data, label_col)
        labels = _labels_by_treatment(meta, label_col)
        targets = target_classes(classes, labels, cfg.targets)
        if not targets:
            raise ConfigError("explain.targets", f"no treatment in {cfg.data} has a non-control class of the "
                                                 f"model ({', '.join(classes)}) as its {label_col!r}")
        chosen, panel_ids = choose_sites(meta["site_id"].to_numpy(), meta["treatment"].to_numpy(),
                                         list(targets), cfg.n, cfg.seed, cfg.panels)
        site_ids = [s for ids in chosen.values() for s in ids]
        del meta  # only the chosen ids travel on

    heatmaps_uri = storage.join(cfg.out, HEATMAPS_DIR)

    plan = plan_pool(cfg.actors, cfg.gpu, field="explain.actors", cpu_actors=DEFAULT_CPU_ACTORS)
    read_columns = list(dict.fromkeys([c for c in METADATA_COLUMNS if c in shard_columns] + [label_col,
                                                                                            IMAGE_COLUMN]))
    explained = explain_dataset(read_shards(cfg.data, columns=read_columns), site_ids, checkpoint_uri,
                                class_index={label: classes.index(label) for label in set(targets.values())},
                                label_col=label_col, out=cfg.out, panel_ids=panel_ids, occlusion=cfg.occlusion,
                                batch_size=cfg.batch_size, plan=plan)
    fs, path = storage.pyarrow_filesystem(heatmaps_uri)
    with timer.time("explain"):
        explained.write_parquet(path, filesystem=fs, compression="zstd")

    with timer.time("importance"):
        frame = _read_explanations(heatmaps_uri)
        if len(frame) != len(site_ids) or frame["site_id"].nunique() != len(site_ids):
            raise StepFailed(f"{len(site_ids)} sites chosen but {len(frame)} explanations "
                             f"({frame['site_id'].nunique()} distinct sites) written under {heatmaps_uri}")
        table = channel_importance(frame["treatment"].to_numpy(), frame["target_class"].to_numpy(),
                                   np.stack(frame["attribution"]), np.stack(frame["occlusion"]),
                                   frame["target_prob"].to_numpy(),
                                   planted={t: planted.get(t) for t in targets} if planted is not None else None)
        tables = _write_table(table, cfg.out, IMPORTANCE_TABLE)
    with timer.time("plots"):
        plot_channel_importance(table, storage.join(cfg.out, IMPORTANCE_FIGURE),
                                title="Channel importance (mean gradient x input share)")

    panels = sorted(p for p in frame["panel"] if p)
    model = {**model_provenance(checkpoint), "label_col": label_col, "classes": classes}
    counts = {"targets": len(targets), "chosen": len(site_ids), "explained": len(frame), "panels": len(panels),
              "per_target": {t: len(ids) for t, ids in chosen.items()}}
    images_per_s = round(len(frame) / timer.seconds["explain"], 2) if timer.seconds["explain"] else None
    planted_summary = planted_ranks(table)
    return ExplainResult(counts=counts, timings=timer.seconds, model=model, images_per_s=images_per_s,
                         pool=plan.describe(cfg.batch_size), importance_method=IMPORTANCE_METHOD, targets=targets,
                         figures=[IMPORTANCE_FIGURE, *panels], tables={"channel_importance": tables},
                         layout={"heatmaps": HEATMAPS_DIR, "panels": PANELS_DIR}, top_stain=top_stains(table),
                         truth=truth_uri, planted=planted_summary)
