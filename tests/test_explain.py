"""`rxray explain`: Grad-CAM shapes, panels that open, stain shares that sum to 1 and find the stain that matters."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rxray.batch.embed import embedding_matrix
from rxray.batch.attribution import channel_importance, channel_shares, gradcam_batch, occlusion_batch
from rxray.batch.explain import choose_sites, target_classes
from rxray.cli import main
from rxray.config import ConfigError
from rxray import layout
from rxray.data.shards import image_column
from rxray.evaluate import plots
from rxray.models.backbones import build_encoder
from rxray.models.classifier import Classifier
from rxray.models.heads import ClassifierHead
from rxray.models.inputs import InputRecipe
from rxray.ssl.augment import normalize
from rxray.models.checkpoints import checkpoint_dir_name, save_checkpoint_file

SIZE = 32
CLASSES = ["EMPTY", "IFN-beta", "IFN-gamma"]
# (experiment, plate, well, treatment, conc, sites)
WELLS = [("HUVEC-1", 1, "A01", "EMPTY", 0.0, 3), ("HUVEC-1", 1, "B02", "IFN-beta", 10.0, 3),
         ("HUVEC-1", 1, "C03", "IFN-gamma", 5.0, 3), ("HUVEC-2", 1, "A01", "EMPTY", 0.0, 3),
         ("HUVEC-2", 1, "B02", "IFN-beta", 2.5, 3), ("HUVEC-2", 1, "C03", "IFN-gamma", 1.25, 2)]
N_PER_TARGET = 4
PANELS_PER_TARGET = 2
ONLY_CHANNEL = 2  # 0-based: Phalloidin is the one stain the hand-built model can see


def _write_shards(root: str) -> pd.DataFrame:
    """Two Parquet shards of random 32 px images; returns their metadata."""
    rng = np.random.default_rng(0)
    rows = [{"site_id": layout.make_site_id(e, p, w, s), "well_id": layout.make_well_id(e, p, w), "cell_type": "HUVEC",
             "experiment": e, "plate": p, "well": w, "site": s, "treatment": t, "treatment_conc": c}
            for e, p, w, t, c, sites in WELLS for s in range(1, sites + 1)]
    meta = pd.DataFrame(rows)
    images = rng.integers(0, 256, size=(len(meta), layout.N_CHANNELS, SIZE, SIZE), dtype=np.uint8)
    os.makedirs(root)
    for index, part in enumerate(np.array_split(np.arange(len(meta)), 2)):
        table = pa.Table.from_pandas(meta.iloc[part], preserve_index=False)
        pq.write_table(table.append_column("image", image_column(images[part])),
                       os.path.join(root, f"part-{index:06d}.parquet"))
    return meta


def _classifier(channels=None, with_conc=False, only_channel=None, seed=0) -> Classifier:
    """A random resnet18 classifier; with ``only_channel`` (0-based) every other stain is cut at the first conv."""
    torch.manual_seed(seed)
    channels = channels or list(range(1, 7))
    encoder = build_encoder("resnet18", in_channels=len(channels))
    if only_channel is not None:
        with torch.no_grad():
            keep = encoder.backbone.conv1.weight[:, only_channel].clone()
            encoder.backbone.conv1.weight.zero_()
            encoder.backbone.conv1.weight[:, only_channel] = keep * 5  # a strong signal through the one stain
    head = ClassifierHead(encoder.feature_dim, len(CLASSES), hidden_dim=32, dropout=0.0,
                          extra_inputs=1 if with_conc else 0)
    return Classifier(encoder, head, channels=channels, with_conc=with_conc).eval()


def _save(model: Classifier, out: str, mean, std, **extra) -> str:
    """The model as a finetune checkpoint under ``out/run/checkpoint_epoch0001``; returns ``out``."""
    state = extra | {"encoder": model.encoder.state_dict(), "head": model.head.state_dict(), "backbone": "resnet18",
             "stem": "adapt", "channels": model.channels, "with_conc": model.with_conc, "classes": CLASSES,
             "task": "multiclass", "label_col": "treatment", "channel_mean": mean, "channel_std": std,
             "head_hidden": 32, "dropout": 0.0, "epoch": 1, "config": {}}
    directory = os.path.join(out, "run", checkpoint_dir_name(1))
    os.makedirs(directory)
    save_checkpoint_file(state, directory)
    return out


MEAN, STD = [120.0, 110.0, 130.0, 125.0, 128.0, 127.0], [70.0, 72.0, 74.0, 73.0, 71.0, 75.0]
USED = [1, 2, 3]  # the model's stains (1-based); w4-w6 must get exactly zero attribution
PLANTED = {"IFN-beta": ONLY_CHANNEL + 1, "IFN-gamma": 5}  # as a synthetic truth.json records them


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """Shards, a 3-stain classifier with concentration input that sees only Phalloidin, one `rxray explain` run."""
    root = tmp_path_factory.mktemp("explain")
    meta = _write_shards(str(root / "shards"))
    model = _classifier(channels=USED, with_conc=True, only_channel=ONLY_CHANNEL)
    # Statistics for the model's own stains only, as a subset checkpoint may record them.
    model_uri = _save(model, str(root / "finetune"), MEAN[:3], STD[:3])
    truth = root / "truth.json"
    truth.write_text(json.dumps({"treatments": {t: {"channel": c} for t, c in PLANTED.items()}}))
    out = str(root / "explained")
    code = main(["explain", "--data", str(root / "shards"), "--model", model_uri, "--out", out,
                 "--n", str(N_PER_TARGET), "--panels", str(PANELS_PER_TARGET), "--batch-size", "3", "--seed", "1",
                 "--truth", str(truth)])
    assert code == 0
    manifest = json.loads((root / "explained" / "_manifest.json").read_text())
    heatmaps = pq.read_table(os.path.join(out, "heatmaps"))
    return {"root": root, "meta": meta, "out": out, "manifest": manifest, "heatmaps": heatmaps}


def test_one_explanation_per_chosen_site_with_the_right_shapes(run):
    table, meta = run["heatmaps"], run["meta"]
    assert table.num_rows == 2 * N_PER_TARGET  # EMPTY is a control class: not a default target
    frame = table.drop_columns(["heatmap", "attribution", "occlusion"]).to_pandas()
    assert sorted(frame["treatment"].unique()) == ["IFN-beta", "IFN-gamma"]
    assert frame["site_id"].is_unique and set(frame["site_id"]) <= set(meta["site_id"])
    assert (frame["target_class"] == frame["treatment"]).all()
    assert (frame["target_index"] == frame["treatment"].map(CLASSES.index)).all()
    assert frame["target_prob"].between(0, 1).all()

    heatmaps = embedding_matrix(table.column("heatmap")).reshape(-1, SIZE, SIZE)
    assert heatmaps.dtype == np.float32 and heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_attributions_sum_to_one_and_skip_unused_stains(run):
    table = run["heatmaps"]
    attributions = embedding_matrix(table.column("attribution"))
    occlusion = embedding_matrix(table.column("occlusion"))
    assert attributions.shape == occlusion.shape == (table.num_rows, layout.N_CHANNELS)
    np.testing.assert_allclose(attributions.sum(axis=1), 1.0, atol=1e-5)
    assert (attributions[:, 3:] == 0).all() and (occlusion[:, 3:] == 0).all()


def test_the_same_seed_explains_the_same_sites(run):
    meta = run["meta"].sample(frac=1.0, random_state=3)  # shard order must not matter
    chosen, panels = choose_sites(meta["site_id"], meta["treatment"], ["IFN-beta", "IFN-gamma"], N_PER_TARGET,
                                  seed=1, panels=PANELS_PER_TARGET)
    assert sorted(s for ids in chosen.values() for s in ids) == sorted(run["heatmaps"].column("site_id").to_pylist())
    again, _ = choose_sites(run["meta"]["site_id"], run["meta"]["treatment"], ["IFN-gamma"], N_PER_TARGET, 1, 2)
    assert again["IFN-gamma"] == chosen["IFN-gamma"]  # independent of the other targets, too
    assert len(chosen["IFN-gamma"]) == N_PER_TARGET and set(panels) <= set(chosen["IFN-beta"] + chosen["IFN-gamma"])
    fewer, _ = choose_sites(run["meta"]["site_id"], run["meta"]["treatment"], ["IFN-gamma"], 100, 1, 2)
    assert len(fewer["IFN-gamma"]) == 5  # every site when there are fewer than n


def test_panels_exist_and_open(run):
    out, manifest = run["out"], run["manifest"]
    panels = [p for p in manifest["figures"] if p.startswith("panels/")]
    assert len(panels) == manifest["counts"]["panels"] == 2 * PANELS_PER_TARGET
    assert manifest["figures"] == ["channel_importance.png", *panels]
    for relative in manifest["figures"]:
        with Image.open(os.path.join(out, relative)) as image:
            image.verify()
            assert image.format == "PNG"
    listed = run["heatmaps"].column("panel").to_pylist()
    assert sorted(p for p in listed if p) == sorted(panels)
    assert manifest["counts"]["explained"] == 2 * N_PER_TARGET and manifest["model"]["classes"] == CLASSES
    assert manifest["timings"]["explain"] > 0 and "gradient x input" in manifest["importance_method"]


def test_importance_table_ranks_the_only_stain_the_model_sees_first(run):
    table = pd.read_csv(os.path.join(run["out"], "channel_importance.csv"))
    assert len(table) == 2 * layout.N_CHANNELS
    assert set(table.groupby("treatment")["rank"].min()) == {1}
    first = table[table["rank"] == 1]
    assert list(first["stain"]) == [layout.CHANNEL_NAMES[ONLY_CHANNEL]] * 2
    assert first["importance"].min() > 0.999
    assert (table[table["channel"] != ONLY_CHANNEL + 1]["occlusion_drop"].abs() < 1e-6).all()
    assert run["manifest"]["top_stain"] == {"IFN-beta": "Phalloidin", "IFN-gamma": "Phalloidin"}
    parquet = pd.read_parquet(os.path.join(run["out"], "channel_importance.parquet"))
    assert parquet["rank"].tolist() == table["rank"].tolist()

    # The science-check view: each treatment's planted stain and where it ranks.
    assert set(table[table["planted"]]["channel"]) == set(PLANTED.values())
    planted = run["manifest"]["planted"]
    assert planted["with_planted_channel"] == 2 and planted["ranked_first"] == 1
    assert planted["treatments"]["IFN-beta"]["rank"] == planted["treatments"]["IFN-beta"]["occlusion_rank"] == 1
    assert planted["treatments"]["IFN-gamma"]["rank"] > 1  # an unused stain cannot rank first
    assert table[(table["treatment"] == "IFN-gamma") & table["planted"]]["importance"].item() == 0


def test_cli_rejects_a_target_the_model_cannot_explain(run, tmp_path, capsys):
    model_uri = _save(_classifier(), str(tmp_path / "finetune"), MEAN, STD)
    code = main(["explain", "--data", str(run["root"] / "shards"), "--model", model_uri, "--out",
                 str(tmp_path / "x"), "--targets", "IFN-omega"])
    assert code == 2 and "explain.targets" in capsys.readouterr().err


# --------------------------------------------------------------------------- without Ray


def _images(n=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, SIZE, SIZE), dtype=np.uint8)


def test_gradient_x_input_matches_plain_autograd():
    model, images = _classifier(seed=2), _images()
    targets = np.array([0, 1, 2])
    heatmaps, attributions, probs = gradcam_batch(model, images, MEAN, STD, targets)
    assert heatmaps.shape == (3, SIZE, SIZE) and probs.shape == (3, len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    assert all(p.requires_grad for p in model.parameters())  # and the model is left as it was

    x = normalize(torch.from_numpy(images), MEAN, STD).requires_grad_(True)
    model(x)[torch.arange(3), torch.from_numpy(targets)].sum().backward()
    raw = (x.grad * x).abs().sum(dim=(2, 3))
    np.testing.assert_allclose(attributions, (raw / raw.sum(dim=1, keepdim=True)).detach().numpy(), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("channel", [0, 4])
def test_attribution_goes_to_the_only_stain_the_logit_depends_on(channel):
    model = _classifier(only_channel=channel, seed=channel)
    _, attributions, _ = gradcam_batch(model, _images(4, seed=channel), MEAN, STD, 1)
    assert (attributions.argmax(axis=1) == channel).all()
    np.testing.assert_allclose(attributions[:, channel], 1.0, atol=1e-6)
    drops = occlusion_batch(model, _images(4, seed=channel), MEAN, STD, 1)
    assert (np.delete(drops, channel, axis=1) == 0).all() and (drops[:, channel] != 0).all()


def test_explained_images_carry_the_plate_gains_the_classifier_trained_with(tmp_path):
    from rxray.batch.explain import ExplainBatch

    images = np.full((2, 6, 4, 4), 100, dtype=np.uint8)
    batch = {"image": images, "experiment": np.array(["HUVEC-1", "HUVEC-2"]), "plate": np.array([1, 1])}
    gains = {"HUVEC-2_1": [0.5, 1.0, 1.0, 1.0, 1.0, 2.0]}  # a plate without an entry keeps gain 1
    with_gains = ExplainBatch(_save(_classifier(), str(tmp_path / "a"), MEAN, STD, plate_gains=gains), {}, "treatment",
                              str(tmp_path / "out"))
    scaled = with_gains.model_images(batch)
    assert scaled[0].tolist() == images[0].tolist()
    assert scaled[1, :, 0, 0].tolist() == [50.0, 100.0, 100.0, 100.0, 100.0, 200.0]
    without = ExplainBatch(_save(_classifier(), str(tmp_path / "b"), MEAN, STD), {}, "treatment", str(tmp_path / "out"))
    assert without.model_images(batch) is images


def test_channel_shares_and_stats_helpers():
    used = np.array([True, True, True, False, False, False])
    shares = channel_shares(np.array([[1.0, 3.0, 0.0, 9.0, 9.0, 9.0], [0, 0, 0, 0, 0, 0]]), used)
    np.testing.assert_allclose(shares, [[0.25, 0.75, 0, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0, 0]], atol=1e-6)
    recipe = InputRecipe.from_checkpoint({"channel_mean": [1, 2], "channel_std": [3, 4], "channels": [2, 5]})
    assert recipe.mean == (0, 1, 0, 0, 2, 0) and recipe.std == (1, 3, 1, 1, 4, 1)


def test_channel_importance_against_a_naive_mean_and_rank():
    rng = np.random.default_rng(0)
    treatments = np.array(["b", "a", "b", "a", "b"])
    attributions = rng.dirichlet(np.ones(6), size=5)
    occlusion = rng.normal(size=(5, 6))
    table = channel_importance(treatments, treatments, attributions, occlusion, np.full(5, 0.5),
                               planted={"a": 3, "b": None})
    assert len(table) == 12 and list(table.columns[:4]) == ["treatment", "target_class", "n_images",
                                                             "mean_target_prob"]
    for treatment in ("a", "b"):
        rows = table[table["treatment"] == treatment].sort_values("channel")
        expected = attributions[treatments == treatment].mean(axis=0)
        np.testing.assert_allclose(rows["importance"], expected)
        np.testing.assert_allclose(rows["occlusion_drop"], occlusion[treatments == treatment].mean(axis=0))
        effect = np.abs(occlusion[treatments == treatment]).mean(axis=0)
        np.testing.assert_allclose(rows["occlusion_effect"], effect)
        assert rows["occlusion_rank"].tolist() == (np.argsort(np.argsort(-effect)) + 1).tolist()
        assert rows["rank"].tolist() == (np.argsort(np.argsort(-expected)) + 1).tolist()
        np.testing.assert_allclose(rows["importance"].sum(), 1.0)
    assert table[table["planted"]][["treatment", "channel"]].values.tolist() == [["a", 3]]


def test_default_targets_are_the_non_control_classes():
    labels = {"EMPTY": "EMPTY", "IFN-beta": "IFN-beta", "other": "other"}
    assert target_classes(CLASSES, labels, None) == {"IFN-beta": "IFN-beta"}
    assert target_classes(CLASSES, labels, ["EMPTY"]) == {"EMPTY": "EMPTY"}
    with pytest.raises(ConfigError):
        target_classes(CLASSES, labels, ["other"])


def test_evaluation_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=40)
    scores = rng.dirichlet(np.ones(3), size=40)
    paths = [plots.plot_confusion_matrix(np.array([[5, 1, 0], [2, 6, 1], [0, 0, 7]]), CLASSES,
                                         str(tmp_path / "cm.png")),
             plots.plot_pr_curve(y_true, scores, str(tmp_path / "pr.png"), labels=CLASSES),
             plots.plot_roc_curve(y_true, scores, str(tmp_path / "roc.png"), labels=CLASSES),
             plots.plot_pr_curve(y_true % 2, scores[:, 1], str(tmp_path / "pr_binary.png"), labels=["no", "yes"]),
             plots.plot_explain_panel(_images(1)[0], rng.random((SIZE, SIZE)), str(tmp_path / "panel.png"),
                                      title="t", attribution=np.full(6, 1 / 6))]
    many = pd.DataFrame([{"treatment": f"t{i}", "channel": c, "stain": layout.CHANNEL_NAMES[c - 1],
                          "importance": rng.random()} for i in range(20) for c in range(1, 7)])
    paths.append(plots.plot_channel_importance(many, str(tmp_path / "matrix.png")))
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100
