"""Downstream probe scores of embeddings: a simple classifier trained on some plates, scored on the others.

A self-supervised loss says little about what an encoder learned (SimCLR's loss
falls when the augmentations get easier), so representations are judged by how
well a *simple* classifier on frozen embeddings recovers what the screen is about:
the identity of each treatment (``treatment``), or treated vs control
(``control``). Folds are whole plates (:func:`grouped_folds`): sites of one well
are near-duplicates and a plate carries its own batch effect, so a probe scored
on sites of plates it was trained on would measure memory, not biology.

The headline ``score`` is balanced accuracy over the pooled out-of-fold
predictions (chance = 1 / number of classes), so a large control class cannot
carry it. :func:`rxray.evaluate.probe_sites.select_probe_sites` picks a small,
class-stratified sample of sites, and :func:`embed_batches` embeds them with an encoder in eval mode, so the
probe is cheap enough to run after every training epoch. With plate centring
(``center``, the default of ``rxray probe`` and of the per-epoch probe) every
plate's embeddings are first scaled on its own control sites, as a screen's
profiles are: otherwise an encoder that has learned to recognise plates (easy
for SimCLR when its colour augmentation is mild) looks worse than it is.

:func:`probe` is the ``rxray probe`` step: the same probes on a trained encoder
and on random-init encoders of the same architecture, side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from rxray import storage
from rxray.config import PROBE_CORRECTIONS
from rxray.evaluate.probe_sites import probe_dataset, probe_targets
from rxray.layout import CONTROL, plate_groups
from rxray.results import ProbeResult
from rxray.runner import step_function

if TYPE_CHECKING:
    import pandas as pd
    import ray.data
    import torch

    from rxray.config import ProbeConfig
    from rxray.models.inputs import InputRecipe

PROBE_METHODS = ("logistic", "knn")
PROBE_TABLE = "probe.csv"
# Encoder names in probe.csv: the checkpoint's, and random_init_seed<k> for the baselines.
TRAINED = "trained"
RANDOM_INIT = "random_init"
# Fewer folds than plates keeps the cost flat on a 24-plate screen; 5 leaves 80 % of plates to train on.
MAX_FOLDS = 5
NEIGHBORS = 5


def grouped_folds(groups: Sequence[Any], max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per fold; every group is tested once and never trains the fold it is tested in."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a grouped probe needs sites from at least 2 plates, got {n_groups}")
    splitter = GroupKFold(n_splits=min(max_folds, n_groups))
    return [(train, test) for train, test in splitter.split(np.zeros(len(groups)), groups=groups)]


def probe_score(X: np.ndarray, targets: Sequence[Any], groups: Sequence[Any], *, method: str = "logistic",
                max_folds: int = MAX_FOLDS, neighbors: int = NEIGHBORS,
                center_on: np.ndarray | None = None) -> dict[str, Any]:
    """Plate-grouped cross-validated probe of embeddings X (n, d) for ``targets``; higher ``score`` is better.

    Each fold standardises features and fits the probe (class-balanced logistic
    regression, or k-nearest neighbours with class-balanced votes) on its training plates only, then predicts
    the held-out plates. ``center_on`` (a boolean row mask of control sites) first
    centres and scales each plate's features on its own controls, removing plate
    batch effects the way a screen does (controls are known from the plate map).
    Returns ``score`` (balanced accuracy), ``accuracy``, ``f1_macro``, ``roc_auc``,
    ``chance``, and the counts of sites, classes, plates and folds.
    """
    from rxray.evaluate.metrics import classification_metrics

    X = np.asarray(X, dtype=np.float64)
    targets = np.asarray([str(t) for t in targets], dtype=object)
    groups = np.asarray(groups)
    if not len(X) == len(targets) == len(groups):
        raise ValueError(f"{len(X)} embeddings, {len(targets)} targets and {len(groups)} groups must match")
    if method not in PROBE_METHODS:
        raise ValueError(f"unknown probe method {method!r}; choose one of {', '.join(PROBE_METHODS)}")
    classes = sorted(set(targets.tolist()))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {classes}")
    if center_on is not None:
        from rxray.evaluate.correction import center_by_plate

        X = center_by_plate(X, groups, np.asarray(center_on, dtype=bool))
    folds = grouped_folds(groups, max_folds)
    proba = np.zeros((len(X), len(classes)))
    for train, test in folds:
        proba[test] = _fit_predict(X[train], targets[train], X[test], classes, method, neighbors)
    metrics = classification_metrics(targets, proba, labels=classes)
    return {"score": metrics["recall_macro"], "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
            "roc_auc": metrics["roc_auc"], "chance": 1.0 / len(classes), "n": int(len(X)), "classes": classes,
            "groups": int(len(np.unique(groups))), "folds": len(folds), "method": method}


def _fit_predict(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, classes: list[str], method: str,
                 neighbors: int) -> np.ndarray:
    """Class probabilities (n_test, len(classes)) from a probe fitted on one fold's training plates."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proba = np.zeros((len(X_test), len(classes)))
    present = sorted(set(y_train.tolist()))
    if len(present) == 1:  # a fold whose training plates hold one class can only predict that class
        proba[:, classes.index(present[0])] = 1.0
        return proba
    model = (LogisticRegression(max_iter=2000, class_weight="balanced") if method == "logistic"
             else KNeighborsClassifier(n_neighbors=min(neighbors, len(y_train))))
    fitted = make_pipeline(StandardScaler(), model).fit(X_train, y_train)
    columns = [classes.index(c) for c in fitted.classes_]
    votes = fitted.predict_proba(X_test)
    if method == "knn":  # 14 % controls are rarely 3 of 5 neighbours: votes / class share, as class_weight="balanced"
        votes = votes / np.array([(y_train == c).mean() for c in fitted.classes_])
    proba[:, columns] = votes / votes.sum(axis=1, keepdims=True)
    return proba


def embed_batches(encoder: "torch.nn.Module", batches: Iterable[dict[str, np.ndarray]], *,
                  mean: Sequence[float], std: Sequence[float],
                  device: "torch.device") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (n, d) float32 of every image in numpy ``batches`` (``image`` (B, 6, H, W) uint8 + metadata),
    and the batches' other columns in the same row order (by site_id when they carry it).

    The encoder runs in eval mode without gradients (batch norm uses its running
    statistics), on inputs normalised like training inputs (six stains, no plate
    gains, as pretraining sees them); the caller restores train mode.
    """
    from rxray.models.inputs import InputRecipe

    recipe = InputRecipe(tuple(mean), tuple(std))
    features, columns = embed_with_encoders({"encoder": encoder}, batches, recipe=recipe, device=device)
    return features["encoder"], columns


def embed_with_encoders(encoders: dict[str, "torch.nn.Module"], batches: Iterable[dict[str, np.ndarray]], *,
                        recipe: "InputRecipe",
                        device: "torch.device") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`embed_batches` for several encoders in one pass over ``batches``: features per encoder name, rows by
    site_id whatever order the blocks came in (the probes' solvers then see one order and give one score).

    Inputs follow ``recipe`` (:mod:`rxray.models.inputs`): the stains the encoders read, and
    plate gains when the recipe has them (then batches carry ``experiment`` and ``plate``).
    """
    import torch

    from rxray.models.device import autocast_for

    for encoder in encoders.values():
        encoder.eval()
    features: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    columns: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in batches:
            images = recipe.encoder_inputs(batch, device)
            for name, encoder in encoders.items():
                with autocast_for(device):
                    features[name].append(encoder(images).float().cpu().numpy())
            for name, values in batch.items():
                if name != "image":
                    columns.setdefault(name, []).append(np.asarray(values))
    if not any(features.values()):  # a worker whose share of the probe sites is empty
        return {name: np.zeros((0, getattr(encoder, "feature_dim", 0)), np.float32)
                for name, encoder in encoders.items()}, {}
    rows = {name: np.concatenate(parts) for name, parts in columns.items()}
    order = np.argsort(rows["site_id"], kind="stable") if "site_id" in rows else slice(None)
    return ({name: np.concatenate(parts)[order] for name, parts in features.items()},
            {name: values[order] for name, values in rows.items()})


def score_embeddings(X: np.ndarray, columns: dict[str, np.ndarray], *, task: str, method: str = "logistic",
                     correct: str = "none", control: str = CONTROL) -> dict[str, Any]:
    """:func:`probe_score` of embedded probe sites (``columns`` from :func:`embed_batches`), plates as groups;
    ``correct="center"`` first centres every plate on its own control sites."""
    if correct not in PROBE_CORRECTIONS:
        raise ValueError(f"unknown probe correction {correct!r}; choose one of {', '.join(PROBE_CORRECTIONS)}")
    treatments = np.asarray([str(t) for t in columns["treatment"]], dtype=object)
    groups = plate_groups(columns["experiment"], columns["plate"])
    return probe_score(X, probe_targets(treatments, task, control), groups, method=method,
                       center_on=(treatments == control) if correct == "center" else None)


@step_function("probe")
def probe(cfg: "ProbeConfig") -> ProbeResult:
    """`rxray probe`: plate-grouped probes on a trained encoder's embeddings beside random-init encoders'.

    A self-supervised encoder is only worth its training if simple probes on its frozen embeddings
    recover the biology better than an untrained encoder of the same architecture (a strong baseline for
    stain intensities). One Ray task (on a GPU with ``--gpu``) embeds the chosen sites with every encoder;
    each (encoder, task, method) is scored with the same plate-grouped folds. Writes ``probe.csv`` (one
    row per score) and ``_manifest.json`` (config, counts and the comparison per task and method).
    """
    import pandas as pd
    import ray

    from rxray.config import ConfigError
    from rxray.evaluate.correction import MIN_PLATE_CONTROLS
    from rxray.runtime import Timer, ensure_ray, hide_progress_bars, verbose
    from rxray.models.checkpoints import model_provenance, require_checkpoint

    ensure_ray()
    timer = Timer()
    checkpoint = require_checkpoint(cfg.model, "probe.model")
    # The sample is stratified for treated vs control, so a many-treatment screen still gets controls on every plate.
    plate_controls = MIN_PLATE_CONTROLS if cfg.correct == "center" else 0
    try:
        sites, sample = probe_dataset(cfg.data, task="control", treatments=cfg.treatments, max_sites=cfg.max_sites,
                                      seed=cfg.seed, plate_controls=plate_controls)
    except ValueError as exc:
        raise ConfigError("probe.treatments", str(exc)) from None
    names = [TRAINED, *(f"{RANDOM_INIT}_seed{seed}" for seed in range(cfg.baseline_seeds))]
    print(f"probe: {len(sample)} sites of {sample['treatment'].nunique()} treatment(s) on "
          f"{len(set(plate_groups(sample['experiment'], sample['plate'])))} plates; encoders: {', '.join(names)}",
          flush=True)
    with timer.time("embed"):
        if not verbose():  # read inside one task: its bar would print as text lines, not as a live bar
            hide_progress_bars(sites)
        task = ray.remote(num_cpus=1, num_gpus=1 if cfg.gpu else 0)(_embed_probe_sites)
        features, columns = ray.get(task.remote(checkpoint["uri"], sites, cfg.baseline_seeds, cfg.batch_size,
                                                cfg.gpu))
    if len(columns.get("site_id", ())) != len(sample):
        raise RuntimeError(f"{len(sample)} probe sites chosen but {len(columns.get('site_id', ()))} read back")

    rows = []
    with timer.time("probes"):
        for name in names:
            for task_name in cfg.tasks:
                for method in cfg.methods:
                    result = score_embeddings(features[name], columns, task=task_name, method=method,
                                              correct=cfg.correct)
                    rows.append({"encoder": name, "task": task_name, "method": method,
                                 **{key: result[key] for key in ("score", "roc_auc", "f1_macro", "accuracy",
                                                                 "chance", "n", "groups", "folds")}})
    table = pd.DataFrame(rows)
    comparison = compare_to_baselines(table)
    storage.write_text(storage.join(cfg.out, PROBE_TABLE), table.to_csv(index=False))
    print(format_comparison(comparison), flush=True)
    return ProbeResult(counts={"sites": len(sample), "plates": int(table["groups"].iloc[0])},
                       timings=timer.seconds, outputs=[PROBE_TABLE], model=model_provenance(checkpoint),
                       comparison=comparison)


def _embed_probe_sites(checkpoint_uri: str, sites: "ray.data.Dataset", baseline_seeds: int, batch_size: int,
                       gpu: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The Ray task of `rxray probe`: :func:`embed_probe_batches` of the probe sites, read inside the task."""
    from rxray.models.device import torch_device
    from rxray.models.checkpoints import load_checkpoint

    device = torch_device(gpu, where="the probe task")
    return embed_probe_batches(load_checkpoint(checkpoint_uri),
                               sites.iter_batches(batch_size=batch_size, batch_format="numpy"), baseline_seeds, device)


def embed_probe_batches(checkpoint: dict[str, Any], batches: Iterable[dict[str, np.ndarray]], baseline_seeds: int,
                        device: "torch.device") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features of the batches' images from the checkpoint's encoder and ``baseline_seeds`` random-init ones,
    all given the inputs the checkpoint was trained on (:class:`~rxray.models.inputs.InputRecipe`)."""
    import torch

    from rxray.models.inputs import InputRecipe
    from rxray.models.checkpoints import checkpoint_encoder

    recipe = InputRecipe.from_checkpoint(checkpoint)
    encoders = {TRAINED: checkpoint_encoder(checkpoint)}
    for seed in range(baseline_seeds):
        torch.manual_seed(seed)
        encoders[f"{RANDOM_INIT}_seed{seed}"] = checkpoint_encoder(checkpoint, trained=False)
    encoders = {name: encoder.to(device) for name, encoder in encoders.items()}
    return embed_with_encoders(encoders, batches, recipe=recipe, device=device)


def compare_to_baselines(table: "pd.DataFrame") -> list[dict[str, Any]]:
    """Per task and method: the trained encoder's score, the random-init scores, and the margin over the best."""
    comparison = []
    for (task, method), group in table.groupby(["task", "method"], sort=False):
        trained = float(group.loc[group["encoder"] == TRAINED, "score"].iloc[0])
        baselines = group.loc[group["encoder"] != TRAINED, "score"].astype(float).tolist()
        comparison.append({"task": task, "method": method, "trained": round(trained, 4),
                           "random_init": [round(b, 4) for b in baselines],
                           "margin": round(trained - max(baselines), 4) if baselines else None,
                           "chance": float(group["chance"].iloc[0])})
    return comparison


def format_comparison(comparison: list[dict[str, Any]]) -> str:
    """The comparison as a small text table (balanced accuracy; margin over the best random-init encoder)."""
    lines = [f"{'task':<10} {'method':<9} {'trained':>8} {'random init':>24} {'margin':>7} {'chance':>7}"]
    for row in comparison:
        baselines = ", ".join(f"{b:.3f}" for b in row["random_init"]) or "-"
        margin = f"{row['margin']:+.3f}" if row["margin"] is not None else "-"
        lines.append(f"{row['task']:<10} {row['method']:<9} {row['trained']:>8.3f} {baselines:>24} {margin:>7} "
                     f"{row['chance']:>7.3f}")
    return "\n".join(lines)
