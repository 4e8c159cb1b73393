"""One inference pool for every pass of a model over shards: embed, explain and test-split prediction.

Ray's batch-inference pattern: each per-batch step is a callable class that loads its
model once in ``__init__`` and runs ``__call__(batch)`` per numpy batch, on a Ray Data
actor pool. This module holds what those classes share:

- :class:`InferenceActor`: the base class: torch threads, the device (one behaviour for a
  missing GPU: :class:`~rxray.models.device.GpuUnavailable`), and the precision;
- :func:`plan_pool`: how many actors and threads for the running cluster;
- :func:`map_batches`: the one ``Dataset.map_batches`` call that runs a dataset through them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rxray.errors import ConfigError

if TYPE_CHECKING:
    import ray.data


class InferenceActor:
    """Base of the Ray Data callable classes: torch threads, device and precision, set once per actor.

    ``threads`` is this actor's share of the node's cores, so a pool of actors does not
    oversubscribe the CPUs; ``gpu`` asks for CUDA, and an actor that sees none raises.
    Subclasses load their model onto ``self.device`` after calling ``super().__init__``.
    """

    def __init__(self, gpu: bool = False, threads: int | None = None):
        import torch

        from rxray.models.device import torch_device

        if threads:
            torch.set_num_threads(threads)
        self.device = torch_device(gpu, where=f"this {type(self).__name__} actor")

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on a GPU, float32 on the CPU (:func:`rxray.models.device.autocast_for`)."""
        from rxray.models.device import autocast_for

        return autocast_for(self.device)


@dataclass(frozen=True)
class PoolPlan:
    """An actor pool's size and each actor's share of the cluster."""

    actors: int
    threads: int  # torch threads per actor
    gpu: bool = False
    # Logical CPUs Ray reserves per actor. One although it runs `threads` torch threads: reserving
    # them all would leave no slot for the read and write tasks, and the streaming pipeline would stall.
    cpus_per_actor: float = 1.0

    def describe(self, batch_size: int) -> dict[str, Any]:
        """The pool as a step's manifest records it."""
        return {"actors": self.actors, "threads_per_actor": self.threads, "gpu": self.gpu, "batch_size": batch_size}


def plan_pool(actors: int | None, gpu: bool, *, field: str, cpu_actors: int | None = None) -> PoolPlan:
    """The pool for the running Ray cluster: ``actors`` (None: one per GPU, or ``cpu_actors`` on CPUs).

    ``cpu_actors`` None means half as many actors as CPUs, which leaves slots free for the
    read and write tasks. Threads are each actor's share of all the cluster's cores, so the
    pool uses every core without oversubscribing them. ConfigError naming ``field`` when
    GPUs are asked for, none is in the cluster yet, and no pool size is given.
    """
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpu:
        gpus = int(resources.get("GPU", 0))
        if actors is None and gpus == 0:
            raise ConfigError(field, "no GPUs in the Ray cluster yet; give --actors to let the autoscaler add "
                                     "GPU workers")
        actors = actors or gpus
    else:
        actors = actors or cpu_actors or max(1, cpus // 2)
    return PoolPlan(actors=actors, threads=max(1, cpus // actors), gpu=gpu)


def map_batches(dataset: "ray.data.Dataset", actor: type[InferenceActor], plan: PoolPlan, *, batch_size: int,
                **constructor_kwargs: Any) -> "ray.data.Dataset":
    """The lazy dataset of ``actor(**constructor_kwargs, gpu=..., threads=...)`` applied to every numpy batch.

    One row out per row in (``udf_modifying_row_count=False`` lets Ray Data keep row counts).
    """
    import ray.data

    return dataset.map_batches(
        actor,
        fn_constructor_kwargs={**constructor_kwargs, "gpu": plan.gpu, "threads": plan.threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=1 if plan.gpu else 0,
        udf_modifying_row_count=False,
    )
