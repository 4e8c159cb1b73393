"""The synthetic RxRx2 generator: exact layout, determinism, planted biology, S3."""

from __future__ import annotations

import io
import json
import os
import re

import cv2
import numpy as np
import pandas as pd
import pytest

from rxray import storage
from rxray.config import ConfigError, SynthConfig, load_config
from rxray import layout
from rxray.data import cells
from rxray.data.synth import MOA_FILE, TRUTH_FILE, metadata_csv, synthesize
from rxray.results import SynthResult
from rxray.data.synth_design import (INTERFERON_EFFECTS, INTERFERON_MOA, INTERFERON_STRENGTH, MOA_EFFECTS,
                                     RARE_MOA, build_sites, build_treatments)

SITE_ID = re.compile(r"^HUVEC-\d+_\d+_(A[A-F]|[A-Z])\d{2}_\d+$")
WELL_ID = re.compile(r"^HUVEC-\d+_\d+_(A[A-F]|[A-Z])\d{2}$")
SMALL = dict(experiments=2, plates=2, wells=14, controls=4, sites=2, size=32, treatments=8, seed=3)


def _synth(out: str, **values) -> SynthResult:
    return synthesize(load_config(SynthConfig, values=dict(out=out, **values)))


def _read_csv(uri: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"site_id": str})


def _site_means(root: str, meta: pd.DataFrame) -> np.ndarray:
    """Mean grey level of every stain of every site, (sites, 6)."""
    return np.array([[cv2.imread(os.path.join(root, path), cv2.IMREAD_UNCHANGED).mean()
                      for path in layout.site_image_paths(r.experiment, r.plate, r.well, r.site)]
                     for r in meta.itertuples()])


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, ray_local):
    """2 experiments x 2 plates of 32 px sites, rendered in chunks of 5 sites."""
    out = str(tmp_path_factory.mktemp("synth") / "small")
    summary = _synth(out, chunk_sites=5, **SMALL)
    return out, summary


def test_layout_is_exact(small_dataset):
    root, summary = small_dataset
    meta = pd.read_csv(os.path.join(root, layout.METADATA_FILE), keep_default_na=False)
    assert list(meta.columns) == layout.METADATA_COLUMNS
    assert len(meta) == summary.counts["sites"] == 2 * 2 * 14 * 2
    for r in meta.itertuples():
        assert r.site_id == layout.make_site_id(r.experiment, r.plate, r.well, r.site) and SITE_ID.match(r.site_id)
        assert r.well_id == layout.make_well_id(r.experiment, r.plate, r.well) and WELL_ID.match(r.well_id)
        layout.parse_well(r.well)
        assert (r.treatment_conc == "") == (r.treatment == layout.CONTROL)
    assert meta["site_id"].is_unique
    assert sorted(meta["experiment"].unique()) == ["HUVEC-1", "HUVEC-2"]
    assert set(meta["cell_type"]) == {"HUVEC"} and sorted(meta["plate"].unique()) == [1, 2]
    wells = meta.drop_duplicates("well_id")
    assert (wells[wells["treatment"] == layout.CONTROL].groupby(["experiment", "plate"]).size() == 4).all()
    assert set(layout.TREATMENT_GROUPS["interferons"]) <= set(meta["treatment"])

    # Every PNG parses back to a metadata row; every row has exactly w1..w6.
    images = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
              for d, _, files in os.walk(os.path.join(root, "images")) for f in files]
    keys = [layout.parse_image_path(p) for p in images]
    rows = set(zip(meta["experiment"], meta["plate"], meta["well"], meta["site"]))
    assert {(k.experiment, k.plate, k.well, k.site) for k in keys} == rows
    assert len(images) == 6 * len(meta) == summary.counts["images"]
    assert {k.channel for k in keys} == set(range(1, 7))
    for path in images[:12]:
        png = cv2.imread(os.path.join(root, path), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and png.shape == (32, 32)

    embeddings = pd.read_csv(os.path.join(root, layout.EMBEDDINGS_FILE))
    assert list(embeddings.columns) == ["site_id"] + [f"feature_{i}" for i in range(layout.EMBEDDING_DIM)]
    assert embeddings["site_id"].tolist() == meta["site_id"].tolist()
    assert np.isfinite(embeddings.iloc[:, 1:].to_numpy()).all()

    moa = pd.read_csv(os.path.join(root, MOA_FILE))
    assert list(moa.columns) == ["treatment", "moa"] and moa["treatment"].is_unique
    truth = json.load(open(os.path.join(root, TRUTH_FILE)))
    assert set(meta["treatment"]) - set(truth["unannotated"]) == set(moa["treatment"]) and RARE_MOA in set(moa["moa"])
    assert set(truth["treatments"]) == set(meta["treatment"]) - {layout.CONTROL}
    assert os.path.exists(os.path.join(root, "_manifest.json"))

    # Same-MoA treatments with a phenotype (interferons too) share their mechanism's component; nulls have none.
    by_moa: dict[str, set] = {}
    for planted in truth["treatments"].values():
        if planted["null"]:
            assert planted["moa_kind"] == "none" and planted["moa_channel"] is planted["leading_channel"] is None
            continue
        kind, direction = MOA_EFFECTS[planted["moa"]]
        assert planted["moa_kind"] == kind and np.sign(planted["moa_top_strength"]) == direction
        assert planted["moa_channel"] == cells.effect_channel(planted["moa_kind"]) + 1
        own_leading = abs(planted["own_parts"][0][1]) if planted["own_parts"] else 1.0  # interferons: one kind
        mechanism_leads = abs(planted["moa_top_strength"]) > own_leading * abs(planted["top_strength"])
        assert planted["leading_channel"] == (planted["moa_channel"] if mechanism_leads else planted["channel"])
        by_moa.setdefault(planted["moa"], set()).add(planted["moa_kind"])
    assert all(len(kinds) == 1 for kinds in by_moa.values()), by_moa
    assert any(sum(p["moa"] == moa and not p["null"] for p in truth["treatments"].values()) >= 2 for moa in by_moa)


def test_deterministic_for_a_seed_whatever_the_chunking(small_dataset, tmp_path):
    root, _ = small_dataset
    again = str(tmp_path / "again")
    _synth(again, chunk_sites=64, **SMALL)  # 8 chunks of 14 sites instead of 23 of 5
    for name in (layout.METADATA_FILE, layout.EMBEDDINGS_FILE, MOA_FILE, TRUTH_FILE):
        assert open(os.path.join(root, name), "rb").read() == open(os.path.join(again, name), "rb").read(), name
    meta = pd.read_csv(os.path.join(root, layout.METADATA_FILE))
    for r in meta.iloc[::9].itertuples():
        for path in layout.site_image_paths(r.experiment, r.plate, r.well, r.site):
            assert open(os.path.join(root, path), "rb").read() == open(os.path.join(again, path), "rb").read()

    other = str(tmp_path / "other")
    _synth(other, **{**SMALL, "seed": 4})
    metadata = [open(os.path.join(d, layout.METADATA_FILE)).read() for d in (root, other)]
    assert metadata[0] != metadata[1]


def test_planted_effects_are_measurable(tmp_path, ray_local):
    """Well means away from the plate rim: interferons at top dose vs EMPTY, and a planted null.

    Every interferon moves its mechanism's stain (actin) most and its own stain as well.
    """
    root = str(tmp_path / "effects")
    _synth(root, experiments=1, plates=1, wells=96, controls=24, sites=2, size=40, treatments=6, doses=2, seed=11)
    meta = pd.read_csv(os.path.join(root, layout.METADATA_FILE))
    truth = json.load(open(os.path.join(root, TRUTH_FILE)))["treatments"]
    stains = [f"w{c}" for c in range(1, 7)]
    sites = pd.concat([meta, pd.DataFrame(_site_means(root, meta), columns=stains)], axis=1)
    sites = sites[~sites["well"].map(layout.is_edge_well)]  # rim wells carry the edge batch effect
    wells = sites.groupby("well_id").agg({**{c: "mean" for c in stains}, "treatment": "first",
                                          "treatment_conc": "first"})
    empty = wells.loc[wells["treatment"] == layout.CONTROL, stains].to_numpy()

    def shift(name: str, conc: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-stain ratio to EMPTY of the same plate, and Welch t over wells (sites of a well are not independent)."""
        treated = wells.loc[(wells["treatment"] == name) & (wells["treatment_conc"] == conc), stains].to_numpy()
        se = np.sqrt(treated.var(0, ddof=1) / len(treated) + empty.var(0, ddof=1) / len(empty))
        return treated.mean(0) / empty.mean(0), (treated.mean(0) - empty.mean(0)) / se

    channels = set()
    for name in layout.TREATMENT_GROUPS["interferons"]:
        planted = truth[name]
        shared, own = planted["moa_channel"] - 1, planted["channel_index"]
        channels.add(own)
        ratio, t = shift(name, max(planted["concentrations"]))
        assert ratio[shared] > 1.25 and t[shared] > 4, (name, ratio, t)
        assert np.argmax(np.abs(np.log(ratio))) == shared, (name, ratio)  # the mechanism's stain moves most
        assert abs(np.log(ratio[own])) > 0.05 and abs(t[own]) > 3, (name, ratio, t)  # and its own stain
        low_ratio, _ = shift(name, min(planted["concentrations"]))
        assert 1 < low_ratio[shared] < ratio[shared], (name, low_ratio, ratio)  # grows with dose
    assert len(channels) == 4  # each interferon has a stain of its own besides the shared one

    nulls = [name for name, planted in truth.items() if planted["null"]]
    assert nulls
    for name in nulls:
        ratio, t = shift(name, max(truth[name]["concentrations"]))
        assert np.all(np.abs(ratio - 1) < 0.15) and np.all(np.abs(t) < 5), (name, ratio, t)


@pytest.mark.parametrize("kind", sorted(set(cells.EFFECTS) - {"cell_count"}))
def test_each_effect_kind_moves_its_own_stain_most(kind):
    """Same cells with and without the effect (paired renders): the primary stain changes most."""
    base, acq = cells.Morphology(), cells.Acquisition()
    treated = cells.with_effect(base, kind, 1.0)
    before = np.mean([cells.render_site(np.random.default_rng(i), base, acq, 64).mean((1, 2)) for i in range(6)], 0)
    after = np.mean([cells.render_site(np.random.default_rng(i), treated, acq, 64).mean((1, 2)) for i in range(6)], 0)
    change = np.abs(np.log(after / before))
    assert np.argmax(change) == cells.effect_channel(kind) and change.max() > 0.1, change


def test_default_plan_gives_each_mechanism_a_shared_component_of_its_own():
    """No rendering: every treatment with a phenotype carries its mechanism's component, interferons included."""
    treatments = build_treatments(SynthConfig(out="x"))
    assert len(treatments) == 24
    ifn_kind, ifn_direction = MOA_EFFECTS[INTERFERON_MOA]
    for t in treatments[:4]:
        assert (t.kind, t.top_strength, t.moa_kind) == (INTERFERON_EFFECTS[t.name], INTERFERON_STRENGTH, ifn_kind)
        shared = ifn_direction * 1.0 * INTERFERON_STRENGTH  # moa_share 1: as strong as its own
        assert t.effects(10.0) == [(ifn_kind, pytest.approx(shared)), (t.kind, pytest.approx(INTERFERON_STRENGTH))]
    compounds = treatments[4:]
    assert compounds[0].moa == RARE_MOA and not compounds[0].null
    active = [t for t in compounds if not t.null]
    groups = pd.Series([t.moa for t in active]).value_counts()
    assert (groups >= 3).sum() >= 5, groups  # five mechanisms of three or more active compounds
    for t in active:
        kind, direction = MOA_EFFECTS[t.moa]
        assert t.moa_kind == kind and t.moa_top_strength == pytest.approx(direction * 1.0 * abs(t.top_strength))
        (moa_kind, moa_s), *own = t.effects(t.concentrations[-1])
        assert moa_kind == kind and np.sign(moa_s) == direction
        # The individual phenotype: never the mechanism's kind, led by the listed kind, unit weights.
        assert kind not in [k for k, _ in own] and own[0][0] == t.kind and len(own) == 3
        assert np.sqrt(sum(w * w for _, w in t.own_parts)) == pytest.approx(1.0, abs=1e-4)
        assert np.sqrt(sum(s_ * s_ for _, s_ in own)) == pytest.approx(abs(t.top_strength), abs=1e-4)
    # The nulls are the last compounds, so the groups before them stay whole whatever the seed.
    nulls = [i for i, t in enumerate(compounds) if t.null]
    assert nulls == list(range(len(compounds) - len(nulls), len(compounds))) and len(nulls) == 3
    for t in compounds:
        if t.null:
            assert t.effects(t.concentrations[-1]) == [] and t.moa != RARE_MOA
    # One active compound is left out of moa.csv: from a mechanism that keeps three annotated members.
    (unannotated,) = [t for t in treatments if not t.annotated]
    assert not unannotated.null and groups[unannotated.moa] >= 4
    for seed in range(5):  # the same design on every draw; only which member goes unannotated moves
        draw = build_treatments(SynthConfig(out="x", seed=seed))
        assert [(t.name, t.moa, t.null) for t in draw] == [(t.name, t.moa, t.null) for t in treatments]
        assert sum(not t.annotated for t in draw) == 1
    assert [t.null for t in build_treatments(SynthConfig(out="x", moa_share=0.0))] == [t.null for t in treatments]


def test_compounds_past_the_named_ones_cycle_mechanisms_and_draw_their_own_kind():
    treatments = build_treatments(SynthConfig(out="x", treatments=80, null_fraction=0.0))
    generated = [t for t in treatments if t.name.startswith("cmpd-")]
    assert generated and {t.moa for t in generated} > {"ER stress", "HDAC inhibitor"}
    for t in generated:
        assert t.kind != MOA_EFFECTS[t.moa][0] and t.kind in cells.EFFECTS
    assert sum(t.moa == RARE_MOA for t in treatments) == 3  # one in RARE_EVERY = 30 of the 76 compounds


def test_mechanisms_that_differ_share_no_component():
    """Two mechanisms never carry the same component; the one shared kind goes opposite ways (actin)."""
    assert len(set(MOA_EFFECTS.values())) == len(MOA_EFFECTS)
    by_kind = pd.DataFrame([(moa, kind, d) for moa, (kind, d) in MOA_EFFECTS.items()], columns=["moa", "kind", "d"])
    for kind, group in by_kind.groupby("kind"):
        assert len(group) == 1 or (len(group) == 2 and group["d"].sum() == 0), group


def test_effects_compose_and_a_compound_moves_both_its_stains():
    base = cells.Morphology()
    twice = cells.with_effects(base, [("nuclear_size", 0.4), ("nuclear_size", 0.3)])
    assert twice.nucleus_radius == pytest.approx(cells.with_effect(base, "nuclear_size", 0.7).nucleus_radius)
    assert cells.with_effects(base, []) == base
    # Shared actin component (cytoskeleton) + individual nuclear size (nocodazole-like): both stains move.
    treated = cells.with_effects(base, [("actin_fibres", 0.6), ("nuclear_size", 1.0)])
    acq = cells.Acquisition()
    before = np.mean([cells.render_site(np.random.default_rng(i), base, acq, 64).mean((1, 2)) for i in range(4)], 0)
    after = np.mean([cells.render_site(np.random.default_rng(i), treated, acq, 64).mean((1, 2)) for i in range(4)], 0)
    change = np.abs(np.log(after / before))
    assert change[cells.ACTIN] > 0.1 and change[cells.NUCLEI] > 0.1, change


def test_write_and_read_back_on_s3(s3_bucket, ray_local):
    out = f"{s3_bucket}/rxrx2"
    summary = _synth(out, experiments=1, plates=1, wells=6, controls=2, sites=1, size=32, treatments=4, seed=5)
    meta = _read_csv(storage.join(out, layout.METADATA_FILE))
    assert list(meta.columns) == layout.METADATA_COLUMNS and len(meta) == summary.counts["sites"] == 6
    for r in meta.itertuples():
        for path in layout.site_image_paths(r.experiment, r.plate, r.well, r.site):
            assert storage.exists(storage.join(out, path))
    png = np.frombuffer(storage.read_bytes(storage.join(out, layout.image_path(
        meta.experiment[0], int(meta.plate[0]), meta.well[0], int(meta.site[0]), 3))), np.uint8)
    assert cv2.imdecode(png, cv2.IMREAD_UNCHANGED).shape == (32, 32)
    assert _read_csv(storage.join(out, layout.EMBEDDINGS_FILE)).shape == (6, 1 + layout.EMBEDDING_DIM)
    assert set(_read_csv(storage.join(out, MOA_FILE))["treatment"]) >= set(meta["treatment"])
    assert storage.exists(storage.join(out, TRUTH_FILE)) and storage.exists(storage.join(out, "_manifest.json"))


def test_shared_tiny_dataset_has_what_other_tests_rely_on(tiny_dataset):
    meta = pd.read_csv(os.path.join(tiny_dataset, layout.METADATA_FILE))
    truth = json.load(open(os.path.join(tiny_dataset, TRUTH_FILE)))["treatments"]
    assert {layout.CONTROL, *layout.TREATMENT_GROUPS["interferons"]} <= set(meta["treatment"])
    assert any(planted["null"] for planted in truth.values())


def test_rxrx2_preset_writes_the_real_screens_counts():
    """Checked on metadata.csv as synth writes it, without rendering an image."""
    cfg = load_config(SynthConfig, values=dict(out="x", preset="rxrx2", size=32))
    meta = pd.read_csv(io.StringIO(metadata_csv(build_sites(cfg, build_treatments(cfg)))), dtype={"site_id": str})
    treated = meta[meta["treatment"] != layout.CONTROL]
    assert len(meta) == 131_953 and meta["site_id"].is_unique
    assert meta["treatment"].nunique() == 434 and treated["treatment"].nunique() == 433
    assert (treated.groupby("treatment").size() == 288).all()
    assert (treated.groupby("treatment")["treatment_conc"].nunique() > 1).all()
    assert (meta["treatment"] == layout.CONTROL).sum() == 7_249
    assert meta.groupby(["experiment", "plate"]).ngroups == 24
    assert (meta.groupby(["experiment", "plate"])["well"].nunique() == 1_380).all()
    assert not meta["well"].map(layout.is_edge_well).any()  # the 1,380 are the wells inside the outer ring
    assert meta.groupby("well_id")["site"].nunique().between(3, 4).all()  # a missing site never empties a well
    # An explicit value beats the preset's; the rest of the preset stays.
    small = load_config(SynthConfig, values=dict(out="x", preset="rxrx2", plates=1, wells=500, missing_sites=0))
    assert (small.experiments, small.plates, small.wells, small.treatments) == (2, 1, 500, 433)


def test_without_rim_wells_every_well_sits_inside_the_outer_ring():
    """RxRx2 (like RxRx1: 308 of 384) leaves the plate's outer ring empty: 1,380 of 1,536 wells. The built-in
    screens use the ring (the default) so that the positional correction is exercised."""
    values = dict(out="x", experiments=1, plates=4, wells=600, controls=8, treatments=24)
    inner_cfg, rim_cfg = (load_config(SynthConfig, values={**values, "rim_wells": rim}) for rim in (False, True))
    inner = build_sites(inner_cfg, build_treatments(inner_cfg))
    assert not any(layout.is_edge_well(site.well) for site in inner)
    rim = build_sites(rim_cfg, build_treatments(rim_cfg))
    assert sum(layout.is_edge_well(site.well) for site in rim) > 0  # 156 of 1,536 positions: ~60 of 600 wells


@pytest.mark.parametrize("values, field", [
    (dict(preset="rxrx3"), "synth.preset"),
    (dict(wells=1_381, rim_wells=False), "synth.wells"),
    (dict(missing_sites=9, experiments=1, plates=1, wells=6, controls=2, treatments=2), "synth.missing_sites"),
    (dict(experiments=1, plates=1, wells=6, controls=2, treatments=5), "synth.treatments"),
    (dict(cell_type="HU_VEC"), "synth.cell_type"),
    (dict(seed=-1), "synth.seed"),
])
def test_bad_synth_config_names_the_field(values, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(SynthConfig, values=dict(out="x", **values))
