"""Ray Train on the driver side: the one way every training step runs, stores and recovers.

:func:`launch` is pretrain's and finetune's one way onto Ray Train: the run's config.yaml, its
datasets cached in the object store when they fit (:func:`cache_datasets`, then split once
into fixed worker shares), its :class:`~rxray.train.epochs.RunSettings`, and :func:`fit`,
which builds the TorchTrainer (scaling, storage, failure and checkpoint policy) around the
shared worker loop (:mod:`rxray.train.epochs`) and turns a spent failure budget into
:class:`~rxray.errors.StepFailed`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from rxray import storage
from rxray.errors import ConfigError, StepFailed
from rxray.layout import N_CHANNELS
from rxray.options import config_to_yaml
from rxray.outputs import CONFIG_FILE, CONFLICT, STALE, Rerun, rerun_decision
from rxray.runtime import hide_progress_bars, verbose, wait_for_a_free_cpu
from rxray.train.worker import worker_share_name

if TYPE_CHECKING:
    from rxray.models.inputs import InputRecipe
    from rxray.train.epochs import RunSettings, TrainingStep

# Checkpoints kept per run: the latest for resuming, a couple more in case the newest is damaged.
CHECKPOINTS_KEPT = 3
# Attempts to (re)start the worker group that fail for want of resources, each after Ray Train's worker-group
# start timeout (60 s by default), before the step fails. Ray Train's default is to try forever: after a node
# loss on a cluster that cannot replace it, a run then retries in silence for good. Ten give an autoscaler
# about ten minutes to bring a node back.
WORKER_GROUP_START_ATTEMPTS = 10
# Share of the cluster's object store that `cache=auto` lets the training images take. Held for the whole run,
# so every epoch after the first skips the Parquet read and Ray Data's per-epoch start (~1.5 s, more when
# busy); above it the images stream from storage every epoch, as they must at full RxRx2 scale on a small cluster.
CACHE_STORE_FRACTION = 0.4
# Logical CPUs each task of a training run's input pipeline asks for (read, filter, label). The workers may hold
# all but a fraction of each node (worker_cpus leaves one CPU across the cluster: 0.5 on each of two 1-CPU nodes),
# and a task asking for a whole CPU then never runs: not the streamed read of an epoch, and after a node loss not
# the re-execution that rebuilds the cached blocks that lived there, which the restarted workers then wait for
# until the stall guard fails them, restart after restart. A quarter of a CPU fits beside them.
INPUT_TASK_CPUS = 0.25
# Datasets a training step reads whole on one worker after training (a classifier's held-out splits to predict).
WHOLE_DATASETS = ("predict",)
# Per-row bytes beyond the image: metadata columns and Arrow overhead, rounded up.
ROW_OVERHEAD_BYTES = 1024
# How often Ray Train's controller polls its workers. It collects each epoch's report when it polls, and a worker's
# next report waits until the last one is collected, so at Ray's default (2 s) every epoch shorter than that waited
# for the poll: 1.7 s of the 2.0 s an epoch of the demo's IFN-beta classifier took (py-spy: 78% of the worker's
# time in `ray.train.report`). Polling four times a second also notices a dead worker sooner. A value the user
# sets in RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins; Ray Train passes it on to the controller.
CONTROLLER_POLL_INTERVAL_S = 0.25
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def worker_cpus(workers: int, gpu: bool, requested: float | None) -> float:
    """CPUs reserved per training worker: `requested`, else 1 unless that leaves no CPU to feed data.

    Ray Data's read tasks need a CPU of their own; on a small machine (2 CPUs, 2
    workers) whole-CPU workers would leave none and training would wait forever. Split
    workers leave at least INPUT_TASK_CPUS of each 1-CPU node for the input tasks.
    """
    if requested is not None:
        return requested
    import ray

    return cpus_per_worker(ray.cluster_resources().get("CPU", 0.0), workers, gpu)


def cpus_per_worker(total: float, workers: int, gpu: bool) -> float:
    """A worker's share of a cluster of ``total`` CPUs: whole when one is left over, else all but one CPU shared."""
    if gpu or total >= workers + 1:
        return 1.0
    return max(0.25, min(1.0 - INPUT_TASK_CPUS, (total - 1.0) / workers))


def input_statistics(cfg: Any) -> tuple[list[float], list[float]]:
    """The per-stain mean and std the ingest of ``cfg.data`` recorded; ConfigError naming ``<section>.data`` if none."""
    from rxray.data.shards import channel_stats

    try:
        return channel_stats(cfg.data)
    except FileNotFoundError as exc:
        raise ConfigError(f"{cfg.section}.data", str(exc)) from None


def launch(cfg: Any, make_step: Callable[["RunSettings"], "TrainingStep"], *, run_name: str, recipe: "InputRecipe",
           datasets: dict[str, Any], rows: dict[str, int], resume_from: str | None, train_rows: int, cpus: float,
           what: str) -> Any:
    """Train a run of a training step's config on Ray Train: its config.yaml, its datasets cached (``cfg.cache``),
    its settings, then :func:`fit` of the step ``make_step`` builds from them; returns the ray.train.Result."""
    from rxray.train.epochs import RunSettings

    storage.makedirs(cfg.out)
    storage.write_text(storage.join(cfg.out, CONFIG_FILE), config_to_yaml(cfg))
    image_side = shard_image_side(cfg.data)
    datasets = cache_datasets(datasets, rows, N_CHANNELS * image_side ** 2, cfg.cache, cfg.section)
    settings = RunSettings(step=cfg.section, out=cfg.out, run_name=run_name, epochs=cfg.epochs,
                           batch_size=cfg.batch_size, seed=cfg.seed, image_side=image_side, recipe=recipe,
                           cpus_per_worker=cpus, threads=cfg.threads, resume_from=resume_from,
                           stall_timeout_s=cfg.stall_timeout, train_rows=train_rows)
    return fit(make_step(settings), workers=cfg.workers, gpu=cfg.gpu, max_failures=cfg.max_failures,
               datasets=datasets, what=what)


def fit(step: "TrainingStep", *, workers: int, gpu: bool, max_failures: int, datasets: dict[str, Any],
        what: str) -> Any:
    """Train ``step`` on a Ray Train worker group; its checkpoints and run state live under its out/run name.

    The same out and run name restore the run (Ray Train V2 reloads its checkpoint
    list from storage), and a worker that dies is restarted from the latest
    checkpoint up to `max_failures` times; after that, StepFailed says ``what`` failed.
    Returns the ray.train.Result.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rxray.train.epochs import train_loop_per_worker

    os.environ.setdefault(CONTROLLER_POLL_ENV, str(CONTROLLER_POLL_INTERVAL_S))
    run = step.run
    filesystem, path = storage.pyarrow_filesystem(run.out)
    run_config = RunConfig(
        name=run.run_name,
        storage_path=path,
        storage_filesystem=filesystem if storage.is_remote(run.out) else None,
        failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=WORKER_GROUP_START_ATTEMPTS),
        checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=tune_report_callbacks(),
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),  # its log files keep all
    )
    datasets, streamed = fixed_worker_shares(datasets, workers)
    if not verbose():  # a per-epoch split-coordinator progress bar says nothing the epoch log does not
        for dataset in datasets.values():
            hide_progress_bars(dataset)
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": run.cpus_per_worker}
                            | ({"GPU": 1} if gpu else {}))
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"step": step, "verbose": verbose()},
                           scaling_config=scaling, run_config=run_config, datasets=datasets,
                           dataset_config=DataConfig(datasets_to_split=streamed,
                                                     execution_options=ordered_ingest_options(datasets, streamed)))
    try:
        return trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError: the failure budget is spent
        raise StepFailed(failure_message(exc, what, max_failures)) from exc


def failure_message(error: Exception, what: str, max_failures: int) -> str:
    """One line saying why a training run gave up: its workers kept failing, or could not be started again."""
    from ray.train import ControllerError

    if isinstance(error, ControllerError):  # the worker group could not be (re)started, e.g. after a node loss
        cause = str(error.controller_failure).strip().splitlines()
        return (f"{what} failed: its workers could not be started again after {WORKER_GROUP_START_ATTEMPTS} "
                f"attempts ({cause[0] if cause else type(error.controller_failure).__name__}); the same command "
                f"resumes from the last checkpoint once the cluster has room")
    failures = getattr(error, "worker_failures", None) or {}  # Ray's WorkerGroupError: each failed rank's error
    if failures:
        # A peer of a stalled worker fails too (its collective breaks): the stall is the cause to name.
        rank, failure = min(failures.items(), key=lambda item: ("DataStalled" not in str(item[1]), item[0]))
        return f"{what} failed after up to {max_failures} restarts: worker {rank}: {_last_line(failure)}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{what} failed after up to {max_failures} restarts: {first}"


def _last_line(error: BaseException) -> str:
    """The line of a (possibly remote, traceback-carrying) error that names it: ``DataStalled: no train batch ...``."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_rerun(cfg: Any, step: str, finished: str) -> Rerun:
    """The rerun policy's decision for a training step's config on its output; ConfigError when it cannot go on.

    A run keeps its architecture (a conflict), and a finished run cannot take other
    settings (stale); ``finished`` names such a run in the message ("a finished classifier").
    """
    rerun = rerun_decision(cfg.out, cfg)
    if rerun.action == CONFLICT:
        raise rerun.conflict_error(step, cfg.out)
    if rerun.action == STALE:
        raise ConfigError(f"{step}.{next(iter(rerun.changed))}",
                          f"{cfg.out} holds {finished} trained with other settings ({rerun.changes()}); use a new "
                          f"--out to train with them, or more --epochs to continue the run with them")
    return rerun


def shard_image_side(uri: str) -> int:
    """Image side S of the shards' (6, S, S) images, from the ingest manifest or the Parquet schema."""
    from rxray.data.shards import IMAGE_COLUMN, read_shards, shard_manifest

    shape = shard_manifest(uri).get("image_shape")
    if not shape:
        schema = read_shards(uri, columns=[IMAGE_COLUMN]).schema()
        shape = schema.types[schema.names.index(IMAGE_COLUMN)].shape
    return int(shape[-1])


def fixed_worker_shares(datasets: dict[str, Any], workers: int) -> tuple[dict[str, Any], list[str]]:
    """Cached datasets split once into one fixed share per worker; the names of those left to streaming_split.

    Ray Train's default streaming_split hands blocks to whichever worker asks first, so
    which worker trains on which images changes from run to run. A cached (materialised,
    in file order) dataset is split here instead, deterministically and into equal shares
    (``Dataset.split``): each worker sees the same images in the same order every run. A
    dataset too large to cache streams as before. With :func:`ordered_ingest_options` (batches
    kept in that order) the same seed gives bitwise the same weights. WHOLE_DATASETS are
    passed on whole, to be read by one worker.
    """
    from ray.data.dataset import MaterializedDataset

    fixed, streamed = {}, []
    for name, dataset in datasets.items():
        if name in WHOLE_DATASETS:  # read whole by one worker: neither split nor dropped to equal shares
            fixed[name] = dataset
        elif isinstance(dataset, MaterializedDataset):
            shares = dataset.split(workers, equal=True) if workers > 1 else [dataset]
            fixed.update({worker_share_name(name, rank): share for rank, share in enumerate(shares)})
        else:
            fixed[name] = dataset
            streamed.append(name)
    return fixed, streamed


def ordered_ingest_options(datasets: dict[str, Any], streamed: list[str]) -> dict[str, Any]:
    """Ray Train's ingest options for each fixed worker share, with its batches kept in the share's order.

    Ray Data formats and collates prefetched batches in a thread pool whose output order
    varies from run to run unless ``preserve_order`` is on, and Ray Train resets every
    dataset's options to the driver's defaults (order off): two runs with one seed then
    train on the same images in different batches. Streamed datasets keep the defaults;
    their split is not fixed anyway.
    """
    from ray.train import DataConfig

    options = {}
    for name in datasets:
        if name not in streamed:
            options[name] = DataConfig.default_ingest_options()
            options[name].preserve_order = True
    return options


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
    wait_for_a_free_cpu()  # the step's own planning tasks may still be giving theirs back
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

