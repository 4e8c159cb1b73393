"""CellProfiler-style site profiles: segmentation against the generator's truth, cp_measure features under
CellProfiler's names, fixed columns, empty and saturated sites, and pycytominer / copairs reading the rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from rxray.data import cells as generator
from rxray.features import truth
from rxray.features.benchmark import benchmark_sites
from rxray.features.measure import OBJECT_NAMES, STAIN_NAMES, measure_objects, pair_feature_name, stain_feature_name
from rxray.features.profile import (COUNT_FEATURE, NO_CELLS_FLAG, feature_names, measurements_for, profile_columns,
                                    site_profile)
from rxray.features.segment import identify_objects

from conftest import shard_row

SIZE = 64
# Measured on seeds 0-19 (see rxray/features/truth.py): per-site count error at most 19% at 64 px and
# 256 px (23% at 128 px), all of it nuclei the generator draws on top of each other; Dice >= 0.949.
COUNT_TOLERANCE = 0.25
TOTAL_COUNT_TOLERANCE = 0.12
DICE_FLOOR = 0.93


@pytest.fixture(scope="module")
def control_profiles() -> list[dict[str, float]]:
    """Profiles of three generated control sites."""
    return [site_profile(truth.render(seed, SIZE)) for seed in range(3)]


@pytest.mark.parametrize("size", [64, 256])
def test_nucleus_counts_and_masks_match_the_generators_truth(size):
    checks = [truth.check_site(seed, size) for seed in range(5)]
    for check in checks:
        assert abs(check.count_error) <= COUNT_TOLERANCE, check
        assert check.dice >= DICE_FLOOR, check
    true_total = sum(c.true_count for c in checks)
    found_total = sum(c.found_count for c in checks)
    assert abs(found_total - true_total) <= TOTAL_COUNT_TOLERANCE * true_total


def test_true_labels_replay_the_generators_draw():
    drawn = truth.true_nuclei(0, SIZE)
    inside = (drawn["x"] >= 0) & (drawn["x"] < SIZE) & (drawn["y"] >= 0) & (drawn["y"] < SIZE)
    labels = truth.true_nucleus_labels(0, SIZE)
    assert set(np.unique(labels[labels > 0]) - 1) <= set(np.flatnonzero(inside))
    # The drawn nuclei are where the rendered DNA stain is bright.
    dna = truth.render(0, SIZE)[0]
    assert dna[labels > 0].mean() > 5 * dna[labels == 0].mean()


def test_cells_contain_their_nuclei_and_cytoplasm_is_the_rest():
    objects = identify_objects(truth.render(1, SIZE))
    assert objects.count > 10
    nucleus_pixels = objects.nuclei > 0
    assert np.array_equal(objects.cells[nucleus_pixels], objects.nuclei[nucleus_pixels])
    assert np.array_equal(objects.cytoplasm > 0, (objects.cells > 0) & ~nucleus_pixels)
    # Border nuclei are dropped, as CellProfiler does by default.
    edges = np.concatenate([objects.nuclei[0], objects.nuclei[-1], objects.nuclei[:, 0], objects.nuclei[:, -1]])
    assert not edges.any()


@pytest.mark.parametrize("site", [
    np.zeros((6, SIZE, SIZE), np.uint8),
    np.full((6, SIZE, SIZE), 255, np.uint8),
    generator.render_site(np.random.default_rng(0), generator.Morphology(cells_per_field=0.0),
                          generator.Acquisition(), SIZE),
], ids=["empty", "saturated", "camera-noise-only"])
def test_a_site_without_cells_is_a_row_that_says_so(site):
    objects = identify_objects(site)
    assert objects.count == 0 and not objects.cells.any() and not objects.cytoplasm.any()
    row = site_profile(site)
    assert list(row) == profile_columns(SIZE)
    assert row[NO_CELLS_FLAG] == 1.0 and row[COUNT_FEATURE] == 0.0
    assert all(math.isnan(row[name]) for name in feature_names(SIZE) if name != COUNT_FEATURE)


def test_hand_made_object_measures_as_computed_by_hand():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 8:20] = 1  # 10 x 12 px
    pixels = np.zeros((6, 40, 40))
    pixels[0][labels > 0] = 128 / 255
    pixels[1] = np.linspace(0.0, 1.0, 40 * 40).reshape(40, 40)
    features = measure_objects("Nuclei", labels, pixels)
    assert features["Nuclei_AreaShape_Area"] == pytest.approx([120])
    assert features["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx([128 / 255])
    assert features["Nuclei_Intensity_IntegratedIntensity_DNA"] == pytest.approx([120 * 128 / 255])
    assert features["Nuclei_Intensity_MeanIntensity_ER"] == pytest.approx([pixels[1][labels > 0].mean()])


def test_a_drawn_cell_profiles_to_its_hand_computed_area_and_intensity():
    site = np.zeros((6, SIZE, SIZE), np.uint8)
    nucleus, cell = disk((32, 30), 5), disk((32, 32), 14)
    site[1][cell] = site[2][cell] = 100
    site[0][nucleus] = 200
    row = site_profile(site, nucleus_diameter=10)
    nucleus_area = len(nucleus[0])
    cell_area = len(cell[0])
    assert row[NO_CELLS_FLAG] == 0.0 and row[COUNT_FEATURE] == 1.0
    assert row["Nuclei_AreaShape_Area"] == nucleus_area
    assert row["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(200 / 255)
    assert row["Cells_AreaShape_Area"] == cell_area
    assert row["Cytoplasm_AreaShape_Area"] == cell_area - nucleus_area
    assert row["Cytoplasm_Intensity_MeanIntensity_Actin"] == pytest.approx(100 / 255)


def test_feature_names_follow_cellprofiler():
    assert STAIN_NAMES == ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")
    assert stain_feature_name("Intensity_MeanIntensity", "DNA") == "Intensity_MeanIntensity_DNA"
    assert stain_feature_name("Granularity_1", "Mito") == "Granularity_1_Mito"
    assert stain_feature_name("RadialDistribution_FracAtD_1of4", "RNA") == "RadialDistribution_FracAtD_RNA_1of4"
    assert stain_feature_name("Contrast_3_00_16", "Actin", "Texture") == "Texture_Contrast_Actin_3_00_16"
    assert pair_feature_name("Correlation_Pearson", "ER", "Mito") == "Correlation_Correlation_ER_Mito"
    assert pair_feature_name("Correlation_Manders_2", "ER", "Mito") == "Correlation_Manders_Mito_ER"
    names = feature_names(SIZE)
    assert len(set(names)) == len(names)
    assert all(name.split("_")[0] in OBJECT_NAMES for name in names)
    for name in ("Nuclei_Intensity_MeanIntensity_DNA", "Cells_AreaShape_Area",
                 "Cytoplasm_Correlation_Correlation_ER_Mito", "Cells_Granularity_1_Mito",
                 "Cells_RadialDistribution_FracAtD_RNA_1of4", "Nuclei_Texture_Contrast_DNA_1_00_16",
                 "Cells_AreaShape_Zernike_0_0"):
        assert name in names
    assert not [name for name in names if "Location" in name or "Center" in name]


def test_every_site_gives_the_same_columns_in_the_same_order(control_profiles):
    columns = profile_columns(SIZE)
    for row in control_profiles:
        assert list(row) == columns
        assert row[NO_CELLS_FLAG] == 0.0 and row[COUNT_FEATURE] > 10
        assert all(isinstance(value, float) for value in row.values())
        # Cells measured, not left empty: every measurement gives finite medians.
        assert np.isfinite([row[name] for name in columns if "_Intensity_" in name]).all()


def _profile_table(measurements=None) -> pd.DataFrame:
    """Three control and three treated (enlarged nuclei) generated sites, with RxRx2-style metadata."""
    control, acquisition = truth.control_conditions()
    treated = generator.with_effect(control, "nuclear_size", 1.0)
    rows = [site_profile(generator.render_site(np.random.default_rng(seed), morph, acquisition, SIZE),
                         measurements=measurements)
            for morph in (control, treated) for seed in range(3)]
    table = pd.DataFrame(rows)
    table.insert(0, "Metadata_treatment", ["EMPTY"] * 3 + ["etoposide"] * 3)
    table.insert(0, "Metadata_site_id", [f"HUVEC-1_1_AA0{i}_1" for i in range(1, 7)])
    return table


def test_pycytominer_infers_every_feature_and_the_metadata(control_profiles):
    from pycytominer import feature_select
    from pycytominer.cyto_utils import infer_cp_features

    table = pd.DataFrame(control_profiles)
    table.insert(0, "Metadata_site_id", ["HUVEC-1_1_AA01_1", "HUVEC-1_1_AA01_2", "HUVEC-1_1_AA02_1"])
    assert infer_cp_features(table) == list(feature_names(SIZE))
    assert infer_cp_features(table, metadata=True) == ["Metadata_site_id", NO_CELLS_FLAG]
    selected = feature_select(table, features="infer", operation=["variance_threshold", "drop_na_columns"])
    assert 0 < len(infer_cp_features(selected)) < len(feature_names(SIZE))


def test_pycytominer_feature_selection_and_copairs_map_take_profiles_as_they_are():
    from copairs.map import average_precision
    from pycytominer import feature_select, normalize
    from pycytominer.cyto_utils import infer_cp_features

    # pycytominer's correlation_threshold walks every pair above 0.9 in Python: on 6 rows nearly all of
    # ~2,000 features' pairs (10 s), so this table holds size, shape, intensity and correlation only.
    lean = tuple(m for m in measurements_for(SIZE) if m.name in ("sizeshape", "intensity", "pearson"))
    table = _profile_table(lean)
    selected = feature_select(table, features="infer",
                              operation=["variance_threshold", "correlation_threshold", "drop_na_columns"])
    features = infer_cp_features(selected)
    assert 0 < len(features) < len(feature_names(SIZE, measurements=lean))
    assert not selected[features].isna().any().any()

    # Standardised, as profiles are before mAP: cosine similarity of raw features is areas' alone.
    normalized = normalize(selected, features="infer", method="standardize")
    meta = normalized[infer_cp_features(normalized, metadata=True)]
    scores = average_precision(meta, normalized[features].to_numpy(), pos_sameby=["Metadata_treatment"], pos_diffby=[],
                               neg_sameby=[], neg_diffby=["Metadata_treatment"], progress_bar=False)
    assert len(scores) == 6 and scores["average_precision"].between(0, 1).all()


def test_benchmark_reports_rates_and_measurement_costs():
    result = benchmark_sites(SIZE, n=1)
    assert result["sites_per_second"] > 0 and result["features"] == len(feature_names(SIZE))
    assert {"segment", "intensity", "texture"} <= set(result["seconds_per_measurement"])


@pytest.mark.slow
def test_the_features_step_writes_tables_that_score_pycytominer_and_copairs_read_as_they_are(tmp_path, write_shards,
                                                                                           monkeypatch):
    from copairs.map import average_precision
    from pycytominer import aggregate
    from pycytominer.cyto_utils import infer_cp_features

    from rxray.config import FeaturesConfig, load_config
    from rxray.evaluate.profiles import load_embeddings
    from rxray.features.step import features
    from rxray.layout import METADATA_COLUMNS

    # Two plates, each with two control wells and two wells of a brighter "treatment" (every stain x1.5), 2 sites each.
    rows, seed = [], 0
    for plate in (1, 2):
        for well, treatment in [("A01", "EMPTY"), ("A02", "EMPTY"), ("B01", "bright"), ("B02", "bright")]:
            for site in (1, 2):
                image = truth.render(seed, SIZE)
                seed += 1
                if treatment == "bright":
                    image = np.clip(image.astype(np.float64) * 1.5, 0, 255).astype(np.uint8)
                rows.append(shard_row("HUVEC-1", plate, well, site, treatment, None if treatment == "EMPTY" else 1.0,
                                      image))
    shards = write_shards(str(tmp_path / "shards"), rows, partitions=2)
    out = tmp_path / "features"
    cfg = load_config(FeaturesConfig, values=dict(data=shards, out=str(out), batch_size=4,
                                                  measurements=["sizeshape", "intensity", "pearson"]))
    result = features(cfg)

    assert result.counts["rows_in"] == result.counts["rows_out"] == len(rows)
    assert 0 < result.features_kept < result.features_measured
    sites = pd.read_parquet(out / "sites")
    assert [f"Metadata_{c}" for c in METADATA_COLUMNS] == infer_cp_features(sites, metadata=True)[:9]
    assert len(infer_cp_features(sites)) == result.features_measured
    assert "Cells_Intensity_MeanIntensity_DNA" in sites.columns and (sites["Cells_Count"] > 5).all()

    # What `rxray score` reads: the selected features, standardised on the sample (here every site).
    meta, X = load_embeddings(str(out))
    assert list(meta.columns) == METADATA_COLUMNS and X.shape == (len(rows), result.features_kept)
    assert np.allclose(np.nanmean(X, axis=0), 0, atol=1e-4)

    wells = pd.read_parquet(out / "wells").sort_values(["Metadata_plate", "Metadata_well"]).reset_index(drop=True)
    assert len(wells) == 8 and (wells["Metadata_n_sites"] == 2).all()
    profiles = pd.read_parquet(out / "profiles")
    by_hand = aggregate(profiles, strata=["Metadata_plate", "Metadata_well"], features="infer", operation="median")
    feature = infer_cp_features(wells)[0]
    assert np.allclose(wells[feature], by_hand.sort_values(["Metadata_plate", "Metadata_well"])[feature], atol=1e-5)
    ap = average_precision(wells[infer_cp_features(wells, metadata=True)], wells[infer_cp_features(wells)].to_numpy(),
                           pos_sameby=["Metadata_treatment"], pos_diffby=["Metadata_well"], neg_sameby=["Metadata_plate"],
                           neg_diffby=["Metadata_treatment"], progress_bar=False)
    # Above DRIVER_WELL_SITES sites Ray Data groups the wells instead: the same table.
    from rxray.features import step

    monkeypatch.setattr(step, "DRIVER_WELL_SITES", 0)
    step.write_well_medians(str(out / "profiles"), str(tmp_path / "wells-by-ray"), len(rows))
    by_ray = pd.read_parquet(tmp_path / "wells-by-ray").sort_values(["Metadata_plate", "Metadata_well"])
    pd.testing.assert_frame_equal(by_ray.reset_index(drop=True), wells, check_dtype=False)
    bright = ap[ap["Metadata_treatment"] == "bright"]["average_precision"]
    assert len(bright) == 4 and bright.mean() > 0.9  # x1.5 on every stain: its wells find each other first
