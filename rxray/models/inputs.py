"""The input recipe: how shard images become a model's inputs, the same for training, embed, probe and explain.

A checkpoint records the recipe its model was trained with:

- ``channel_mean`` / ``channel_std``: per-stain intensity statistics in uint8 units
  (the ingest manifest's), for all six stains or only for the model's stains;
- ``channels``: the 1-based stains the model reads (absent: all six);
- ``plate_gains``: plate group (``<experiment>_<plate>``) -> one gain per stain, which
  `rxray finetune`'s plate normalisation multiplied every image of that plate by
  (absent or empty: no gains).

Inputs are: image x its plate's gain, stain by stain, then per-stain z-scores. A
:class:`~rxray.models.classifier.Classifier` takes all six normalised stains and picks
its own; an encoder on a stain subset is given its stains only. Both views come from
one six-stain form of the statistics (:meth:`InputRecipe.from_checkpoint`); z-scores are
per stain, so picking the stains before or after normalising gives the same numbers.

Plate gains, decided once for every step: a model is always given the inputs it was
trained on, so gains are applied exactly when its checkpoint records them.
- `rxray pretrain` trains SimCLR on raw images (rxray/train/simclr.py measures no gains and
  records none), so embeddings and probes of a pretrain checkpoint use no gains, like its
  per-epoch probe.
- A classifier trained with plate normalisation records its gains, so its test
  predictions, its explanations, and embeddings or probes of its encoder apply them.
  A plate the checkpoint has no gain for (a plate of other data, or one without
  controls) keeps gain 1: gains are measured on the training data's controls, never at
  inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from rxray.layout import IMAGE_COLUMN, N_CHANNELS, row_gains
from rxray.ssl.augment import normalize


def model_inputs(images: torch.Tensor, gain: torch.Tensor | None, mean: Sequence[float], std: Sequence[float],
                 augment: Callable[..., torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised float inputs (B, C, H, W) of uint8-unit images: plate gains (B, C), then augmentation or z-scores.

    ``gain`` None means no plate gains; ``augment`` (training only) normalises itself.
    """
    scaled = images.float()
    if gain is not None:
        scaled = scaled * gain.to(images.device, torch.float32).view(*gain.shape, 1, 1)
    return augment(scaled, generator) if augment is not None else normalize(scaled, mean, std)


def image_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy image batch as a tensor on ``device``; Ray's zero-copy read-only views are copied first."""
    if not images.flags.writeable or not images.flags.c_contiguous:  # torch wants writable, contiguous memory
        images = np.array(images, copy=True, order="C")
    return torch.from_numpy(images).to(device, non_blocking=True)


@dataclass(frozen=True)
class InputRecipe:
    """How a model's images become its inputs: six-stain statistics, the stains it reads, and its plate gains."""

    mean: tuple[float, ...]  # six stains, uint8 units
    std: tuple[float, ...]
    channels: tuple[int, ...] = tuple(range(1, N_CHANNELS + 1))  # 1-based stains the model reads
    plate_gains: Mapping[str, Sequence[float]] = field(default_factory=dict)  # plate group -> six gains

    def __post_init__(self) -> None:
        if len(self.mean) != N_CHANNELS or len(self.std) != N_CHANNELS:
            raise ValueError(f"an input recipe needs {N_CHANNELS} stain means and stds, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if not self.channels or any(not 1 <= c <= N_CHANNELS for c in self.channels):
            raise ValueError(f"model channels {list(self.channels)} are outside w1..w{N_CHANNELS}")

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> "InputRecipe":
        """The recipe a checkpoint's model was trained with; ValueError if its statistics do not fit its stains.

        Statistics recorded for the model's stains only are spread to six; the stains it
        does not read get mean 0 and std 1, which it never sees.
        """
        channels = tuple(int(c) for c in checkpoint.get("channels") or range(1, N_CHANNELS + 1))
        if any(not 1 <= c <= N_CHANNELS for c in channels):
            raise ValueError(f"checkpoint channels {list(channels)} are outside w1..w{N_CHANNELS}")
        mean = [float(v) for v in checkpoint["channel_mean"]]
        std = [float(v) for v in checkpoint["channel_std"]]
        if len(mean) != N_CHANNELS:
            if len(mean) != len(channels) or len(std) != len(channels):
                raise ValueError(f"checkpoint has {len(mean)} channel means for channels {list(channels)}")
            subset_mean, subset_std = mean, std
            mean, std = [0.0] * N_CHANNELS, [1.0] * N_CHANNELS
            for position, channel in enumerate(channels):
                mean[channel - 1], std[channel - 1] = subset_mean[position], subset_std[position]
        gains = {str(group): [float(g) for g in row] for group, row in (checkpoint.get("plate_gains") or {}).items()}
        return cls(tuple(mean), tuple(std), channels, gains)

    @property
    def stain_index(self) -> list[int] | None:
        """0-based stains the model reads, or None when it reads all six (nothing to pick)."""
        if len(self.channels) == N_CHANNELS and list(self.channels) == list(range(1, N_CHANNELS + 1)):
            return None
        return [c - 1 for c in self.channels]

    def batch_gains(self, batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Plate gains (B, 6) of a shard batch's rows (its ``experiment``, ``plate`` and, for the rim, ``well``),
        None without gains."""
        if not self.plate_gains:
            return None
        return row_gains(self.plate_gains, batch["experiment"], batch["plate"], batch.get("well"))

    def scaled_images(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """A shard batch's images (B, 6, H, W) in uint8 units as the model saw them before normalising.

        Scaled by their plate's gains (float32), or the ``image`` array itself without gains.
        """
        gains = self.batch_gains(batch)
        images = batch[IMAGE_COLUMN]
        if gains is None:
            return images
        return np.asarray(images, dtype=np.float32) * gains[:, :, None, None]

    def tensor_inputs(self, images: torch.Tensor, gains: torch.Tensor | None,
                      augment: Callable[..., torch.Tensor] | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised inputs (B, 6, H, W) of uint8 image tensors and their plate gains (B, 6) (None: none), for a
        training batch (with ``augment``, which normalises itself) or an evaluation batch already on the device."""
        return model_inputs(images, gains, self.mean, self.std, augment, generator)

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint records of the recipe (:meth:`from_checkpoint` reads it back)."""
        return {"channel_mean": list(self.mean), "channel_std": list(self.std), "channels": list(self.channels),
                "plate_gains": {group: list(row) for group, row in self.plate_gains.items()}}

    def classifier_inputs(self, batch: Mapping[str, np.ndarray], device: torch.device) -> torch.Tensor:
        """Normalised inputs (B, 6, H, W) of a Classifier (it picks its stains itself) from a shard batch."""
        return self._inputs(batch, device, None)

    def encoder_inputs(self, batch: Mapping[str, np.ndarray], device: torch.device) -> torch.Tensor:
        """Normalised inputs (B, len(channels), H, W) of an encoder, its stains only, from a shard batch."""
        return self._inputs(batch, device, self.stain_index)

    def _inputs(self, batch: Mapping[str, np.ndarray], device: torch.device, index: list[int] | None) -> torch.Tensor:
        """The stains ``index`` (None: all six) picked first, so unread stains are never copied or scaled."""
        images, gains = batch[IMAGE_COLUMN], self.batch_gains(batch)
        mean, std = self.mean, self.std
        if index is not None:
            images, mean, std = images[:, index], [mean[i] for i in index], [std[i] for i in index]
            gains = None if gains is None else gains[:, index]
        gain = None if gains is None else torch.from_numpy(gains)
        return model_inputs(image_tensor(images, device), gain, mean, std)
