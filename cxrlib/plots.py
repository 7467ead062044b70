"""Figures the chapters share (seaborn/matplotlib), so the notebooks stay narration.

Every figure is at most `PAGE_WIDTH_IN` wide, so its text is printed at the size it is set in
(theme font sizes >= 11 pt) instead of being shrunk to fit the book's column.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

# Constrained layout falls back to the plain layout for some axes (e.g. a colour bar beside a grid); the figure is
# still drawn, and the warning would print into a chapter's output.
warnings.filterwarnings("ignore", message="constrained_layout not applied")
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import RocCurveDisplay

from .errors import CXRError

PAGE_WIDTH_IN = 7.5  # the book's text column at 100 dpi; wider figures get scaled down (and their text with them)
LOG_SCALE_RATIO = 5.0  # a loss curve goes log-scale when its first epoch is this many times the rest's largest
CAM_CMAP = "jet"
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "covid_sensitivity": "COVID-19 sensitivity",
                "roc_auc": "ROC AUC", "macro_precision": "macro precision", "macro_recall": "macro recall"}
CONFIG_COLUMNS = ("loss", "init", "extra_covid", "backbone", "image_size", "epochs")  # what tells runs apart
SERIES_NAMES = {"train_loss": "training", "val_loss": "validation", "val_macro_f1": "macro-F1",
                "val_accuracy": "accuracy", "val_mean_auroc": "mean AUROC"}

sns.set_theme(style="whitegrid", context="notebook")  # 11-12 pt text


def _words(name: str) -> str:
    return METRIC_NAMES.get(name) or SERIES_NAMES.get(name) or name.replace("_", " ")


def dwarfs_rest(values: Sequence[float], ratio: float = LOG_SCALE_RATIO) -> bool:
    """Whether the first value is `ratio` times the largest later one (all positive): then a linear
    axis would flatten every later epoch into a line, and a log axis shows them."""
    v = np.asarray([x for x in values if pd.notna(x)], dtype=float)
    return len(v) > 2 and bool((v > 0).all()) and v[0] >= ratio * v[1:].max()


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Losses (log scale when the first epoch dwarfs the rest) and validation scores per epoch,
    from a run's history.csv; any `val_*` column other than the loss counts as a score."""
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 3.4), layout="constrained")
    loss_cols = [c for c in ("train_loss", "val_loss") if c in history]
    score_cols = [c for c in history if c.startswith("val_") and c != "val_loss"]
    for col in loss_cols:
        ax_loss.plot(history["epoch"], history[col], marker="o", label=_words(col))
    if any(dwarfs_rest(history[c]) for c in loss_cols):
        ax_loss.set_yscale("log")
    for col in score_cols:
        ax_score.plot(history["epoch"], history[col], marker="o", label=_words(col))
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss" + (" (log scale)" if ax_loss.get_yscale() == "log" else ""))
    ax_score.set(title="Validation scores", xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend()
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> plt.Figure:
    """Counts with row-normalised colour: each row shows where one true class went."""
    counts = np.asarray(confusion)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(PAGE_WIDTH_IN, 1.3 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.8), layout="constrained")
    sns.heatmap(share, annot=counts, fmt="d", cmap="Blues", vmin=0, vmax=1, annot_kws={"fontsize": 12},
                cbar_kws={"label": "share of the true class"}, xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix (test split)")
    return fig


def roc_curves(predictions: pd.DataFrame, classes: Sequence[str]) -> plt.Figure:
    """One-vs-rest ROC curve per class present in the test set (binary: the COVID class only)."""
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    shown = ["covid"] if len(classes) == 2 else list(classes)
    for name in shown:
        y = (predictions["true"] == name).to_numpy()
        if 0 < y.sum() < len(y):
            RocCurveDisplay.from_predictions(y, predictions[f"p_{name}"], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance")
    ax.set(title="ROC curves (test split, one class vs. the rest)", xlabel="false-positive rate (1 − specificity)",
           ylabel="true-positive rate (sensitivity)")
    return fig


def reliability(curve: dict, ece: float | None) -> plt.Figure:
    """Reliability diagram from metrics.json's `reliability` entry."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6), layout="constrained")
    frame = pd.DataFrame(curve)
    frame = frame[frame["counts"] > 0]
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    ax.plot(frame["confidence"], frame["accuracy"], marker="o", label="model")
    ax.legend(loc="upper left")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top predicted probability)", ylabel="observed accuracy",
           title=f"Reliability (ECE = {ece:.3f})" if ece is not None else "Reliability")
    return fig


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 6,
               overlays: Sequence[np.ndarray] | None = None) -> plt.Figure:
    """A grid of grayscale images with captions (wrapped to the panel), optionally each with a
    heat-map overlay in [0, 1] and one colour bar saying what the colours mean."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    panel = PAGE_WIDTH_IN / (ncols + (0.4 if overlays is not None else 0))
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH_IN, (panel + 0.55) * nrows), squeeze=False,
                             layout="constrained")
    per_line = max(8, int(panel * 72 / (0.6 * 10)))  # characters of 10 pt text that fit a panel
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if overlays is not None:
            ax.imshow(overlays[i], cmap=CAM_CMAP, alpha=0.4, vmin=0, vmax=1)
        ax.set_title(textwrap.fill(captions[i], per_line), fontsize=10)
    if overlays is not None:
        mappable = ScalarMappable(Normalize(0, 1), CAM_CMAP)
        bar = fig.colorbar(mappable, ax=axes, shrink=min(1.0, 2.5 / (panel * nrows)), fraction=0.05)
        bar.set_label("Grad-CAM weight (0 = none, 1 = strongest)", fontsize=10)
        bar.ax.tick_params(labelsize=10)
    return fig


def _level(column: str, value) -> str:
    """One configuration value in words: "focal", "extra COVID", "no extra COVID", "image size 224"."""
    words = column.replace("_", " ").replace("covid", "COVID")
    if isinstance(value, (bool, np.bool_)):
        return words if value else f"no {words}"
    return str(value) if isinstance(value, str) else f"{words} {value}"


def configuration_labels(runs: pd.DataFrame, by: Sequence[str] | None = None) -> pd.Series:
    """A short label per run made of the configuration columns that differ between runs (seed excluded)."""
    by = [c for c in CONFIG_COLUMNS if c in runs and runs[c].nunique(dropna=False) > 1] if by is None else list(by)
    if not by:
        return pd.Series("all runs", index=runs.index)
    return runs[by].apply(lambda row: " · ".join(_level(c, row[c]) for c in by), axis=1)


def run_comparison(runs: pd.DataFrame, metric: str = "macro_f1", by: Sequence[str] | None = None) -> plt.Figure:
    """Each complete run's test metric (dot) with its patient-level 95% CI (bar), one panel per task,
    configurations on the y axis, seeds side by side, the mean over seeds as a black tick.

    Failed runs are absent (the title counts them); `by`: the columns that make a configuration
    (default: those of `CONFIG_COLUMNS` that differ between runs).
    """
    if metric not in runs:
        raise CXRError(f"run_comparison: no column {metric!r} in the runs table (columns: {', '.join(runs.columns)})")
    runs = runs.assign(configuration=configuration_labels(runs, by).map(lambda s: textwrap.fill(s, 30)))
    done = runs[runs.status == "complete"]
    tasks = sorted(runs.task.unique())
    heights = [max(1, done[done.task == t].configuration.nunique()) for t in tasks] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(PAGE_WIDTH_IN, 1.3 + sum(0.45 * h + 0.6 for h in heights)),
                             height_ratios=heights, sharex=True, squeeze=False, layout="constrained")
    ci_col = f"{metric}_ci"
    for ax, task in zip(axes[:, 0], tasks or ["(no run)"]):
        sub = done[done.task == task]
        configs = sorted(sub.configuration.unique())
        failed = int(((runs.task == task) & (runs.status != "complete")).sum())
        ax.set_title(f"{task}: {len(sub)} complete run(s)" + (f", {failed} failed (not shown)" if failed else ""),
                     loc="left", fontsize=12)
        if sub.empty:
            ax.text(0.5, 0.5, "no complete run", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        seeds = sorted(sub.seed.unique()) if "seed" in sub else [None]
        offsets = dict(zip(seeds, np.linspace(-0.25, 0.25, len(seeds)) if len(seeds) > 1 else [0.0]))
        for y, config in enumerate(configs):
            rows = sub[sub.configuration == config]
            for _, r in rows.iterrows():
                ci = r.get(ci_col)
                has_ci = isinstance(ci, tuple) and None not in ci
                err = [[r[metric] - ci[0]], [ci[1] - r[metric]]] if has_ci else None
                ax.errorbar(r[metric], y + offsets.get(r.get("seed"), 0.0), xerr=err, fmt="o", color="C0",
                            ecolor="0.55", elinewidth=2, capsize=3, markersize=6)
            if len(rows) > 1:
                ax.plot(rows[metric].mean(), y, marker="|", color="black", markersize=18, markeredgewidth=2)
        ax.set_yticks(range(len(configs)), configs)
        ax.set_ylim(len(configs) - 0.5, -0.5)
        ax.set_xlim(0, 1.02)
    fig.supxlabel(f"test {_words(metric)}\n(dot: one run, bar: its patient-level 95% CI, |: mean over seeds)",
                  fontsize=11)
    return fig


def by_init(runs: pd.DataFrame, metric: str = "macro_f1") -> plt.Figure:
    """The complete runs' test metric by initialisation: mean over seeds with its spread (seaborn's pointplot),
    one colour per task, dodged only when there are several tasks."""
    if metric not in runs:
        raise CXRError(f"by_init: no column {metric!r} in the runs table (columns: {', '.join(runs.columns)})")
    done = runs[runs.status == "complete"]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 1.6 + 0.5 * max(1, done["init"].nunique())), layout="constrained")
    sns.pointplot(done, x=metric, y="init", hue="task", linestyle="none",
                  dodge=0.3 if done["task"].nunique() > 1 else False, ax=ax)
    ax.set(xlim=(0, 1), xlabel=f"test {_words(metric)}", ylabel="initialisation",
           title=f"test {_words(metric)} by initialisation")
    return fig
