"""Connecting to Ray, quiet by default, and the provenance every output carries (versions, timings)."""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import ray


VERBOSE_ENV = "RXRAY_VERBOSE"  # set (or `rxray --verbose`) to see Ray's own logs and every Ray Data progress bar
# Driver-side loggers whose INFO lines flood a run (Ray Train's reports, Ray Tune's status) and the
# token-authentication notice every start prints at WARNING (authentication stays on; only the notice goes).
# Ray Data's notice that progress bars are off (rxray turns them off for training passes) is one more.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
FREE_CPU_WAIT_S = 10.0  # how long the next step waits for the CPUs the step before is giving back
_CHATTY_LOGGERS = {"ray.train": logging.WARNING, "ray.tune": logging.WARNING, "ray.data": logging.WARNING,
                   "ray._private.authentication": logging.ERROR, RAY_DATA_PROGRESS_LOGGER: logging.ERROR}


def quiet_data_notices() -> None:
    """Keep off the console the Ray Data notices that rxray's own choices cause: "progress bars disabled" (rxray
    turns them off for training passes) and the deprecated field that Ray Train's own ingest options pass."""
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.* is deprecated")


class QuietDataNotices:
    """Runs :func:`quiet_data_notices` in every process that unpickles it, once. Set on a training dataset's context,
    it travels with the context to every process that works on the dataset, the actors Ray Train and Ray Data start
    to stream it to the workers among them (DatasetManager, SplitCoordinator), whose notices would otherwise reach
    the console once per streamed split."""

    KEY = "rxray.quiet_data_notices"

    def __reduce__(self):
        return (_quiet_data_notices_here, ())


_NOTICES_QUIETENED = False  # whether this process has run quiet_data_notices for a QuietDataNotices


def _quiet_data_notices_here() -> QuietDataNotices:
    """Unpickling (or copying) a :class:`QuietDataNotices`: quieten this process once, give the marker back.

    Once, because every Ray Data task and every copy of a context unpickles one, and each new warnings filter
    resets which warnings this process has already shown."""
    global _NOTICES_QUIETENED
    if not _NOTICES_QUIETENED:
        quiet_data_notices()
        _NOTICES_QUIETENED = True
    return QuietDataNotices()


def hide_progress_bars(dataset: "ray.data.Dataset") -> None:
    """Turn ``dataset``'s progress bars off, and Ray Data's notice that they are off with them, in every process
    that runs the dataset (the driver, a task it is passed to, Ray Train's streaming actors)."""
    dataset.context.enable_progress_bars = False
    dataset.context.set_config(QuietDataNotices.KEY, QuietDataNotices())


def wait_for_a_free_cpu(timeout_s: float = FREE_CPU_WAIT_S) -> bool:
    """Wait, at most ``timeout_s``, until Ray reports a free CPU (at once without Ray or CPUs); whether one is free.

    A step's tasks and actors give their CPUs back a moment after they end (measured: ~0.1 s
    after two tasks), and the next step's first dataset read in that moment makes Ray Data
    warn that "the Dataset job will hang". A read that truly finds no CPU still warns.
    """
    if not ray.is_initialized() or not ray.cluster_resources().get("CPU"):
        return False
    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def verbose() -> bool:
    """True when the user asked for Ray's full logs (RXRAY_VERBOSE set and not 0/false)."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or start local Ray.

    By default Ray logs at WARNING (workers, actors, Ray Data and the driver's chatty
    loggers), so a step prints its own progress and summary, and data passes show Ray
    Data's progress bar on a terminal; :data:`VERBOSE_ENV` restores Ray's INFO logs.
    """
    quiet = not verbose()
    if quiet:  # also when Ray is already up (a Ray Data call can start it before a step gets here)
        for name, level in _CHATTY_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        # Ray Data reads this when it is first imported (its per-dataset plans and text progress are INFO); a
        # step that imported it before joining Ray is quietened by the "ray.data" level above.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        quiet_data_notices()  # the deprecated field in Ray Train's own ingest options: no user of rxray can act on it
    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING",
             log_to_driver=True, ignore_reinit_error=True,
             logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING") if quiet else None)


def json_safe(value: Any, digits: int | None = None) -> Any:
    """``value`` as strict JSON: NaN and infinities as null, numpy scalars as Python, floats rounded if asked."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, digits) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return value if digits is None else round(value, digits)
    return value


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide results, plus the code revision when known."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("rxray", "ray", "torch", "torchvision", "pyarrow", "numpy", "scikit-learn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode == 0:
            versions["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return versions


class Timer:
    """Named wall-clock timings for a manifest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
