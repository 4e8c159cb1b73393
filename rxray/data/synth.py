"""`rxray synth`: a synthetic RxRx2 dataset in exactly the real layout, generated on Ray.

The driver builds the plan (treatments with hidden phenotypes, plate layouts, batch
effects) and the site list; Ray tasks render chunks of sites, write their PNGs
straight to storage and return only CSV text for ``embeddings.csv``. Every random
draw comes from a generator keyed by (seed, name), e.g. (seed, "site", site_id),
so the dataset is identical for a seed however it is chunked or scheduled.

Outputs under ``out``: ``images/...`` (w1..w6 PNGs), ``metadata.csv`` (the 9 real
columns), ``embeddings.csv`` (site_id + 128 features), ``moa.csv`` (treatment ->
mechanism, with one rare class), ``truth.json`` (the planted answers, never in the
metadata) and ``_manifest.json`` (written last: the dataset is complete).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import ray

from rxray import storage
from rxray.errors import StepFailed
from rxray.config import SynthConfig, config_to_dict
from rxray.data import cells, layout
from rxray.data.layout import MOA_FILE
from rxray.outputs import write_manifest
from rxray.runtime import Timer, ensure_ray

TRUTH_FILE = "truth.json"
CONTROL_MOA = "control"
RARE_MOA = "GPCR"
RARE_EVERY = 30  # one compound in 30 is a GPCR ligand: a few percent of sites, as in the MoA study
# Shot noise defeats LZ matching: Huffman-only level 1 is the fastest and smallest option measured.
PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
WRITE_THREADS = 6  # one site's six PNGs in flight at once: object-store PUTs are latency-bound

# Each interferon on a different stain, strongly, so channel attribution (Grad-CAM) can find it.
INTERFERON_EFFECTS = dict(zip(layout.TREATMENT_GROUPS["interferons"],
                              ["nuclear_size", "actin_fibres", "mito_clumping", "golgi"]))
INTERFERON_STRENGTH = 1.25
INTERFERON_TOP_CONC = 10.0
GPCR_LIGANDS = ["isoproterenol", "histamine", "carbachol", "clozapine", "haloperidol", "propranolol",
                "loratadine", "salbutamol", "sumatriptan", "losartan", "metoprolol", "risperidone",
                "olanzapine", "quetiapine", "ranitidine"]
GPCR_EFFECT = "actin_fibres"  # GPCR -> Rho signalling -> stress fibres
# Each mechanism's shared phenotype: every compound of a MoA carries this component (at
# SynthConfig.moa_share of its own strength) on top of its individual `kind`, as drugs with one
# mechanism share a morphological signature, so a treatment map has true relationships to find.
# Nine mechanisms share eight kinds: cytoskeleton and GPCR meet on actin, and proteasome inhibitors
# meet ER stressors on the ER, as they do in real screens. Interferons carry no shared component.
MOA_EFFECTS = {
    "DNA damage": "nuclear_size",  # arrest in G2 after DNA damage: enlarged nuclei
    "HDAC inhibitor": "nuclear_intensity",  # chromatin decondensation changes the Hoechst signal
    "kinase inhibitor": "cell_count",  # broad kinase inhibition stops proliferation
    "ER stress": "er_texture",  # unfolded-protein response: swollen, coarse ER
    "proteasome inhibitor": "er_texture",  # misfolded proteins back up in the ER (UPR)
    "transcription inhibitor": "nucleoli",  # RNA polymerase I/II block: nucleolar segregation
    "mitochondrial": "mito_clumping",  # depolarised mitochondria fragment and cluster by the nucleus
    "protein trafficking": "golgi",  # ER-Golgi transport block: Golgi disperses and swells
    "cytoskeleton": "actin_fibres",  # actin/tubulin drugs remodel stress fibres
    RARE_MOA: GPCR_EFFECT,
}
# (name, mechanism, individual phenotype kind) for the other compounds; past the list, names are
# cmpd-NNNN and mechanisms cycle. The first seven (the default dataset's compounds after one GPCR
# ligand) form mechanism groups on stains the interferons leave free: 3 ER stress, 2 HDAC, 2
# transcription; with seed 0 the two HDAC inhibitors are the planted nulls, an annotated pair with no
# phenotype to recover. Further on, some compounds' own kind differs from their mechanism's.
COMPOUNDS = [
    ("tunicamycin", "ER stress", "er_texture"), ("thapsigargin", "ER stress", "er_texture"),
    ("dithiothreitol", "ER stress", "er_texture"), ("vorinostat", "HDAC inhibitor", "nuclear_intensity"),
    ("trichostatin-A", "HDAC inhibitor", "nuclear_intensity"), ("actinomycin-D", "transcription inhibitor", "nucleoli"),
    ("CX-5461", "transcription inhibitor", "nucleoli"), ("dasatinib", "kinase inhibitor", "actin_fibres"),
    ("staurosporine", "kinase inhibitor", "cell_count"), ("etoposide", "DNA damage", "nuclear_size"),
    ("doxorubicin", "DNA damage", "nuclear_size"), ("camptothecin", "DNA damage", "nuclear_intensity"),
    ("rotenone", "mitochondrial", "mito_clumping"), ("FCCP", "mitochondrial", "mito_clumping"),
    ("oligomycin", "mitochondrial", "mito_clumping"), ("bortezomib", "proteasome inhibitor", "cell_count"),
    ("MG-132", "proteasome inhibitor", "cell_count"), ("brefeldin-A", "protein trafficking", "golgi"),
    ("monensin", "protein trafficking", "golgi"), ("panobinostat", "HDAC inhibitor", "nuclear_intensity"),
    ("BMH-21", "transcription inhibitor", "nucleoli"), ("cytochalasin-D", "cytoskeleton", "actin_fibres"),
    ("latrunculin-B", "cytoskeleton", "actin_fibres"), ("nocodazole", "cytoskeleton", "nuclear_size"),
    ("antimycin-A", "mitochondrial", "mito_clumping"), ("imatinib", "kinase inhibitor", "cell_count"),
    ("golgicide-A", "protein trafficking", "golgi"), ("jasplakinolide", "cytoskeleton", "actin_fibres"),
    ("exo1", "protein trafficking", "golgi"),
]

# Batch effects at batch_effects=1 (log-normal sd of gains, sd of offsets in grey levels): visible
# and plate-structured, yet below the interferons' planted effects (exp(0.35..0.6) at the top dose).
EXPERIMENT_GAIN_SD, PLATE_GAIN_SD, WELL_GAIN_SD = 0.12, 0.08, 0.04
EXPERIMENT_OFFSET_SD, PLATE_OFFSET_SD, BASE_OFFSET = 1.0, 0.7, 6.0
EXPERIMENT_DENSITY_SD, WELL_DENSITY_SD = 0.08, 0.08
EDGE_GAIN, EDGE_DENSITY = 1.25, 0.88  # evaporation at the plate rim: brighter stain, fewer cells


def stable_rng(seed: int, *keys: Any) -> np.random.Generator:
    """A generator determined by the seed and the keys alone (no Python hash randomisation)."""
    words = [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") for k in keys]
    return np.random.default_rng([seed, *words])


@dataclass(frozen=True)
class Treatment:
    """One non-control treatment and its hidden phenotype."""

    name: str
    moa: str
    kind: str  # a cells.EFFECTS kind: the treatment's individual phenotype
    top_strength: float  # signed strength at the top concentration; 0 for a planted null
    concentrations: tuple[float, ...]  # ascending
    moa_kind: str = "none"  # the mechanism's shared phenotype (MOA_EFFECTS); "none" for interferons, nulls
    moa_top_strength: float = 0.0  # its strength at the top concentration (always >= 0)

    @property
    def null(self) -> bool:
        """True if planted with no effect at all."""
        return self.top_strength == 0.0

    @property
    def strength_per_conc(self) -> float:
        """Effect strength per unit of treatment_conc (the effect grows linearly with dose)."""
        return self.top_strength / self.concentrations[-1]

    @property
    def moa_strength_per_conc(self) -> float:
        """Strength of the shared mechanism component per unit of treatment_conc."""
        return self.moa_top_strength / self.concentrations[-1]

    def effects(self, conc: float) -> list[tuple[str, float]]:
        """The (kind, strength) phenotype components at a concentration; none for a planted null."""
        if self.null:
            return []
        shared = [] if self.moa_kind == "none" else [(self.moa_kind, self.moa_strength_per_conc * conc)]
        return shared + [(self.kind, self.strength_per_conc * conc)]


def _dose_ladder(top: float, doses: int) -> tuple[float, ...]:
    """Concentrations halving down from the top dose, ascending."""
    return tuple(float(f"{top / 2 ** (doses - 1 - d):.6g}") for d in range(doses))


def build_treatments(cfg: SynthConfig) -> list[Treatment]:
    """The interferons first, then named compounds (one in RARE_EVERY a GPCR ligand); some planted null.

    A compound's phenotype is its mechanism's shared component (MOA_EFFECTS, strength
    cfg.moa_share x its own, always in the mechanism's direction) plus its individual
    kind, whose sign may be negative unless it is the mechanism's own kind.
    """
    rng = stable_rng(cfg.seed, "treatments")
    treatments = [Treatment(name, "interferon", INTERFERON_EFFECTS[name], INTERFERON_STRENGTH,
                            _dose_ladder(INTERFERON_TOP_CONC, cfg.doses))
                  for name in layout.TREATMENT_GROUPS["interferons"][:cfg.treatments]]
    others = []
    for i in range(cfg.treatments - len(treatments)):
        rare = i % RARE_EVERY == 0
        pool = [(n, RARE_MOA, GPCR_EFFECT) for n in GPCR_LIGANDS] if rare else COMPOUNDS
        j = i // RARE_EVERY if rare else i - i // RARE_EVERY - 1
        name = pool[j][0] if j < len(pool) else f"cmpd-{i + 1:04d}"
        _, moa, kind = pool[j % len(pool)]
        sign = 1.0 if rare or rng.random() < 0.7 else -1.0
        if kind == MOA_EFFECTS[moa]:
            sign = 1.0  # a phenotype on the mechanism's own kind goes the mechanism's way
        top = float(rng.choice([1.0, 3.0, 10.0]))
        strength = float(rng.uniform(0.3, 0.8))
        others.append(Treatment(name, moa, kind, sign * strength, _dose_ladder(top, cfg.doses),
                                MOA_EFFECTS[moa], cfg.moa_share * strength))
    # Nulls among the non-rare compounds only, so the rare class always has a phenotype to learn.
    candidates = [i for i, t in enumerate(others) if t.moa != RARE_MOA]
    n_null = min(len(candidates), math.ceil(cfg.null_fraction * len(others)))
    for i in rng.permutation(candidates)[:n_null]:
        others[i] = dataclasses.replace(others[i], top_strength=0.0, moa_kind="none", moa_top_strength=0.0)
    return treatments + others


@dataclass(frozen=True)
class Site:
    """One row of metadata.csv."""

    cell_type: str
    experiment: str
    plate: int
    well: str
    site: int
    treatment: str
    conc: float | None  # None for controls

    @property
    def well_id(self) -> str:
        """RxRx2 well id."""
        return layout.make_well_id(self.experiment, self.plate, self.well)

    @property
    def site_id(self) -> str:
        """RxRx2 site id."""
        return layout.make_site_id(self.experiment, self.plate, self.well, self.site)


def experiment_names(cfg: SynthConfig) -> list[str]:
    """HUVEC-1, HUVEC-2, ... as in RxRx2."""
    return [f"{cfg.cell_type}-{e + 1}" for e in range(cfg.experiments)]


def build_sites(cfg: SynthConfig, treatments: list[Treatment]) -> list[Site]:
    """Every site, in (experiment, plate, well, site) order.

    Wells sit at random positions of a 1536-well plate; treatment slots are dealt
    round-robin over all plates, each treatment's first well at its top dose, then
    down the dose ladder, so every plate mixes treatments and doses.
    """
    per_plate = cfg.wells - cfg.controls
    sites = []
    for e, experiment in enumerate(experiment_names(cfg)):
        for plate in range(1, cfg.plates + 1):
            rng = stable_rng(cfg.seed, "layout", experiment, plate)
            positions = rng.choice(len(layout.PLATE_ROWS) * layout.PLATE_COLUMNS, cfg.wells, replace=False)
            contents: list[tuple[str, float | None]] = [(layout.CONTROL, None)] * cfg.controls
            first_slot = (e * cfg.plates + plate - 1) * per_plate
            for slot in range(first_slot, first_slot + per_plate):
                treatment = treatments[slot % len(treatments)]
                dose = cfg.doses - 1 - (slot // len(treatments)) % cfg.doses
                contents.append((treatment.name, treatment.concentrations[dose]))
            shuffled = [contents[i] for i in rng.permutation(cfg.wells)]
            for position, (name, conc) in sorted(zip(positions.tolist(), shuffled)):
                well = layout.well_name(*divmod(position, layout.PLATE_COLUMNS))
                sites.extend(Site(cfg.cell_type, experiment, plate, well, site, name, conc)
                             for site in range(1, cfg.sites + 1))
    return sites


def batch_effects(cfg: SynthConfig) -> dict[str, Any]:
    """Per-experiment and per-plate gain, offset, illumination gradient; edge-well factors (JSON-ready)."""
    scale = cfg.batch_effects
    experiments, plates = {}, {}
    for experiment in experiment_names(cfg):
        rng = stable_rng(cfg.seed, "experiment", experiment)
        experiments[experiment] = dict(
            gain=np.exp(scale * rng.normal(0, EXPERIMENT_GAIN_SD, cells.N_STAINS)).round(4).tolist(),
            offset=(scale * rng.normal(0, EXPERIMENT_OFFSET_SD, cells.N_STAINS)).round(3).tolist(),
            vignetting=round(scale * float(rng.uniform(0.05, 0.2)), 4),
            cell_density=round(float(np.exp(scale * rng.normal(0, EXPERIMENT_DENSITY_SD))), 4))
        for plate in range(1, cfg.plates + 1):
            rng = stable_rng(cfg.seed, "plate", experiment, plate)
            plates[f"{experiment}/{plate}"] = dict(
                gain=np.exp(scale * rng.normal(0, PLATE_GAIN_SD, cells.N_STAINS)).round(4).tolist(),
                offset=(scale * rng.normal(0, PLATE_OFFSET_SD, cells.N_STAINS)).round(3).tolist(),
                gradient=round(scale * float(rng.uniform(0.05, 0.2)), 4),
                gradient_angle=round(float(rng.uniform(0, 2 * math.pi)), 4))
    edge = dict(gain=round(EDGE_GAIN ** scale, 4), cell_density=round(EDGE_DENSITY ** scale, 4))
    return dict(experiments=experiments, plates=plates, edge_wells=edge)


@dataclass(frozen=True)
class Plan:
    """Everything a chunk task needs besides its sites (small; shipped once via the object store)."""

    out: str
    size: int
    seed: int
    treatments: dict[str, Treatment]
    batch: dict[str, Any]


def _site_conditions(plan: Plan, site: Site) -> tuple[cells.Morphology, cells.Acquisition]:
    """The cells' morphology and the imaging conditions of one site."""
    experiment = plan.batch["experiments"][site.experiment]
    plate = plan.batch["plates"][f"{site.experiment}/{site.plate}"]
    edge = plan.batch["edge_wells"] if layout.is_edge_well(site.well) else dict(gain=1.0, cell_density=1.0)
    well_rng = stable_rng(plan.seed, "well", site.well_id)  # shared by the well's sites: near-duplicates
    well_density, well_gain = np.exp(well_rng.normal(0, [WELL_DENSITY_SD, WELL_GAIN_SD]))
    morph = cells.Morphology()
    morph = dataclasses.replace(morph, cells_per_field=morph.cells_per_field * experiment["cell_density"]
                                * edge["cell_density"] * well_density)
    treatment = plan.treatments.get(site.treatment)
    if treatment is not None:
        morph = cells.with_effects(morph, treatment.effects(site.conc))
    gain = np.asarray(experiment["gain"]) * np.asarray(plate["gain"]) * edge["gain"] * well_gain
    offset = np.maximum(BASE_OFFSET + np.asarray(experiment["offset"]) + np.asarray(plate["offset"]), 0.0)
    acq = cells.Acquisition(gain=tuple(gain.tolist()), offset=tuple(offset.tolist()), gradient=plate["gradient"],
                            gradient_angle=plate["gradient_angle"], vignetting=experiment["vignetting"])
    return morph, acq


@ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])
def _render_chunk(plan: Plan, sites: list[Site]) -> str:
    """Render and write the PNGs of some sites; return their embeddings.csv rows (never images)."""
    cv2.setNumThreads(1)  # one Ray CPU per task: no hidden thread pools competing for it
    rows, previous = [], []
    # Threads overlap the PUTs of one site with rendering the next; at most two sites are held.
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for site in sites:
            morph, acq = _site_conditions(plan, site)
            image = cells.render_site(stable_rng(plan.seed, "site", site.site_id), morph, acq, plan.size)
            paths = layout.site_image_paths(site.experiment, site.plate, site.well, site.site)
            current = [pool.submit(storage.write_bytes, storage.join(plan.out, path),
                                   cv2.imencode(".png", stain, PNG_OPTIONS)[1].tobytes())
                       for path, stain in zip(paths, image)]
            rows.append(site.site_id + "," + ",".join(f"{v:.6g}" for v in cells.embed_site(image)) + "\n")
            for write in previous:
                write.result()
            previous = current
        for write in previous:
            write.result()
    return "".join(rows)


def _metadata_csv(sites: list[Site]) -> str:
    """metadata.csv text: the 9 RxRx2 columns; controls have an empty treatment_conc."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(layout.METADATA_COLUMNS)
    for s in sites:
        conc = "" if s.conc is None else repr(float(s.conc))
        writer.writerow([s.site_id, s.well_id, s.cell_type, s.experiment, s.plate, s.well, s.site, s.treatment,
                         conc])
    return buffer.getvalue()


def _moa_csv(treatments: list[Treatment]) -> str:
    """moa.csv text: every treatment (controls included) and its mechanism class."""
    lines = ["treatment,moa", f"{layout.CONTROL},{CONTROL_MOA}"]
    lines += [f"{t.name},{t.moa}" for t in treatments]
    return "\n".join(lines) + "\n"


def _truth(cfg: SynthConfig, treatments: list[Treatment], batch: dict[str, Any]) -> dict[str, Any]:
    """The planted answers: each treatment's phenotype and channel, and the batch effects.

    ``kind``/``channel`` are the individual (dominant) phenotype and its stain;
    ``moa_kind``/``moa_channel`` the mechanism's shared component ("none"/None where absent).
    """
    table = {}
    for t in treatments:
        channel = None if t.null else cells.effect_channel(t.kind)
        moa_channel = None if t.moa_kind == "none" else cells.effect_channel(t.moa_kind) + 1
        table[t.name] = dict(kind="none" if t.null else t.kind, null=t.null, moa=t.moa,
                             channel_index=channel, channel=None if channel is None else channel + 1,
                             channel_name=None if channel is None else layout.CHANNEL_NAMES[channel],
                             strength_per_conc=round(t.strength_per_conc, 6), top_strength=round(t.top_strength, 6),
                             moa_kind=t.moa_kind, moa_channel=moa_channel,
                             moa_strength_per_conc=round(t.moa_strength_per_conc, 6),
                             moa_top_strength=round(t.moa_top_strength, 6),
                             concentrations=list(t.concentrations))
    return dict(seed=cfg.seed, controls=[layout.CONTROL], rare_moa=RARE_MOA,
                channels=[f"w{i + 1} {name} ({target})" for i, (name, target)
                          in enumerate(zip(layout.CHANNEL_NAMES, layout.CHANNEL_TARGETS))],
                treatments=table, batch=batch)


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Write a synthetic RxRx2 dataset to cfg.out; returns a summary of what was written."""
    timer = Timer()
    start = time.perf_counter()
    with timer.time("plan"):
        treatments = build_treatments(cfg)
        sites = build_sites(cfg, treatments)
        batch = batch_effects(cfg)
        plan = Plan(cfg.out, cfg.size, cfg.seed, {t.name: t for t in treatments}, batch)
    storage.ensure_bucket(cfg.out)
    storage.makedirs(cfg.out)
    with timer.time("ray_start"):
        ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small datasets get smaller chunks so every CPU stays busy to the end (the output is the same).
    chunk_sites = max(1, min(cfg.chunk_sites, math.ceil(len(sites) / (4 * cpus))))
    chunks = [sites[i:i + chunk_sites] for i in range(0, len(sites), chunk_sites)]
    with timer.time("render"):
        _render_all(plan, chunks, storage.join(cfg.out, layout.EMBEDDINGS_FILE), window=4 * cpus)
    with timer.time("tables"):
        storage.write_text(storage.join(cfg.out, layout.METADATA_FILE), _metadata_csv(sites))
        storage.write_text(storage.join(cfg.out, MOA_FILE), _moa_csv(treatments))
        storage.write_text(storage.join(cfg.out, TRUTH_FILE), json.dumps(_truth(cfg, treatments, batch), indent=1))
    seconds = round(time.perf_counter() - start, 3)
    counts = dict(sites=len(sites), images=len(sites) * layout.N_CHANNELS, wells=len(sites) // cfg.sites,
                  plates=cfg.experiments * cfg.plates, treatments=len(treatments),
                  null_treatments=sum(t.null for t in treatments), size=cfg.size)
    write_manifest(cfg.out, "synth", config_to_dict(cfg), counts=counts, timings=timer.seconds)
    return dict(out=cfg.out, **counts, chunks=len(chunks), seconds=seconds,
                sites_per_second=round(len(sites) / max(seconds, 1e-9), 1))


def _render_all(plan: Plan, chunks: list[list[Site]], embeddings_uri: str, window: int) -> None:
    """Run the chunk tasks, stream embeddings.csv in site order, and print progress.

    At most `window` chunks are in flight or waiting to be written, which bounds both
    the scheduler's queue and the rows held while an earlier chunk is still running.
    """
    plan_ref = ray.put(plan)
    total = sum(len(chunk) for chunk in chunks)
    pending: dict[ray.ObjectRef, int] = {}
    finished: dict[int, str] = {}  # chunks done but not yet written (they finish out of order)
    submitted = written = done_sites = 0
    start, last_print = time.perf_counter(), 0.0
    header = "site_id," + ",".join(f"feature_{i}" for i in range(layout.EMBEDDING_DIM)) + "\n"
    with storage.open_file(embeddings_uri, "wb") as handle:
        handle.write(header.encode())
        while written < len(chunks):
            while submitted < len(chunks) and len(pending) + len(finished) < window:
                pending[_render_chunk.remote(plan_ref, chunks[submitted])] = submitted
                submitted += 1
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            try:
                finished[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                raise StepFailed(f"synth: chunk {index} ({chunks[index][0].site_id}...) failed: "
                                 f"{str(exc.cause or exc).splitlines()[-1]}") from exc
            done_sites += len(chunks[index])
            while written in finished:
                handle.write(finished.pop(written).encode())
                written += 1
            elapsed = time.perf_counter() - start
            if elapsed - last_print >= 1.0 or written == len(chunks):
                print(f"synth: {done_sites}/{total} sites, {written}/{len(chunks)} chunks written, "
                      f"{elapsed:.1f}s", file=sys.stderr, flush=True)
                last_print = elapsed
