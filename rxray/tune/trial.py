"""One trial of a search: its step config, and the Tune function trainable that runs the step.

Ray Tune pickles :func:`run_trial` by reference, so it stays at this module path:
``rxray.tune.trial.run_trial``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from rxray import storage
from rxray.config import load_config
from rxray.tune.plan import STEPS

TRIALS_DIR = "trials"  # each trial's step output: <out>/trials/<trial_id>/
TRIAL_RECORD = "_trial.json"  # per trial: its values and how many times Tune started it
# The trial function only waits on its TorchTrainer: it needs memory, no CPU. Even a sliver of a CPU would leave
# less than the whole CPU a Ray Data read task asks for, and the trial's data loading would wait forever.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


def plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """Sampled values with numpy scalars as Python ones (for configs, JSON and YAML)."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in values.items()}


def trial_config(objective: str, fixed: dict[str, Any], values: dict[str, Any], out: str):
    """The full step config of one trial: fixed values, then the trial's sampled values, writing into ``out``."""
    step_cls, _ = STEPS[objective]
    return load_config(step_cls, values={**fixed, **plain_values(values), "out": out})


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: run the step with this trial's values into ``<out>/trials/<trial_id>``.

    Every epoch reaches Tune through the step's TorchTrainer. A trial restarted
    after an interruption resumes its step from the last checkpoint; if the step
    had already finished (or trained its last epoch before the interruption), its
    last epoch is reported again so Tune sees the result.
    """
    import importlib

    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    out = storage.join(config["trials"], trial_id)
    step_cfg = trial_config(config["objective"], {**config["fixed"], **config["resources"]}, config["search"], out)
    _record_start(out, trial_id, config["search"])
    module, _, name = STEPS[config["objective"]][1].partition(":")
    result = getattr(importlib.import_module(module), name)(step_cfg)
    history = result.history
    # A trial killed after its last epoch but before the step wrote its manifest resumes with nothing left to
    # train: its TorchTrainer reports no epoch, and Tune fails the trial for a result without the metric.
    trained_now = (result.epochs_completed or 0) > (result.resumed_from or 0)
    if history and (result.status == "complete" or not trained_now):
        ray.tune.report({k: v for k, v in history[-1].items() if isinstance(v, (int, float, bool))})


def _record_start(out: str, trial_id: str, values: dict[str, Any]) -> None:
    """Count this start of the trial in ``_trial.json`` (a finished trial that is never rerun keeps 1)."""
    uri = storage.join(out, TRIAL_RECORD)
    record = json.loads(storage.read_text(uri)) if storage.exists(uri) else {"trial_id": trial_id, "starts": 0}
    record.update(starts=record["starts"] + 1, values=plain_values(values), last_start=time.time())
    storage.makedirs(out)
    storage.write_text(uri, json.dumps(record, indent=2))
