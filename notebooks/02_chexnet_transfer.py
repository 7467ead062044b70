# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: mystnb,tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -papermill,-widgets
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CheXNet transfer: chest-X-ray weights for a ResNet50
#
# CheXNet {cite:p}`rajpurkar2017chexnet` is a DenseNet121 {cite:p}`huang2017densenet` trained on NIH
# ChestX-ray14 {cite:p}`wang2017chestxray8` (112,120 frontal X-rays of 30,805 patients, 14 findings);
# its authors report a mean AUROC of 0.841 over the 14 findings. The paper's "ResNet50 pretrained by
# CheXNet" is a ResNet50 {cite:p}`he2016resnet` trained first on that data, then fine-tuned on
# CoronaHack. Chest-X-ray weights can reach our backbones in three ways, all in
# `cxrlib.models.build_model(backbone, weights, num_classes)`:
#
# | `weights=` | route |
# |---|---|
# | `chexnet:PATH` | import a published CheXNet DenseNet121 checkpoint (DataParallel prefixes and old key names mapped) |
# | `torchxrayvision:NAME` | TorchXRayVision's DenseNet121/ResNet50 {cite:p}`cohen2022xrv` (1-channel inputs in [-1024, 1024]) |
# | `file:PATH` | a ResNet50 (or DenseNet121) pretrained on ChestX-ray14 by `python -m cxrlib pretrain` |
#
# The run matrix (`python -m cxrlib.runs`) builds the chest-X-ray arm by the third route when it is
# given real ChestX-ray14 (`--chestxray14-dir`), or takes a ready init by the first two
# (`--chest-init`); on the synthetic default data it pretrains on a synthetic ChestX-ray14 and says so.
# It skips an arm whose weights it cannot get, and records why. Which initialisations ran for this
# book, and which did not, is read below from what the runs recorded (their `params.json` and the
# matrix's `matrix.json`), never assumed.

# %% tags=["parameters"]
profile = "quick"
# None = not set: the synthetic default data, and the run matrix's folder for the data in the repository.
coronahack_dir = None
extra_covid_dir = None
run_root = None  # None: runs/<profile>/<data tag> in the repository (python -m cxrlib.runs --where)

# %% tags=["hide-input", "nbval-ignore-output"]
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from cxrlib import book, plots, results
from cxrlib.errors import CXRError
from cxrlib.models import build_model, count_parameters, transfer_check
from cxrlib.rundir import Run
from cxrlib.weights import Weights

INIT_WORDS = {"random": "random init", "imagenet": "ImageNet", "chest_xray": "chest X-ray"}  # the paper's three arms
LOSS_WORDS = {"ce": "cross-entropy", "focal": "focal"}
tables = book.Tables(2)

run_root = run_root or book.default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(book.banner_from_record(run_root)))  # fine-tuning data, as the runs recorded it
runs = results.load_runs(run_root)
done = runs[runs.status == "complete"]
assert not done.empty, f"no complete runs in {run_root}"
paper = done[done.paper_arm.astype(bool)].assign(init=lambda r: r.init_family.map(INIT_WORDS))  # the paper's set-up
not_run = {e["arm"]: e for e in results.read_not_run(run_root)}
ran = [f for f in INIT_WORDS if f in set(done.init_family)]
chest_sources = sorted(set(done.loc[done.init_family == "chest_xray", "init"]))


def _count(family: str) -> str:
    n, in_paper = int((done.init_family == family).sum()), int((paper.init == INIT_WORDS[family]).sum())
    return f"{INIT_WORDS[family]} ({n} complete run{'s' if n != 1 else ''}, {in_paper} of them the paper's set-up)"


said = [f"**Initialisations that ran:** {', '.join(_count(f) for f in ran)}."]
said += [f"**{INIT_WORDS.get(arm, arm)[0].upper() + INIT_WORDS.get(arm, arm)[1:]} did not run.** {e['reason'][0].upper() + e['reason'][1:]}."
         + (f" The command that would run it: `{e['command']}`." if e["command"] else "")
         for arm, e in not_run.items() if arm not in ran]
if chest_sources:  # Weights.label: "chest X-ray (file: <pretraining folder>)", "chest X-ray (chexnet: <file>)", ...
    said.append("The chest-X-ray runs started from " + "; ".join(f"`{s[len('chest X-ray ('):-1]}`" for s in chest_sources)
                + ".")
display(Markdown("\n\n".join(said)))
if ran == ["random"]:
    display(book.banner(
        "**Every verdict in this book is about a randomly initialised ResNet50.** Neither ImageNet nor chest-X-ray "
        "weights could be loaded for these runs (the reasons are above), so every score, comparison and verdict in "
        "the chapters that follow is that of a ResNet50 trained from random weights on the fine-tuning data alone. "
        "The paper's question, whether CheXNet pretraining beats ImageNet pretraining, cannot be answered here.",
        kind="warning"))
try:
    pretrained = book.chest_pretraining(run_root)
except CXRError:  # no cxrlib ChestX-ray14 pretraining behind the chest-X-ray arm (none ran, or it came from --chest-init)
    pretrained = None
skipped = Markdown("*Skipped: " + ("the chest-X-ray arm did not run (see above)." if "chest_xray" not in ran else
                                   "the chest-X-ray arm used a ready init, not a cxrlib pretraining.") + "*")
if pretrained is not None:
    pretraining = Run(pretrained)
    params, pre_metrics = pretraining.record, pretraining.metrics()
    display(Markdown(
        f"**Pretraining: {'synthetic ChestX-ray14 images (NIH layout), so this arm tests the code path, not CheXNet' if params['data']['synthetic'] else 'ChestX-ray14 at ' + params['data']['root']}**, "
        f"{params['config']['image_size']} px, {pre_metrics['epochs_run']} epoch(s), "
        f"starting from {Weights.parse(params['config']['weights']).label}."))

# %% [markdown]
# ## Stage 1: ChestX-ray14 pretraining
#
# 14 sigmoid outputs trained with binary cross-entropy; model selection on the validation mean
# AUROC; AUROC per finding on the official test list (patient-disjoint from training).

# %% tags=["nbval-ignore-output"]
if pretrained is None:
    display(skipped)
else:
    auroc = pd.DataFrame({"finding": [f.replace("_", " ") for f in pre_metrics["per_finding_auroc"]],
                          "test AUROC": list(pre_metrics["per_finding_auroc"].values())})
    auroc.loc[len(auroc)] = ["mean over the 14 findings", pre_metrics["mean_auroc"]]
    display(tables(auroc, "ChestX-ray14 pretraining: test AUROC per finding (– where the test list has no "
                          "positive or no negative image of it)."))

# %% mystnb={"figure": {"caption": "ChestX-ray14 pretraining: training and validation loss (binary cross-entropy over the 14 findings) and the validation mean AUROC over the 14 findings, per epoch.", "name": "fig-pretrain-loss"}} tags=["nbval-ignore-output"]
if pretrained is not None:
    plots.training_curves(pd.read_csv(pretrained / "history.csv"));

# %% [markdown]
# ## Stage 2: the transferred backbone in a 3-class model
#
# `build_model` loads every backbone tensor strictly (a missing or extra key is an error) and
# replaces only the head. The check below compares each backbone tensor of the new model with the
# checkpoint (difference 0: copied) and with a fresh random initialisation (difference > 0: not random).

# %% tags=["nbval-ignore-output"]
if pretrained is None:
    display(skipped)
else:
    weights = f"file:{pretrained / 'model.pt'}"
    model, report = build_model(params["config"]["backbone"], weights, num_classes=3)  # as pretrained
    total, trainable = count_parameters(model)
    display(Markdown(f"The 3-class model loads {len(report.loaded)} tensors from "
                     f"`{Path(report.source.split(': ', 1)[-1]).name}`; only the new head "
                     f"({', '.join(f'`{k}`' for k in report.reinitialised)}) starts from random weights. "
                     f"Parameters: {total:,}."))

# %% tags=["hide-input", "nbval-check-output"]
if pretrained is not None:
    check = transfer_check(model, weights)
    assert (check.max_abs_diff_to_file == 0).all(), "a backbone tensor differs from the checkpoint"
    assert (check.mean_abs_diff_to_random_init > 0).all(), "a backbone tensor equals a random init"
    display(tables(pd.DataFrame({
        "backbone tensors compared": [len(check)],
        "identical to the checkpoint": [int((check.max_abs_diff_to_file == 0).sum())],
        "different from a random init": [int((check.mean_abs_diff_to_random_init > 0).sum())],
    }), "Every transferred backbone tensor is the checkpoint's, and none is a random initialisation."))

# %% mystnb={"figure": {"caption": "Mean absolute difference between each transferred backbone tensor and the same tensor freshly initialised at random (log scale).", "name": "fig-transfer-vs-random"}} tags=["nbval-ignore-output"]
if pretrained is not None:
    fig, ax = plt.subplots(figsize=(plots.PAGE_WIDTH_IN, 3.4), layout="constrained")
    sns.histplot(check, x="mean_abs_diff_to_random_init", log_scale=True, bins=30, ax=ax)
    ax.set(title="every transferred tensor differs from a random initialisation",
           xlabel="mean absolute difference from a fresh random initialisation (log scale)",
           ylabel="backbone tensors");

# %% [markdown]
# ## The initialisations compared on the task
#
# From the run matrix, only the runs of the paper's own set-up: no held-out source, no preprocessing,
# no extra negative images, no lungs-removed training, weighted sampling on. Within a row, the runs
# share task, loss, extra COVID-19 images and schedule, and differ only in the initialisation (and
# the seed).

# %% tags=["nbval-ignore-output"]
cells = (paper.groupby(["task", "loss", "extra_covid_train", "init"], sort=True)["macro_f1"]
         .agg(["mean", "min", "max", "count"]).reset_index())
cells["text"] = [f"{r['mean']:.3f} (1 seed)" if r["count"] == 1 else
                 f"{r['mean']:.3f} (mean of {r['count']} seeds, range {r['min']:.3f}–{r['max']:.3f})"
                 for _, r in cells.iterrows()]
pivot = cells.pivot(index=["task", "loss", "extra_covid_train"], columns="init", values="text")
pivot = pivot[[INIT_WORDS[f] for f in INIT_WORDS if INIT_WORDS[f] in pivot.columns]].reset_index()
pivot = pivot.assign(loss=pivot.loss.map(LOSS_WORDS).fillna(pivot.loss),
                     extra_covid_train=pivot.extra_covid_train.map({True: "with", False: "without"}))
pivot = pivot.rename(columns={"extra_covid_train": "extra COVID-19 training images"}).rename_axis(columns=None)
tables(pivot.fillna("not run"), "Test macro-F1 of the paper set-up's complete runs, by initialisation; each cell "
       "names the number of seeds behind it (a mean, with the range, when there are several).",
       empty="No run of the paper's set-up is complete.")

# %% mystnb={"figure": {"caption": "Test macro-F1 of the paper set-up's complete runs by initialisation, one panel per task; each row an initialisation with the settings that differ between rows; each dot one run with its patient-level 95% CI (the axis label says whether a mean over seeds is drawn).", "name": "fig-init-f1"}} tags=["nbval-ignore-output"]
if len(paper):
    plots.by_init(paper.assign(loss=paper.loss.map({"ce": "cross-entropy loss", "focal": "focal loss"}).fillna(paper.loss)));

# %% tags=["hide-input", "nbval-ignore-output"]
if len(paper):
    seeds = paper.groupby(["task", "init", "loss", "extra_covid_train"]).seed.nunique()
    display(Markdown(f"Each row of the figure holds {seeds.min()} seed{'s' if seeds.min() != 1 else ''}"
                     + (f" (up to {seeds.max()})" if seeds.max() != seeds.min() else "")
                     + (": every dot is a single run, and no mean is drawn." if seeds.max() == 1 else ".")))
init_pairs, said = results.init_comparison(runs[runs.paper_arm.astype(bool)])
display(Markdown(said))
