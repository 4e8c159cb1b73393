"""Loading torchvision RGB state dicts from a local path or object-storage URI.

Nothing is ever downloaded from the internet: a weights file is whatever the user
saved beforehand, e.g. ``torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)``
or a file from download.pytorch.org copied into the bucket. Files are read with
``torch.load(weights_only=True)`` so a weights file can never run code.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import re

import torch
from torch import nn

from rxray import storage
from rxray.models.registry import architecture

# Only this many key names are spelled out per category, so the error stays one readable line.
_KEYS_SHOWN = 3

# download.pytorch.org's DenseNet files predate torchvision's module names ("norm.1" for "norm1");
# torchvision renames them on download, so a copied file needs the same renaming.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the backbone; ``str()`` is one line."""


def load_state_dict_uri(uri: str) -> dict[str, torch.Tensor]:
    """A state dict (CPU tensors) from a local path or s3://... URI, read with weights_only=True."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {uri}") from None
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {uri}: {_one_line(exc)}") from None
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise WeightsError(f"weights file {uri} holds pickled Python objects, not just tensors (weights_only "
                           "loading refuses them); save it with torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a file that is not a state dict
        raise WeightsError(f"weights file {uri} is not a plain torch state dict: {_one_line(exc)}") from None
    return _as_state_dict(loaded, uri)


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str,
                          source: str = "state dict") -> None:
    """Copy an RGB torchvision state dict into ``model`` (backbone ``name``); WeightsError if it does not fit.

    Classifier keys are ignored on both sides: the encoder drops the classifier, so a file
    fine-tuned to another class count still fits. Call this before the stem is adapted to 6
    channels, while the model still has torchvision's RGB layout.
    """
    parts = architecture(name)
    head = parts.classifier_prefix
    state = {_modern_key(key, parts.family): value for key, value in state.items() if not key.startswith(head)}
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(head)}

    # Batch-norm counters are bookkeeping, absent from older files; BatchNorm fills them in on load.
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [_describe(len(keys), label, keys) for keys, label in
                ((missing, "missing"), (unexpected, "unexpected"), (wrong_shape, "mismatched shapes"))
                if keys]
    if problems:
        raise WeightsError(f"weights file {_display_name(source)} does not fit {name}: " + ", ".join(problems)
                           + f"; expected a torchvision {name} RGB state dict")
    model.load_state_dict(state, strict=False)  # strict=False only because head keys were left out on purpose


def _as_state_dict(loaded: object, uri: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or a checkpoint holding one under 'model' / 'state_dict'; strip DDP's 'module.'."""
    if isinstance(loaded, dict):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper_key), dict):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise WeightsError(f"weights file {uri} does not hold a state dict (a mapping of names to tensors)")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return dict(loaded)


def _modern_key(key: str, family: str) -> str:
    if family != "densenet":
        return key
    match = _OLD_DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _describe(count: int, label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN]) + (", ..." if count > _KEYS_SHOWN else "")
    noun = "key" if count == 1 else "keys"
    if label == "mismatched shapes":
        return f"{count} {noun} with mismatched shapes ({shown})"
    return f"{count} {label} {noun} ({shown})"


def _display_name(source: str) -> str:
    return posixpath.basename(str(source).rstrip("/")) or str(source)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
