"""The synthetic screen's design: treatments and their planted phenotypes, plate layouts, batch effects.

Every random draw comes from a generator keyed by (seed, name) (:func:`stable_rng`),
so the design, and what each site looks like (:func:`site_conditions`), depends on the
seed alone. :mod:`rxray.data.synth` renders the sites and writes the dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rxray.config import SynthConfig
from rxray import layout
from rxray.data import cells

RARE_MOA = "GPCR"
RARE_EVERY = 30  # one compound in 30 is a GPCR ligand: a few percent of sites, as in the MoA study
INTERFERON_MOA = "interferon"
# Each interferon's own phenotype, on a stain of its own (IFN-beta's on actin, its mechanism's stain); the others
# sit on kinds that no mechanism of the default screen shares, as cytokines act through one pathway.
INTERFERON_EFFECTS = dict(zip(layout.TREATMENT_GROUPS["interferons"],
                              ["cell_count", "actin_fibres", "nucleoli", "membrane"]))
INTERFERON_STRENGTH = 0.85  # the individual part; the shared interferon response adds moa_share x this on actin
INTERFERON_TOP_CONC = 10.0
# A compound's own phenotype strength at its top dose, drawn uniformly (the shared part is moa_share x this). At the
# default moa_share of 1 no single component exceeds 1.0, below the 1.2 the generator planted at moa_share 1.5.
COMPOUND_STRENGTH = (0.6, 1.0)
GPCR_LIGANDS = ["isoproterenol", "histamine", "carbachol", "clozapine", "haloperidol", "propranolol",
                "loratadine", "salbutamol", "sumatriptan", "losartan", "metoprolol", "risperidone",
                "olanzapine", "quetiapine", "ranitidine"]
GPCR_EFFECT = "membrane"  # GPCR activation -> membrane ruffling and receptor internalisation (WGA)
# Each mechanism's shared phenotype, (kind, direction): every treatment of a MoA carries it, at
# SynthConfig.moa_share of its own strength, on top of its individual `kind`, as drugs with one
# mechanism share a morphological signature. Each mechanism has a kind of its own, so treatments that
# share no mechanism share no component (cytoskeleton drugs take F-actin away where interferons add
# stress fibres: the one pair of mechanisms on one kind, in opposite directions).
MOA_EFFECTS = {
    INTERFERON_MOA: ("actin_fibres", 1.0),  # JAK-STAT signalling remodels endothelial actin: stress fibres
    "DNA damage": ("nuclear_size", 1.0),  # arrest in G2 after DNA damage: enlarged nuclei
    "HDAC inhibitor": ("nuclear_intensity", 1.0),  # chromatin decondensation changes the Hoechst signal
    "kinase inhibitor": ("cell_count", -1.0),  # broad kinase inhibition stops proliferation: fewer cells
    "ER stress": ("er_texture", 1.0),  # unfolded-protein response: swollen, coarse ER
    "proteasome inhibitor": ("nucleoli", 1.0),  # ubiquitinated proteins collect in nucleoli (nucleolar aggresomes)
    "transcription inhibitor": ("rna_content", -1.0),  # RNA polymerase block: less RNA (SYTO14) everywhere
    "mitochondrial": ("mito_clumping", 1.0),  # depolarised mitochondria fragment and cluster by the nucleus
    "protein trafficking": ("golgi", 1.0),  # ER-Golgi transport block: Golgi disperses and swells
    "cytoskeleton": ("actin_fibres", -1.0),  # actin depolymerisers (cytochalasin, latrunculin): F-actin lost
    RARE_MOA: (GPCR_EFFECT, 1.0),
}
# (name, mechanism, individual phenotype kind) of the other compounds, in mechanism groups of three or more, so
# any screen that takes the first N holds whole groups (the default: ER stress, HDAC, DNA damage, mitochondrial
# (four) and protein trafficking, after one GPCR ligand). A compound's own kind is never its mechanism's: it is
# what sets compounds of one mechanism apart (off-target effects), and at moa_share 1 it is as strong as what
# they share. Within a mechanism the own kinds differ, and no kind leads more than two of the default screen's
# compounds, so no two mechanisms are pulled together by a kind their members happen to pile onto; some own
# kinds are another mechanism's (doxorubicin's Hoechst quenching, brefeldin-A's ER, trichostatin-A's nuclear
# swelling), as real compounds look partly like another class. Past the list, names are cmpd-NNNN, mechanisms
# cycle and the own kind is drawn with the seed (never the mechanism's).
COMPOUNDS = [
    ("tunicamycin", "ER stress", "golgi"), ("thapsigargin", "ER stress", "mito_clumping"),
    ("dithiothreitol", "ER stress", "nucleoli"),
    ("vorinostat", "HDAC inhibitor", "rna_content"), ("trichostatin-A", "HDAC inhibitor", "nuclear_size"),
    ("panobinostat", "HDAC inhibitor", "cell_count"),
    ("etoposide", "DNA damage", "nucleoli"), ("doxorubicin", "DNA damage", "nuclear_intensity"),
    ("camptothecin", "DNA damage", "rna_content"),
    ("rotenone", "mitochondrial", "cell_count"), ("FCCP", "mitochondrial", "membrane"),
    ("oligomycin", "mitochondrial", "er_texture"), ("antimycin-A", "mitochondrial", "actin_fibres"),
    ("brefeldin-A", "protein trafficking", "er_texture"), ("monensin", "protein trafficking", "membrane"),
    ("golgicide-A", "protein trafficking", "nuclear_size"),
    ("dasatinib", "kinase inhibitor", "actin_fibres"), ("staurosporine", "kinase inhibitor", "nuclear_size"),
    ("imatinib", "kinase inhibitor", "mito_clumping"),
    ("actinomycin-D", "transcription inhibitor", "nucleoli"), ("CX-5461", "transcription inhibitor", "nuclear_size"),
    ("BMH-21", "transcription inhibitor", "cell_count"),
    ("bortezomib", "proteasome inhibitor", "cell_count"), ("MG-132", "proteasome inhibitor", "er_texture"),
    ("carfilzomib", "proteasome inhibitor", "mito_clumping"),
    ("cytochalasin-D", "cytoskeleton", "cell_count"), ("latrunculin-B", "cytoskeleton", "membrane"),
    ("nocodazole", "cytoskeleton", "nuclear_size"), ("jasplakinolide", "cytoskeleton", "golgi"),
    ("exo1", "protein trafficking", "nucleoli"), ("sunitinib", "kinase inhibitor", "golgi"),
]
MECHANISM_CYCLE = [m for m in dict.fromkeys(moa for _, moa, _ in COMPOUNDS)]

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
    kind: str  # a cells.EFFECTS kind: the leading kind of the treatment's individual phenotype
    top_strength: float  # signed strength of the individual phenotype at the top concentration; 0 for a planted null
    concentrations: tuple[float, ...]  # ascending
    moa_kind: str = "none"  # the mechanism's shared phenotype (MOA_EFFECTS); "none" for a planted null
    moa_top_strength: float = 0.0  # its signed strength at the top concentration (the mechanism's direction)
    # The individual phenotype as (kind, weight) parts, weights of unit length (the leading `kind` first, with
    # its sign); one part (kind, 1.0) when it sits on one kind.
    own_parts: tuple[tuple[str, float], ...] = ()
    annotated: bool = True  # False: left out of moa.csv (its mechanism is known only to truth.json)

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
        parts = self.own_parts or ((self.kind, math.copysign(1.0, self.top_strength)),)
        return shared + [(kind, weight * abs(self.strength_per_conc) * conc) for kind, weight in parts]


def _dose_ladder(top: float, doses: int) -> tuple[float, ...]:
    """Concentrations halving down from the top dose, ascending."""
    return tuple(float(f"{top / 2 ** (doses - 1 - d):.6g}") for d in range(doses))


# The individual phenotype of a compound spreads over this many kinds, the listed one leading: two compounds of
# different mechanisms rarely share all of it, as two real compounds rarely share their off-target effects.
OWN_PARTS = 3
OWN_LEADING_WEIGHT = 0.75  # the listed kind's share (unit-length weights); the others split the rest at random


def _own_parts(rng: np.random.Generator, leading: str, moa_kind: str, sign: float) -> tuple[tuple[str, float], ...]:
    """A compound's individual phenotype: its leading kind plus OWN_PARTS - 1 others (never the mechanism's)."""
    others = [k for k in sorted(cells.EFFECTS) if k not in (leading, moa_kind)]
    extra = [others[i] for i in rng.choice(len(others), OWN_PARTS - 1, replace=False)]
    rest = rng.dirichlet(np.ones(OWN_PARTS - 1)) * (1.0 - OWN_LEADING_WEIGHT ** 2)
    weights = [sign * OWN_LEADING_WEIGHT] + [float(np.sqrt(w)) * rng.choice([-1.0, 1.0]) for w in rest]
    return tuple((kind, round(float(w), 6)) for kind, w in zip([leading, *extra], weights))


def _compound(rng: np.random.Generator, seed: int, index: int, rare: bool) -> tuple[str, str, str]:
    """(name, mechanism, leading own kind) of the index-th non-interferon compound (see COMPOUNDS)."""
    if rare:
        name = GPCR_LIGANDS[index // RARE_EVERY] if index // RARE_EVERY < len(GPCR_LIGANDS) else f"cmpd-{index + 1:04d}"
        moa = RARE_MOA
    else:
        j = index - index // RARE_EVERY - 1
        if j < len(COMPOUNDS):
            return COMPOUNDS[j]
        name, moa = f"cmpd-{index + 1:04d}", MECHANISM_CYCLE[j % len(MECHANISM_CYCLE)]
    kinds = [k for k in sorted(cells.EFFECTS) if k != MOA_EFFECTS[moa][0]]
    return name, moa, kinds[int(stable_rng(seed, "own kind", name).integers(len(kinds)))]


def build_treatments(cfg: SynthConfig) -> list[Treatment]:
    """The interferons first, then compounds in mechanism groups (one in RARE_EVERY a GPCR ligand).

    A treatment's phenotype is its mechanism's shared component (MOA_EFFECTS, strength
    cfg.moa_share x its own, in the mechanism's direction) plus its individual phenotype
    (:func:`_own_parts`; a single kind for the interferons). The last ``null_fraction`` of the
    compounds that are not GPCR ligands are planted nulls, so the groups at the front stay
    whole whatever the seed; then ``cfg.unannotated`` active compounds are left out of moa.csv.
    """
    rng = stable_rng(cfg.seed, "treatments")
    ifn_kind, ifn_direction = MOA_EFFECTS[INTERFERON_MOA]
    treatments = [Treatment(name, INTERFERON_MOA, INTERFERON_EFFECTS[name], INTERFERON_STRENGTH,
                            _dose_ladder(INTERFERON_TOP_CONC, cfg.doses), ifn_kind,
                            ifn_direction * cfg.moa_share * INTERFERON_STRENGTH)
                  for name in layout.TREATMENT_GROUPS["interferons"][:cfg.treatments]]
    others = []
    for i in range(cfg.treatments - len(treatments)):
        rare = i % RARE_EVERY == 0
        name, moa, kind = _compound(rng, cfg.seed, i, rare)
        moa_kind, direction = MOA_EFFECTS[moa]
        sign = 1.0 if rng.random() < 0.7 else -1.0
        top = float(rng.choice([1.0, 3.0, 10.0]))
        strength = float(rng.uniform(*COMPOUND_STRENGTH))
        parts = _own_parts(stable_rng(cfg.seed, "own parts", name), kind, moa_kind, sign)
        others.append(Treatment(name, moa, kind, sign * strength, _dose_ladder(top, cfg.doses), moa_kind,
                                direction * cfg.moa_share * strength, parts))
    # Nulls among the compounds that are not GPCR ligands, from the end, so the rare class always has a phenotype.
    candidates = [i for i, t in enumerate(others) if t.moa != RARE_MOA]
    n_null = min(len(candidates), math.ceil(round(cfg.null_fraction * len(others), 9)))
    for i in candidates[len(candidates) - n_null:]:
        others[i] = dataclasses.replace(others[i], top_strength=0.0, moa_kind="none", moa_top_strength=0.0,
                                        own_parts=())
    return treatments + _leave_unannotated(cfg, others)


def _leave_unannotated(cfg: SynthConfig, compounds: list[Treatment]) -> list[Treatment]:
    """Up to ``cfg.unannotated`` active compounds marked unannotated: one per mechanism, largest mechanisms first.

    Only a mechanism with three or more active compounds gives one up, so at least two
    annotated ones remain for a leave-one-out prediction to name it; which member goes
    is drawn with the seed.
    """
    groups: dict[str, list[str]] = {}
    for t in compounds:
        if not t.null and t.moa != RARE_MOA:
            groups.setdefault(t.moa, []).append(t.name)
    eligible = sorted((moa for moa, names in groups.items() if len(names) >= 3), key=lambda m: (-len(groups[m]), m))
    rng = stable_rng(cfg.seed, "unannotated")
    chosen = {groups[moa][int(rng.integers(len(groups[moa])))] for moa in eligible[:cfg.unannotated]}
    return [dataclasses.replace(t, annotated=False) if t.name in chosen else t for t in compounds]


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

    Wells sit at random positions of a 1536-well plate, inside its outer ring unless
    ``cfg.rim_wells`` (RxRx2 uses the 1,380 inner wells); treatment slots are dealt
    round-robin over all plates, each treatment's first well at its top dose, then
    down the dose ladder, so every plate mixes treatments and doses.
    """
    per_plate = cfg.wells - cfg.controls
    usable = np.array(layout.well_positions(cfg.rim_wells))
    sites = []
    for e, experiment in enumerate(experiment_names(cfg)):
        for plate in range(1, cfg.plates + 1):
            rng = stable_rng(cfg.seed, "layout", experiment, plate)
            positions = usable[rng.choice(len(usable), cfg.wells, replace=False)]
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
    return _without_missing_sites(cfg, sites)


def _without_missing_sites(cfg: SynthConfig, sites: list[Site]) -> list[Site]:
    """The sites minus ``cfg.missing_sites`` control sites: a random site of as many random control wells."""
    if not cfg.missing_sites:
        return sites
    control_wells = sorted({s.well_id for s in sites if s.treatment == layout.CONTROL})
    rng = stable_rng(cfg.seed, "missing sites")
    wells = rng.choice(len(control_wells), cfg.missing_sites, replace=False)
    missing = {(control_wells[w], int(site)) for w, site in zip(wells, rng.integers(1, cfg.sites + 1, len(wells)))}
    return [s for s in sites if (s.well_id, s.site) not in missing]


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


def site_conditions(plan: Plan, site: Site) -> tuple[cells.Morphology, cells.Acquisition]:
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
