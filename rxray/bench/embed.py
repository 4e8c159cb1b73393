"""`rxray bench embed`: images/s of the actor-pool embedding against a plain PyTorch loop.

Both sides run the same checkpoint, batch size and shards on the same cores, one
after the other in one run:

- plain loop: the driver reads the shards with pyarrow and runs the encoder in a
  ``for`` loop with all the cores as torch threads (the ceiling);
- actor pool: :func:`rxray.batch.embed.embed_dataset`, the exact pipeline of
  ``rxray embed``, consumed without writing;
- Grad-CAM: ``rxray explain``'s per-batch work (:func:`rxray.batch.attribution.gradcam_batch`:
  one forward and backward pass for the heatmap and the stain attribution, no occlusion)
  in a plain loop, with the same encoder under a random 2-class head.

Steady-state images/s leaves out the first batch on both sides (model load and
actor start are one-off costs that shrink with dataset size); the end-to-end
figures include them, and for the actor pool also the Parquet write and the well
profiles (the real ``rxray embed`` step). The goal is a steady-state ratio of 0.9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from rxray import storage
from rxray.bench.tables import record_row
from rxray.config import BACKBONES, EmbedConfig, load_config, option
from rxray import layout

SECTION = "## Embedding"
TABLE_HEADER = ("| date | device | backbone | px | images | batch | actors x threads | plain loop img/s "
                "| actor pool img/s | ratio (goal 0.9) | plain end-to-end img/s | `rxray embed` end-to-end img/s "
                "| Grad-CAM img/s |")
NOT_MEASURED = "not measured yet"
DONE_COLUMN = "_batch_done"
# Rows per random shard: several shards so Ray Data reads in parallel, as it does over real ingest output.
_RANDOM_SHARD_ROWS = 128
_SITES_PER_WELL = 4
_PLATE_WELLS = len(layout.PLATE_ROWS) * layout.PLATE_COLUMNS


@dataclass
class BenchEmbedConfig:
    """`rxray bench embed`: actor-pool embedding images/s against a plain PyTorch loop."""

    section = "bench_embed"

    data: Optional[str] = option(None, "ingest shards to embed (default: random images in a temp folder)")
    model: Optional[str] = option(None, "checkpoint or pretrain/finetune output (default: random-init --backbone)")
    backbone: str = option("resnet18", "backbone of the random-init model when --model is not given",
                           choices=BACKBONES)
    images: int = option(512, "random images to write when --data is not given", minimum=2)
    size: int = option(64, "side in pixels of the random images", minimum=8, maximum=4096)
    batch_size: int = option(64, "images per inference batch (both sides)", minimum=1)
    actors: Optional[int] = option(None, "actor-pool size (default: as `rxray embed`)", minimum=1)
    gpu: bool = option(False, "run both sides on GPU")
    table: Optional[str] = option("docs/benchmarks.md", "markdown file whose '## Embedding' table gets a row "
                                                        "('none': print only)")
    seed: int = option(0, "seed of the random images and model", minimum=0)
    work: Optional[str] = option(None, "URI for scratch data, model and output, removed afterwards (default: a "
                                       "local temp folder; use s3://... when actors run on other nodes)")
    note: Optional[str] = option(None, "a line recorded under the table with this run (e.g. machine load)")


# --------------------------------------------------------------------------- inputs


def write_random_shards(uri: str, n_images: int, size: int, seed: int = 0) -> None:
    """Ingest-format shards of random uint8 images (RxRx2 metadata, 4 sites per well) under a URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rxray.data.shards import image_column, shard_name

    rng = np.random.default_rng(seed)
    fs, path = storage.pyarrow_filesystem(uri)
    fs.create_dir(path, recursive=True)
    for index, start in enumerate(range(0, n_images, _RANDOM_SHARD_ROWS)):
        rows = range(start, min(start + _RANDOM_SHARD_ROWS, n_images))
        well_index = [i // _SITES_PER_WELL for i in rows]
        plates = [w // _PLATE_WELLS + 1 for w in well_index]
        wells = [layout.well_name(w % _PLATE_WELLS // layout.PLATE_COLUMNS, w % layout.PLATE_COLUMNS)
                 for w in well_index]
        sites = [i % _SITES_PER_WELL + 1 for i in rows]
        columns = {
            "site_id": [layout.make_site_id("HUVEC-1", p, w, s) for p, w, s in zip(plates, wells, sites)],
            "well_id": [layout.make_well_id("HUVEC-1", p, w) for p, w in zip(plates, wells)],
            "cell_type": ["HUVEC"] * len(rows), "experiment": ["HUVEC-1"] * len(rows), "plate": plates,
            "well": wells, "site": sites, "treatment": [layout.CONTROL] * len(rows),
            "treatment_conc": [0.0] * len(rows),
        }
        images = rng.integers(0, 256, size=(len(rows), layout.N_CHANNELS, size, size), dtype=np.uint8)
        table = pa.table(columns).append_column("image", image_column(images))
        pq.write_table(table, f"{path}/{shard_name(index)}", filesystem=fs, compression="zstd")


def write_random_checkpoint(uri: str, backbone: str, seed: int = 0) -> str:
    """A random-init encoder saved in the training checkpoint format as ``<uri>/checkpoint.pt``; returns it."""
    import io

    import torch

    from rxray.models.backbones import build_encoder
    from rxray.models.checkpoints import CHECKPOINT_FILE

    torch.manual_seed(seed)
    encoder = build_encoder(backbone)
    uniform_mean, uniform_std = 127.5, 73.9  # a uniform 0..255 image's per-channel statistics
    state = {"encoder": encoder.state_dict(), "head": None, "optimizer": None, "epoch": 0, "config": {},
             "backbone": backbone, "stem": "adapt", "channel_mean": [uniform_mean] * layout.N_CHANNELS,
             "channel_std": [uniform_std] * layout.N_CHANNELS, "metrics": {}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = storage.join(uri, CHECKPOINT_FILE)
    storage.write_bytes(path, buffer.getvalue())
    return path


def _image_batches(uri: str, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, 6, S, S) batches of exactly ``batch_size`` (the last may be short), streamed with pyarrow."""
    import pyarrow.dataset as pads

    from rxray.data.shards import IMAGE_COLUMN, images_from_table

    fs, path = storage.pyarrow_filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    pending: list[np.ndarray] = []
    held = 0
    for record_batch in dataset.to_batches(columns=[IMAGE_COLUMN], batch_size=batch_size):
        pending.append(images_from_table(record_batch))
        held += record_batch.num_rows
        while held >= batch_size:
            stacked = np.concatenate(pending)
            yield stacked[:batch_size]
            pending, held = [stacked[batch_size:]], held - batch_size
    if held:
        yield np.concatenate(pending)


# --------------------------------------------------------------------------- the measured loops


class _Throughput:
    """Images/s over a stream of batches: end to end, and in steady state (first batch left out)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_done: float | None = None
        self.first_images = 0
        self.images = 0

    def add(self, images: int) -> None:
        """Count a finished batch of ``images``."""
        self.images += images
        if self.first_done is None:
            self.first_done, self.first_images = time.perf_counter(), images

    def result(self) -> dict[str, float | None]:
        """images, seconds, end-to-end and steady-state images/s."""
        end = time.perf_counter()
        steady = None
        if self.first_done is not None and self.images > self.first_images and end > self.first_done:
            steady = (self.images - self.first_images) / (end - self.first_done)
        return {"images": self.images, "seconds": round(end - self.start, 3),
                "images_per_s": round(self.images / (end - self.start), 2),
                "steady_images_per_s": round(steady, 2) if steady else None}


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run the enclosed block with this many torch CPU threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plain_loop(data: str, checkpoint_uri: str, batch_size: int, threads: int, gpu: bool) -> dict[str, Any]:
    """The reference: load the encoder, stream the shards with pyarrow, embed batch by batch in this process."""
    import torch

    from rxray.data.shards import IMAGE_COLUMN
    from rxray.models.device import autocast_for, torch_device
    from rxray.models.inputs import InputRecipe
    from rxray.models.checkpoints import load_encoder

    with _torch_threads(threads):
        meter = _Throughput()
        device = torch_device(gpu)
        encoder, checkpoint = load_encoder(checkpoint_uri)
        encoder = encoder.to(device, memory_format=torch.channels_last).eval()
        # This loop reads the images alone, not the plate columns, so it leaves plate gains out:
        # one multiply per pixel, nothing next to the encoder.
        recipe = dataclasses.replace(InputRecipe.from_checkpoint(checkpoint), plate_gains={})
        with torch.inference_mode(), autocast_for(device):
            for images in _image_batches(data, batch_size):
                inputs = recipe.encoder_inputs({IMAGE_COLUMN: images}, device)
                features = encoder(inputs.contiguous(memory_format=torch.channels_last))
                features.float().cpu()  # the result lands in host memory, as the actors' does
                meter.add(len(images))
        return meter.result()


def gradcam_loop(data: str, checkpoint_uri: str, batch_size: int, threads: int, gpu: bool) -> dict[str, Any]:
    """Grad-CAM + stain attribution (`rxray explain`'s per-batch work) in this process.

    The classifier is the checkpoint's encoder under a random 2-class head: the cost of
    a forward and backward pass does not depend on the head's weights.
    """
    from rxray.batch.attribution import gradcam_batch
    from rxray.models.classifier import Classifier
    from rxray.models.device import torch_device
    from rxray.models.heads import ClassifierHead
    from rxray.models.inputs import InputRecipe
    from rxray.models.checkpoints import load_encoder

    with _torch_threads(threads):
        meter = _Throughput()
        encoder, checkpoint = load_encoder(checkpoint_uri)
        model = Classifier(encoder, ClassifierHead(encoder.feature_dim, 2), channels=checkpoint.get("channels"))
        model = model.to(torch_device(gpu)).eval()
        recipe = InputRecipe.from_checkpoint(checkpoint)
        mean, std = list(recipe.mean), list(recipe.std)
        for images in _image_batches(data, batch_size):
            gradcam_batch(model, images, mean, std, target_index=0)
            meter.add(len(images))
        return meter.result()


def _timed_embedder() -> type:
    """An EmbedBatch that also stamps each output row with the wall-clock time its batch finished."""
    from rxray.batch.embed import EMBEDDING_COLUMN, EmbedBatch

    class TimedEmbedBatch(EmbedBatch):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().__call__(batch)
            out[DONE_COLUMN] = np.full(len(out[EMBEDDING_COLUMN]), time.time())
            return out

    return TimedEmbedBatch


def actor_pool(data: str, checkpoint_uri: str, batch_size: int, actors: int, threads: int,
               gpu: bool) -> dict[str, Any]:
    """The `rxray embed` pipeline over the shards, consumed by the driver (nothing written).

    Output blocks may bundle several batches, so steady state comes from the time each
    batch finished in its actor, stamped on its rows.
    """
    from rxray.batch.pool import PoolPlan, map_batches
    from rxray.data.shards import read_shards

    start = time.perf_counter()  # the step's own pool (rxray.batch.embed.embed_dataset) with a timed EmbedBatch
    embedded = map_batches(read_shards(data), _timed_embedder(), PoolPlan(actors=actors, threads=threads, gpu=gpu),
                           batch_size=batch_size, checkpoint_uri=checkpoint_uri)
    done = np.concatenate([block[DONE_COLUMN] for block in
                           embedded.iter_batches(batch_size=None, batch_format="numpy")])
    seconds = time.perf_counter() - start
    batch_done, batch_rows = np.unique(done, return_counts=True)
    steady = None
    if len(batch_done) > 1 and batch_done[-1] > batch_done[0]:
        steady = round(float(batch_rows[1:].sum() / (batch_done[-1] - batch_done[0])), 2)
    return {"images": int(len(done)), "seconds": round(seconds, 3), "images_per_s": round(len(done) / seconds, 2),
            "steady_images_per_s": steady}


# --------------------------------------------------------------------------- the table


def _image_side(shards) -> int:
    """Side in pixels of the shards' images, from the tensor type of the ``image`` column."""
    schema = shards.schema()
    return int(schema.types[schema.names.index("image")].shape[-1])


def _device_name(gpu: bool, cpus: int) -> str:
    """What the numbers were measured on, for the table."""
    if gpu:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
    return f"CPU ({cpus} cores)"


def _format(value: float | None) -> str:
    """A table cell: the number, or a label saying it was not measured."""
    return NOT_MEASURED if value is None else f"{value:g}"


def table_row(result: dict[str, Any]) -> str:
    """One markdown table row for a benchmark result."""
    cells = [result["date"], result["device"], result["backbone"], str(result["size"]), str(result["images"]),
             str(result["batch_size"]), f"{result['actors']} x {result['threads']}",
             _format(result["plain"]["steady_images_per_s"]), _format(result["actor_pool"]["steady_images_per_s"]),
             _format(result["ratio"]), _format(result["plain"]["images_per_s"]),
             _format(result["embed_step"]["images_per_s"]),
             _format(result["gradcam"]["steady_images_per_s"] if result["gradcam"] else None)]
    return "| " + " | ".join(cells) + " |"


INTRO = (
    "`rxray bench embed`: images/s of the `rxray embed` actor pool (Ray Data `map_batches`, model loaded "
    "once per actor) against a plain PyTorch loop over the same shards, same checkpoint, batch size and "
    "cores, run one after the other. *plain loop* and *actor pool* are steady state (first batch left out: "
    "model load and actor start); *end-to-end* includes them, and for `rxray embed` also the Parquet "
    "write and the per-well profiles. *Grad-CAM* is `rxray explain`'s per-batch work (`gradcam_batch`: "
    "heatmap and stain attribution, no occlusion) in a plain loop on the same cores, steady state. "
    "Random-init encoder on random uint8 images unless noted."
)


def record(path: str, row: str, note: str | None = None) -> None:
    """Append a row (and a note) to the '## Embedding' table of a markdown file; other sections stay as they are."""
    record_row(path, SECTION, INTRO, TABLE_HEADER, row, note)


# --------------------------------------------------------------------------- the benchmark


def bench_embed(cfg: BenchEmbedConfig) -> dict[str, Any]:
    """Run the plain loop, the actor pool and the full `rxray embed` step; record and return images/s."""
    import ray

    from rxray.batch.embed import embed
    from rxray.batch.pool import plan_pool
    from rxray.data.shards import read_shards
    from rxray.runtime import ensure_ray

    ensure_ray()
    scratch = storage.join(cfg.work, f"rxray-bench-embed-{uuid.uuid4().hex[:8]}") if cfg.work \
        else tempfile.mkdtemp(prefix="rxray-bench-embed-")
    try:
        data = cfg.data or storage.join(scratch, "shards")
        if cfg.data is None:
            write_random_shards(data, cfg.images, cfg.size, cfg.seed)
        checkpoint = cfg.model or write_random_checkpoint(storage.join(scratch, "model"), cfg.backbone, cfg.seed)
        plan = plan_pool(cfg.actors, cfg.gpu, field="bench.actors")
        actors, threads = plan.actors, plan.threads
        shards = read_shards(data)
        n_images, image_side = shards.count(), _image_side(shards)

        plain = plain_loop(data, checkpoint, cfg.batch_size, actors * threads, cfg.gpu)
        pool = actor_pool(data, checkpoint, cfg.batch_size, actors, threads, cfg.gpu)
        gradcam = gradcam_loop(data, checkpoint, cfg.batch_size, actors * threads, cfg.gpu)
        step_cfg = load_config(EmbedConfig, values=dict(data=data, model=checkpoint, out=storage.join(scratch, "out"),
                                                        batch_size=cfg.batch_size, actors=actors, gpu=cfg.gpu))
        start = time.perf_counter()
        step = embed(step_cfg)
        step_seconds = time.perf_counter() - start
    finally:
        storage.remove(scratch, recursive=True)

    ratio = None
    if plain["steady_images_per_s"] and pool["steady_images_per_s"]:
        ratio = round(pool["steady_images_per_s"] / plain["steady_images_per_s"], 3)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": _device_name(cfg.gpu, cpus),
        "backbone": step.model.get("backbone"), "size": image_side, "images": n_images, "batch_size": cfg.batch_size,
        "actors": actors, "threads": threads, "plain": plain, "actor_pool": pool, "ratio": ratio,
        "embed_step": {"images": step.counts["rows_out"], "seconds": round(step_seconds, 3),
                       "images_per_s": round(step.counts["rows_out"] / step_seconds, 2)},
        "gradcam": gradcam,
    }
    row = table_row(result)
    print(TABLE_HEADER)
    print(row)
    print(f"actor pool / plain loop (steady state): {ratio} (goal 0.9)")
    if cfg.table:
        record(cfg.table, row, cfg.note)
        result["table"] = cfg.table
    return result
