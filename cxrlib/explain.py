"""Where a model fails and where it looks: error tables, Grad-CAM and its share inside the lung fields.

The shortcut audit that uses these (source probe, lungs-removed evaluation, subgroups) is in audit.py; the
lung-field masks come from lungfields.py.

Grad-CAM comes from ResNet's layer3 by default (14x14 cells at 224 px; layer4's 7x7 cells are too coarse to
say "inside the lungs"), and `lung_share_summary` compares its mass inside each image's mask with the mask's
area share, with patient-bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from . import plots
from .errors import CXRError
from .metrics import bootstrap_counts
from .models import gradcam_target_layer


# --- errors --------------------------------------------------------------------------------------


def _prob_of(pred: pd.DataFrame, column: str) -> np.ndarray:
    """Per row, the probability the model gave the class named in `column` ("true" or "pred")."""
    names = [c[2:] for c in pred.columns if c.startswith("p_")]
    missing = [c for c in ("true", "pred") if c not in pred.columns]
    if missing or not names:
        raise CXRError(f"predictions table lacks {missing or 'p_<class> columns'}; build it with predictions_table()")
    codes = pd.Categorical(pred[column], categories=names).codes
    if (codes < 0).any():
        unknown = sorted(set(pred[column][codes < 0]))
        raise CXRError(f"column {column!r} holds classes without a p_<class> column: {unknown}")
    return pred[[f"p_{c}" for c in names]].to_numpy(float)[np.arange(len(pred)), codes]


def misclassified(pred: pd.DataFrame) -> pd.DataFrame:
    """False positives and false negatives per class, one row per (wrong image, class it is an error of).

    A covid image called pneumonia is a false negative of covid and a false positive of pneumonia.
    `p_class` is the probability the model gave `class`; `confidence` its probability for the wrong call.
    """
    wrong = most_confident_errors(pred, n=len(pred))
    parts = [wrong.assign(**{"class": wrong[column], "kind": kind}) for kind, column in
             (("false_negative", "true"), ("false_positive", "pred"))]
    out = pd.concat(parts, ignore_index=True)
    out["p_class"] = _prob_of(out.assign(true=out["class"]), "true")
    keep = ["class", "kind", "image_id", "path", "patient_id", "source", "split", "true", "pred", "p_class",
            "confidence"]
    out = out[[c for c in keep if c in out.columns]]
    return out.sort_values(["class", "kind", "confidence"], ascending=[True, True, False], ignore_index=True)


def most_confident_errors(pred: pd.DataFrame, n: int = 8) -> pd.DataFrame:
    """The `n` wrong predictions the model was surest of (`confidence` = its probability for the wrong class).

    Confident errors are where a shortcut, if any, shows most clearly.
    """
    wrong = pred.assign(confidence=_prob_of(pred, "pred"))
    wrong = wrong[wrong["true"] != wrong["pred"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(n).reset_index(drop=True)


def error_gallery(errors: pd.DataFrame, images: Sequence[np.ndarray], cams: Sequence[np.ndarray] | None = None,
                  ncols: int = 4) -> plt.Figure:
    """Images of the rows of `errors` (same order), captioned true -> predicted, confidence and source.

    Takes the pixels, not paths: the book's committed outputs show synthetic images only; real images
    are rendered when the user builds the book on their own data.
    """
    if len(images) != len(errors):
        raise CXRError(f"error_gallery got {len(images)} images for {len(errors)} error rows: pass one image per row")
    captions = [
        f"{row['true']} -> {row['pred']} ({row.get('confidence', float('nan')):.2f})\n{row.get('source', '')}"
        for _, row in errors.iterrows()
    ]
    return plots.image_grid(list(images), captions, ncols=ncols, overlays=cams)


# --- Grad-CAM ------------------------------------------------------------------------------------


# Grad-CAM layers by name: the output of a stage, as (resnet50, densenet121) modules. layer3 (stride 16: 14x14 at
# 224 px) is fine enough to say "inside the lungs"; layer4 (stride 32: 7x7) is pytorch-grad-cam's usual choice.
CAM_LAYERS = ("layer3", "layer4")
CAM_LAYER = "layer3"


def cam_layer(model: torch.nn.Module, layer: str = CAM_LAYER) -> torch.nn.Module:
    """The module whose activations Grad-CAM weighs: the last block of ResNet's `layer` or DenseNet's block."""
    if layer not in CAM_LAYERS:
        raise CXRError(f"Grad-CAM layer {layer!r}: choose one of {', '.join(CAM_LAYERS)}")
    if layer == "layer4":
        return gradcam_target_layer(model)
    return model.layer3[-1] if model.backbone_name == "resnet50" else model.features.denseblock3


def grad_cam(model: torch.nn.Module, batch: torch.Tensor, target_classes: Sequence[int] | None = None,
             batch_size: int = 16, layer: str = CAM_LAYER) -> np.ndarray:
    """Grad-CAM of `model` for each image of `batch` (N, C, H, W): (N, H, W) float32 in [0, 1].

    Each map explains `target_classes[i]` (default: the predicted class) at `cam_layer(model, layer)`,
    upsampled to the input size and scaled to max 1 per image (an all-zero map stays 0). layer3 is 16x
    smaller than the input (14x14 cells at 224 px), layer4 32x; a map of 1x1 cells is flat (0).
    The model is left in eval mode.
    """
    if batch.ndim != 4:
        raise CXRError(f"grad_cam needs a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    if target_classes is not None and len(target_classes) != len(batch):
        raise CXRError(f"grad_cam got {len(target_classes)} target classes for {len(batch)} images")
    cam = GradCAM(model=model, target_layers=[cam_layer(model, layer)])
    maps = []
    try:  # not `with GradCAM(...)`: its __exit__ swallows IndexError
        with torch.enable_grad():  # also inside a caller's torch.no_grad()
            for start in range(0, len(batch), batch_size):
                # An input that requires grad lets gradients reach the target layer even when it is frozen.
                x = batch[start:start + batch_size].detach().clone().requires_grad_(True)
                targets = None if target_classes is None else [
                    ClassifierOutputTarget(int(c)) for c in target_classes[start:start + batch_size]]
                maps.append(cam(input_tensor=x, targets=targets))
    finally:
        cam.activations_and_grads.release()
    return np.clip(np.concatenate(maps), 0.0, 1.0).astype(np.float32)


def cam_lung_share(cams: np.ndarray, lung_masks: np.ndarray) -> np.ndarray:
    """Share of each CAM's mass inside its lung mask, (N,); NaN for an all-zero CAM.

    `lung_masks` is (N, H, W) or one (H, W) mask for all. Compare with the mask's area share
    (`lung_masks.mean(axis=(-2, -1))`): a CAM spread evenly over the image scores exactly that.
    """
    cams, masks = np.asarray(cams, dtype=np.float64), np.asarray(lung_masks, dtype=bool)
    if cams.ndim != 3 or masks.ndim not in (2, 3) or masks.shape[-2:] != cams.shape[1:] or (
            masks.ndim == 3 and len(masks) != len(cams)):
        raise CXRError(f"cam_lung_share: cams {cams.shape} must be (N, H, W) and masks (H, W) or (N, H, W) "
                       f"of the same size, got masks {masks.shape}")
    total = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def lung_share_summary(cams: np.ndarray, lung_masks: np.ndarray, patients: Sequence[Any], n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """Mean CAM mass inside the lungs (`cam_lung_share`) and mean lung area share over images, their difference,
    each with a 95% percentile CI from `n_boot` resamples of patients (images of one patient move together).

    A difference whose CI lies above 0 means the maps sit in the lungs more than an even spread would; below 0,
    less. All-zero CAMs (share undefined) are left out and counted in `n_flat`.
    """
    masks = np.broadcast_to(np.asarray(lung_masks, dtype=bool), np.shape(cams))
    share, area = cam_lung_share(cams, masks), masks.mean(axis=(1, 2))
    keep = ~np.isnan(share)
    if not keep.any():
        raise CXRError("lung_share_summary: every CAM is all zero (is the image too small for the layer?)")
    share, area, groups = share[keep], area[keep], np.asarray(patients)[keep]
    weights = np.vstack([np.ones(len(share)), bootstrap_counts(groups, n_boot, seed)])
    draws = {"cam_lung_share": weights @ share / weights.sum(axis=1), "lung_area_share": weights @ area / weights.sum(axis=1)}
    draws["difference"] = draws["cam_lung_share"] - draws["lung_area_share"]
    out: dict[str, Any] = {"n": int(keep.sum()), "n_patients": len(set(groups)), "n_flat": int((~keep).sum())}
    for name, values in draws.items():
        out[name], out[f"{name}_ci"] = float(values[0]), tuple(np.percentile(values[1:], [2.5, 97.5]).tolist())
    return out


def lung_share_sentence(summary: dict[str, Any]) -> str:
    """`lung_share_summary` in words, with its verdict computed from the difference's CI."""
    def num(name: str) -> str:
        low, high = summary[f"{name}_ci"]
        return f"{summary[name]:.2f} (95% CI {low:.2f}–{high:.2f})"

    low, high = summary["difference_ci"]
    verdict = ("more than an evenly spread map would put there: the maps favour the lungs" if low > 0 else
               "less than an evenly spread map would put there: the maps favour what lies outside the lungs"
               if high < 0 else "no different from an evenly spread map: they do not single out the lungs")
    flat = f"; {summary['n_flat']} all-zero map(s) left out" if summary["n_flat"] else ""
    return (f"CAM mass inside the lungs {num('cam_lung_share')} vs the lungs' area share {num('lung_area_share')}, "
            f"over {summary['n']} images of {summary['n_patients']} patients{flat}: {verdict}.")


def lung_share_by_group(cams: np.ndarray, lung_masks: np.ndarray, patients: Sequence[Any], groups: Sequence[Any],
                        seed: int = 0) -> str:
    """One `lung_share_sentence` per group (e.g. per true class), as Markdown bullets: a pooled verdict can hide
    a class whose maps sit outside the lungs."""
    groups = np.asarray(groups)
    lines = []
    for group in sorted(set(groups.tolist())):
        at = groups == group
        try:
            said = lung_share_sentence(lung_share_summary(cams[at], np.asarray(lung_masks)[at],
                                                          np.asarray(patients)[at], seed=seed))
        except CXRError:
            said = "every map is all zero: no share to report."
        lines.append(f"- **{group}**: {said}")
    return "\n".join(lines)
