"""A finished search as a table (one row per trial), its best trial, and the table and figure written to ``out``."""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any

from rxray import storage
from rxray.config import TuneConfig
from rxray.errors import StepFailed
from rxray.tune.plan import SearchPlan
from rxray.tune.trial import TRIALS_DIR, plain_values

if TYPE_CHECKING:
    import pandas as pd

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
PLOT_FILE = "objective.png"


def results_table(results: Any, plan: SearchPlan, cfg: TuneConfig) -> "pd.DataFrame":
    """One row per trial: id, status (complete / stopped / error), epochs, last and best objective, its values."""
    import pandas as pd

    rows = []
    for result in results:
        trial_id = _trial_id(result)
        history = _history(result)
        scores = history[plan.metric].dropna() if plan.metric in history else pd.Series(dtype=float)
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        status = "error" if result.error is not None else "complete" if epochs >= cfg.epochs else "stopped"
        values = plain_values((result.config or {}).get("search", {}))
        rows.append({"trial_id": trial_id, "status": status, "epochs": epochs,
                     plan.metric: float(scores.iloc[-1]) if len(scores) else math.nan,
                     f"{plan.metric}_best": float(scores.max()) if len(scores) else math.nan,
                     **{f"config/{k}": v for k, v in values.items()},
                     "out": storage.join(cfg.out, TRIALS_DIR, trial_id),
                     "error": "" if result.error is None else str(result.error).strip().splitlines()[0][:300]})
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def _trial_id(result: Any) -> str:
    """The trial id of a Tune result: the name of its folder."""
    return os.path.basename(str(result.path).rstrip("/"))


def _history(result: Any) -> "pd.DataFrame":
    """The trial's reported epochs, one row per epoch (the last report of an epoch wins)."""
    import pandas as pd

    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)


def best_trial(table: "pd.DataFrame", metric: str) -> dict[str, Any]:
    """The trial with the highest final objective among those that did not fail; StepFailed if there is none."""
    scored = table[(table["status"] != "error") & table[metric].notna()]
    if scored.empty:
        errors = [e for e in table["error"] if e]
        raise StepFailed(f"no trial reported {metric}" + (f"; first error: {errors[0]}" if errors else ""))
    row = scored.loc[scored[metric].idxmax()]
    values = plain_values({c[len("config/"):]: row[c] for c in table.columns if c.startswith("config/")})
    return {"trial_id": row["trial_id"], "score": float(row[metric]), "epochs": int(row["epochs"]),
            "values": values, "out": row["out"]}


def write_results(out: str, results: Any, table: "pd.DataFrame", metric: str, best_trial_id: str) -> None:
    """results.parquet, results.csv and objective.png under ``out``."""
    from rxray.evaluate.plots import plot_trial_objectives

    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(out, RESULTS_PARQUET), buffer.getvalue())
    storage.write_text(storage.join(out, RESULTS_CSV), table.to_csv(index=False))
    histories = {_trial_id(result): _history(result) for result in results}
    plot_trial_objectives(histories, table, metric, storage.join(out, PLOT_FILE), best_trial_id)
