"""The configs of the steps that make and score representations: features, score and compare.

Apart from :mod:`rxray.config`, which re-exports them beside every other step's config, because
they share one thing: the scoring settings (:class:`ScoringSettings`) that `rxray score` and
`rxray compare` give every representation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rxray.options import option

# The cp_measure measurements a CellProfiler profile can take (rxray.features.measure.default_measurements).
FEATURE_MEASUREMENTS = ("sizeshape", "zernike", "feret", "intensity", "texture", "granularity",
                        "radial_distribution", "pearson", "manders", "rwc", "overlap")


@dataclass
class FeaturesConfig:
    """`rxray features`: CellProfiler profiles of every shard site with a Ray Data actor pool."""

    section = "features"

    data: str = option(help="URI of the ingest shards", uri=True)
    out: str = option(help="output URI for the site, profile and well tables", uri=True, role="resource")
    measurements: list[str] = option(list(FEATURE_MEASUREMENTS), "cp_measure measurements to take (see "
                                     "rxray/features/measure.py for what each costs)", choices=FEATURE_MEASUREMENTS)
    nucleus_diameter: Optional[float] = option(None, "expected nucleus diameter in shard pixels, which sizes the "
                                                     "segmentation and the texture scale (default: 6% of the image "
                                                     "side, the generator's; RxRx2's nuclei are ~3.5%)", minimum=2.0)
    select_sites: int = option(10000, "most sites (a seeded sample) pycytominer's feature selection and the "
                                      "standardisation are fitted on", minimum=10)
    seed: int = option(0, "seed of that sample")
    batch_size: int = option(16, "sites per actor batch", minimum=1, role="resource")
    actors: Optional[int] = option(None, "actor-pool size (default: one per CPU)", minimum=1, role="resource")


@dataclass
class ScoringSettings:
    """How a representation is scored: treatments, controls, corrections, forests, mAP and the map's tests."""

    treatments: Optional[list[str]] = option(None, "treatments to score (default: every non-control treatment)")
    controls: list[str] = option(["EMPTY"], "control treatments")
    correct: list[str] = option(["none", "center", "tvn"], "batch corrections to report",
                                choices=["none", "center", "tvn"])
    trees: int = option(100, "trees per Random Forest", minimum=1)
    folds: int = option(5, "cross-validation folds, grouped by plate", minimum=2)
    permutations: int = option(1000, "label permutations for mAP p-values", minimum=10)
    fdr: float = option(0.05, "false-discovery rate for calling a treatment active", minimum=0.0, maximum=1.0)
    seed: int = option(0, "random seed for forests, folds and permutations")
    moa: Optional[str] = option(None, "moa.csv (treatment,moa): benchmarks the treatment map and predicts the "
                                      "mechanism of every active treatment, leave-one-compound-out for annotated "
                                      "ones (default: the moa.csv beside the dataset the embeddings came from, if "
                                      "any; else no prediction, the map is still built)", uri=True)
    map_neighbors: int = option(5, "nearest treatments listed per treatment in the similarity map", minimum=1)
    map_permutations: int = option(1000, "MoA-label permutations for the similarity map's benchmark p-values",
                                   minimum=10)
    moa_neighbours: int = option(3, "nearest annotated active treatments whose similarity-weighted vote predicts "
                                    "each active treatment's mechanism (3: a mechanism of three compounds keeps two "
                                    "voters when one is held out)", minimum=1)


@dataclass
class ScoreConfig(ScoringSettings):
    """`rxray score`: Random-Forest scores, batch correction and mAP activity per treatment."""

    section = "score"

    embeddings: str = option(help="URI of `rxray embed` or `rxray features` output, or an RxRx2 embeddings.csv",
                             uri=True)
    out: str = option(help="output URI for the score tables", uri=True, role="resource")
    metadata: Optional[str] = option(None, "metadata.csv to join when --embeddings is an embeddings.csv "
                                           "(default: the metadata.csv beside it)", uri=True)


@dataclass
class CompareConfig(ScoringSettings):
    """`rxray compare`: every representation of a run scored the same way, into one leaderboard."""

    section = "compare"

    out: str = option(help="output URI for leaderboard.csv and each representation's scores", uri=True,
                      role="resource")
    embeddings: Optional[str] = option(None, "`rxray embed` output of the trained encoder", uri=True)
    features: Optional[str] = option(None, "`rxray features` output: CellProfiler profiles", uri=True)
    dataset_embeddings: Optional[str] = option(None, "the dataset's own embeddings.csv (RxRx2 ships Recursion's)",
                                               uri=True)
    data: Optional[str] = option(None, "ingest shards, which the random-init encoders embed", uri=True)
    model: Optional[str] = option(None, "`rxray pretrain` output: the architecture of the random-init encoders",
                                  uri=True)
    probe: Optional[str] = option(None, "`rxray probe` output: its balanced accuracies join the leaderboard",
                                  uri=True)
    finetuned: Optional[str] = option(None, "`rxray finetune` output: its encoder joins the board when it was "
                                            "fine-tuned (not frozen)", uri=True)
    scores: Optional[str] = option(None, "`rxray score` output of --embeddings: reused when it scored them with "
                                         "these settings (its corrections may be more)", uri=True)
    random_seeds: int = option(1, "random-init encoders of the trained one's architecture scored beside it "
                                  "(needs data and model)", minimum=0)
    correct: list[str] = option(["tvn"], "batch corrections each representation is scored under (the leaderboard "
                                         "ranks by the first)", choices=["none", "center", "tvn"])
    batch_size: int = option(64, "images per batch when a random-init encoder embeds the shards", minimum=1,
                             role="resource")
