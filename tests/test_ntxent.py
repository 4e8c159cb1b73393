"""NT-Xent against a hand-written reference, and gathered across a real 2-process gloo group."""

from __future__ import annotations

import datetime
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rxray.ssl.ntxent import nt_xent_loss, positive_pair_top1

WORLD_SIZE = 2
PER_WORKER_BATCH = 4
INPUT_DIM, EMBED_DIM = 5, 3
TEMPERATURE = 0.2


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. 1 written out: one loop over the 2N views, explicit sums over the others."""
    views = [v / v.norm() for v in [*z1, *z2]]
    n = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        positive = views[(i + n) % (2 * n)]
        numerator = torch.exp(anchor @ positive / temperature)
        denominator = sum(torch.exp(anchor @ other / temperature) for k, other in enumerate(views) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("dim", [1, 4, 32])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_reference_value_and_gradient(batch, dim, temperature):
    generator = torch.Generator().manual_seed(batch * 1000 + dim)
    z1 = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    ours = nt_xent_loss(z1, z2, temperature)
    ours_grads = torch.autograd.grad(ours, (z1, z2))
    reference = reference_nt_xent(z1, z2, temperature)
    reference_grads = torch.autograd.grad(reference, (z1, z2))

    torch.testing.assert_close(ours, reference)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected)


def test_low_precision_inputs_are_scored_in_float32():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    loss = nt_xent_loss(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nt_xent_loss(z1.bfloat16().float(), z2.bfloat16().float()))


def test_without_process_group_gather_is_a_no_op():
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    assert not dist.is_initialized()
    torch.testing.assert_close(nt_xent_loss(z1, z2, gather=True), nt_xent_loss(z1, z2, gather=False))


def test_identical_views_are_easier_than_unrelated_ones():
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(16, 32, generator=generator)
    assert nt_xent_loss(z, z) < nt_xent_loss(z, torch.randn(16, 32, generator=generator))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.zeros(4, 8), torch.zeros(5, 8))


def test_positive_pair_top1():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(8, 16, generator=generator)
    assert positive_pair_top1(z, z + 0.01 * torch.randn(8, 16, generator=generator)) == 1.0
    # Four points on a line: view 0 and 1 are each other's nearest, but their positives are 2 and 3.
    z1 = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    z2 = torch.tensor([[0.0, 1.0], [0.1, 0.9]])
    assert positive_pair_top1(z1, z2) == 0.0
    assert 0.0 <= positive_pair_top1(z, torch.randn(8, 16, generator=generator)) <= 1.0


# --------------------------------------------------------------------------- real 2-process group


def _problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """The same tiny model and two-view batch (WORLD_SIZE * PER_WORKER_BATCH samples) in every process."""
    torch.manual_seed(0)
    model = torch.nn.Linear(INPUT_DIM, EMBED_DIM)
    views = torch.randn(2, WORLD_SIZE * PER_WORKER_BATCH, INPUT_DIM)
    return model, views[0], views[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: DDP over the tiny model, the gathered loss on its slice, results saved for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, view1, view2 = _problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mine = slice(rank * PER_WORKER_BATCH, (rank + 1) * PER_WORKER_BATCH)
        # Both views in one forward pass, as a training step does (DDP expects one forward per backward).
        z1, z2 = ddp(torch.cat([view1[mine], view2[mine]])).chunk(2)
        with warnings.catch_warnings(record=True) as caught:  # printed by every worker at every step otherwise
            warnings.simplefilter("always")
            loss = nt_xent_loss(z1, z2, TEMPERATURE, gather=True)
            loss.backward()  # DDP all-reduces (averages) the parameter gradients here
        local_only = nt_xent_loss(z1.detach(), z2.detach(), TEMPERATURE, gather=False)
        torch.save({"loss": loss.detach(), "local_only": local_only, "weight_grad": model.weight.grad,
                    "bias_grad": model.bias.grad, "warnings": [str(w.message) for w in caught]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gathered_loss_equals_single_process_loss(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]

    model, view1, view2 = _problem()
    z1, z2 = model(torch.cat([view1, view2])).chunk(2)
    single = nt_xent_loss(z1, z2, TEMPERATURE)
    single.backward()

    for rank, result in enumerate(results):
        assert result["warnings"] == []  # e.g. torch.distributed.nn's all_gather is deprecated
        torch.testing.assert_close(result["loss"], single.detach())
        torch.testing.assert_close(result["weight_grad"], model.weight.grad)
        torch.testing.assert_close(result["bias_grad"], model.bias.grad)
        mine = slice(rank * PER_WORKER_BATCH, (rank + 1) * PER_WORKER_BATCH)
        torch.testing.assert_close(result["local_only"], nt_xent_loss(z1[mine], z2[mine], TEMPERATURE).detach())
    # Sanity: the local-only losses differ from the gathered one, so the test can tell them apart.
    assert not math.isclose(results[0]["local_only"].item(), single.item(), rel_tol=1e-3)
