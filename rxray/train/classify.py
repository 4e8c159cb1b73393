"""`rxray finetune`: transfer-learning classifiers on ingest shards with Ray Train, scored on a held-out test split.

The driver: it plans the task and the grouped splits (:mod:`rxray.train.tasks`), measures
the plate gains (:mod:`rxray.train.plate_norm`, ``--no-plate-norm`` turns them off),
trains :class:`~rxray.train.classifier_step.ClassifierStep` in the shared training loop
(:mod:`rxray.train.epochs`; it runs and recovers exactly like pretraining: one
checkpoint per epoch under ``<out>/classifier/``, rerunning the command resumes it),
writes the best validation epoch's model as ``<out>/checkpoint.pt`` (what
``load_classifier(out)``, ``rxray explain`` and ``rxray embed`` read) and scores it on
the test split (:mod:`rxray.train.predictions`).

Outputs under ``out``: config.yaml, splits.json/splits.csv, metrics.jsonl (per
epoch), checkpoint.pt, predictions.parquet, metrics.json, confusion_matrix.png,
pr_curve.png, roc_curve.png and _manifest.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rxray import storage
from rxray.batch.pool import PoolPlan
from rxray.config import ConfigError, FinetuneConfig
from rxray.layout import CONTROL, N_CHANNELS, plate_groups
from rxray.models.checkpoints import (CHECKPOINT_FILE, Checkpoint, checkpoint_epoch, latest_checkpoint,
                                      read_checkpoint, write_checkpoint)
from rxray.outputs import read_manifest
from rxray.results import FinetuneResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray, json_safe
from rxray.models.classifier import build_classifier
from rxray.models.inputs import InputRecipe
from rxray.train.classifier_step import ClassifierStep, EncoderStart
from rxray.train.epoch_log import read_metrics
from rxray.train.launch import check_rerun, input_statistics, launch, worker_cpus
from rxray.train.plate_norm import plate_gains
from rxray.train.predictions import (FIGURES, PREDICTION_COLUMNS, UNLABELLED_FILE, WORKER_PREDICTIONS_FILE,
                                     compound_predictions, plate_control_zscores, predict, read_worker_predictions,
                                     write_evaluation)
from rxray.train.tasks import (TaskPlan, class_weights, make_splits, plan_task, read_metadata, split_dataset,
                               unlabelled_dataset, unlabelled_treatments, write_split_files)

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

RUN_NAME = "classifier"
MODEL_FILE = CHECKPOINT_FILE  # <out>/checkpoint.pt: the selected (best validation) model
METRICS_JSON = "metrics.json"
# control-z decision rule: positive at this many robust SDs above the plate's controls (a screen's usual hit call).
CONTROL_Z = 3.0


@dataclass
class _Run:
    """What the driver works out before training: statistics, starting point, task, splits, progress so far."""

    channel_mean: list[float]
    channel_std: list[float]
    start: EncoderStart
    plan: TaskPlan
    splits: dict[str, Any]
    done: int
    resume_from: str | None
    stopped: bool
    unlabelled: list[str] = dataclasses.field(default_factory=list)  # treated compounds without a label
    unlabelled_sites: int = 0
    gains: dict[str, list[float]] | None = None  # plate group -> stain gains, once measured

    def plate_gains(self, cfg: FinetuneConfig) -> dict[str, list[float]]:
        """The plate gains of the task's plates ({} with --no-plate-norm), measured on first use."""
        if self.gains is None:
            plates = plate_groups(*zip(*self.splits["plates"]))
            self.gains = plate_gains(cfg.data, plates) if cfg.plate_norm else {}
        return self.gains

    @property
    def train_sites(self) -> list[int]:
        """Training sites per class, in logit order."""
        return [self.splits["counts"]["train"]["classes"].get(c, 0) for c in self.plan.classes]


@step_function("finetune")
def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train (or resume, or report complete) a classifier into ``cfg.out``, then score it on the test split."""
    timer = Timer()
    with timer.time("prepare"):
        run = _prepare(cfg)
    if run.done >= cfg.epochs or run.stopped:
        how = f"stopped early after {run.done} epochs" if run.done < cfg.epochs else f"{run.done} of {cfg.epochs} epochs"
        print(f"finetune: {cfg.out} is already complete ({how}); nothing to train", flush=True)
        recorded = read_manifest(cfg.out)
        if recorded is not None and recorded["config"].get("epochs") == cfg.epochs:
            return FinetuneResult.from_manifest(recorded, status="complete", unchanged=True,
                                                history=read_metrics(cfg.out))
        # Early stopping ended it before a larger --epochs: the manifest is rewritten for this config below,
        # so the rerun policy finds it complete next time instead of continuing it forever.
    else:
        _train(cfg, run, timer)
    selected = _write_selected_model(cfg)
    test_metrics = _evaluate(cfg, run, selected, timer)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 3)
    counts = run.splits["counts"]
    return FinetuneResult(
        status="trained", task=run.plan.task, classes=list(run.plan.classes),
        negative_classes=list(run.plan.negative_classes), checkpoint=selected.uri, best_epoch=selected.epoch,
        epochs_completed=selected.epochs_trained, resumed_from=run.done,
        stopped_early=bool((selected.early_stopping or {}).get("stopped")), encoder_init=run.start.description,
        splits=json_safe(run.splits["document"]), counts=json_safe({"sites": {s: counts[s]["sites"] for s in counts},
                                                         "classes": {s: counts[s]["classes"] for s in counts}}),
        test=json_safe(_headline(test_metrics) or {}), figures=list(FIGURES) if test_metrics else [],
        timings=timer.seconds, history=read_metrics(cfg.out))


def _prepare(cfg: FinetuneConfig) -> _Run:
    """Check the inputs and work out the task, the splits and the progress so far; ConfigError on bad input."""
    mean, std = input_statistics(cfg)
    start = _starting_point(cfg)
    meta = read_metadata(cfg)
    plan = plan_task(cfg, meta[cfg.label_col].tolist())
    unlabelled = unlabelled_treatments(meta, cfg.label_col)
    unlabelled_sites = int(meta["treatment"].isin(unlabelled).sum())
    meta["class"] = plan.class_indices(meta[cfg.label_col])
    meta = meta[meta["class"] >= 0].reset_index(drop=True)
    controls = meta["treatment"] == CONTROL
    if cfg.with_conc and controls.any() and not controls.all():
        print(f"finetune: warning: --with-conc: {CONTROL} sites carry no concentration (0), so the dose alone tells "
              f"them from treated sites; compare with a run without it", flush=True)
    splits = make_splits(cfg, meta, plan)
    _check_rerun(cfg, splits)
    done, resume_from, stopped = _training_state(cfg)
    return _Run(mean, std, start, plan, splits, done, resume_from, stopped, unlabelled, unlabelled_sites)


def _train(cfg: FinetuneConfig, run: _Run, timer: Timer) -> None:
    """Write the run's config and splits, then train the remaining epochs on Ray Train."""
    _check_trainable(cfg, run)
    if run.done:
        print(f"finetune: resuming from epoch {run.done} ({run.resume_from})", flush=True)
    storage.makedirs(cfg.out)
    write_split_files(cfg, run.splits)
    ensure_ray()
    cpus = worker_cpus(cfg.workers, cfg.gpu, None)
    gains = run.plate_gains(cfg)
    datasets = {"train": split_dataset(cfg, run.plan, run.splits, "train", gains=gains)}
    if run.splits["counts"]["val"]["sites"]:
        datasets["val"] = split_dataset(cfg, run.plan, run.splits, "val", gains=gains)
    rows = {name: run.splits["counts"][name]["sites"] for name in datasets}
    if run.splits["counts"]["test"]["sites"]:  # what evaluation scores: predicted by the trained worker itself
        splits = _evaluated_splits(cfg, run)
        datasets["predict"] = _prediction_dataset(cfg, run, splits)
        rows["predict"] = sum(run.splits["counts"][split]["sites"] for split in splits) + run.unlabelled_sites
    predictions = storage.join(cfg.out, WORKER_PREDICTIONS_FILE) if "predict" in datasets else None
    weights = class_weights(run.train_sites, cfg.class_weights)
    with timer.time("fit"):
        launch(cfg, lambda settings: ClassifierStep(cfg, settings, run.plan, run.start, weights,
                                                    has_val="val" in datasets, predictions_uri=predictions),
               run_name=RUN_NAME, recipe=InputRecipe(tuple(run.channel_mean), tuple(run.channel_std),
                                                     tuple(cfg.channels), gains),
               datasets=datasets, rows=rows, resume_from=run.resume_from,
               train_rows=run.splits["counts"]["train"]["sites"], cpus=cpus, what="fine-tuning")


def _evaluate(cfg: FinetuneConfig, run: _Run, selected: Checkpoint, timer: Timer) -> dict[str, Any] | None:
    """Score the selected model on the test split and write metrics.json, predictions and plots (None: no test split)."""
    if not run.splits["counts"]["test"]["sites"]:
        print("finetune: --test-frac 0 leaves no test split; no test metrics", flush=True)
        return None
    ensure_ray()
    with timer.time("evaluate"):
        predicted = _split_predictions(cfg, run, selected, _evaluated_splits(cfg, run))
        threshold = _validation_threshold(cfg, run, predicted.get("val"))
        metrics = write_evaluation(cfg.out, predicted["test"], run.plan, threshold)
        metrics["unlabelled"] = _unlabelled_calls(cfg, run, predicted["unlabelled"], threshold)
        metrics.update(task=run.plan.task, label_col=run.plan.label_col, classes=run.plan.classes,
                       positive=run.plan.positive, negative_classes=run.plan.negative_classes, split="test",
                       best_epoch=selected.epoch, selection_metric=selected.selection_metric)
        storage.write_text(storage.join(cfg.out, METRICS_JSON), json.dumps(json_safe(metrics), indent=2))
    return metrics


def _evaluated_splits(cfg: FinetuneConfig, run: _Run) -> list[str]:
    """The splits evaluation predicts: test, and validation when the decision threshold is learnt there."""
    return ["val", "test"] if _threshold_needs_validation(cfg, run) else ["test"]


def _prediction_dataset(cfg: FinetuneConfig, run: _Run, splits: list[str]) -> "ray.data.Dataset":
    """The rows evaluation predicts: the splits' task rows and the compounds without a label (labelled -1)."""
    gains = run.plate_gains(cfg)
    dataset = split_dataset(cfg, run.plan, run.splits, splits, keep=PREDICTION_COLUMNS, gains=gains)
    if run.unlabelled:
        dataset = dataset.union(unlabelled_dataset(cfg, run.plan, keep=PREDICTION_COLUMNS, gains=gains))
    return dataset


def _split_predictions(cfg: FinetuneConfig, run: _Run, selected: Checkpoint, splits: list[str]) -> dict[str, Any]:
    """The selected model's predictions on each of ``splits`` and, as ``unlabelled``, on the compounds without a
    label: the ones the training worker wrote after its last epoch, else from one pass of one inference pool.

    Plate control z-scores with --plate-scores: a plate belongs to one split, so scoring the
    splits together gives each plate the scores it would get alone. Unlabelled compounds keep
    plain scores (their plates' controls may be in no split scored here).
    """
    from rxray.data.splits import group_keys

    predictions = read_worker_predictions(storage.join(cfg.out, WORKER_PREDICTIONS_FILE), selected.epoch)
    if predictions is None:  # a run trained before (or cut off between training and evaluation)
        cpus = worker_cpus(cfg.workers, cfg.gpu, None)
        batches = math.ceil(sum(run.splits["counts"][split]["sites"] for split in splits) / cfg.batch_size)
        # The training workers' share of the cluster, so prediction fits wherever training did; never more actors
        # than batches (each actor loads torch and the model before its first batch).
        pool = PoolPlan(actors=max(1, min(cfg.workers, batches)), threads=max(1, math.floor(cpus)), gpu=cfg.gpu,
                        cpus_per_actor=cpus)
        predictions = predict(_prediction_dataset(cfg, run, splits), selected.uri, batch_size=cfg.batch_size,
                              pool=pool)
    unlabelled = (predictions["label"] < 0).to_numpy()
    labelled = predictions[~unlabelled].reset_index(drop=True)
    if cfg.plate_scores:
        labelled = plate_control_zscores(labelled, run.plan)
    split_of_row = group_keys(labelled, cfg.split_by).map(run.splits["assignment"])
    return {**{split: labelled[split_of_row == split].reset_index(drop=True) for split in splits},
            "unlabelled": predictions[unlabelled].reset_index(drop=True)}


def _unlabelled_calls(cfg: FinetuneConfig, run: _Run, predictions: "pd.DataFrame",
                      threshold: float | None) -> list[dict[str, Any]]:
    """Each compound without a label and the class its mean probability calls, written as unlabelled.csv; [] when
    every compound has one."""
    if not run.unlabelled:
        return []
    # Plain scores (see _split_predictions): a binary call takes the class of the higher mean probability.
    compounds = compound_predictions(predictions, run.plan, None if cfg.plate_scores else threshold)
    storage.write_text(storage.join(cfg.out, UNLABELLED_FILE), compounds.to_csv(index=False))
    print("finetune: compounds without a label: " + ", ".join(
        f"{r.treatment} -> {r.predicted} ({r.probability:.2f})" for r in compounds.itertuples()), flush=True)
    return compounds[["treatment", "n_sites", "predicted", "probability"]].to_dict("records")


def decision_rule(cfg: FinetuneConfig) -> str:
    """The binary decision rule a config asks for: control-z, val-f1 or argmax (auto resolved)."""
    if cfg.threshold != "auto":
        return cfg.threshold
    return "control-z" if cfg.plate_scores else "val-f1"


def _threshold_needs_validation(cfg: FinetuneConfig, run: _Run) -> bool:
    """Whether the decision threshold comes from predictions on the validation split (val-f1 on a binary task)."""
    return (run.plan.task == "binary" and decision_rule(cfg) == "val-f1"
            and bool(run.splits["counts"]["val"]["sites"]))


def _validation_threshold(cfg: FinetuneConfig, run: _Run, validation: "pd.DataFrame | None") -> float | None:
    """Binary tasks: the decision threshold on the positive-class probability; None (argmax) otherwise.

    control-z: sigmoid(CONTROL_Z), i.e. a site is called positive when it scores
    CONTROL_Z robust standard deviations above its own plate's control sites, the usual
    hit call of a screen; it needs no validation plate, whose one or two plates would
    make the cut as noisy as the sites near it. val-f1: the F1-maximising threshold of
    the selected model on the validation split's ``validation`` predictions (class weights
    shift probabilities away from calibration, so 0.5 is not the natural cut). The test
    split never informs it.
    """
    from rxray.evaluate.metrics import best_f1_threshold

    rule = decision_rule(cfg)
    if run.plan.task != "binary" or rule == "argmax":
        return None
    if rule == "control-z":
        threshold = 1.0 / (1.0 + math.exp(-CONTROL_Z))
        print(f"finetune: decision threshold z >= {CONTROL_Z:g} against each plate's control sites "
              f"(probability {threshold:.3f})", flush=True)
        return threshold
    if validation is None:
        return None
    probs = np.stack(validation["probs"].to_numpy()).astype(np.float64)
    threshold = best_f1_threshold(validation["label"].to_numpy() == 1, probs[:, 1])
    print(f"finetune: decision threshold {threshold:.3f} (best F1 on the {len(validation)} validation sites)",
          flush=True)
    return threshold


def _starting_point(cfg: FinetuneConfig) -> EncoderStart:
    """The encoder the run starts from: a SimCLR checkpoint's (--encoder), --weights, or random."""
    if cfg.encoder:
        try:
            simclr = read_checkpoint(cfg.encoder)
        except FileNotFoundError as exc:
            raise ConfigError("finetune.encoder", str(exc)) from None
        except ValueError as exc:
            raise ConfigError("finetune.encoder", str(exc)) from None
        if simclr.in_channels != N_CHANNELS:
            raise ConfigError("finetune.encoder", f"{simclr.uri} takes {simclr.in_channels} channels; stain "
                                                  f"subsets are cut from a {N_CHANNELS}-channel encoder")
        return EncoderStart(simclr.backbone, simclr.stem, simclr.uri, f"simclr:{simclr.uri}")
    if cfg.weights:
        from rxray.models.weights import WeightsError

        try:  # build once so a bad file fails in one line before any worker starts
            build_classifier(cfg, 2, backbone=cfg.backbone, stem=cfg.stem, weights=cfg.weights)
        except WeightsError as exc:
            raise ConfigError("finetune.weights", str(exc)) from None
        return EncoderStart(cfg.backbone, cfg.stem, None, f"weights:{cfg.weights}")
    return EncoderStart(cfg.backbone, cfg.stem, None, "random")


def _check_rerun(cfg: FinetuneConfig, splits: dict[str, Any]) -> None:
    """A rerun into an existing output must keep the settings that shaped it, and get the same splits."""
    from rxray.data.splits import read_splits

    check_rerun(cfg, "finetune", "a finished classifier")
    written = read_splits(cfg.out)
    if written is not None and written["groups"] != splits["assignment"]:
        raise ConfigError("finetune.data", f"the groups in {cfg.data} no longer give the splits {cfg.out} was "
                                           f"trained with; use a new --out")




def _check_trainable(cfg: FinetuneConfig, run: _Run) -> None:
    """Every class needs training sites, and every worker a full batch; say so before any worker starts."""
    plan, counts = run.plan, run.splits["counts"]
    absent = [c for c, n in zip(plan.classes, run.train_sites) if n == 0]
    if absent:
        raise ConfigError("finetune.classes" if plan.task == "multiclass" else "finetune.positive",
                          f"no training sites of {', '.join(absent)} in the training {cfg.split_by}s "
                          f"{counts['train']['groups']}; choose other classes or another --seed")
    rows = counts["train"]["sites"]
    if rows // cfg.workers < cfg.batch_size:
        raise ConfigError("finetune.batch_size", f"{cfg.batch_size} per worker x {cfg.workers} workers needs at "
                                                 f"least {cfg.batch_size * cfg.workers} training sites; the "
                                                 f"training split has {rows}")
    for split in ("val", "test"):
        missing = [c for c in plan.classes if counts[split]["sites"] and not counts[split]["classes"].get(c)]
        if missing:
            print(f"finetune: warning: the {split} split has no sites of {', '.join(missing)}", flush=True)


def _training_state(cfg: FinetuneConfig) -> tuple[int, str | None, bool]:
    """Epochs already trained into ``cfg.out``, the latest checkpoint's URI, and whether early stopping ended it."""
    try:
        latest = latest_checkpoint(storage.join(cfg.out, RUN_NAME))
    except FileNotFoundError:
        return 0, None, False
    last = read_checkpoint(latest)
    stopped = bool((last.early_stopping or {}).get("stopped"))
    return checkpoint_epoch(latest) or last.epoch, latest, stopped



def _write_selected_model(cfg: FinetuneConfig) -> Checkpoint:
    """Write the selected model (best validation epoch) as ``<out>/checkpoint.pt``; returns it (with ``uri``)."""
    last = read_checkpoint(storage.join(cfg.out, RUN_NAME))
    best = last.best or {"epoch": last.epoch, "head": last.head, "encoder": None}
    selected = dataclasses.replace(last, head=best["head"], epoch=best["epoch"], epochs_trained=last.epoch, best=None,
                                   encoder=best["encoder"] if best["encoder"] is not None else last.encoder)
    selected.uri = write_checkpoint(selected, storage.join(cfg.out, MODEL_FILE))
    return selected


def _headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The test metrics a summary shows."""
    if metrics is None:
        return None
    keys = ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc", "roc_auc_interval", "pr_auc", "prevalence",
            "threshold", "n", "compounds", "unlabelled")
    return {k: metrics[k] for k in keys if k in metrics}
