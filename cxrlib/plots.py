"""Figures the chapters share (seaborn/matplotlib), so the notebooks stay narration."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from sklearn.metrics import RocCurveDisplay

sns.set_theme(style="whitegrid", context="notebook")


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Loss and validation macro-F1 per epoch, from a run's history.csv."""
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.5))
    losses = history.melt("epoch", [c for c in ("train_loss", "val_loss") if c in history], "split", "loss")
    sns.lineplot(losses, x="epoch", y="loss", hue="split", marker="o", ax=ax_loss)
    metric_cols = [c for c in ("val_macro_f1", "val_accuracy") if c in history]
    scores = history.melt("epoch", metric_cols, "metric", "value")
    sns.lineplot(scores, x="epoch", y="value", hue="metric", marker="o", ax=ax_f1)
    ax_f1.set_ylim(0, 1.02)
    ax_loss.set_title("loss")
    ax_f1.set_title("validation")
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> plt.Figure:
    """Counts with row-normalised colour: each row shows where one true class went."""
    counts = np.asarray(confusion)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    sns.heatmap(share, annot=counts, fmt="d", cmap="Blues", vmin=0, vmax=1, cbar_kws={"label": "row share"},
                xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test)")
    fig.tight_layout()
    return fig


def roc_curves(predictions: pd.DataFrame, classes: Sequence[str]) -> plt.Figure:
    """One-vs-rest ROC curve per class present in the test set (binary: the COVID class only)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    shown = ["covid"] if len(classes) == 2 else list(classes)
    for name in shown:
        y = (predictions["true"] == name).to_numpy()
        if 0 < y.sum() < len(y):
            RocCurveDisplay.from_predictions(y, predictions[f"p_{name}"], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_title("ROC (test, one-vs-rest)")
    fig.tight_layout()
    return fig


def reliability(curve: dict, ece: float | None) -> plt.Figure:
    """Reliability diagram from metrics.json's `reliability` entry."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    frame = pd.DataFrame(curve)
    frame = frame[frame["counts"] > 0]
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    sns.lineplot(frame, x="confidence", y="accuracy", marker="o", ax=ax, label="model")
    ax.set(xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE = {ece:.3f})" if ece is not None else "reliability")
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 6,
               overlays: Sequence[np.ndarray] | None = None) -> plt.Figure:
    """A grid of grayscale images with captions, optionally with a heat-map overlay each."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(captions[i], fontsize=8)
    fig.tight_layout()
    return fig


def run_comparison(runs: pd.DataFrame, metric: str = "macro_f1") -> plt.Figure:
    """Each complete run's test metric with its patient-level 95% CI, grouped by task and loss."""
    done = runs[runs.status == "complete"].copy()
    tasks = sorted(done.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 0.5 * len(done) + 2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = done[done.task == task].sort_values(["loss", "init"])
        labels = sub.loss + " · " + sub.init
        ci = sub.get(f"{metric}_ci")
        for y, (value, interval) in enumerate(zip(sub[metric], ci if ci is not None else [None] * len(sub))):
            if isinstance(interval, tuple) and None not in interval:
                ax.plot(interval, [y, y], c="grey", lw=2)
            ax.plot(value, y, "o", c="C0")
        ax.set_yticks(range(len(sub)), labels)
        ax.set_xlim(0, 1.02)
        ax.set_xlabel(f"test {metric.replace('_', '-')} (95% CI)")
        ax.set_title(task)
    fig.tight_layout()
    return fig
