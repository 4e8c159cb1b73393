"""The one cycle every step runs in: decide, clear what a rerun replaces, run, write the manifest.

A step's function is its body wrapped by :func:`step_function`, so the CLI, the pipeline,
Tune trials, benchmarks and tests that call it all get the same cycle:

1. **decide** (:func:`decide`, for the pipeline; ``rxray <step>`` always runs): skip a
   complete output, run a new or stale one, start a trained model over when its inputs
   ran again or its settings changed, from the roles of its config's fields
   (:func:`rxray.outputs.rerun_decision`);
2. **clear**: a step that does not pick up its own output (``Step.keeps_output``) loses
   its manifest first, so a cut-off rerun never looks complete, then what its row says a
   rerun replaces (``Step.replaces``);
3. **run** the body, which returns the step's result (:mod:`rxray.results`);
4. **record**: the manifest, the keys every step shares plus the result's fields, unless
   the result comes back ``unchanged`` (a complete training run asked again).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from rxray import storage
from rxray.errors import ConfigError
from rxray.outputs import (COMPLETE, CONFLICT, MANIFEST_FILE, NEW, STALE, Rerun, read_manifest, rerun_decision,
                           write_manifest)
from rxray.steps import Step, get_step

RUN, SKIP, START_OVER = "run", "skip", "start over"


@dataclass(frozen=True)
class Decision:
    """What the pipeline does with one step: ``run``, ``skip`` or ``start over``, and why (for its log)."""

    action: str
    why: str


def decide(step: Step, cfg: Any, inputs_ran: list[str]) -> Decision:
    """Skip, run or start over a step whose output is ``cfg.out``, given which of its inputs ran in this invocation.

    Training steps continue from the checkpoints in their output, so a finished run would
    count as complete and keep a model trained on old inputs or settings: it starts over
    when its settings changed or an input ran again; a cut-off run on the same inputs
    resumes through the step's own logic.
    """
    out = cfg.out
    if step.complete_file is not None and storage.exists(storage.join(out, step.complete_file)):
        return _after_inputs(Decision(SKIP, f"{step.complete_file} is already at {out}"), inputs_ran)
    if step.complete_file is not None:
        return Decision(RUN, "not run yet")
    rerun = rerun_decision(out, cfg)
    if rerun.action == COMPLETE:
        decision = _after_inputs(Decision(SKIP, rerun.reason), inputs_ran)
    elif rerun.manifest is None:
        decision = Decision(RUN, "not run yet" if rerun.action == NEW else rerun.reason)
    else:
        decision = Decision(RUN, f"its config changed since the run at {out} ({rerun.changes() or rerun.reason})")
    restart = _start_over_reason(step, rerun, inputs_ran)
    return Decision(START_OVER, restart) if restart and decision.action == RUN else decision


def _after_inputs(decision: Decision, inputs_ran: list[str]) -> Decision:
    """A complete output still runs again when a step it reads from ran in this invocation."""
    return Decision(RUN, f"{', '.join(inputs_ran)} ran again") if inputs_ran else decision


def _start_over_reason(step: Step, rerun: Rerun, inputs_ran: list[str]) -> str | None:
    """Why a training step must discard its run before running again, or None to let it continue."""
    if not step.trains:
        return None
    if rerun.action == CONFLICT or (rerun.manifest is not None and rerun.action == STALE):
        return f"{rerun.changes()} changed"
    if inputs_ran and rerun.action != NEW:  # finished or cut off part-way: it was trained on the old inputs
        return f"{', '.join(inputs_ran)} ran again"
    return None


def clear(step: Step, out: str) -> None:
    """Remove what a rerun of ``step`` replaces under ``out``: the manifest first, then the row's ``replaces``."""
    if step.keeps_output:
        return
    for name in (MANIFEST_FILE, *step.replaces):
        storage.remove(storage.join(out, name), recursive=True)


def run_cycle(step: Step, cfg: Any, body: Callable[[Any], Any]) -> Any:
    """Clear, run the body, check its result type and record it; returns the result.

    An output that holds another step's manifest is refused, never cleared: a rerun replaces only its own step's.
    """
    recorded = read_manifest(cfg.out)
    if recorded is not None and recorded.get("step") not in (None, step.name):
        raise ConfigError(f"{step.name}.out", f"{cfg.out} holds a {recorded['step']} output; give another --out")
    clear(step, cfg.out)
    if not step.keeps_output:
        storage.ensure_bucket(cfg.out)
        storage.makedirs(cfg.out)
    result = body(cfg)
    expected = step.result_class()
    if not isinstance(result, expected):
        raise TypeError(f"step {step.name} returned {type(result).__name__}, not its result class {expected.__name__}")
    if not result.unchanged:
        from rxray.config import config_to_dict

        write_manifest(cfg.out, step.name, config_to_dict(cfg), result)
    return result


def step_function(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the body of step ``name`` (``cfg -> result``) runs inside :func:`run_cycle` whoever calls it."""

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def run(cfg: Any) -> Any:
            return run_cycle(get_step(name), cfg, body)

        run.body = body  # type: ignore[attr-defined]
        return run

    return wrap


__all__ = ["Decision", "RUN", "SKIP", "START_OVER", "clear", "decide", "run_cycle", "step_function"]
