"""`rxray tune`: hyperparameter search over SimCLR pretraining or classifier fine-tuning with Ray Tune.

Each trial is a Tune *function trainable* (:func:`run_trial`, Ray 2.60's pattern for
Ray Train under Tune): it builds the step's config from the fixed settings and the
trial's sampled values and calls the ordinary step (`rxray pretrain` or
`rxray finetune`) with its output under ``<out>/trials/<trial_id>``. The step's
TorchTrainer forwards every epoch's report to Tune (:func:`rxray.train.loop.fit`
adds Ray's ``TuneReportCallback`` inside a trial), so ASHA can stop weak trials
after any epoch.

Objectives, always maximised:

- ``pretrain``: ``probe_score``, the balanced accuracy of a plate-grouped linear
  probe on frozen embeddings after each epoch (:mod:`rxray.evaluate.probe`). The
  contrastive loss itself is no objective: it falls when augmentations get easier.
- ``finetune``: the validation PR-AUC (binary) or macro F1 (multiclass) that the
  classifier's own early stopping watches.

Trials start at most ``max_concurrent`` at a time, and fewer when the cluster
cannot hold that many: a TorchTrainer starts only when all of its workers fit, and
Ray Data needs a CPU left over to feed them. The trial function itself only waits
on its trainer and reserves memory but no CPU.

A search interrupted at any point resumes when the same command is run again
(``Tuner.restore`` from ``<out>/tune``): finished trials are kept as they are, an
interrupted one resumes from its step's last checkpoint.

Outputs under ``out``: ``results.parquet`` / ``results.csv`` (one row per trial:
sampled values, status, epochs, final and best objective), ``objective.png``,
``best_config.yaml`` (the best trial's full step config, which `rxray pretrain` /
`rxray finetune` take with ``--config``), ``config.yaml``, ``trials/`` and
``_manifest.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from rxray import storage
from rxray.config import (ConfigError, FinetuneConfig, PretrainConfig, TuneConfig, config_to_dict, config_to_yaml,
                          load_config, read_yaml)
from rxray.errors import StepFailed
from rxray.outputs import CONFIG_FILE, CONFLICT, NEW, rerun_decision, write_manifest
from rxray.runtime import Timer, ensure_ray
from rxray.train.loop import PLACEMENT_GROUP_KEY

if TYPE_CHECKING:
    import pandas as pd
    import ray.tune

EXPERIMENT = "tune"  # Tune's own state and per-trial logs: <out>/tune/
TRIALS_DIR = "trials"  # each trial's step output: <out>/trials/<trial_id>/
TRIAL_RECORD = "_trial.json"  # per trial: its values and how many times Tune started it
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
PLOT_FILE = "objective.png"
BEST_CONFIG = "best_config.yaml"
BEST_OUT = "best"  # where `rxray <step> --config best_config.yaml` writes unless given --out
MODE = "max"
# The trial function only waits on its TorchTrainer: it needs memory, no CPU. Even a sliver of a CPU would leave
# less than the whole CPU a Ray Data read task asks for, and the trial's data loading would wait forever.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
# Halve the field at every rung: searches here are tens of trials over few epochs, not thousands.
ASHA_REDUCTION = 2
STEPS = {"pretrain": (PretrainConfig, "rxray.train.simclr:pretrain"),
         "finetune": (FinetuneConfig, "rxray.train.classify:finetune")}
# Fields a trial never takes from the search space or the base file: the search decides them.
_SEARCH_OWNED = ("data", "out", "epochs")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "pretrain": {
        "lr": {"loguniform": [1e-4, 3e-3]},
        "temperature": {"loguniform": [0.05, 1.0]},
        "batch_size": {"choice": [32, 64, 128]},
        "proj_dim": {"choice": [64, 128, 256]},
        "aug_strength": {"uniform": [0.05, 1.0]},
        "dropout": {"uniform": [0.0, 0.3]},
        "weight_decay": {"loguniform": [1e-7, 1e-4]},
    },
    "finetune": {
        "lr": {"loguniform": [1e-4, 1e-2]},
        "batch_size": {"choice": [16, 32, 64]},
        "aug_strength": {"uniform": [0.0, 1.0]},
        "dropout": {"uniform": [0.0, 0.5]},
        "weight_decay": {"loguniform": [1e-6, 1e-2]},
    },
}


# --------------------------------------------------------------------------- the plan


@dataclass
class SearchPlan:
    """What every trial shares: the objective and its metric, the space, the fixed step values, the resources."""

    objective: str
    metric: str
    space: dict[str, Any]  # step field -> distribution spec ({"loguniform": [lo, hi]}, ...) or a constant
    fixed: dict[str, Any]  # step values of every trial (base file + data, epochs)
    resources: dict[str, Any]  # step values that only fit trials to this cluster (e.g. worker_cpus)
    concurrency: int


def plan_search(cfg: TuneConfig) -> SearchPlan:
    """Validate the base settings and the space against the step's config and fit the trials to the cluster."""
    step_cls, _ = STEPS[cfg.objective]
    fixed = {**_base_values(cfg), "data": cfg.data, "epochs": cfg.epochs}
    if cfg.objective == "pretrain":
        fixed["probe"] = True  # the objective: without it a trial reports no probe_score
    step = _step_config(step_cls, fixed, out=storage.join(cfg.out, BEST_OUT), name="tune.base")
    metric = _metric(cfg.objective, step)
    space = _search_space(cfg, step_cls, fixed)
    concurrency, resources = _fit_to_cluster(cfg, step)
    return SearchPlan(cfg.objective, metric, space, fixed, resources, concurrency)


def _base_values(cfg: TuneConfig) -> dict[str, Any]:
    """The fixed step settings of the --base file (top level or under the step's section); search-owned keys dropped."""
    if not cfg.base:
        return {}
    data = read_yaml(cfg.base, "tune.base")
    section = STEPS[cfg.objective][0].section
    if isinstance(data.get(section), dict):
        data = data[section]
    ignored = [key for key in _SEARCH_OWNED if key in data]
    if ignored:
        print(f"tune: {', '.join(ignored)} in {cfg.base} ignored: the search sets them (--data, trial dirs, "
              f"--epochs)", flush=True)
    return {key: value for key, value in data.items() if key not in _SEARCH_OWNED}


def _step_config(step_cls: type, values: dict[str, Any], *, out: str, name: str):
    """The step config of some values, or a ConfigError that says which tune input is at fault."""
    try:
        return load_config(step_cls, values={**values, "out": out})
    except ConfigError as exc:
        raise ConfigError(name, str(exc)) from None


def _metric(objective: str, step: Any) -> str:
    """The reported metric a trial is ranked by (maximised)."""
    if objective == "pretrain":
        return "probe_score"
    from rxray.train.classify import selection_metric

    if step.val_frac <= 0:
        raise ConfigError("tune.base", "finetune trials are ranked on the validation split; val_frac must be > 0")
    return "val_" + selection_metric(step.task)


def _search_space(cfg: TuneConfig, step_cls: type, fixed: dict[str, Any]) -> dict[str, Any]:
    """The default space of the objective, with each key of the --space file replacing or adding a field."""
    space = dict(DEFAULT_SPACES[cfg.objective])
    if cfg.space:
        space.update(read_yaml(cfg.space, "tune.space"))
    fields = {f for f in step_cls.__dataclass_fields__}
    for key, spec in space.items():
        if key not in fields or key in _SEARCH_OWNED:
            raise ConfigError("tune.space", f"{key!r} is not a searchable {step_cls.section} setting")
        for value in _spec_values(key, spec):  # bounds and choices must be valid step values
            _step_config(step_cls, {**fixed, key: value}, out="unused", name="tune.space")
    return space


def _spec_values(key: str, spec: Any) -> list[Any]:
    """The values that bound a distribution spec (its ends, or every choice); ConfigError on a malformed spec."""
    if not isinstance(spec, dict):
        return [spec]  # a constant
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError("tune.space", f"{key}: expected a value or one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                                        f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError("tune.space", f"{key}: {kind} takes a list, got {args!r}")
    if kind == "choice":
        return args
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
            or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
        raise ConfigError("tune.space", f"{key}: {kind} takes [low, high] numbers with low < high"
                                        f"{' and low > 0' if kind == 'loguniform' else ''}, got {args!r}")
    return [args[0], args[1] - 1] if kind == "randint" else args  # randint's high is exclusive


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """Distribution specs as Ray Tune search-space objects (constants stay constants)."""
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    converted = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            converted[key] = tune.choice(list(args)) if kind == "choice" else makers[kind](*args)
        else:
            converted[key] = spec
    return converted


def _fit_to_cluster(cfg: TuneConfig, step: Any) -> tuple[int, dict[str, Any]]:
    """(trials run at once, per-trial resource values) so the running trials and their data loading all fit.

    A TorchTrainer starts only when all of its workers fit, and its Ray Data reads
    need a CPU beyond the workers'; trials that cannot fit would only wait.
    """
    import ray

    ensure_ray()
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    spare = max(cpus - 1.0, 0.5)  # one CPU stays free for Ray Data
    workers = step.workers
    if step.gpu:
        fits = int(gpus // workers)
        if fits < 1:
            raise ConfigError("tune.base", f"a trial needs {workers} GPU worker(s); the cluster has {gpus:g} GPU(s)")
        return min(cfg.max_concurrent, fits), {}
    if cfg.objective == "finetune":
        if cfg.cpus_per_trial is not None:
            raise ConfigError("tune.cpus_per_trial", "fine-tuning trials reserve their workers' CPUs themselves; "
                                                     "leave it unset (or set workers in --base)")
        from rxray.train.loop import worker_cpus

        per_trial = workers * worker_cpus(workers, False, None)
        return max(1, min(cfg.max_concurrent, int(spare // per_trial))), {}
    per_worker = getattr(step, "worker_cpus", None)
    if per_worker is not None:  # set in --base: respected
        return max(1, min(cfg.max_concurrent, int(spare // (per_worker * workers)))), {}
    per_trial = cfg.cpus_per_trial or spare / cfg.max_concurrent
    concurrency = max(1, min(cfg.max_concurrent, int(spare // per_trial + 1e-9)))
    # Rounded down: rounding up could take the last fraction of the CPU that data loading needs whole.
    return concurrency, {"worker_cpus": max(0.1, math.floor(1000 * per_trial / workers) / 1000)}


# --------------------------------------------------------------------------- one trial


def trial_config(objective: str, fixed: dict[str, Any], values: dict[str, Any], out: str):
    """The full step config of one trial: fixed values, then the trial's sampled values, writing into ``out``."""
    step_cls, _ = STEPS[objective]
    plain = {key: value.item() if isinstance(value, np.generic) else value for key, value in values.items()}
    return load_config(step_cls, values={**fixed, **plain, "out": out})


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: run the step with this trial's values into ``<out>/trials/<trial_id>``.

    Every epoch reaches Tune through the step's TorchTrainer. A trial restarted
    after an interruption resumes its step from the last checkpoint; if the step
    had already finished, its last epoch is reported again so Tune sees the result.
    """
    import importlib

    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    out = storage.join(config["trials"], trial_id)
    step_cfg = trial_config(config["objective"], {**config["fixed"], **config["resources"]}, config["search"], out)
    _record_start(out, trial_id, config["search"])
    module, _, name = STEPS[config["objective"]][1].partition(":")
    summary = getattr(importlib.import_module(module), name)(step_cfg)
    history = summary.get("history") or []
    if summary.get("status") == "complete" and history:
        ray.tune.report({k: v for k, v in history[-1].items() if isinstance(v, (int, float, bool))})


def _record_start(out: str, trial_id: str, values: dict[str, Any]) -> None:
    """Count this start of the trial in ``_trial.json`` (a finished trial that is never rerun keeps 1)."""
    uri = storage.join(out, TRIAL_RECORD)
    record = json.loads(storage.read_text(uri)) if storage.exists(uri) else {"trial_id": trial_id, "starts": 0}
    record.update(starts=record["starts"] + 1, values=_jsonable(values), last_start=time.time())
    storage.makedirs(out)
    storage.write_text(uri, json.dumps(record, indent=2))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id, the same name as its step output under trials/."""
    return trial.trial_id


# --------------------------------------------------------------------------- the search


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or resume, or report) a hyperparameter search into ``cfg.out``; returns a summary with the best trial."""
    from ray import tune as ray_tune

    timer = Timer()
    cfg = _absolute(cfg)
    restored = _check_rerun(cfg)
    with timer.time("plan"):
        plan = plan_search(cfg)
    storage.makedirs(cfg.out)
    storage.write_text(storage.join(cfg.out, CONFIG_FILE), config_to_yaml(cfg))
    fs, path = storage.pyarrow_filesystem(cfg.out)
    filesystem = fs if storage.is_remote(cfg.out) else None
    experiment = posixpath.join(path, EXPERIMENT)  # Tune takes a filesystem path (bucket/prefix for S3)
    trainable = ray_tune.with_resources(run_trial, TRIAL_DRIVER_RESOURCES)

    with timer.time("search"):
        if restored and ray_tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            print(f"tune: restoring the search in {storage.join(cfg.out, EXPERIMENT)}; finished trials are kept",
                  flush=True)
            tuner = ray_tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                           storage_filesystem=filesystem)
        else:
            restored = False
            print(f"tune: {cfg.samples} trial(s) of {cfg.objective}, up to {plan.concurrency} at a time, ranked by "
                  f"{plan.metric}", flush=True)
            tuner = _new_tuner(cfg, plan, trainable, path, filesystem)
        results = tuner.fit()

    with timer.time("report"):
        table = results_table(results, plan, cfg)
        best = _best_trial(table, plan.metric)
        best_cfg = trial_config(plan.objective, plan.fixed, best["values"], storage.join(cfg.out, BEST_OUT))
        storage.write_text(storage.join(cfg.out, BEST_CONFIG), config_to_yaml(best_cfg))
        _write_table(cfg.out, table)
        plot_trials(results, table, plan.metric, storage.join(cfg.out, PLOT_FILE), best["trial_id"])
    counts = table["status"].value_counts().to_dict()
    fields = {"objective": plan.objective, "metric": plan.metric, "mode": MODE, "restored": restored,
              "concurrency": plan.concurrency, "space": plan.space, "trials": len(table), "status_counts": counts,
              "best": {k: best[k] for k in ("trial_id", "score", "epochs", "values", "out")},
              "best_config": storage.join(cfg.out, BEST_CONFIG), "results": [RESULTS_PARQUET, RESULTS_CSV],
              "figures": [PLOT_FILE], "timings": timer.seconds}
    write_manifest(cfg.out, "tune", config_to_dict(cfg), **fields)
    return {"out": cfg.out, "status": "complete", **{k: fields[k] for k in ("objective", "metric", "trials",
                                                                               "status_counts", "restored", "best",
                                                                               "best_config")}}


def _absolute(cfg: TuneConfig) -> TuneConfig:
    """The config with local paths made absolute: trials run in their own working directories."""
    import dataclasses

    def fix(uri: str | None) -> str | None:
        return uri if uri is None or storage.is_remote(uri) else os.path.abspath(uri)

    return dataclasses.replace(cfg, data=fix(cfg.data), out=fix(cfg.out), base=fix(cfg.base), space=fix(cfg.space))


def _check_rerun(cfg: TuneConfig) -> bool:
    """True if ``cfg.out`` holds a search to resume; a rerun must keep every setting but --out."""
    rerun = rerun_decision(cfg.out, cfg)
    if rerun.action == CONFLICT:
        name, (old, new) = next(iter(rerun.changed.items()))
        raise ConfigError(f"tune.{name}", f"{cfg.out} holds a search with {name}={old!r}, not {new!r}; "
                                          f"use a new --out to start over")
    return rerun.action != NEW


def _new_tuner(cfg: TuneConfig, plan: SearchPlan, trainable: Any, path: str, filesystem: Any) -> "ray.tune.Tuner":
    """A fresh Tuner: seeded random search, ASHA (or FIFO), at most ``plan.concurrency`` trials at once."""
    from ray import tune as ray_tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = FinishingASHA(time_attr="epoch", max_t=cfg.epochs, grace_period=1, reduction_factor=ASHA_REDUCTION,
                              stop_last_trials=False) if cfg.scheduler == "asha" else None
    # The random search itself caps the trials in flight (what max_concurrent_trials does for it), seeded.
    search = BasicVariantGenerator(max_concurrent=plan.concurrency, random_state=cfg.seed)
    param_space = {"objective": plan.objective, "fixed": plan.fixed, "resources": plan.resources,
                   "trials": storage.join(cfg.out, TRIALS_DIR), "search": to_tune_space(plan.space)}
    return ray_tune.Tuner(
        trainable, param_space=param_space,
        tune_config=ray_tune.TuneConfig(metric=plan.metric, mode=MODE, num_samples=cfg.samples, scheduler=scheduler,
                                        search_alg=search, trial_dirname_creator=_trial_dirname,
                                        trial_name_creator=_trial_dirname),
        run_config=ray_tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=filesystem, verbose=1,
                                      callbacks=[ReleaseStoppedRuns()]))


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at its final epoch: the trial ends by itself and its step writes its outputs.

    Stopping a trial kills its process mid-step, which is what early stopping is
    for; at the last epoch it would only lose the step's manifest and test scores.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """CONTINUE at the final epoch, ASHA's decision before it."""
        if result.get(self._time_attr, 0) >= self._max_t:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class ReleaseStoppedRuns(Callback):
    """Frees the training workers' placement group of a trial that Tune stopped early.

    Stopping kills the trial's process and with it the Ray Train controller, which
    would have released the group; Ray Train's fallback cleaner needs the dashboard's
    State API. The group's id comes with every epoch's report.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Remove the trial's training placement group if it is still there."""
        _release_placement_group((trial.last_result or {}).get(PLACEMENT_GROUP_KEY))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """As on completion: an errored trial's controller may be gone too."""
        _release_placement_group((trial.last_result or {}).get(PLACEMENT_GROUP_KEY))


def _release_placement_group(group_id: str | None) -> None:
    """Remove a placement group by hex id unless it is already removed (a finished run removes its own)."""
    if not group_id:
        return
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if ray.util.placement_group_table(group).get("state", "REMOVED") != "REMOVED":
        ray.util.remove_placement_group(group)


# --------------------------------------------------------------------------- outputs


def results_table(results: Any, plan: SearchPlan, cfg: TuneConfig) -> "pd.DataFrame":
    """One row per trial: id, status (complete / stopped / error), epochs, last and best objective, its values."""
    import pandas as pd

    rows = []
    for result in results:
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        history = _history(result)
        scores = history[plan.metric].dropna() if plan.metric in history else pd.Series(dtype=float)
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        status = "error" if result.error is not None else "complete" if epochs >= cfg.epochs else "stopped"
        values = _jsonable((result.config or {}).get("search", {}))
        rows.append({"trial_id": trial_id, "status": status, "epochs": epochs,
                     plan.metric: float(scores.iloc[-1]) if len(scores) else math.nan,
                     f"{plan.metric}_best": float(scores.max()) if len(scores) else math.nan,
                     **{f"config/{k}": v for k, v in values.items()},
                     "out": storage.join(cfg.out, TRIALS_DIR, trial_id),
                     "error": "" if result.error is None else str(result.error).strip().splitlines()[0][:300]})
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def _history(result: Any) -> "pd.DataFrame":
    """The trial's reported epochs, one row per epoch (the last report of an epoch wins)."""
    import pandas as pd

    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)


def _best_trial(table: "pd.DataFrame", metric: str) -> dict[str, Any]:
    """The trial with the highest final objective among those that did not fail; StepFailed if there is none."""
    scored = table[(table["status"] != "error") & table[metric].notna()]
    if scored.empty:
        errors = [e for e in table["error"] if e]
        raise StepFailed(f"no trial reported {metric}" + (f"; first error: {errors[0]}" if errors else ""))
    row = scored.loc[scored[metric].idxmax()]
    values = {c[len("config/"):]: _plain(row[c]) for c in table.columns if c.startswith("config/")}
    return {"trial_id": row["trial_id"], "score": float(row[metric]), "epochs": int(row["epochs"]),
            "values": values, "out": row["out"]}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _write_table(out: str, table: "pd.DataFrame") -> None:
    """results.parquet and results.csv under ``out``."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(out, RESULTS_PARQUET), buffer.getvalue())
    storage.write_text(storage.join(out, RESULTS_CSV), table.to_csv(index=False))


def plot_trials(results: Any, table: "pd.DataFrame", metric: str, uri: str, best_trial: str) -> str:
    """objective.png: the objective per epoch of every trial (ASHA-stopped ones end early) and the final one per trial."""
    from rxray.evaluate.plots import new_figure, save_figure

    figure = new_figure(11, 4.2)
    curves, bars = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for result in results:
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        history = _history(result)
        if metric not in history:
            continue
        best = trial_id == best_trial
        curves.plot(history["epoch"], history[metric], marker="o", linewidth=2.5 if best else 1.0,
                    alpha=1.0 if best else 0.6, label=f"{trial_id} (best)" if best else None, zorder=3 if best else 2)
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title(f"{metric} per epoch, every trial")
    curves.grid(alpha=0.3)
    if best_trial:
        curves.legend(loc="best", fontsize=8)

    ordered = table.sort_values(metric, ascending=True, na_position="first")
    colours = {"complete": "tab:blue", "stopped": "tab:grey", "error": "tab:red"}
    scores = ordered[metric].fillna(0.0)
    bars.barh(ordered["trial_id"], scores, color=[colours[s] for s in ordered["status"]],
              edgecolor=["black" if t == best_trial else "none" for t in ordered["trial_id"]])
    bars.set_xlabel(f"final {metric}")
    bars.set_title("trials (blue complete, grey stopped early, red error)", fontsize=9)
    bars.tick_params(axis="y", labelsize=7)
    return save_figure(figure, uri)
