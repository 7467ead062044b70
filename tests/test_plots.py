"""The shared figures are readable at page width: text >= 10 pt, words on the axes, integer epochs,
log-scale losses when the first epoch dwarfs the rest, a colour bar on Grad-CAM overlays, and a run
comparison that stays legible with many runs and leaves failed ones out."""

from __future__ import annotations

import itertools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from cxrlib import plots  # noqa: E402
from cxrlib.errors import CXRError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _drawn_texts(fig: plt.Figure) -> list[Text]:
    """The visible, non-empty texts that are drawn: tick labels only for ticks inside the view."""
    ticks = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            ticks |= {t.label1 for t in axis.get_major_ticks()
                      if not (ax.axison and axis.get_visible() and lo - 1e-9 <= t.get_loc() <= hi + 1e-9)}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t not in ticks]


def assert_readable(fig: plt.Figure, minimum_pt: float = 10.0) -> None:
    """Every text is >= minimum_pt once the figure is scaled to the page width, and none is cut off."""
    fig.canvas.draw()
    scale = min(1.0, plots.PAGE_WIDTH_IN / fig.get_figwidth())
    box = fig.bbox
    for text in _drawn_texts(fig):
        size = text.get_fontsize() * scale
        assert size >= minimum_pt, f"{text.get_text()!r}: {size:.1f} pt at page width"
        extent = text.get_window_extent()
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1 \
            and extent.y1 <= box.y1 + 1, f"{text.get_text()!r} is cut off by the figure edge"


def _history(first: float) -> pd.DataFrame:
    return pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [first, 0.5, 0.4, 0.35], "val_loss": [first, 0.6, 0.5, 0.45],
                         "val_macro_f1": [0.3, 0.5, 0.6, 0.62], "val_accuracy": [0.4, 0.6, 0.7, 0.71]})


def test_loss_goes_log_scale_only_when_the_first_epoch_dwarfs_the_rest():
    assert plots.training_curves(_history(40.0)).axes[0].get_yscale() == "log"
    assert plots.training_curves(_history(0.9)).axes[0].get_yscale() == "linear"
    assert plots.dwarfs_rest([10, 1, 1]) and not plots.dwarfs_rest([10, 1]) and not plots.dwarfs_rest([3, -1, 0.1])


def test_training_curves_have_integer_epochs_words_and_legends():
    fig = plots.training_curves(_history(40.0))
    assert_readable(fig)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_title()
        assert "_" not in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_pretraining_history_scores_are_shown():
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.6], "val_loss": [0.7, 0.65], "val_mean_auroc": [0.6, 0.7]})
    fig = plots.training_curves(history)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["mean AUROC"]
    per_finding = history.assign(**{f"val_auroc_Finding{k}": [0.5, 0.6] for k in range(14)})
    fig = plots.training_curves(per_finding)  # pretraining's history: 14 per-finding AUROCs beside the mean
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["mean AUROC"]


def test_grad_cam_grid_has_a_colour_bar_and_wrapped_captions():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(8)]
    cams = [rng.random((32, 32)) for _ in range(8)]
    captions = ["pneumonia · coronahack → covid"] * 8
    fig = plots.image_grid(images, captions, ncols=6, overlays=cams)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "Grad-CAM" in bars[0].get_xlabel()  # under the grid, in words
    assert_readable(fig)
    assert not [ax for ax in plots.image_grid(images, captions).axes if ax.get_label() == "<colorbar>"]


@pytest.mark.parametrize("n", [1, 2, 8])
def test_grad_cam_panels_are_readable_and_never_blown_up(n):
    """Each Grad-CAM panel at least ~2.5 in wide at page width (so at most 3 a row), never wider (a single image
    is not stretched to the page: at 100 dpi a panel stays under 256 px); captions and the colour bar's label
    inside the figure."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(n)]
    cams = [rng.random((64, 64)) for _ in range(n)]
    captions = ["true COVID-19 → predicted pneumonia (0.985)\nieee8023 (Cohen et al. 2020), CC BY 4.0"] * n
    fig = plots.image_grid(images, captions, ncols=6, overlays=cams)
    assert_readable(fig)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.images]
    widths = [ax.get_window_extent().width / fig.dpi for ax in panels]
    assert len(panels) == n and min(widths) >= 2.3 and max(widths) <= 2.56, widths
    assert fig.get_figwidth() <= plots.PAGE_WIDTH_IN
    with pytest.raises(CXRError, match="one of each per image"):
        plots.image_grid(images, captions[:-1] + [], overlays=cams[:1] if n > 1 else [])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_confusion_roc_and_reliability_are_readable(n_classes):
    classes = ["covid", "pneumonia", "normal"][:n_classes] if n_classes == 3 else ["covid", "other"]
    rng = np.random.default_rng(1)
    true = rng.choice(classes, 60)
    p = rng.dirichlet(np.ones(n_classes), 60)
    predictions = pd.DataFrame({"true": true, **{f"p_{c}": p[:, i] for i, c in enumerate(classes)}})
    confusion = rng.integers(0, 30, (n_classes, n_classes))
    curve = {"confidence": [0.2, 0.5, 0.8], "accuracy": [0.3, 0.5, 0.7], "counts": [5, 0, 9]}
    for fig in (plots.confusion_matrix(confusion, classes), plots.roc_curves(predictions, classes),
                plots.reliability(curve, 0.05)):
        assert_readable(fig)
        ax = fig.axes[0]
        assert " " in ax.get_xlabel() and " " in ax.get_ylabel(), (ax.get_xlabel(), ax.get_ylabel())
    roc = plots.roc_curves(predictions, classes).axes[0]
    legend = [t.get_text() for t in roc.get_legend().get_texts()]
    assert all(re.search(r"AUC \d\.\d{3}\)", t) for t in legend), legend  # 3 decimals, as every number of the book
    assert "COVID-19 vs rest" in legend[0] and "_" not in " ".join(legend)
    assert ("macro one-vs-rest AUC" in roc.get_title()) == (n_classes == 3)


def _runs(fail: set[int]) -> pd.DataFrame:
    rows = []
    grid = itertools.product(["binary", "multiclass"], ["ce", "focal"], ["random", "ImageNet", "chest X-ray (file: pretrain)"],
                             [0, 1, 2], [False, True])
    for k, (task, loss, init, seed, extra) in enumerate(grid):
        ok = k not in fail
        f1 = 0.5 + 0.1 * seed if ok else None
        rows.append({"task": task, "loss": loss, "init": init, "seed": seed, "extra_covid_train": extra, "backbone": "resnet50",
                     "status": "complete" if ok else "failed: out of memory", "macro_f1": f1,
                     "macro_f1_ci": (f1 - 0.1, f1 + 0.05) if ok else None})
    return pd.DataFrame(rows)


def test_run_comparison_copes_with_many_runs_and_leaves_failed_ones_out():
    runs = _runs(fail={0, 5, 40})
    fig = plots.run_comparison(runs)
    assert_readable(fig)
    axes = fig.axes
    assert len(axes) == 2
    dpi = fig.dpi
    for ax, task in zip(axes, ["binary", "multiclass"]):
        n_configs = 2 * 3 * 2
        assert len(ax.get_yticklabels()) == n_configs
        height_per_config = ax.get_window_extent().height / n_configs
        assert height_per_config >= 0.3 * dpi, f"{task}: {height_per_config:.0f} px per configuration"
        complete = runs[(runs.task == task) & (runs.status == "complete")]
        dots = [line for line in ax.lines if line.get_marker() == "o"]
        assert len(dots) == len(complete)
        assert f"{len(complete)} complete" in ax.get_title(loc="left")
    assert "failed (not shown)" in axes[0].get_title(loc="left") and "extra COVID" in axes[0].get_yticklabels()[0].get_text() + \
        " ".join(t.get_text() for t in axes[0].get_yticklabels())
    assert "macro-F1" in fig.get_supxlabel()


def test_run_comparison_without_complete_runs_and_bad_metric():
    runs = _runs(fail=set(range(72)))
    fig = plots.run_comparison(runs)
    assert any(t.get_text() == "no complete run" for t in fig.findobj(Text))
    with pytest.raises(CXRError, match="no column 'auroc'"):
        plots.run_comparison(runs, metric="auroc")


def test_configuration_labels_use_only_columns_that_differ():
    runs = _runs(fail=set())
    labels = plots.configuration_labels(runs)
    assert labels.nunique() == 12 and not labels.str.contains("resnet50|seed").any()
    assert set(plots.configuration_labels(runs, by=["extra_covid_train"])) == {"extra COVID", "no extra COVID"}


@pytest.mark.parametrize("tasks", [("binary",), ("binary", "multiclass")])
def test_by_init_draws_one_task_or_several(tasks):
    """One panel per task; rows are initialisations split by whatever else differs (here the loss), so no row
    averages unlike runs; a mean over seeds is claimed only where a row has several seeds."""
    runs = pd.DataFrame([{"task": t, "init": i, "loss": loss, "seed": s, "status": "complete", "macro_f1": 0.5 + 0.1 * s,
                          "macro_f1_ci": (0.4, 0.7)}
                         for t in tasks for i in ("random init", "chest X-ray") for loss in ("ce", "focal") for s in (0, 1)])
    fig = plots.by_init(runs)
    assert len(fig.axes) == len(tasks)
    labels = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    assert labels == {"random init · ce", "random init · focal", "chest X-ray · ce", "chest X-ray · focal"}
    assert "macro-F1" in fig.get_supxlabel() and "mean over seeds" in fig.get_supxlabel()
    assert_readable(fig)
    one_seed = plots.by_init(runs[runs.seed == 0])
    assert "mean over seeds" not in one_seed.get_supxlabel()
    with pytest.raises(CXRError, match="no column 'auroc'"):
        plots.by_init(runs, metric="auroc")
