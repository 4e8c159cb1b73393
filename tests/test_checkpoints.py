"""The checkpoint schema: what training writes is what the readers get back, and nothing else loads."""

from __future__ import annotations

import pytest
import torch

from rxray.config import ConfigError
from rxray.models.backbones import build_encoder
from rxray.models.checkpoints import (Checkpoint, checkpoint_dir_name, checkpoint_encoder, read_checkpoint,
                                      require_checkpoint, save_checkpoint_file, write_checkpoint)


def _encoder_checkpoint(**fields) -> Checkpoint:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", stem="adapt", in_channels=len(fields.get("channels", range(6))))
    return Checkpoint(encoder=encoder.state_dict(), backbone="resnet18", stem="adapt", channel_mean=[60.0] * 6,
                      channel_std=[20.0] * 6, epoch=3, metrics=[{"epoch": 3}], starts=[0], **fields)


def test_a_checkpoint_round_trips_through_its_file(tmp_path):
    written = _encoder_checkpoint(channels=[1, 4], classes=["EMPTY", "IFN-beta"], with_conc=False)
    uri = write_checkpoint(written, str(tmp_path / "checkpoint.pt"))
    state = torch.load(uri, weights_only=True)
    assert state["in_channels"] == 2 and state["channels"] == [1, 4] and "uri" not in state
    assert "plate_gains" not in state and "optimizer" not in state  # unset fields are not written
    read = read_checkpoint(str(tmp_path))
    assert read.uri == uri and read.in_channels == 2 and read.classes == ["EMPTY", "IFN-beta"]
    assert read.epoch == 3 and read.starts == [0] and read.metrics == [{"epoch": 3}]
    for key, value in written.encoder.items():
        assert torch.equal(read.encoder[key], value)
    encoder = checkpoint_encoder(read)
    assert encoder.in_channels == 2 and not encoder.training


def test_a_pretrain_checkpoint_is_all_six_stains_and_no_classifier():
    state = _encoder_checkpoint(head={}).to_state()
    assert state["channels"] == list(range(1, 7)) and state["in_channels"] == 6 and "classes" not in state
    assert not Checkpoint.from_state(state).is_classifier


def test_what_does_not_fit_the_schema_is_refused(tmp_path):
    state = _encoder_checkpoint().to_state()
    with pytest.raises(ValueError, match="outside the checkpoint schema \\(model\\)"):
        Checkpoint.from_state(state | {"model": {}})
    with pytest.raises(ValueError, match="lacks backbone, stem"):
        Checkpoint.from_state({k: v for k, v in state.items() if k not in ("backbone", "stem")})
    with pytest.raises(ValueError, match="in_channels 3 but channels"):
        Checkpoint.from_state(state | {"in_channels": 3})

    directory = tmp_path / "run" / checkpoint_dir_name(1)
    directory.mkdir(parents=True)
    save_checkpoint_file(state | {"weights": {}}, str(directory))
    with pytest.raises(ConfigError, match="^embed.model: .*outside the checkpoint schema"):
        require_checkpoint(str(tmp_path), "embed.model")
