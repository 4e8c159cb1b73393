"""Every step's typed config: its fields with their defaults, help, bounds and role, and its own checks.

Defaults live here in code; a YAML file overrides them and CLI flags override both,
validated once by :func:`rxray.options.load_config` before any work starts. The
machinery (option, coercion, loading, saving) lives in :mod:`rxray.options`; its
names are re-exported here because every step imports them beside its config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from rxray.layout import RXRX2_LAYOUT, TREATMENT_GROUPS
from rxray.errors import ConfigError
from rxray.models.registry import BACKBONES
from rxray.options import config_to_dict, config_to_yaml, load_config, option, read_yaml
from rxray.representation_config import (FEATURE_MEASUREMENTS, CompareConfig, FeaturesConfig, ScoreConfig,
                                         ScoringSettings)

# Names other modules import from here beside a step config (the machinery is rxray.options').
__all__ = ["BACKBONES", "CACHE_HELP", "FEATURE_MEASUREMENTS", "PROBE_CORRECTIONS", "PROBE_CORRECT_HELP", "CompareConfig",
           "ConfigError", "EmbedConfig", "ExplainConfig", "FeaturesConfig", "FinetuneConfig", "IngestConfig",
           "PretrainConfig", "ProbeConfig", "ReportConfig", "ScoreConfig", "ScoringSettings", "SynthConfig", "TuneConfig", "config_to_dict", "config_to_yaml", "load_config", "option",
           "read_yaml", "STALL_TIMEOUT_S"]

# A training worker waiting this long for its next batch fails (and Ray Train restarts the group from the last
# checkpoint) instead of waiting forever: the blocks of a lost node may never arrive. The longest waits measured
# (an epoch's first streamed batch) are 1.3-4 s on 2 cores (docs/benchmarks.md); 120 s fails an incurable stall
# after (max_failures + 1) x 2 minutes, not 30. Workers say every 30 s what they wait for.
STALL_TIMEOUT_S = 120.0
LR_SCHEDULES = ["cosine", "constant"]
LR_SCHEDULE_HELP = "learning rate per epoch: cosine decay from --lr towards 0 over --epochs, or constant"
STALL_TIMEOUT_HELP = ("seconds a training worker waits for its next batch before it fails and Ray Train restarts "
                      "the workers from the last checkpoint (a lost node's data never arrives)")



@dataclass
class SynthConfig:
    """`rxray synth`: write an RxRx2-format synthetic dataset."""

    section = "synth"
    # Named layouts: their values replace the code defaults; a YAML file or a flag still overrides each one.
    presets: ClassVar[dict[str, dict[str, int]]] = {"rxrx2": RXRX2_LAYOUT}

    out: str = option(help="output URI (local folder, s3://bucket/prefix)", uri=True, role="resource")
    experiments: int = option(2, "number of experiments (HUVEC-1, HUVEC-2, ...)", minimum=1)
    plates: int = option(2, "plates per experiment", minimum=1)
    wells: int = option(80, "wells per plate, controls included (at most 1,536; 1,380 with --no-rim-wells)",
                        minimum=2, maximum=1536)
    sites: int = option(2, "sites (fields of view) per well", minimum=1)
    size: int = option(128, "image side in pixels (the real data is 1024)", minimum=32, maximum=4096)
    treatments: int = option(24, "number of non-control treatments (the first four are the interferons, then "
                                 "compounds in mechanism groups of three or more)", minimum=1)
    controls: int = option(8, "EMPTY control wells per plate", minimum=1)
    null_fraction: float = option(0.15, "fraction of non-interferon compounds planted with no effect (the last "
                                        "ones, so the mechanism groups before them stay whole)",
                                  minimum=0.0, maximum=1.0)
    doses: int = option(3, "concentrations per treatment (a halving ladder; effects grow with dose)", minimum=1)
    moa_share: float = option(1.0, "strength of the phenotype a compound shares with its mechanism-of-action "
                                    "class, as a fraction of its own (0: no shared component; 1: as strong as its "
                                    "own)", minimum=0.0, maximum=2.0)
    unannotated: int = option(1, "active compounds left out of moa.csv, one per mechanism of three or more "
                                 "(truth.json keeps their mechanism): the compounds whose mechanism a screen "
                                 "is run to find", minimum=0)
    batch_effects: float = option(1.0, "scale of plate/experiment/edge batch effects (0 turns them off)",
                                  minimum=0.0, maximum=5.0)
    rim_wells: bool = option(True, "wells on the plate's outer ring too, where evaporation brightens the stains "
                                   "and thins the cells (--no-rim-wells: only the 1,380 inner wells, as RxRx2 uses)")
    chunk_sites: int = option(64, "most sites per Ray task (the output does not depend on it)", minimum=1)
    cell_type: str = option("HUVEC", "cell type written to metadata")
    seed: int = option(0, "random seed; the same seed writes the same dataset", minimum=0)
    missing_sites: int = option(0, "control sites left out (one per well, wells chosen with the seed), as real "
                                   "screens lose fields of view", minimum=0)
    preset: Optional[str] = option(None, "a named layout that sets the counts above (explicit values still win); "
                                         "rxrx2: the real screen's 2 experiments x 12 plates x 1,380 wells x 4 "
                                         "sites, 433 treatments + EMPTY, 131,953 sites", choices=["rxrx2"])

    def validate(self) -> None:
        from rxray.layout import is_safe_component, well_positions

        if self.controls >= self.wells:
            raise ConfigError("synth.controls", f"must be fewer than wells ({self.wells}), got {self.controls}")
        slots = self.experiments * self.plates * (self.wells - self.controls)
        if self.treatments > slots:
            raise ConfigError("synth.treatments", f"{self.treatments} treatments need as many treated wells, "
                                                  f"but experiments x plates x (wells - controls) = {slots}")
        usable = len(well_positions(self.rim_wells))
        if self.wells > usable:
            ring = "in all" if self.rim_wells else "inside its outer ring (--rim-wells: 1536)"
            raise ConfigError("synth.wells", f"a 1536-well plate has {usable} wells {ring}, got {self.wells}")
        control_wells = self.experiments * self.plates * self.controls
        if self.missing_sites and (self.sites < 2 or self.missing_sites > control_wells):
            raise ConfigError("synth.missing_sites", f"at most one site per control well ({control_wells}) can "
                                                     f"be left out, and only with 2 or more sites per well")
        if not is_safe_component(self.cell_type) or "_" in self.cell_type:
            raise ConfigError("synth.cell_type", f"must be usable in paths and ids (no '/', '_'), "
                                                 f"got {self.cell_type!r}")


@dataclass
class IngestConfig:
    """`rxray ingest`: stream RxRx2 images into Parquet shards."""

    section = "ingest"

    source: str = option(help="dataset root URI holding metadata.csv and images/", uri=True)
    out: str = option(help="output URI for the Parquet shards", uri=True, role="resource")
    size: int = option(256, "output image side in pixels (area interpolation)", minimum=8, maximum=4096)
    treatments: Optional[list[str]] = option(None, "comma-separated treatment names to keep (default: all)")
    group: Optional[str] = option(None, "named treatment group to keep", choices=sorted(TREATMENT_GROUPS))
    controls: list[str] = option(["EMPTY"], "control treatments added to a --treatments/--group subset")
    balance: Optional[int] = option(None, "downsample every class (each treatment and the controls) to this "
                                          "many sites (seeded)", minimum=1)
    labels: Optional[str] = option(None, "label CSV joined on `treatment` (e.g. moa.csv)", uri=True)
    shard_rows: int = option(256, "rows per Parquet shard (bounds memory and file size)", minimum=1)
    max_reject_frac: float = option(0.01, "fail if more than this fraction of sites is rejected",
                                    minimum=0.0, maximum=1.0, role="resource")
    fetch_threads: int = option(6, "sites fetched and decoded concurrently by each shard-writing actor", minimum=1,
                                role="resource")
    seed: int = option(0, "seed for balanced downsampling")

    def validate(self) -> None:
        if self.treatments and self.group:
            raise ConfigError("ingest.group", "give either --treatments or --group, not both")


CACHE_HELP = ("hold the training images in Ray's object store after the first epoch's read: auto when they fit in "
              "40% of it, on, or off (stream from storage every epoch)")
PROBE_CORRECT_HELP = ("center: scale each plate's embeddings on its own control sites before probing (plates with "
                      "fewer than 2 controls sit out), or none")
PROBE_CORRECTIONS = ["none", "center"]


@dataclass
class PretrainConfig:
    """`rxray pretrain`: SimCLR pretraining on ingest shards with Ray Train."""

    section = "pretrain"

    data: str = option(help="URI of the ingest shards", uri=True)
    out: str = option(help="output URI for checkpoints, metrics and config", uri=True, role="resource")
    backbone: str = option("densenet121", "torchvision backbone", choices=BACKBONES, role="identity")
    weights: Optional[str] = option(None, "torchvision state-dict file (path or URI); default random init", uri=True)
    stem: str = option("adapt", "6-channel input: adapt the first conv, or project 6->3", choices=["adapt", "project"],
                       role="identity")
    epochs: int = option(20, "training epochs", minimum=1, role="extent")
    batch_size: int = option(64, "batch size per worker", minimum=2)
    # 1e-3 and 0.2 (the study used 4e-4 and 0.5): at those the positive-pair top-1 of a 64 px ResNet-18 was 0.05 after
    # 8 epochs, at these 0.20, and its embeddings beat random init in 6 epochs instead of ~40 (docs/science-checks.md).
    lr: float = option(1e-3, "Adam learning rate", minimum=0.0)
    weight_decay: float = option(1e-6, "weight decay", minimum=0.0)
    temperature: float = option(0.2, "NT-Xent temperature", minimum=1e-4)
    lr_schedule: str = option("cosine", LR_SCHEDULE_HELP, choices=LR_SCHEDULES)
    proj_dim: int = option(128, "projection head output size", minimum=2, role="identity")
    dropout: float = option(0.1, "projection head dropout", minimum=0.0, maximum=0.95)
    crop_size: Optional[int] = option(None, "augmented view side in pixels (default: the shard image size)",
                                      minimum=8)
    # 0.3 (+-12% per-stain brightness/contrast): at 1.0 (+-40%) SimCLR learns to ignore the stain intensity changes
    # that most phenotypes are made of, and its embeddings lose to a random-init encoder's (docs/science-checks.md).
    aug_strength: float = option(0.3, "scale of the colour/noise augmentations (1.0: +-40% per-stain brightness "
                                      "and contrast, noise up to 0.1 std)", minimum=0.0)
    workers: int = option(1, "Ray Train workers", minimum=1, role="resource")
    gpu: bool = option(False, "train on GPUs (one per worker)", role="resource")
    max_failures: int = option(2, "worker failures to recover from before giving up", minimum=0, role="resource")
    stall_timeout: float = option(STALL_TIMEOUT_S, STALL_TIMEOUT_HELP, minimum=1.0, role="resource")
    worker_cpus: Optional[float] = option(None, "CPUs reserved per worker (default: 1, or less on a small "
                                                "machine so Ray Data keeps a CPU to feed them)", minimum=0.1,
                                          role="resource")
    threads: Optional[int] = option(None, "torch CPU threads per worker (default: its reserved CPUs)", minimum=1,
                                    role="resource")
    cache: str = option("auto", CACHE_HELP, choices=["auto", "on", "off"], role="resource")
    seed: int = option(0, "random seed")
    probe: bool = option(False, "after each epoch, score a plate-grouped linear probe on frozen embeddings of a site "
                                "sample (probe_score: the objective of `rxray tune`)", role="resource")
    probe_task: str = option("treatment", "probe target: treatment identity, or control (treated vs control)",
                             choices=["treatment", "control"], role="resource")
    probe_treatments: Optional[list[str]] = option(None, "treatments the probe uses; controls are always kept "
                                                         "(default: all)", role="resource")
    probe_sites: int = option(1024, "most sites the probe embeds each epoch (a seeded, class-stratified sample)",
                              minimum=4, role="resource")
    probe_correct: str = option("center", PROBE_CORRECT_HELP, choices=PROBE_CORRECTIONS, role="resource")


@dataclass
class ProbeConfig:
    """`rxray probe`: plate-grouped probes on a trained encoder's embeddings beside random-init encoders'."""

    section = "probe"

    data: str = option(help="URI of the ingest shards", uri=True)
    model: str = option(help="output URI of `rxray pretrain`/`rxray finetune`, or one checkpoint in it", uri=True)
    out: str = option(help="output URI for probe.csv and the manifest with the comparison", uri=True, role="resource")
    treatments: Optional[list[str]] = option(None, "treatments to probe; controls are always kept (default: all)")
    tasks: list[str] = option(["control", "treatment"], "probe targets: control (treated vs control) and/or "
                                                        "treatment (identity)", choices=["control", "treatment"])
    methods: list[str] = option(["logistic", "knn"], "probe classifiers", choices=["logistic", "knn"])
    baseline_seeds: int = option(3, "random-init encoders of the same architecture to compare with", minimum=0)
    correct: str = option("center", PROBE_CORRECT_HELP, choices=PROBE_CORRECTIONS)
    max_sites: int = option(4096, "most sites to embed (a seeded sample, half controls)", minimum=4)
    batch_size: int = option(64, "images per inference batch", minimum=1)
    gpu: bool = option(False, "embed on a GPU (the probe's one Ray task asks for one)", role="resource")
    seed: int = option(0, "random seed of the site sample")

    def validate(self) -> None:
        """At least one task and one method."""
        for name in ("tasks", "methods"):
            if not getattr(self, name):
                raise ConfigError(f"probe.{name}", "needs at least one value")


@dataclass
class EmbedConfig:
    """`rxray embed`: embeddings for every shard row with a Ray Data actor pool."""

    section = "embed"

    data: str = option(help="URI of the ingest shards", uri=True)
    model: str = option(help="output URI of `rxray pretrain`/`rxray finetune`, or one checkpoint in it", uri=True)
    out: str = option(help="output URI for the embedding Parquet", uri=True, role="resource")
    batch_size: int = option(64, "images per inference batch", minimum=1, role="resource")
    actors: Optional[int] = option(None, "actor-pool size (default: one per GPU with --gpu, else CPUs // 2)",
                                   minimum=1, role="resource")
    gpu: bool = option(False, "run the actors on GPUs", role="resource")
    per_well: bool = option(True, "also write per-well mean profiles")


@dataclass
class ExplainConfig:
    """`rxray explain`: Grad-CAM maps and per-stain attributions of a trained classifier."""

    section = "explain"

    data: str = option(help="URI of the ingest shards", uri=True)
    model: str = option(help="output URI of `rxray finetune`, or one checkpoint in it", uri=True)
    out: str = option(help="output URI for heatmaps, panels and channel-importance tables", uri=True, role="resource")
    n: int = option(64, "images explained per target treatment", minimum=1)
    targets: Optional[list[str]] = option(None, "treatments whose images to explain (default: every "
                                                "non-control class of the model)")
    batch_size: int = option(16, "images per Grad-CAM batch", minimum=1, role="resource")
    actors: Optional[int] = option(None, "actor-pool size (default: one per GPU with --gpu, else 1)", minimum=1,
                                   role="resource")
    gpu: bool = option(False, "run the actors on GPUs", role="resource")
    panels: int = option(4, "PNG panels (six stains, composite, heatmap) per target treatment", minimum=0)
    occlusion: bool = option(True, "also measure the target-logit drop when each used stain is blanked "
                                   "(one extra forward pass per stain)")
    truth: Optional[str] = option(None, "truth.json of a synthetic dataset, to rank each treatment's planted "
                                        "stain (default: the one beside the ingest source, if present)", uri=True)
    seed: int = option(0, "seed for choosing which images to explain")


@dataclass
class FinetuneConfig:
    """`rxray finetune`: transfer-learning classifiers (linear probe or fine-tuning) with Ray Train."""

    section = "finetune"

    data: str = option(help="URI of the ingest shards", uri=True, role="identity")
    out: str = option(help="output URI for checkpoints, splits, metrics and plots", uri=True, role="resource")
    task: str = option("binary", "binary (positive vs negative) or multiclass", choices=["binary", "multiclass"],
                       role="identity")
    label_col: str = option("treatment", "label column: treatment, or one joined at ingest (e.g. moa)", role="identity")
    positive: Optional[str] = option(None, "binary: the positive class (e.g. IFN-beta, or GPCR with --label-col moa)",
                                     role="identity")
    negative: Optional[list[str]] = option(None, "binary: negative classes, or 'rest' for every other class "
                                                 "(default: EMPTY for treatment labels, rest otherwise)",
                                           role="identity")
    classes: Optional[list[str]] = option(None, "multiclass: classes to keep (default: all in the data)",
                                          role="identity")
    encoder: Optional[str] = option(None, "start from a SimCLR run or checkpoint (`rxray pretrain` output)", uri=True,
                                    role="identity")
    weights: Optional[str] = option(None, "start from a torchvision state-dict file (path or URI)", uri=True,
                                    role="identity")
    backbone: str = option("mobilenet_v2", "torchvision backbone (ignored with --encoder)", choices=BACKBONES,
                           role="identity")
    stem: str = option("adapt", "6-channel input (ignored with --encoder)", choices=["adapt", "project"],
                       role="identity")
    freeze: bool = option(True, "train only the head on a frozen encoder (--finetune trains everything)",
                          negative_flag="--finetune", role="identity")
    with_conc: bool = option(False, "feed treatment_conc to the head as an extra input", role="identity")
    plate_norm: bool = option(True, "scale each stain by its plate's control (EMPTY) mean intensity, so plate "
                                    "gain effects do not pass for phenotypes (--no-plate-norm: off)", role="identity")
    channels: list[int] = option([1, 2, 3, 4, 5, 6], "1-based stains to train on, e.g. 1,3,5",
                                 minimum=1, maximum=6, role="identity")
    class_weights: str = option("auto", "auto: loss weights inverse to class frequency; none", choices=["auto", "none"])
    split_by: str = option("plate", "group for train/val/test splits, never by image: plate or experiment (does it "
                                    "generalise to a new batch?), or treatment (every dose and replicate of a "
                                    "compound in one split, each class's compounds dealt to every split: what does "
                                    "it say of a compound it has never seen?)",
                           choices=["plate", "experiment", "treatment"], role="identity")
    val_frac: float = option(0.2, "fraction of groups for validation", minimum=0.0, maximum=0.5, role="identity")
    test_frac: float = option(0.2, "fraction of groups for test", minimum=0.0, maximum=0.5, role="identity")
    epochs: int = option(10, "training epochs", minimum=1, role="extent")
    batch_size: int = option(32, "batch size per worker", minimum=2)
    lr: float = option(1e-3, "learning rate of the head", minimum=0.0)
    encoder_lr_scale: float = option(0.1, "encoder learning rate as a fraction of --lr when fine-tuning",
                                     minimum=0.0)
    lr_schedule: str = option("constant", LR_SCHEDULE_HELP, choices=LR_SCHEDULES)
    weight_decay: float = option(1e-4, "AdamW weight decay", minimum=0.0)
    dropout: float = option(0.3, "head dropout", minimum=0.0, maximum=0.95)
    head_hidden: int = option(256, "head hidden units", minimum=1, role="identity")
    aug_strength: float = option(0.5, "training augmentation strength (0 = none)", minimum=0.0)
    tta: bool = option(False, "orientation carries no label: train on a random flip or quarter turn of each site "
                              "(as --aug-strength does besides crops and jitter) and predict by the mean of the class "
                              "probabilities over all 8 (8x the prediction cost)", role="identity")
    patience: int = option(3, "early stopping: epochs without validation improvement", minimum=1)
    workers: int = option(1, "Ray Train workers", minimum=1, role="resource")
    gpu: bool = option(False, "train on GPUs (one per worker)", role="resource")
    max_failures: int = option(2, "worker failures to recover from before giving up", minimum=0, role="resource")
    stall_timeout: float = option(STALL_TIMEOUT_S, STALL_TIMEOUT_HELP, minimum=1.0, role="resource")
    threads: Optional[int] = option(None, "torch CPU threads per worker (default: its reserved CPUs)", minimum=1,
                                    role="resource")
    plate_scores: bool = option(True, "binary tasks: score each site as a z-score against its plate's own control "
                                      "sites before the decision threshold, as screens normalise to plate controls "
                                      "(--no-plate-scores: off)")
    threshold: str = option("auto", "binary decision threshold for the test metrics: control-z (a site is positive "
                                    "at 3 robust SDs above its plate's controls; needs plate scores), val-f1 (the "
                                    "best F1 on the validation split), argmax (0.5); auto: control-z with plate "
                                    "scores, else val-f1", choices=["auto", "control-z", "val-f1", "argmax"])
    cache: str = option("auto", CACHE_HELP, choices=["auto", "on", "off"], role="resource")
    seed: int = option(0, "random seed (splits, init, sampling)", role="identity")

    def validate(self) -> None:
        if self.task == "binary" and not self.positive:
            raise ConfigError("finetune.positive", "is required for --task binary")
        if self.encoder and self.weights:
            raise ConfigError("finetune.weights", "give either --encoder or --weights, not both")
        if self.threshold == "control-z" and not self.plate_scores:
            raise ConfigError("finetune.threshold", "control-z needs plate scores (drop --no-plate-scores)")
        if len(set(self.channels)) != len(self.channels):
            raise ConfigError("finetune.channels", f"has duplicates: {self.channels}")
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError("finetune.test_frac", "val_frac + test_frac must leave groups for training")


@dataclass
class ReportConfig:
    """`rxray report`: one HTML page with the figures of every step output under a run."""

    section = "report"

    run: str = option(help="run URI; every step output under it is found by its _manifest.json", uri=True)
    out: str = option(help="output folder or URI for report.html and its figures", uri=True, role="resource")
    max_points: int = option(5000, "most sites drawn in the embedding scatter plots (seeded sample)", minimum=100)
    max_panels: int = option(12, "most Grad-CAM panels shown", minimum=0)


@dataclass
class TuneConfig:
    """`rxray tune`: hyperparameter search over pretraining or fine-tuning with Ray Tune."""

    section = "tune"

    data: str = option(help="URI of the ingest shards", uri=True, role="identity")
    out: str = option(help="output URI for the search (trials, results table, plot, best_config.yaml); rerunning "
                           "the same command resumes it", uri=True, role="resource")
    objective: str = option("pretrain", "pretrain: SimCLR ranked by a plate-grouped probe score after each epoch; "
                                        "finetune: classifiers ranked by validation PR-AUC / macro F1",
                            choices=["pretrain", "finetune"], role="identity")
    base: Optional[str] = option(None, "YAML file of the fixed step settings every trial shares (e.g. backbone, "
                                       "workers, or positive for finetune); top level or under the step's section",
                                uri=True, role="identity")
    space: Optional[str] = option(None, "YAML file of search-space entries, each replacing or adding one step "
                                        "field: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {choice: [...]}, "
                                        "{randint: [lo, hi]} or a constant", uri=True, role="identity")
    samples: int = option(8, "trials to run", minimum=1, role="identity")
    max_concurrent: int = option(2, "most trials running at once (fewer when the cluster cannot hold them)",
                                 minimum=1, role="identity")
    scheduler: str = option("asha", "asha: stop weak trials early at each epoch; none: run every trial to --epochs",
                            choices=["asha", "none"], role="identity")
    epochs: int = option(5, "epochs per trial (ASHA's longest run)", minimum=1, role="identity")
    cpus_per_trial: Optional[float] = option(None, "CPUs reserved by each pretraining trial's workers together "
                                                   "(default: the cluster's CPUs, less one for data loading, shared "
                                                   "by the concurrent trials)", minimum=0.1, role="identity")
    seed: int = option(0, "seed of the random search (which values the trials get)", minimum=0, role="identity")
