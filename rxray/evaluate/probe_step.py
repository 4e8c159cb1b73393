"""`rxray probe`: plate-grouped probes on a trained encoder's embeddings beside random-init encoders'.

The probe sites (:mod:`rxray.evaluate.probe_sites`) are embedded here, with the trained
encoder and random-init encoders of the same architecture in one pass, each given the
inputs its checkpoint was trained on; :mod:`rxray.evaluate.probe` scores them. The same
embedding serves SimCLR's per-epoch probe (:func:`embed_batches`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from rxray import storage
from rxray.evaluate.probe import (RANDOM_INIT, TRAINED, compare_to_baselines, format_comparison,
                                  score_embeddings)
from rxray.evaluate.probe_sites import probe_dataset
from rxray.layout import plate_groups
from rxray.results import ProbeResult
from rxray.runner import step_function

if TYPE_CHECKING:
    import ray.data
    import torch

    from rxray.config import ProbeConfig
    from rxray.models.inputs import InputRecipe

PROBE_TABLE = "probe.csv"


def embed_batches(encoder: "torch.nn.Module", batches: Iterable[dict[str, np.ndarray]], *, recipe: "InputRecipe",
                  device: "torch.device") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (n, d) float32 of every image in numpy ``batches`` (``image`` (B, 6, H, W) uint8 + metadata),
    and the batches' other columns in the same row order (by site_id when they carry it).

    The encoder runs in eval mode without gradients (batch norm uses its running
    statistics), on the inputs of ``recipe`` (pretraining's: six stains, no plate gains);
    the caller restores train mode.
    """
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
