"""`rxray bench train`: images/s of the Ray Train SimCLR job against a plain PyTorch loop.

The sides run one after the other in one run, with the same model, batch size,
augmentations, optimiser, number of steps and torch threads
(:func:`rxray.train.simclr.train_step` on every side):

- plain loop: one process, the shards' images held in memory as a uint8 tensor,
  shuffled each epoch (its input costs nothing: the most favourable baseline);
- Ray Train: :func:`rxray.train.simclr.pretrain`, the exact job of ``rxray pretrain``
  (Ray Data streaming the shards, DDP, a checkpoint and metrics every epoch);
- GPU only: the compute ceiling, the same steps on one synthetic batch already on the GPU.

Each side runs ``epochs`` epochs and the last is timed, data waits included, so
start-up (worker launch, model build, first-epoch warm-up) is left out on every
side. The goals: Ray Train / plain >= 0.9 on CPU, Ray Train / ceiling >= 0.7 on GPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from rxray import storage
from rxray.bench.tables import record_row
from rxray.config import BACKBONES, PretrainConfig, load_config, option
from rxray.runtime import ensure_ray

SECTION = "## Training"
TABLE_HEADER = ("| date | device | backbone | px | batch | steps/epoch | workers x threads | plain loop img/s "
                "| Ray Train img/s | ratio (goal 0.9) | Ray data wait s/epoch | GPU ceiling img/s "
                "| Ray / ceiling (goal 0.7) |")
NOT_MEASURED = "-"


@dataclass
class BenchTrainConfig:
    """`rxray bench train`: Ray Train SimCLR images/s against a plain PyTorch loop (and the GPU ceiling)."""

    section = "bench_train"

    data: Optional[str] = option(None, "ingest shards to train on (default: random images in a temp folder)")
    backbone: str = option("resnet18", "backbone on every side", choices=BACKBONES)
    images: int = option(512, "random images to write when --data is not given", minimum=2)
    size: int = option(64, "side in pixels of the random images", minimum=8, maximum=4096)
    batch_size: int = option(32, "images per step per worker (both sides)", minimum=2)
    epochs: int = option(2, "epochs per side; only the last is timed", minimum=2)
    workers: int = option(1, "Ray Train workers (the plain loop is one process)", minimum=1)
    threads: Optional[int] = option(None, "torch threads per side (default: this machine's torch default, "
                                          "split over the workers)", minimum=1)
    gpu: Optional[bool] = option(None, "train on GPU (default: when one is present)")
    table: Optional[str] = option("docs/benchmarks.md", "markdown file whose '## Training' table gets a row "
                                                        "('none': print only)")
    seed: int = option(0, "seed of the random images, models and views", minimum=0)
    note: Optional[str] = option(None, "a line recorded under the table with this run (e.g. machine load)")


# --------------------------------------------------------------------------- the sides


def _load_images(uri: str):
    """All images of (small, benchmark-sized) shards as one uint8 tensor (N, 6, S, S) in host memory."""
    import pyarrow.dataset as pads
    import torch

    from rxray.data.shards import IMAGE_COLUMN, images_from_table

    fs, path = storage.pyarrow_filesystem(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[IMAGE_COLUMN])
    return torch.from_numpy(images_from_table(table))


def _local_run(cfg: PretrainConfig, images, channel_mean: list[float], channel_std: list[float], steps: int,
               device, synthetic: bool) -> dict[str, float]:
    """Train `cfg.epochs` epochs of `steps` steps in this process; images/s of the last epoch.

    ``synthetic``: every step reuses one batch already on the device (the compute
    ceiling); otherwise each step takes a shuffled batch from host memory.
    """
    import torch

    from rxray.train.worker import ThroughputMeter
    from rxray.train.simclr import build_augment, build_model, make_optimizer, train_step

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(cfg, model)
    augment = build_augment(cfg, images.shape[-1], channel_mean, channel_std).to(device)
    generator = torch.Generator(device=device)
    fixed_batch = images[: cfg.batch_size].to(device) if synthetic else None
    shuffler = torch.Generator().manual_seed(cfg.seed)
    last: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        generator.manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(images), generator=shuffler)
        meter = ThroughputMeter(device)
        for step in range(steps):
            if synthetic:
                batch = fixed_batch
            else:
                batch = images[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device, non_blocking=True)
            loss, _ = train_step(model, augment, optimizer, batch, temperature=cfg.temperature, generator=generator)
            meter.update(batch.shape[0])
        last = {"images_per_s": round(meter.images_per_s, 2), "seconds": round(meter.seconds, 3),
                "loss": round(float(loss), 4)}
    return last


def _ray_run(cfg: PretrainConfig) -> dict[str, float]:
    """The `rxray pretrain` job; images/s and data wait of its last epoch."""
    from rxray.train.simclr import pretrain

    last = pretrain(cfg).history[-1]
    return {"images_per_s": round(last["images_per_s"], 2), "seconds": last["seconds"],
            "data_wait_s": last.get("data_wait_s"), "loss": round(last["loss"], 4)}


# --------------------------------------------------------------------------- the table


def _device_name(gpu: bool) -> str:
    import torch

    if gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def _format(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:g}"


def table_row(result: dict[str, Any]) -> str:
    """One markdown table row for a benchmark result."""
    ceiling = result.get("ceiling") or {}
    cells = [result["date"], result["device"], result["backbone"], str(result["size"]), str(result["batch_size"]),
             str(result["steps"]), f"{result['workers']} x {result['threads']}",
             _format(result["plain"]["images_per_s"]), _format(result["ray"]["images_per_s"]),
             _format(result["ratio"]), _format(result["ray"].get("data_wait_s")),
             _format(ceiling.get("images_per_s")), _format(result.get("ratio_to_ceiling"))]
    return "| " + " | ".join(cells) + " |"


INTRO = (
    "`rxray bench train`: SimCLR training images/s of the `rxray pretrain` Ray Train job (Ray Data "
    "streaming the shards, DDP, NT-Xent with global negatives, a checkpoint + metrics every epoch) against "
    "a plain single-process PyTorch loop over the same images held in memory, with the same model, batch, "
    "augmentations, optimiser, steps and torch threads, run one after the other. Each side trains "
    "`--epochs` epochs and the last one is timed, data waits included. On a GPU, the ceiling is the same "
    "steps on one synthetic batch already in GPU memory. Random uint8 images unless noted."
)


def record(path: str, row: str, note: str | None = None) -> None:
    """Append a row (and a note) to the '## Training' table of a markdown file; other sections stay as they are."""
    record_row(path, SECTION, INTRO, TABLE_HEADER, row, note)


# --------------------------------------------------------------------------- the benchmark


def bench_train(cfg: BenchTrainConfig) -> dict[str, Any]:
    """Time the plain loop, the Ray Train job and (on GPU) the compute ceiling; record and return images/s."""
    import torch

    from rxray.bench.embed import write_random_shards
    from rxray.data.shards import channel_stats
    from rxray.outputs import write_manifest
    from rxray.results import IngestResult

    ensure_ray()
    gpu = torch.cuda.is_available() if cfg.gpu is None else cfg.gpu
    threads = cfg.threads or max(1, torch.get_num_threads() // cfg.workers)
    scratch = tempfile.mkdtemp(prefix="rxray-bench-train-")
    try:
        data = cfg.data or os.path.join(scratch, "shards")
        if cfg.data is None:
            write_random_shards(data, cfg.images, cfg.size, cfg.seed)
            uniform_mean, uniform_std = 127.5, 73.9  # a uniform 0..255 image's per-channel statistics
            write_manifest(data, "ingest", {}, IngestResult(channel_mean=[uniform_mean] * 6,
                                                            channel_std=[uniform_std] * 6))
        mean, std = channel_stats(data)
        images = _load_images(data)
        steps = len(images) // (cfg.batch_size * cfg.workers)
        if steps < 1:
            from rxray.config import ConfigError

            raise ConfigError("bench_train.batch_size", f"{cfg.batch_size} x {cfg.workers} workers needs at least "
                                                        f"{cfg.batch_size * cfg.workers} images, got {len(images)}")
        train_cfg = load_config(PretrainConfig, values=dict(
            data=data, out=os.path.join(scratch, "pretrain"), backbone=cfg.backbone, epochs=cfg.epochs,
            batch_size=cfg.batch_size, workers=cfg.workers, gpu=gpu, threads=threads, seed=cfg.seed))
        device = torch.device("cuda" if gpu else "cpu")
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads * cfg.workers)  # the plain loop gets the cores all workers get
        try:
            plain = _local_run(train_cfg, images, mean, std, steps * cfg.workers, device, synthetic=False)
            ceiling = _local_run(train_cfg, images, mean, std, steps * cfg.workers, device, synthetic=True) \
                if gpu else None
        finally:
            torch.set_num_threads(previous_threads)
            if gpu:
                torch.cuda.empty_cache()  # the Ray worker needs the memory the local runs cached
        ray_side = _ray_run(train_cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "date": time.strftime("%Y-%m-%d"), "device": _device_name(gpu), "backbone": cfg.backbone,
        "size": int(images.shape[-1]), "batch_size": cfg.batch_size, "steps": steps, "workers": cfg.workers,
        "threads": threads, "plain": plain, "ray": ray_side, "ceiling": ceiling,
        "ratio": round(ray_side["images_per_s"] / plain["images_per_s"], 3),
        "ratio_to_ceiling": round(ray_side["images_per_s"] / ceiling["images_per_s"], 3) if ceiling else None,
    }
    row = table_row(result)
    print(TABLE_HEADER)
    print(row)
    print(f"Ray Train / plain loop: {result['ratio']} (goal 0.9)")
    if ceiling:
        print(f"Ray Train / GPU ceiling: {result['ratio_to_ceiling']} (goal 0.7)")
    if cfg.table and cfg.table.lower() != "none":
        record(cfg.table, row, cfg.note)
        result["table"] = cfg.table
    return result
