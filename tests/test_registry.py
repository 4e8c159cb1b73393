"""The backbone registry: every row names real modules of its torchvision model, unknown names say what is known."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from rxray import config
from rxray.models.backbones import build_encoder
from rxray.models.registry import ARCHITECTURES, BACKBONES, architecture


@pytest.mark.parametrize("name", BACKBONES)
def test_every_row_names_the_modules_of_its_torchvision_model(name):
    row = architecture(name)
    model = torchvision.models.get_model(name, weights=None)
    first_conv = model.get_submodule(row.first_conv)
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert first_conv is next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # the input convolution
    assert any(key.startswith(row.classifier_prefix) for key in model.state_dict())  # the keys weights skip
    for path in (row.classifier, *row.stages, row.cam_layer):
        model.get_submodule(path)  # AttributeError for a path that is not in the model
    assert name.startswith(row.family.split("_")[0])


def test_the_config_offers_exactly_the_registered_backbones():
    assert list(config.BACKBONES) == list(BACKBONES)
    assert all(row.name == name for name, row in ARCHITECTURES.items())


def test_an_unknown_backbone_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'; choose one of densenet121, .*efficientnet_b0"):
        architecture("vgg16")
    with pytest.raises(ValueError, match="unknown backbone 'resnet34'"):  # a known family is not enough
        build_encoder("resnet34")
