"""Training checkpoints: one dict per epoch saved as ``checkpoint.pt``, found and loaded by URI.

Like torchvision's reference scripts, a checkpoint is a single dict
({encoder, head, optimizer, epoch, config, backbone, stem, channel_mean,
channel_std, metrics, ...}) so resuming is one load and the file says how it was
made. Ray Train writes each one into ``<out>/<run name>/checkpoint_epochNNNN/``;
the zero-padded epoch in the directory name makes "latest" a name comparison,
with no need to open any file.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from typing import TYPE_CHECKING, Any

import torch

from rxray import storage

if TYPE_CHECKING:
    from rxray.models.backbones import Encoder

CHECKPOINT_FILE = "checkpoint.pt"
_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch(\d+)$")


def checkpoint_dir_name(epoch: int) -> str:
    """Directory name of the checkpoint taken after `epoch` completed epochs (sorts by epoch)."""
    return f"checkpoint_epoch{epoch:04d}"


def checkpoint_epoch(uri: str) -> int | None:
    """Completed epochs of a checkpoint dir or checkpoint.pt URI, read from its directory name."""
    path = uri.rstrip("/")
    if _basename(path) == CHECKPOINT_FILE:
        path = path[: -len(CHECKPOINT_FILE)].rstrip("/\\")
    match = _CHECKPOINT_DIR.match(_basename(path))
    return int(match.group(1)) if match else None


def save_checkpoint_file(state: dict[str, Any], directory: str) -> str:
    """Write the checkpoint dict into a local directory as checkpoint.pt; returns its path."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    torch.save(state, path)
    return path


def latest_checkpoint(uri: str) -> str:
    """URI of the newest checkpoint.pt under a run output, a checkpoint directory, or the file itself.

    Accepts a pretrain/finetune output URI (checkpoints one level down, under the
    run's name), a run directory, one ``checkpoint_epochNNNN`` directory, or a
    ``checkpoint.pt`` URI. Raises FileNotFoundError when none is there.
    """
    if _basename(uri.rstrip("/")) == CHECKPOINT_FILE and storage.exists(uri):
        return uri
    direct = storage.join(uri, CHECKPOINT_FILE)
    if storage.exists(direct):
        return direct
    candidates = _checkpoint_dirs(uri)
    if not candidates:  # an output URI: runs live one level down (e.g. <out>/simclr/)
        for entry in storage.list_dir(uri):
            candidates.extend(_checkpoint_dirs(entry))
    for epoch, directory in sorted(candidates, reverse=True):
        path = storage.join(directory, CHECKPOINT_FILE)
        if storage.exists(path):  # a directory without the file is a write cut off by a crash
            return path
    raise FileNotFoundError(f"no {CHECKPOINT_FILE} under {uri} (expected a pretrain/finetune output, "
                            f"a checkpoint directory or a {CHECKPOINT_FILE} file)")


def load_checkpoint(uri: str) -> dict[str, Any]:
    """The checkpoint dict (CPU tensors) at or under a URI, as :func:`latest_checkpoint` finds it.

    The returned dict also carries ``uri``: where it was read from.
    """
    path = latest_checkpoint(uri)
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    state["uri"] = path
    return state


ENCODER_KEYS = ("encoder", "backbone", "stem", "channel_mean", "channel_std")
CLASSIFIER_KEYS = (*ENCODER_KEYS, "head", "classes")


def require_checkpoint(uri: str, field: str, keys: tuple[str, ...] = ENCODER_KEYS, what: str = "an rxray",
                       hint: str = "") -> dict[str, Any]:
    """The checkpoint dict at or under `uri` for a step's --model; ConfigError naming `field` when unusable."""
    from rxray.config import ConfigError

    try:
        checkpoint = load_checkpoint(uri)
    except FileNotFoundError as exc:
        raise ConfigError(field, str(exc)) from None
    missing = [k for k in keys if checkpoint.get(k) is None]
    if missing:
        raise ConfigError(field, f"{checkpoint['uri']} is not {what} checkpoint (lacks {', '.join(missing)}{hint})")
    return checkpoint


def load_encoder(uri: str) -> tuple["Encoder", dict[str, Any]]:
    """The trained encoder (eval mode, CPU) rebuilt from a checkpoint, and the checkpoint dict.

    The dict holds ``channel_mean``/``channel_std`` for normalising inputs the way
    training did, and the backbone, stem and config it was trained with.
    """
    state = load_checkpoint(uri)
    return checkpoint_encoder(state), state


def checkpoint_encoder(state: dict[str, Any], trained: bool = True) -> "Encoder":
    """The encoder (eval mode, CPU) of a checkpoint dict; ``trained=False`` gives the same architecture at
    random init (seeded by torch's global generator), the baseline a trained encoder is compared with."""
    from rxray.models.backbones import build_encoder

    encoder = build_encoder(state["backbone"], stem=state["stem"], weights=None,
                            in_channels=state.get("in_channels") or len(state.get("channels") or range(6)))
    if trained:
        encoder.load_state_dict(state["encoder"])
    return encoder.eval()


def newest_checkpoint_after(run_uri: str, epoch: int) -> dict[str, Any] | None:
    """The newest checkpoint dict under a Ray Train run directory with an epoch above ``epoch`` that loads,
    else None.

    A checkpoint that a worker wrote just before dying may never have been registered
    by Ray Train's controller, which then restarts the workers from an older one;
    this finds it. One that does not load (a write cut off) is passed over.
    """
    try:
        candidates = sorted(_checkpoint_dirs(run_uri), reverse=True)
    except FileNotFoundError:
        return None
    for found, directory in candidates:
        if found <= epoch:
            break
        try:
            return load_checkpoint(directory)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means "not this one"
            print(f"checkpoints: passing over {directory}: {type(exc).__name__}: {exc}", flush=True)
    return None


def _checkpoint_dirs(uri: str) -> list[tuple[int, str]]:
    found = []
    for entry in storage.list_dir(uri):
        epoch = checkpoint_epoch(entry)
        if epoch is not None:
            found.append((epoch, entry))
    return found


def _basename(uri: str) -> str:
    return posixpath.basename(uri) if storage.is_remote(uri) else os.path.basename(uri)
