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
# # Results: the paper's comparison, recomputed
#
# This chapter reads every run folder of the run matrix (task × loss × initialisation, executed
# through papermill by `python -m cxrlib.runs`) and lays the numbers out as the paper does: rows
# (task, loss, initialisation), columns accuracy, precision, recall and F1 per class and macro.
# Accuracy and macro-F1 carry patient-level bootstrap 95% confidence intervals. Failed runs are
# listed as failed, not dropped. The comparisons below are sentences computed from the table.

# %% tags=["parameters"]
profile = "quick"
coronahack_dir = ""
extra_covid_dir = ""
run_root = ""  # empty: ../runs/<profile>/<data tag> (the run matrix's folder for this data)

# %%
from IPython.display import Markdown, display

from cxrlib import plots, results
from cxrlib.config import banner_from_record
from cxrlib.runs import default_run_root

run_root = run_root or default_run_root(profile, coronahack_dir, extra_covid_dir)
display(Markdown(banner_from_record(run_root)))  # what the runs recorded, not this notebook's parameters
runs = results.load_runs(run_root)
assert not runs.empty, f"no runs in {run_root}: run `python -m cxrlib.runs --profile {profile}` first"
complete = runs[runs.status == "complete"]
assert complete.accuracy.between(0, 1).all() and complete.macro_f1.between(0, 1).all()

# %% [markdown]
# ## Every run and its status

# %%
runs[["task", "loss", "init", "backbone", "image_size", "epochs", "status"]]

# %% [markdown]
# ## Binary task: COVID-19 vs. the rest

# %%
results.paper_table(runs, "binary")

# %% [markdown]
# ## Three classes: COVID-19 / pneumonia / normal

# %%
results.paper_table(runs, "multiclass")

# %%
plots.run_comparison(runs);

# %% [markdown]
# ## Focal loss vs. cross-entropy
#
# Pairs of runs that differ only in the loss (same task, initialisation, seed and schedule):

# %%
focal_vs_ce = results.paired(runs, "loss", "focal", "ce")
display(Markdown(results.describe(focal_vs_ce, "focal", "ce")))
focal_vs_ce

# %% [markdown]
# ## Chest-X-ray vs. ImageNet initialisation
#
# The paper's question: does a ResNet50 pretrained on chest X-rays (CheXNet's data) transfer better
# than one pretrained on ImageNet? Where ImageNet weights are not available on this machine, the
# chest-X-ray initialisation is compared with random initialisation instead.

# %%
families = set(complete.init_family)
baseline = "imagenet" if "imagenet" in families else "random"
init_pairs = results.paired(runs, "init_family", "chest_xray", baseline)
display(Markdown(results.describe(init_pairs, "chest-X-ray initialisation", f"{baseline} initialisation")))
init_pairs
