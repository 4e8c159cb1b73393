"""The search itself: a new or restored Ray Tune Tuner over :func:`rxray.tune.trial.run_trial`, its scheduler and
callback, and the step's outputs and manifest."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from rxray import storage
from rxray.config import TuneConfig, config_to_yaml
from rxray.outputs import CONFIG_FILE, CONFLICT, NEW, rerun_decision
from rxray.results import TuneResult
from rxray.runner import step_function
from rxray.runtime import Timer
from rxray.train.worker import PLACEMENT_GROUP_KEY
from rxray.tune.plan import BEST_OUT, SearchPlan, plan_search, to_tune_space
from rxray.tune.results import PLOT_FILE, RESULTS_CSV, RESULTS_PARQUET, best_trial, results_table, write_results
from rxray.tune.trial import TRIAL_DRIVER_RESOURCES, TRIALS_DIR, run_trial, trial_config

if TYPE_CHECKING:
    import ray.tune

EXPERIMENT = "tune"  # Tune's own state and per-trial logs: <out>/tune/
BEST_CONFIG = "best_config.yaml"
MODE = "max"
# Halve the field at every rung: searches here are tens of trials over few epochs, not thousands.
ASHA_REDUCTION = 2


@step_function("tune")
def tune(cfg: TuneConfig) -> TuneResult:
    """Run (or resume, or report) a hyperparameter search into ``cfg.out``; returns the search with its best trial."""
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
        best = best_trial(table, plan.metric)
        best_cfg = trial_config(plan.objective, plan.fixed, best["values"], storage.join(cfg.out, BEST_OUT))
        storage.write_text(storage.join(cfg.out, BEST_CONFIG), config_to_yaml(best_cfg))
        write_results(cfg.out, results, table, plan.metric, best["trial_id"])
    counts = {str(k): int(v) for k, v in table["status"].value_counts().items()}
    return TuneResult(counts={"trials": len(table), **counts}, timings=timer.seconds, objective=plan.objective,
                      metric=plan.metric, mode=MODE, restored=restored, concurrency=plan.concurrency,
                      space=plan.space, trials=len(table), status_counts=counts,
                      best={k: best[k] for k in ("trial_id", "score", "epochs", "values", "out")},
                      best_config=storage.join(cfg.out, BEST_CONFIG), results=[RESULTS_PARQUET, RESULTS_CSV],
                      figures=[PLOT_FILE])


def _absolute(cfg: TuneConfig) -> TuneConfig:
    """The config with local paths made absolute: trials run in their own working directories."""

    def fix(uri: str | None) -> str | None:
        return uri if uri is None or storage.is_remote(uri) else os.path.abspath(uri)

    return dataclasses.replace(cfg, data=fix(cfg.data), out=fix(cfg.out), base=fix(cfg.base), space=fix(cfg.space))


def _check_rerun(cfg: TuneConfig) -> bool:
    """True if ``cfg.out`` holds a search to resume; a rerun must keep every setting but --out."""
    rerun = rerun_decision(cfg.out, cfg)
    if rerun.action == CONFLICT:
        raise rerun.conflict_error("tune", cfg.out, "a search")
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


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id, the same name as its step output under trials/."""
    return trial.trial_id


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
