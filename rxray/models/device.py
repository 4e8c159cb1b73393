"""Where a model runs: the torch device for a step's ``--gpu``, and the precision it computes in.

Every inference pass (embed, explain, test-split prediction, probe) chooses its device
here, so a missing GPU has one behaviour everywhere: a clear error. Falling back to the
CPU instead would turn a misconfigured cluster into a run a hundred times slower that
still looks healthy.
"""

from __future__ import annotations

import contextlib
import os

import torch


class GpuUnavailable(RuntimeError):
    """``--gpu`` was asked for but this process sees no CUDA device; ``str()`` says where and what to check."""


def torch_device(gpu: bool, where: str = "this process") -> torch.device:
    """``cuda`` when ``gpu`` (GpuUnavailable if no CUDA device is visible to ``where``), else ``cpu``."""
    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise GpuUnavailable(f"--gpu was asked for but no CUDA device is visible to {where} "
                             f"(torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={visible!r}); "
                             f"run on a node with a GPU or drop --gpu")
    return torch.device("cuda")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device (tensor cores, no loss scaling needed), a no-op elsewhere.

    float32 on the CPU: bf16 there is slower on most CPUs and less exact.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
