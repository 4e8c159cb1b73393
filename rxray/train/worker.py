"""One Ray Train worker's side of a training run: its rank, device, data and checkpoints, and a throughput meter.

:class:`TrainWorker` (rank, device, threads, channels_last + DDP, dataset shard batches,
checkpoint report/restore) and :class:`ThroughputMeter` (images/s, data waits).
"""

from __future__ import annotations

import math
import os
import queue
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import torch

from rxray.models.checkpoints import (CHECKPOINT_FILE, checkpoint_dir_name, load_checkpoint, newest_checkpoint_after,
                                      save_checkpoint_file)

if TYPE_CHECKING:
    import ray.data

T = TypeVar("T")

# Rows buffered per worker for shuffling within its stream: mixes shard order at little memory cost.
SHUFFLE_BUFFER_ROWS = 512
# Batches fetched ahead of the training step, so reading and collating overlap with compute.
PREFETCH_BATCHES = 2
# A worker waiting for its next batch says so this often, with how long it has waited (see stall_guarded).
WAIT_REPORT_S = 30.0
# Reported with every epoch: the placement group holding the run's workers. A Ray Tune driver that stops the run
# early (ASHA) kills its controller, and only a dashboard-backed cleaner would then free the group; `rxray tune`
# frees it by this id.
PLACEMENT_GROUP_KEY = "train_placement_group"


class DataStalled(RuntimeError):
    """No batch arrived from the input pipeline within the stall timeout (e.g. its blocks were on a lost node)."""


def stall_guarded(batches: Iterable[T], timeout_s: float, what: str,
                  say: Callable[[str], None] | None = None, say_every_s: float = WAIT_REPORT_S) -> Iterator[T]:
    """Yield from ``batches``; raise DataStalled when the next item takes longer than ``timeout_s`` to arrive.

    Ray Data's iterators wait for their blocks without a deadline: when a node is lost
    with blocks that cannot be rebuilt (or the tasks rebuilding them cannot get a CPU),
    a worker would wait forever while its peers wait for it in DDP. Failing instead
    lets Ray Train restart the group from the last checkpoint, or report the step failed.
    Only the wait for data counts: a slow training step never trips it. The items are
    produced by a thread, one ahead of the consumer. A wait longer than ``say_every_s``
    is told to ``say`` every ``say_every_s``, so a run that waits never waits in silence.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    finished = object()

    def produce() -> None:
        try:
            for item in batches:
                handoff.put((item, None))
            handoff.put((finished, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            handoff.put((None, exc))

    threading.Thread(target=produce, name=f"rxray-{what}", daemon=True).start()
    while True:
        item, error = _next_handoff(handoff, timeout_s, what, say, say_every_s)
        if error is not None:
            raise error
        if item is finished:
            return
        yield item


def _next_handoff(handoff: queue.Queue, timeout_s: float, what: str, say: Callable[[str], None] | None,
                  say_every_s: float) -> tuple[Any, BaseException | None]:
    """The producer's next (item, error), said to ``say`` every ``say_every_s`` of waiting; DataStalled at timeout."""
    began = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - began)
        try:
            return handoff.get(timeout=max(0.0, min(left, say_every_s)))
        except queue.Empty:
            waited = time.monotonic() - began
            if waited >= timeout_s:
                raise DataStalled(f"no {what} batch arrived for {timeout_s:g} s (a lost node's data, or no CPU left "
                                  f"to read it); failing so the run restarts from its last checkpoint") from None
            if say is not None:
                say(f"waiting {waited:.0f} s for the next {what} batch (Ray Data reading or rebuilding its blocks); "
                    f"the worker fails and the run restarts at {timeout_s:g} s")


def worker_print(line: str) -> None:
    """Print one line from a training worker, once: Ray Train also routes print() to its logger."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker_share_name(dataset: str, rank: int) -> str:
    """The name under which a worker finds its fixed share of a cached dataset."""
    return f"{dataset}@{rank}"


class TrainWorker:
    """One Ray Train worker's view of the run: rank, device, precision, data and checkpoints."""

    def __init__(self, threads: int | None = None, cpus: float = 1.0, stall_timeout_s: float = math.inf):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type == "cuda"
        group = ray.util.get_current_placement_group()
        self.placement_group = group.id.hex() if group is not None else None
        self.stall_timeout_s = stall_timeout_s
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
        return self.stall_guarded(shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, dtypes=dtypes, device=self.device,
            prefetch_batches=PREFETCH_BATCHES, local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=seed + 7919 * epoch + self.rank, pin_memory=self.on_gpu), dataset)

    def stall_guarded(self, batches: Iterable[T], what: str) -> Iterator[T]:
        """``batches`` failing with DataStalled after this run's stall timeout (:func:`stall_guarded`); a long wait
        is printed with this worker's rank."""
        if math.isinf(self.stall_timeout_s):
            return iter(batches)
        return stall_guarded(batches, self.stall_timeout_s, what,
                             say=lambda line: worker_print(f"train worker {self.rank}: {line}"))

    def dataset_shard(self, dataset: str) -> "ray.data.DataIterator":
        """This worker's iterator over a training dataset: its fixed share when cached, else its streamed split."""
        import ray.train

        try:
            return ray.train.get_dataset_shard(worker_share_name(dataset, self.rank))
        except KeyError:
            return ray.train.get_dataset_shard(dataset)

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
            save_checkpoint_file(state(), directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoint_dir_name(epoch))


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

