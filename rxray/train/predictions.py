"""A trained classifier on a labelled split: predictions from the shared inference pool, and the test evaluation.

Predictions stream through a Ray Data actor pool (:mod:`rxray.batch.pool`; a missing GPU
is a clear error, as in embed and explain): only (site, label, class probabilities) rows
reach the driver. The classifier gets its inputs by the checkpoint's input recipe
(:mod:`rxray.models.inputs`), its plate gains included, as in training.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from rxray import storage
from rxray.batch.pool import InferenceActor, PoolPlan, map_batches
from rxray.layout import CONTROL, plate_groups
from rxray.data.shards import IMAGE_COLUMN
from rxray.models.inputs import InputRecipe
from rxray.train.tasks import GAIN_COLUMN, SITE_COLUMNS, TaskPlan

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

PREDICTIONS_FILE = "predictions.parquet"
COMPOUNDS_FILE = "compounds.csv"  # the test split's compounds: label, sites, call (mean probability over sites)
UNLABELLED_FILE = "unlabelled.csv"  # the calls for compounds without a label
FIGURES = ("confusion_matrix.png", "pr_curve.png", "roc_curve.png")
# Columns of the test predictions besides the class: metadata and the dose as recorded (NaN for controls).
PREDICTION_COLUMNS = (*SITE_COLUMNS, "treatment_conc")
# A plate's control logits closer together than this are a saturated classifier, not a scale to divide by.
MIN_LOGIT_SPREAD = 0.1


class PredictBatch(InferenceActor):
    """Ray Data callable class: the classifier loads once; labelled batch in, (site, label, class probabilities) out."""

    def __init__(self, checkpoint_uri: str, gpu: bool = False, threads: int | None = None):
        from rxray.models.classifier import load_classifier

        super().__init__(gpu, threads)
        classifier, checkpoint = load_classifier(checkpoint_uri)
        self.classifier = classifier.to(self.device)
        self.with_conc = bool(checkpoint.get("with_conc"))
        self.views = int(checkpoint.get("orientations") or 1)
        self.recipe = InputRecipe.from_checkpoint(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's metadata and labels with ``probs`` (B, n_classes) float32."""
        import torch

        from rxray.models.classifier import class_probabilities

        conc = torch.from_numpy(np.array(batch["conc"], dtype=np.float32)).to(self.device)
        with torch.inference_mode(), self.precision():
            probabilities = class_probabilities(self.classifier, self.recipe.classifier_inputs(batch, self.device),
                                                conc if self.with_conc else None, self.views)
        out = {name: values for name, values in batch.items() if name not in (IMAGE_COLUMN, GAIN_COLUMN)}
        out["probs"] = probabilities.cpu().numpy()
        return out


def predict(dataset: "ray.data.Dataset", checkpoint_uri: str, *, batch_size: int, pool: PoolPlan) -> "pd.DataFrame":
    """Predictions for a labelled split (:func:`rxray.train.tasks.split_dataset`), one small row per site."""
    import pandas as pd

    predicted = map_batches(dataset, PredictBatch, pool, batch_size=batch_size, checkpoint_uri=checkpoint_uri)
    parts = []
    for batch in predicted.iter_batches(batch_size=4096, batch_format="numpy"):
        frame = pd.DataFrame({k: v for k, v in batch.items() if k != "probs"})
        frame["probs"] = list(np.asarray(batch["probs"], dtype=np.float32))
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=[*PREDICTION_COLUMNS, "label", "conc", "probs"])
    return pd.concat(parts, ignore_index=True).sort_values("site_id", ignore_index=True)


WORKER_PREDICTIONS_FILE = "_predictions.parquet"  # the training worker's predictions (rxray.train.classifier_step)


def write_worker_predictions(uri: str, shares: list["pd.DataFrame"], best_epoch: int) -> None:
    """A training worker's predictions (batches of :func:`predict`'s rows) as one table, with the epoch whose weights
    made them."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.concat(shares, ignore_index=True) if shares else pd.DataFrame()
    probs = np.stack(frame.pop("probs").to_numpy()).astype(np.float32) if len(frame) else np.zeros((0, 0), np.float32)
    table = pa.Table.from_pandas(frame, preserve_index=False).append_column(
        "probs", pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), max(probs.shape[1], 1)))
    table = table.replace_schema_metadata({"best_epoch": str(best_epoch)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_worker_predictions(uri: str, best_epoch: int | None) -> "pd.DataFrame | None":
    """The training workers' predictions at ``uri`` if they were made with ``best_epoch``'s weights, else None."""
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return None
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    if (table.schema.metadata or {}).get(b"best_epoch") != str(best_epoch).encode():
        return None
    frame = table.drop(["probs"]).to_pandas()
    frame["probs"] = list(np.asarray(table.column("probs").combine_chunks().flatten()).reshape(len(frame), -1))
    return frame.sort_values("site_id", ignore_index=True)


def plate_control_zscores(predictions: "pd.DataFrame", plan: TaskPlan) -> "pd.DataFrame":
    """Binary predictions with each plate's positive-class logits as robust z-scores against its control sites.

    A classifier's scores drift from plate to plate with what plate normalisation of
    the pixels leaves (offsets, illumination), so one threshold learnt on validation
    plates calls whole control wells positive elsewhere while the ranking within each
    plate is right. Screens normalise every readout to the plate's negative controls
    (their positions are known from the plate map) as a z-score; this does the same to
    the score: z = (logit - median of the plate's control logits) / their spread (1.4826
    x MAD, floored at ``MIN_LOGIT_SPREAD``), reported as probability sigmoid(z), so the
    threshold learnt on validation plates is in units of control variation. Plates
    without control sites keep their scores.
    """
    if plan.task != "binary" or predictions.empty:
        return predictions
    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float64)
    logit = np.log(np.clip(probs[:, 1], 1e-7, 1 - 1e-7)) - np.log(np.clip(probs[:, 0], 1e-7, 1 - 1e-7))
    plates = np.asarray(plate_groups(predictions["experiment"], predictions["plate"]))
    is_control = (predictions["treatment"] == CONTROL).to_numpy()
    z = logit.copy()
    for plate in np.unique(plates[is_control]):
        rows = plates == plate
        controls = logit[rows & is_control]
        centre = np.median(controls)
        spread = max(1.4826 * float(np.median(np.abs(controls - centre))), MIN_LOGIT_SPREAD)
        z[rows] = (logit[rows] - centre) / spread
    positive = 1.0 / (1.0 + np.exp(-z))
    centred = predictions.copy()
    centred["probs"] = list(np.stack([1.0 - positive, positive], axis=1).astype(np.float32))
    return centred


COMPOUND_COLUMNS = ["treatment", "label", "n_sites", "predicted", "probability", "correct"]


def compound_predictions(predictions: "pd.DataFrame", plan: TaskPlan, threshold: float | None = None
                         ) -> "pd.DataFrame":
    """One row per treated compound: its label, sites, and the class its mean probabilities call.

    A compound's call is the class of highest mean probability over its sites (binary
    tasks: the positive class when its mean probability reaches ``threshold``); controls
    are no compound. ``label`` and ``correct`` are empty for unlabelled compounds (label -1).
    """
    import pandas as pd

    from rxray.evaluate.metrics import predicted_classes

    treated = predictions[predictions["treatment"] != CONTROL]
    rows = []
    for treatment, group in treated.groupby("treatment", sort=True):
        mean = np.stack(group["probs"].to_numpy()).astype(np.float64).mean(axis=0)
        call = int(predicted_classes(mean[None, :], threshold)[0])
        label = int(group["label"].iloc[0])
        rows.append({"treatment": str(treatment), "label": plan.classes[label] if label >= 0 else None,
                     "n_sites": int(len(group)), "predicted": plan.classes[call], "probability": float(mean[call]),
                     "correct": bool(call == label) if label >= 0 else None})
    return pd.DataFrame(rows, columns=COMPOUND_COLUMNS)


def write_evaluation(out: str, predictions: "pd.DataFrame", plan: TaskPlan,
                     threshold: float | None = None) -> dict[str, Any]:
    """Test metrics (metrics.json), predictions.parquet and the three plots; returns the metrics.

    ``threshold`` (binary tasks): the positive-class probability from which a site
    is called positive, chosen on the validation split; the headline metrics use
    it and ``at_argmax`` keeps the plain highest-probability ones.
    """
    from rxray.evaluate.metrics import classification_metrics, roc_auc_interval
    from rxray.evaluate.plots import plot_confusion_matrix, plot_pr_curve, plot_roc_curve

    y = predictions["label"].to_numpy(dtype=np.int64)
    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float64)
    names = [plan.classes[i] for i in y]
    metrics = classification_metrics(names, probs, labels=plan.classes, threshold=threshold)
    if plan.task == "binary":
        metrics["prevalence"] = float(np.mean(y == 1))
        metrics["threshold"] = 0.5 if threshold is None else threshold
        argmax = classification_metrics(names, probs, labels=plan.classes)
        metrics["at_argmax"] = {key: argmax[key] for key in ("accuracy", "precision", "recall", "f1",
                                                             "confusion_matrix")}
        wells = predictions["well_id"].to_numpy() if "well_id" in predictions else None
        metrics["roc_auc_interval"] = roc_auc_interval(y == 1, probs[:, 1], wells)
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), plan.classes, storage.join(out, FIGURES[0]))
    plot_pr_curve(y, probs, storage.join(out, FIGURES[1]), labels=plan.classes)
    plot_roc_curve(y, probs, storage.join(out, FIGURES[2]), labels=plan.classes)
    storage.write_bytes(storage.join(out, PREDICTIONS_FILE), _predictions_parquet(predictions, plan, threshold))
    compounds = compound_predictions(predictions, plan, threshold)
    storage.write_text(storage.join(out, COMPOUNDS_FILE), compounds.to_csv(index=False))
    metrics["compounds"] = {"n": int(len(compounds)),
                            "accuracy": float(compounds["correct"].mean()) if len(compounds) else None}
    return metrics


def _predictions_parquet(predictions: "pd.DataFrame", plan: TaskPlan, threshold: float | None = None) -> bytes:
    """predictions.parquet: metadata, true and predicted class names, and the class probabilities (logit order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rxray.evaluate.metrics import predicted_classes

    probs = np.stack(predictions["probs"].to_numpy()).astype(np.float32) if len(predictions) else \
        np.zeros((0, len(plan.classes)), np.float32)
    classes = np.asarray(plan.classes, dtype=object)
    y = predictions["label"].to_numpy(dtype=np.int64)
    columns = {name: pa.array(predictions[name].to_numpy()) for name in PREDICTION_COLUMNS if name in predictions}
    columns.update({
        "label": pa.array(classes[y].tolist(), pa.string()),
        "predicted": pa.array(classes[predicted_classes(probs, threshold)].tolist() if len(probs) else [],
                              pa.string()),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), len(plan.classes)),
    })
    table = pa.table(columns).replace_schema_metadata({"classes": json.dumps(plan.classes)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
