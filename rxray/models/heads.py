"""Heads on top of encoder features: the SimCLR projection head and a transfer-learning classifier."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """SimCLR projection (B, in_dim) -> (B, out_dim): Linear, BatchNorm1d, ReLU, Dropout, Linear.

    The deeper head with batch norm and dropout is the RxRx2 study's improvement over a
    single dense layer; the NT-Xent loss is computed on its output, embeddings are taken
    from the encoder before it (Chen et al. 2020, SimCLR, section 4.2).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, dropout: float = 0.1):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),  # no bias: the batch norm right after has one
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim = in_dim
        self.out_dim = out_dim


class ClassifierHead(nn.Module):
    """Dense head (B, in_dim) [+ (B, extra_inputs)] -> (B, n_classes) logits for transfer learning.

    ``extra_inputs`` are per-sample numbers concatenated to the features, such as the
    treatment concentration the RxRx2 study added; pass them on a scale comparable to
    the features (e.g. log concentration), since they enter the same linear layer.

    The inputs are standardised first by a batch norm without learnable scale (as in
    MAE's linear probing, He et al. 2022): encoder features of different stages differ
    in scale by orders of magnitude, and a head on a frozen encoder cannot rescale them.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.3,
                 extra_inputs: int = 0):
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.extra_inputs = extra_inputs
        self.normalize = nn.BatchNorm1d(in_dim + extra_inputs, affine=False)
        self.layers = nn.Sequential(
            nn.Linear(in_dim + extra_inputs, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, n_classes),
        )

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_classes) from features (B, in_dim) and, if configured, extra inputs (B, extra_inputs)."""
        if self.extra_inputs:
            if extra is None:
                raise ValueError(f"this head takes {self.extra_inputs} extra inputs per sample; none were given")
            extra = extra.reshape(features.shape[0], -1).to(features.dtype)
            if extra.shape[1] != self.extra_inputs:
                raise ValueError(f"expected {self.extra_inputs} extra inputs per sample, got {extra.shape[1]}")
            features = torch.cat([features, extra], dim=1)
        elif extra is not None:
            raise ValueError("this head was built with extra_inputs=0 but extra inputs were given")
        if self.training and features.shape[0] == 1:  # batch statistics of one sample are undefined
            return self.layers(nn.functional.batch_norm(features, self.normalize.running_mean,
                                                        self.normalize.running_var, training=False))
        return self.layers(self.normalize(features))
