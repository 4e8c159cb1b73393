"""The one training loop: what every Ray Train worker of `rxray pretrain` and `rxray finetune` runs.

The loop owns what the steps share: restore the run's latest checkpoint, seed, build,
prepare for DDP, restore the optimizer, run the epochs (per-worker, per-epoch view
seeds, throughput), each batch's optimisation step (:func:`optimisation_step`:
the forward pass under the device's autocast, backward, optimiser step), average the
metrics over workers, write one checkpoint per epoch
(:class:`~rxray.models.checkpoints.Checkpoint`) and the epoch log. A step plugs in as a
:class:`TrainingStep`: it builds its model and optimizer, turns a batch into the model's
inputs and the model's outputs into a loss, scores the epoch (validation, probe) and names
what its checkpoints record.
Settings reach the workers as typed dataclasses inside the step (:class:`RunSettings`
and the step's own config), never as untyped dicts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from rxray import storage
from rxray.config import STALL_TIMEOUT_S
from rxray.data.shards import IMAGE_COLUMN
from rxray.models.checkpoints import Checkpoint
from rxray.models.device import autocast_for
from rxray.models.inputs import InputRecipe
from rxray.runtime import quiet_data_notices
from rxray.train.epoch_log import EpochLog, EpochProgress
from rxray.train.worker import ThroughputMeter, TrainWorker, unwrap, worker_print

# Spacing of the per-worker view seeds: far apart, so worker r's epoch e never reuses worker r+1's seeds.
_RANK_SEED_STRIDE = 1_000_003


def scheduled_learning_rate(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of a 0-based epoch: ``lr`` (constant), or cosine-decayed from it towards 0 over ``epochs``.

    Set per epoch from the epoch number alone, so a resumed run continues the same schedule;
    the last epochs at a small rate make the final model a settled point, not a sample of
    a noisy trajectory.
    """
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose cosine or constant")
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass(frozen=True)
class RunSettings:
    """What the shared loop needs of every training run, worked out by the step's driver."""

    step: str  # "pretrain" or "finetune": names the console lines
    out: str  # the step's output URI; the run's checkpoints live under <out>/<run_name>
    run_name: str
    epochs: int
    batch_size: int  # per worker
    seed: int
    image_side: int  # S of the shards' (6, S, S) images
    recipe: InputRecipe  # how its images become model inputs: ingest statistics, stains, plate gains
    cpus_per_worker: float
    threads: int | None = None  # torch threads per worker (None: the reserved CPUs)
    resume_from: str | None = None  # the latest checkpoint a rerun continues from
    stall_timeout_s: float = STALL_TIMEOUT_S  # longest wait for a batch before the worker fails
    train_rows: int | None = None  # training rows of the run (an upper bound), for the progress lines' ETA

    @property
    def run_uri(self) -> str:
        """The run's directory in storage, where Ray Train writes the checkpoints."""
        return storage.join(self.out, self.run_name)


class TrainingStep(ABC):
    """What a training step plugs into the shared loop. Subclasses are dataclasses with a ``run`` field.

    The model must have ``encoder`` and ``head`` submodules: the loop checkpoints both.
    """

    run: RunSettings
    # Column dtypes of the training batches (tensors on the worker's device).
    batch_dtypes: dict[str, torch.dtype] = {IMAGE_COLUMN: torch.uint8}

    @abstractmethod
    def build_model(self, fresh: bool) -> nn.Module:
        """The model on the CPU (under the loop's seed): initial weights when ``fresh``, else any (restored next)."""

    @abstractmethod
    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the (unwrapped, prepared) model."""

    def setup(self, worker: TrainWorker, restored: Checkpoint | None) -> None:
        """Per-worker objects on the device (augmentation, loss) and step state restored from ``restored``."""
        self.worker = worker

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        """Ready the 0-based epoch (train mode, learning rate); the metrics that records (e.g. ``lr``)."""
        model.train()
        return {}

    @abstractmethod
    def batch_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The model's inputs for a training batch (called without gradients: augmentation, normalisation)."""

    @abstractmethod
    def batch_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The loss of the model's float32 outputs on a batch, and the batch's mean of each metric (device tensors
        need no sync)."""

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Metrics scored after the 0-based epoch's training (validation, probe); rank 0's are the ones recorded."""
        return {}

    @property
    def finished(self) -> bool:
        """True when the run should stop before its last epoch (early stopping)."""
        return False

    def after_training(self, model: nn.Module) -> None:
        """Work the trained workers do once the epochs are over, on every worker (e.g. predicting a held-out split)."""

    @abstractmethod
    def checkpoint_fields(self) -> dict[str, Any]:
        """The checkpoint's fields besides weights, optimizer, epoch, metrics and starts (Checkpoint's names)."""


def optimisation_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple[torch.Tensor, ...],
                      loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """One optimisation step, the same for every training step: the forward pass under the device's autocast (images
    channels-last on a GPU), the loss of its float32 outputs, backward and the optimiser's step; the batch's metrics."""
    images = inputs[0]
    if images.device.type == "cuda":
        inputs = (images.contiguous(memory_format=torch.channels_last), *inputs[1:])
    with autocast_for(images.device):
        outputs = model(*inputs)
    loss, metrics = loss_of(outputs.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return metrics


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: restore the run's latest checkpoint if any, then train ``loop_config["step"]``'s epochs."""
    step: TrainingStep = loop_config["step"]
    run = step.run
    if not loop_config.get("verbose"):
        quiet_worker_logs()
    worker = TrainWorker(threads=run.threads, cpus=run.cpus_per_worker, stall_timeout_s=run.stall_timeout_s)
    state = worker.restore(fallback_uri=run.resume_from, run_uri=run.run_uri)
    restored = Checkpoint.from_state(state) if state else None
    start_epoch = restored.epoch if restored else 0
    history: list[dict[str, Any]] = list(restored.metrics or []) if restored else []
    starts = [*(restored.starts or []), start_epoch] if restored else [0]
    if restored and worker.is_chief:
        worker_print(f"{run.step}: workers restored the epoch {start_epoch} checkpoint")

    torch.manual_seed(run.seed)  # the same initial weights on every worker and every fresh run
    model = step.build_model(fresh=restored is None)
    if restored:
        model.encoder.load_state_dict(restored.encoder)
        model.head.load_state_dict(restored.head)
    model = worker.prepare(model)
    optimizer = step.make_optimizer(unwrap(model))
    if restored:
        optimizer.load_state_dict(restored.optimizer)  # after the move to the device: the state follows the params
    step.setup(worker, restored)
    if restored and restored.rng_state is not None:  # after building the model, whose fresh init drew from it
        torch.set_rng_state(restored.rng_state)
    generator = torch.Generator(device=worker.device)
    log = EpochLog(run.out, run.step, run.epochs) if worker.is_chief else None

    for epoch in range(start_epoch, run.epochs):
        if step.finished:
            break
        metrics = _train_epoch(step, worker, model, optimizer, generator, epoch)
        metrics.update(step.end_epoch(model, epoch))
        history.append(metrics)
        worker.report(_reported(metrics), epoch + 1,
                      lambda: _checkpoint(step, model, optimizer, epoch + 1, history, starts).to_state())
        if log is not None:
            log.write(history)
    if log is not None:
        log.close()
    step.after_training(model)


def quiet_worker_logs() -> None:
    """Keep two Ray lines that each worker would print off the console (the step prints its own epoch line).

    Ray Train V2's "Reporting training result ..." INFO line, a full TrainingReport dump
    every epoch, comes from a logger named after its module's file path, outside the
    ``ray.train`` hierarchy that RunConfig's LoggingConfig filters; and Ray Data warns
    that progress bars are disabled, which rxray does on purpose for training passes.
    """
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    quiet_data_notices()


def _train_epoch(step: TrainingStep, worker: TrainWorker, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, epoch: int) -> dict[str, Any]:
    """One pass over this worker's shard; the epoch's metrics, averaged over all workers."""
    run = step.run
    # Seeded per worker and epoch, so a resumed epoch draws the views it would have drawn.
    generator.manual_seed(run.seed + _RANK_SEED_STRIDE * worker.rank + epoch)
    recorded = step.begin_epoch(model, optimizer, epoch)
    meter = ThroughputMeter(worker.device)
    sums: dict[str, torch.Tensor | float] = {}  # summed on the device: no wait for it every step
    steps = 0
    expected = run.train_rows // (run.batch_size * worker.world_size) if run.train_rows else None
    progress = EpochProgress(run.step, epoch, run.epochs, expected or None) if worker.is_chief else None
    batches = worker.batches(run.batch_size, seed=run.seed, epoch=epoch, dtypes=step.batch_dtypes)
    for index, batch in enumerate(meter.timed(batches)):
        with torch.no_grad():
            inputs = step.batch_inputs(batch, generator)
        metrics = optimisation_step(model, optimizer, inputs, lambda outputs: step.batch_loss(outputs, batch))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
        meter.update(batch[IMAGE_COLUMN].shape[0] * worker.world_size)
        line = progress.update(steps, meter.images) if progress is not None else None
        if line:
            worker_print(line)
    if steps == 0:
        raise RuntimeError(f"worker {worker.rank} got no full batch of {run.batch_size} images in epoch {epoch}")
    seconds = meter.seconds
    means = worker.mean_over_workers({**{name: float(total) / steps for name, total in sums.items()},
                                      "images_per_s": meter.images / seconds})
    return {"epoch": epoch + 1, **means, "steps": steps, "seconds": round(seconds, 3),
            "data_wait_s": round(meter.data_wait_s, 3), **recorded}


def _checkpoint(step: TrainingStep, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                history: list[dict[str, Any]], starts: list[int]) -> Checkpoint:
    """The checkpoint after ``epoch`` completed epochs (built on rank 0 only)."""
    inner = unwrap(model)
    return Checkpoint(encoder=inner.encoder.state_dict(), head=inner.head.state_dict(),
                      optimizer=optimizer.state_dict(), epoch=epoch, metrics=list(history), starts=list(starts),
                      rng_state=torch.get_rng_state(), **step.checkpoint_fields())


def _reported(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric metrics, as Ray Train's result wants them."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
