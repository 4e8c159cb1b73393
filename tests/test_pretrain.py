"""SimCLR pretraining on Ray Train: checkpoints, metrics, resume, recovery from a worker death on a flaky S3, judged
bitwise against the session's science run (conftest.py), which trained the same config undisturbed."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import torch

from rxray import storage
from rxray.batch.embed import EMBEDDING_COLUMN, EmbedBatch
from rxray.config import ConfigError, PretrainConfig, load_config
from rxray.data.shards import read_shards
from rxray.outputs import read_manifest
from rxray.models.checkpoints import (Checkpoint, checkpoint_epoch, latest_checkpoint, load_checkpoint,
                                     load_encoder, read_checkpoint)
from rxray.train.epoch_log import read_metrics
from rxray.train.launch import cache_datasets
from rxray_testing.faults import crash_once
from rxray.train.simclr import RUN_NAME, pretrain
from conftest import shard_row

pytestmark = pytest.mark.slow

SITES = 128  # of the tiny shards the checks without a training run read
SIZE = 32


def _site_rows(count: int, size: int, seed: int) -> list[dict]:
    """Metadata rows + uint8 (6, size, size) images: smooth random textures at per-image intensities."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 6, 4, 4))
    textures = np.kron(coarse, np.ones((size // 4, size // 4)))  # blocky, so crops of one image share content
    levels = rng.uniform(40, 200, (count, 6, 1, 1))
    images = np.clip(levels * (0.5 + textures), 0, 255).astype(np.uint8)
    rows = []
    for i in range(count):
        well = f"A{i % 48 + 1:02d}"
        control = i % 4 == 0
        rows.append(shard_row("HUVEC-1", 1, well, i // 48 + 1, "EMPTY" if control else "IFN-beta",
                              0.0 if control else 1.0, images[i]))
    return rows


@pytest.fixture(scope="module")
def tiny_shards(write_shards, tmp_path_factory):
    """128 sites of 32 px in the shard format, on local disk."""
    return write_shards(str(tmp_path_factory.mktemp("shards") / "ingest"), _site_rows(SITES, SIZE, seed=0), 4)


def _config(data: str, out: str, **values) -> PretrainConfig:
    base = dict(data=data, out=out, backbone="mobilenet_v2", epochs=2, batch_size=8, lr=2e-3, workers=2, seed=0)
    return load_config(PretrainConfig, values={**base, **values})


def _science_pretrain(science_run) -> PretrainConfig:
    """The config of the science run's pretraining: 2 workers, the images cached, on local disk, undisturbed."""
    return load_config(PretrainConfig, str(science_run[2] / "run" / "pretrain" / "config.yaml"))


@pytest.fixture(scope="module")
def finished_run(science_run, s3_proxy, tmp_path_factory):
    """The science run's pretraining again, on a flaky S3, with rank 0's process dying one step into epoch 2.

    Ray Train restarts the group from epoch 1's checkpoint, restored from the flaky store. The images are
    cached in the object store, so the run's data order is its seed's alone and it must end with bitwise the
    weights of the undisturbed science run. Yields (config, summary, crash marker).
    """
    bucket = f"s3://test-pretrain-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(bucket)
    cfg = load_config(PretrainConfig, values={**vars(_science_pretrain(science_run)), "out": f"{bucket}/run",
                                               "max_failures": 1})
    assert cfg.workers == 2 and cfg.cache == "on"
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    with s3_proxy.flaky(failure_rate=0.1, delay_rate=0.1) as faults, crash_once(epoch=1, marker=str(marker)):
        summary = pretrain(cfg)  # 0-based epoch 1: rank 0 dies one step into epoch 2
    assert faults["503"] + faults["500"] + faults["reset"] > 0, faults  # checkpoints to a store failing 10%
    assert faults["applied-reset"] and faults["truncated"], faults  # uploads applied unheard, restores cut off
    return cfg, summary, marker


def _shard_images(cfg: PretrainConfig, count: int) -> torch.Tensor:
    """The first ``count`` site images of ``cfg``'s shards, uint8 (count, 6, S, S)."""
    batch = read_shards(cfg.data, columns=["image"]).take_batch(count, batch_format="numpy")
    return torch.as_tensor(np.stack(batch["image"]))


def _fixed_view_losses(cfg: PretrainConfig, checkpoint: Checkpoint) -> tuple[float, float]:
    """NT-Xent on 64 of the sites, both views drawn with one seed: (the checkpoint's model, its random init)."""
    from rxray.ssl.ntxent import nt_xent_loss
    from rxray.train.simclr import build_augment, build_model

    images = _shard_images(cfg, 64)
    stats = images.float().mean((0, 2, 3)).tolist(), images.float().std((0, 2, 3)).tolist()
    views = build_augment(cfg, images.shape[-1], *stats)(images, torch.Generator().manual_seed(0))
    losses = []
    for trained in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg)
        if trained:
            model.encoder.load_state_dict(checkpoint.encoder)
            model.head.load_state_dict(checkpoint.head)
        model.train()  # batch statistics for both models: a random init's running statistics describe nothing
        with torch.no_grad():
            losses.append(float(nt_xent_loss(model(views[0]), model(views[1]), temperature=cfg.temperature,
                                             gather=False)))
    return losses[0], losses[1]


def test_two_worker_run_writes_checkpoints_metrics_and_learns(finished_run):
    cfg, summary, _ = finished_run
    assert summary.status == "trained" and summary.epochs_completed == 2
    history = read_metrics(cfg.out)
    assert [entry["epoch"] for entry in history] == [1, 2]
    sites = read_shards(cfg.data, columns=["site_id"]).count()
    for entry in history:
        assert entry["steps"] == sites // (cfg.workers * cfg.batch_size)
        assert 0.0 <= entry["top1"] <= 1.0 and entry["images_per_s"] > 0
    # Learning, measured on fixed views: per-epoch losses move by ~0.01 with the order streamed blocks arrive in.
    trained, untrained = _fixed_view_losses(cfg, read_checkpoint(cfg.out))
    assert trained < untrained - 0.05, (trained, untrained)

    run_dir = storage.join(cfg.out, RUN_NAME)
    assert sorted(checkpoint_epoch(p) for p in storage.list_dir(run_dir) if checkpoint_epoch(p)) == [1, 2]
    assert load_config(PretrainConfig, storage.join(cfg.out, "config.yaml")) == cfg
    events = storage.list_dir(storage.join(cfg.out, "tensorboard"))
    assert sum("events.out.tfevents" in name for name in events) >= 2  # one per run (and per restart)
    manifest = read_manifest(cfg.out)
    assert manifest["step"] == "pretrain" and manifest["rows"] == sites
    assert manifest["epochs_completed"] == 2 and manifest["resumed_from"] == 0


def test_worker_process_death_on_s3_resumes_from_last_checkpoint(finished_run):
    cfg, summary, marker = finished_run
    assert marker.exists()  # rank 0's process really died, partway through epoch 2
    assert summary.checkpoint == f"{cfg.out}/{RUN_NAME}/checkpoint_epoch0002/checkpoint.pt"
    state = load_checkpoint(cfg.out)
    assert state["starts"] == [0, 1]  # the lineage of the final weights: from scratch, then from epoch 1's checkpoint
    assert [entry["epoch"] for entry in state["metrics"]] == [1, 2]
    assert [json.loads(line)["epoch"] for line in storage.read_text(f"{cfg.out}/metrics.jsonl").splitlines()] == [1, 2]
    assert any("tfevents" in name for name in storage.list_dir(f"{cfg.out}/tensorboard"))


def test_rerun_of_a_finished_run_trains_nothing(finished_run, capsys):
    cfg, first, _ = finished_run
    again = pretrain(cfg)
    assert "already complete (2 of 2 epochs)" in capsys.readouterr().out
    assert again.status == "complete" and again.checkpoint == first.checkpoint
    assert len(read_metrics(cfg.out)) == 2


def test_other_settings_cannot_claim_a_finished_run(finished_run):
    cfg, first, _ = finished_run
    changed = load_config(PretrainConfig, values={**vars(cfg), "lr": 1e-4, "workers": 1})
    with pytest.raises(ConfigError, match=r"^pretrain.lr: .*finished 2-epoch run trained with other settings "
                                          rf"\(lr: {cfg.lr} -> 0.0001\); use a new --out"):
        pretrain(changed)
    assert read_manifest(cfg.out)["config"]["lr"] == cfg.lr  # the record still says how the run was trained


def test_the_undisturbed_science_run_ended_with_the_weights_of_the_one_that_lost_a_worker(finished_run,
                                                                                         science_run):
    """Resume judged by weights: the same config and seed on 2 workers, undisturbed and on local disk (the science
    run), wrote bitwise the checkpoints of the fixture's run (epoch 1: two runs of one seed; epoch 2: after the
    death and the restore from a flaky S3), so `rxray embed` agrees too."""
    cfg, undisturbed = finished_run[0], _science_pretrain(science_run)
    for epoch in (1, 2):
        name = f"{RUN_NAME}/checkpoint_epoch{epoch:04d}/checkpoint.pt"
        first, second = load_checkpoint(f"{cfg.out}/{name}"), load_checkpoint(f"{undisturbed.out}/{name}")
        assert [m["loss"] for m in first["metrics"]] == [m["loss"] for m in second["metrics"]], epoch
        for part in ("encoder", "head", "optimizer"):
            assert same_tensors(first[part], second[part]), f"epoch {epoch}: {part} differs from the undisturbed run"
    sites = read_shards(cfg.data, columns=["site_id"]).count()
    batch = read_shards(cfg.data).take_batch(sites, batch_format="numpy")  # every site
    embeddings = [EmbedBatch(uri)(batch)[EMBEDDING_COLUMN] for uri in (cfg.out, undisturbed.out)]
    assert embeddings[0].shape[0] == sites and np.isfinite(embeddings[0]).all()
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


def same_tensors(first, second) -> bool:
    """True when two nested dicts / lists of tensors and plain values are bitwise equal."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(
            same_tensors(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(
            same_tensors(a, b) for a, b in zip(first, second))
    return first == second


def test_checkpoint_round_trip_to_encoder(finished_run):
    cfg, summary, _ = finished_run
    for uri in (cfg.out, storage.join(cfg.out, RUN_NAME), os.path.dirname(summary.checkpoint),
                summary.checkpoint):
        assert latest_checkpoint(uri) == summary.checkpoint
    state = load_checkpoint(cfg.out)
    assert state["epoch"] == 2 and state["backbone"] == cfg.backbone and state["stem"] == "adapt"
    assert len(state["channel_mean"]) == 6 and state["starts"] == [0, 1]
    assert [entry["epoch"] for entry in state["metrics"]] == [1, 2]

    encoder, loaded = load_encoder(cfg.out)
    assert not encoder.training
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, loaded["encoder"][key])
    with torch.no_grad():
        features = encoder(torch.randn(3, 6, SIZE, SIZE))
    assert features.shape == (3, encoder.feature_dim)


def test_latest_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt under"):
        latest_checkpoint(str(tmp_path))


def test_a_newer_stored_checkpoint_is_found_and_a_cut_off_one_passed_over(tmp_path, capsys):
    from rxray.models.checkpoints import checkpoint_dir_name, newest_checkpoint_after, save_checkpoint_file

    run = tmp_path / "simclr"
    for epoch in (1, 2, 3):
        os.makedirs(run / checkpoint_dir_name(epoch))
        save_checkpoint_file({"epoch": epoch, "weights": torch.zeros(4)}, str(run / checkpoint_dir_name(epoch)))
    cut_off = run / checkpoint_dir_name(3) / "checkpoint.pt"
    cut_off.write_bytes(cut_off.read_bytes()[:40])  # a write that never finished
    (run / checkpoint_dir_name(4)).mkdir()  # a directory whose file never arrived

    found = newest_checkpoint_after(str(run), epoch=1)
    assert found["epoch"] == 2 and found["uri"].endswith(f"{checkpoint_dir_name(2)}/checkpoint.pt")
    assert "passing over" in capsys.readouterr().out
    assert newest_checkpoint_after(str(run), epoch=2) is None
    assert newest_checkpoint_after(str(tmp_path / "missing"), epoch=0) is None


def test_bad_weights_file_is_a_config_error_before_training(tiny_shards, tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    cfg = _config(tiny_shards, str(tmp_path / "out"), weights=str(bad))
    with pytest.raises(ConfigError, match="^pretrain.weights: ") as error:
        pretrain(cfg)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")


def test_changing_the_backbone_of_an_existing_run_is_refused(finished_run):
    cfg, _, _ = finished_run
    other = "mobilenet_v2" if cfg.backbone != "mobilenet_v2" else "resnet18"
    changed = load_config(PretrainConfig, values={**vars(cfg), "backbone": other, "epochs": 3})
    with pytest.raises(ConfigError, match="^pretrain.backbone: .*use a new --out"):
        pretrain(changed)


def test_cache_policy_materialises_only_what_fits_the_object_store(tiny_shards, capsys):
    from ray.data.dataset import MaterializedDataset

    from rxray.data.shards import read_shards

    datasets = {"train": read_shards(tiny_shards, columns=["image"])}
    image_bytes = 6 * SIZE * SIZE
    assert cache_datasets(datasets, {"train": SITES}, image_bytes, "off", "pretrain") is datasets
    too_big = cache_datasets(datasets, {"train": 10**9}, image_bytes, "auto", "pretrain")
    assert too_big["train"] is datasets["train"] and "streaming the images" in capsys.readouterr().out
    cached = cache_datasets(datasets, {"train": SITES}, image_bytes, "auto", "pretrain")
    assert isinstance(cached["train"], MaterializedDataset) and cached["train"].count() == SITES
    assert "caching" in capsys.readouterr().out
    forced = cache_datasets(datasets, {"train": 10**9}, image_bytes, "on", "pretrain")
    assert isinstance(forced["train"], MaterializedDataset)
