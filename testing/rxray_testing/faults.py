"""Faults injected into rxray's training workers from outside its code: a worker process that dies.

rxray's code carries no test hooks. A test swaps the worker loop the driver hands to Ray Train
(:func:`rxray.train.epochs.train_loop_per_worker`, which :func:`rxray.train.launch.fit` looks
up when it builds the trainer) for one that installs the fault in each worker process and then
runs rxray's own loop; Ray ships the wrapper to the workers with the run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator


def crashing_loop(epoch: int, marker: str, after_steps: int = 1) -> Callable[[dict[str, Any]], None]:
    """rxray's worker loop, except that rank 0's process dies (``os._exit``, not an exception) ``after_steps``
    optimisation steps into the 0-based ``epoch``, once per ``marker`` file: Ray sees the worker vanish and must
    restart the group from the last checkpoint, and the marker tells the restarted workers the crash has happened.

    The wrapper holds no reference to the loop it wraps: Ray ships it to the workers by value, and each worker
    runs its own, unpatched import of rxray's loop (a reference taken in the driver, where the loop is swapped
    for this wrapper, would travel by value too, with its own copy of the module's functions, which the patch
    below would then miss)."""

    def worker_loop(loop_config: dict[str, Any]) -> None:
        from rxray.train import epochs

        train_epoch = epochs._train_epoch

        def train_epoch_then_crash(step, worker, model, optimizer, generator, index):
            if index == epoch and worker.rank == 0 and not os.path.exists(marker):
                batch_inputs, steps = step.batch_inputs, [0]

                def inputs_or_crash(batch, batch_generator):
                    if steps[0] == after_steps:
                        with open(marker, "w") as handle:
                            handle.write(f"crashed at epoch {index}, step {steps[0]}\n")
                        os._exit(1)
                    steps[0] += 1
                    return batch_inputs(batch, batch_generator)

                step.batch_inputs = inputs_or_crash
            return train_epoch(step, worker, model, optimizer, generator, index)

        epochs._train_epoch = train_epoch_then_crash
        epochs.train_loop_per_worker(loop_config)

    return worker_loop


@contextlib.contextmanager
def crash_once(epoch: int, marker: str, after_steps: int = 1) -> Iterator[None]:
    """While open, training runs this process launches get :func:`crashing_loop` as their worker loop."""
    from rxray.train import epochs

    loop = epochs.train_loop_per_worker
    epochs.train_loop_per_worker = crashing_loop(epoch, marker, after_steps)
    try:
        yield
    finally:
        epochs.train_loop_per_worker = loop
