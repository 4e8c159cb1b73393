"""The transfer-learning classifier: a 6-channel encoder, an optional stain subset, and a dense head.

It always takes the full (B, 6, H, W) normalised image, so Grad-CAM and per-channel
attributions are computed over all six stains even when the model uses a subset
(unused stains then get exactly zero attribution). One place builds it from a config
(:func:`build_classifier`), one from a checkpoint (:func:`classifier_from_checkpoint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from rxray.layout import N_CHANNELS
from rxray.models.backbones import Encoder
from rxray.models.checkpoints import Checkpoint, load_checkpoint
from rxray.models.heads import ClassifierHead
from rxray.models.orientation import mean_over_orientations

if TYPE_CHECKING:
    from rxray.config import FinetuneConfig


def concentration_feature(conc: torch.Tensor) -> torch.Tensor:
    """Treatment concentration as a head input: log1p keeps doses spanning decades on one scale."""
    return torch.log1p(conc.clamp_min(0).float()).reshape(-1, 1)


class Classifier(nn.Module):
    """(B, 6, H, W) normalised images [+ (B,) concentrations] -> (B, n_classes) logits."""

    def __init__(self, encoder: Encoder, head: ClassifierHead, channels: Sequence[int] | None = None,
                 with_conc: bool = False):
        super().__init__()
        channels = list(channels or range(1, N_CHANNELS + 1))
        if len(channels) != encoder.in_channels:
            raise ValueError(f"encoder takes {encoder.in_channels} channels but {len(channels)} were selected")
        if with_conc != bool(head.extra_inputs):
            raise ValueError("with_conc needs a head with one extra input, and only then")
        self.encoder = encoder
        self.head = head
        self.channels = channels
        self.with_conc = with_conc
        self.register_buffer("channel_index", torch.tensor([c - 1 for c in channels]), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, D) of the selected stains."""
        if images.shape[1] != N_CHANNELS:
            raise ValueError(f"expected {N_CHANNELS}-channel images, got shape {tuple(images.shape)}")
        if len(self.channels) != N_CHANNELS:
            images = images.index_select(1, self.channel_index)
        return self.encoder(images)

    def forward(self, images: torch.Tensor, conc: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_classes); ``conc`` is required exactly when the model was built with_conc."""
        extra = None
        if self.with_conc:
            if conc is None:
                raise ValueError("this classifier was trained with --with-conc: pass treatment_conc")
            extra = concentration_feature(conc).to(images.device)
        return self.head(self.features(images), extra)


def class_probabilities(model: Classifier, inputs: torch.Tensor, conc: torch.Tensor | None = None,
                        views: int = 1) -> torch.Tensor:
    """Softmax probabilities (B, K) float32 of normalised inputs; ``views`` 8 averages them over each image's 8
    orientations (test-time augmentation, :mod:`rxray.models.orientation`)."""
    def probabilities_of(images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(images, conc).float(), dim=1)

    return mean_over_orientations(probabilities_of, inputs, views)


def slice_stem_channels(encoder_state: dict[str, torch.Tensor], target_state: dict[str, torch.Tensor],
                        channels: Sequence[int]) -> dict[str, torch.Tensor]:
    """A 6-channel encoder state dict with its input convolution cut to the selected (1-based) stains.

    The one weight whose input dimension is 6 in ``encoder_state`` and len(channels) in
    ``target_state`` (the adapted first conv, or the 1x1 projection of a project stem)
    keeps the kernels of the selected stains. Inputs are per-channel z-scores, so this
    equals feeding the 6-channel encoder zeros (each dropped stain's mean) for the
    dropped stains, at a fraction of the first layer's cost.
    """
    index = torch.tensor([c - 1 for c in channels])
    sliced, cut = dict(encoder_state), []
    for key, value in encoder_state.items():
        target = target_state.get(key)
        if target is not None and value.dim() >= 2 and value.shape != target.shape \
                and value.shape[1] == N_CHANNELS and target.shape[1] == len(channels) \
                and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]:
            sliced[key] = value.index_select(1, index).clone()
            cut.append(key)
    if len(channels) != N_CHANNELS and len(cut) != 1:
        raise ValueError(f"expected exactly one input convolution to cut to {len(channels)} channels, found {cut}")
    return sliced


def build_classifier(cfg: "FinetuneConfig", n_classes: int, *, backbone: str, stem: str,
                     encoder_state: dict[str, torch.Tensor] | None = None, weights: str | None = None) -> Classifier:
    """The classifier of a config: encoder for the selected stains (+ a head with a conc input if asked).

    ``encoder_state`` is a 6-channel SimCLR encoder's state dict (cut to the stains);
    otherwise the encoder is random or loads RGB ``weights``.
    """
    from rxray.models.backbones import build_encoder

    channels = list(cfg.channels)
    encoder = build_encoder(backbone, stem=stem, weights=None if encoder_state else weights,
                            in_channels=len(channels))
    if encoder_state is not None:
        encoder.load_state_dict(slice_stem_channels(encoder_state, encoder.state_dict(), channels))
    head = ClassifierHead(encoder.feature_dim, n_classes, hidden_dim=cfg.head_hidden, dropout=cfg.dropout,
                          extra_inputs=1 if cfg.with_conc else 0)
    return Classifier(encoder, head, channels=channels, with_conc=cfg.with_conc)


def freeze_encoder(model: Classifier) -> None:
    """Stop the encoder learning: no gradients, and batch norm statistics fixed (eval mode)."""
    model.encoder.requires_grad_(False)
    model.encoder.eval()


def classifier_from_checkpoint(state: dict) -> Classifier:
    """Rebuild a trained Classifier (eval mode, CPU) from a finetune checkpoint dict (:class:`Checkpoint`)."""
    from rxray.models.backbones import build_encoder

    checkpoint = Checkpoint.from_state(state)
    if not checkpoint.is_classifier or checkpoint.head_hidden is None:
        raise ValueError(f"{checkpoint.uri or 'the checkpoint'} is not a classifier checkpoint (run `rxray finetune` "
                         f"first)")
    encoder = build_encoder(checkpoint.backbone, stem=checkpoint.stem, weights=None,
                            in_channels=checkpoint.in_channels)
    head = ClassifierHead(encoder.feature_dim, len(checkpoint.classes), hidden_dim=checkpoint.head_hidden,
                          dropout=checkpoint.dropout or 0.0, extra_inputs=1 if checkpoint.with_conc else 0)
    model = Classifier(encoder, head, channels=checkpoint.channels, with_conc=bool(checkpoint.with_conc))
    model.encoder.load_state_dict(checkpoint.encoder)
    model.head.load_state_dict(checkpoint.head)
    return model.eval()


def load_classifier(uri: str) -> tuple[Classifier, dict]:
    """The trained classifier at or under a finetune output URI, and its checkpoint dict."""
    state = load_checkpoint(uri)
    return classifier_from_checkpoint(state), state
