"""Predictions -> metrics: per-class scores, AUCs, confidence intervals, paired comparisons, calibration.

Every metric is computed from the predictions table alone (predictions.csv), and everything returned
is plain JSON: a run's metrics.json is what the notebooks and the book read, nothing re-runs a model.
Undefined values (a 0/0 precision, the AUC of a class absent from the test set) are None, never a
crash and never a silent 0; macro averages leave them out (scikit-learn's zero_division=nan).

Two kinds of 95 % interval, each where it works: accuracy, macro-F1, balanced accuracy and AUC get a
patient-level percentile bootstrap (`ci`), because they are not simple proportions and images of one
patient are correlated; sensitivity, specificity and precision also get Wilson score intervals
(`wilson`), because a bootstrap of a proportion at 0 or 1 collapses to [1, 1] (every resample of a
perfect score is perfect) while Wilson's interval stays honest about a small denominator.

One module (about 540 lines) on purpose: a metric's value, its bootstrap interval and its paired
comparison must come from the same code, and they share one set of internals (class indexing, patient
groups, JSON-safe values).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import subprocess
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import binomtest, norm
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from .atomic import write_text
from .errors import CXRError

POSITIVE = "covid"  # the class whose sensitivity the paper reports; index 1 of the binary task
# Each metric in words, for every table, plot and sentence of the book
METRIC_WORDS = {"macro_f1": "macro-F1", "accuracy": "accuracy", "covid_sensitivity": "COVID-19 sensitivity",
                "covid_specificity": "specificity", "roc_auc": "ROC AUC", "macro_precision": "macro precision",
                "macro_recall": "macro recall"}
ID_COLUMNS = ("image_id", "path", "patient_id", "source", "split")
# The metrics that get a bootstrap CI; each is also a top-level key of compute_metrics().
HEADLINE = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc", "covid_sensitivity", "covid_specificity")
# The metrics a paired comparison of two runs reports (difference, paired bootstrap CI).
PAIRED = ("macro_f1", "covid_sensitivity", "roc_auc")
N_BINS = 10  # equal-width confidence bins for ECE and the reliability curve
LEVEL = 0.95
# The lowest operating threshold on p_covid (bounded_threshold): below 1 in 100 the model itself says "not COVID-19"
# at 99:1, so a validation rule that goes there buys its sensitivity by calling nearly every image COVID-19 (the
# committed runs that went there called 34% and 92% of their test images COVID-19, against 12% and 5% true).
MIN_THRESHOLD = 0.01


def predictions_table(
    rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], y_true: np.ndarray
) -> pd.DataFrame:
    """One row per image: its ids, true and predicted class names, and one p_<class> column per class.

    `rows` is the data table subset in the same order as `probs`; this table is predictions.csv.
    """
    classes = list(classes)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise CXRError(f"probs has shape {probs.shape}; expected (n_images, {len(classes)}) for classes {classes}")
    _check_probs(probs)
    if not len(rows) == len(probs) == len(y_true):
        raise CXRError(
            f"predictions_table got {len(rows)} table rows, {len(probs)} probability rows and {len(y_true)} "
            "labels: pass the same images in the same order"
        )
    names = np.array(classes, dtype=object)
    out = rows[[c for c in ID_COLUMNS if c in rows.columns]].reset_index(drop=True)
    out["true"] = names[_as_index(y_true, classes, "y_true")]
    out["pred"] = names[probs.argmax(axis=1)]
    for k, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, k]
    return out


def compute_metrics(
    pred: pd.DataFrame,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    held_out: Collection[str] = (),
) -> dict[str, Any]:
    """All test-set metrics of one run, as a JSON-ready dict (see the module docstring for None).

    Class metrics use the `pred` column; AUCs and calibration use the p_<class> columns. CIs resample
    patients, not images: images of one patient are correlated, so image resampling would make the
    intervals too narrow. With `threshold`, `at_threshold` repeats the class metrics with COVID called
    whenever p_covid >= threshold (the operating point chosen on validation).

    `held_out` (image ids of populations the run never trained or validated on, params.json's
    `held_out_images`) are not the run's own test: the top level scores the rest, and `held_out` holds one
    block per true class of the held-out images (each population measured alone) and "all" (their AUC against
    each other), so no block mixes the run's own sources with unseen ones.
    """
    held = pred["image_id"].isin(set(held_out)).to_numpy() if len(held_out) else np.zeros(len(pred), bool)
    if held.any():
        own, unseen = pred[~held].reset_index(drop=True), pred[held].reset_index(drop=True)
        out = compute_metrics(own, classes, n_boot, seed, threshold)
        blocks = {"all": unseen, **{str(c): unseen[unseen["true"] == c] for c in dict.fromkeys(unseen["true"])}}
        out["held_out"] = {name: compute_metrics(part.reset_index(drop=True), classes, n_boot, seed, threshold)
                           for name, part in blocks.items()}
        return out
    classes = list(classes)
    y, yhat, probs = _arrays(pred, classes)
    groups = patient_groups(pred)
    weights = bootstrap_counts(groups, n_boot, seed)
    with _quiet():
        out: dict[str, Any] = {"n": len(y), "n_patients": len(set(groups)), "classes": classes}
        out.update(_classification(y, yhat, classes))
        out["roc_auc"], out["roc_auc_per_class"] = _ovr(roc_auc_score, y, probs, classes)
        out["pr_auc"], out["pr_auc_per_class"] = _ovr(average_precision_score, y, probs, classes)
        out["ece"], out["reliability"] = calibration(y, probs)
        out["ci"] = _percentiles(headline_batch(y, yhat, probs, classes, weights))
        out["ci_info"] = {"level": LEVEL, "method": "percentile", "unit": "patient", "n_boot": n_boot, "seed": seed,
                          "proportions": "wilson score interval (key 'wilson'), unit image"}
        if threshold is not None:
            y_t = _as_index(apply_threshold(pred, threshold, classes)["pred"], classes, "pred")
            at = {"threshold": float(threshold), **_classification(y, y_t, classes)}
            at["ci"] = _percentiles(headline_batch(y, y_t, None, classes, weights))
            out["at_threshold"] = at
    return _jsonable(out)


def bootstrap_counts(groups: Sequence[Any], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_rows) multiplicity of each row in each resample: patients drawn with replacement, all rows of a
    drawn patient repeated as often as the patient was drawn. One matrix, so metrics need no loop per resample."""
    codes, uniques = pd.factorize(pd.Series(list(groups)))
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(len(uniques), np.full(len(uniques), 1 / max(len(uniques), 1)), size=n_boot)
    return drawn[:, codes]


def headline_batch(
    y: np.ndarray, yhat: np.ndarray, probs: np.ndarray | None, classes: Sequence[str], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """HEADLINE metrics of each row of `weights` (B, n): the sample in which image i appears weights[b, i] times.

    All from per-resample confusion matrices (one matrix product) and, for AUC, a weighted rank formula, so
    B resamples cost little more than one. A row of ones gives the plain estimate. NaN where undefined.
    """
    classes = list(classes)
    k = len(classes)
    weights = np.asarray(weights, dtype=float)
    cm = (weights @ np.eye(k * k)[y * k + yhat]).reshape(-1, k, k)  # (B, true, predicted)
    hits, n_true, n_said = np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a row without any defined class
        recall = hits / n_true
        out = {
            "accuracy": hits.sum(axis=1) / cm.sum(axis=(1, 2)),
            "macro_f1": np.nanmean(2 * hits / (n_true + n_said), axis=1),  # F1 = 2TP / (2TP + FP + FN)
            "balanced_accuracy": np.nanmean(recall, axis=1),
        }
        if probs is not None:
            per = [_weighted_auc(y == c, probs[:, c], weights) for c in range(k)]
            out["roc_auc"] = per[1] if k == 2 else np.nanmean(per, axis=0)
        if POSITIVE in classes:
            p = classes.index(POSITIVE)
            out["covid_sensitivity"] = recall[:, p]
            out["covid_specificity"] = 1 - (n_said[:, p] - hits[:, p]) / (n_true.sum(axis=1) - n_true[:, p])
    return out


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> list[float | None]:
    """Wilson score interval of a proportion successes/n ([None, None] when n == 0); the one Wilson interval of
    the library (audit.wilson and generalise.wilson_interval only change how "undefined" is written).

    Unlike the normal approximation and the bootstrap, it does not collapse at 0/n or n/n: 0 of 10 gives
    [0, 0.28], not [0, 0]. `successes` may be fractional: a mean over several runs' calls of the same images.
    """
    if n == 0 or not math.isfinite(successes):
        return [None, None]
    z = float(norm.ppf(0.5 + level / 2))
    p, denom = successes / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion_cis(confusion: np.ndarray, classes: Sequence[str], level: float = LEVEL) -> dict[str, Any]:
    """Wilson intervals of each class's precision, recall (sensitivity) and specificity, from a confusion matrix
    (rows true, columns predicted); plus covid_sensitivity / covid_specificity where there is a covid class."""
    cm = np.asarray(confusion, dtype=int)
    total, n_true, n_said, hits = cm.sum(), cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    per_class = {
        c: {"precision": wilson_interval(hits[k], n_said[k], level),
            "recall": wilson_interval(hits[k], n_true[k], level),
            "specificity": wilson_interval(total - n_true[k] - n_said[k] + hits[k], total - n_true[k], level)}
        for k, c in enumerate(classes)
    }
    out: dict[str, Any] = {"per_class": per_class}
    if POSITIVE in classes:
        out["covid_sensitivity"] = per_class[POSITIVE]["recall"]
        out["covid_specificity"] = per_class[POSITIVE]["specificity"]
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on paired right/wrong calls: a two-sided binomial test of the discordant pairs.

    Images only one model gets right carry the evidence; images both get right or wrong carry none. It treats
    images as independent (images of one patient are not), so read it beside the patient-level bootstrap.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only_correct": a_only, "b_only_correct": b_only, "p_value": float(p)}


def join_predictions(a: pd.DataFrame, b: pd.DataFrame, on: str = "image_id") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of two predictions tables for the images both hold, in the same order (a paired comparison
    needs the same images). The truth and the patient of an image must agree in both."""
    for name, table in (("a", a), ("b", b)):
        if on not in table.columns:
            raise CXRError(f"predictions table {name} has no {on!r} column: cannot pair its images")
        dup = table[on][table[on].duplicated()]
        if len(dup):
            raise CXRError(f"predictions table {name} lists image {dup.iloc[0]!r} twice: cannot pair its images")
    common = a[on][a[on].isin(set(b[on]))]
    left = a.set_index(on).loc[common].reset_index()
    right = b.set_index(on).loc[common].reset_index()
    for col in ("true", "patient_id"):
        if col in left and col in right:
            differ = (left[col].astype(str) != right[col].astype(str)).to_numpy()
            if differ.any():
                raise CXRError(f"image {common.iloc[np.argmax(differ)]!r} has {col} {left[col][differ].iloc[0]!r} in "
                               f"one run and {right[col][differ].iloc[0]!r} in the other: not the same test data")
    return left, right


def paired_bootstrap(
    pairs: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    coef: Sequence[float] | None = None,
    units: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Run A vs run B on the images both saw, for one or more pairs (e.g. one per seed), with paired CIs.

    The contrast is sum_i coef_i * (metric(A_i) - metric(B_i)) (default coef 1/m: the mean difference over
    the m pairs; [+1, -1] over two pairs gives a difference of differences). Without `units`, its 95 % CI
    resamples patients once for all pairs, so both runs of a pair, and every pair, see the same resampled
    patients: the shared noise of the test set cancels, which two separate intervals cannot do.

    With `units` (one label per pair, e.g. its training seed: chapter 5's claims), the interval also covers the
    spread between units: each resample draws the units with replacement and, within each unit, its own test
    split's patients with replacement (the pairs of one unit share that draw). Per metric: the mean of A and B
    over pairs, the contrast, its CI and p, each unit's own contrast (`per_unit`) and in how many units (or
    pairs, without `units`) A was ahead; per pair: n and McNemar's test.
    """
    classes = list(classes)
    if not pairs:
        raise CXRError("paired_bootstrap needs at least one pair of predictions tables")
    coef = np.full(len(pairs), 1 / len(pairs)) if coef is None else np.asarray(coef, dtype=float)
    if len(coef) != len(pairs):
        raise CXRError(f"paired_bootstrap got {len(coef)} coefficients for {len(pairs)} pairs")
    if units is not None and len(units) != len(pairs):
        raise CXRError(f"paired_bootstrap got {len(units)} units for {len(pairs)} pairs")
    joined = [join_predictions(a, b) for a, b in pairs]
    empty = [i for i, (a, _) in enumerate(joined) if a.empty]
    if empty:
        raise CXRError(f"pair {empty[0]} has no image in common: its runs were tested on different data")
    unit_of = np.zeros(len(pairs), dtype=int) if units is None else pd.factorize(pd.Series(list(units)))[0]
    n_units = int(unit_of.max()) + 1
    groups = [patient_groups(a) for a, _ in joined]
    rng = np.random.default_rng(seed)
    drawn = []  # per unit: (codes of its patients, (n_boot, n_patients) multiplicities)
    for u in range(n_units):
        codes, uniques = pd.factorize(pd.Series(np.concatenate([g for g, k in zip(groups, unit_of) if k == u])))
        counts = rng.multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), size=n_boot)
        drawn.append((codes, counts))
    by_unit = np.zeros((n_units, n_boot + 1, len(PAIRED)))  # each unit's share of the contrast, per resample
    offset = np.zeros(n_units, dtype=int)
    point, per_pair = [], []
    for i, (a, b) in enumerate(joined):
        u = unit_of[i]
        codes, counts = drawn[u]
        rows = codes[offset[u]:offset[u] + len(a)]
        offset[u] += len(a)
        weights = np.vstack([np.ones(len(a)), counts[:, rows]])  # row 0: the estimate
        scores = [_paired_scores(t, classes, weights) for t in (a, b)]
        by_unit[u] += coef[i] * np.stack([scores[0][m] - scores[1][m] for m in PAIRED], axis=1)
        point.append({m: (scores[0][m][0], scores[1][m][0]) for m in PAIRED})
        y = _as_index(a["true"], classes, "column 'true'")
        correct = [_as_index(t["pred"], classes, "column 'pred'") == y for t in (a, b)]
        per_pair.append({"n": len(a), "n_patients": len(set(groups[i])), "mcnemar": mcnemar_exact(*correct)})
    contrast = by_unit.sum(axis=0)
    if units is not None and n_boot:  # resample the units too: row b sums the shares of n_units drawn units
        picks = rng.integers(0, n_units, size=(n_boot, n_units))
        contrast[1:] = by_unit[picks, np.arange(1, n_boot + 1)[:, None]].sum(axis=1)
    n_patients = len(set(np.concatenate(groups))) if units is None else sum(len(set(c)) for c, _ in drawn)
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_images": [p["n"] for p in per_pair],
                           "n_patients": n_patients, "pairs": per_pair, "n_boot": n_boot, "seed": seed,
                           "units": None if units is None else list(pd.unique(pd.Series(list(units))))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every resample -> None
        for j, m in enumerate(PAIRED):
            a_vals, b_vals = np.array([p[m][0] for p in point]), np.array([p[m][1] for p in point])
            own = by_unit[:, 0, j] * n_units  # each unit's contrast on its own (its share times the units)
            out[m] = {"a": np.nanmean(a_vals), "b": np.nanmean(b_vals), "difference": contrast[0, j],
                      "ci": np.nanpercentile(contrast[1:, j], [2.5, 97.5]).tolist() if n_boot else [None, None],
                      "p_value": bootstrap_p(contrast[1:, j]) if n_boot else None,
                      "ahead": int((own > 0).sum()) if units is not None else int((a_vals > b_vals).sum()),
                      "pairs": len(pairs), "per_unit": own.tolist() if units is not None else None}
    return _jsonable(out)


def bootstrap_p(draws: np.ndarray) -> float | None:
    """Two-sided bootstrap p of "no difference": twice the smaller share of resampled contrasts on either side of
    0, counted as (k + 1) / (n + 1) so it is never 0. Below 0.05 exactly when the percentile 95 % CI excludes 0
    (up to the resampling's granularity), so the p and the interval tell one story."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    tail = min((draws <= 0).sum(), (draws >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (len(draws) + 1)))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None): controls the chance of any false
    "supported"/"not supported" across the family, without assuming the tests independent."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(known)
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def calibration(y: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> tuple[float, dict[str, list]]:
    """Expected calibration error and the reliability curve on the max probability (equal-width bins).

    ECE = sum over bins of (bin share) * |accuracy - mean confidence|: 0 when a model that says 80 %
    is right 80 % of the time. Empty bins have None accuracy and confidence.
    """
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y)).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
    ece = float(np.nansum(counts * np.abs(acc - mean_conf)) / len(conf))
    curve = {
        "bin_centers": ((np.arange(n_bins) + 0.5) / n_bins).tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "counts": counts.tolist(),
    }
    return ece, _jsonable(curve)


def threshold_for_sensitivity(pred_val: pd.DataFrame, target: float = 0.95, positive: str = POSITIVE) -> float:
    """The highest threshold on p_<positive> whose sensitivity on validation reaches `target`.

    Choose it on validation and apply it unchanged to test: a threshold tuned on test would
    report an optimistic sensitivity. Highest, so specificity is lost as little as possible.
    """
    if not 0 < target <= 1:
        raise CXRError(f"parameter target={target}: a sensitivity must be in (0, 1]")
    col = f"p_{positive}"
    if col not in pred_val.columns or "true" not in pred_val.columns:
        raise CXRError(f"validation predictions need columns 'true' and {col!r}; build them with predictions_table()")
    is_pos = (pred_val["true"] == positive).to_numpy()
    if not is_pos.any():
        raise CXRError(f"validation predictions hold no {positive!r} image: cannot choose a threshold for sensitivity")
    with _quiet():  # without negatives fpr is undefined; only tpr is used
        _, tpr, thresholds = roc_curve(is_pos, pred_val[col].to_numpy(float), drop_intermediate=False)
    return float(thresholds[np.argmax(tpr >= target - 1e-12)])  # thresholds decrease, tpr increases


def bounded_threshold(unbounded: float, bound: float = MIN_THRESHOLD) -> dict[str, Any]:
    """The operating threshold a run uses: `unbounded` (threshold_for_sensitivity's) raised to `bound` where it is
    lower, so the rule cannot collapse into calling everyone COVID-19; `at_bound` flags the runs where the bound
    decided it (their validation sensitivity target was not met at an honest threshold)."""
    return {"threshold": max(float(unbounded), bound), "unbounded_threshold": float(unbounded), "bound": bound,
            "at_bound": bool(unbounded < bound)}


def pooled_auc(tables: Sequence[pd.DataFrame], positive: str = POSITIVE, n_boot: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """The ROC AUC of `positive` against the rest, the mean over several runs' predictions tables (e.g. an arm's
    seeds), with a 95% percentile interval from resampling patients: one draw of patients serves every run, so a
    patient scored by several runs moves in all of them together, and the interval covers the test patients,
    not the seeds (`per_run` shows those). NaN where a table lacks either class."""
    if not tables:
        raise CXRError("pooled_auc needs at least one predictions table")
    col = f"p_{positive}"
    for k, t in enumerate(tables):
        missing = [c for c in ("true", col) if c not in t.columns]
        if missing:
            raise CXRError(f"predictions table {k} lacks column(s) {missing}; build it with predictions_table()")
    both = pd.concat(tables, ignore_index=True)
    if {"patient_id", "image_id"} <= set(both.columns):  # an image without a patient is one unit in every run
        both["patient_id"] = both["patient_id"].fillna(both["image_id"]).astype(str)
    run = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    is_pos, score = (both["true"] == positive).to_numpy(), both[col].to_numpy(float)
    weights = np.vstack([np.ones(len(both)), bootstrap_counts(patient_groups(both), n_boot, seed)])
    per = np.array([_weighted_auc(is_pos[run == k], score[run == k], weights[:, run == k])
                    for k in range(len(tables))])  # (runs, 1 + n_boot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without one of the classes
        mean = np.nanmean(per, axis=0)
        ci = np.nanpercentile(mean[1:], [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2]).tolist()
    images = both.drop_duplicates("image_id") if "image_id" in both else both  # an image scored by several runs
    return _jsonable({"value": mean[0], "ci": ci, "per_run": per[:, 0], "n_images": len(images),
                      "n_positive": int((images["true"] == positive).sum()),
                      "n_negative": int((images["true"] != positive).sum()),
                      "n_patients": len(set(patient_groups(both)))})


def apply_threshold(pred: pd.DataFrame, threshold: float, classes: Sequence[str]) -> pd.DataFrame:
    """A copy of `pred` re-labelled: covid when p_covid >= threshold, else the most probable other class."""
    classes = list(classes)
    if POSITIVE not in classes:
        raise CXRError(f"apply_threshold needs a {POSITIVE!r} class; classes are {classes}")
    pos = classes.index(POSITIVE)
    probs = _arrays(pred, classes)[2]
    others = probs.copy()
    others[:, pos] = -np.inf
    labels = np.where(probs[:, pos] >= threshold, pos, others.argmax(axis=1))
    out = pred.copy()
    out["pred"] = np.array(classes, dtype=object)[labels]
    return out


def majority_baseline(y_train: Sequence[Any], y_test: Sequence[Any], classes: Sequence[str]) -> dict[str, Any]:
    """Scores of always predicting the training majority class: what a model must beat to have learned.

    Labels are class indices or class names.
    """
    classes = list(classes)
    y_train, y_test = _as_index(y_train, classes, "y_train"), _as_index(y_test, classes, "y_test")
    if len(y_train) == 0 or len(y_test) == 0:
        raise CXRError("majority_baseline needs non-empty y_train and y_test")
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(y_train), 1)), y_train)
    yhat = dummy.predict(np.zeros((len(y_test), 1)))
    with _quiet():
        scores = _classification(y_test, yhat, classes)
    keys = ("accuracy", "balanced_accuracy", "macro_f1")
    return _jsonable({"class": classes[int(yhat[0])], **{k: scores[k] for k in keys}})


def multilabel_auroc(y_true: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-finding AUROC and their mean for multi-label pretraining (ChestX-ray14's 14 findings).

    A finding with only positives or only negatives has no AUROC: None, left out of the mean.
    """
    y, p = np.asarray(y_true), np.asarray(probs, dtype=float)
    if y.ndim != 2 or y.shape != p.shape or y.shape[1] != len(names):
        raise CXRError(f"multilabel_auroc: y_true {y.shape} and probs {p.shape} must both be (N, {len(names)})")
    if not np.isin(y, (0, 1)).all():
        raise CXRError("multilabel_auroc: y_true must hold 0/1 only")
    per = {n: roc_auc_score(y[:, k], p[:, k]) if 0 < y[:, k].sum() < len(y) else math.nan for k, n in enumerate(names)}
    return _jsonable({"per_finding": per, "mean": _nanmean(per.values()), "n": len(y)})


def save_metrics(metrics: dict[str, Any], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write metrics + `extra` (parameters, provenance) to JSON atomically (atomic.write_text): an
    interrupted run never leaves a half-written file that the book would read as a result."""
    extra = extra or {}
    clash = sorted(set(metrics) & set(extra))
    if clash:
        raise CXRError(f"save_metrics: extra key(s) {clash} would overwrite metrics; rename them")
    return write_text(path, json.dumps(_jsonable({**metrics, **extra}), indent=2, allow_nan=False) + "\n")


def provenance(device: str) -> dict[str, Any]:
    """What produced a result: device, Python, package versions, git commit. No host name (runs get published)."""
    from . import __version__

    dists = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "sklearn": "scikit-learn"}
    packages = {name: _version(dist) for name, dist in dists.items()} | {"cxrlib": __version__}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {
        "device": device,
        "python": platform.python_version(),
        "packages": packages,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def patient_groups(pred: pd.DataFrame) -> np.ndarray:
    """Bootstrap and cross-validation unit per row: the patient, or the image itself where the patient is unknown."""
    ids = pred["patient_id"].fillna("").astype(str).to_numpy() if "patient_id" in pred else np.full(len(pred), "")
    return np.where(ids == "", [f"<image {i}>" for i in range(len(ids))], ids)


# --- internals ---------------------------------------------------------------------------------


def _as_index(values: Any, classes: list[str], what: str) -> np.ndarray:
    """Class names or indices -> int indices into `classes`, with an error naming bad values."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        bad = sorted(set(values[(values < 0) | (values >= len(classes))].tolist()))
    else:
        codes = pd.Categorical(values, categories=classes).codes
        bad = sorted(set(values[codes < 0].tolist()), key=str)
        values = codes
    if bad:
        raise CXRError(f"{what} holds {bad[:5]}, not classes of {classes}: is it from another task?")
    return values.astype(int)


def _arrays(pred: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y true, y pred, probabilities) from a predictions table, checking its columns."""
    p_cols = [f"p_{c}" for c in classes]
    missing = [c for c in ["true", "pred", *p_cols] if c not in pred.columns]
    if missing:
        raise CXRError(f"predictions table lacks column(s) {missing}; build it with predictions_table()")
    if len(pred) == 0:
        raise CXRError("predictions table is empty: no images to evaluate")
    probs = _check_probs(pred[p_cols].to_numpy(float))
    return _as_index(pred["true"], classes, "column 'true'"), _as_index(pred["pred"], classes, "column 'pred'"), probs


def _check_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities, not logits and not NaN: ECE and thresholds mean nothing otherwise."""
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(bad):
        raise CXRError(f"probabilities of row {bad[0]} are NaN/inf: the model output is not finite (diverged?)")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
        raise CXRError("probabilities must be non-negative and sum to 1 per row: apply softmax to the logits")
    return probs


def _classification(y: np.ndarray, yhat: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Label-based metrics: the headline ones, per class, macro/weighted averages, confusion."""
    labels = list(range(len(classes)))
    cm = confusion_matrix(y, yhat, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, yhat, labels=labels, zero_division=np.nan)
    negatives = len(y) - support
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = (negatives - (cm.sum(axis=0) - np.diag(cm))) / negatives  # TN / (TN + FP)
    per_class = {
        c: {"precision": prec[k], "recall": rec[k], "specificity": specificity[k], "f1": f1[k], "support": support[k]}
        for k, c in enumerate(classes)
    }
    averages = {
        avg: dict(zip(("precision", "recall", "f1"), precision_recall_fscore_support(
            y, yhat, labels=labels, average=avg, zero_division=np.nan)[:3]))
        for avg in ("macro", "weighted")
    }
    headline = headline_batch(y, yhat, None, classes, np.ones((1, len(y))))
    return {
        **{name: values[0] for name, values in headline.items()},
        "weighted_f1": averages["weighted"]["f1"],
        "per_class": per_class,
        **averages,
        "confusion": {"labels": classes, "matrix": cm.tolist()},
        "wilson": proportion_cis(cm, classes),
    }


def _ovr(score: Callable, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[float, dict[str, float]]:
    """One-vs-rest `score` per class (NaN where y has one class only); headline: covid if binary, else macro."""
    per = {c: score(y == k, probs[:, k]) if 0 < (y == k).sum() < len(y) else math.nan for k, c in enumerate(classes)}
    return (per[classes[1]] if len(classes) == 2 else _nanmean(per.values())), per


def _weighted_auc(is_pos: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per row of `weights` (B, n): P(score of a positive > score of a negative), ties counting 1/2 (the
    Mann-Whitney form of the area, equal to scikit-learn's on the repeated rows). NaN without both classes."""
    values, level = np.unique(score, return_inverse=True)
    at_level = sparse.csr_matrix((np.ones(len(score)), (np.arange(len(score)), level)), shape=(len(score), len(values)))
    neg = np.asarray(weights[:, ~is_pos] @ at_level[~is_pos])  # (B, levels): negative weight at each score level
    below = np.cumsum(neg, axis=1) - neg
    wins = (weights[:, is_pos] * (below + neg / 2)[:, level[is_pos]]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (weights[:, is_pos].sum(axis=1) * weights[:, ~is_pos].sum(axis=1))


def _paired_scores(pred: pd.DataFrame, classes: list[str], weights: np.ndarray) -> dict[str, np.ndarray]:
    """PAIRED metrics of one run per weights row; NaN for a metric this task lacks (no covid class)."""
    y, yhat, probs = _arrays(pred, classes)
    scores = headline_batch(y, yhat, probs, classes, weights)
    return {m: scores.get(m, np.full(len(weights), np.nan)) for m in PAIRED}


def _percentiles(draws: dict[str, np.ndarray], level: float = LEVEL) -> dict[str, list]:
    """Percentile intervals of each metric over resamples; resamples where it is undefined are skipped."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every draw -> NaN -> None
        return {k: np.nanpercentile(v, [tail, 100 - tail]).tolist() for k, v in draws.items() if len(v)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence scikit-learn's warnings about undefined values: they are reported as None instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        yield


def _nanmean(values: Any) -> float:
    values = np.array(list(values), dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf -> None (json.dumps would write NaN, which is not JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
