"""`rxray embed`: one embedding row per input site, the encoder's dimension, correct well means."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rxray import storage
from rxray.batch.embed import EMBEDDING_COLUMN, embedding_matrix
from rxray.cli import main
from rxray import layout
from rxray.data.shards import image_column
from rxray.models.backbones import build_encoder
from rxray.models.inputs import InputRecipe
from rxray.ssl.augment import normalize
from rxray.models.checkpoints import checkpoint_dir_name, save_checkpoint_file

SIZE = 32
# (experiment, plate, well, treatment, sites): 20 sites over 4 wells, uneven so a wrong mean shows.
WELLS = [("HUVEC-1", 1, "A01", "EMPTY", 6), ("HUVEC-1", 1, "B07", "IFN-beta", 4),
         ("HUVEC-2", 1, "A01", "EMPTY", 5), ("HUVEC-2", 1, "AF48", "IFN-beta", 5)]
LATEST_EPOCH = 3


def _write_shards(root: str) -> pd.DataFrame:
    """Three Parquet shards of random 32 px images; returns their metadata."""
    rng = np.random.default_rng(0)
    rows = []
    for experiment, plate, well, treatment, sites in WELLS:
        for site in range(1, sites + 1):
            rows.append({"site_id": layout.make_site_id(experiment, plate, well, site),
                         "well_id": layout.make_well_id(experiment, plate, well), "cell_type": "HUVEC",
                         "experiment": experiment, "plate": plate, "well": well, "site": site,
                         "treatment": treatment, "treatment_conc": 0.0 if treatment == "EMPTY" else 1.0})
    meta = pd.DataFrame(rows)
    images = rng.integers(0, 256, size=(len(meta), layout.N_CHANNELS, SIZE, SIZE), dtype=np.uint8)
    os.makedirs(root)
    for index, part in enumerate(np.array_split(np.arange(len(meta)), 3)):
        table = pa.Table.from_pandas(meta.iloc[part], preserve_index=False)
        table = table.append_column("image", image_column(images[part]))
        pq.write_table(table, os.path.join(root, f"part-{index:06d}.parquet"))
    return meta.assign(images=list(images))


def _save_checkpoint(run_dir: str, epoch: int, seed: int, mean: list[float], std: list[float]) -> str:
    """A random-init resnet18 checkpoint in the training checkpoint format; returns its file path."""
    torch.manual_seed(seed)
    encoder = build_encoder("resnet18")
    state = {"encoder": encoder.state_dict(), "head": None, "optimizer": None, "epoch": epoch, "config": {},
             "backbone": "resnet18", "stem": "adapt", "channel_mean": mean, "channel_std": std, "metrics": {}}
    directory = os.path.join(run_dir, checkpoint_dir_name(epoch))
    os.makedirs(directory)
    return save_checkpoint_file(state, directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_proxy, ray_local):
    """Shards, a pretrain-style output with two checkpoints, and one `rxray embed` run (CLI, output to a flaky S3)."""
    root = tmp_path_factory.mktemp("embed")
    meta = _write_shards(str(root / "shards"))
    images = np.stack(meta["images"])
    mean = images.mean(axis=(0, 2, 3)).tolist()
    std = images.std(axis=(0, 2, 3)).tolist()
    model_out = str(root / "pretrain")
    _save_checkpoint(os.path.join(model_out, "simclr"), 1, seed=1, mean=mean, std=std)
    latest = _save_checkpoint(os.path.join(model_out, "simclr"), LATEST_EPOCH, seed=3, mean=mean, std=std)
    bucket = f"s3://test-embed-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(bucket)
    out = f"{bucket}/embeddings"
    with s3_proxy.flaky(failure_rate=0.1, delay_rate=0.1) as faults:  # an object store failing a tenth of requests
        code = main(["embed", "--data", str(root / "shards"), "--model", model_out, "--out", out, "--batch-size", "8"])
    assert code == 0 and faults["503"] + faults["500"] + faults["reset"] > 0, faults
    assert faults["applied-reset"] + faults["truncated"] > 0, faults  # and some that half happened
    return {"root": root, "meta": meta, "mean": mean, "std": std, "model_out": model_out, "latest": latest,
            "out": out, "manifest": json.loads(storage.read_text(storage.join(out, "_manifest.json")))}


def _read_sites(uri: str) -> pd.DataFrame:
    fs, path = storage.pyarrow_filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    frame = table.drop_columns([EMBEDDING_COLUMN]).to_pandas()
    frame["vector"] = list(embedding_matrix(table.column(EMBEDDING_COLUMN)))
    return frame.sort_values("site_id").reset_index(drop=True)


def test_the_recipe_selects_trained_channels():
    def encoder_view(checkpoint):
        recipe = InputRecipe.from_checkpoint(checkpoint)
        index = recipe.stain_index
        return index, [recipe.mean[i] for i in index or range(6)], [recipe.std[i] for i in index or range(6)]

    six = {"channel_mean": [1, 2, 3, 4, 5, 6], "channel_std": [7, 8, 9, 10, 11, 12]}
    assert encoder_view(six) == (None, [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])
    assert encoder_view({**six, "channels": [1, 5]}) == ([0, 4], [1, 5], [7, 11])
    assert encoder_view({"channel_mean": [1, 5], "channel_std": [7, 11], "channels": [1, 5]}) == ([0, 4], [1, 5],
                                                                                                  [7, 11])
    with pytest.raises(ValueError):
        InputRecipe.from_checkpoint({**six, "channels": [7]})
    recipe = InputRecipe.from_checkpoint({**six, "channels": [1, 5], "plate_gains": {"E_1": [2.0] * 6}})
    assert InputRecipe.from_checkpoint(recipe.checkpoint_fields()) == recipe  # what a checkpoint records reads back


def test_one_embedding_per_site_from_the_latest_checkpoint(setup):
    meta, out = setup["meta"], setup["out"]
    sites = _read_sites(storage.join(out, "sites"))
    expected = meta.sort_values("site_id").reset_index(drop=True)
    assert sites["site_id"].tolist() == expected["site_id"].tolist()  # every site once, nothing else
    for column in layout.METADATA_COLUMNS:
        assert sites[column].tolist() == expected[column].tolist(), column
    assert "image" not in sites.columns

    encoder = build_encoder("resnet18")
    assert setup["manifest"]["dim"] == encoder.feature_dim == 960  # resnet18's four stages, pooled
    vectors = np.stack(sites["vector"])
    assert vectors.shape == (len(meta), encoder.feature_dim) and vectors.dtype == np.float32

    # Reference: the epoch-3 encoder (not epoch 1) run directly on the same images.
    state = torch.load(setup["latest"], weights_only=True)
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    with torch.inference_mode():
        reference = encoder(normalize(torch.from_numpy(np.stack(expected["images"])), setup["mean"], setup["std"]))
    np.testing.assert_allclose(vectors, reference.numpy(), rtol=1e-4, atol=1e-4)

    manifest = setup["manifest"]
    assert manifest["model"]["uri"] == setup["latest"] and manifest["model"]["epoch"] == LATEST_EPOCH
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == len(meta)
    assert manifest["counts"]["wells"] == len(WELLS) and manifest["dim"] == 960


def test_well_profiles_are_site_means(setup):
    sites = _read_sites(storage.join(setup["out"], "sites"))
    fs, path = storage.pyarrow_filesystem(storage.join(setup["out"], "wells"))
    wells = pq.read_table(path, filesystem=fs)
    profiles = embedding_matrix(wells.column(EMBEDDING_COLUMN))
    frame = wells.drop_columns([EMBEDDING_COLUMN]).to_pandas()
    assert frame["well_id"].tolist() == sorted(sites["well_id"].unique())
    assert "site_id" not in frame.columns and "site" not in frame.columns
    for i, row in frame.iterrows():
        members = sites[sites["well_id"] == row["well_id"]]
        assert row["n_sites"] == len(members)
        np.testing.assert_allclose(profiles[i], np.stack(members["vector"]).mean(axis=0), rtol=1e-5, atol=1e-6)
        for column in ("experiment", "plate", "well", "treatment", "treatment_conc", "cell_type"):
            assert row[column] == members[column].iloc[0]


def test_model_is_a_run_output_or_a_checkpoint_file(setup):
    from rxray.models.checkpoints import require_checkpoint

    for model in (setup["model_out"], os.path.join(setup["model_out"], "simclr"), setup["latest"]):
        checkpoint = require_checkpoint(model, "embed.model")
        assert checkpoint["uri"] == setup["latest"] and checkpoint["epoch"] == LATEST_EPOCH


def test_missing_model_is_a_config_error(setup, capsys):
    code = main(["embed", "--data", str(setup["root"] / "shards"), "--model", str(setup["root"] / "nowhere"),
                 "--out", str(setup["root"] / "unused")])
    assert code == 2
    assert "embed.model" in capsys.readouterr().err


def test_benchmark_rows_go_into_the_embedding_section_only(tmp_path):
    from rxray.bench.embed import SECTION, TABLE_HEADER, record

    path = str(tmp_path / "benchmarks.md")
    record(path, "| first |")  # a missing file gets just this section
    embedding_section = open(path).read()
    assert embedding_section.startswith(SECTION)
    others = "# Benchmarks\n\n## Ingest\n\n| ingest row |\n\n"
    with open(path, "w") as handle:
        handle.write(others + embedding_section + "\n## Training\n\ntraining text\n")
    record(path, "| second |", note="shared machine")
    text = open(path).read()
    assert text.startswith(others) and text.rstrip().endswith("## Training\n\ntraining text")
    section = text[text.index(SECTION):text.index("## Training")]
    assert section.count(TABLE_HEADER) == 1
    assert section.index("| first |") < section.index("| second |") and "- shared machine" in section


def test_benchmark_notes_and_prose_under_a_table_are_kept(tmp_path):
    from rxray.bench.embed import SECTION, record

    path = str(tmp_path / "benchmarks.md")
    record(path, "| first |", note="run one")
    with open(path, "a") as handle:
        handle.write("Reading it: a paragraph a person wrote.\n")
    record(path, "| second |", note="run two")
    record(path, "| third |")
    section = open(path).read()
    assert section.startswith(SECTION) and section.count("Reading it: a paragraph a person wrote.") == 1
    order = [section.index(text) for text in ("| first |", "| second |", "| third |", "- run one", "- run two",
                                              "Reading it")]
    assert order == sorted(order)
