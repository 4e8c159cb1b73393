"""`rxray compare`: is the learned encoder worth it? Every representation of a run scored the same way.

Image-based profiling judges a new representation against what a scientist already has:
CellProfiler features of segmented cells, and (for RxRx2) the dataset's own embeddings.
Each representation the run has goes through `rxray score` with one set of settings (the
same treatments, controls, corrections, forests, mAP permutations, map and mechanism
tests), under ``out/representations/<representation>/``:

- ``simclr``: the trained encoder's embeddings (``embeddings``, `rxray embed` output); when the
  run's score step scored them with the same settings (``scores``), its tables are the row's;
- ``random-init-<k>``: encoders of the same architecture at random init (seed k, as
  `rxray probe` seeds its baselines), embedding the shards here with the embed step;
- ``finetuned``: a classifier's encoder when `rxray finetune` trained it (``finetuned``; a frozen one
  is the trained encoder again), embedding the shards here;
- ``cellprofiler``: `rxray features` output;
- ``dataset``: the dataset's own embeddings.csv.

``leaderboard.csv`` holds one row per representation: its dimension, treatments scored
and called active, the mean mAP of the annotated treatments (moa.csv: the known actives),
the treatment map's same-MoA recall and p with the pairs behind it, the leave-one-compound-
out mechanism top-1 and p, the probe's balanced accuracy (treated vs control) where
`rxray probe` scored that encoder, and the seconds the representation took to compute.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from rxray import storage
from rxray.batch.score import SCORE_TABLE, score
from rxray.batch.score_map import load_moa
from rxray.config import CompareConfig, ConfigError, EmbedConfig, ScoreConfig, ScoringSettings
from rxray.evaluate.probe import RANDOM_INIT, TRAINED
from rxray.outputs import read_manifest
from rxray.results import CompareResult, ScoreResult
from rxray.runner import step_function
from rxray.runtime import Timer

LEADERBOARD_FILE = "leaderboard.csv"
REPRESENTATIONS_DIR = "representations"
COLUMNS = ["representation", "dims", "treatments_scored", "active_treatments", "mean_map_annotated",
           "map_same_moa_recall", "map_same_moa_pairs", "map_p_value", "moa_top1", "moa_compounds", "moa_p_value",
           "probe_balanced_accuracy", "seconds_to_compute", "source"]


@dataclass(frozen=True)
class Representation:
    """One row-to-be of the leaderboard: what to score, and what it cost to compute."""

    name: str
    uri: str  # what `rxray score` reads
    seconds: Optional[float]  # to compute it (training included), None when it came with the dataset
    probe_encoder: Optional[str] = None  # its encoder's name in probe.csv
    scored: Optional[str] = None  # an `rxray score` output of these embeddings under the compare's settings


def _seconds(*outputs: str) -> Optional[float]:
    """The seconds the steps at these outputs took (each its ``total``, else the sum of its phases), None if one
    recorded no timing."""
    timings = [(read_manifest(uri) or {}).get("timings") or {} for uri in outputs]
    totals = [t.get("total", sum(t.values())) if t else None for t in timings]
    return round(float(sum(totals)), 1) if totals and all(t is not None for t in totals) else None


def _trained_encoder(cfg: CompareConfig) -> list[Representation]:
    if not cfg.embeddings:
        return []
    config = (read_manifest(cfg.embeddings) or {}).get("config") or {}
    pretrain = config.get("model")
    seconds = _seconds(cfg.embeddings, *([pretrain] if pretrain else []))
    scored = cfg.scores if cfg.scores and scored_alike(cfg.scores, cfg) else None
    return [Representation("simclr", cfg.embeddings, seconds, TRAINED, scored)]


def scored_alike(score_out: str, cfg: CompareConfig) -> bool:
    """True when a score output scored ``cfg.embeddings`` with the compare's settings (its corrections a superset).

    Each correction is scored on its own (the same control split, forests and permutations
    whatever else runs beside it), so the rows of the compare's corrections are the ones
    the compare would compute.
    """
    recorded = (read_manifest(score_out) or {}).get("config") or {}
    if recorded.get("embeddings") != cfg.embeddings or not set(cfg.correct) <= set(recorded.get("correct") or []):
        return False
    settings = _score_settings(cfg)
    return all(recorded.get(name) == value for name, value in settings.items() if name != "correct")


def _random_init_encoder(cfg: CompareConfig, seed: int) -> Representation:
    """Embed the shards with the trained encoder's architecture at random init (torch seed ``seed``)."""
    import torch

    from rxray.batch.embed import embed
    from rxray.models.checkpoints import checkpoint_encoder, latest_checkpoint, read_checkpoint, write_checkpoint

    name = f"random-init-{seed}"
    trained = read_checkpoint(latest_checkpoint(cfg.model))
    torch.manual_seed(seed)  # as `rxray probe` draws its baseline of this seed
    encoder = checkpoint_encoder(trained, trained=False)
    random_init = dataclasses.replace(trained, encoder=encoder.state_dict(), head=None, encoder_init="random",
                                      epoch=0)
    checkpoint_uri = write_checkpoint(random_init, storage.join(cfg.out, REPRESENTATIONS_DIR, name, "checkpoint.pt"))
    embeddings = storage.join(cfg.out, REPRESENTATIONS_DIR, name, "embed")
    embed(EmbedConfig(data=cfg.data, model=checkpoint_uri, out=embeddings, batch_size=cfg.batch_size,
                      per_well=False))
    return Representation(name, embeddings, _seconds(embeddings), f"{RANDOM_INIT}_seed{seed}")


def _finetuned_encoder(cfg: CompareConfig) -> tuple[Representation | None, str | None]:
    """The fine-tuned classifier's encoder, embedding the shards here; or None and why it is left off."""
    from rxray.batch.embed import embed

    config = (read_manifest(cfg.finetuned) or {}).get("config") or {}
    if config.get("freeze", True):
        return None, "its encoder was frozen: the trained encoder's row is its embeddings"
    if not cfg.data:
        return None, "needs the shards (data)"
    embeddings = storage.join(cfg.out, REPRESENTATIONS_DIR, "finetuned", "embed")
    embed(EmbedConfig(data=cfg.data, model=cfg.finetuned, out=embeddings, batch_size=cfg.batch_size, per_well=False))
    return Representation("finetuned", embeddings, _seconds(cfg.finetuned, embeddings)), None


def representations(cfg: CompareConfig) -> tuple[list[Representation], dict[str, str]]:
    """What the run has to compare, in leaderboard order, and what is left off with why."""
    found, skipped = _trained_encoder(cfg), {}
    if cfg.finetuned:
        finetuned, why = _finetuned_encoder(cfg)
        found += [finetuned] if finetuned else []
        skipped.update({"finetuned": why} if why else {})
    if cfg.random_seeds:
        if cfg.model and cfg.data:
            found += [_random_init_encoder(cfg, seed) for seed in range(cfg.random_seeds)]
        else:
            skipped["random-init"] = "needs the shards (data) and a pretrain output (model)"
    if cfg.features:
        found.append(Representation("cellprofiler", cfg.features, _seconds(cfg.features)))
    if cfg.dataset_embeddings:
        if storage.exists(cfg.dataset_embeddings):
            found.append(Representation("dataset", cfg.dataset_embeddings, None))
        else:
            skipped["dataset"] = f"no {cfg.dataset_embeddings}"
    return found, skipped


def _probe_scores(probe_out: Optional[str]) -> dict[str, float]:
    """Balanced accuracy of treated vs control per probe encoder (its best method), empty without a probe."""
    if not probe_out:
        return {}
    from rxray.evaluate.probe_step import PROBE_TABLE

    uri = storage.join(probe_out, PROBE_TABLE)
    if not storage.exists(uri):
        return {}
    with storage.open_file(uri, "rb") as handle:
        table = pd.read_csv(handle)
    table = table[table["task"] == "control"]
    return {str(k): float(v) for k, v in table.groupby("encoder")["score"].max().items()}


def leaderboard_row(representation: Representation, result: ScoreResult, scores: pd.DataFrame, correction: str,
                    annotated: set[str], probe: dict[str, float]) -> dict[str, Any]:
    """One leaderboard row from a representation's score result and table, under ``correction``."""
    table = scores[scores["correction"] == correction]
    activity = result.summary["corrections"].get(correction, {})
    treatment_map = (result.summary.get("treatment_map") or {}).get(correction, {})
    known = table[table["treatment"].isin(annotated)]
    return {
        "representation": representation.name,
        "dims": result.counts.get("dims"),
        "treatments_scored": int(len(table)),
        "active_treatments": activity.get("n_active"),
        "mean_map_annotated": round(float(known["map"].mean()), 4) if len(known) else None,
        "map_same_moa_recall": treatment_map.get("recall_top"),
        "map_same_moa_pairs": treatment_map.get("n_same_moa_pairs"),
        "map_p_value": treatment_map.get("p_value"),
        "moa_top1": treatment_map.get("moa_top1"),
        "moa_compounds": treatment_map.get("moa_evaluable"),  # what top-1 is a share of: its own active compounds
        "moa_p_value": treatment_map.get("moa_p_value"),
        "probe_balanced_accuracy": probe.get(representation.probe_encoder or ""),
        "seconds_to_compute": representation.seconds,
        "source": representation.uri,
    }


def _annotated(cfg: CompareConfig, found: list[Representation]) -> set[str]:
    """The treatments moa.csv gives a mechanism (controls left out): the one `rxray score` finds for the first
    representation that has one (``cfg.moa``, else beside its dataset)."""
    for representation in found:
        moa, _ = load_moa(ScoreConfig(embeddings=representation.uri, out=cfg.out, moa=cfg.moa))
        if moa is not None:
            return set(moa["treatment"]) - set(cfg.controls)
    return set()


def _score_settings(cfg: CompareConfig) -> dict[str, Any]:
    """The scoring settings every representation gets: the compare config's ScoringSettings fields."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ScoringSettings)}


@step_function("compare")
def compare(cfg: CompareConfig) -> CompareResult:
    """Score every representation of the run with one set of settings; write leaderboard.csv, return its rows."""
    timer = Timer()
    with timer.time("embed"):  # the encoders compare embeds itself: random init, fine-tuned
        found, skipped = representations(cfg)
    if not found:
        raise ConfigError("compare.embeddings", "nothing to compare: give embeddings, features, "
                                                "dataset_embeddings or data and model")
    correction = cfg.correct[0]
    probe = _probe_scores(cfg.probe)
    rows = []
    for representation in found:
        out = representation.scored or storage.join(cfg.out, REPRESENTATIONS_DIR, representation.name, "score")
        if representation.scored:
            print(f"compare: {representation.name}: the score step's tables ({out}) used, scored alike",
                  file=sys.stderr, flush=True)
            result = ScoreResult.from_manifest(read_manifest(out) or {})
        else:
            print(f"compare: scoring {representation.name} ({representation.uri})", file=sys.stderr, flush=True)
            with timer.time(f"score_{representation.name}"):
                result = score(ScoreConfig(embeddings=representation.uri, out=out, **_score_settings(cfg)))
        with storage.open_file(storage.join(out, f"{SCORE_TABLE}.parquet"), "rb") as handle:
            scores = pd.read_parquet(handle)
        rows.append((representation, result, scores))
    annotated = _annotated(cfg, found)
    board = pd.DataFrame([leaderboard_row(r, result, scores, correction, annotated, probe)
                          for r, result, scores in rows], columns=COLUMNS)
    storage.write_text(storage.join(cfg.out, LEADERBOARD_FILE), board.to_csv(index=False))
    print(board.drop(columns=["source"]).to_string(index=False), flush=True)
    return CompareResult(counts={"representations": len(board)}, timings=timer.seconds,
                         outputs=[LEADERBOARD_FILE], correction=correction,
                         leaderboard=json_rows(board), skipped=skipped)


def json_rows(board: pd.DataFrame) -> list[dict[str, Any]]:
    """The leaderboard's rows as JSON-ready dicts (NaN as None)."""
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
            for row in board.astype(object).where(board.notna(), None).to_dict("records")]


__all__ = ["COLUMNS", "LEADERBOARD_FILE", "REPRESENTATIONS_DIR", "Representation", "compare", "leaderboard_row",
           "representations"]
