"""The plan of a search: the objective's metric, the space of sampled step fields, the fixed values, the fit.

:func:`plan_search` checks the ``--base`` file and the ``--space`` file against the
step's own config (every bound and choice must be a valid step value) before any
trial starts, and fits the trials running at once to the cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rxray import storage
from rxray.config import ConfigError, FinetuneConfig, PretrainConfig, TuneConfig, load_config, read_yaml
from rxray.runtime import ensure_ray

BEST_OUT = "best"  # where `rxray <step> --config best_config.yaml` writes unless given --out
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
    from rxray.train.tasks import selection_metric

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
        from rxray.train.launch import worker_cpus

        per_trial = workers * worker_cpus(workers, False, None)
        return max(1, min(cfg.max_concurrent, int(spare // per_trial))), {}
    per_worker = getattr(step, "worker_cpus", None)
    if per_worker is not None:  # set in --base: respected
        return max(1, min(cfg.max_concurrent, int(spare // (per_worker * workers)))), {}
    per_trial = cfg.cpus_per_trial or spare / cfg.max_concurrent
    concurrency = max(1, min(cfg.max_concurrent, int(spare // per_trial + 1e-9)))
    # Rounded down: rounding up could take the last fraction of the CPU that data loading needs whole.
    return concurrency, {"worker_cpus": max(0.1, math.floor(1000 * per_trial / workers) / 1000)}
