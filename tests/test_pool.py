"""The inference pool: one behaviour for a missing GPU, and pool sizes for a cluster's CPUs and GPUs."""

from __future__ import annotations

import pytest
import ray
import torch

from rxray.batch.pool import InferenceActor, PoolPlan, plan_pool
from rxray.errors import ConfigError
from rxray.models.device import GpuUnavailable, torch_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_asking_for_a_gpu_without_one_is_a_clear_error_not_a_cpu_fallback():
    with pytest.raises(GpuUnavailable, match="--gpu was asked for but no CUDA device is visible to this "
                                             "InferenceActor actor"):
        InferenceActor(gpu=True)
    assert isinstance(GpuUnavailable("x"), RuntimeError)


def test_an_actor_on_the_cpu_takes_its_share_of_threads():
    before = torch.get_num_threads()
    try:
        actor = InferenceActor(gpu=False, threads=1)
        assert actor.device == torch.device("cpu") == torch_device(False)
        assert torch.get_num_threads() == 1
        with actor.precision():  # float32 on the CPU
            assert torch.ones(1).add(1).dtype == torch.float32
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("resources, actors, gpu, cpu_actors, expected", [
    ({"CPU": 8}, None, False, None, PoolPlan(actors=4, threads=2)),  # half the CPUs, two threads each
    ({"CPU": 8}, None, False, 1, PoolPlan(actors=1, threads=8)),  # a step's own CPU default
    ({"CPU": 8}, 3, False, None, PoolPlan(actors=3, threads=2)),  # --actors wins
    ({"CPU": 16, "GPU": 2}, None, True, None, PoolPlan(actors=2, threads=8, gpu=True)),  # one actor per GPU
    ({"CPU": 4}, 2, True, None, PoolPlan(actors=2, threads=2, gpu=True)),  # GPU workers yet to come
])
def test_pool_sizes_for_the_cluster(monkeypatch, resources, actors, gpu, cpu_actors, expected):
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert plan_pool(actors, gpu, field="embed.actors", cpu_actors=cpu_actors) == expected


def test_gpus_asked_for_but_none_in_the_cluster_names_the_field(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4})
    with pytest.raises(ConfigError, match="explain.actors: no GPUs in the Ray cluster yet"):
        plan_pool(None, True, field="explain.actors")
