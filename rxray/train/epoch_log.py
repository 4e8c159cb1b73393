"""Per-epoch metrics of a training run: metrics.jsonl, TensorBoard events and one console line per epoch."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from rxray import storage
from rxray.train.worker import worker_print

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Per-epoch fields left out of the console line (they stay in metrics.jsonl and TensorBoard).
CONSOLE_SKIP = frozenset({"epoch", "steps", "seconds", "data_wait_s", "val_f1_macro", "val_accuracy", "val_pr_auc",
                          "val_n", "stopped_early"})
PROGRESS_EVERY_S = 30.0  # a line within an epoch this often: an RxRx2 epoch on a small cluster takes many minutes


class EpochProgress:
    """Lines within one epoch (``step: epoch k/n: 310/1031 steps, 96 images/s, ETA 450 s``) every ``every_s``.

    ``total_steps`` is the expected number of steps of one worker (None: no total, no ETA).
    """

    def __init__(self, step: str, epoch: int, epochs: int, total_steps: int | None,
                 every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.prefix = f"{step}: epoch {epoch + 1}/{epochs}"
        self.total_steps = total_steps
        self.every_s = every_s
        self.clock = clock
        self.start = self.last = clock()

    def update(self, steps: int, images: int) -> str | None:
        """The progress line after ``steps`` steps and ``images`` images (all workers), if one is due."""
        now = self.clock()
        if now - self.last < self.every_s or steps == 0:
            return None
        self.last = now
        elapsed = now - self.start
        line = f"{self.prefix}: {steps}" + (f"/{self.total_steps}" if self.total_steps else "") + \
            f" steps, {images / elapsed:.0f} images/s"
        if self.total_steps and steps < self.total_steps:
            line += f", ETA {(self.total_steps - steps) * elapsed / steps:.0f} s"
        return line


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
