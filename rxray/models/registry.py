"""The backbone registry: one row of facts per torchvision architecture rxray can build.

Every module that reaches inside a backbone reads its row here, as timm keeps each
model's pretrained config beside its name: building an encoder (first convolution,
classifier, stages pooled into the features), loading RGB weights (classifier keys
to skip, the family's old key names) and Grad-CAM (the layer whose activations it
weighs). Adding a backbone is one row; the tests check every row against a real model.

Module paths are dotted names as ``torchvision.models.get_model(name)`` lays the model out.
This module imports nothing heavy, so configs can list the names without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one torchvision architecture live (dotted module paths)."""

    name: str  # torchvision's model name, as ``--backbone`` takes it
    family: str  # torchvision family; DenseNet weight files need the family's key renaming
    first_conv: str  # the RGB input convolution, rebuilt for six stains by the ``adapt`` stem
    classifier: str  # replaced by Identity so the model returns pooled features; its weights are never loaded
    stages: tuple[str, ...]  # earlier stage outputs pooled beside the last one (one per resolution)
    cam_layer: str  # the last conv block, as pytorch-grad-cam recommends for the family

    @property
    def classifier_prefix(self) -> str:
        """The state-dict key prefix of the classifier (``fc.`` for a ResNet)."""
        return self.classifier + "."


_DENSENET_STAGES = ("features.denseblock1", "features.denseblock2", "features.denseblock3")
_RESNET_STAGES = ("layer1", "layer2", "layer3")

ARCHITECTURES: dict[str, Architecture] = {row.name: row for row in (
    Architecture("densenet121", "densenet", first_conv="features.conv0", classifier="classifier",
                 stages=_DENSENET_STAGES, cam_layer="features.norm5"),
    Architecture("densenet201", "densenet", first_conv="features.conv0", classifier="classifier",
                 stages=_DENSENET_STAGES, cam_layer="features.norm5"),
    Architecture("resnet18", "resnet", first_conv="conv1", classifier="fc", stages=_RESNET_STAGES,
                 cam_layer="layer4"),
    Architecture("resnet50", "resnet", first_conv="conv1", classifier="fc", stages=_RESNET_STAGES,
                 cam_layer="layer4"),
    Architecture("mobilenet_v2", "mobilenet_v2", first_conv="features.0.0", classifier="classifier",
                 stages=("features.3", "features.6", "features.13"), cam_layer="features.18"),
    Architecture("efficientnet_b0", "efficientnet", first_conv="features.0.0", classifier="classifier",
                 stages=("features.2", "features.3", "features.5"), cam_layer="features.8"),
)}

BACKBONES = tuple(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The registry row of backbone ``name``; ValueError naming the known backbones for any other."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None
