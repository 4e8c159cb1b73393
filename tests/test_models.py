"""Backbones with both 6-channel stems, weight files (local and S3), and heads."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torchvision
from torch import nn

from rxray import storage
from rxray.models.backbones import build_encoder
from rxray.models.registry import BACKBONES
from rxray.models.heads import ClassifierHead, ProjectionHead
from rxray.models.weights import WeightsError, load_backbone_weights, load_state_dict_uri

# Multi-scale features: the pooled output of every stage, concatenated (rxray.models.backbones).
FEATURE_DIMS = {"densenet121": 256 + 512 + 1024 + 1024, "densenet201": 256 + 512 + 1792 + 1920,
                "resnet18": 64 + 128 + 256 + 512, "resnet50": 256 + 512 + 1024 + 2048,
                "mobilenet_v2": 24 + 32 + 96 + 1280, "efficientnet_b0": 24 + 40 + 112 + 1280}


def _rgb_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain torchvision RGB state dict with seeded (non-default) values, as a user would save one."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).state_dict()


def _save(state: dict, uri: str) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def test_every_config_backbone_has_a_known_feature_size():
    assert set(BACKBONES) == set(FEATURE_DIMS)


@pytest.mark.parametrize("stem", ["adapt", "project"])
@pytest.mark.parametrize("name", BACKBONES)
def test_encoder_shapes_for_every_backbone_and_stem(name, stem):
    torch.manual_seed(0)
    encoder = build_encoder(name, stem).eval()
    assert (encoder.name, encoder.stem, encoder.feature_dim) == (name, stem, FEATURE_DIMS[name])

    activations = []
    hook = encoder.target_layer().register_forward_hook(lambda module, args, output: activations.append(output))
    with torch.no_grad():
        features = encoder(torch.rand(2, 6, 32, 32))
    hook.remove()

    assert features.shape == (2, FEATURE_DIMS[name])
    assert torch.isfinite(features).all()
    assert activations and activations[0].dim() == 4, "target_layer must be a convolutional block on the forward path"
    first_conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 6
    if stem == "project":
        assert first_conv.out_channels == 3
        assert next(m for m in encoder.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels == 3


def test_other_channel_counts():
    encoder = build_encoder("resnet18", "adapt", in_channels=2).eval()
    with torch.no_grad():
        assert encoder(torch.rand(1, 2, 32, 32)).shape == (1, FEATURE_DIMS["resnet18"])
    rgb = build_encoder("resnet18", "adapt", in_channels=3)
    assert rgb.backbone.conv1.in_channels == 3


def test_unknown_backbone_or_stem():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_encoder("vgg16")
    with pytest.raises(ValueError, match="unknown stem"):
        build_encoder("resnet18", stem="stack")


def _assert_loaded(encoder, state: dict, first_conv_key: str, head_prefix: str) -> None:
    """Every backbone tensor equals the file's; the adapted first conv holds the mean RGB kernel * 3/6."""
    loaded = encoder.backbone.state_dict()
    for key, value in state.items():
        if key.startswith(head_prefix):
            assert key not in loaded  # the classifier is gone
        elif key == first_conv_key and encoder.stem == "adapt":
            expected = value.mean(dim=1, keepdim=True).repeat(1, 6, 1, 1) * (3 / 6)
            torch.testing.assert_close(loaded[key], expected)
        elif not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("stem", ["adapt", "project"])
def test_weights_round_trip_from_a_local_file(tmp_path, stem):
    state = _rgb_state_dict("resnet18", seed=1)
    path = _save(state, str(tmp_path / "resnet18.pt"))
    encoder = build_encoder("resnet18", stem, weights=path)
    _assert_loaded(encoder, state, "conv1.weight", "fc.")


def test_adapted_stem_keeps_activation_scale_on_grey_input(tmp_path):
    # With every stain channel equal, the adapted 6-channel conv must respond as the RGB conv does to grey.
    state = _rgb_state_dict("resnet18", seed=2)
    encoder = build_encoder("resnet18", "adapt", weights=_save(state, str(tmp_path / "w.pt")))
    grey = torch.rand(1, 1, 16, 16)
    rgb_response = nn.functional.conv2d(grey.expand(1, 3, 16, 16), state["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(encoder.backbone.conv1(grey.expand(1, 6, 16, 16)), rgb_response,
                               rtol=1e-4, atol=1e-5)


def test_weights_round_trip_from_s3(s3_bucket):
    state = _rgb_state_dict("mobilenet_v2", seed=3)
    uri = _save(state, storage.join(s3_bucket, "weights", "mobilenet_v2.pt"))
    encoder = build_encoder("mobilenet_v2", "adapt", weights=uri)
    _assert_loaded(encoder, state, "features.0.0.weight", "classifier.")


def test_densenet_files_from_download_pytorch_org_use_old_key_names(tmp_path):
    state = _rgb_state_dict("densenet121", seed=4)
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
                 for key, value in state.items() if not key.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    encoder = build_encoder("densenet121", "project", weights=_save(old_style, str(tmp_path / "densenet121.pth")))
    _assert_loaded(encoder, state, "features.conv0.weight", "classifier.")


def test_checkpoint_wrappers_and_ddp_prefixes_are_unwrapped(tmp_path):
    state = _rgb_state_dict("resnet18", seed=5)
    wrapped = {"epoch": 3, "model": {f"module.{key}": value for key, value in state.items()}}
    encoder = build_encoder("resnet18", "project", weights=_save(wrapped, str(tmp_path / "checkpoint.pt")))
    _assert_loaded(encoder, state, "conv1.weight", "fc.")


def test_a_file_for_another_architecture_gives_a_clear_one_line_error(tmp_path):
    path = _save(_rgb_state_dict("resnet18"), str(tmp_path / "resnet18.pt"))
    with pytest.raises(WeightsError) as caught:
        build_encoder("densenet121", weights=path)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert message.startswith("weights file resnet18.pt does not fit densenet121: ")
    assert re.search(r"\d+ missing keys \(features\.conv0\.weight, ", message)
    assert re.search(r"\d+ unexpected keys \(conv1\.weight, ", message)
    assert len(message) < 400


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = _rgb_state_dict("resnet18")
    state["conv1.weight"] = torch.zeros(64, 6, 7, 7)  # a 6-channel file is not an RGB torchvision file
    with pytest.raises(WeightsError, match=r"1 key with mismatched shapes \(conv1\.weight file \(64, 6, 7, 7\) "
                                           r"vs model \(64, 3, 7, 7\)\)"):
        load_backbone_weights(torchvision.models.resnet18(weights=None), state, "resnet18", source="six.pt")


def test_a_different_class_count_is_fine_since_the_head_is_dropped(tmp_path):
    torch.manual_seed(6)
    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    encoder = build_encoder("resnet18", "project", weights=_save(state, str(tmp_path / "ten_classes.pt")))
    _assert_loaded(encoder, state, "conv1.weight", "fc.")


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict_uri(str(tmp_path / "missing.pt"))
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("hello")
    with pytest.raises(WeightsError, match="not a plain torch state dict"):
        load_state_dict_uri(str(not_torch))
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_state_dict_uri(_save({"epoch": 3}, str(tmp_path / "no_tensors.pt")))
    whole_model = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), whole_model)  # a pickled module: weights_only refuses to run its code
    with pytest.raises(WeightsError, match="pickled Python objects") as caught:
        load_state_dict_uri(str(whole_model))
    assert "\n" not in str(caught.value)


def test_projection_head():
    head = ProjectionHead(64, hidden_dim=32, out_dim=16, dropout=0.1)
    assert head(torch.randn(8, 64)).shape == (8, 16)
    layer_types = [type(layer) for layer in head]
    assert layer_types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert ProjectionHead(64).eval()(torch.randn(1, 64)).shape == (1, 128)


def test_classifier_head_with_and_without_extra_inputs():
    plain = ClassifierHead(64, n_classes=3)
    assert plain(torch.randn(4, 64)).shape == (4, 3)
    with_concentration = ClassifierHead(64, n_classes=2, extra_inputs=1)
    assert with_concentration(torch.randn(4, 64), torch.randn(4)).shape == (4, 2)
    with pytest.raises(ValueError, match="extra inputs"):
        with_concentration(torch.randn(4, 64))
    with pytest.raises(ValueError, match="extra inputs"):
        plain(torch.randn(4, 64), torch.randn(4, 1))


def test_encoder_and_heads_train_end_to_end():
    encoder = build_encoder("resnet18", "project")
    head = ProjectionHead(encoder.feature_dim, hidden_dim=32, out_dim=8)
    loss = head(encoder(torch.rand(4, 6, 32, 32))).square().mean()
    loss.backward()
    assert encoder.stem_projection[0].weight.grad is not None
    assert encoder.backbone.conv1.weight.grad is not None
