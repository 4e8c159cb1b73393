"""`rxray explain`: Grad-CAM maps and per-stain attributions of a trained classifier, on a Ray actor pool.

For each target treatment the driver picks ``n`` sites from the shard metadata alone
(seeded, independent of shard order), and Ray Data streams just those rows through
an actor pool (:class:`ExplainBatch`, the classifier loaded once per actor). Per image
the actor computes, for the logit of the image's own class (its ``label_col`` value):

- ``heatmap``: Grad-CAM (pytorch-grad-cam) on the encoder's last convolutional block,
  (H, W) float32 in [0, 1];
- ``attribution``: gradient x input per stain, ``sum over pixels |d logit / d x * x|``
  on the normalised image, divided by its total so the six shares sum to 1 per image.
  Stains the model does not use have zero gradient, hence exactly 0;
- ``occlusion`` (``--occlusion``): the target-logit drop when a stain is replaced by its
  mean (0 after normalisation), in logit units; 0 for unused stains.

The channel-importance table ranks stains per treatment by the mean ``attribution``
share (``rank``); the mean occlusion drop (signed, and absolute as ``occlusion_effect``)
and its rank by absolute effect (``occlusion_rank``) sit beside it as a second opinion.
Output layout under ``out``:

- ``heatmaps/*.parquet``: one row per explained image: the metadata columns, ``target_class``,
  ``target_index``, ``target_prob``, ``predicted_class``, ``predicted_prob``, ``heatmap``
  (H, W), ``attribution`` (6,), ``occlusion`` (6,), ``panel`` (its PNG path relative to
  ``out``, or "").
- ``panels/<treatment>__<site_id>.png``: ``--panels`` per target: six stains titled with their
  attribution share, an RGB composite, the heatmap overlay.
- ``channel_importance.csv`` / ``.parquet``: one row per (treatment, stain), see
  :func:`channel_importance`; ``channel_importance.png``: its bar chart.
- ``_manifest.json``: config, model, counts, timings, the importance method, and ``figures``
  (paths relative to ``out``) for the report; written last.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from rxray import storage
from rxray.errors import StepFailed
from rxray.config import ConfigError, ExplainConfig, config_to_dict
from rxray.data.layout import CHANNEL_NAMES, CONTROL, METADATA_COLUMNS, N_CHANNELS
from rxray.data.shards import IMAGE_COLUMN, read_shards
from rxray.runtime import Timer, ensure_ray, write_manifest
from rxray.train.checkpoints import CLASSIFIER_KEYS, require_checkpoint

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

    from rxray.models.classifier import Classifier

HEATMAPS_DIR = "heatmaps"
PANELS_DIR = "panels"
IMPORTANCE_TABLE = "channel_importance"
IMPORTANCE_FIGURE = "channel_importance.png"
TRUTH_FILE = "truth.json"  # written by `rxray synth` beside metadata.csv
# Class names that stand for "no treatment"; they are never default targets.
CONTROL_CLASSES = (CONTROL, "control")
IMPORTANCE_METHOD = ("gradient x input: per image, sum over pixels of |d target logit / d input * input| per stain "
                     "on the normalised image, divided by the six-stain total (shares sum to 1); rank 1 = largest "
                     "mean share over the treatment's images. occlusion_drop / occlusion_effect: mean signed / "
                     "absolute target-logit drop when the stain is set to its mean (0 after normalisation); "
                     "occlusion_rank orders stains by occlusion_effect.")


# --------------------------------------------------------------------------- per-batch computation


class _CamInput(torch.nn.Module):
    """Adapts a Classifier to GradCAM's ``model(images)`` call: concentrations ride along as state."""

    def __init__(self, model: "Classifier", conc: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.conc = conc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped classifier for normalised (B, 6, H, W) images."""
        return self.model(images, self.conc)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradients for the duration: only input and activation gradients are needed."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _prepare(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
             target_index: Any, conc: Any) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
    """Normalised float images on the model's device, (B,) int target indices, and concentrations."""
    from rxray.ssl.augment import normalize

    device = next(model.parameters()).device
    images = torch.as_tensor(np.array(images_uint8, copy=True) if isinstance(images_uint8, np.ndarray)
                             else images_uint8).to(device)
    if images.dim() != 4 or images.shape[1] != N_CHANNELS:
        raise ValueError(f"expected images of shape (B, {N_CHANNELS}, H, W), got {tuple(images.shape)}")
    targets = np.broadcast_to(np.asarray(target_index, dtype=np.int64), (images.shape[0],)).copy()
    conc_tensor = None
    if model.with_conc:
        if conc is None:
            raise ValueError("this classifier takes treatment_conc: pass conc")
        conc_tensor = torch.as_tensor(np.asarray(conc, dtype=np.float32)).to(device)
    return normalize(images, mean, std), targets, conc_tensor


def _used_channel_mask(model: "Classifier") -> np.ndarray:
    mask = np.zeros(N_CHANNELS, dtype=bool)
    mask[[c - 1 for c in model.channels]] = True
    return mask


def channel_shares(raw: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Per-image shares (B, 6) summing to 1; unused stains 0; an all-zero row is spread evenly over used stains."""
    raw = np.where(used, np.abs(raw), 0.0).astype(np.float64)
    totals = raw.sum(axis=1, keepdims=True)
    even = np.broadcast_to(used / used.sum(), raw.shape)
    shares = np.divide(raw, totals, out=even.copy(), where=totals > 0)
    return shares.astype(np.float32)


def gradcam_batch(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
                  target_index: Any, conc: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps (B, H, W) in [0, 1], gradient-x-input stain shares (B, 6), softmax probs (B, C).

    ``images_uint8`` is (B, 6, H, W) in uint8 units, normalised here with the six-stain
    ``mean``/``std``; ``target_index`` is the class whose logit is explained (an int or
    one per image); ``conc`` (B,) is required when the model was trained with_conc.
    One forward and one backward pass serve both the heatmap and the attribution.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    normalised, targets, conc_tensor = _prepare(model, images_uint8, mean, std, target_index, conc)
    # A leaf that requires grad: GradCAM's `.to(device)` returns it unchanged, so backward fills its .grad.
    inputs = normalised.detach().requires_grad_(True)
    with _frozen(model), GradCAM(model=_CamInput(model, conc_tensor),
                                 target_layers=[model.encoder.target_layer()]) as cam:
        heatmaps = cam(inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        logits = cam.outputs.detach().float()
    if inputs.grad is None:
        raise RuntimeError("Grad-CAM ran no backward pass to the input; cannot attribute stains")
    raw = (inputs.grad * inputs.detach()).abs().sum(dim=(2, 3)).cpu().numpy()
    attributions = channel_shares(raw, _used_channel_mask(model))
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    return np.clip(heatmaps, 0.0, 1.0).astype(np.float32), attributions, probs.cpu().numpy()


def occlusion_batch(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
                    target_index: Any, conc: Any = None) -> np.ndarray:
    """Target-logit drop (B, 6) when each stain is set to its mean (0 after normalisation); 0 for unused stains."""
    model.eval()
    normalised, targets, conc_tensor = _prepare(model, images_uint8, mean, std, target_index, conc)
    rows = torch.arange(len(targets), device=normalised.device)
    index = torch.as_tensor(targets, device=normalised.device)
    drops = np.zeros((len(targets), N_CHANNELS), dtype=np.float32)
    with torch.inference_mode():
        base = model(normalised, conc_tensor)[rows, index].float()
        for channel in np.flatnonzero(_used_channel_mask(model)):
            blanked = normalised.clone()
            blanked[:, channel] = 0.0
            drops[:, channel] = (base - model(blanked, conc_tensor)[rows, index].float()).cpu().numpy()
    return drops


def classifier_channel_stats(checkpoint: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Six-stain mean/std (uint8 units) for a classifier's full-image input.

    A checkpoint may record statistics for its stain subset only; unused stains then get
    mean 0 and std 1, which the model never sees (it selects its stains after normalising).
    """
    mean, std = [float(v) for v in checkpoint["channel_mean"]], [float(v) for v in checkpoint["channel_std"]]
    if len(mean) == N_CHANNELS:
        return mean, std
    channels = list(checkpoint.get("channels") or [])
    if len(channels) != len(mean):
        raise ValueError(f"checkpoint has {len(mean)} channel means for channels {channels}")
    full_mean, full_std = [0.0] * N_CHANNELS, [1.0] * N_CHANNELS
    for position, channel in enumerate(channels):
        full_mean[channel - 1], full_std[channel - 1] = mean[position], std[position]
    return full_mean, full_std


def _slug(value: Any) -> str:
    """A file-name-safe form of a treatment name or site id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._") or "_"


def panel_path(treatment: str, site_id: str) -> str:
    """Path of an image's panel PNG relative to the explain output."""
    return f"{PANELS_DIR}/{_slug(treatment)}__{_slug(site_id)}.png"


class ExplainBatch:
    """Ray Data callable class: shard rows in, per-image heatmap, attributions, probabilities (and panels) out.

    The classifier loads once per actor. The class to explain for a row is its
    ``label_col`` value, looked up in ``class_index``. Rows in ``panel_ids`` also get a
    PNG panel written straight to storage, so no image ever reaches the driver.
    """

    def __init__(self, checkpoint_uri: str, class_index: dict[str, int], label_col: str, out: str,
                 panel_ids: Sequence[str] = (), occlusion: bool = True, gpu: bool = False,
                 threads: int | None = None):
        from rxray.models.classifier import load_classifier

        if threads:
            torch.set_num_threads(threads)
        if gpu and not torch.cuda.is_available():
            raise RuntimeError("--gpu was given but this actor sees no CUDA device")
        model, checkpoint = load_classifier(checkpoint_uri)
        self.model = model.to(torch.device("cuda" if gpu else "cpu")).eval()
        self.classes = [str(c) for c in checkpoint["classes"]]
        self.mean, self.std = classifier_channel_stats(checkpoint)
        # Plate normalisation of `rxray finetune`: the classifier saw each image scaled by its plate's stain gains.
        self.plate_gains = {str(group): gains for group, gains in (checkpoint.get("plate_gains") or {}).items()}
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
        images = batch[IMAGE_COLUMN]
        if not self.plate_gains:
            return images
        from rxray.train.classify import row_gains

        gains = row_gains(self.plate_gains, batch["experiment"], batch["plate"])
        return np.asarray(images, dtype=np.float32) * gains[:, :, None, None]

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


# --------------------------------------------------------------------------- per-treatment importance


def _occlusion_means(drops: np.ndarray) -> dict[str, float]:
    """Mean signed logit drop and mean absolute drop over images (NaN when occlusion was not run)."""
    if np.isnan(drops).all():
        return {"occlusion_drop": float("nan"), "occlusion_effect": float("nan")}
    return {"occlusion_drop": float(np.nanmean(drops)), "occlusion_effect": float(np.nanmean(np.abs(drops)))}


def channel_importance(treatments: Sequence[str], target_classes_: Sequence[str], attributions: np.ndarray,
                       occlusion: np.ndarray, target_probs: Sequence[float],
                       planted: dict[str, int | None] | None = None) -> "pd.DataFrame":
    """Long table, one row per (treatment, stain), sorted by treatment then rank.

    Columns: treatment, target_class, n_images, mean_target_prob, channel (1-based), stain,
    importance (mean attribution share), importance_sd, rank (1 = most important,
    ties share the best rank), occlusion_drop (mean signed logit drop), occlusion_effect
    (mean absolute drop: blanking the stain moves the logit either way), occlusion_rank
    (by occlusion_effect), and,
    when ``planted`` (treatment -> 1-based channel) is given, planted_channel and planted.
    """
    import pandas as pd

    treatments = np.asarray(treatments, dtype=object)
    attributions, occlusion = np.asarray(attributions, np.float64), np.asarray(occlusion, np.float64)
    target_classes_, target_probs = np.asarray(target_classes_, dtype=object), np.asarray(target_probs, np.float64)
    rows = []
    for treatment in sorted(set(treatments)):
        mask = treatments == treatment
        for index in range(N_CHANNELS):
            row = {"treatment": treatment, "target_class": target_classes_[mask][0], "n_images": int(mask.sum()),
                   "mean_target_prob": float(target_probs[mask].mean()), "channel": index + 1,
                   "stain": CHANNEL_NAMES[index], "importance": float(attributions[mask, index].mean()),
                   "importance_sd": float(attributions[mask, index].std()),
                   **_occlusion_means(occlusion[mask, index])}
            if planted is not None:
                row["planted_channel"] = planted.get(treatment)
                row["planted"] = planted.get(treatment) == index + 1
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    by_treatment = table.groupby("treatment")
    table["rank"] = by_treatment["importance"].rank(ascending=False, method="min").astype(int)
    table["occlusion_rank"] = by_treatment["occlusion_effect"].rank(ascending=False, method="min").astype("Int64")
    if planted is not None:
        table["planted_channel"] = table["planted_channel"].astype("Int64")
    return table.sort_values(["treatment", "rank", "channel"]).reset_index(drop=True)


def planted_ranks(table: "pd.DataFrame") -> dict[str, Any] | None:
    """For tables with planted channels: each treatment's planted stain and its ranks, and how often it is first."""
    if table.empty or "planted" not in table.columns:
        return None
    planted_rows = table[table["planted"]]
    import pandas as pd

    per_treatment = {row.treatment: {"stain": row.stain, "rank": int(row.rank),
                                     "occlusion_rank": None if pd.isna(row.occlusion_rank) else int(row.occlusion_rank)}
                     for row in planted_rows.itertuples()}
    nulls = sorted(set(table["treatment"]) - set(per_treatment))
    first = sum(1 for v in per_treatment.values() if v["rank"] == 1)
    return {"treatments": per_treatment, "ranked_first": first, "with_planted_channel": len(per_treatment),
            "planted_null": nulls}


def top_stains(table: "pd.DataFrame") -> dict[str, str]:
    """Treatment -> its rank-1 stain by attribution share."""
    if table.empty:
        return {}
    best = table.sort_values(["treatment", "rank", "channel"]).groupby("treatment").head(1)
    return dict(zip(best["treatment"], best["stain"]))


# --------------------------------------------------------------------------- the pipeline


def _pool_plan(actors: int | None, gpu: bool) -> tuple[int, int]:
    """(pool size, torch threads per actor) for the running Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpu:
        if actors is None and int(resources.get("GPU", 0)) == 0:
            raise ConfigError("explain.actors", "no GPUs in the Ray cluster yet; give --actors to let the "
                                                "autoscaler add GPU workers")
        actors = actors or int(resources["GPU"])
    else:
        actors = actors or 1
    return actors, max(1, cpus // actors)


def explain_dataset(shards: "ray.data.Dataset", site_ids: Sequence[str], checkpoint_uri: str, *,
                    class_index: dict[str, int], label_col: str, out: str, panel_ids: Sequence[str],
                    occlusion: bool, batch_size: int, actors: int, threads: int,
                    gpu: bool = False) -> "ray.data.Dataset":
    """The lazy Ray Dataset of explanations for the shard rows whose site_id is in ``site_ids``."""
    import ray.data
    from ray.data.expressions import col

    # An expression (not a Python predicate) so the reader can drop unselected rows itself.
    selected = shards.filter(expr=col("site_id").is_in(list(site_ids)))
    return selected.map_batches(
        ExplainBatch,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "class_index": class_index,
                               "label_col": label_col, "out": out, "panel_ids": list(panel_ids),
                               "occlusion": occlusion, "gpu": gpu, "threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,  # one logical CPU, as in `rxray embed`: the rest stay free for reading shards
        num_gpus=1 if gpu else 0,
        udf_modifying_row_count=False,
    )


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

    from rxray.runtime import read_manifest

    uri = cfg.truth
    if uri is None:
        manifest = read_manifest(cfg.data) or {}
        source = (manifest.get("config") or {}).get("source")
        uri = storage.join(source, TRUTH_FILE) if source else None
        if uri is None or not storage.exists(uri):
            return None, None
    elif not storage.exists(uri):
        raise ConfigError("explain.truth", f"file not found: {uri}")
    truth = json.loads(storage.read_text(uri))
    return {name: entry.get("channel") for name, entry in truth.get("treatments", {}).items()}, uri


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


def explain(cfg: ExplainConfig) -> dict[str, Any]:
    """Grad-CAM, stain attributions and panels for ``n`` images per target; importance tables and manifest."""
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
    # A re-run replaces the output; the manifest goes first so a cut-off run never looks complete.
    for stale in ("_manifest.json", HEATMAPS_DIR, PANELS_DIR, IMPORTANCE_FIGURE, f"{IMPORTANCE_TABLE}.csv",
                  f"{IMPORTANCE_TABLE}.parquet"):
        storage.remove(storage.join(cfg.out, stale), recursive=True)
    storage.makedirs(cfg.out)

    actors, threads = _pool_plan(cfg.actors, cfg.gpu)
    read_columns = list(dict.fromkeys([c for c in METADATA_COLUMNS if c in shard_columns] + [label_col,
                                                                                            IMAGE_COLUMN]))
    explained = explain_dataset(read_shards(cfg.data, columns=read_columns), site_ids, checkpoint_uri,
                                class_index={label: classes.index(label) for label in set(targets.values())},
                                label_col=label_col, out=cfg.out, panel_ids=panel_ids, occlusion=cfg.occlusion,
                                batch_size=cfg.batch_size, actors=actors, threads=threads, gpu=cfg.gpu)
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
    model = {"uri": checkpoint_uri, "epoch": checkpoint.get("epoch"), "backbone": checkpoint["backbone"],
             "stem": checkpoint["stem"], "channels": checkpoint.get("channels"),
             "with_conc": bool(checkpoint.get("with_conc")), "task": checkpoint.get("task"),
             "label_col": label_col, "classes": classes}
    counts = {"targets": len(targets), "chosen": len(site_ids), "explained": len(frame), "panels": len(panels),
              "per_target": {t: len(ids) for t, ids in chosen.items()}}
    images_per_s = round(len(frame) / timer.seconds["explain"], 2) if timer.seconds["explain"] else None
    planted_summary = planted_ranks(table)
    figures = {"channel_importance": IMPORTANCE_FIGURE, "panels": panels}
    write_manifest(cfg.out, "explain", config_to_dict(cfg), model=model, counts=counts, timings=timer.seconds,
                   images_per_s=images_per_s,
                   pool={"actors": actors, "threads_per_actor": threads, "gpu": cfg.gpu,
                         "batch_size": cfg.batch_size},
                   importance_method=IMPORTANCE_METHOD, targets=targets, figures=figures,
                   tables={"channel_importance": tables}, layout={"heatmaps": HEATMAPS_DIR, "panels": PANELS_DIR},
                   top_stain=top_stains(table), truth=truth_uri, planted=planted_summary)
    return {"out": cfg.out, "heatmaps": heatmaps_uri, "checkpoint": checkpoint_uri, "explained": len(frame),
            "targets": len(targets), "panels": len(panels), "channel_importance": storage.join(cfg.out,
                                                                                          tables["csv"]),
            "top_stain": top_stains(table), "planted": planted_summary, "images_per_s": images_per_s,
            "seconds": timer.seconds}
