"""A site's orientation carries no label: the 8 flips and quarter turns of an image as views.

A camera field in a well has no up or left, so every one of the square's 8 symmetries
(4 quarter turns, each mirrored or not) shows the same cells. A classifier trained on a
random one per site and asked to average its class probabilities over all 8 (test-time
augmentation, as the RxRx1 competition's solutions did) no longer depends on an
orientation its encoder happens to prefer: with a frozen encoder and a few dozen
training sites that dependence is a large part of what moves a held-out site's score
(docs/science-checks.md, issue 37). The views are exact: quarter turns and mirrors of
a square image move pixels without resampling.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rxray.ssl.augment import normalize

ORIENTATIONS = 8  # 4 quarter turns x (as is, mirrored)


def orient(images: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of images (..., H, W): ``view % 4`` quarter turns, then mirrored left-right when >= 4."""
    if not 0 <= view < ORIENTATIONS:
        raise ValueError(f"orientation view must be 0..{ORIENTATIONS - 1}, got {view}")
    turned = torch.rot90(images, view % 4, dims=(-2, -1))
    return turned.flip(-1) if view >= 4 else turned


def random_orientation(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image (B, C, H, W) in one of its 8 orientations, drawn per image from ``generator``."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"orientation views need square images, got {tuple(images.shape[-2:])}")
    device = generator.device if generator is not None else images.device
    views = torch.randint(ORIENTATIONS, (images.shape[0],), generator=generator, device=device).to(images.device)
    oriented = images.clone()
    for view in range(1, ORIENTATIONS):
        chosen = views == view
        if chosen.any():
            oriented[chosen] = orient(images[chosen], view)
    return oriented


class RandomOrientation:
    """Training augmentation of uint8-unit images: per-stain z-scores, then a random orientation per image.

    Nothing else changes: no crop (apparent size is a phenotype) and no intensity jitter
    (a low dose's intensity change is smaller than a useful jitter).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised images (B, C, H, W), each in a random orientation."""
        return random_orientation(normalize(images, self.mean, self.std), generator)


def mean_over_orientations(probabilities_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                           views: int) -> torch.Tensor:
    """The mean of ``probabilities_of(view_images)`` (B, K) over the first ``views`` orientations (1: as is; 8: all).

    One view at a time, so a batch needs the memory of one view (a GPU batch of 256 large
    images stacked 8 times would not fit), at ``views`` times one view's compute.
    """
    if views not in (1, ORIENTATIONS):
        raise ValueError(f"views must be 1 or {ORIENTATIONS}, got {views}")
    total = probabilities_of(images)
    for view in range(1, views):
        total = total + probabilities_of(orient(images, view))
    return total / views
