"""What a step leaves behind, and the one rule for running it again.

Every step returns a typed result (a :class:`StepResult` subclass, :mod:`rxray.results`)
and the step runner (:mod:`rxray.runner`) writes it as ``_manifest.json`` under the output
(:func:`write_manifest`): the keys every step shares, ``step``, ``config`` (the resolved
config), ``versions`` and ``created``, beside the result's fields (``counts``, ``timings``,
``outputs`` and the step's own). A manifest is written last, so its presence means the
output is complete; :meth:`StepResult.from_manifest` reads one back.

Running a step again into the same output is decided once, here
(:func:`rerun_decision`), from the role each config field declares (``option(role=...)``):

- ``resource`` fields say where and how a step runs (workers, gpu, threads, cache, ...):
  changing them never makes an output stale.
- ``extent`` fields say how long (``epochs``): more of it continues a run.
- ``identity`` fields fix what a run is (architecture; a classifier's data, classes, splits): no run,
  finished or not, can change them.
- every other field shapes the result: a finished output made with other values is stale.

The CLI and the pipeline read the same decision. They differ in one place, by
design: a *stale trained model* is refused by ``rxray pretrain``/``rxray finetune``
(the user gave a new setting to an old run; keep it unless they say so), while the
pipeline, whose file declares what the run must hold, removes it and trains again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rxray import storage
from rxray.errors import ConfigError
from rxray.options import field_default

MANIFEST_FILE = "_manifest.json"
CONFIG_FILE = "config.yaml"  # the resolved config a training run saves before its first epoch

RESULT, RESOURCE, EXTENT, IDENTITY = "result", "resource", "extent", "identity"
ROLES = (RESULT, RESOURCE, EXTENT, IDENTITY)

# What to do with an output: nothing there; complete for this config; continue it (more epochs, or a run cut
# off part-way); made with other result settings; or holding another run altogether.
NEW, COMPLETE, CONTINUE, STALE, CONFLICT = "new", "complete", "continue", "stale", "conflict"


# --------------------------------------------------------------------------- results and manifests

COMMON_KEYS = ("step", "config", "versions", "created")  # what every manifest holds beside its step's result
ResultType = TypeVar("ResultType", bound="StepResult")


@dataclass
class StepResult:
    """What a step made, as its manifest records it: counts, phase timings, output files, and (in subclasses) the
    step's own fields. ``unchanged`` (never written) marks a result read back from an output the step left as it was."""

    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: Any = field(default_factory=list)
    unchanged: bool = field(default=False, repr=False, compare=False, metadata={"manifest": False})

    def manifest_fields(self) -> dict[str, Any]:
        """The result's fields as they go into the manifest (JSON types)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("manifest", True)}
        return json.loads(json.dumps(values, default=str))

    @classmethod
    def from_manifest(cls: type[ResultType], manifest: dict[str, Any], strict: bool = False,
                      **overrides: Any) -> ResultType:
        """The result a manifest records (fields it lacks keep their defaults), with ``overrides``; ``strict``
        refuses keys the result has no field for."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("manifest", True)}
        unknown = set(manifest) - names - set(COMMON_KEYS)
        if strict and unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
        recorded = {name: manifest[name] for name in names if name in manifest and manifest[name] is not None}
        return cls(**{**recorded, **overrides})

    def printable(self, out: str | None) -> dict[str, Any]:
        """What the CLI prints: the output and the result's fields."""
        return {"out": out, **self.manifest_fields()}


def write_manifest(uri: str, step: str, config: dict[str, Any], result: StepResult | None = None) -> dict[str, Any]:
    """Write ``_manifest.json`` under ``uri``: the keys every step shares, then the result's fields."""
    from rxray.runtime import package_versions

    manifest = {"step": step, "config": config, "versions": package_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(result or StepResult()).manifest_fields()}
    storage.write_text(storage.join(uri, MANIFEST_FILE), json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest under an output URI, or None if no step has completed there."""
    path = storage.join(uri, MANIFEST_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


# --------------------------------------------------------------------------- the rerun policy


def field_role(cfg: Any, name: str) -> str:
    """The rerun role a config field declares (``result`` unless it says otherwise)."""
    for f in dataclasses.fields(cfg):
        if f.name == name:
            return f.metadata.get("role", RESULT)
    return RESULT


@dataclass(frozen=True)
class Rerun:
    """What to do with a step's output for a config: :data:`NEW`, :data:`COMPLETE`, :data:`CONTINUE`, ..."""

    action: str
    reason: str
    manifest: dict[str, Any] | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (recorded, current)

    def conflict_error(self, section: str, out: str, what: str = "a run") -> ConfigError:
        """The ConfigError for a CONFLICT: the first field whose value the output was made with, and the way out."""
        name, (old, new) = next(iter(self.changed.items()))
        return ConfigError(f"{section}.{name}", f"{out} holds {what} with {name}={old!r}, not {new!r}; "
                                                f"use a new --out to start over")

    def changes(self) -> str:
        """The changed fields as ``name: old -> new; ...`` (for messages)."""
        return "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in self.changed.items())


def changed_settings(recorded: dict[str, Any], cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Field -> (recorded, current) for the fields of ``cfg`` whose value differs from a saved config dict.

    Values are compared as JSON, the form configs are saved in, so a YAML or JSON
    round trip (tuples as lists, ...) compares equal. A field the record lacks (an option
    newer than the run) counts as its default, the behaviour the run was made with; a
    field without a default is skipped.
    """
    current = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    defaults = {f.name: field_default(f) for f in dataclasses.fields(cfg)}
    defaults = json.loads(json.dumps({k: v for k, v in defaults.items() if v is not dataclasses.MISSING}, default=str))
    changed = {}
    for name, value in current.items():
        if name in recorded or name in defaults:
            old = recorded[name] if name in recorded else defaults[name]
            if old != value:
                changed[name] = (old, value)
    return changed


def recorded_config(out: str, section: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(manifest, recorded config) of an output: the manifest's config, else a run's saved config.yaml."""
    manifest = read_manifest(out)
    if manifest is not None and isinstance(manifest.get("config"), dict):
        return manifest, manifest["config"]
    saved = storage.join(out, CONFIG_FILE)
    if storage.exists(saved):
        from rxray.options import read_yaml

        return None, read_yaml(saved).get(section, {})
    return manifest, None


def rerun_decision(out: str, cfg: Any) -> Rerun:
    """The one rule for running a step with ``cfg`` into ``out`` again (see the module docstring)."""
    manifest, recorded = recorded_config(out, getattr(cfg, "section", ""))
    if recorded is None:
        return Rerun(NEW, "not run yet", manifest)
    section = getattr(cfg, "section", None)  # another step's output shares only names like `out` and `seed`
    if manifest is not None and section and manifest.get("step") not in (None, section):
        return Rerun(CONFLICT, f"{out} holds a {manifest['step']} output", manifest,
                     {"step": (manifest["step"], section)})
    by_role: dict[str, dict[str, tuple[Any, Any]]] = {role: {} for role in ROLES}
    for name, values in changed_settings(recorded, cfg).items():
        by_role[field_role(cfg, name)][name] = values
    if by_role[IDENTITY]:
        return Rerun(CONFLICT, f"{out} holds another run", manifest, by_role[IDENTITY])
    if manifest is None:  # a run cut off part-way: it continues, with any new settings for what is left
        return Rerun(CONTINUE, "a run cut off part-way", None, by_role[RESULT])
    longer = {name: (old, new) for name, (old, new) in by_role[EXTENT].items() if new > old}
    if longer:
        return Rerun(CONTINUE, "more " + ", ".join(longer), manifest, {**by_role[RESULT], **longer})
    if by_role[RESULT]:
        return Rerun(STALE, "made with other settings", manifest, by_role[RESULT])
    return Rerun(COMPLETE, f"complete at {out}", manifest)


__all__ = ["COMMON_KEYS", "CONFIG_FILE", "MANIFEST_FILE", "Rerun", "StepResult", "changed_settings", "field_role",
           "read_manifest", "recorded_config", "rerun_decision", "write_manifest"]
