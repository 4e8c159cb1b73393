"""`rxray pretrain`: SimCLR pretraining of a 6-channel encoder on ingest shards with Ray Train.

Each worker streams its shard of uint8 images, makes two augmented views on its
device, and minimises NT-Xent with negatives gathered from every worker (Chen et
al. 2020), so N workers x B images train like one worker with N*B. After every
epoch rank 0 writes one checkpoint dict; rerunning the same command resumes from
it, and a worker that dies is restarted from it (FailureConfig). With ``--probe``,
each epoch also embeds a small sample of sites with the encoder and scores a
plate-grouped linear probe on them (``probe_score``, :mod:`rxray.evaluate.probe`):
the loss alone falls when augmentations get easier, so `rxray tune` ranks runs by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rxray.config import ConfigError, PretrainConfig, config_to_dict
from rxray.data.shards import IMAGE_COLUMN
from rxray.models.checkpoints import Checkpoint, checkpoint_epoch, latest_checkpoint
from rxray.outputs import read_manifest
from rxray.results import PretrainResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray
from rxray.train.epoch_log import read_metrics
from rxray.models.inputs import InputRecipe
from rxray.train.epochs import RunSettings, TrainingStep, optimisation_step, scheduled_learning_rate
from rxray.train.launch import INPUT_TASK_CPUS, check_rerun, input_statistics, launch, worker_cpus
from rxray.train.worker import TrainWorker, unwrap

RUN_NAME = "simclr"
IN_CHANNELS = 6


class SimCLRModel(nn.Module):
    """Encoder + projection head: images (B, 6, H, W) -> projections (B, proj_dim) for NT-Xent."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections (B, proj_dim) of normalised images (B, C, H, W)."""
        return self.head(self.encoder(images))


def build_model(cfg: PretrainConfig, weights: str | None = None) -> SimCLRModel:
    """The SimCLR model of a config: its backbone and stem, random init or RGB `weights`."""
    from rxray.models.backbones import build_encoder
    from rxray.models.heads import ProjectionHead

    encoder = build_encoder(cfg.backbone, stem=cfg.stem, weights=weights, in_channels=IN_CHANNELS)
    return SimCLRModel(encoder, ProjectionHead(encoder.feature_dim, out_dim=cfg.proj_dim, dropout=cfg.dropout))


def build_augment(cfg: PretrainConfig, image_size: int, mean: list[float], std: list[float]) -> nn.Module:
    """The view generator of a config for shard images of side `image_size`."""
    from rxray.ssl.augment import SimCLRAugment

    return SimCLRAugment(cfg.crop_size or image_size, strength=cfg.aug_strength, mean=mean, std=std)


def simclr_views(augment: nn.Module, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Two augmented views of every uint8 image (B, 6, H, W) as one (2B, 6, H, W) batch: the model sees both at once."""
    view1, view2 = augment(images, generator)
    return torch.cat([view1, view2])


def simclr_loss(projections: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """NT-Xent of the two views' projections (gathered over workers), and positive-pair ``top1``; the loss also as
    the detached ``loss`` metric, a device tensor callers sum without waiting for the device every step."""
    from rxray.ssl.ntxent import nt_xent_loss, positive_pair_top1

    z1, z2 = projections.chunk(2)
    loss = nt_xent_loss(z1, z2, temperature=temperature, gather=True)
    return loss, {"loss": loss.detach(), "top1": positive_pair_top1(z1.detach(), z2.detach())}


def train_step(model: nn.Module, augment: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, *,
               temperature: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """One SimCLR step on uint8 images outside Ray Train (the benchmark's plain loop), through the training loop's
    own :func:`~rxray.train.epochs.optimisation_step`; returns (loss, positive-pair top-1)."""
    with torch.no_grad():
        views = simclr_views(augment, images, generator)
    metrics = optimisation_step(model, optimizer, (views,), lambda outputs: simclr_loss(outputs, temperature))
    return metrics["loss"], metrics["top1"]


def make_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay (the study's optimiser)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- worker


@dataclass
class SimCLRStep(TrainingStep):
    """SimCLR's part of the shared training loop: two views per image, NT-Xent, and the optional probe."""

    cfg: PretrainConfig
    run: RunSettings

    def build_model(self, fresh: bool) -> SimCLRModel:
        """The SimCLR model; a fresh run starts from --weights."""
        return build_model(self.cfg, weights=self.cfg.weights if fresh else None)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam (the study's optimiser)."""
        return make_optimizer(self.cfg, model)

    def setup(self, worker: TrainWorker, restored: Checkpoint | None) -> None:
        """The view generator on the worker's device."""
        super().setup(worker, restored)
        recipe = self.run.recipe
        self.augment = build_augment(self.cfg, self.run.image_side, list(recipe.mean),
                                     list(recipe.std)).to(worker.device)

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        """Train mode and the epoch's learning rate (recorded as ``lr``).

        SimCLR's default is the cosine: on the demo's 6 epochs the probe scores of consecutive
        epochs at a constant 1e-3 differed by up to 0.04, and its last epochs settle the encoder.
        """
        model.train()
        learning_rate = scheduled_learning_rate(self.cfg.lr, self.cfg.lr_schedule, epoch, self.cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        return {"lr": learning_rate}

    def batch_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Both views of every image, as one batch."""
        return (simclr_views(self.augment, batch[IMAGE_COLUMN], generator),)

    def batch_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """NT-Xent: ``loss`` and positive-pair ``top1``."""
        return simclr_loss(outputs, self.cfg.temperature)

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """The probe's scores with --probe, else nothing."""
        return _probe_epoch(self.cfg, self.worker, model, self.run.recipe) if self.cfg.probe else {}

    def checkpoint_fields(self) -> dict[str, Any]:
        """The encoder's architecture and input statistics, and the config."""
        return {"config": config_to_dict(self.cfg), "backbone": self.cfg.backbone, "stem": self.cfg.stem,
                "channel_mean": list(self.run.recipe.mean), "channel_std": list(self.run.recipe.std)}


def _probe_epoch(cfg: PretrainConfig, worker: TrainWorker, model: nn.Module, recipe: InputRecipe) -> dict[str, float]:
    """Probe scores of the encoder as it is now: every worker embeds its share of the probe sites, rank 0 scores.

    The unwrapped encoder runs (a DDP forward would wait on the other workers) in
    eval mode; the next epoch's ``model.train()`` switches it back. Other ranks
    return no scores: only rank 0's metrics are logged and reach Tune.
    """
    from rxray.evaluate.probe import score_embeddings
    from rxray.evaluate.probe_step import embed_batches

    batches = worker.stall_guarded(worker.dataset_shard("probe").iter_batches(batch_size=cfg.batch_size,
                                                                              batch_format="numpy"), "probe")
    features, columns = embed_batches(unwrap(model).encoder, batches, recipe=recipe, device=worker.device)
    shares = [share for share in worker.gather((features, columns)) if len(share[0])]
    if not worker.is_chief:
        return {}
    if not shares:
        raise RuntimeError("the probe sites reached no worker (an empty probe sample?)")
    X = np.concatenate([share[0] for share in shares])
    column = {name: np.concatenate([share[1][name] for share in shares]) for name in shares[0][1]}
    result = score_embeddings(X, column, task=cfg.probe_task, correct=cfg.probe_correct)
    return {"probe_score": result["score"], "probe_accuracy": result["accuracy"],
            "probe_f1_macro": result["f1_macro"], "probe_roc_auc": result["roc_auc"]}


# --------------------------------------------------------------------------- driver


@step_function("pretrain")
def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume, or report complete) a SimCLR run into ``cfg.out``; returns how far it got."""
    from rxray.data.shards import read_shards

    timer = Timer()
    mean, std = input_statistics(cfg)
    _check_weights(cfg)
    done, resume_from = _completed_epochs(cfg)
    if done >= cfg.epochs:
        print(f"pretrain: {cfg.out} is already complete ({done} of {cfg.epochs} epochs); nothing to train",
              flush=True)
        return _finish(cfg, status="complete", resumed_from=done, timer=timer)
    if done:
        print(f"pretrain: resuming from epoch {done} ({resume_from})", flush=True)

    ensure_ray()
    dataset = read_shards(cfg.data, columns=["image"], task_cpus=INPUT_TASK_CPUS)
    rows = _shard_rows(cfg.data, dataset)
    if rows // cfg.workers < cfg.batch_size:
        raise ConfigError("pretrain.batch_size", f"{cfg.batch_size} per worker x {cfg.workers} workers needs at "
                                                 f"least {cfg.batch_size * cfg.workers} images; {cfg.data} has {rows}")
    datasets = {"train": dataset}
    sizes = {"train": rows}
    if cfg.probe:
        datasets["probe"] = _probe_dataset(cfg)
        sizes["probe"] = min(rows, cfg.probe_sites)
    cpus = worker_cpus(cfg.workers, cfg.gpu, cfg.worker_cpus)
    with timer.time("train"):
        launch(cfg, lambda settings: SimCLRStep(cfg, settings), run_name=RUN_NAME,
               recipe=InputRecipe(tuple(mean), tuple(std)), datasets=datasets, rows=sizes, resume_from=resume_from,
               train_rows=rows, cpus=cpus, what="pretraining")
    return _finish(cfg, status="trained", resumed_from=done, timer=timer, rows=rows, cpus_per_worker=cpus)


def _probe_dataset(cfg: PretrainConfig):
    """The probe's sites (a class-stratified sample chosen from the shards' metadata) as a lazy Ray Dataset."""
    from rxray.evaluate.correction import MIN_PLATE_CONTROLS
    from rxray.evaluate.probe_sites import probe_dataset

    try:
        dataset, sample = probe_dataset(cfg.data, task=cfg.probe_task, treatments=cfg.probe_treatments,
                                        max_sites=cfg.probe_sites, seed=cfg.seed,
                                        plate_controls=MIN_PLATE_CONTROLS if cfg.probe_correct == "center" else 0,
                                        task_cpus=INPUT_TASK_CPUS)
    except ValueError as exc:
        raise ConfigError("pretrain.probe_treatments", str(exc)) from None
    print(f"pretrain: probe on {len(sample)} sites of {sample['treatment'].nunique()} treatment(s) "
          f"({cfg.probe_task}), plate-grouped folds" + (", plates centred on their controls"
                                                        if cfg.probe_correct == "center" else ""), flush=True)
    return dataset


def _check_weights(cfg: PretrainConfig) -> None:
    """Build the model once with --weights so a bad file fails in one line before any worker starts."""
    if not cfg.weights:
        return
    from rxray.models.weights import WeightsError

    try:
        build_model(cfg, weights=cfg.weights)
    except WeightsError as exc:
        raise ConfigError("pretrain.weights", str(exc)) from None


def _completed_epochs(cfg: PretrainConfig) -> tuple[int, str | None]:
    """Epochs already trained into ``cfg.out`` and the latest checkpoint's URI ((0, None) for a new run).

    The rerun policy (:func:`rxray.outputs.rerun_decision`) decides: a run keeps its
    architecture; other settings may change for the epochs still to train, but a
    finished run cannot take them.
    """
    try:
        latest = latest_checkpoint(cfg.out)
    except FileNotFoundError:
        return 0, None
    done = checkpoint_epoch(latest) or 0
    rerun = check_rerun(cfg, "pretrain", f"a finished {done}-epoch run")
    if rerun.changed and done < cfg.epochs:
        print(f"pretrain: epochs {done + 1}-{cfg.epochs} train with changed settings ({rerun.changes()})", flush=True)
    return done, latest


def _shard_rows(uri: str, dataset) -> int:
    """Rows of the shards: from the ingest manifest, else counted from the Parquet metadata."""
    from rxray.data.shards import shard_manifest

    return int(shard_manifest(uri).get("counts", {}).get("written") or dataset.count())


def _finish(cfg: PretrainConfig, *, status: str, resumed_from: int, timer: Timer, rows: int | None = None,
            cpus_per_worker: float | None = None) -> PretrainResult:
    """The run's result; a complete run asked again keeps the manifest its training wrote (``unchanged``)."""
    history = read_metrics(cfg.out)
    checkpoint = latest_checkpoint(cfg.out)
    epochs = checkpoint_epoch(checkpoint)
    recorded = read_manifest(cfg.out)
    if status == "complete" and recorded is not None:
        return PretrainResult.from_manifest(recorded, unchanged=True, status=status, history=history)
    return PretrainResult(counts={"rows": rows, "epochs": epochs}, timings=timer.seconds, status=status,
                          epochs_completed=epochs, resumed_from=resumed_from, checkpoint=checkpoint,
                          final_metrics=history[-1] if history else None, rows=rows, cpus_per_worker=cpus_per_worker,
                          history=history)
