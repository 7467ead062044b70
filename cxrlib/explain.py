"""Where a model fails and where it looks: error tables, Grad-CAM and its share inside the lung fields, which
test images a Grad-CAM figure may show (`cam_examples`), and one run's test metrics in words (`headline_table`,
`class_table`, `threshold_sentence`, with the COVID-19-vs-rest AUC that a 3-class run's macro AUC hides).

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
from sklearn.metrics import roc_auc_score

from . import plots
from .errors import CXRError
from .metrics import bootstrap_counts, patient_groups
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
    """`lung_share_summary` in words, with its verdict computed from the difference's CI; numbers as the book
    writes every interval (`results.fmt_ci`: `0.360 (0.310–0.420)`, 95% patient-bootstrap)."""
    from .results import fmt_ci

    def num(name: str) -> str:
        return fmt_ci(summary[name], summary[f"{name}_ci"])

    low, high = summary["difference_ci"]
    verdict = ("more than an evenly spread map would put there: the maps favour the lungs" if low > 0 else
               "less than an evenly spread map would put there: the maps favour what lies outside the lungs"
               if high < 0 else "no different from an evenly spread map: they do not single out the lungs")
    flat = f"; {summary['n_flat']} all-zero map(s) left out" if summary["n_flat"] else ""
    return (f"Share of the Grad-CAM mass inside the lungs {num('cam_lung_share')} vs the lungs' share of the image "
            f"{num('lung_area_share')} (95% CIs), over {summary['n']} images of {summary['n_patients']} "
            f"patients{flat}: {verdict}.")


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
        lines.append(f"- **{plots.class_words(str(group))}**: {said}")
    return "\n".join(lines)


# --- one run's test metrics, as the book shows them ---------------------------------------------------


def covid_auc(pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[float | None, tuple | None]:
    """COVID-19-vs-rest ROC AUC of a predictions table (its `p_covid` column, scikit-learn), with the 95% CI of the
    same patient bootstrap as metrics.json's intervals (`bootstrap_counts`, same `n_boot` and `seed`). In a
    3-class run this is not the headline "ROC AUC", which is the macro mean of the three one-vs-rest AUCs.
    (None, None) without both COVID-19 and other images."""
    if "p_covid" not in pred:
        raise CXRError("covid_auc: the predictions have no p_covid column (a task without a COVID-19 class)")
    y, score = (pred["true"] == "covid").to_numpy(), pred["p_covid"].to_numpy(float)
    if not 0 < y.sum() < len(y):
        return None, None
    value = float(roc_auc_score(y, score))
    draws = []
    for w in bootstrap_counts(patient_groups(pred), n_boot, seed):
        if w[y].sum() > 0 and w[~y].sum() > 0:
            draws.append(roc_auc_score(y, score, sample_weight=w))
    ci = tuple(np.percentile(draws, [2.5, 97.5]).tolist()) if draws else None
    return value, ci


def headline_table(metrics: dict[str, Any], pred: pd.DataFrame) -> pd.DataFrame:
    """A run's headline test metrics (metrics.json) in words, one row each, as `value (low–high)` with the
    patient-bootstrap 95% interval (`results.fmt_ci`). The 3-class "ROC AUC" is named the macro one-vs-rest AUC,
    with the COVID-19-vs-rest AUC beside it (`covid_auc`, computed from predictions.csv when metrics.json lacks
    it); the majority-class baseline closes the table. An undefined value says why instead of "NaN"."""
    from .results import fmt_ci

    ci, info = metrics.get("ci", {}), metrics.get("ci_info", {})
    classes = list(metrics["classes"])
    binary = len(classes) == 2
    has_covid = "covid" in classes and (pred["true"] == "covid").any()

    def cell(value: Any, interval: Any, why: str = "undefined on this test split") -> str:
        text = fmt_ci(value, interval)
        return text if text != "–" else f"– ({why})"

    rows = [("accuracy", cell(metrics.get("accuracy"), ci.get("accuracy"))),
            ("macro-F1 (mean of the per-class F1)", cell(metrics.get("macro_f1"), ci.get("macro_f1"))),
            ("balanced accuracy (mean recall)", cell(metrics.get("balanced_accuracy"), ci.get("balanced_accuracy")))]
    if binary:
        rows.append(("ROC AUC, COVID-19 vs the rest", cell(metrics.get("roc_auc"), ci.get("roc_auc"))))
    else:
        rows.append((f"ROC AUC, macro one-vs-rest (mean of the {len(classes)} classes' AUCs)",
                     cell(metrics.get("roc_auc"), ci.get("roc_auc"))))
        if "covid" in classes:
            value, interval = covid_auc(pred, info.get("n_boot", 1000), info.get("seed", 0))
            rows.append(("ROC AUC, COVID-19 vs the rest", cell(value, interval, "needs COVID-19 and other test images")))
    if "covid" in classes:
        why = "no COVID-19 image in the test split" if not has_covid else "undefined on this test split"
        rows += [("COVID-19 sensitivity (recall)", cell(metrics.get("covid_sensitivity"), ci.get("covid_sensitivity"), why)),
                 ("COVID-19 specificity", cell(metrics.get("covid_specificity"), ci.get("covid_specificity"),
                                               "every test image is COVID-19"))]
    base = metrics.get("majority_baseline") or {}
    if base:
        always = plots.class_words(str(base.get("class", "")))
        rows += [(f"majority-class baseline accuracy (always {always}; a fixed rule, no interval)",
                  fmt_ci(base.get("accuracy"))),
                 (f"majority-class baseline macro-F1 (always {always})", fmt_ci(base.get("macro_f1")))]
    return pd.DataFrame(rows, columns=["metric", "value (95% CI)"])


def class_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per class of a run (metrics.json): test images, precision, recall (sensitivity) and specificity with their
    Wilson 95% intervals (unit: image), and F1; a precision the model never gave a basis for (it never predicted
    the class) reads "– (never predicted)"."""
    from .results import fmt_ci

    wilson = (metrics.get("wilson") or {}).get("per_class", {})
    rows = []
    for name in metrics["classes"]:
        c, w = metrics["per_class"][name], wilson.get(name, {})
        precision = fmt_ci(c.get("precision"), w.get("precision"))
        rows.append({"class": plots.class_words(name), "test images": int(c["support"]),
                     "precision (95% CI)": precision if precision != "–" else "– (never predicted)",
                     "recall = sensitivity (95% CI)": fmt_ci(c.get("recall"), w.get("recall")),
                     "specificity (95% CI)": fmt_ci(c.get("specificity"), w.get("specificity")),
                     "F1": fmt_ci(c.get("f1"))})
    return pd.DataFrame(rows)


def threshold_sentence(metrics: dict[str, Any]) -> str:
    """The COVID-19 operating point of a run in words: the threshold chosen on validation and what it gives on the
    test split, with the patient-bootstrap intervals; a sentence saying why when the run has none."""
    from .results import fmt_ci

    at, chosen = metrics.get("at_threshold"), metrics.get("threshold_selection") or {}
    if not at:
        return "This run has no COVID-19 operating point (its task has no COVID-19 class, or no threshold was chosen)."
    target = chosen.get("target_sensitivity")
    ci = at.get("ci", {})
    aim = f"the highest threshold whose validation COVID-19 sensitivity is at least {target:.2f}" if target else \
        "a threshold chosen on the validation split"
    return (f"Operating point: a test image is called COVID-19 when p(COVID-19) ≥ {at['threshold']:.3f}, "
            f"{aim}. On the test split this gives COVID-19 sensitivity "
            f"{fmt_ci(at.get('covid_sensitivity'), ci.get('covid_sensitivity'))} and specificity "
            f"{fmt_ci(at.get('covid_specificity'), ci.get('covid_specificity'))} (95% patient-bootstrap intervals), "
            f"macro-F1 {fmt_ci(at.get('macro_f1'), ci.get('macro_f1'))}.")


# --- which images a Grad-CAM figure shows ---------------------------------------------------------------


def cam_examples(pred: pd.DataFrame, publishable: Sequence[bool], n: int = 6, seed: int = 0) -> pd.DataFrame:
    """Up to `n` publishable test images for a Grad-CAM figure, true COVID-19 first: the COVID-19 images the model
    found and those it missed (when there are any), then each other class right and wrong, one image of each kind
    in turn so every kind that exists appears; random within a kind (`seed`). Adds `outcome` (found / missed /
    right / wrong) and `p_pred`, the probability of the predicted class. `publishable`: one flag per row of `pred`
    (`licences.redistributable`); other images are never chosen."""
    pred = pred.assign(p_pred=_prob_of(pred, "pred"))[np.asarray(publishable, dtype=bool)]
    right = pred["true"] == pred["pred"]
    covid = pred["true"] == "covid"
    pred = pred.assign(outcome=np.where(covid, np.where(right, "found", "missed"), np.where(right, "right", "wrong")))
    kinds = [("covid", "found"), ("covid", "missed")]
    kinds += [(c, o) for c in sorted(set(pred["true"]) - {"covid"}) for o in ("right", "wrong")]
    pools = [pred[(pred["true"] == c) & (pred["outcome"] == o)].sample(frac=1, random_state=seed) for c, o in kinds]
    picked: list[tuple[int, pd.DataFrame]] = []
    for depth in range(n):
        for k, pool in enumerate(pools):
            if len(picked) < n and depth < len(pool):
                picked.append((k, pool.iloc[[depth]]))
    return pd.concat([row for _, row in sorted(picked, key=lambda x: x[0])]) if picked else pred.iloc[:0]


def publishable_note(pred: pd.DataFrame, publishable: Sequence[bool], label: str = "covid") -> str:
    """How many test images of `label` may be shown, and what licences keep the others out (a sentence)."""
    rows = pred[pred["true"] == label]
    ok = np.asarray(publishable, dtype=bool)[(pred["true"] == label).to_numpy()]
    name = plots.class_words(label)
    if not len(rows):
        return f"The test split holds no {name} image."
    if ok.all():
        return f"All {len(rows)} {name} test images may be published."
    licences = rows.loc[~ok, "license"].fillna("").replace("", "no licence recorded") if "license" in rows \
        else pd.Series("no licence recorded", index=rows.index[~ok])
    counts = ", ".join(f"{k}: {v}" for k, v in licences.value_counts().items())
    return (f"{int(ok.sum())} of the {len(rows)} {name} test images may be published; the licences of the other "
            f"{int((~ok).sum())} do not allow it ({counts}), so they are measured but never shown.")
