"""`rxray finetune`: transfer-learning classifiers on ingest shards with Ray Train.

The classifier (:class:`rxray.models.classifier.Classifier`) is a 6-channel encoder
(random init, torchvision weights, or a SimCLR encoder from `rxray pretrain`) with a
dense head; ``--freeze`` trains the head alone on the frozen encoder (the RxRx2
study's linear probe), ``--finetune`` trains everything with a smaller encoder
learning rate. Tasks: one treatment against controls (binary), one label value
against the rest (e.g. GPCR vs rest with ``--label-col moa``), or the identity of
several classes (multiclass).

Plate gain effects (per-plate, per-stain intensity scale) look like intensity
phenotypes, so by default every image is first scaled, stain by stain, by the
ratio of all controls' mean intensity to its own plate's controls' mean
(``--no-plate-norm`` turns it off); the gains are measured by one streaming pass
over the control sites and saved in the checkpoint (``plate_gains``).

Whole plates (or experiments) go to the train, validation and test splits
(:mod:`rxray.data.splits`); Ray Data reads each split with the group filter pushed
into the Parquet scan. Training runs and recovers exactly like pretraining (the
shared :mod:`rxray.train.loop`): one checkpoint per epoch under
``<out>/classifier/``, rerunning the command resumes it. Each epoch is scored on
the validation split; early stopping watches PR-AUC (binary) or macro F1
(multiclass), and the checkpoints carry the best epoch's weights. After training
the best model is written to ``<out>/checkpoint.pt`` (what ``load_classifier(out)``,
``rxray explain`` and ``rxray embed`` read) and scored on the test split by a Ray
Data actor pool, streaming: only (site, label, probabilities) rows reach the driver.

Outputs under ``out``: config.yaml, splits.json/splits.csv, metrics.jsonl (per
epoch), checkpoint.pt, predictions.parquet, metrics.json, confusion_matrix.png,
pr_curve.png, roc_curve.png and _manifest.json.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from rxray import storage
from rxray.config import ConfigError, FinetuneConfig, config_to_dict, config_to_yaml
from rxray.data.layout import CONTROL, N_CHANNELS, plate_groups
from rxray.errors import StepFailed
from rxray.outputs import CONFIG_FILE, CONFLICT, MANIFEST_FILE, STALE, read_manifest, rerun_decision, write_manifest
from rxray.runtime import Timer, ensure_ray, json_safe
from rxray.ssl.augment import SimCLRAugment, normalize
from rxray.train.checkpoints import CHECKPOINT_FILE, checkpoint_epoch, latest_checkpoint, load_checkpoint
from rxray.train.loop import (EpochLog, ThroughputMeter, TrainWorker, autocast_for, cache_datasets, fit,
                              read_metrics, unwrap, worker_cpus, worker_print)

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

    from rxray.models.classifier import Classifier

RUN_NAME = "classifier"
MODEL_FILE = CHECKPOINT_FILE  # <out>/checkpoint.pt: the selected (best validation) model
METRICS_JSON = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
FIGURES = ("confusion_matrix.png", "pr_curve.png", "roc_curve.png")
GAIN_COLUMN = "gain"  # per-row stain gains (6,) that plate normalisation multiplies images by
# Plate gains are clipped to this range: a plate's controls 4x dimmer than the rest is an imaging fault, not a gain.
GAIN_LIMITS = (0.25, 4.0)
REST = "rest"  # --negative rest: every label value but the positive one
OTHER_CLASS = "other"  # name of a negative class made of several label values
# Mild crops only: zooming changes apparent cell and nucleus size, itself a phenotype (e.g. nuclear_size).
CROP_SCALE = (0.8, 1.0)
_METADATA_COLUMNS = ("site_id", "experiment", "plate", "treatment")
_TENSOR_DTYPES = {"image": torch.uint8, "label": torch.int64, "conc": torch.float32, GAIN_COLUMN: torch.float32}
# Columns of the test predictions besides the class: metadata and the dose as recorded (NaN for controls).
_PREDICTION_COLUMNS = (*_METADATA_COLUMNS, "treatment_conc")
# A plate's control logits closer together than this are a saturated classifier, not a scale to divide by.
MIN_LOGIT_SPREAD = 0.1
# control-z decision rule: positive at this many robust SDs above the plate's controls (a screen's usual hit call).
CONTROL_Z = 3.0


# --------------------------------------------------------------------------- the task: which rows, which classes


@dataclass
class TaskPlan:
    """The classes of a run (logit order) and how label values map to them."""

    task: str
    label_col: str
    classes: list[str]
    value_to_class: dict[str, int]  # label value -> class index
    rest_class: int | None = None  # class of every other labelled value (binary vs rest), else None
    positive: str | None = None
    negative_classes: list[str] = field(default_factory=list)  # label values of the negative class (binary)

    def class_indices(self, values: Iterable[Any]) -> np.ndarray:
        """Class index of each label value (int64), -1 for rows outside the task or without a label."""
        import pandas as pd

        series = pd.Series(list(values), dtype=object)
        missing = series.isna() | (series.astype(str).str.strip() == "")
        index = series.astype(str).map(self.value_to_class)
        if self.rest_class is not None:
            index = index.fillna(self.rest_class)
        index = index.fillna(-1).astype(np.int64).to_numpy()
        return np.where(missing.to_numpy(), -1, index)


def plan_task(cfg: FinetuneConfig, values: Sequence[str]) -> TaskPlan:
    """The task of a config over the label values present in the data; ConfigError names a bad field."""
    present = sorted({str(v) for v in values if v is not None and str(v).strip() and str(v) != "nan"})
    shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")

    def require(name: str, wanted: Sequence[str]) -> None:
        absent = [w for w in wanted if w not in present]
        if absent:
            raise ConfigError(f"finetune.{name}", f"{', '.join(absent)} not among the {cfg.label_col!r} values in "
                                                  f"{cfg.data} ({shown})")

    if cfg.task == "multiclass":
        classes = list(cfg.classes) if cfg.classes else present
        require("classes", classes)
        if len(classes) < 2:
            raise ConfigError("finetune.classes", f"a multiclass task needs at least 2 classes, got {classes}")
        return TaskPlan("multiclass", cfg.label_col, classes, {c: k for k, c in enumerate(classes)})

    positive = str(cfg.positive)
    require("positive", [positive])
    negatives = list(cfg.negative) if cfg.negative else ([CONTROL] if cfg.label_col == "treatment" else [REST])
    if REST in negatives:
        if len(negatives) > 1:
            raise ConfigError("finetune.negative", "'rest' stands alone (every value but the positive one)")
        rest = [v for v in present if v != positive]
        if not rest:
            raise ConfigError("finetune.negative", f"no {cfg.label_col!r} value other than {positive!r} in {cfg.data}")
        return TaskPlan("binary", cfg.label_col, [OTHER_CLASS, positive], {positive: 1}, rest_class=0,
                        positive=positive, negative_classes=rest)
    if positive in negatives:
        raise ConfigError("finetune.negative", f"{positive!r} is the positive class; it cannot be negative too")
    require("negative", negatives)
    negative_name = negatives[0] if len(negatives) == 1 else OTHER_CLASS
    return TaskPlan("binary", cfg.label_col, [negative_name, positive], {v: 0 for v in negatives} | {positive: 1},
                    positive=positive, negative_classes=negatives)


def label_batch(batch: dict[str, np.ndarray], *, plan: TaskPlan, keep: Sequence[str] = (),
                gains: dict[str, list[float]] | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch function: the task's rows as ``image``, ``label`` (class index), ``conc``, ``gain`` and ``keep``.

    Rows outside the task (other label values, no label) are dropped. Concentration
    is 0 where missing (controls carry none). ``gain`` is the row's plate gain per
    stain from ``gains`` (keyed by plate group), 1 without.
    """
    index = plan.class_indices(batch[plan.label_col])
    rows = index >= 0
    conc = np.nan_to_num(np.asarray(batch["treatment_conc"], dtype=np.float32)[rows], nan=0.0)
    gain = row_gains(gains, batch["experiment"][rows], batch["plate"][rows])
    out = {"image": np.ascontiguousarray(batch["image"][rows]), "label": index[rows], "conc": conc,
           GAIN_COLUMN: gain}
    out.update({name: batch[name][rows] for name in keep})
    return out


def row_gains(gains: dict[str, Sequence[float]] | None, experiments: Sequence[Any],
              plates: Sequence[Any]) -> np.ndarray:
    """Each row's plate gain per stain (n, 6) float32 from ``gains`` (keyed by plate group); 1 where none is known."""
    gain = np.ones((len(experiments), N_CHANNELS), dtype=np.float32)
    if gains:
        for i, group in enumerate(plate_groups(experiments, plates)):
            gain[i] = gains.get(group, 1.0)
    return gain


def model_inputs(images: torch.Tensor, gain: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: "TrainAugment | None" = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised float inputs (B, 6, H, W) of uint8 images: plate gains, then augmentation or plain z-scores."""
    scaled = images.float() * gain.to(images.device, torch.float32).view(*gain.shape, 1, 1)
    return augment(scaled, generator) if augment is not None else normalize(scaled, mean, std)


# --------------------------------------------------------------------------- plate normalisation


def control_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: per plate group in the batch, its site count and per-stain sums of site means."""
    import pandas as pd

    means = batch["image"].reshape(*batch["image"].shape[:2], -1).mean(axis=2, dtype=np.float64)  # (B, 6)
    groups = pd.Series(plate_groups(batch["experiment"], batch["plate"]))
    sums = pd.DataFrame(means).groupby(groups.to_numpy()).agg(["sum", "count"])
    names = sums.index.to_numpy(dtype=object)
    totals = np.stack([sums[(c, "sum")].to_numpy() for c in range(means.shape[1])], axis=1)
    return {"group": names, "sites": sums[(0, "count")].to_numpy(dtype=np.int64), "sums": totals}


def plate_gains(uri: str, plates: Iterable[str]) -> dict[str, list[float]]:
    """Per plate group: all controls' mean intensity / this plate's controls' mean, per stain (clipped).

    One streaming pass over the control sites (the filter runs in the Parquet scan);
    only per-plate sums reach the driver. A plate without controls keeps gain 1.
    """
    from ray.data.expressions import col

    from rxray.data.shards import read_shards

    sums: dict[str, np.ndarray] = {}
    sites: dict[str, int] = {}
    controls = read_shards(uri, columns=["image", "experiment", "plate", "treatment"]).filter(
        expr=col("treatment") == CONTROL).map_batches(control_sums, batch_format="numpy")
    for batch in controls.iter_batches(batch_format="numpy", batch_size=None):
        for group, count, total in zip(batch["group"], batch["sites"], batch["sums"]):
            sums[group] = sums.get(group, 0.0) + total
            sites[group] = sites.get(group, 0) + int(count)
    plates = sorted(set(plates))
    if not sites:
        print(f"finetune: warning: no {CONTROL} sites in the data: plate normalisation is off", flush=True)
        return {}
    overall = sum(sums.values()) / sum(sites.values())
    missing = [p for p in plates if p not in sites]
    if missing:
        print(f"finetune: warning: no {CONTROL} sites on {len(missing)} plate(s) ({', '.join(missing[:5])}); "
              f"their gain stays 1", flush=True)
    return {group: np.clip(overall / np.maximum(sums[group] / sites[group], 1e-3), *GAIN_LIMITS).round(5).tolist()
            for group in plates if group in sites}


# --------------------------------------------------------------------------- the model


def slice_stem_channels(encoder_state: dict[str, torch.Tensor], target_state: dict[str, torch.Tensor],
                        channels: Sequence[int]) -> dict[str, torch.Tensor]:
    """A 6-channel encoder state dict with its input convolution cut to the selected (1-based) stains.

    The one weight whose input dimension is 6 in ``encoder_state`` and len(channels) in
    ``target_state`` (the adapted first conv, or the 1x1 projection of a project stem)
    keeps the kernels of the selected stains. Inputs are per-channel z-scores, so this
    equals feeding the 6-channel encoder zeros (each dropped stain's mean) for the
    dropped stains, at a fraction of the first layer's cost.
    """
    index = torch.tensor([c - 1 for c in channels])
    sliced, cut = dict(encoder_state), []
    for key, value in encoder_state.items():
        target = target_state.get(key)
        if target is not None and value.dim() >= 2 and value.shape != target.shape \
                and value.shape[1] == N_CHANNELS and target.shape[1] == len(channels) \
                and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]:
            sliced[key] = value.index_select(1, index).clone()
            cut.append(key)
    if len(channels) != N_CHANNELS and len(cut) != 1:
        raise ValueError(f"expected exactly one input convolution to cut to {len(channels)} channels, found {cut}")
    return sliced


def build_classifier(cfg: FinetuneConfig, n_classes: int, *, backbone: str, stem: str,
                     encoder_state: dict[str, torch.Tensor] | None = None, weights: str | None = None) -> "Classifier":
    """The classifier of a config: encoder for the selected stains (+ a head with a conc input if asked).

    ``encoder_state`` is a 6-channel SimCLR encoder's state dict (cut to the stains);
    otherwise the encoder is random or loads RGB ``weights``.
    """
    from rxray.models.backbones import build_encoder
    from rxray.models.classifier import Classifier
    from rxray.models.heads import ClassifierHead

    channels = list(cfg.channels)
    encoder = build_encoder(backbone, stem=stem, weights=None if encoder_state else weights,
                            in_channels=len(channels))
    if encoder_state is not None:
        encoder.load_state_dict(slice_stem_channels(encoder_state, encoder.state_dict(), channels))
    head = ClassifierHead(encoder.feature_dim, n_classes, hidden_dim=cfg.head_hidden, dropout=cfg.dropout,
                          extra_inputs=1 if cfg.with_conc else 0)
    return Classifier(encoder, head, channels=channels, with_conc=cfg.with_conc)


def freeze_encoder(model: "Classifier") -> None:
    """Stop the encoder learning: no gradients, and batch norm statistics fixed (eval mode)."""
    model.encoder.requires_grad_(False)
    model.encoder.eval()


def make_optimizer(cfg: FinetuneConfig, model: "Classifier") -> torch.optim.Optimizer:
    """AdamW over the head at --lr, and (fine-tuning) the encoder at --lr x --encoder-lr-scale."""
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    if not cfg.freeze:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.lr * cfg.encoder_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


class TrainAugment(SimCLRAugment):
    """One augmented, normalised view (B, C, S, S) per image: SimCLR's batched view with mild crops.

    Flips and quarter turns (orientation carries no label in a well), crops of 80-100 %
    of the area, per-stain brightness/contrast jitter and noise at ``strength``.
    """

    def __init__(self, image_size: int, strength: float, mean: Sequence[float], std: Sequence[float]):
        super().__init__(image_size, strength=strength, mean=mean, std=std, crop_scale=CROP_SCALE)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented view of uint8 (or uint8-unit float) images (B, C, H, W)."""
        return self._view(images.float(), generator)


def class_weights(counts: Sequence[int], mode: str) -> list[float]:
    """Loss weight per class: inverse to its training frequency ("auto", mean weight over samples 1) or 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "none":
        return [1.0] * len(counts)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1.0))).tolist()


# --------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStopping:
    """Best validation score so far and the epochs since; ``stopped`` after ``patience`` epochs without gain.

    A score is (metric, -loss): the metric decides, the validation loss breaks ties
    (a saturated PR-AUC of 1.0 still prefers the more confident epoch). NaN metrics
    never win.
    """

    patience: int
    best: tuple[float, float] | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, metric: float, loss: float, epoch: int) -> bool:
        """Record an epoch's validation result; True if it is the best so far."""
        score = (metric if math.isfinite(metric) else -math.inf, -loss if math.isfinite(loss) else -math.inf)
        if self.best is None or score > tuple(self.best):
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return False


def selection_metric(task: str) -> str:
    """The validation metric early stopping and model selection use: PR-AUC (binary) or macro F1."""
    return "pr_auc" if task == "binary" else "f1_macro"


# --------------------------------------------------------------------------- worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: restore the latest checkpoint if any, train and validate the remaining epochs."""
    cfg = FinetuneConfig(**loop_config["cfg"])
    plan = TaskPlan(**loop_config["plan"])
    mean, std = loop_config["channel_mean"], loop_config["channel_std"]
    worker = TrainWorker(threads=cfg.threads, cpus=loop_config["cpus_per_worker"])

    state = worker.restore(fallback_uri=loop_config.get("resume_from"), run_uri=storage.join(cfg.out, RUN_NAME))
    start_epoch = state["epoch"] if state else 0
    history: list[dict[str, Any]] = list(state["metrics"]) if state else []
    starts: list[int] = list(state.get("starts", [])) + [start_epoch] if state else [0]
    stopping = EarlyStopping(**state["early_stopping"]) if state else EarlyStopping(cfg.patience)
    stopping.patience = cfg.patience
    best: dict[str, Any] | None = state.get("best") if state else None
    if state and worker.is_chief:
        worker_print(f"finetune: workers restored the epoch {start_epoch} checkpoint")

    torch.manual_seed(cfg.seed)  # the same initial head on every worker and every fresh run
    encoder_state = None
    if not state and loop_config["encoder_uri"]:
        encoder_state = load_checkpoint(loop_config["encoder_uri"])["encoder"]
    model = build_classifier(cfg, len(plan.classes), backbone=loop_config["backbone"], stem=loop_config["stem"],
                             encoder_state=encoder_state, weights=None if state else cfg.weights)
    if state:
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
    if cfg.freeze:
        freeze_encoder(model)  # before DDP wraps it, so DDP syncs the trainable parameters only
    model = worker.prepare(model)
    optimizer = make_optimizer(cfg, unwrap(model))
    if state:
        optimizer.load_state_dict(state["optimizer"])  # after the move to the device: the state follows the params
    augment = TrainAugment(loop_config["image_size"], cfg.aug_strength, mean, std).to(worker.device) \
        if cfg.aug_strength > 0 else None
    weights = torch.tensor(loop_config["class_weights"], dtype=torch.float32, device=worker.device)
    criterion = nn.CrossEntropyLoss(weight=weights)
    generator = torch.Generator(device=worker.device)
    log = EpochLog(cfg.out, "finetune", cfg.epochs) if worker.is_chief else None
    context = _RunContext(cfg, plan, loop_config, starts)

    for epoch in range(start_epoch, cfg.epochs):
        if stopping.stopped:
            break
        metrics = _train_epoch(cfg, worker, model, augment, criterion, optimizer, generator, epoch, mean, std)
        if loop_config["has_val"]:
            validation = _validate(cfg, worker, unwrap(model), plan, weights, mean, std)
            improved = stopping.update(validation[selection_metric(plan.task)], validation["loss"], epoch + 1)
            metrics.update({f"val_{k}": v for k, v in validation.items()})
        else:  # nothing to select on: the latest epoch is the model
            improved, stopping.best_epoch = True, epoch + 1
        if improved:
            best = _best_weights(unwrap(model), epoch + 1, frozen=cfg.freeze)
        metrics.update(best_epoch=stopping.best_epoch, stopped_early=stopping.stopped)
        history.append(metrics)
        worker.report(_reported(metrics), epoch + 1,
                      context.state_builder(model, optimizer, epoch + 1, history, stopping, best))
        if log is not None:
            log.write(history)
    if log is not None:
        log.close()


@dataclass
class _RunContext:
    """What every checkpoint of a run records besides the weights."""

    cfg: FinetuneConfig
    plan: TaskPlan
    loop_config: dict[str, Any]
    starts: list[int]

    def describe(self) -> dict[str, Any]:
        """The fields that say how the model was made and how to feed it."""
        cfg, plan = self.cfg, self.plan
        return {"config": config_to_dict(cfg), "backbone": self.loop_config["backbone"],
                "stem": self.loop_config["stem"], "channels": list(cfg.channels), "in_channels": len(cfg.channels),
                "with_conc": cfg.with_conc, "classes": list(plan.classes), "task": plan.task,
                "label_col": plan.label_col, "positive": plan.positive, "negative_classes": list(plan.negative_classes),
                "channel_mean": list(self.loop_config["channel_mean"]),
                "channel_std": list(self.loop_config["channel_std"]), "head_hidden": cfg.head_hidden,
                "dropout": cfg.dropout, "encoder_init": self.loop_config["encoder_init"],
                "plate_norm": bool(self.loop_config["plate_gains"]), "plate_gains": self.loop_config["plate_gains"],
                "selection_metric": selection_metric(plan.task) if self.loop_config["has_val"] else None}

    def state_builder(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                      history: list[dict[str, Any]], stopping: EarlyStopping,
                      best: dict[str, Any] | None) -> Callable[[], dict[str, Any]]:
        """A builder of the epoch's checkpoint dict (called on rank 0 only)."""
        def build() -> dict[str, Any]:
            inner = unwrap(model)
            return {"encoder": inner.encoder.state_dict(), "head": inner.head.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch, **self.describe(),
                    "metrics": list(history), "starts": list(self.starts),
                    "early_stopping": dataclasses.asdict(stopping), "best": best}
        return build


def _best_weights(model: "Classifier", epoch: int, frozen: bool) -> dict[str, Any]:
    """CPU copies of the weights of the best epoch (the head only when the encoder is frozen: it never changes)."""
    def copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    return {"epoch": epoch, "head": copy(model.head), "encoder": None if frozen else copy(model.encoder)}


def _reported(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric metrics, as Ray Train's result wants them."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}


def _train_epoch(cfg: FinetuneConfig, worker: TrainWorker, model: nn.Module, augment: TrainAugment | None,
                 criterion: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                 mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """One pass over this worker's training shard; loss and accuracy averaged over all workers."""
    generator.manual_seed(cfg.seed + 1_000_003 * worker.rank + epoch)  # a resumed epoch draws the same views
    model.train()
    if cfg.freeze:
        unwrap(model).encoder.eval()  # frozen batch norm: running statistics stay those of the encoder
    meter = ThroughputMeter(worker.device)
    loss_sum = torch.zeros((), device=worker.device)
    correct = torch.zeros((), device=worker.device)
    steps = seen = 0
    batches = worker.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, dtypes=_TENSOR_DTYPES)
    for batch in meter.timed(batches):
        labels = batch["label"]
        with torch.no_grad():
            inputs = model_inputs(batch["image"], batch[GAIN_COLUMN], mean, std, augment, generator)
        if worker.on_gpu:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast_for(worker.device):
            logits = model(inputs, batch["conc"] if cfg.with_conc else None)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        steps += 1
        seen += labels.shape[0]
        meter.update(labels.shape[0] * worker.world_size)
    if steps == 0:
        raise RuntimeError(f"worker {worker.rank} got no full batch of {cfg.batch_size} sites in epoch {epoch}")
    seconds = meter.seconds
    means = worker.mean_over_workers({"train_loss": float(loss_sum) / steps, "train_accuracy": float(correct) / seen,
                                      "images_per_s": meter.images / seconds})
    return {"epoch": epoch + 1, **means, "steps": steps, "seconds": round(seconds, 3),
            "data_wait_s": round(meter.data_wait_s, 3)}


def _validate(cfg: FinetuneConfig, worker: TrainWorker, model: "Classifier", plan: TaskPlan, weights: torch.Tensor,
              mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    """Loss, accuracy, F1, ROC-AUC and PR-AUC on the whole validation split (each worker scores its shard).

    The unwrapped model runs here: a DDP forward would wait for the other workers,
    whose shards may hold a different number of batches.
    """
    from rxray.evaluate.metrics import classification_metrics

    model.eval()
    labels, probabilities = [], []
    shard = worker.dataset_shard("val")
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False, device=worker.device,
                                              dtypes=_TENSOR_DTYPES):
            inputs = model_inputs(batch["image"], batch[GAIN_COLUMN], mean, std)
            with autocast_for(worker.device):
                logits = model(inputs, batch["conc"] if cfg.with_conc else None)
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
    k = len(plan.classes)
    y, p = _all_gather(worker, np.concatenate(labels) if labels else np.zeros(0, np.int64),
                       np.concatenate(probabilities) if probabilities else np.zeros((0, k), np.float32))
    if len(y) == 0:
        raise RuntimeError("the validation split reached no worker (no validation sites?)")
    class_weight = weights.cpu().numpy()[y]
    loss = float(np.sum(class_weight * -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))) / class_weight.sum())
    scores = classification_metrics(y, p, labels=list(range(k)))
    return {"loss": loss, "accuracy": scores["accuracy"], "f1": scores["f1"], "f1_macro": scores["f1_macro"],
            "roc_auc": scores["roc_auc"], "pr_auc": scores["pr_auc"], "n": len(y)}


def _all_gather(worker: TrainWorker, labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's (labels, probabilities) concatenated, on every worker (so all take the same decisions)."""
    if worker.world_size == 1 or not torch.distributed.is_initialized():
        return labels, probabilities
    gathered: list[Any] = [None] * worker.world_size
    torch.distributed.all_gather_object(gathered, (labels, probabilities))
    return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])


# --------------------------------------------------------------------------- test-split predictions


class Predictor:
    """Ray Data callable class: the classifier loads once; batch in, (site, label, class probabilities) out."""

    def __init__(self, model_uri: str, gpu: bool = False, threads: int | None = None):
        from rxray.models.classifier import load_classifier

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        model, state = load_classifier(model_uri)
        self.model = model.to(self.device)
        self.with_conc = bool(state.get("with_conc"))
        self.mean, self.std = state["channel_mean"], state["channel_std"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's metadata and labels with ``probs`` (B, n_classes) float32."""
        images = torch.from_numpy(np.array(batch["image"], copy=True)).to(self.device)
        gain = torch.from_numpy(np.array(batch[GAIN_COLUMN], dtype=np.float32))
        conc = torch.from_numpy(np.array(batch["conc"], dtype=np.float32)).to(self.device)
        with torch.inference_mode(), autocast_for(self.device):
            logits = self.model(model_inputs(images, gain, self.mean, self.std), conc if self.with_conc else None)
        out = {name: values for name, values in batch.items() if name not in ("image", GAIN_COLUMN)}
        out["probs"] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return out


def predict(dataset: "ray.data.Dataset", model_uri: str, *, batch_size: int, actors: int, cpus_per_actor: float,
            gpu: bool) -> "pd.DataFrame":
    """Predictions for a labelled split, streamed through an actor pool: one small row per site."""
    import pandas as pd
    import ray.data

    predicted = dataset.map_batches(
        Predictor, fn_constructor_kwargs={"model_uri": model_uri, "gpu": gpu,
                                          "threads": max(1, math.floor(cpus_per_actor))},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0, udf_modifying_row_count=False)
    parts = []
    for batch in predicted.iter_batches(batch_size=4096, batch_format="numpy"):
        frame = pd.DataFrame({k: v for k, v in batch.items() if k != "probs"})
        frame["probs"] = list(np.asarray(batch["probs"], dtype=np.float32))
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=[*_PREDICTION_COLUMNS, "label", "conc", "probs"])
    return pd.concat(parts, ignore_index=True).sort_values("site_id", ignore_index=True)


def plate_control_zscores(predictions: "pd.DataFrame", plan: TaskPlan) -> "pd.DataFrame":
    """Binary predictions with each plate's positive-class logits as robust z-scores against its control sites.

    A classifier's scores drift from plate to plate with what plate normalisation of
    the pixels leaves (offsets, illumination), so one threshold learnt on validation
    plates calls whole control wells positive elsewhere while the ranking within each
    plate is right. Screens normalise every readout to the plate's negative controls
    (their positions are known from the plate map) as a z-score; this does the same to
    the score: z = (logit - median of the plate's control logits) / their spread (1.4826
    x MAD, floored at ``MIN_LOGIT_SPREAD``), reported as probability sigmoid(z), so the
    threshold learnt on validation plates is in units of control variation. Plates
    without control sites keep their scores.
    """
    if plan.task != "binary" or predictions.empty:
        return predictions
    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float64)
    logit = np.log(np.clip(probs[:, 1], 1e-7, 1 - 1e-7)) - np.log(np.clip(probs[:, 0], 1e-7, 1 - 1e-7))
    plates = np.asarray(plate_groups(predictions["experiment"], predictions["plate"]))
    is_control = (predictions["treatment"] == CONTROL).to_numpy()
    z = logit.copy()
    for plate in np.unique(plates[is_control]):
        rows = plates == plate
        controls = logit[rows & is_control]
        centre = np.median(controls)
        spread = max(1.4826 * float(np.median(np.abs(controls - centre))), MIN_LOGIT_SPREAD)
        z[rows] = (logit[rows] - centre) / spread
    positive = 1.0 / (1.0 + np.exp(-z))
    centred = predictions.copy()
    centred["probs"] = list(np.stack([1.0 - positive, positive], axis=1).astype(np.float32))
    return centred


def write_evaluation(out: str, predictions: "pd.DataFrame", plan: TaskPlan,
                     threshold: float | None = None) -> dict[str, Any]:
    """Test metrics (metrics.json), predictions.parquet and the three plots; returns the metrics.

    ``threshold`` (binary tasks): the positive-class probability from which a site
    is called positive, chosen on the validation split; the headline metrics use
    it and ``at_argmax`` keeps the plain highest-probability ones.
    """
    from rxray.evaluate.metrics import classification_metrics
    from rxray.evaluate.plots import plot_confusion_matrix, plot_pr_curve, plot_roc_curve

    y = predictions["label"].to_numpy(dtype=np.int64)
    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float64)
    names = [plan.classes[i] for i in y]
    metrics = classification_metrics(names, probs, labels=plan.classes, threshold=threshold)
    if plan.task == "binary":
        metrics["prevalence"] = float(np.mean(y == 1))
        metrics["threshold"] = 0.5 if threshold is None else threshold
        argmax = classification_metrics(names, probs, labels=plan.classes)
        metrics["at_argmax"] = {key: argmax[key] for key in ("accuracy", "precision", "recall", "f1",
                                                             "confusion_matrix")}
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), plan.classes, storage.join(out, FIGURES[0]))
    plot_pr_curve(y, probs, storage.join(out, FIGURES[1]), labels=plan.classes)
    plot_roc_curve(y, probs, storage.join(out, FIGURES[2]), labels=plan.classes)
    storage.write_bytes(storage.join(out, PREDICTIONS_FILE), _predictions_parquet(predictions, plan, threshold))
    return metrics


def _predictions_parquet(predictions: "pd.DataFrame", plan: TaskPlan, threshold: float | None = None) -> bytes:
    """predictions.parquet: metadata, true and predicted class names, and the class probabilities (logit order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rxray.evaluate.metrics import predicted_classes

    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float32) if len(predictions) else \
        np.zeros((0, len(plan.classes)), np.float32)
    classes = np.asarray(plan.classes, dtype=object)
    y = predictions["label"].to_numpy(dtype=np.int64)
    columns = {name: pa.array(predictions[name].to_numpy()) for name in _PREDICTION_COLUMNS if name in predictions}
    columns.update({
        "label": pa.array(classes[y].tolist(), pa.string()),
        "predicted": pa.array(classes[predicted_classes(probs, threshold)].tolist() if len(probs) else [],
                              pa.string()),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), len(plan.classes)),
    })
    table = pa.table(columns).replace_schema_metadata({"classes": json.dumps(plan.classes)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- driver


@dataclass
class _Run:
    """What the driver works out before training: statistics, starting point, task, splits, progress so far."""

    channel_mean: list[float]
    channel_std: list[float]
    backbone: str
    stem: str
    encoder_uri: str | None
    encoder_init: str
    plan: TaskPlan
    splits: dict[str, Any]
    done: int
    resume_from: str | None
    stopped: bool
    gains: dict[str, list[float]] | None = None  # plate group -> stain gains, once measured

    def plate_gains(self, cfg: FinetuneConfig) -> dict[str, list[float]]:
        """The plate gains of the task's plates ({} with --no-plate-norm), measured on first use."""
        if self.gains is None:
            plates = [g for members in self.splits["members"].values() if members
                      for g in plate_groups(*zip(*members))]
            self.gains = plate_gains(cfg.data, plates) if cfg.plate_norm else {}
        return self.gains

    @property
    def train_sites(self) -> list[int]:
        """Training sites per class, in logit order."""
        return [self.splits["counts"]["train"]["classes"].get(c, 0) for c in self.plan.classes]


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train (or resume, or report complete) a classifier into ``cfg.out``, then score it on the test split."""
    timer = Timer()
    with timer.time("prepare"):
        run = _prepare(cfg)
    if run.done >= cfg.epochs or run.stopped:
        how = f"stopped early after {run.done} epochs" if run.done < cfg.epochs else f"{run.done} of {cfg.epochs} epochs"
        print(f"finetune: {cfg.out} is already complete ({how}); nothing to train", flush=True)
        if storage.exists(storage.join(cfg.out, MANIFEST_FILE)):
            return _summary(cfg, status="complete")
    else:
        _train(cfg, run, timer)
    model = _write_model(cfg)
    test_metrics = _evaluate(cfg, run, model, timer)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 3)
    counts = run.splits["counts"]
    fields = {"status": "trained", "task": run.plan.task, "classes": run.plan.classes,
              "negative_classes": run.plan.negative_classes, "checkpoint": model["uri"], "best_epoch": model["epoch"],
              "epochs_completed": model["epochs_trained"], "resumed_from": run.done,
              "stopped_early": bool((model.get("early_stopping") or {}).get("stopped")),
              "encoder_init": run.encoder_init, "splits": run.splits["document"],
              "counts": {"sites": {s: counts[s]["sites"] for s in counts},
                         "classes": {s: counts[s]["classes"] for s in counts}},
              "test": _headline(test_metrics), "figures": list(FIGURES) if test_metrics else [],
              "timings": timer.seconds}
    write_manifest(cfg.out, "finetune", config_to_dict(cfg), **json_safe(fields))
    return _summary(cfg, status="trained")


def _prepare(cfg: FinetuneConfig) -> _Run:
    """Check the inputs and work out the task, the splits and the progress so far; ConfigError on bad input."""
    from rxray.data.shards import channel_stats

    try:
        mean, std = channel_stats(cfg.data)
    except FileNotFoundError as exc:
        raise ConfigError("finetune.data", str(exc)) from None
    backbone, stem, encoder_uri, encoder_init = _starting_point(cfg)
    meta = _read_metadata(cfg)
    plan = plan_task(cfg, meta[cfg.label_col].tolist())
    meta["class"] = plan.class_indices(meta[cfg.label_col])
    meta = meta[meta["class"] >= 0].reset_index(drop=True)
    controls = meta["treatment"] == CONTROL
    if cfg.with_conc and controls.any() and not controls.all():
        print(f"finetune: warning: --with-conc: {CONTROL} sites carry no concentration (0), so the dose alone tells "
              f"them from treated sites; compare with a run without it", flush=True)
    splits = _make_splits(cfg, meta, plan)
    _check_rerun(cfg, splits)
    done, resume_from, stopped = _training_state(cfg)
    return _Run(mean, std, backbone, stem, encoder_uri, encoder_init, plan, splits, done, resume_from, stopped)


def _train(cfg: FinetuneConfig, run: _Run, timer: Timer) -> None:
    """Write the run's config and splits, then train the remaining epochs on Ray Train."""
    _check_trainable(cfg, run)
    if run.done:
        print(f"finetune: resuming from epoch {run.done} ({run.resume_from})", flush=True)
    storage.makedirs(cfg.out)
    storage.write_text(storage.join(cfg.out, CONFIG_FILE), config_to_yaml(cfg))
    _write_split_files(cfg, run.splits)
    ensure_ray()
    cpus = worker_cpus(cfg.workers, cfg.gpu, None)
    gains = run.plate_gains(cfg)
    datasets = {"train": split_dataset(cfg, run.plan, run.splits, "train", gains=gains)}
    if run.splits["counts"]["val"]["sites"]:
        datasets["val"] = split_dataset(cfg, run.plan, run.splits, "val", gains=gains)
    image_side = _image_side(cfg.data)
    datasets = cache_datasets(datasets, {name: run.splits["counts"][name]["sites"] for name in datasets},
                              N_CHANNELS * image_side ** 2, cfg.cache, "finetune")
    loop_config = {"cfg": config_to_dict(cfg), "plan": dataclasses.asdict(run.plan),
                   "channel_mean": run.channel_mean, "channel_std": run.channel_std,
                   "image_size": image_side, "cpus_per_worker": cpus, "resume_from": run.resume_from,
                   "backbone": run.backbone, "stem": run.stem, "encoder_uri": run.encoder_uri,
                   "encoder_init": run.encoder_init, "has_val": "val" in datasets, "plate_gains": gains,
                   "class_weights": class_weights(run.train_sites, cfg.class_weights)}
    with timer.time("fit"):
        try:
            fit(train_loop_per_worker, loop_config, out=cfg.out, name=RUN_NAME, workers=cfg.workers, gpu=cfg.gpu,
                cpus_per_worker=cpus, max_failures=cfg.max_failures, datasets=datasets)
        except Exception as exc:  # Ray's TrainingFailedError: the failure budget is spent
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StepFailed(f"fine-tuning failed after up to {cfg.max_failures} restarts: {first}") from exc


def _evaluate(cfg: FinetuneConfig, run: _Run, model: dict[str, Any], timer: Timer) -> dict[str, Any] | None:
    """Score the selected model on the test split and write metrics.json, predictions and plots (None: no test split)."""
    if not run.splits["counts"]["test"]["sites"]:
        print("finetune: --test-frac 0 leaves no test split; no test metrics", flush=True)
        return None
    ensure_ray()
    with timer.time("evaluate"):
        cpus = worker_cpus(cfg.workers, cfg.gpu, None)
        threshold = _validation_threshold(cfg, run, model, cpus)
        test = split_dataset(cfg, run.plan, run.splits, "test", keep=_PREDICTION_COLUMNS, gains=run.plate_gains(cfg))
        predictions = predict(test, model["uri"], batch_size=cfg.batch_size, actors=cfg.workers,
                              cpus_per_actor=cpus, gpu=cfg.gpu)
        if cfg.plate_scores:
            predictions = plate_control_zscores(predictions, run.plan)
        metrics = write_evaluation(cfg.out, predictions, run.plan, threshold)
        metrics.update(task=run.plan.task, label_col=run.plan.label_col, classes=run.plan.classes,
                       positive=run.plan.positive, negative_classes=run.plan.negative_classes, split="test",
                       best_epoch=model["epoch"], selection_metric=model.get("selection_metric"))
        storage.write_text(storage.join(cfg.out, METRICS_JSON), json.dumps(json_safe(metrics), indent=2))
    return metrics


def decision_rule(cfg: FinetuneConfig) -> str:
    """The binary decision rule a config asks for: control-z, val-f1 or argmax (auto resolved)."""
    if cfg.threshold != "auto":
        return cfg.threshold
    return "control-z" if cfg.plate_scores else "val-f1"


def _validation_threshold(cfg: FinetuneConfig, run: _Run, model: dict[str, Any], cpus: float) -> float | None:
    """Binary tasks: the decision threshold on the positive-class probability; None (argmax) otherwise.

    control-z: sigmoid(CONTROL_Z), i.e. a site is called positive when it scores
    CONTROL_Z robust standard deviations above its own plate's control sites, the usual
    hit call of a screen; it needs no validation plate, whose one or two plates would
    make the cut as noisy as the sites near it. val-f1: the F1-maximising threshold of
    the selected model on the validation split (class weights shift probabilities away
    from calibration, so 0.5 is not the natural cut). The test split never informs it.
    """
    from rxray.evaluate.metrics import best_f1_threshold

    rule = decision_rule(cfg)
    if run.plan.task != "binary" or rule == "argmax":
        return None
    if rule == "control-z":
        threshold = 1.0 / (1.0 + math.exp(-CONTROL_Z))
        print(f"finetune: decision threshold z >= {CONTROL_Z:g} against each plate's control sites "
              f"(probability {threshold:.3f})", flush=True)
        return threshold
    if not run.splits["counts"]["val"]["sites"]:
        return None
    val = split_dataset(cfg, run.plan, run.splits, "val", keep=_PREDICTION_COLUMNS, gains=run.plate_gains(cfg))
    predictions = predict(val, model["uri"], batch_size=cfg.batch_size, actors=cfg.workers, cpus_per_actor=cpus,
                          gpu=cfg.gpu)
    if cfg.plate_scores:
        predictions = plate_control_zscores(predictions, run.plan)
    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float64)
    threshold = best_f1_threshold(predictions["label"].to_numpy() == 1, probs[:, 1])
    print(f"finetune: decision threshold {threshold:.3f} (best F1 on the {len(predictions)} validation sites)",
          flush=True)
    return threshold


def _starting_point(cfg: FinetuneConfig) -> tuple[str, str, str | None, str]:
    """(backbone, stem, SimCLR checkpoint URI or None, description) of the encoder the run starts from."""
    if cfg.encoder:
        try:
            state = load_checkpoint(cfg.encoder)
        except FileNotFoundError as exc:
            raise ConfigError("finetune.encoder", str(exc)) from None
        missing = [k for k in ("encoder", "backbone", "stem") if k not in state]
        if missing:
            raise ConfigError("finetune.encoder", f"{state['uri']} is not an encoder checkpoint (lacks {missing})")
        if state.get("in_channels", N_CHANNELS) != N_CHANNELS:
            raise ConfigError("finetune.encoder", f"{state['uri']} takes {state['in_channels']} channels; stain "
                                                  f"subsets are cut from a {N_CHANNELS}-channel encoder")
        return state["backbone"], state["stem"], state["uri"], f"simclr:{state['uri']}"
    if cfg.weights:
        from rxray.models.weights import WeightsError

        try:  # build once so a bad file fails in one line before any worker starts
            build_classifier(cfg, 2, backbone=cfg.backbone, stem=cfg.stem, weights=cfg.weights)
        except WeightsError as exc:
            raise ConfigError("finetune.weights", str(exc)) from None
        return cfg.backbone, cfg.stem, None, f"weights:{cfg.weights}"
    return cfg.backbone, cfg.stem, None, "random"


def _read_metadata(cfg: FinetuneConfig) -> "pd.DataFrame":
    """The shards' metadata and label columns (no images): the work list for classes, splits and counts."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(cfg.data)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = dataset.schema.names
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError("finetune.data", f"no ingest shards at {cfg.data}: {str(exc).splitlines()[0]}") from None
    if cfg.label_col not in names:
        labels = [n for n in names if n not in ("image", "site_id", "well_id", "site", "well", "treatment_conc")]
        raise ConfigError("finetune.label_col", f"{cfg.label_col!r} is not a column of {cfg.data} (columns: "
                                                f"{', '.join(labels)}; join labels at ingest with --labels)")
    columns = list(dict.fromkeys([*_METADATA_COLUMNS, cfg.label_col]))
    meta = dataset.to_table(columns=columns).to_pandas()
    if meta.empty:
        raise ConfigError("finetune.data", f"the shards at {cfg.data} hold no rows")
    return meta


def _make_splits(cfg: FinetuneConfig, meta: "pd.DataFrame", plan: TaskPlan) -> dict[str, Any]:
    """Group -> split for the task's rows, the filter values of each split, and per-split counts."""
    from rxray.data.splits import assign_splits, group_keys, split_counts

    groups = group_keys(meta, cfg.split_by)
    names = meta["class"].map(dict(enumerate(plan.classes)))
    classes_by_group = names.groupby(groups).agg(lambda s: set(s)).to_dict()
    try:
        assignment = assign_splits(groups.unique(), cfg.val_frac, cfg.test_frac, cfg.seed, classes_by_group)
    except ValueError as exc:
        raise ConfigError("finetune.split_by", str(exc)) from None
    # The (experiment, plate) pairs of each split: the values its Parquet filter matches.
    plates = meta[["experiment", "plate"]].drop_duplicates().sort_values(["experiment", "plate"])
    members: dict[str, list[tuple[str, Any]]] = {split: [] for split in ("train", "val", "test")}
    for (experiment, plate), group in zip(plates.itertuples(index=False), group_keys(plates, cfg.split_by)):
        members[assignment[group]].append((str(experiment), plate.item() if hasattr(plate, "item") else plate))
    counts = split_counts(groups, assignment, names)
    document = {"by": cfg.split_by, "seed": cfg.seed, "groups": assignment}
    return {"assignment": assignment, "members": members, "counts": counts, "document": document,
            "sites_per_group": groups.value_counts().to_dict()}


def split_dataset(cfg: FinetuneConfig, plan: TaskPlan, splits: dict[str, Any], split: str,
                  keep: Sequence[str] = (), gains: dict[str, list[float]] | None = None) -> "ray.data.Dataset":
    """The task's rows of one split as a lazy Ray Dataset: the group filter runs inside the Parquet scan."""
    from ray.data.expressions import col

    from rxray.data.shards import read_shards

    columns = list(dict.fromkeys(["image", "experiment", "plate", "treatment_conc", plan.label_col, *keep]))
    members = splits["members"][split]
    if cfg.split_by == "experiment":
        predicate = col("experiment").is_in(sorted({experiment for experiment, _ in members}))
    else:
        predicate = None
        for experiment, plate in members:
            term = (col("experiment") == experiment) & (col("plate") == plate)
            predicate = term if predicate is None else predicate | term
    return read_shards(cfg.data, columns=columns).filter(expr=predicate).map_batches(
        label_batch, fn_kwargs={"plan": plan, "keep": list(keep), "gains": gains}, batch_format="numpy")


def _check_rerun(cfg: FinetuneConfig, splits: dict[str, Any]) -> None:
    """A rerun into an existing output must keep the settings that shaped it, and get the same splits."""
    from rxray.data.splits import read_splits

    rerun = rerun_decision(cfg.out, cfg)
    if rerun.action == CONFLICT:
        name, (old, new) = next(iter(rerun.changed.items()))
        raise ConfigError(f"finetune.{name}", f"{cfg.out} holds a run with {name}={old!r}, not {new!r}; "
                                              f"use a new --out to start over")
    if rerun.action == STALE:
        raise ConfigError(f"finetune.{next(iter(rerun.changed))}",
                          f"{cfg.out} holds a finished classifier trained with other settings ({rerun.changes()}); "
                          f"use a new --out to train with them, or more --epochs to continue the run with them")
    written = read_splits(cfg.out)
    if written is not None and written["groups"] != splits["assignment"]:
        raise ConfigError("finetune.data", f"the groups in {cfg.data} no longer give the splits {cfg.out} was "
                                           f"trained with; use a new --out")


def _write_split_files(cfg: FinetuneConfig, splits: dict[str, Any]) -> None:
    """splits.json and splits.csv under the output (group -> split, and counts)."""
    from rxray.data.splits import write_splits

    write_splits(cfg.out, splits["assignment"], splits["counts"], by=cfg.split_by, seed=cfg.seed,
                 val_frac=cfg.val_frac, test_frac=cfg.test_frac, sites_per_group=splits["sites_per_group"])
    counts = splits["counts"]
    print("finetune: splits by " + cfg.split_by + ": " + "; ".join(
        f"{s} {len(counts[s]['groups'])} group(s), {counts[s]['sites']} sites" for s in counts), flush=True)


def _check_trainable(cfg: FinetuneConfig, run: _Run) -> None:
    """Every class needs training sites, and every worker a full batch; say so before any worker starts."""
    plan, counts = run.plan, run.splits["counts"]
    absent = [c for c, n in zip(plan.classes, run.train_sites) if n == 0]
    if absent:
        raise ConfigError("finetune.classes" if plan.task == "multiclass" else "finetune.positive",
                          f"no training sites of {', '.join(absent)} in the training {cfg.split_by}s "
                          f"{counts['train']['groups']}; choose other classes or another --seed")
    rows = counts["train"]["sites"]
    if rows // cfg.workers < cfg.batch_size:
        raise ConfigError("finetune.batch_size", f"{cfg.batch_size} per worker x {cfg.workers} workers needs at "
                                                 f"least {cfg.batch_size * cfg.workers} training sites; the "
                                                 f"training split has {rows}")
    for split in ("val", "test"):
        missing = [c for c in plan.classes if counts[split]["sites"] and not counts[split]["classes"].get(c)]
        if missing:
            print(f"finetune: warning: the {split} split has no sites of {', '.join(missing)}", flush=True)


def _training_state(cfg: FinetuneConfig) -> tuple[int, str | None, bool]:
    """Epochs already trained into ``cfg.out``, the latest checkpoint's URI, and whether early stopping ended it."""
    try:
        latest = latest_checkpoint(storage.join(cfg.out, RUN_NAME))
    except FileNotFoundError:
        return 0, None, False
    state = load_checkpoint(latest)
    stopped = bool((state.get("early_stopping") or {}).get("stopped"))
    return checkpoint_epoch(latest) or state["epoch"], latest, stopped


def _image_side(uri: str) -> int:
    """Image side S of the shards, from the ingest manifest or the Parquet schema."""
    from rxray.data.shards import read_shards, shard_manifest

    shape = shard_manifest(uri).get("image_shape")
    if not shape:
        schema = read_shards(uri, columns=["image"]).schema()
        shape = schema.types[schema.names.index("image")].shape
    return int(shape[-1])


def _write_model(cfg: FinetuneConfig) -> dict[str, Any]:
    """Write the selected model (best validation epoch) as ``<out>/checkpoint.pt``; returns its dict (with ``uri``)."""
    state = load_checkpoint(storage.join(cfg.out, RUN_NAME))
    best = state.get("best") or {"epoch": state["epoch"], "head": state["head"], "encoder": None}
    model = {key: value for key, value in state.items() if key not in ("best", "uri")}
    model.update(head=best["head"], encoder=best["encoder"] if best["encoder"] is not None else state["encoder"],
                 epoch=best["epoch"], epochs_trained=state["epoch"])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    uri = storage.join(cfg.out, MODEL_FILE)
    storage.write_bytes(uri, buffer.getvalue())
    return {**model, "uri": uri}


def _headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The test metrics a summary shows."""
    if metrics is None:
        return None
    keys = ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc", "pr_auc", "prevalence", "threshold", "n")
    return {k: metrics[k] for k in keys if k in metrics}


def _summary(cfg: FinetuneConfig, status: str) -> dict[str, Any]:
    """The summary the CLI prints: the manifest's status, counts, test metrics, and the per-epoch history."""
    manifest = read_manifest(cfg.out) or {}
    keep = ("task", "classes", "checkpoint", "best_epoch", "epochs_completed", "resumed_from", "stopped_early",
            "counts", "test", "figures", "seconds")
    return {"out": cfg.out, **{k: manifest.get(k) for k in keep}, "status": status, "history": read_metrics(cfg.out)}
