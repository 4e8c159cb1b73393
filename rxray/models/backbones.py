"""Torchvision backbones as feature encoders for 6-channel microscopy images.

Two ways to feed six stain channels to an RGB architecture:

- ``adapt``: the first convolution is rebuilt for ``in_channels`` inputs. With
  pretrained weights every input channel gets the mean of the RGB kernels, scaled
  by ``3 / in_channels``, so a grey input produces the same activations as before.
- ``project``: a learned 1x1 convolution (+ batch norm) maps ``in_channels`` to 3
  in front of the unmodified RGB backbone (the approach of the RxRx2 study).

Models are built with ``weights=None``: nothing downloads, pretrained weights come
from a file (:mod:`rxray.models.weights`). Where each architecture keeps its first
convolution, classifier and stages is its row in :mod:`rxray.models.registry`.

The features an encoder returns are multi-scale: the global average of every stage's
output (for a ResNet, layer1..layer4), concatenated. A phenotype in a stain's
intensity or fine texture lives in the early stages, and the last stage of a
SimCLR encoder is trained to be invariant to colour jitter, so on its own it loses
exactly what most stain phenotypes change (docs/science-checks.md measures it).
Pooling every stage is the usual remedy in image-based profiling (DeepProfiler and
CellProfiler-style features read several scales); it costs no extra convolution.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from rxray.models.registry import architecture
from rxray.models.weights import load_backbone_weights, load_state_dict_uri

STEMS = ("adapt", "project")


class Encoder(nn.Module):
    """A backbone mapping (B, in_channels, H, W) float images to (B, feature_dim) multi-scale pooled features."""

    def __init__(self, name: str, stem: str, in_channels: int, backbone: nn.Module,
                 stem_projection: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.stem = stem
        self.in_channels = in_channels
        self.stem_projection = stem_projection
        self.backbone = backbone
        self._stage_outputs: list[torch.Tensor] = []
        for path in architecture(name).stages:
            backbone.get_submodule(path).register_forward_hook(self._keep_stage_output)
        self.feature_dim = self._count_features()

    def _keep_stage_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._stage_outputs.append(output.mean(dim=(2, 3)))

    def _count_features(self) -> int:
        """The width of the concatenated features, from one small forward pass."""
        was_training = self.training
        with torch.no_grad():
            width = self.eval()(torch.zeros(1, self.in_channels, 32, 32)).shape[1]
        self.train(was_training)
        return int(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, feature_dim) for images (B, in_channels, H, W): every stage's mean, concatenated."""
        if self.stem_projection is not None:
            images = self.stem_projection(images)
        self._stage_outputs = []
        final = self.backbone(images)
        features = torch.cat([*self._stage_outputs, final], dim=1)
        self._stage_outputs = []
        return features

    def target_layer(self) -> nn.Module:
        """The last convolutional block, whose activations Grad-CAM weighs."""
        return self.backbone.get_submodule(architecture(self.name).cam_layer)


def build_encoder(name: str, stem: str = "adapt", weights: str | None = None, in_channels: int = 6) -> Encoder:
    """A torchvision ``name`` encoder for ``in_channels`` inputs, random init or RGB weights from a URI."""
    parts = architecture(name)  # ValueError naming the known backbones for any other name
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")

    backbone = torchvision.models.get_model(name, weights=None)
    if weights:
        load_backbone_weights(backbone, load_state_dict_uri(weights), name, source=weights)
    _replace_module(backbone, parts.classifier, nn.Identity())

    stem_projection = None
    if stem == "project":
        # Batch norm puts the mixed channels at zero mean and unit variance, the input statistics
        # an ImageNet-trained backbone expects.
        stem_projection = nn.Sequential(nn.Conv2d(in_channels, 3, kernel_size=1, bias=False), nn.BatchNorm2d(3))
    elif in_channels != 3:
        _replace_module(backbone, parts.first_conv,
                        _adapted_conv(backbone.get_submodule(parts.first_conv), in_channels, pretrained=bool(weights)))
    return Encoder(name, stem, in_channels, backbone, stem_projection)


def _adapted_conv(rgb_conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """The first convolution rebuilt for ``in_channels`` inputs; pretrained kernels spread over them."""
    conv = nn.Conv2d(in_channels, rgb_conv.out_channels, kernel_size=rgb_conv.kernel_size, stride=rgb_conv.stride,
                     padding=rgb_conv.padding, dilation=rgb_conv.dilation, groups=rgb_conv.groups,
                     bias=rgb_conv.bias is not None, padding_mode=rgb_conv.padding_mode)
    if pretrained:
        with torch.no_grad():
            grey_kernel = rgb_conv.weight.mean(dim=1, keepdim=True)
            conv.weight.copy_(grey_kernel.repeat(1, in_channels, 1, 1) * (rgb_conv.in_channels / in_channels))
            if rgb_conv.bias is not None:
                conv.bias.copy_(rgb_conv.bias)
    return conv


def _replace_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_path, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)
