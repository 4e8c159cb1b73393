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

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rxray import storage
from rxray.errors import StepFailed
from rxray.config import ConfigError, PretrainConfig, config_to_dict, config_to_yaml
from rxray.outputs import CONFIG_FILE, CONFLICT, MANIFEST_FILE, STALE, rerun_decision, write_manifest
from rxray.runtime import Timer, ensure_ray
from rxray.train.checkpoints import checkpoint_epoch, latest_checkpoint
from rxray.train.loop import (CrashOnce, EpochLog, ThroughputMeter, TrainWorker, autocast_for,
                              cache_datasets, fit, read_metrics, unwrap, worker_cpus, worker_print)

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


def train_step(model: nn.Module, augment: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, *,
               temperature: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """One SimCLR step on uint8 images (B, 6, H, W) on the model's device; returns (loss, positive-pair top-1).

    Both views go through the model as one 2B batch. The loss stays a device tensor
    so callers can sum it without waiting for the device every step.
    """
    from rxray.ssl.ntxent import nt_xent_loss, positive_pair_top1

    device = images.device
    with torch.no_grad():
        view1, view2 = augment(images, generator)
    views = torch.cat([view1, view2])
    if device.type == "cuda":
        views = views.contiguous(memory_format=torch.channels_last)
    with autocast_for(device):
        projections = model(views)
    z1, z2 = projections.float().chunk(2)
    loss = nt_xent_loss(z1, z2, temperature=temperature, gather=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), positive_pair_top1(z1.detach(), z2.detach())


def epoch_learning_rate(cfg: PretrainConfig, epoch: int) -> float:
    """The learning rate of a 0-based epoch: constant, or cosine-decayed from ``lr`` towards 0 (SimCLR's schedule).

    Set per epoch from the epoch number alone, so a resumed run continues the same schedule;
    the last epochs at a small rate make the final encoder a settled point, not a sample of
    a noisy trajectory (on the demo's 6 epochs the probe scores of consecutive epochs at a
    constant 1e-3 differed by up to 0.04).
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def make_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay (the study's optimiser)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: restore the latest checkpoint if any, then train the remaining epochs."""
    cfg = PretrainConfig(**loop_config["cfg"])
    mean, std = loop_config["channel_mean"], loop_config["channel_std"]
    crash = CrashOnce(**loop_config["crash_once"]) if loop_config.get("crash_once") else None
    worker = TrainWorker(threads=cfg.threads, cpus=loop_config["cpus_per_worker"])

    state = worker.restore(fallback_uri=loop_config.get("resume_from"), run_uri=storage.join(cfg.out, RUN_NAME))
    start_epoch = state["epoch"] if state else 0
    history: list[dict[str, Any]] = list(state["metrics"]) if state else []
    starts: list[int] = list(state.get("starts", [])) + [start_epoch] if state else [0]
    if state and worker.is_chief:
        worker_print(f"pretrain: workers restored the epoch {start_epoch} checkpoint")

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker and every fresh run
    model = build_model(cfg, weights=None if state else cfg.weights)
    if state:
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
    model = worker.prepare(model)
    optimizer = make_optimizer(cfg, model)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    augment = build_augment(cfg, loop_config["image_size"], mean, std).to(worker.device)
    generator = torch.Generator(device=worker.device)
    log = EpochLog(cfg.out, "pretrain", cfg.epochs) if worker.is_chief else None

    for epoch in range(start_epoch, cfg.epochs):
        learning_rate = epoch_learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        metrics = _train_epoch(cfg, worker, model, augment, optimizer, generator, epoch, crash)
        metrics["lr"] = learning_rate
        if loop_config.get("probe"):
            metrics.update(_probe_epoch(cfg, worker, model, mean, std))
        history.append(metrics)
        worker.report(metrics, epoch + 1, _checkpoint_state(cfg, model, optimizer, epoch + 1, mean, std,
                                                            history, starts))
        if log is not None:
            log.write(history)
    if log is not None:
        log.close()


def _train_epoch(cfg: PretrainConfig, worker: TrainWorker, model: nn.Module, augment: nn.Module,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                 crash: CrashOnce | None) -> dict[str, Any]:
    """One pass over this worker's shard; the epoch's metrics, averaged over all workers."""
    # Seeded per worker and epoch, so a resumed epoch draws the views it would have drawn.
    generator.manual_seed(cfg.seed + 1_000_003 * worker.rank + epoch)
    model.train()
    meter = ThroughputMeter(worker.device)
    loss_sum = torch.zeros((), device=worker.device)  # summed on the device: no wait for it every step
    top1_sum, steps = 0.0, 0
    batches = worker.image_batches(cfg.batch_size, seed=cfg.seed, epoch=epoch)
    for step, images in enumerate(meter.timed(batches)):
        if crash is not None:
            crash.maybe_crash(epoch, step, worker.rank)
        loss, top1 = train_step(model, augment, optimizer, images, temperature=cfg.temperature, generator=generator)
        loss_sum += loss
        top1_sum += top1
        steps += 1
        meter.update(images.shape[0] * worker.world_size)
    if steps == 0:
        raise RuntimeError(f"worker {worker.rank} got no full batch of {cfg.batch_size} images in epoch {epoch}")
    seconds = meter.seconds
    means = worker.mean_over_workers({"loss": float(loss_sum) / steps, "top1": top1_sum / steps,
                                      "images_per_s": meter.images / seconds})
    return {"epoch": epoch + 1, **means, "steps": steps, "seconds": round(seconds, 3),
            "data_wait_s": round(meter.data_wait_s, 3)}


def _probe_epoch(cfg: PretrainConfig, worker: TrainWorker, model: nn.Module, mean: list[float],
                 std: list[float]) -> dict[str, float]:
    """Probe scores of the encoder as it is now: every worker embeds its share of the probe sites, rank 0 scores.

    The unwrapped encoder runs (a DDP forward would wait on the other workers) in
    eval mode; the next epoch's ``model.train()`` switches it back. Other ranks
    return no scores: only rank 0's metrics are logged and reach Tune.
    """
    from rxray.evaluate.probe import embed_batches, score_embeddings

    batches = worker.dataset_shard("probe").iter_batches(batch_size=cfg.batch_size, batch_format="numpy")
    features, columns = embed_batches(unwrap(model).encoder, batches, mean=mean, std=std, device=worker.device)
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


def _checkpoint_state(cfg: PretrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                      mean: list[float], std: list[float], history: list[dict[str, Any]],
                      starts: list[int]) -> Callable[[], dict[str, Any]]:
    """A builder of the checkpoint dict (called on rank 0 only)."""
    def build() -> dict[str, Any]:
        inner = unwrap(model)
        return {"encoder": inner.encoder.state_dict(), "head": inner.head.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config_to_dict(cfg),
                "backbone": cfg.backbone, "stem": cfg.stem, "in_channels": IN_CHANNELS,
                "channel_mean": list(mean), "channel_std": list(std), "metrics": list(history),
                "starts": list(starts)}
    return build


# --------------------------------------------------------------------------- driver


def pretrain(cfg: PretrainConfig, *, crash_once: CrashOnce | None = None) -> dict[str, Any]:
    """Train (or resume, or report complete) a SimCLR run into ``cfg.out``; returns a summary dict.

    ``crash_once`` is for recovery tests: it makes rank 0's process die once mid-run.
    """
    from rxray.data.shards import channel_stats, read_shards

    timer = Timer()
    try:
        mean, std = channel_stats(cfg.data)
    except FileNotFoundError as exc:
        raise ConfigError("pretrain.data", str(exc)) from None
    _check_weights(cfg)
    done, resume_from = _completed_epochs(cfg)
    if done >= cfg.epochs:
        print(f"pretrain: {cfg.out} is already complete ({done} of {cfg.epochs} epochs); nothing to train",
              flush=True)
        return _finish(cfg, status="complete", resumed_from=done, timer=timer)
    if done:
        print(f"pretrain: resuming from epoch {done} ({resume_from})", flush=True)

    ensure_ray()
    dataset = read_shards(cfg.data, columns=["image"])
    rows, image_side = _dataset_shape(cfg.data, dataset)
    if rows // cfg.workers < cfg.batch_size:
        raise ConfigError("pretrain.batch_size", f"{cfg.batch_size} per worker x {cfg.workers} workers needs at "
                                                 f"least {cfg.batch_size * cfg.workers} images; {cfg.data} has {rows}")
    storage.makedirs(cfg.out)
    storage.write_text(storage.join(cfg.out, CONFIG_FILE), config_to_yaml(cfg))

    datasets = {"train": dataset}
    sizes = {"train": rows}
    if cfg.probe:
        datasets["probe"] = _probe_dataset(cfg)
        sizes["probe"] = min(rows, cfg.probe_sites)
    datasets = cache_datasets(datasets, sizes, IN_CHANNELS * image_side ** 2, cfg.cache, "pretrain")
    cpus = worker_cpus(cfg.workers, cfg.gpu, cfg.worker_cpus)
    loop_config = {"cfg": config_to_dict(cfg), "channel_mean": mean, "channel_std": std,
                   "image_size": image_side, "cpus_per_worker": cpus, "resume_from": resume_from,
                   "crash_once": dataclasses.asdict(crash_once) if crash_once else None, "probe": cfg.probe}
    with timer.time("train"):
        try:
            fit(train_loop_per_worker, loop_config, out=cfg.out, name=RUN_NAME, workers=cfg.workers, gpu=cfg.gpu,
                cpus_per_worker=cpus, max_failures=cfg.max_failures, datasets=datasets)
        except Exception as exc:  # Ray's TrainingFailedError: the failure budget is spent
            raise StepFailed(f"pretraining failed after up to {cfg.max_failures} restarts: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
                from exc
    return _finish(cfg, status="trained", resumed_from=done, timer=timer, rows=rows, cpus_per_worker=cpus)


def _probe_dataset(cfg: PretrainConfig):
    """The probe's sites (a class-stratified sample chosen from the shards' metadata) as a lazy Ray Dataset."""
    from rxray.evaluate.correction import MIN_PLATE_CONTROLS
    from rxray.evaluate.probe import probe_dataset

    try:
        dataset, sample = probe_dataset(cfg.data, task=cfg.probe_task, treatments=cfg.probe_treatments,
                                        max_sites=cfg.probe_sites, seed=cfg.seed,
                                        plate_controls=MIN_PLATE_CONTROLS if cfg.probe_correct == "center" else 0)
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
    rerun = rerun_decision(cfg.out, cfg)
    if rerun.action == CONFLICT:
        name, (old, new) = next(iter(rerun.changed.items()))
        raise ConfigError(f"pretrain.{name}", f"{cfg.out} holds a run with {name}={old!r}, not {new!r}; "
                                              f"use a new --out to start over")
    if rerun.action == STALE:
        raise ConfigError(f"pretrain.{next(iter(rerun.changed))}",
                          f"{cfg.out} holds a finished {done}-epoch run trained with other settings "
                          f"({rerun.changes()}); use a new --out to train with them, or more --epochs to continue "
                          f"the run with them")
    if rerun.changed and done < cfg.epochs:
        print(f"pretrain: epochs {done + 1}-{cfg.epochs} train with changed settings ({rerun.changes()})", flush=True)
    return done, latest


def _dataset_shape(uri: str, dataset) -> tuple[int, int]:
    """Rows and image side S of the shards: from the ingest manifest, else from Parquet metadata."""
    from rxray.data.shards import shard_manifest

    manifest = shard_manifest(uri)
    rows = manifest.get("counts", {}).get("written") or dataset.count()
    shape = manifest.get("image_shape")
    if not shape:
        schema = dataset.schema()
        shape = schema.types[schema.names.index("image")].shape
    return int(rows), int(shape[-1])


def _finish(cfg: PretrainConfig, *, status: str, resumed_from: int, timer: Timer, **counts: Any) -> dict[str, Any]:
    """Write the run manifest and return the summary the CLI prints."""
    history = read_metrics(cfg.out)
    checkpoint = latest_checkpoint(cfg.out)
    fields = {"status": status, "epochs_completed": checkpoint_epoch(checkpoint), "resumed_from": resumed_from,
              "checkpoint": checkpoint, "final_metrics": history[-1] if history else None,
              "timings": timer.seconds, **counts}
    if status == "trained" or not storage.exists(storage.join(cfg.out, MANIFEST_FILE)):
        write_manifest(cfg.out, "pretrain", config_to_dict(cfg), **fields)
    return {"out": cfg.out, **fields, "history": history}
