# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -papermill,-execution
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
# The run matrix uses the third: this book pretrains its own ResNet50 on ChestX-ray14 (on the
# synthetic default, a synthetic ChestX-ray14 in the NIH layout), so the whole path is executable.

# %% tags=["parameters"]
profile = "quick"
# None = not set: the synthetic default data, and the run matrix's folder for the data in the repository.
coronahack_dir = None
extra_covid_dir = None
run_root = None  # None: runs/<profile>/<data tag> in the repository (python -m cxrlib.runs --where)

# %% tags=["hide-input"]
import json
from pathlib import Path

import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from cxrlib import book, plots, results
from cxrlib.config import banner_from_record
from cxrlib.errors import CXRError
from cxrlib.models import build_model, count_parameters, transfer_check
from cxrlib.runs import chest_pretraining, default_run_root

run_root = run_root or default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(banner_from_record(run_root)))  # fine-tuning data, as the runs recorded it
try:
    pretrained = chest_pretraining(run_root)
except CXRError:  # the matrix did not run the chest-X-ray arm: say why (as matrix.json records it) and how to run it
    pretrained = None
    why = next((e for e in results.read_not_run(run_root) if e["arm"] == "chest_xray"),
               {"reason": "the run matrix recorded no cxrlib ChestX-ray14 pretraining behind it", "command": ""})
    display(book.banner(f"**The chest-X-ray arm did not run.** Why: {why['reason']}."
                        + (f" The command that would run it: `{why['command']}`." if why["command"] else "")
                        + " Stages 1 and 2 below are skipped; the comparison shows the initialisations that ran.",
                        kind="warning"))
not_run = Markdown("*Skipped: the chest-X-ray arm did not run (see the box above).*")
if pretrained is not None:
    params = json.loads((pretrained / "params.json").read_text())
    pre_metrics = json.loads((pretrained / "metrics.json").read_text())
    display(Markdown(
        f"**Pretraining: {'synthetic ChestX-ray14 pretraining (NIH layout)' if params['data']['synthetic'] else 'ChestX-ray14 at ' + params['data']['root']}**, "
        f"{params['config']['image_size']} px, {pre_metrics['epochs_run']} epoch(s), "
        f"initialised from `{params['config']['weights']}`."))

# %% [markdown]
# ## Stage 1: ChestX-ray14 pretraining
#
# 14 sigmoid outputs trained with binary cross-entropy; model selection on the validation mean
# AUROC; AUROC per finding on the official test list (patient-disjoint from training).

# %%
if pretrained is None:
    display(not_run)
else:
    auroc = pd.Series(pre_metrics["per_finding_auroc"], name="test AUROC").to_frame()
    auroc.loc["mean"] = pre_metrics["mean_auroc"]
    display(auroc.round(3))

# %% mystnb={"figure": {"caption": "ChestX-ray14 pretraining: training and validation loss (binary cross-entropy over the 14 findings) and validation scores per epoch.", "name": "fig-pretrain-loss"}}
if pretrained is not None:
    plots.training_curves(pd.read_csv(pretrained / "history.csv"));

# %% [markdown]
# ## Stage 2: the transferred backbone in a 3-class model
#
# `build_model` loads every backbone tensor strictly (a missing or extra key is an error) and
# replaces only the head. The check below compares each backbone tensor of the new model with the
# checkpoint (difference 0: copied) and with a fresh random initialisation (difference > 0: not random).

# %%
if pretrained is None:
    display(not_run)
else:
    weights = f"file:{pretrained / 'model.pt'}"
    model, report = build_model(params["config"]["backbone"], weights, num_classes=3)  # as pretrained
    total, trainable = count_parameters(model)
    print(f"source: {Path(report.source.split(': ', 1)[-1]).name}")
    print(f"tensors loaded: {len(report.loaded)}, re-initialised (the new head): {report.reinitialised}")
    print(f"parameters: {total:,}")

# %% tags=["hide-input", "nbval-check-output"]
if pretrained is not None:
    check = transfer_check(model, weights)
    assert (check.max_abs_diff_to_file == 0).all(), "a backbone tensor differs from the checkpoint"
    assert (check.mean_abs_diff_to_random_init > 0).all(), "a backbone tensor equals a random init"
    display(pd.DataFrame({
        "backbone tensors compared": [len(check)],
        "identical to the checkpoint": [int((check.max_abs_diff_to_file == 0).sum())],
        "different from a random init": [int((check.mean_abs_diff_to_random_init > 0).sum())],
    }))

# %% mystnb={"figure": {"caption": "Mean absolute difference between each transferred backbone tensor and the same tensor freshly initialised at random (log scale).", "name": "fig-transfer-vs-random"}}
if pretrained is not None:
    ax = sns.histplot(check, x="mean_abs_diff_to_random_init", log_scale=True, bins=30)
    ax.set(title="every transferred tensor differs from a random init", xlabel="mean |transferred − random init|");

# %% [markdown]
# ## The initialisations compared on the task
#
# From the run matrix: the same task, loss and schedule, differing only in the initialisation.

# %%
runs = results.load_runs(run_root)
done = runs[runs.status == "complete"]
assert not done.empty, f"no complete runs in {run_root}"
done.pivot_table(index=["task", "loss"], columns="init", values="macro_f1").round(3)

# %% mystnb={"figure": {"caption": "Test macro-F1 of the complete runs of the run matrix, by initialisation and task.", "name": "fig-init-f1"}}
plots.by_init(done);

# %% tags=["hide-input"]
init_pairs, said = results.init_comparison(runs)
display(Markdown(said))
