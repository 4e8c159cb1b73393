"""Ray Train machinery shared by the training steps (SimCLR pretraining, classifier fine-tuning).

Driver side: :func:`fit` builds the TorchTrainer (scaling, storage, failure and
checkpoint policy) so every training step runs, stores and recovers the same
way. Worker side: :class:`TrainWorker` (rank, device, threads, channels_last +
DDP, dataset shard batches, checkpoint report/restore), :func:`autocast_for`
(bf16 on GPU), :class:`ThroughputMeter` and :class:`EpochLog` (metrics.jsonl +
TensorBoard). :class:`CrashOnce` injects a real worker death for recovery tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import torch

from rxray import storage
from rxray.runtime import verbose
from rxray.train.checkpoints import CHECKPOINT_FILE, checkpoint_dir_name

if TYPE_CHECKING:
    import ray.data

T = TypeVar("T")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Per-epoch fields left out of the console line (they stay in metrics.jsonl and TensorBoard).
CONSOLE_SKIP = frozenset({"epoch", "steps", "seconds", "data_wait_s", "val_f1_macro", "val_accuracy"})
# Checkpoints kept per run: the latest for resuming, a couple more in case the newest is damaged.
CHECKPOINTS_KEPT = 3
# Rows buffered per worker for shuffling within its stream: mixes shard order at little memory cost.
SHUFFLE_BUFFER_ROWS = 512
# Batches fetched ahead of the training step, so reading and collating overlap with compute.
PREFETCH_BATCHES = 2
# Reported with every epoch: the placement group holding the run's workers. A Ray Tune driver that stops the run
# early (ASHA) kills its controller, and only a dashboard-backed cleaner would then free the group; `rxray tune`
# frees it by this id.
PLACEMENT_GROUP_KEY = "train_placement_group"
# Share of the cluster's object store that `cache=auto` lets the training images take. Held for the whole run,
# so every epoch after the first skips the Parquet read and Ray Data's per-epoch start (~1.5 s, more when
# busy); above it the images stream from storage every epoch, as they must at full RxRx2 scale on a small cluster.
CACHE_STORE_FRACTION = 0.4
# Per-row bytes beyond the image: metadata columns and Arrow overhead, rounded up.
ROW_OVERHEAD_BYTES = 1024


# --------------------------------------------------------------------------- driver side


def worker_cpus(workers: int, gpu: bool, requested: float | None) -> float:
    """CPUs reserved per training worker: `requested`, else 1 unless that leaves no CPU to feed data.

    Ray Data's read tasks need a CPU of their own; on a small machine (2 CPUs, 2
    workers) whole-CPU workers would leave none and training would wait forever.
    """
    if requested is not None:
        return requested
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if gpu or total >= workers + 1:
        return 1.0
    return max(0.25, (total - 1.0) / workers)


def worker_print(line: str) -> None:
    """Print one line from a training worker, once: Ray Train also routes print() to its logger."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fit(train_fn: Callable[[dict], None], loop_config: dict[str, Any], *, out: str, name: str,
        workers: int, gpu: bool, cpus_per_worker: float, max_failures: int, datasets: dict[str, Any]):
    """Run `train_fn` on a Ray Train worker group; checkpoints and the run state live under `out`/`name`.

    The same `out` and `name` restore the run (Ray Train V2 reloads its checkpoint
    list from storage), and a worker that dies is restarted from the latest
    checkpoint up to `max_failures` times. Returns the ray.train.Result.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, path = storage.pyarrow_filesystem(out)
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem if storage.is_remote(out) else None,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=tune_report_callbacks(),
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),  # its log files keep all
    )
    datasets, streamed = fixed_worker_shares(datasets, workers)
    if not verbose():  # a per-epoch split-coordinator progress bar says nothing the epoch log does not
        for dataset in datasets.values():
            dataset.context.enable_progress_bars = False
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}
                            | ({"GPU": 1} if gpu else {}))
    trainer = TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=datasets,
                           dataset_config=DataConfig(datasets_to_split=streamed))
    return trainer.fit()


def worker_share_name(dataset: str, rank: int) -> str:
    """The name under which a worker finds its fixed share of a cached dataset."""
    return f"{dataset}@{rank}"


def fixed_worker_shares(datasets: dict[str, Any], workers: int) -> tuple[dict[str, Any], list[str]]:
    """Cached datasets split once into one fixed share per worker; the names of those left to streaming_split.

    Ray Train's default streaming_split hands blocks to whichever worker asks first, so
    which worker trains on which images changes from run to run. A cached (materialised,
    in file order) dataset is split here instead, deterministically and into equal shares
    (``Dataset.split``): each worker sees the same images in the same order every run. A
    dataset too large to cache streams as before. This is necessary for the same seed to give
    the same weights, not yet sufficient (docs/science-checks.md, "What varies").
    """
    from ray.data.dataset import MaterializedDataset

    fixed, streamed = {}, []
    for name, dataset in datasets.items():
        if isinstance(dataset, MaterializedDataset):
            shares = dataset.split(workers, equal=True) if workers > 1 else [dataset]
            fixed.update({worker_share_name(name, rank): share for rank, share in enumerate(shares)})
        else:
            fixed[name] = dataset
            streamed.append(name)
    return fixed, streamed


def cache_datasets(datasets: dict[str, Any], rows: dict[str, int], image_bytes: int, policy: str,
                   step: str) -> dict[str, Any]:
    """The training datasets, materialised in Ray's object store when `policy` says so (auto: when they fit).

    ``rows`` holds each dataset's (upper-bound) row count and ``image_bytes`` one
    row's image size, so the decision needs no read. ``auto`` caches when all of
    them together take at most CACHE_STORE_FRACTION of the cluster's object
    store as it is now (an autoscaling cluster that has not grown yet streams).
    """
    import ray

    if policy == "off" or not datasets:
        return datasets
    needed = sum(rows.get(name, 0) for name in datasets) * (image_bytes + ROW_OVERHEAD_BYTES)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    budget = CACHE_STORE_FRACTION * store
    if policy == "auto" and needed > budget:
        print(f"{step}: streaming the images from storage every epoch ({needed / 2**30:.2f} GiB is more than "
              f"{CACHE_STORE_FRACTION:.0%} of the {store / 2**30:.2f} GiB object store; --cache on forces caching)",
              flush=True)
        return datasets
    print(f"{step}: caching {needed / 2**30:.2f} GiB of images in Ray's object store "
          f"({store / 2**30:.2f} GiB) for all epochs", flush=True)
    for dataset in datasets.values():
        # Blocks in file order, whichever read task finishes first: the fixed worker shares depend on it.
        dataset.context.execution_options.preserve_order = True
    return {name: dataset.materialize() for name, dataset in datasets.items()}


def tune_report_callbacks() -> list:
    """Inside a Ray Tune trial, a callback forwarding every epoch's report to Tune (so ASHA can stop the run); else none.

    Every training step runs through :func:`fit`, so a step called from a Tune
    function trainable (`rxray tune`) reports to Tune with no change to the step.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return [TuneReportCallback()]
    except RuntimeError:  # "must be used in a Tune session": an ordinary run
        return []


@dataclass
class CrashOnce:
    """Fault injection for recovery tests: rank 0 dies (os._exit) at `epoch`, once per `marker` file.

    A real process death, not an exception: Ray sees the worker vanish and must
    restart the group from the last checkpoint. The marker file records that the
    crash happened, so the restarted worker carries on.
    """

    epoch: int
    marker: str
    after_steps: int = 1

    def maybe_crash(self, epoch: int, step: int, rank: int) -> None:
        """Exit the process if this is the chosen rank, epoch and step and it has not crashed before."""
        if rank != 0 or epoch != self.epoch or step != self.after_steps or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as handle:
            handle.write(f"crashed at epoch {epoch}, step {step}\n")
        os._exit(1)


# --------------------------------------------------------------------------- worker side


class TrainWorker:
    """One Ray Train worker's view of the run: rank, device, precision, data and checkpoints."""

    def __init__(self, threads: int | None = None, cpus: float = 1.0):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type == "cuda"
        group = ray.util.get_current_placement_group()
        self.placement_group = group.id.hex() if group is not None else None
        # Ray sets OMP_NUM_THREADS from the reserved CPUs; an explicit count wins (benchmarks match loops).
        torch.set_num_threads(threads or max(1, math.floor(cpus)))

    @property
    def is_chief(self) -> bool:
        """True on rank 0, the worker that writes checkpoints, metrics and logs."""
        return self.rank == 0

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the device (channels_last on GPU) and wrap it for DDP."""
        import ray.train.torch

        if self.on_gpu:
            model = model.to(memory_format=torch.channels_last)
        return ray.train.torch.prepare_model(model)

    def batches(self, batch_size: int, *, seed: int, epoch: int, dtypes: dict[str, torch.dtype] | None = None,
                dataset: str = "train") -> Iterable[dict[str, torch.Tensor]]:
        """This worker's share of one epoch as dicts of column tensors on the device, full batches only.

        Rows are shuffled within a buffer, seeded per epoch and worker. Every worker
        gets the same number of batches (Ray splits shards equally), as DDP requires.
        """
        shard = self.dataset_shard(dataset)
        return shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, dtypes=dtypes, device=self.device,
            prefetch_batches=PREFETCH_BATCHES, local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=seed + 7919 * epoch + self.rank, pin_memory=self.on_gpu)

    def dataset_shard(self, dataset: str) -> "ray.data.DataIterator":
        """This worker's iterator over a training dataset: its fixed share when cached, else its streamed split."""
        import ray.train

        try:
            return ray.train.get_dataset_shard(worker_share_name(dataset, self.rank))
        except KeyError:
            return ray.train.get_dataset_shard(dataset)

    def image_batches(self, batch_size: int, *, seed: int, epoch: int, dataset: str = "train",
                      column: str = "image") -> Iterator[torch.Tensor]:
        """This worker's share of one epoch: uint8 image tensors (B, C, H, W) on the device, full batches only."""
        for batch in self.batches(batch_size, seed=seed, epoch=epoch, dtypes={column: torch.uint8}, dataset=dataset):
            yield batch[column]

    def mean_over_workers(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value across all workers (each worker saw a different shard)."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return dict(values)
        backend_device = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=backend_device)
        torch.distributed.all_reduce(tensor)
        return {key: float(v) / self.world_size for key, v in zip(values, tensor.tolist())}

    def gather(self, value: T) -> list[T]:
        """Every worker's ``value`` (a small picklable object), in rank order, on every worker."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def restore(self, fallback_uri: str | None = None, run_uri: str | None = None) -> dict[str, Any] | None:
        """The latest checkpoint dict of this run (after a worker failure or a rerun), else `fallback_uri`'s.

        With ``run_uri`` (the run's directory in storage), a newer checkpoint found
        there wins over Ray's: a worker that died right after saving one may have
        left it unregistered. Rank 0 picks it and every worker loads the same one.
        """
        import ray.train

        from rxray.train.checkpoints import load_checkpoint, newest_checkpoint_after

        state = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        elif fallback_uri:
            state = load_checkpoint(fallback_uri)
        if run_uri is None:
            return state
        newer = newest_checkpoint_after(run_uri, state["epoch"] if state else 0) if self.is_chief else None
        chosen = self.gather(newer["uri"] if newer else None)[0]
        if chosen is None:
            return state
        if self.is_chief:
            worker_print(f"restored the epoch {newer['epoch']} checkpoint from storage ({chosen}); Ray Train had "
                         f"{state['epoch'] if state else 'none'}")
        return newer if self.is_chief else load_checkpoint(chosen)

    def report(self, metrics: dict[str, Any], epoch: int, state: Callable[[], dict[str, Any]]) -> None:
        """Report an epoch's metrics from every worker, with rank 0's checkpoint dict (built by `state()`)."""
        import ray.train

        if self.placement_group:
            metrics = {**metrics, PLACEMENT_GROUP_KEY: self.placement_group}
        if not self.is_chief:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(epoch))
            return
        with tempfile.TemporaryDirectory() as directory:
            from rxray.train.checkpoints import save_checkpoint_file

            save_checkpoint_file(state(), directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoint_dir_name(epoch))


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device (tensor cores, no loss scaling needed), a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (state dicts without the 'module.' prefix)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class ThroughputMeter:
    """Images per second over an epoch, data waits included (what a user of the run experiences)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.images = 0
        self.data_wait_s = 0.0  # time blocked on the input pipeline: high means input-bound
        self.started = time.perf_counter()

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield from `batches`, adding the time spent waiting for each one to `data_wait_s`."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_wait_s += time.perf_counter() - began
            yield batch

    def update(self, images: int) -> None:
        """Count images processed since the meter started."""
        self.images += images

    @property
    def seconds(self) -> float:
        """Seconds since the meter started, after the device finished queued work."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.started

    @property
    def images_per_s(self) -> float:
        """Images per second so far (0 before the first update)."""
        seconds = self.seconds
        return self.images / seconds if seconds > 0 else 0.0


class EpochLog:
    """Per-epoch metrics written under a run's output URI: metrics.jsonl and TensorBoard events.

    metrics.jsonl is rewritten whole from the history kept in the checkpoint, so
    after a resume it never holds epochs the checkpoint does not know. Event files
    go to a local directory (the output itself when it is local) and are copied to
    object storage after each epoch; a restarted run adds a new event file. Each epoch
    also prints one line (``step: epoch k/n loss ...``), the run's progress on the console.
    """

    def __init__(self, out: str, step: str = "train", epochs: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        self.step = step
        self.epochs = epochs
        self._remote_events = storage.join(out, TENSORBOARD_DIR) if storage.is_remote(out) else None
        if self._remote_events:
            self._local_events = tempfile.mkdtemp(prefix="rxray-tb-")
        else:
            self._local_events = storage.join(out, TENSORBOARD_DIR)
            os.makedirs(self._local_events, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self._local_events)

    def write(self, history: list[dict[str, Any]]) -> None:
        """Record the newest epoch of `history` (all epochs so far, in order)."""
        latest = history[-1]
        shown = ", ".join(f"{key} {value:.4g}" for key, value in latest.items()
                          if key not in CONSOLE_SKIP and isinstance(value, (int, float)))
        worker_print(f"{self.step}: epoch {latest['epoch']}/{self.epochs or '?'}: {shown}")
        for key, value in latest.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, global_step=latest["epoch"])
        self.writer.flush()
        lines = "".join(json.dumps(entry) + "\n" for entry in history)
        storage.write_text(storage.join(self.out, METRICS_FILE), lines)
        if self._remote_events:
            for name in os.listdir(self._local_events):
                with open(os.path.join(self._local_events, name), "rb") as handle:
                    storage.write_bytes(storage.join(self._remote_events, name), handle.read())

    def close(self) -> None:
        """Flush and close the event writer (and drop the local copy of remote events)."""
        self.writer.close()
        if self._remote_events:
            shutil.rmtree(self._local_events, ignore_errors=True)


def read_metrics(out: str) -> list[dict[str, Any]]:
    """The per-epoch metrics a run wrote under its output URI ([] if none yet)."""
    path = storage.join(out, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
