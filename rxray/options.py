"""Typed config options: declare a field with its help and bounds, load and validate a config, save it.

Every step config (:mod:`rxray.config`) is a dataclass whose fields are made by
:func:`option`. :func:`load_config` merges code defaults, a YAML file and CLI
overrides, coerces each value to its declared type and checks its bounds once,
before any work starts; a bad value raises :class:`ConfigError`, which the CLI
prints as one line naming the field and exits 2. The resolved config is saved with
every output (:func:`config_to_dict`, :func:`config_to_yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Union

import yaml

from rxray.errors import ConfigError

REQUIRED = object()


def option(
    default: Any = REQUIRED,
    help: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: typing.Sequence[Any] | None = None,
    flag: str | None = None,
    negative_flag: str | None = None,
    uri: bool = False,
    role: str = "result",
) -> Any:
    """A config field with its CLI help, bounds and allowed values (and flag names for booleans).

    ``uri`` marks a storage location: a relative local path is made absolute when the
    config is loaded, because Ray's workers run in other working directories. ``role`` says what a
    change of the field does to an existing output (see :mod:`rxray.outputs`): ``result`` (it is
    stale), ``resource`` (nothing: where and how it runs), ``extent`` (more continues it) or
    ``identity`` (no run may change it).
    """
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "flag": flag,
                "negative_flag": negative_flag, "uri": uri, "role": role}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if default is REQUIRED:
        return field(default=None, metadata={**metadata, "required": True})
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- coercion


def field_default(f: dataclasses.Field) -> Any:
    """A config field's default value (a fresh one for list defaults), or dataclasses.MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for an ``Optional[T]`` annotation, (tp, False) for any other."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce_scalar(tp: Any, value: Any, name: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(name, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a programming error, not user input


def coerce(tp: Any, value: Any, name: str) -> Any:
    """Convert a YAML or CLI value to the field's declared type, or raise ConfigError."""
    tp, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(name, "must not be empty")
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return [_coerce_scalar(item_type, v, name) for v in value]
    return _coerce_scalar(tp, value, name)


def _check_bounds(f: dataclasses.Field, value: Any, name: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    meta = f.metadata
    for v in values:
        if meta.get("choices") is not None and v not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise ConfigError(name, f"must be one of {allowed}, got {v!r}")
        if meta.get("minimum") is not None and v < meta["minimum"]:
            raise ConfigError(name, f"must be >= {meta['minimum']}, got {v!r}")
        if meta.get("maximum") is not None and v > meta["maximum"]:
            raise ConfigError(name, f"must be <= {meta['maximum']}, got {v!r}")


# --------------------------------------------------------------------------- loading


def read_yaml(uri: str, name: str = "config") -> dict[str, Any]:
    """A YAML mapping from a local path or URI; ConfigError if missing or malformed."""
    from rxray import storage

    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ConfigError(name, f"file not found: {uri}") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read {uri}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"{uri} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(name, f"{uri} must hold a mapping of keys to values")
    return data


def load_config(cls: type, yaml_uri: str | None = None, overrides: dict[str, Any] | None = None,
                values: dict[str, Any] | None = None):
    """Build and validate a config: code defaults < ``values`` or YAML file < non-None ``overrides``.

    A YAML file may hold the step's fields at the top level, or under a key named
    after the step (``cls.section``), as pipeline and best-config files do.
    """
    section = getattr(cls, "section", cls.__name__)
    merged: dict[str, Any] = {}
    if yaml_uri:
        data = read_yaml(yaml_uri)
        if section in data and isinstance(data[section], dict):
            data = data[section]
        merged.update(data)
    if values:
        merged.update(values)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    merged = _with_preset(cls, merged, section)

    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in merged:
        if key.replace("-", "_") not in fields:
            raise ConfigError(f"{section}.{key}", "unknown key")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{section}.{name}"
        raw = merged.get(name, merged.get(name.replace("_", "-"), dataclasses.MISSING))
        if raw is dataclasses.MISSING:
            if f.metadata.get("required"):
                raise ConfigError(dotted, "is required")
            continue
        value = coerce(hints[name], raw, dotted)
        _check_bounds(f, value, dotted)
        if f.metadata.get("uri") and value is not None:
            from rxray import storage

            value = storage.absolute(value)
        kwargs[name] = value
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def _with_preset(cls: type, merged: dict[str, Any], section: str) -> dict[str, Any]:
    """The values of the preset that ``merged`` names (a class's ``presets``) under the ones it sets itself."""
    presets = getattr(cls, "presets", None)
    name = merged.get("preset")
    if not presets or name is None or (isinstance(name, str) and name.lower() in ("none", "null", "")):
        return merged
    if name not in presets:
        raise ConfigError(f"{section}.preset", f"must be one of {', '.join(presets)}, got {name!r}")
    return {**presets[name], **merged}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a plain dict (for manifests and saved YAML)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, under its section key, loadable by :func:`load_config`."""
    return yaml.safe_dump({getattr(cfg, "section", type(cfg).__name__): config_to_dict(cfg)}, sort_keys=False)
