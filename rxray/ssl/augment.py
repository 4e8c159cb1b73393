"""SimCLR view generation on whole batches, on the device that trains.

Every random choice is drawn per sample as a tensor, so a batch is augmented by a
handful of batched kernels (one ``grid_sample`` for crop + flip + rotation, a few
element-wise ops, a grouped convolution for blur) with no Python loop over samples:
the GPU does the work and the data loader only ships uint8 tensors.

Intensities are in uint8 units (0..255) until :func:`normalize` turns them into
per-channel z-scores with the ingest manifest's channel mean and std.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-channel z-scores (float32) of uint8-unit images (..., C, H, W), as used for training and embedding."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device)
    if images.dim() < 3 or images.shape[-3] != mean.numel() or std.numel() != mean.numel():
        raise ValueError(f"images of shape {tuple(images.shape)} do not match {mean.numel()} channel means "
                         f"and {std.numel()} stds")
    # A constant channel has std 0; the floor keeps it at 0 instead of NaN.
    return (images.float() - mean.view(-1, 1, 1)) / std.clamp(min=1e-6).view(-1, 1, 1)


class SimCLRAugment(nn.Module):
    """Two independently augmented, normalised views (B, C, crop, crop) float32 of a batch (B, C, H, W).

    Per sample: a random resized crop (area ``crop_scale`` of the image, aspect 3/4..4/3),
    one of the 8 flips/90-degree rotations, per-channel brightness and contrast jitter
    (+-40 % at ``strength`` 1, since stain intensity varies by plate and channel),
    optional Gaussian blur, then normalisation and Gaussian noise (up to 0.1 channel std
    at ``strength`` 1, for camera noise). Input is uint8 or float in uint8 units.
    """

    BRIGHTNESS = 0.4  # max relative intensity change per channel at strength 1
    CONTRAST = 0.4  # max relative change of the spread around the channel mean at strength 1
    NOISE_STD = 0.1  # max noise std in normalised units (channel stds) at strength 1
    BLUR_SIGMA = (0.1, 2.0)  # pixels, as in SimCLR
    BLUR_PROBABILITY = 0.5
    ASPECT_RATIO = (3 / 4, 4 / 3)

    def __init__(self, crop_size: int, strength: float = 1.0, blur: bool = False, *,
                 mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float] = (0.2, 1.0)):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.crop_size = int(crop_size)
        self.strength = float(strength)
        self.blur = bool(blur)
        self.crop_scale = crop_scale
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of ``images`` (B, C, H, W); the same ``generator`` state gives the same views."""
        if images.dim() != 4 or images.shape[1] != self.mean.numel():
            raise ValueError(f"expected images (B, {self.mean.numel()}, H, W), got {tuple(images.shape)}")
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise ValueError(f"expected uint8 or float images, got {images.dtype}")
        images = images.float()
        return self._view(images, generator), self._view(images, generator)

    def _view(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        draw = _Draws(generator, images.device)
        batch, channels = images.shape[:2]
        grid = F.affine_grid(self._crop_flip_rotate(batch, draw), [batch, channels, self.crop_size, self.crop_size],
                             align_corners=False)
        view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        view = self._jitter(view, draw)
        if self.blur:
            view = self._gaussian_blur(view, draw)
        view = normalize(view, self.mean, self.std)
        if self.strength == 0:
            return view
        noise_std = draw.uniform((batch, 1, 1, 1), 0.0, self.NOISE_STD * self.strength)
        return view + noise_std * draw.normal(view.shape)

    def _crop_flip_rotate(self, batch: int, draw: "_Draws") -> torch.Tensor:
        """Affine matrices (B, 2, 3) taking output coordinates to a random crop, flipped and rotated."""
        area = draw.uniform((batch,), *self.crop_scale)
        aspect = torch.exp(draw.uniform((batch,), math.log(self.ASPECT_RATIO[0]), math.log(self.ASPECT_RATIO[1])))
        # Half-sizes in grid_sample's [-1, 1] coordinates equal fractions of the full side.
        half_width = torch.sqrt(area * aspect).clamp(max=1.0)
        half_height = torch.sqrt(area / aspect).clamp(max=1.0)
        center_x = (1 - half_width) * draw.uniform((batch,), -1.0, 1.0)
        center_y = (1 - half_height) * draw.uniform((batch,), -1.0, 1.0)

        # A quarter-turn count and a mirror flip reach all 8 symmetries of the square exactly once.
        quarter_turns = draw.integers((batch,), 4)
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=draw.device)[quarter_turns]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=draw.device)[quarter_turns]
        mirror = torch.where(draw.uniform((batch,), 0.0, 1.0) < 0.5, -1.0, 1.0)

        theta = torch.zeros(batch, 2, 3, device=draw.device)
        theta[:, 0, 0] = half_width * cos * mirror
        theta[:, 0, 1] = -half_width * sin
        theta[:, 0, 2] = center_x
        theta[:, 1, 0] = half_height * sin * mirror
        theta[:, 1, 1] = half_height * cos
        theta[:, 1, 2] = center_y
        return theta

    def _jitter(self, view: torch.Tensor, draw: "_Draws") -> torch.Tensor:
        """Per-sample, per-channel contrast and brightness factors, clipped back to the 8-bit range."""
        shape = (view.shape[0], view.shape[1], 1, 1)
        contrast = draw.uniform(shape, 1 - self.CONTRAST * self.strength, 1 + self.CONTRAST * self.strength)
        brightness = draw.uniform(shape, 1 - self.BRIGHTNESS * self.strength, 1 + self.BRIGHTNESS * self.strength)
        channel_mean = view.mean(dim=(2, 3), keepdim=True)
        view = (view - channel_mean) * contrast.clamp(min=0) + channel_mean
        return (view * brightness.clamp(min=0)).clamp(0, 255)

    def _gaussian_blur(self, view: torch.Tensor, draw: "_Draws") -> torch.Tensor:
        """Separable Gaussian blur with a per-sample sigma, applied to a random half of the batch."""
        batch, channels, height, width = view.shape
        radius = min(math.ceil(3 * self.BLUR_SIGMA[1]), height - 1, width - 1)
        offsets = torch.arange(-radius, radius + 1, device=view.device, dtype=torch.float32)
        sigma = draw.uniform((batch, 1), *self.BLUR_SIGMA)
        kernel = torch.exp(-offsets**2 / (2 * sigma**2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        identity = (offsets == 0).float().expand_as(kernel)
        blurred = draw.uniform((batch, 1), 0.0, 1.0) < self.BLUR_PROBABILITY
        kernel = torch.where(blurred, kernel, identity).repeat_interleave(channels, dim=0)  # (B*C, K)

        # Fold the batch into channels so one grouped convolution gives every sample its own kernel.
        planes = F.pad(view.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
        planes = F.conv2d(planes, kernel.view(batch * channels, 1, 1, -1), groups=batch * channels)
        planes = F.conv2d(planes, kernel.view(batch * channels, 1, -1, 1), groups=batch * channels)
        return planes.view(batch, channels, height, width)


class _Draws:
    """Random tensors on ``device`` from an optional generator that may live on another device."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator = generator
        self.device = device
        # Small per-sample parameters are drawn where the generator lives and copied over;
        # per-pixel noise needs a generator on the images' device, seeded from the given one.
        self._source = generator.device if generator is not None else device
        self._pixel_generator = generator
        if generator is not None and generator.device != torch.device(device):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            self._pixel_generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """Uniform floats in [low, high)."""
        values = torch.rand(shape, generator=self.generator, device=self._source)
        return (low + (high - low) * values).to(self.device)

    def integers(self, shape: tuple[int, ...], high: int) -> torch.Tensor:
        """Uniform integers in [0, high)."""
        return torch.randint(0, high, shape, generator=self.generator, device=self._source).to(self.device)

    def normal(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal floats, drawn directly on the target device."""
        return torch.randn(shape, generator=self._pixel_generator, device=self.device)
