"""NT-Xent, the SimCLR contrastive loss, with negatives gathered from every data-parallel worker.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
eq. 1: for each of the 2N views, a (2N-1)-way softmax over cosine similarities / temperature
whose target is the other view of the same image.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherViews(torch.autograd.Function):
    """All-gather of (2, B, D) view projections into (2, W*B, D), in rank order, that passes gradients back.

    dist.all_gather has no gradient, and torch.distributed.nn's autograd all_gather (and its private successors)
    are deprecated: the gradient of the summed workers' losses with respect to this worker's rows is the sum
    over workers of their gradients for those rows, an all-reduce of the gathered gradient, then this slice.
    """

    @staticmethod
    def forward(ctx, views: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(views) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, views.contiguous())
        ctx.rows = views.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[:, start:start + ctx.rows]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent loss of two views' projections z1, z2 (B, D); the positive of z1[i] is z2[i].

    With ``gather`` and an initialised process group of W > 1 workers (each passing the same
    B), every worker's rows are scored against all 2*W*B views. The returned value is the loss
    of the whole W*B batch on every worker; its gradient flows through this worker's rows and
    the gradient-preserving all-gather, so after DDP averages gradients over workers they equal
    those of one worker holding all W*B samples. Computed in at least float32.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D) with the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    batch = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)  # bf16/fp16 projections are scored in float32
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)
    rows = torch.cat([z1, z2])  # (2B, D): this worker's views

    world = _world_size() if gather else 1
    if world > 1:
        views = _GatherViews.apply(torch.stack([z1, z2]))  # (2, WB, D)
        columns = views.reshape(2 * world * batch, -1)  # (2WB, D): first views, then second views
        offset = dist.get_rank() * batch
    else:
        columns, offset = rows, 0
    total = world * batch

    index = torch.arange(batch, device=rows.device)
    self_columns = torch.cat([offset + index, total + offset + index])
    positive_columns = torch.cat([total + offset + index, offset + index])

    logits = rows @ columns.T / temperature
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * batch, device=rows.device), self_columns] = True
    loss = F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive_columns)

    if world > 1:
        # Report the whole batch's loss (the mean over workers) without changing the gradient.
        batch_loss = loss.detach().clone()
        dist.all_reduce(batch_loss)
        loss = loss + (batch_loss / world - loss.detach())
    return loss


@torch.no_grad()
def positive_pair_top1(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Fraction of the 2B views whose nearest neighbour (cosine) among the other 2B-1 is their positive."""
    batch = z1.shape[0]
    views = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = views @ views.T
    similarity.fill_diagonal_(float("-inf"))
    index = torch.arange(batch, device=views.device)
    positive = torch.cat([index + batch, index])
    return (similarity.argmax(dim=1) == positive).float().mean().item()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
