"""Shortcut audit: is a score earned from the lungs, or from where the image came from?

In CoronaHack every COVID image is an adult from other hospitals and every other image a child from
one hospital, so a model can tell COVID apart by age, scanner, markers, borders or file size without
reading the lungs (DeGrave et al. 2021; Roberts et al. 2021). The checks here:

1. Probes (`source_probe`). Cross-validated logistic regressions, folds grouped by patient, predict
   the data source from (a) trivial image statistics (whole image, border strip, corner patches,
   original file size) and (b) the network's pooled backbone features; and (c) the COVID label from
   border and corner statistics alone. Rule, on balanced accuracy (chance = 1/k for k classes):
   >= 0.80 or >= chance + 0.30 -> "shortcut" (flagged); >= chance + 0.10 -> "weak"; else "none".
   A flagged source probe says the source is written in the pixels (the model *can* use it; in
   CoronaHack source also means age, so anatomy carries it too); a flagged border -> label probe says
   the label is readable outside the lungs, and then any classifier score is suspect. Accuracy is
   reported next to the majority rate but, with classes weighted, can fall below it: the rule uses
   balanced accuracy. On all images origin and label coincide, so every origin probe is repeated
   within each class (among non-COVID, among COVID). Every verdict has a permutation null (targets
   shuffled between patients; a probe the null does not reject at p < 0.05 says "none") and a
   patient-bootstrap CI. A positive control (`positive_control`) plants a corner marker on half the
   patients: a probe that cannot find it is blind, and its "none" verdicts mean nothing.
2. Masking (`evaluate_masked`). The model's metrics on intact images, with the lung fields blanked,
   and with everything but the lung fields blanked (masks: lungfields.lung_masks). A model that keeps
   its score with the lungs removed is reading something other than the lungs. Both masked kinds are
   unlike any training image (a large flat patch), so a collapse, especially lungs-only, proves
   little; a score that survives is the finding, judged against the majority-class baseline with
   bootstrap CIs. Masks are the refined per-image estimate. `conclusion` states both in words.
3. External validation (`external_validation_summary`) and subgroups (`subgroup_metrics`, Wilson
   intervals, "too few to say" below MIN_SUBGROUP images: `format_subgroups`).

One module (about 600 lines) on purpose: the three checks share the probe features, the patient grouping and
the verdict rule, and chapter 01, 04 and 06 read them as one audit; the training-level experiment (a model
trained without lungs) lives apart in `lungs_removed`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .config import CLASSES, classes as task_classes, task_label
from .errors import CXRError
from .lungfields import MASK_MODES, lung_masks, mask_images
from .images import DeviceBatches, ImageCache, make_transform
from .preprocess import plant_marker
from .infer import forward_all
from .metrics import (bootstrap_counts, compute_metrics, majority_baseline, patient_groups, predictions_table,
                      wilson_interval)
from .models import backbone_and_head

PERCENTILES = (5, 25, 50, 75, 95)
PARTS = ("whole", "border", "corners")
SHORTCUT_BALANCED_ACCURACY = 0.80  # the verdict rule of the module docstring
SHORTCUT_ABOVE_CHANCE = 0.30
WEAK_ABOVE_CHANCE = 0.10
ALPHA = 0.05  # a probe whose permutation p-value is not below this says nothing ("none")
PROBE_COMPONENTS = 32  # wider features are reduced to this many principal components before the probe
N_PERMUTATIONS = 50  # permutation-null size of source_probe (p-values down to 1/51; the book executes on CPUs)
MASKED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "covid_sensitivity", "covid_specificity", "roc_auc")
MASKED_CI = ("macro_f1", "covid_sensitivity", "covid_specificity")  # evaluate_masked's CI columns
RETAINED_SHORTCUT = 0.80  # the masking rule of `conclusion`
RETAINED_PARTIAL = 0.50
MIN_SUBGROUP = 10  # images below which a subgroup metric is "too few to say"
SUBGROUP_METRICS = ("accuracy", "covid_sensitivity", "covid_specificity")
AGE_BANDS = (0, 18, 40, 60, 80, np.inf)
AGE_LABELS = ("0-17", "18-39", "40-59", "60-79", "80+")


# --- features for the probes ---------------------------------------------------------------------


def image_statistics(images: np.ndarray, parts: Sequence[str] = PARTS, border: float = 0.1,
                     corner: float = 0.15) -> pd.DataFrame:
    """Mean, std and percentiles of each image's `parts`: whole, border strip, each corner patch.

    `border` and `corner` are fractions of the side. Corners are where markers, text and collimation
    sit (file sizes: `original_sizes`).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise CXRError(f"image_statistics needs (N, H, W) images, got shape {images.shape}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CXRError(f"unknown image part(s) {unknown}: choose from {', '.join(PARTS)}")
    _, h, w = images.shape
    b, c = max(1, round(border * min(h, w))), max(1, round(corner * min(h, w)))
    regions: dict[str, np.ndarray] = {}
    if "whole" in parts:
        regions["whole"] = np.ones((h, w), bool)
    if "border" in parts:
        regions["border"] = np.ones((h, w), bool)
        regions["border"][b:h - b, b:w - b] = False
    if "corners" in parts:
        for name, rows, cols in (("tl", slice(0, c), slice(0, c)), ("tr", slice(0, c), slice(w - c, w)),
                                 ("bl", slice(h - c, h), slice(0, c)), ("br", slice(h - c, h), slice(w - c, w))):
            regions[f"corner_{name}"] = np.zeros((h, w), bool)
            regions[f"corner_{name}"][rows, cols] = True
    columns = {}
    for name, region in regions.items():
        pixels = images[:, region]
        columns[f"{name}_mean"], columns[f"{name}_std"] = pixels.mean(axis=1), pixels.std(axis=1)
        for q, values in zip(PERCENTILES, np.percentile(pixels, PERCENTILES, axis=1)):
            columns[f"{name}_p{q}"] = values
    return pd.DataFrame(columns)


def original_sizes(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Width, height and aspect ratio of each file as stored (headers only); NaN where unreadable.

    In CoronaHack these alone can give the class away (the paediatric images were squashed upstream).
    """
    sizes = []
    for path in paths:
        try:
            if str(path).lower().endswith((".dcm", ".dicom")):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sizes.append((float(ds.Columns), float(ds.Rows)))
            else:
                with Image.open(path) as im:
                    sizes.append(tuple(float(v) for v in im.size))
        except Exception:  # an unreadable file is reported by the image cache; here it is just unknown
            sizes.append((np.nan, np.nan))
    frame = pd.DataFrame(sizes, columns=["width", "height"])
    frame["aspect"] = frame["width"] / frame["height"]
    return frame


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _apply(module: torch.nn.Module, images: np.ndarray, input_spec: str, batch_size: int) -> np.ndarray:
    """`module` over uint8 images in batches, after the model's own evaluation transform."""
    device = _device(module)
    pixels = DeviceBatches(torch.from_numpy(np.ascontiguousarray(images, np.uint8)), torch.zeros(len(images)),
                           device, make_transform(input_spec, train=False))
    return forward_all(module, pixels, batch_size=batch_size, device=device)[0].numpy()


def backbone_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Pooled backbone features (N, D) of uint8 images (N, H, W): what the head sees."""
    features, _ = backbone_and_head(model)
    return _apply(features, images, model.input_spec, batch_size)


# --- probes --------------------------------------------------------------------------------------


def verdict(balanced_accuracy: float, n_classes: int, p_value: float | None = None) -> str:
    """The probe rule of the module docstring: "shortcut", "weak" or "none"; "none" whenever the
    permutation null does not reject (`p_value` >= ALPHA), however high the score."""
    chance = 1.0 / n_classes
    if p_value is not None and p_value >= ALPHA:
        return "none"
    if balanced_accuracy >= SHORTCUT_BALANCED_ACCURACY or balanced_accuracy >= chance + SHORTCUT_ABOVE_CHANCE:
        return "shortcut"
    return "weak" if balanced_accuracy >= chance + WEAK_ABOVE_CHANCE else "none"


def origin(table: pd.DataFrame) -> pd.Series:
    """Where each image was taken: "guangzhou" (Kermany's paediatric set), "ieee8023" (the adult
    collection), else the `source` column.

    Not the `source` column: CoronaHack's COVID images are ieee8023 copies and keep source
    "coronahack" after dedup; their patient id (ieee8023:... or coronahack:<file>) tells them apart.
    """
    ids = table["patient_id"].fillna("").astype(str)
    adult = ids.str.startswith(("ieee8023:", "coronahack:"))
    where = np.where(adult, "ieee8023", table["source"].astype(str))
    return pd.Series(np.where(ids.str.startswith("kermany:"), "guangzhou", where), index=table.index, name="origin")


def _probe_inputs(X: np.ndarray) -> np.ndarray:
    """Features imputed, standardised and, when wider than PROBE_COMPONENTS, reduced by PCA: once, on all rows.

    These steps never see the target, so fitting them outside the folds leaks nothing about it, and the
    permutation null (many cross-validations) then only refits the logistic regression.
    """
    steps = [SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()]
    if X.shape[1] > PROBE_COMPONENTS:
        steps.append(PCA(n_components=min(PROBE_COMPONENTS, len(X)), random_state=0))
    return make_pipeline(*steps).fit_transform(X)


def permute_by_group(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`y` shuffled between groups (patients): each patient takes another patient's target for all its images.

    The null of "features say nothing about the target" for grouped data: shuffling single images would
    split a patient's images between targets and make the null too easy to beat.
    """
    codes, uniques = pd.factorize(pd.Series(groups))
    per_group = pd.Series(y).groupby(codes).first().to_numpy()
    return per_group[rng.permutation(len(uniques))][codes]


def _null(model, X: np.ndarray, y: np.ndarray, groups: np.ndarray, cv: list, n: int,
          rng: np.random.Generator) -> np.ndarray:
    """Balanced accuracies of the same cross-validation on `n` between-patient permutations of `y`.

    A permutation that leaves a training fold without some target is redrawn (rare targets only).
    """
    scores: list[float] = []
    for _ in range(20 * n):  # bounded: a target too rare for the folds ends with fewer draws, not a hang
        if len(scores) == n:
            break
        y_perm = permute_by_group(y, groups, rng)
        if all(len(np.unique(y_perm[train])) == len(np.unique(y)) for train, _ in cv):
            scores.append(balanced_accuracy_score(y_perm, cross_val_predict(model, X, y_perm, cv=cv)))
    return np.array(scores)


def probe(features: np.ndarray | pd.DataFrame, target: Sequence[Any], groups: Sequence[Any],
          n_splits: int = 5, seed: int = 0, n_permutations: int = 0, n_boot: int = 200) -> dict[str, Any]:
    """How well a logistic regression on `features` predicts `target`, cross-validated by group.

    Folds keep each patient on one side (StratifiedGroupKFold: grouped like GroupKFold, and every
    fold keeps both targets even when one is rare). Classes are weighted so a rare source counts.
    Returns accuracy (chance: the majority rate), balanced accuracy (chance: 1/k) with a patient-bootstrap
    95% CI of the out-of-fold predictions, ROC AUC (chance 0.5; macro one-vs-rest for k > 2) and the
    `verdict`. With `n_permutations`, the same cross-validation on targets permuted between patients
    (`permute_by_group`) gives `null_mean`, `null_p95` and `p_value` = (1 + #null >= observed) / (1 + n).
    """
    X = np.asarray(features, dtype=np.float64)
    names, y = np.unique(np.asarray(target).astype(str), return_inverse=True)
    groups = np.asarray(groups)
    if len(names) < 2:
        raise CXRError(f"probe target has one value only ({names.tolist()}): nothing to predict")
    if not len(X) == len(y) == len(groups):
        raise CXRError(f"probe got {len(X)} feature rows, {len(y)} targets and {len(groups)} groups")
    per_class = pd.Series(groups).groupby(y).nunique()
    n_splits = min(n_splits, int(per_class.min()))
    if n_splits < 2:
        raise CXRError(f"probe: target {names[per_class.idxmin()]!r} has one patient only; cross-validation "
                       "needs at least two per value")
    X, model = _probe_inputs(X), LogisticRegression(max_iter=2000, class_weight="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # StratifiedGroupKFold: a class with few groups
        # the folds once (splitting is the slow part); permuted targets reuse them: still patient-disjoint
        cv = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(X, y, groups))
        probs = cross_val_predict(model, X, y, groups=groups, cv=cv, method="predict_proba")
        null = _null(model, X, y, groups, cv, n_permutations, np.random.default_rng(seed))
    yhat = probs.argmax(axis=1)
    auc = roc_auc_score(y, probs[:, 1]) if len(names) == 2 else roc_auc_score(y, probs, multi_class="ovr")
    balanced = balanced_accuracy_score(y, yhat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a resample without one of the targets
        boot = [balanced_accuracy_score(y, yhat, sample_weight=w) for w in bootstrap_counts(groups, n_boot, seed)]
    p_value = float((1 + (null >= balanced).sum()) / (1 + len(null))) if len(null) else None
    return {
        "n": len(y), "n_groups": len(set(groups)), "n_splits": n_splits, "classes": names.tolist(),
        "accuracy": accuracy_score(y, yhat), "chance_accuracy": float(np.bincount(y).max() / len(y)),
        "balanced_accuracy": balanced, "chance_balanced_accuracy": 1.0 / len(names),
        "ci_low": float(np.percentile(boot, 2.5)) if boot else np.nan,
        "ci_high": float(np.percentile(boot, 97.5)) if boot else np.nan,
        "null_mean": float(null.mean()) if len(null) else np.nan,
        "null_p95": float(np.percentile(null, 95)) if len(null) else np.nan,
        "p_value": p_value, "n_permutations": len(null),
        "auc": float(auc), "verdict": verdict(balanced, len(names), p_value),
    }


SUBSETS = {"all images": None, "non-COVID only": False, "COVID only": True}  # source_probe's origin subsets


def source_probe(table: pd.DataFrame, images: np.ndarray, features: np.ndarray | None = None,
                 sizes: pd.DataFrame | None = None, target: str = "origin", seed: int = 0,
                 n_permutations: int = N_PERMUTATIONS) -> pd.DataFrame:
    """The probes of the module docstring as one table (one row per probe), on rows of `table` and their images.

    Rows: image statistics -> `target`; + file sizes -> `target` (with `sizes`); learned features ->
    `target` (with `features`, e.g. `backbone_features`); border and corner statistics -> COVID label.
    Every `target` probe runs on all images and again within each class (`subset` "non-COVID only",
    "COVID only"): on all images origin and label coincide in CoronaHack, so only the within-class rows
    measure origin itself. A subset with one origin, or one patient of one, is left out and listed,
    with the reason, in `result.attrs["skipped"]`. `target` is a table column; "origin" comes from `origin()` when absent. Every
    row carries its permutation null (`n_permutations`) and CI (`probe`).
    """
    if len(table) != len(images):
        raise CXRError(f"source_probe got {len(table)} table rows and {len(images)} images: "
                       "pass them in the same order")
    if target == "origin" and target not in table.columns:
        table = table.assign(origin=origin(table))
    if target not in table.columns:
        raise CXRError(f"source_probe: the table has no column {target!r}")
    groups, covid = patient_groups(table), (table["label"] == "covid").to_numpy()
    stats = image_statistics(images)
    inputs = [("image statistics", stats)]
    if sizes is not None:
        inputs.append(("image statistics + file size", pd.concat([stats, sizes.reset_index(drop=True)], axis=1)))
    if features is not None:
        inputs.append(("learned features", features))
    runs = [(name, subset, np.asarray(X), table[target].to_numpy(), target, keep) for name, X in inputs
            for subset, keep in SUBSETS.items()]
    runs.append(("border and corners", "all images", image_statistics(images, parts=("border", "corners")).to_numpy(),
                 np.where(covid, "covid", "not_covid"), "covid label", None))
    rows, skipped = [], []
    for name, subset, X, y, y_name, keep in runs:
        rows_in = np.ones(len(y), bool) if keep is None else covid == keep
        values = pd.Series(groups[rows_in]).groupby(y[rows_in]).nunique()
        if len(values) < 2 or values.min() < 2:
            counts = ", ".join(f"{value} {int(n)}" for value, n in values.items())
            skipped.append(f"{name} → {y_name} ({subset}): patients per value {counts}; a probe needs two values "
                           "with two patients each")  # fmt: skip
            continue
        result = probe(X[rows_in], y[rows_in], groups[rows_in], seed=seed, n_permutations=n_permutations)
        rows.append({"features": name, "target": y_name, "subset": subset, **result,
                     "flagged": result["verdict"] == "shortcut"})
    out = pd.DataFrame(rows).drop(columns="classes")
    out.attrs["skipped"] = skipped
    return out


def positive_control(images: np.ndarray, groups: Sequence[Any], featurize, seed: int = 0,
                     n_permutations: int = N_PERMUTATIONS) -> pd.DataFrame:
    """Can the probe find a shortcut that is certainly there? A marker is planted on half the patients.

    `featurize(images)` -> features (e.g. `image_statistics` or a model's `backbone_features`). Row
    "planted": the probe must flag the marker; row "not planted" (same halves, no marker): it must not.
    A probe that misses the planted marker is blind, and its "none" verdicts elsewhere mean nothing.
    """
    groups = np.asarray(groups)
    codes, uniques = pd.factorize(pd.Series(groups))
    half = np.random.default_rng(seed).permutation(len(uniques)) < len(uniques) // 2
    marked = half[codes]
    target = np.where(marked, "marked", "unmarked")
    rows = []
    for name, pixels in (("planted", plant_marker(images, marked)), ("not planted", images)):
        result = probe(featurize(pixels), target, groups, seed=seed, n_permutations=n_permutations)
        rows.append({"control": name, **result, "flagged": result["verdict"] == "shortcut"})
    return pd.DataFrame(rows).drop(columns="classes").set_index("control")


# --- masking -------------------------------------------------------------------------------------


def readable(rows: pd.DataFrame, cache: ImageCache) -> tuple[pd.DataFrame, np.ndarray]:
    """(`rows` whose image `cache` could read, re-indexed 0..n-1, their pixels in the same order).

    Unreadable files are left out with one warning naming how many and the first, so a table and its
    pixels never fall out of step (the audit's probes, Grad-CAM samples and masked evaluation all rely on it).
    """
    pixels, skipped = cache.load(rows["path"].tolist())
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) left out, e.g. {skipped[0]}", stacklevel=2)
        rows = rows[~rows["path"].astype(str).isin({p for p, _ in skipped})]
    return rows.reset_index(drop=True), pixels


def evaluate_masked(model: torch.nn.Module, rows: pd.DataFrame, cache: ImageCache | int,
                    modes: Sequence[str] = MASK_MODES, task: str | None = None, refine: bool = True,
                    fill: str | int = "mean", batch_size: int = 32, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """The model's test metrics with the images intact, lungs removed and lungs only (one row per mode).

    `rows` are table rows (path, label, ids) or a predictions table (path, true, ids: a run's
    predictions.csv); `cache` an ImageCache or the image size to cache at.
    Masks come from `lungfields.lung_masks(images, refine)` and are painted before normalisation
    (`lungfields.mask_images`). `task` defaults to the one matching the model's output width.
    `f1_retained` = macro-F1 / intact macro-F1: near 1 with the lungs removed means the model does
    not need the lungs for its score (a shortcut). Each mode has patient-bootstrap 95% CIs
    (`<metric>_ci_low/high`, `n_boot` resamples) and `baseline_macro_f1`, the macro-F1 of always
    answering the rows' majority class: a masked score at or below it is no score at all.
    """
    rows, images = readable(rows, cache if isinstance(cache, ImageCache) else ImageCache(int(cache)))
    n_out = backbone_and_head(model)[1].out_features
    if task is None:
        task = {len(c): name for name, c in CLASSES.items()}.get(n_out, "")
    classes = task_classes(task)
    names = rows["true"] if "true" in rows.columns else [task_label(label, task) for label in rows["label"]]
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise CXRError(f"evaluate_masked: rows hold classes {unknown}, not of task {task} {classes}")
    y = np.array([classes.index(name) for name in names])
    masks = lung_masks(images, refine=refine)
    out = []
    for mode in modes:
        logits = _apply(model, mask_images(images, masks, mode, fill), model.input_spec, batch_size)
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        m = compute_metrics(predictions_table(rows, probs, classes, y), classes, n_boot=n_boot, seed=seed)
        cis = {f"{k}_ci_{side}": (m["ci"].get(k) or (None, None))[i] for k in MASKED_CI for i, side in enumerate(("low", "high"))}
        out.append({"mode": mode, "n": m["n"], **{k: m.get(k) for k in MASKED_METRICS}, **cis,
                    "baseline_macro_f1": majority_baseline(y, y, classes)["macro_f1"]})
    table = pd.DataFrame(out).set_index("mode")
    table = table.astype({k: float for k in table.columns if k != "n"})
    if "intact" in table.index:
        table["f1_retained"] = table["macro_f1"] / table.loc["intact", "macro_f1"]
    return table


def probe_table(probe: pd.DataFrame) -> pd.DataFrame:
    """`source_probe`'s (or `positive_control`'s) rows narrow enough for a page: what was probed, balanced
    accuracy with its CI, chance, the permutation p-value and the verdict."""
    from .results import fmt_ci

    keys = probe[[c for c in ("features", "target", "subset") if c in probe]]
    return keys.assign(**{
        "balanced accuracy (95% CI)": [fmt_ci(r.balanced_accuracy, (r.ci_low, r.ci_high)) for r in probe.itertuples()],
        "chance": probe["chance_balanced_accuracy"].map("{:.3f}".format),
        "p (permutation)": probe["p_value"].map(lambda p: "–" if pd.isna(p) else f"{p:.3f}"),
        "verdict": probe["verdict"],
    })


MODE_WORDS = {"intact": "intact", "lungs_removed": "lung fields blanked", "lungs_only": "only the lung fields kept"}


def masked_table(masked: pd.DataFrame) -> pd.DataFrame:
    """`evaluate_masked` narrow enough for a page: one row per way the test images were shown (in words), scores with
    their CIs, the majority baseline and the share of macro-F1 retained."""
    from .results import fmt_ci

    out = pd.DataFrame({"test images shown": [MODE_WORDS.get(m, str(m).replace("_", " ")) for m in masked.index]})
    if "n" in masked:
        out["images"] = masked["n"].to_numpy()
    for name, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("covid_sensitivity", "COVID-19 sensitivity"),
                        ("covid_specificity", "COVID-19 specificity"), ("roc_auc", "ROC AUC")):
        if name in masked:
            cis = (zip(masked[f"{name}_ci_low"], masked[f"{name}_ci_high"]) if f"{name}_ci_low" in masked
                   else [None] * len(masked))
            out[label] = [fmt_ci(value, ci) for value, ci in zip(masked[name], cis)]
    for name, label in (("baseline_macro_f1", "majority-class macro-F1"), ("f1_retained", "macro-F1 retained")):
        if name in masked:
            out[label] = [fmt_ci(v) for v in masked[name]]
    return out


def probe_lines(probe: pd.DataFrame) -> str:
    """`source_probe`'s rows as Markdown bullets: score, CI, chance, permutation null and verdict."""
    return "\n".join(_probe_line(r) for _, r in probe.iterrows())


def _probe_line(r: pd.Series) -> str:
    from .results import fmt_ci

    subset = f" ({r['subset']})" if "subset" in r and r["subset"] != "all images" else ""
    ci = (r["ci_low"], r["ci_high"]) if pd.notna(r.get("ci_low", np.nan)) else None
    null = (f"; permuted targets reach {r['null_p95']:.3f} (95th percentile), p = {r['p_value']:.3f}"
            if pd.notna(r.get("p_value", np.nan)) else "")
    return (f"- {r['features']} → {r['target']}{subset}: balanced accuracy {fmt_ci(r['balanced_accuracy'], ci)} "
            f"(chance {r['chance_balanced_accuracy']:.3f}{null}), AUC {r['auc']:.3f}: **{r['verdict']}**.")


def _masked_reading(masked: pd.DataFrame) -> tuple[float, bool, str]:
    """(share of the score kept without the lungs, whether it beats the majority baseline, the sentence).

    With `baseline_macro_f1`, the share is of the score above the baseline: (removed - base) / (intact - base),
    and "beats" asks the lungs-removed CI (when there is one) to lie above the baseline.
    """
    intact, removed = masked.loc["intact"], masked.loc["lungs_removed"]
    base = removed.get("baseline_macro_f1", np.nan)
    if pd.isna(base):
        kept, beats, ref = removed["macro_f1"] / intact["macro_f1"], True, ""
    else:
        lowest = removed.get("macro_f1_ci_low", np.nan)
        beats = bool((lowest if pd.notna(lowest) else removed["macro_f1"]) > base)
        kept = (removed["macro_f1"] - base) / (intact["macro_f1"] - base) if intact["macro_f1"] > base else 0.0
        ref = (f" against {base:.3f} for always answering the majority class ("
               + ("above it" if beats else "no better") + ")")
    ci = (f" ({removed['macro_f1_ci_low']:.3f}–{removed['macro_f1_ci_high']:.3f}, 95% CI)"
          if pd.notna(removed.get("macro_f1_ci_low", np.nan)) else "")
    share = "of its score above the baseline" if ref else "retained"
    text = (f"- With the lung fields blanked, macro-F1 goes from {intact['macro_f1']:.3f} to {removed['macro_f1']:.3f}"
            f"{ci}{ref}; {max(kept, 0.0):.0%} {share}. COVID-19 sensitivity goes from {intact['covid_sensitivity']:.3f} "
            f"to {removed['covid_sensitivity']:.3f} at specificity {removed['covid_specificity']:.3f}.")
    return float(kept), beats, text


def conclusion(probe: pd.DataFrame, masked: pd.DataFrame | None = None) -> str:
    """What `source_probe` and `evaluate_masked` say, as Markdown computed from their numbers (never typed).

    Verdict: "suspect" when border/corner statistics predict COVID, or with the lungs removed the model
    keeps >= 80% of its macro-F1 (of the part above the majority baseline, when known) or still finds
    COVID (sensitivity >= 0.5 at specificity >= 0.8); "partly outside the lungs" when it keeps >= 50%
    and beats the baseline; otherwise a flagged origin probe means the model *could* use the origin
    (said more strongly when it is flagged within one class), and no flag proves nothing either way.
    """
    lines = [probe_lines(probe)]
    is_label = probe["target"] == "covid label"
    within = probe["subset"].ne("all images") if "subset" in probe else pd.Series(False, index=probe.index)
    label_flag = bool(probe.loc[is_label, "flagged"].any())
    source_flag = bool(probe.loc[~is_label, "flagged"].any())
    within_flag = bool(probe.loc[~is_label & within, "flagged"].any())
    kept, beats, reasons = None, True, ["border and corner statistics alone predict it"] if label_flag else []
    if masked is not None and {"intact", "lungs_removed"} <= set(masked.index):
        removed = masked.loc["lungs_removed"]
        kept, beats, text = _masked_reading(masked)
        if kept >= RETAINED_SHORTCUT and beats:
            reasons.append(f"the model keeps {kept:.0%} of its macro-F1 with the lungs removed")
        if removed["covid_sensitivity"] >= 0.5 and removed["covid_specificity"] >= 0.8:
            reasons.append(f"with the lungs removed it still finds {removed['covid_sensitivity']:.0%} of COVID-19 "
                           f"images at specificity {removed['covid_specificity']:.2f}")
        lines.append(text)
    if reasons:
        verdict = (f"**The COVID-19 score is suspect**: the label can be read without the lungs "
                   f"({'; '.join(reasons)}). Do not read these scores as evidence of lung findings.")
    elif kept is not None and kept >= RETAINED_PARTIAL and beats:
        verdict = ("**Part of what the model uses lies outside the lungs**: much of its score survives with the "
                   "lung fields removed.")
    elif source_flag:
        where = ("even among images of one class, so it is not just the label in disguise" if within_flag else
                 "across classes, where origin and label coincide")
        verdict = (f"The origin is easy to predict from the pixels ({where}), so the model *could* use it"
                   + ("; with the lungs removed it loses most of its score, which points to the lungs" if kept
                      is not None else "") + ". Only external validation on another hospital's images settles it.")
    else:
        verdict = "No shortcut was flagged by these checks; they cannot prove its absence."
    return "\n".join(lines) + "\n\n" + verdict


# --- external validation and subgroups -----------------------------------------------------------


def external_validation_summary(metrics: dict[str, Any] | str | Path) -> pd.DataFrame:
    """COVID sensitivity and specificity with their patient-level 95% CIs, from compute_metrics' output.

    `metrics` is the dict or a metrics.json path (e.g. written by `python -m cxrlib evaluate` on an
    external manifest). The CIs are metrics' patient bootstrap (`ci_info`); undefined values are NaN
    (e.g. specificity on a set without non-COVID images).
    """
    if not isinstance(metrics, dict):
        path = Path(metrics)
        if not path.is_file():
            raise CXRError(f"{path}: no metrics file; run `python -m cxrlib evaluate` first")
        metrics = json.loads(path.read_text())
    if "covid_sensitivity" not in metrics:
        raise CXRError("these metrics have no covid_sensitivity: the model's classes include no 'covid'")
    covid = metrics.get("per_class", {}).get("covid", {})
    n_pos = covid.get("support")
    n_neg = metrics["n"] - n_pos if n_pos is not None and "n" in metrics else None
    ci = metrics.get("ci", {})
    rows = []
    for name, n in (("covid_sensitivity", n_pos), ("covid_specificity", n_neg)):
        lo, hi = ci.get(name) or (None, None)
        rows.append({"metric": name, "value": metrics[name], "ci_low": lo, "ci_high": hi, "n_images": n,
                     "n_patients": metrics.get("n_patients"), "ci_unit": metrics.get("ci_info", {}).get("unit")})
    return pd.DataFrame(rows).set_index("metric").astype({"value": float, "ci_low": float, "ci_high": float})


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n trials (metrics.wilson_interval), NaN, NaN for n = 0."""
    low, high = wilson_interval(k, n)
    return (np.nan, np.nan) if low is None else (low, high)


def subgroup_metrics(pred: pd.DataFrame, table: pd.DataFrame, by: str | Sequence[str],
                     min_n: int = MIN_SUBGROUP) -> pd.DataFrame:
    """Accuracy and COVID sensitivity/specificity per subgroup of `by`, with Wilson 95% intervals.

    `by`: table columns, "age_band" or "country" (from `location`). `pred` is a predictions table,
    `table` the data table holding the metadata (matched on image_id); missing values form the group
    "unknown" (view, sex and age are known for ieee8023 and NIH rows only). Intervals count images, which
    are not independent when a patient has several: read them as a lower bound on the uncertainty.
    A metric whose denominator is below `min_n` gets `<metric>_enough` False: `format_subgroups` then
    says "too few to say" instead of a number (undefined metrics are NaN here, never 0).
    """
    by = [by] if isinstance(by, str) else list(by)
    meta = table.copy()
    if "age_band" in by:
        meta["age_band"] = pd.cut(meta["age"], AGE_BANDS, right=False, labels=AGE_LABELS).astype(object)
    if "country" in by and "country" not in meta.columns and "location" in meta.columns:
        meta["country"] = meta["location"].astype(str).str.split(",").str[-1].str.strip()
    missing = [c for c in by if c not in meta.columns]
    if missing:
        raise CXRError(f"subgroup_metrics: no column(s) {missing} in the table; available: {', '.join(meta.columns)}")
    frame = pred.drop(columns=[c for c in by if c in pred.columns]).merge(
        meta[["image_id", *by]], on="image_id", how="left", validate="one_to_one")
    for c in by:
        frame[c] = frame[c].where(frame[c].notna() & (frame[c].astype(str) != ""), "unknown").astype(str)
    rows = []
    for key, group in frame.groupby(by, sort=True):
        pos, called = group["true"] == "covid", group["pred"] == "covid"
        row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "n": len(group),
               "n_patients": group["patient_id"].nunique(), "n_covid": int(pos.sum())}
        counts = {"accuracy": (int((group["true"] == group["pred"]).sum()), len(group)),
                  "covid_sensitivity": (int(called[pos].sum()), int(pos.sum())),
                  "covid_specificity": (int((~called[~pos]).sum()), int((~pos).sum()))}
        for name, (k, n) in counts.items():
            row[name] = k / n if n else np.nan
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = wilson(k, n)
            row[f"{name}_n"], row[f"{name}_enough"] = n, n >= min_n
        rows.append(row)
    return pd.DataFrame(rows)


def format_subgroups(frame: pd.DataFrame, metrics: Sequence[str] = SUBGROUP_METRICS) -> pd.DataFrame:
    """`subgroup_metrics` for reading: "0.830 (0.700–0.910), n=40", or "too few to say (n=3)", or "none (n=0)"."""
    from .results import fmt_ci

    keys = [c for c in frame.columns if c not in {"n_patients", "n_covid"} and not c.startswith(tuple(SUBGROUP_METRICS))]
    out = frame[keys].copy()
    for name in metrics:
        def cell(r: pd.Series, name: str = name) -> str:
            n = int(r[f"{name}_n"])
            if n == 0:
                return "none (n=0)"
            if not r[f"{name}_enough"]:
                return f"too few to say (n={n})"
            return f"{fmt_ci(r[name], (r[f'{name}_ci_low'], r[f'{name}_ci_high']))}, n={n}"

        out[name] = frame.apply(cell, axis=1)
    return out
