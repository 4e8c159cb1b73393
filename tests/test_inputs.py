"""One input recipe: training, embed, probe and explain give a checkpoint's encoder the same inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rxray.models.backbones import Encoder, build_encoder
from rxray.models.classifier import Classifier, classifier_from_checkpoint
from rxray.models.heads import ClassifierHead
from rxray.models.inputs import InputRecipe
from rxray.ssl.augment import normalize
from rxray.models.checkpoints import checkpoint_dir_name, save_checkpoint_file

SIZE = 32
STAINS = [1, 3, 5]  # the classifier's stains (1-based)
MEAN, STD = [120.0, 110.0, 130.0, 125.0, 128.0, 127.0], [70.0, 72.0, 74.0, 73.0, 71.0, 75.0]
# Plate normalisation as `rxray finetune` records it; HUVEC-1_1 has no entry and keeps gain 1.
GAINS = {"HUVEC-2_1": [0.5, 1.5, 2.0, 1.0, 0.75, 3.0]}
CLASSES = ["EMPTY", "IFN-beta"]


def _batch() -> dict[str, np.ndarray]:
    """A shard batch of four sites on two plates, as Ray Data hands it to an actor (read-only images)."""
    images = np.random.default_rng(0).integers(0, 256, size=(4, 6, SIZE, SIZE), dtype=np.uint8)
    images.setflags(write=False)
    return {"image": images, "site_id": np.array([f"s{i}" for i in range(4)]),
            "experiment": np.array(["HUVEC-1", "HUVEC-2", "HUVEC-2", "HUVEC-1"]), "plate": np.array([1, 1, 1, 1]),
            "treatment": np.array(["EMPTY", "IFN-beta", "EMPTY", "IFN-beta"]),
            "treatment_conc": np.array([0.0, 1.0, 0.0, 1.0])}


def _save_classifier(out: str) -> dict:
    """A finetune-format classifier checkpoint on STAINS with plate gains; returns the dict as saved."""
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=len(STAINS))
    model = Classifier(encoder, ClassifierHead(encoder.feature_dim, len(CLASSES), hidden_dim=8), channels=STAINS)
    state = {"encoder": model.encoder.state_dict(), "head": model.head.state_dict(), "backbone": "resnet18",
             "stem": "adapt", "channels": STAINS, "in_channels": len(STAINS), "with_conc": False, "classes": CLASSES,
             "task": "binary", "label_col": "treatment", "channel_mean": MEAN, "channel_std": STD,
             "head_hidden": 8, "dropout": 0.0, "plate_norm": True, "plate_gains": GAINS, "epoch": 1, "config": {}}
    directory = os.path.join(out, "classifier", checkpoint_dir_name(1))
    os.makedirs(directory)
    save_checkpoint_file(state, directory)
    return state | {"uri": os.path.join(directory, "checkpoint.pt")}


@pytest.fixture
def encoder_inputs(monkeypatch) -> list[torch.Tensor]:
    """Every batch of inputs any Encoder is called on from now, whoever calls it (a Classifier, an actor, the probe)."""
    seen: list[torch.Tensor] = []
    forward = Encoder.forward

    def recording(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == len(_batch()["image"]):  # not the one-image probe that sizes a new encoder
            seen.append(images.detach().float().clone())
        return forward(self, images)

    monkeypatch.setattr(Encoder, "forward", recording)
    return seen


def _training_inputs(checkpoint: dict, batch: dict[str, np.ndarray], seen: list[torch.Tensor]) -> torch.Tensor:
    """What the encoder sees in `rxray finetune`: classify's plate gains and model_inputs, through the Classifier."""
    from rxray.layout import row_gains
    from rxray.models.inputs import model_inputs

    gain = torch.from_numpy(row_gains(checkpoint["plate_gains"], batch["experiment"], batch["plate"]))
    # Training normalises with the six-stain statistics of the data (what classify records).
    inputs = model_inputs(torch.from_numpy(batch["image"].copy()), gain, MEAN, STD)
    with torch.no_grad():
        classifier_from_checkpoint(checkpoint)(inputs)
    return seen.pop()


def test_training_embed_probe_and_explain_give_the_encoder_the_same_inputs(tmp_path, encoder_inputs):
    from rxray.batch.embed import EmbedBatch
    from rxray.batch.explain import ExplainBatch
    from rxray.evaluate.probe_step import embed_probe_batches

    checkpoint = _save_classifier(str(tmp_path / "finetune"))
    batch = _batch()
    training = _training_inputs(checkpoint, batch, encoder_inputs)
    assert training.shape == (4, len(STAINS), SIZE, SIZE)

    embedder = EmbedBatch(checkpoint["uri"])
    explainer = ExplainBatch(checkpoint["uri"], {c: i for i, c in enumerate(CLASSES)}, "treatment",
                             str(tmp_path / "explained"), occlusion=False)
    encoder_inputs.clear()
    embedder(batch)
    explainer(batch)
    embed_probe_batches(checkpoint, [batch], baseline_seeds=0, device=torch.device("cpu"))
    assert len(encoder_inputs) == 3  # embed, explain's Grad-CAM pass, probe
    for step, inputs in zip(("embed", "explain", "probe"), encoder_inputs):
        torch.testing.assert_close(inputs, training, rtol=1e-6, atol=1e-6, msg=f"{step} inputs differ")

    # The gains were applied: a plate with gains differs from plain z-scores, the plate without none does.
    plain = normalize(torch.from_numpy(batch["image"].copy()), MEAN, STD)[:, [c - 1 for c in STAINS]]
    torch.testing.assert_close(training[[0, 3]], plain[[0, 3]])
    assert not torch.allclose(training[[1, 2]], plain[[1, 2]])


def test_statistics_recorded_for_the_model_stains_only_give_the_same_inputs():
    six = {"channel_mean": MEAN, "channel_std": STD, "channels": STAINS, "plate_gains": GAINS}
    own = six | {"channel_mean": [MEAN[c - 1] for c in STAINS], "channel_std": [STD[c - 1] for c in STAINS]}
    batch, cpu = _batch(), torch.device("cpu")
    from_six, from_own = InputRecipe.from_checkpoint(six), InputRecipe.from_checkpoint(own)
    torch.testing.assert_close(from_own.encoder_inputs(batch, cpu), from_six.encoder_inputs(batch, cpu))
    index = [c - 1 for c in STAINS]  # a Classifier reads these of its six-stain input and drops the rest
    torch.testing.assert_close(from_own.classifier_inputs(batch, cpu)[:, index],
                               from_six.classifier_inputs(batch, cpu)[:, index])


def test_a_pretrain_checkpoint_is_embedded_without_gains_like_simclr_trains():
    # `rxray pretrain` records no plate gains (SimCLR trains on the images as ingested).
    recipe = InputRecipe.from_checkpoint({"channel_mean": MEAN, "channel_std": STD, "in_channels": 6})
    batch = _batch()
    assert recipe.stain_index is None and recipe.batch_gains(batch) is None
    torch.testing.assert_close(recipe.encoder_inputs(batch, torch.device("cpu")),
                               normalize(torch.from_numpy(batch["image"].copy()), MEAN, STD))
    assert recipe.scaled_images(batch) is batch["image"]


def test_a_recipe_refuses_statistics_that_do_not_fit_its_stains():
    with pytest.raises(ValueError, match="2 channel means for channels \\[1, 3, 5\\]"):
        InputRecipe.from_checkpoint({"channel_mean": [1, 2], "channel_std": [3, 4], "channels": STAINS})
    with pytest.raises(ValueError, match="outside w1..w6"):
        InputRecipe.from_checkpoint({"channel_mean": MEAN, "channel_std": STD, "channels": [0, 2]})
    with pytest.raises(ValueError, match="6 stain means"):
        InputRecipe((1.0, 2.0), (1.0, 1.0))
