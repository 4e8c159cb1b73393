"""Stain attribution of a classifier's logit: per-image Grad-CAM, gradient x input and occlusion, per-treatment tables.

Per image, for the logit of a chosen class (:func:`gradcam_batch`, :func:`occlusion_batch`):

- ``heatmap``: Grad-CAM (pytorch-grad-cam) on the encoder's Grad-CAM layer (its row in
  :mod:`rxray.models.registry`), (H, W) float32 in [0, 1];
- ``attribution``: gradient x input per stain, ``sum over pixels |d logit / d x * x|``
  on the normalised image, divided by its total so the six shares sum to 1 per image.
  Stains the model does not use have zero gradient, hence exactly 0;
- ``occlusion``: the logit drop when a stain is replaced by its mean (0 after
  normalisation), in logit units; 0 for unused stains.

Per treatment (:func:`channel_importance`), stains are ranked by the mean ``attribution``
share (``rank``); the mean occlusion drop (signed, and absolute as ``occlusion_effect``)
and its rank by absolute effect (``occlusion_rank``) sit beside it as a second opinion.
Images are normalised by the input recipe (:func:`rxray.models.inputs.model_inputs`);
`rxray explain` (:mod:`rxray.batch.explain`) runs all this on an actor pool.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from rxray.layout import CHANNEL_NAMES, N_CHANNELS
from rxray.models.inputs import model_inputs

if TYPE_CHECKING:
    import pandas as pd

    from rxray.models.classifier import Classifier

IMPORTANCE_METHOD = ("gradient x input: per image, sum over pixels of |d target logit / d input * input| per stain "
                     "on the normalised image, divided by the six-stain total (shares sum to 1); rank 1 = largest "
                     "mean share over the treatment's images. occlusion_drop / occlusion_effect: mean signed / "
                     "absolute target-logit drop when the stain is set to its mean (0 after normalisation); "
                     "occlusion_rank orders stains by occlusion_effect.")


# --------------------------------------------------------------------------- per image


class _CamInput(torch.nn.Module):
    """Adapts a Classifier to GradCAM's ``model(images)`` call: concentrations ride along as state."""

    def __init__(self, model: "Classifier", conc: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.conc = conc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped classifier for normalised (B, 6, H, W) images."""
        return self.model(images, self.conc)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradients for the duration: only input and activation gradients are needed."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _prepare(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
             target_index: Any, conc: Any) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
    """Normalised float images on the model's device, (B,) int target indices, and concentrations."""
    device = next(model.parameters()).device
    images = torch.as_tensor(np.array(images_uint8, copy=True) if isinstance(images_uint8, np.ndarray)
                             else images_uint8).to(device)
    if images.dim() != 4 or images.shape[1] != N_CHANNELS:
        raise ValueError(f"expected images of shape (B, {N_CHANNELS}, H, W), got {tuple(images.shape)}")
    targets = np.broadcast_to(np.asarray(target_index, dtype=np.int64), (images.shape[0],)).copy()
    conc_tensor = None
    if model.with_conc:
        if conc is None:
            raise ValueError("this classifier takes treatment_conc: pass conc")
        conc_tensor = torch.as_tensor(np.asarray(conc, dtype=np.float32)).to(device)
    return model_inputs(images, None, mean, std), targets, conc_tensor


def _used_channel_mask(model: "Classifier") -> np.ndarray:
    mask = np.zeros(N_CHANNELS, dtype=bool)
    mask[[c - 1 for c in model.channels]] = True
    return mask


def channel_shares(raw: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Per-image shares (B, 6) summing to 1; unused stains 0; an all-zero row is spread evenly over used stains."""
    raw = np.where(used, np.abs(raw), 0.0).astype(np.float64)
    totals = raw.sum(axis=1, keepdims=True)
    even = np.broadcast_to(used / used.sum(), raw.shape)
    shares = np.divide(raw, totals, out=even.copy(), where=totals > 0)
    return shares.astype(np.float32)


def gradcam_batch(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
                  target_index: Any, conc: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps (B, H, W) in [0, 1], gradient-x-input stain shares (B, 6), softmax probs (B, C).

    ``images_uint8`` is (B, 6, H, W) in uint8 units, normalised here with the six-stain
    ``mean``/``std``; ``target_index`` is the class whose logit is explained (an int or
    one per image); ``conc`` (B,) is required when the model was trained with_conc.
    One forward and one backward pass serve both the heatmap and the attribution.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    normalised, targets, conc_tensor = _prepare(model, images_uint8, mean, std, target_index, conc)
    # A leaf that requires grad: GradCAM's `.to(device)` returns it unchanged, so backward fills its .grad.
    inputs = normalised.detach().requires_grad_(True)
    with _frozen(model), GradCAM(model=_CamInput(model, conc_tensor),
                                 target_layers=[model.encoder.target_layer()]) as cam:
        heatmaps = cam(inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        logits = cam.outputs.detach().float()
    if inputs.grad is None:
        raise RuntimeError("Grad-CAM ran no backward pass to the input; cannot attribute stains")
    raw = (inputs.grad * inputs.detach()).abs().sum(dim=(2, 3)).cpu().numpy()
    attributions = channel_shares(raw, _used_channel_mask(model))
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    return np.clip(heatmaps, 0.0, 1.0).astype(np.float32), attributions, probs.cpu().numpy()


def occlusion_batch(model: "Classifier", images_uint8: Any, mean: Sequence[float], std: Sequence[float],
                    target_index: Any, conc: Any = None) -> np.ndarray:
    """Target-logit drop (B, 6) when each stain is set to its mean (0 after normalisation); 0 for unused stains."""
    model.eval()
    normalised, targets, conc_tensor = _prepare(model, images_uint8, mean, std, target_index, conc)
    rows = torch.arange(len(targets), device=normalised.device)
    index = torch.as_tensor(targets, device=normalised.device)
    drops = np.zeros((len(targets), N_CHANNELS), dtype=np.float32)
    with torch.inference_mode():
        base = model(normalised, conc_tensor)[rows, index].float()
        for channel in np.flatnonzero(_used_channel_mask(model)):
            blanked = normalised.clone()
            blanked[:, channel] = 0.0
            drops[:, channel] = (base - model(blanked, conc_tensor)[rows, index].float()).cpu().numpy()
    return drops


# --------------------------------------------------------------------------- per treatment


def _occlusion_means(drops: np.ndarray) -> dict[str, float]:
    """Mean signed logit drop and mean absolute drop over images (NaN when occlusion was not run)."""
    if np.isnan(drops).all():
        return {"occlusion_drop": float("nan"), "occlusion_effect": float("nan")}
    return {"occlusion_drop": float(np.nanmean(drops)), "occlusion_effect": float(np.nanmean(np.abs(drops)))}


def channel_importance(treatments: Sequence[str], target_classes_: Sequence[str], attributions: np.ndarray,
                       occlusion: np.ndarray, target_probs: Sequence[float],
                       planted: dict[str, int | None] | None = None) -> "pd.DataFrame":
    """Long table, one row per (treatment, stain), sorted by treatment then rank.

    Columns: treatment, target_class, n_images, mean_target_prob, channel (1-based), stain,
    importance (mean attribution share), importance_sd, rank (1 = most important,
    ties share the best rank), occlusion_drop (mean signed logit drop), occlusion_effect
    (mean absolute drop: blanking the stain moves the logit either way), occlusion_rank
    (by occlusion_effect), and,
    when ``planted`` (treatment -> 1-based channel) is given, planted_channel and planted.
    """
    import pandas as pd

    treatments = np.asarray(treatments, dtype=object)
    attributions, occlusion = np.asarray(attributions, np.float64), np.asarray(occlusion, np.float64)
    target_classes_, target_probs = np.asarray(target_classes_, dtype=object), np.asarray(target_probs, np.float64)
    rows = []
    for treatment in sorted(set(treatments)):
        mask = treatments == treatment
        for index in range(N_CHANNELS):
            row = {"treatment": treatment, "target_class": target_classes_[mask][0], "n_images": int(mask.sum()),
                   "mean_target_prob": float(target_probs[mask].mean()), "channel": index + 1,
                   "stain": CHANNEL_NAMES[index], "importance": float(attributions[mask, index].mean()),
                   "importance_sd": float(attributions[mask, index].std()),
                   **_occlusion_means(occlusion[mask, index])}
            if planted is not None:
                row["planted_channel"] = planted.get(treatment)
                row["planted"] = planted.get(treatment) == index + 1
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    by_treatment = table.groupby("treatment")
    table["rank"] = by_treatment["importance"].rank(ascending=False, method="min").astype(int)
    table["occlusion_rank"] = by_treatment["occlusion_effect"].rank(ascending=False, method="min").astype("Int64")
    if planted is not None:
        table["planted_channel"] = table["planted_channel"].astype("Int64")
    return table.sort_values(["treatment", "rank", "channel"]).reset_index(drop=True)


def planted_ranks(table: "pd.DataFrame") -> dict[str, Any] | None:
    """For tables with planted channels: each treatment's planted stain and its ranks, and how often it is first."""
    if table.empty or "planted" not in table.columns:
        return None
    planted_rows = table[table["planted"]]
    import pandas as pd

    per_treatment = {row.treatment: {"stain": row.stain, "rank": int(row.rank),
                                     "occlusion_rank": None if pd.isna(row.occlusion_rank) else int(row.occlusion_rank)}
                     for row in planted_rows.itertuples()}
    nulls = sorted(set(table["treatment"]) - set(per_treatment))
    first = sum(1 for v in per_treatment.values() if v["rank"] == 1)
    return {"treatments": per_treatment, "ranked_first": first, "with_planted_channel": len(per_treatment),
            "planted_null": nulls}


def top_stains(table: "pd.DataFrame") -> dict[str, str]:
    """Treatment -> its rank-1 stain by attribution share."""
    if table.empty:
        return {}
    best = table.sort_values(["treatment", "rank", "channel"]).groupby("treatment").head(1)
    return dict(zip(best["treatment"], best["stain"]))
