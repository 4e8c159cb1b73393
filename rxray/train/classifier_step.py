"""The classifier's part of the shared training loop: optimiser, augmentation, validation, early stopping.

The classifier (:class:`rxray.models.classifier.Classifier`) is a 6-channel encoder
(random init, torchvision weights, or a SimCLR encoder from `rxray pretrain`, cut to the
selected stains) with a dense head; ``--freeze`` trains the head alone on the frozen
encoder (the RxRx2 study's linear probe), ``--finetune`` trains everything with a
smaller encoder learning rate. Each epoch is scored on the validation split; early
stopping watches PR-AUC (binary) or macro F1 (multiclass), and the checkpoints carry
the best epoch's weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from rxray.config import FinetuneConfig, config_to_dict
from rxray.data.shards import IMAGE_COLUMN
from rxray.models.checkpoints import Checkpoint, read_checkpoint
from rxray.models.classifier import build_classifier, class_probabilities, freeze_encoder
from rxray.models.device import autocast_for
from rxray.models.orientation import ORIENTATIONS, RandomOrientation
from rxray.ssl.augment import SimCLRAugment
from rxray.train.epochs import RunSettings, TrainingStep, scheduled_learning_rate
from rxray.train.tasks import GAIN_COLUMN, TaskPlan, selection_metric
from rxray.train.worker import TrainWorker, unwrap

if TYPE_CHECKING:
    from rxray.models.classifier import Classifier

# Mild crops only: zooming changes apparent cell and nucleus size, itself a phenotype (e.g. nuclear_size).
CROP_SCALE = (0.8, 1.0)
# Column dtypes of labelled batches (rxray.train.tasks.label_batch) as tensors.
TENSOR_DTYPES = {IMAGE_COLUMN: torch.uint8, "label": torch.int64, "conc": torch.float32, GAIN_COLUMN: torch.float32}


@dataclass(frozen=True)
class EncoderStart:
    """Where a run's encoder starts: its architecture, and a SimCLR checkpoint or weights file or nothing."""

    backbone: str
    stem: str
    encoder_uri: str | None  # a SimCLR checkpoint whose encoder is cut to the stains, else None
    description: str  # "random", "weights:<file>" or "simclr:<checkpoint>" (recorded as encoder_init)


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



@dataclass
class ClassifierStep(TrainingStep):
    """Fine-tuning's part of the shared training loop (:mod:`rxray.train.epochs`)."""

    cfg: FinetuneConfig
    run: RunSettings
    plan: TaskPlan
    start: EncoderStart
    class_weights: list[float]  # loss weight per class, logit order
    has_val: bool  # a validation split exists: it selects the best epoch and stops early
    predictions_uri: str | None = None  # where the workers write the selected model's predictions of "predict"
    batch_dtypes = TENSOR_DTYPES

    def build_model(self, fresh: bool) -> "Classifier":
        """The classifier; a fresh run starts from the SimCLR encoder or --weights. Frozen before DDP wraps it."""
        encoder_state = read_checkpoint(self.start.encoder_uri).encoder if fresh and self.start.encoder_uri else None
        model = build_classifier(self.cfg, len(self.plan.classes), backbone=self.start.backbone,
                                 stem=self.start.stem, encoder_state=encoder_state,
                                 weights=self.cfg.weights if fresh else None)
        if self.cfg.freeze:
            freeze_encoder(model)  # before DDP wraps it, so DDP syncs the trainable parameters only
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over the head and (fine-tuning) the encoder."""
        return make_optimizer(self.cfg, model)

    def setup(self, worker: TrainWorker, restored: Checkpoint | None) -> None:
        """Augmentation and loss on the device; early stopping and the best weights as the checkpoint left them."""
        super().setup(worker, restored)
        run = self.run
        if self.cfg.aug_strength > 0:  # crops, jitter and noise, besides a random orientation
            self.augment = TrainAugment(run.image_side, self.cfg.aug_strength, list(run.recipe.mean),
                                        list(run.recipe.std)).to(worker.device)
        else:
            self.augment = RandomOrientation(run.recipe.mean, run.recipe.std) if self.cfg.tta else None
        self.loss_weights = torch.tensor(self.class_weights, dtype=torch.float32, device=worker.device)
        self.criterion = nn.CrossEntropyLoss(weight=self.loss_weights)
        self.stopping = EarlyStopping(**restored.early_stopping) if restored and restored.early_stopping \
            else EarlyStopping(self.cfg.patience)
        self.stopping.patience = self.cfg.patience
        self.best = restored.best if restored else None

    @property
    def views(self) -> int:
        """Orientations a prediction averages over (--tta: all 8)."""
        return ORIENTATIONS if self.cfg.tta else 1

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        """Train mode (a frozen encoder keeps its batch-norm running statistics) and the epoch's learning rates."""
        model.train()
        if self.cfg.freeze:
            unwrap(model).encoder.eval()
        cfg = self.cfg
        head_lr = scheduled_learning_rate(cfg.lr, cfg.lr_schedule, epoch, cfg.epochs)
        # make_optimizer's groups: the head, then (fine-tuning) the encoder at its fraction of the head's rate.
        for group, scale in zip(optimizer.param_groups, (1.0, cfg.encoder_lr_scale)):
            group["lr"] = head_lr * scale
        return {"lr": head_lr}

    def batch_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Plate-normalised, augmented images (and concentrations with --with-conc)."""
        images = self.run.recipe.tensor_inputs(batch[IMAGE_COLUMN], batch[GAIN_COLUMN], self.augment, generator)
        return (images, batch["conc"]) if self.cfg.with_conc else (images,)

    def batch_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Weighted cross-entropy of the logits: ``train_loss`` and ``train_accuracy``."""
        labels = batch["label"]
        loss = self.criterion(outputs, labels)
        # Full batches only, so the mean of the batch accuracies is the epoch's.
        accuracy = (outputs.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"train_loss": loss.detach(), "train_accuracy": accuracy}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Validation metrics (``val_*``), and the best epoch so far; keeps that epoch's weights."""
        recorded: dict[str, Any] = {}
        if self.has_val:
            validation = self._validate(unwrap(model))
            improved = self.stopping.update(validation[selection_metric(self.plan.task)], validation["loss"],
                                            epoch + 1)
            recorded = {f"val_{k}": v for k, v in validation.items()}
        else:  # nothing to select on: the latest epoch is the model
            improved, self.stopping.best_epoch = True, epoch + 1
        if improved:
            self.best = _best_weights(unwrap(model), epoch + 1, frozen=self.cfg.freeze)
        return {**recorded, "best_epoch": self.stopping.best_epoch, "stopped_early": self.stopping.stopped}

    @property
    def finished(self) -> bool:
        """True once early stopping has stopped the run."""
        return self.stopping.stopped

    def after_training(self, model: nn.Module) -> None:
        """Rank 0 predicts the ``predict`` dataset (held-out splits, unlabelled compounds) with the selected weights.

        The trained worker holds the model already: predicting here spares the driver an
        inference pool of its own (a process and a torch import per actor, ~5 s on 2 cores)
        for each classifier. What is written is what :func:`rxray.train.predictions.predict`
        returns, with the epoch whose weights made it; the dataset is not split between
        workers (held-out splits are a fraction of the data).
        """
        if not self.predictions_uri or not self.worker.is_chief:
            return
        import pandas as pd

        from rxray.train.predictions import write_worker_predictions

        inner = unwrap(model)
        if self.best is not None:
            inner.head.load_state_dict(self.best["head"])
            if self.best["encoder"] is not None:
                inner.encoder.load_state_dict(self.best["encoder"])
        inner.eval()
        parts = []
        with torch.no_grad():
            for batch in self.worker.stall_guarded(self.worker.dataset_shard("predict").iter_batches(
                    batch_size=self.cfg.batch_size, batch_format="numpy"), "predict"):
                images = torch.from_numpy(np.ascontiguousarray(batch[IMAGE_COLUMN])).to(self.worker.device)
                gains = torch.from_numpy(np.asarray(batch[GAIN_COLUMN], dtype=np.float32))
                inputs = self.run.recipe.tensor_inputs(images, gains)
                conc = torch.from_numpy(np.asarray(batch["conc"], dtype=np.float32)).to(self.worker.device)
                with autocast_for(self.worker.device):
                    probabilities = class_probabilities(inner, inputs, conc if self.cfg.with_conc else None,
                                                        self.views)
                frame = pd.DataFrame({k: v for k, v in batch.items() if k not in (IMAGE_COLUMN, GAIN_COLUMN)})
                frame["probs"] = list(probabilities.cpu().numpy())
                parts.append(frame)
        write_worker_predictions(self.predictions_uri, parts, best_epoch=self.stopping.best_epoch)

    def checkpoint_fields(self) -> dict[str, Any]:
        """How the model was made and how to feed it; early stopping and the best epoch's weights."""
        cfg, plan = self.cfg, self.plan
        return {"config": config_to_dict(cfg), "backbone": self.start.backbone, "stem": self.start.stem,
                "with_conc": cfg.with_conc, "classes": list(plan.classes),
                "orientations": ORIENTATIONS if cfg.tta else None,
                "task": plan.task, "label_col": plan.label_col, "positive": plan.positive,
                "negative_classes": list(plan.negative_classes), **self.run.recipe.checkpoint_fields(),
                "head_hidden": cfg.head_hidden, "dropout": cfg.dropout, "encoder_init": self.start.description,
                "plate_norm": bool(self.run.recipe.plate_gains),
                "selection_metric": selection_metric(plan.task) if self.has_val else None,
                "early_stopping": dataclasses.asdict(self.stopping), "best": self.best}

    def _validate(self, model: "Classifier") -> dict[str, float]:
        """Loss, accuracy, F1, ROC-AUC and PR-AUC on the whole validation split (each worker scores its shard).

        The unwrapped model runs here: a DDP forward would wait for the other workers,
        whose shards may hold a different number of batches.
        """
        from rxray.evaluate.metrics import classification_metrics

        worker, k = self.worker, len(self.plan.classes)
        model.eval()
        labels, probabilities = [], []
        shard = worker.dataset_shard("val")
        with torch.no_grad():
            for batch in worker.stall_guarded(shard.iter_torch_batches(
                    batch_size=self.cfg.batch_size, drop_last=False, device=worker.device, dtypes=TENSOR_DTYPES),
                    "val"):
                inputs = self.run.recipe.tensor_inputs(batch[IMAGE_COLUMN], batch[GAIN_COLUMN])
                with autocast_for(worker.device):
                    probabilities.append(class_probabilities(model, inputs, batch["conc"] if self.cfg.with_conc
                                                             else None, self.views).cpu().numpy())
                labels.append(batch["label"].cpu().numpy())
        # Every worker's share on every worker, so all take the same early-stopping decision.
        shares = worker.gather((np.concatenate(labels) if labels else np.zeros(0, np.int64),
                                np.concatenate(probabilities) if probabilities else np.zeros((0, k), np.float32)))
        y, p = np.concatenate([share[0] for share in shares]), np.concatenate([share[1] for share in shares])
        if len(y) == 0:
            raise RuntimeError("the validation split reached no worker (no validation sites?)")
        class_weight = self.loss_weights.cpu().numpy()[y]
        loss = float(np.sum(class_weight * -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)))
                     / class_weight.sum())
        scores = classification_metrics(y, p, labels=list(range(k)))
        return {"loss": loss, "accuracy": scores["accuracy"], "f1": scores["f1"], "f1_macro": scores["f1_macro"],
                "roc_auc": scores["roc_auc"], "pr_auc": scores["pr_auc"], "n": len(y)}


def _best_weights(model: "Classifier", epoch: int, frozen: bool) -> dict[str, Any]:
    """CPU copies of the weights of the best epoch (the head only when the encoder is frozen: it never changes)."""
    def copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    return {"epoch": epoch, "head": copy(model.head), "encoder": None if frozen else copy(model.encoder)}
