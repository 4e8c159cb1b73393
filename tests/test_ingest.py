"""Ingest: local and S3 sources, readers with and without Ray, rejects, resume, subsets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rxray import storage
from rxray.cli import main
from rxray.config import ConfigError, IngestConfig, load_config
from rxray import layout
from rxray.data import select, shards
from rxray.data.ingest import ingest

SOURCE_PX = 24  # tiny sources, resized to OUT_PX: a non-integer ratio exercises area interpolation
OUT_PX = 16
TREATMENTS = ["EMPTY", "IFN-beta", "IFN-gamma", "drug-A"]


def channel_base(channel: int, site_number: int) -> int:
    """A value that names both the channel (40 apart) and the site (0..7), so order mix-ups show."""
    return 40 * channel + 8 + site_number % 8


def make_dataset(root, experiments=("HUVEC-1", "HUVEC-2"), wells=6, sites=2, seed=0):
    """An RxRx2-layout dataset by hand: metadata.csv + 6 PNGs per site; returns {site_id: (6, S, S) source}."""
    rng = np.random.default_rng(seed)
    rows, sources = [], {}
    number = 0
    for experiment in experiments:
        for well_index in range(wells):
            well = layout.well_name(2 + well_index // 4, 3 + well_index % 4)
            treatment = TREATMENTS[well_index % len(TREATMENTS)]
            for site in range(1, sites + 1):
                site_id = layout.make_site_id(experiment, 1, well, site)
                stack = np.stack([channel_base(c, number) + rng.integers(0, 4, (SOURCE_PX, SOURCE_PX))
                                  for c in range(6)]).astype(np.uint8)
                for c in range(6):
                    path = os.path.join(root, layout.image_path(experiment, 1, well, site, c + 1))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    cv2.imwrite(path, stack[c])
                rows.append(dict(site_id=site_id, well_id=layout.make_well_id(experiment, 1, well), cell_type="HUVEC",
                                 experiment=experiment, plate=1, well=well, site=site, treatment=treatment,
                                 treatment_conc=0.0 if treatment == "EMPTY" else 1.5))
                sources[site_id] = stack
                number += 1
    pd.DataFrame(rows, columns=layout.METADATA_COLUMNS).to_csv(os.path.join(root, "metadata.csv"), index=False)
    return sources


def expected_image(source: np.ndarray) -> np.ndarray:
    """What ingest must produce from a (6, S, S) source: each channel area-resized to OUT_PX."""
    return np.stack([cv2.resize(ch, (OUT_PX, OUT_PX), interpolation=cv2.INTER_AREA) for ch in source])


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory):
    """24 sites (2 experiments x 6 wells x 2 sites), 4 treatments; yields (root, sources)."""
    root = str(tmp_path_factory.mktemp("hand") / "dataset")
    return root, make_dataset(root)


def run_ingest(source, out, **values):
    cfg = load_config(IngestConfig, values={"source": source, "out": out, "size": OUT_PX, "shard_rows": 5, **values})
    return ingest(cfg)


def rows_by_site(out) -> dict[str, np.ndarray]:
    """{site_id: image} read back through Ray Data (the training path); fails on duplicate rows."""
    found = {}
    for batch in shards.read_shards(out, columns=["site_id", "image"]).iter_batches(batch_size=7,
                                                                                    batch_format="numpy"):
        for site_id, image in zip(batch["site_id"], batch["image"]):
            assert site_id not in found, f"duplicate row {site_id}"
            found[site_id] = image
    return found


def test_local_ingest_reads_back_with_ray_pyarrow_and_pandas(hand_dataset, ray_local, tmp_path):
    root, sources = hand_dataset
    out = str(tmp_path / "shards")
    summary = run_ingest(root, out)
    assert summary.status == "complete"
    assert [summary.counts[k] for k in ("selected", "written", "rejected", "shards")] == [24, 24, 0, 5]

    batch = next(iter(shards.read_shards(out, columns=["image"]).iter_torch_batches(batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 6, OUT_PX, OUT_PX) and str(batch["image"].dtype) == "torch.uint8"
    found = rows_by_site(out)
    assert sorted(found) == sorted(sources)
    for site_id, image in found.items():
        np.testing.assert_array_equal(image, expected_image(sources[site_id]))

    manifest = shards.shard_manifest(out)
    assert manifest["counts"]["written"] == 24 and manifest["image_shape"] == [6, OUT_PX, OUT_PX]
    everything = np.stack([expected_image(s) for s in sources.values()]).astype(np.float64)
    mean, std = shards.channel_stats(out)
    np.testing.assert_allclose(mean, everything.mean(axis=(0, 2, 3)), atol=1e-3)
    np.testing.assert_allclose(std, everything.std(axis=(0, 2, 3)), atol=1e-3)
    assert pd.read_csv(os.path.join(out, shards.REJECTS_FILE)).empty

    # Plain pyarrow and pandas, in a fresh interpreter that never imports Ray.
    check = f"""
import sys, numpy as np, pandas as pd, pyarrow.parquet as pq
from rxray.data.shards import images_from_table
table = pq.read_table({out!r})
images = images_from_table(table)
assert images.shape == (24, 6, {OUT_PX}, {OUT_PX}) and images.dtype == np.uint8, images.shape
frame = pd.read_parquet({out!r})
stacked = np.stack(frame["image"].to_numpy()).reshape(-1, 6, {OUT_PX}, {OUT_PX})
assert (stacked == images).all() and list(frame["site_id"]) == table.column("site_id").to_pylist()
assert "ray" not in sys.modules, "reading shards imported ray"
np.save({str(tmp_path / "plain.npy")!r}, images)
print(",".join(frame["site_id"]))
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plain = np.load(tmp_path / "plain.npy")
    for site_id, image in zip(result.stdout.strip().split(","), plain):
        np.testing.assert_array_equal(image, expected_image(sources[site_id]))
        for c in range(6):  # channel c holds its planted constant (+ noise < 4) after resizing
            assert 40 * c + 8 <= image[c].min() and image[c].max() < 40 * c + 19

    again = run_ingest(root, out)
    assert again.status == "already complete" and again.counts["written"] == 24


def test_ingest_from_and_to_s3_that_fails_a_tenth_of_its_requests(hand_dataset, ray_local, s3_bucket, s3_proxy):
    root, sources = hand_dataset
    fs, bucket_path = storage.filesystem(s3_bucket)
    fs.put(root, f"{bucket_path}/dataset", recursive=True)
    source, out = f"{s3_bucket}/dataset", f"{s3_bucket}/shards"
    storage.write_text(f"{s3_bucket}/moa.csv", "treatment,moa\nIFN-beta,cytokine\nIFN-gamma,cytokine\n")
    with s3_proxy.flaky(failure_rate=0.1, delay_rate=0.1) as faults:
        summary = run_ingest(source, out, treatments=["IFN-beta"], balance=3, labels=f"{s3_bucket}/moa.csv")
    assert faults["503"] + faults["500"] + faults["reset"] > 0, faults  # the store really failed requests
    assert faults["applied-reset"] and faults["truncated"], faults  # and some that half happened
    # every failure retried, none a reject: the same rows and pixels as from a store that never fails
    assert (summary.counts["written"], summary.counts["rejected"]) == (6, 0)  # 3 IFN-beta + 3 EMPTY controls
    rows = shards.read_shards(out).to_pandas()
    assert rows["site_id"].is_unique
    for site_id, image in zip(rows["site_id"], rows["image"]):
        np.testing.assert_array_equal(np.asarray(image), expected_image(sources[site_id]))
    assert rows["treatment"].value_counts().to_dict() == {"IFN-beta": 3, "EMPTY": 3}
    assert (rows.loc[rows.treatment == "IFN-beta", "moa"] == "cytokine").all()
    assert rows.loc[rows.treatment == "EMPTY", "moa"].isna().all()  # no label row: null, not dropped
    assert storage.exists(f"{out}/_manifest.json") and storage.exists(f"{out}/{shards.REJECTS_FILE}")
    with pytest.raises(ConfigError, match="ingest.out"):  # another selection into the same output
        run_ingest(source, out, treatments=["IFN-gamma"], balance=3, labels=f"{s3_bucket}/moa.csv")


def break_files(root):
    """Damage a copy of the dataset in every way ingest must survive; returns {site_id: reason fragment}."""
    meta = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str, keep_default_na=False)
    sites = meta["site_id"].tolist()

    def png(site_id, channel):
        row = meta.set_index("site_id").loc[site_id]
        return os.path.join(root, layout.image_path(row.experiment, int(row.plate), row.well, int(row.site), channel))

    with open(png(sites[0], 3), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n this is not image data")
    data = open(png(sites[1], 5), "rb").read()
    with open(png(sites[1], 5), "wb") as handle:
        handle.write(data[: len(data) // 2])
    os.remove(png(sites[2], 6))
    cv2.imwrite(png(sites[3], 2), np.zeros((SOURCE_PX, SOURCE_PX, 3), np.uint8))        # colour
    cv2.imwrite(png(sites[4], 4), np.zeros((SOURCE_PX // 2, SOURCE_PX), np.uint8))      # wrong size
    cv2.imwrite(png(sites[5], 1), np.zeros((SOURCE_PX, SOURCE_PX), np.uint16))          # 16-bit
    extra = meta.iloc[[6, 7, 8, 9, 6]].copy()
    extra.iloc[0, meta.columns.get_loc("plate")] = "one"
    extra.iloc[1, meta.columns.get_loc("well")] = "ZZ99"
    extra.iloc[2, meta.columns.get_loc("experiment")] = ".."
    extra.iloc[3, meta.columns.get_loc("treatment")] = ""
    extra.iloc[:4, meta.columns.get_loc("site_id")] = [f"bad-{i}" for i in range(4)]  # the last row repeats row 6
    pd.concat([meta, extra]).to_csv(os.path.join(root, "metadata.csv"), index=False)
    return {sites[0]: "cannot decode", sites[1]: "cannot decode", sites[2]: "missing file",
            sites[3]: "not single-channel", sites[4]: "differs from w1", sites[5]: "not 8-bit",
            "bad-0": "plate 'one'", "bad-1": "well 'ZZ99'", "bad-2": "escape the dataset root",
            "bad-3": "missing treatment"}


def test_bad_files_and_rows_become_rejects(hand_dataset, ray_local, tmp_path, capsys):
    root = str(tmp_path / "dataset")
    shutil.copytree(hand_dataset[0], root)
    broken = break_files(root)
    out = str(tmp_path / "shards")

    code = main(["ingest", "--source", root, "--out", out, "--size", str(OUT_PX), "--shard-rows", "5"])
    assert code == 1  # 11 of 29 rejected is far over the default 1%
    assert "rxray: failed: 11 of 29 selected sites rejected" in capsys.readouterr().err
    assert not storage.exists(os.path.join(out, "_manifest.json"))

    summary = run_ingest(root, out, max_reject_frac=0.5)  # resumes: every shard is already done
    assert summary.counts["shards_resumed"] == summary.counts["shards"]
    assert (summary.counts["selected"], summary.counts["written"], summary.counts["rejected"]) == (29, 18, 11)
    rejects = pd.read_csv(os.path.join(out, shards.REJECTS_FILE), keep_default_na=False)
    assert len(rejects) == 11 and set(rejects.columns) == {"site_id", "path", "reason"}
    by_site = rejects.groupby("site_id")["reason"].apply(list).to_dict()
    for site_id, fragment in broken.items():
        assert any(fragment in reason for reason in by_site[site_id]), (site_id, by_site.get(site_id))
    duplicate = rejects[rejects["reason"].str.contains("duplicate site_id")]
    assert len(duplicate) == 1 and duplicate["path"].iloc[0].startswith("metadata.csv:")
    assert rejects.loc[rejects.site_id == list(broken)[2], "path"].iloc[0].endswith("_w6.png")
    found = rows_by_site(out)
    assert len(found) == 18 and not set(found) & set(broken)


def test_killed_run_resumes_to_the_same_rows(hand_dataset, ray_local, tmp_path):
    root = str(tmp_path / "dataset")
    shutil.copytree(hand_dataset[0], root)
    meta = pd.read_csv(os.path.join(root, "metadata.csv")).sort_values("site_id")
    stuck = meta.iloc[len(meta) // 2]
    stuck_png = os.path.join(root, layout.image_path(stuck.experiment, stuck.plate, stuck.well, stuck.site, 2))
    real_bytes = open(stuck_png, "rb").read()
    os.remove(stuck_png)
    os.mkfifo(stuck_png)  # reading it blocks: the run is guaranteed to be mid-way when killed

    out = str(tmp_path / "killed")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "rxray.cli", "ingest", "--source", root, "--out", out,
               "--size", str(OUT_PX), "--shard-rows", "3"]
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        records = os.path.join(out, shards.SHARD_RECORDS_DIR)
        deadline = time.monotonic() + 90
        while not (os.path.isdir(records) and any(n.endswith(".json") for n in os.listdir(records))):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finished = [n for n in os.listdir(records) if n.endswith(".json")]
    assert 1 <= len(finished) < 8 and not storage.exists(os.path.join(out, "_manifest.json"))

    os.remove(stuck_png)
    with open(stuck_png, "wb") as handle:
        handle.write(real_bytes)
    resumed = run_ingest(root, out, shard_rows=3)
    # >=: an actor of the killed run may still finish a shard before Ray reaps it (same bytes, atomic).
    assert resumed.counts["shards_resumed"] >= len(finished) and resumed.counts["written"] == 24
    reference = str(tmp_path / "reference")
    run_ingest(root, reference, shard_rows=3)
    got, want = rows_by_site(out), rows_by_site(reference)
    assert sorted(got) == sorted(want) and len(got) == 24
    for site_id in want:
        np.testing.assert_array_equal(got[site_id], want[site_id])
    parts = sorted(n for n in os.listdir(reference) if n.endswith(".parquet"))
    assert sorted(n for n in os.listdir(out) if n.endswith(".parquet")) == parts
    for part in parts:  # the same sites in the same shard, in the same order
        assert pq.read_table(os.path.join(out, part), columns=["site_id"]).equals(
            pq.read_table(os.path.join(reference, part), columns=["site_id"]))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    manifest, reference_manifest = shards.shard_manifest(out), shards.shard_manifest(reference)
    assert manifest["counts"]["written"] == reference_manifest["counts"]["written"] == 24
    assert manifest["channel_mean"] == reference_manifest["channel_mean"]


def metadata_frame(counts: dict[str, int]) -> pd.DataFrame:
    """String metadata with ``counts[treatment]`` sites per treatment, in shuffled order."""
    rows = []
    for t_index, (treatment, n) in enumerate(counts.items()):
        for i in range(n):
            well = layout.well_name(t_index, i // 4)
            rows.append(dict(site_id=layout.make_site_id("HUVEC-1", 1, well, i % 4 + 1), treatment=treatment))
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)
    return frame


def test_balanced_selection_is_equal_and_deterministic():
    frame = metadata_frame({"EMPTY": 40, "IFN-alpha-A": 9, "IFN-beta": 25, "IFN-gamma": 12, "IFN-omega": 30,
                            "drug-A": 50})
    wanted = select.resolve_treatments(None, "interferons", ["EMPTY"], frame["treatment"])
    picked = select.select_sites(frame, wanted, balance=10, seed=1)
    counts = picked["treatment"].value_counts().to_dict()
    assert counts == {"EMPTY": 10, "IFN-beta": 10, "IFN-gamma": 10, "IFN-omega": 10, "IFN-alpha-A": 9}
    again = select.select_sites(frame.sample(frac=1.0, random_state=9), wanted, balance=10, seed=1)
    assert picked["site_id"].tolist() == again["site_id"].tolist()  # same seed, any row order: same sites
    assert picked["site_id"].is_monotonic_increasing
    other = select.select_sites(frame, wanted, balance=10, seed=2)
    assert other["site_id"].tolist() != picked["site_id"].tolist()
    # A class's sample does not depend on which other classes are selected.
    only_beta = select.select_sites(frame, ["IFN-beta"], balance=10, seed=1)
    assert set(only_beta["site_id"]) == set(picked.loc[picked.treatment == "IFN-beta", "site_id"])

    with pytest.raises(ConfigError, match="ingest.treatments.*not-a-drug"):
        select.resolve_treatments(["IFN-beta", "not-a-drug"], None, ["EMPTY"], frame["treatment"])
    with pytest.raises(ConfigError, match="ingest.treatments"):
        select.resolve_treatments([], None, ["EMPTY"], frame["treatment"])


def test_synthetic_interferons_balanced_with_moa_labels(tiny_dataset, ray_local, tmp_path):
    metadata = pd.read_csv(os.path.join(tiny_dataset, "metadata.csv"))
    classes = layout.TREATMENT_GROUPS["interferons"] + ["EMPTY"]
    available = metadata["treatment"].value_counts()
    per_class = 3
    out = str(tmp_path / "interferons")
    summary = run_ingest(tiny_dataset, out, group="interferons", balance=per_class, seed=4,
                         labels=os.path.join(tiny_dataset, "moa.csv"))
    expected = {name: min(per_class, int(available[name])) for name in classes}
    assert summary.counts["written"] == sum(expected.values()) and summary.counts["rejected"] == 0
    table = pq.read_table(out, columns=["site_id", "treatment", "moa"]).to_pandas()
    assert table["treatment"].value_counts().to_dict() == expected
    assert table["moa"].notna().all() and table["site_id"].is_unique
    manifest = shards.shard_manifest(out)
    assert manifest["label_columns"] == ["moa"] and manifest["selected_per_class"] == expected
    assert len(manifest["channel_mean"]) == 6 and all(s > 0 for s in manifest["channel_std"])
    again = select.select_sites(select.read_metadata(tiny_dataset), classes, per_class, seed=4)
    assert sorted(again["site_id"]) == sorted(table["site_id"])  # the same seed picks the same sites


def test_config_errors_are_one_line_exit_2(hand_dataset, tmp_path, capsys):
    root, _ = hand_dataset
    # The hand-made dataset lacks two of the four interferons.
    assert main(["ingest", "--source", root, "--out", str(tmp_path / "g"), "--group", "interferons"]) == 2
    assert main(["ingest", "--source", root, "--out", str(tmp_path / "t"), "--treatments", "IFN-beta,nope"]) == 2
    assert main(["ingest", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n")]) == 2
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("compound,moa\nIFN-beta,cytokine\n")
    assert main(["ingest", "--source", root, "--out", str(tmp_path / "l"), "--labels", str(bad_labels)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rxray: error:")]
    assert [e.split(":")[2].strip() for e in errors] == ["ingest.group", "ingest.treatments", "ingest.source",
                                                          "ingest.labels"]
