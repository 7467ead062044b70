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
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import CXRError
from .metrics import METRIC_WORDS

PAGE_WIDTH_IN = 7.5  # the book's text column at 100 dpi; wider figures get scaled down (and their text with them)
LOG_SCALE_RATIO = 5.0  # a loss curve goes log-scale when its first epoch is this many times the rest's largest
CAM_CMAP = "jet"
CAM_PANEL_IN = 2.5  # the smallest Grad-CAM panel that can be read (inches at page width)
CAPTION_PT = 10
CONFIG_COLUMNS = ("arm", "loss", "init", "extra_covid_train", "backbone", "image_size", "epochs")  # what tells runs apart
COLUMN_WORDS = {"extra_covid_train": "extra COVID", "image_size": "image size"}
SERIES_NAMES = {"train_loss": "training", "val_loss": "validation", "val_macro_f1": "macro-F1",
                "val_accuracy": "accuracy", "val_mean_auroc": "mean AUROC"}

sns.set_theme(style="whitegrid", context="notebook")  # 11-12 pt text


def _words(name: str) -> str:
    return METRIC_WORDS.get(name) or SERIES_NAMES.get(name) or name.replace("_", " ")


def dwarfs_rest(values: Sequence[float], ratio: float = LOG_SCALE_RATIO) -> bool:
    """Whether the first value is `ratio` times the largest later one (all positive): then a linear
    axis would flatten every later epoch into a line, and a log axis shows them."""
    v = np.asarray([x for x in values if pd.notna(x)], dtype=float)
    return len(v) > 2 and bool((v > 0).all()) and v[0] >= ratio * v[1:].max()


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Losses (log scale when the first epoch dwarfs the rest) and validation scores per epoch,
    from a run's history.csv; any `val_*` column other than the loss counts as a score (of more than four, only
    the named summaries of SERIES_NAMES, e.g. the mean AUROC rather than one line per finding)."""
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 3.4), layout="constrained")
    loss_cols = [c for c in ("train_loss", "val_loss") if c in history]
    score_cols = [c for c in history if c.startswith("val_") and c != "val_loss"]
    if len(score_cols) > 4:  # e.g. pretraining's 14 per-finding AUROCs: their summary (mean AUROC) reads, 15 lines do not
        score_cols = [c for c in score_cols if c in SERIES_NAMES] or score_cols[:4]
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
    names = [class_words(c) for c in classes]
    sns.heatmap(share, annot=counts, fmt="d", cmap="Blues", vmin=0, vmax=1, annot_kws={"fontsize": 12},
                cbar_kws={"label": "share of the true class"}, xticklabels=names, yticklabels=names, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix (test split)")
    return fig


def class_words(name: str) -> str:
    """A class as the book writes it: "COVID-19", "not COVID-19", "pneumonia", "normal"."""
    return {"covid": "COVID-19", "non_covid": "not COVID-19"}.get(name, name.replace("_", " "))


def roc_curves(predictions: pd.DataFrame, classes: Sequence[str]) -> plt.Figure:
    """One-vs-rest ROC curve per class present in the test set (binary: the COVID class only), each labelled with
    its AUC to 3 decimals; with three classes the title gives the macro one-vs-rest AUC, their mean (the
    "ROC AUC" of a 3-class run)."""
    fig, ax = plt.subplots(figsize=(5, 4.8), layout="constrained")
    shown = ["covid"] if len(classes) == 2 else list(classes)
    aucs = []
    for name in shown:
        y = (predictions["true"] == name).to_numpy()
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, predictions[f"p_{name}"])
            aucs.append(roc_auc_score(y, predictions[f"p_{name}"]))
            ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{class_words(name)} vs rest (AUC {aucs[-1]:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance (AUC 0.500)")
    ax.legend(loc="lower right", fontsize=10)
    title = ("ROC curve (test split, COVID-19 vs the rest)" if len(classes) == 2 else
             "ROC curves (test split, each class vs the rest)"
             + (f"\nmacro one-vs-rest AUC {np.mean(aucs):.3f} (mean of {len(aucs)})" if aucs else ""))
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (1 − specificity)",
           ylabel="true-positive rate (sensitivity)")
    ax.set_aspect("equal")
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
               overlays: Sequence[np.ndarray] | None = None, min_panel_in: float | None = None) -> plt.Figure:
    """A grid of grayscale images with captions (each line wrapped to the panel, given the height its lines need so
    no caption runs into a panel), optionally each with a heat-map overlay in [0, 1] and one colour bar under the
    grid saying what the colours mean.

    `min_panel_in`: the smallest width of a panel, in inches at page width; fewer than `ncols` columns are used when
    `ncols` would make panels narrower. With overlays it defaults to CAM_PANEL_IN (2.5 in): a Grad-CAM map smaller
    than that cannot be read. A panel is never wider than a full row of such panels would make it, so one image
    is not blown up to the page width (at 100 dpi a 2.5 in panel is 250 px: thumbnails stay at most 256 px).
    """
    n = len(images)
    if len(captions) != n or (overlays is not None and len(overlays) != n):
        raise CXRError(f"image_grid got {n} images, {len(captions)} captions and "
                       f"{'no' if overlays is None else len(overlays)} overlays: pass one of each per image")
    smallest = min_panel_in if min_panel_in is not None else (CAM_PANEL_IN if overlays is not None else 0.0)
    ncols = max(1, min(ncols, int(PAGE_WIDTH_IN // smallest) if smallest else ncols))
    panel = PAGE_WIDTH_IN / ncols  # as wide as in a full row, even when fewer images fill it
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    per_line = max(8, int(panel * 72 / (0.6 * CAPTION_PT)))  # characters of CAPTION_PT text that fit a panel
    wrapped = ["\n".join(textwrap.fill(part, per_line) or " " for part in str(c).split("\n")) for c in captions]
    lines = max([c.count("\n") + 1 for c in wrapped] or [1])
    caption_in = lines * CAPTION_PT * 1.3 / 72 + 0.12
    bar_label = textwrap.fill("Grad-CAM weight of the predicted class (0 = none, 1 = strongest)",
                              int(panel * ncols * 72 / (0.6 * CAPTION_PT)))
    bar_in = 0.6 + (bar_label.count("\n") + 1) * CAPTION_PT * 1.3 / 72 if overlays is not None else 0.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, nrows * (panel + caption_in) + bar_in),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if overlays is not None:
            ax.imshow(overlays[i], cmap=CAM_CMAP, alpha=0.4, vmin=0, vmax=1)
        ax.set_title(wrapped[i], fontsize=CAPTION_PT)
    if overlays is not None:
        mappable = ScalarMappable(Normalize(0, 1), CAM_CMAP)
        bar = fig.colorbar(mappable, ax=axes, location="bottom", shrink=min(0.8, 4.5 / (panel * ncols) + 0.2),
                           aspect=30, pad=0.02)
        bar.set_label(bar_label, fontsize=CAPTION_PT)
        bar.ax.tick_params(labelsize=CAPTION_PT)
    return fig


def _level(column: str, value) -> str:
    """One configuration value in words: "focal", "extra COVID", "no extra COVID", "image size 224"."""
    words = COLUMN_WORDS.get(column, column.replace("_", " "))
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
    several = (done.groupby(["task", "configuration"]).size() > 1).any() if len(done) else False
    fig.supxlabel(f"test {_words(metric)}\n(dot: one run, bar: its patient-level 95% CI"
                  + (", |: mean over seeds)" if several else ")"), fontsize=11)
    return fig


def by_init(runs: pd.DataFrame, metric: str = "macro_f1") -> plt.Figure:
    """The complete runs' test metric by initialisation, one panel per task (`run_comparison`): every run a dot
    with its patient-level 95% CI, rows labelled by the initialisation and by whatever else differs between the
    runs (loss, extra COVID images, ...), so no row mixes unlike runs; a mean over seeds is drawn only where a row
    has several seeds. Pass the runs to compare (e.g. only the paper's set-up)."""
    if metric not in runs:
        raise CXRError(f"by_init: no column {metric!r} in the runs table (columns: {', '.join(runs.columns)})")
    others = [c for c in CONFIG_COLUMNS if c != "init" and c in runs and runs[c].astype(str).nunique() > 1]
    return run_comparison(runs, metric, by=["init", *others])


VERDICT_COLOURS = {"met": "#1a9850", "not met": "#d73027", "undecided": "#6f6f6f", "too few to say": "#b0b0b0",
                   "learned": "#4575b4", "learned only weakly": "#f4a742",
                   "": "#4575b4"}  # a verdict (generalise.goal_word, remedies.WEAK); "" where a row has no goal
THRESHOLD_FREE = ("roc_auc", "unseen_auc", "own_auc")  # metrics that no operating point decides (forest's x label)


def forest(table: pd.DataFrame, goals: dict[str, float] | None = None, *,
           label: Sequence[str] = ("label", "population"), metric_names: dict[str, str] | None = None,
           colour: str = "verdict", wrap: int = 46) -> plt.Figure:
    """A forest plot: one row per line of `table`, in its order, with `value` as a dot and `ci_low`–`ci_high`
    (its 95% interval) as a bar; one panel per `metric` (x from 0 to 1), each with a dashed vertical line at
    its goal (`goals`: metric -> goal) and the goal in its title.

    Rows are labelled by the `label` columns, one per line, wrapped at `wrap` characters; a row without a
    finite value keeps its place and label, with no dot. Dots are coloured by `colour` (a verdict, see
    VERDICT_COLOURS) and hollow where `enough` is False (too few images to say). The layout is constrained,
    so no label is cut at the figure's edge.
    """
    goals = dict(goals or {})
    names = {**METRIC_WORDS, **(metric_names or {})}
    metrics = list(dict.fromkeys(table["metric"])) or ["covid_specificity"]
    labels = ["\n".join(textwrap.fill(str(r[c]), wrap) for c in label) for _, r in table.iterrows()]
    lines = [lab.count("\n") + 1 for lab in labels]
    heights = [max(1.0, sum(0.17 * n + 0.14 for n, m in zip(lines, table["metric"]) if m == metric))
               for metric in metrics]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(PAGE_WIDTH_IN, 1.4 + sum(h + 0.9 for h in heights)),
                             height_ratios=heights, squeeze=False, layout="constrained")
    shown: dict[str, str] = {}
    for ax, metric in zip(axes[:, 0], metrics):
        rows = [(lab, r) for lab, (_, r) in zip(labels, table.iterrows()) if r["metric"] == metric]
        for y, (_, r) in enumerate(rows):
            verdict = str(r.get(colour, "") if pd.notna(r.get(colour, "")) else "")
            c = VERDICT_COLOURS.get(verdict, "C0")
            if pd.notna(r["value"]):
                has_ci = pd.notna(r["ci_low"]) and pd.notna(r["ci_high"])
                err = [[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]] if has_ci else None
                ax.errorbar(r["value"], y, xerr=err, fmt="o", color=c, ecolor=c, elinewidth=2, capsize=3,
                            markersize=7, markerfacecolor=c if r.get("enough", True) else "white")
                shown.setdefault(verdict, c)
        ax.set_yticks(range(len(rows)), [lab for lab, _ in rows], fontsize=10)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(0, 1.02)
        title = names.get(metric, _words(metric))
        title = title[0].upper() + title[1:]
        if metric in goals:
            ax.axvline(goals[metric], ls="--", color="black", lw=1.3, gid="goal")
            title += f" (goal ≥ {goals[metric]:.2f}: dashed line)"
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel(names.get(metric, _words(metric)) + (" (threshold-free)" if metric in THRESHOLD_FREE else
                                                           " at the validation operating point"), fontsize=10)
        ax.tick_params(axis="x", labelsize=10)
    if shown:
        from matplotlib.lines import Line2D

        order = [v for v in VERDICT_COLOURS if v in shown] + [v for v in shown if v not in VERDICT_COLOURS]
        handles = [Line2D([], [], marker="o", ls="none", color=shown[v], markersize=7) for v in order]
        words = [v or "no goal (not adults)" for v in order]
        fig.legend(handles, words, loc="outside lower center", ncols=min(len(order), 3), fontsize=10,
                   title="verdict (dot: estimate, bar: 95% interval, hollow: too few images)",
                   title_fontsize=10, frameon=False)
    return fig
