"""Checkpoints: one schema (:class:`Checkpoint`), where the files live, and the encoder they rebuild.

Like torchvision's reference scripts, a checkpoint is a single dict saved as
``checkpoint.pt``, so resuming is one load and the file says how its model was made.
:class:`Checkpoint` is that dict's schema: `rxray pretrain` and `rxray finetune` write
through :meth:`Checkpoint.to_state`, and every reader that rebuilds a model goes through
:meth:`Checkpoint.from_state`, so a key's meaning and its default live here only.
Checkpoints written before this schema (November 2026) are not read.

Ray Train writes one checkpoint per epoch into ``<out>/<run name>/checkpoint_epochNNNN/``;
the zero-padded epoch in the directory name makes "latest" a name comparison, with no
need to open any file. `rxray finetune` also writes its selected model as
``<out>/checkpoint.pt``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch

from rxray import storage
from rxray.layout import N_CHANNELS
from rxray.errors import ConfigError

if TYPE_CHECKING:
    from rxray.models.backbones import Encoder

CHECKPOINT_FILE = "checkpoint.pt"
_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch(\d+)$")
ALL_STAINS = list(range(1, N_CHANNELS + 1))


@dataclass
class Checkpoint:
    """The checkpoint dict's schema: the model, how to feed it, and the training run that made it.

    Keys absent on disk are None here (and None fields are not written), so a pretrain
    checkpoint has no ``classes`` and cannot be taken for a classifier.
    """

    # The encoder, and how to feed it (rxray.models.inputs reads these).
    encoder: dict[str, torch.Tensor]
    backbone: str
    stem: str
    channel_mean: list[float]  # per stain, uint8 units: six stains, or the model's stains only
    channel_std: list[float]
    channels: list[int] = dataclasses.field(default_factory=lambda: list(ALL_STAINS))  # 1-based stains it reads
    plate_norm: bool | None = None  # finetune: images were scaled by their plate's gains
    plate_gains: dict[str, list[float]] | None = None  # plate group -> one gain per stain
    # The head: SimCLR's projection head, or the classifier's dense head.
    head: dict[str, torch.Tensor] | None = None
    head_hidden: int | None = None
    dropout: float | None = None
    # The classification task (finetune only).
    classes: list[str] | None = None  # class names in logit order
    with_conc: bool | None = None  # the head takes the treatment concentration
    orientations: int | None = None  # predictions average this many orientation views (8: all; absent: 1)
    task: str | None = None
    label_col: str | None = None
    positive: str | None = None
    negative_classes: list[str] | None = None
    encoder_init: str | None = None  # "random", "weights:<file>" or "simclr:<checkpoint>"
    selection_metric: str | None = None  # the validation metric that chose the best epoch
    # The training run.
    epoch: int = 0  # completed epochs (the selected model file: the best epoch)
    config: dict[str, Any] | None = None  # the step's config, as config.yaml holds it
    optimizer: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] | None = None  # per-epoch metrics so far
    starts: list[int] | None = None  # the epoch each attempt of the run started from
    # The global torch generator's state after the epoch (dropout draws from it): a resumed run continues it and
    # draws what an undisturbed run would have drawn, where reseeding would change every fresh run's stream.
    rng_state: torch.Tensor | None = None
    early_stopping: dict[str, Any] | None = None  # rxray.train.classifier_step.EarlyStopping's fields
    best: dict[str, Any] | None = None  # the best epoch's weights: {"epoch", "head", "encoder" (None if frozen)}
    epochs_trained: int | None = None  # the selected model file: epochs the run trained in all
    uri: str | None = None  # where it was read from; never written

    @property
    def in_channels(self) -> int:
        """Input channels of the encoder: the number of stains it reads."""
        return len(self.channels)

    @property
    def is_classifier(self) -> bool:
        """True when it holds a trained classifier (a head and its classes)."""
        return self.head is not None and self.classes is not None

    def to_state(self) -> dict[str, Any]:
        """The dict saved as checkpoint.pt: every field that is set, plus ``in_channels``; never ``uri``."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "uri" and getattr(self, f.name) is not None}
        state["in_channels"] = self.in_channels
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Checkpoint":
        """The checkpoint of a loaded dict; ValueError naming what is missing, unknown or inconsistent."""
        where = state.get("uri") or "the checkpoint"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(state) - names - {"in_channels"})
        if unknown:
            raise ValueError(f"{where} has keys outside the checkpoint schema ({', '.join(unknown)}): "
                             f"written by another version of rxray?")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if state.get(name) is None]
        if missing:
            raise ValueError(f"{where} is not an rxray checkpoint (lacks {', '.join(missing)})")
        values = {name: value for name, value in state.items() if name in names and value is not None}
        checkpoint = cls(**values)
        checkpoint.channels = [int(c) for c in checkpoint.channels]
        if state.get("in_channels") is not None and int(state["in_channels"]) != checkpoint.in_channels:
            raise ValueError(f"{where} has in_channels {state['in_channels']} but channels {checkpoint.channels}")
        return checkpoint


# --------------------------------------------------------------------------- where checkpoints live


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
    """Write a checkpoint dict into a local directory as checkpoint.pt; returns its path."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    torch.save(state, path)
    return path


def write_checkpoint(checkpoint: Checkpoint, uri: str) -> str:
    """Write a checkpoint to a local or object-storage file URI; returns the URI."""
    buffer = io.BytesIO()
    torch.save(checkpoint.to_state(), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


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
    """The checkpoint dict (CPU tensors) at or under a URI, as :func:`latest_checkpoint` finds it, as saved.

    The returned dict also carries ``uri``: where it was read from.
    """
    path = latest_checkpoint(uri)
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    state["uri"] = path
    return state


def read_checkpoint(uri: str) -> Checkpoint:
    """The checkpoint at or under a URI, read into the schema (ValueError if it does not fit)."""
    return Checkpoint.from_state(load_checkpoint(uri))


def model_provenance(state: Mapping[str, Any]) -> dict[str, Any]:
    """Which model a step used, for its manifest: where it was read from, its epoch, architecture and stains."""
    provenance = {"uri": state.get("uri"), "epoch": state.get("epoch"), "backbone": state["backbone"],
                  "stem": state["stem"], "channels": state.get("channels")}
    if state.get("classes") is not None:
        provenance.update(with_conc=bool(state.get("with_conc")), task=state.get("task"), classes=state["classes"])
    return provenance


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


# --------------------------------------------------------------------------- the models they rebuild


ENCODER_KEYS = ("encoder", "backbone", "stem", "channel_mean", "channel_std")
CLASSIFIER_KEYS = (*ENCODER_KEYS, "head", "classes")


def require_checkpoint(uri: str, field: str, keys: tuple[str, ...] = ENCODER_KEYS, what: str = "an rxray",
                       hint: str = "") -> dict[str, Any]:
    """The checkpoint dict at or under `uri` for a step's --model; ConfigError naming `field` when unusable."""
    try:
        checkpoint = load_checkpoint(uri)
    except FileNotFoundError as exc:
        raise ConfigError(field, str(exc)) from None
    missing = [k for k in keys if checkpoint.get(k) is None]
    if missing:
        raise ConfigError(field, f"{checkpoint['uri']} is not {what} checkpoint (lacks {', '.join(missing)}{hint})")
    try:
        Checkpoint.from_state(checkpoint)
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None
    return checkpoint


def load_encoder(uri: str) -> tuple["Encoder", dict[str, Any]]:
    """The trained encoder (eval mode, CPU) rebuilt from a checkpoint, and the checkpoint dict.

    The dict holds ``channel_mean``/``channel_std`` for normalising inputs the way
    training did, and the backbone, stem and config it was trained with.
    """
    state = load_checkpoint(uri)
    return checkpoint_encoder(state), state


def checkpoint_encoder(checkpoint: Checkpoint | Mapping[str, Any], trained: bool = True) -> "Encoder":
    """The encoder (eval mode, CPU) of a checkpoint; ``trained=False`` gives the same architecture at
    random init (seeded by torch's global generator), the baseline a trained encoder is compared with."""
    from rxray.models.backbones import build_encoder

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.from_state(checkpoint)
    encoder = build_encoder(checkpoint.backbone, stem=checkpoint.stem, weights=None,
                            in_channels=checkpoint.in_channels)
    if trained:
        encoder.load_state_dict(checkpoint.encoder)
    return encoder.eval()
