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
# # Results: the paper's claims, tested
#
# This chapter reads every run folder of the run matrix (task × loss × initialisation × seed × extra
# COVID-19 images in training, executed by `python -m cxrlib.runs`) and the matrix's own record of
# the arms it could not run. It opens with what ran, then tests each claim of the paper
# (Bolhassani, arXiv 2105.08382) on those runs, then lays the numbers out in the paper's form, then
# shows each comparison in full.
#
# **How a comparison is made.** Two runs are compared only when they differ in one factor (same
# task, data, seed and every other parameter), on the test images both saw. The difference in a
# metric gets a 95% confidence interval from a *paired* bootstrap over patients: each resample
# draws patients with replacement and scores both runs on the same draw, so the test set's own
# luck cancels. A claim is **supported** when the interval of the difference lies above 0,
# **not supported** when it lies below 0, and there is **no evidence of a difference** when it
# contains 0 — whatever the means say. McNemar's exact test on the images one run gets right and
# the other wrong is shown beside it. Accuracy, macro-F1 and AUC of single runs carry patient-level
# bootstrap intervals; sensitivity, specificity and precision carry Wilson score intervals, which
# stay meaningful at 0 % and 100 %.

# %% tags=["parameters"]
profile = "quick"
# None = not set: the synthetic default data, and the run matrix's folder for the data in the repository.
coronahack_dir = None
extra_covid_dir = None
run_root = None  # None: runs/<profile>/<data tag> in the repository (python -m cxrlib.runs --where)

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from cxrlib import book, plots, results
from cxrlib.config import banner_from_record
from cxrlib.runs import default_run_root

run_root = run_root or default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(banner_from_record(run_root)))  # what the runs recorded, not this notebook's parameters
runs = results.load_runs(run_root)
assert not runs.empty, f"no runs in {run_root}: run `python -m cxrlib.runs --profile {profile}` first"
complete = runs[runs.status == "complete"]
assert complete.accuracy.between(0, 1).all() and complete.macro_f1.between(0, 1).all()

# %% [markdown]
# ## What ran, and what did not
#
# Each arm of the matrix with its complete and unfinished runs; arms the run matrix did not start
# are listed with the reason it recorded (in the run root's `matrix.json`).

# %%
not_run = results.read_not_run(run_root)
results.arms_table(runs, not_run)

# %% tags=["nbval-check-output"]
shown, same = results.narrow(results.run_table(runs))
display(Markdown(same), shown)

# %% [markdown]
# ## The paper's claims
#
# Each claim, per task: the runs that test it, the paired difference in macro-F1 (claimed arm minus
# the other) with its 95% interval, and the verdict that interval gives. "High accuracy" has no
# figure in the abstract, so it is read here as "above always predicting the majority class".

# %% tags=["hide-input"]
claims = results.claims_table(runs, not_run)
assert claims.verdict.str.match(r"supported|not supported|no evidence of a difference|not testable here \(").all()
claims

# %% tags=["nbval-check-output"]
claims[["claim", "task", "verdict"]]

# %% [markdown]
# ## The paper's tables
#
# One row per run. Accuracy, macro-F1 and ROC AUC with patient-level bootstrap 95% intervals; per
# class, precision, recall (sensitivity) and specificity with Wilson 95% intervals. Failed runs are
# listed with their status, not dropped. What is the same for every run is said once above each table.
#
# ### Binary task: COVID-19 vs. the rest

# %%
shown, same = results.narrow(results.paper_table(runs, "binary"))
display(Markdown(same), shown)

# %%
shown, same = results.narrow(results.class_table(runs, "binary"))
display(Markdown(same), shown)

# %% [markdown]
# ### Three classes: COVID-19 / pneumonia / normal

# %%
shown, same = results.narrow(results.paper_table(runs, "multiclass"))
display(Markdown(same), shown)

# %%
shown, same = results.narrow(results.class_table(runs, "multiclass"))
display(Markdown(same), shown)

# %% mystnb={"figure": {"caption": "Test macro-F1 of every complete run of the matrix (dot) with its patient-level 95% interval (bar), one panel per task; the black tick is the mean over seeds.", "name": "fig-run-comparison"}}
plots.run_comparison(runs);

# %% [markdown]
# ## Focal loss vs. cross-entropy
#
# Pairs of runs that differ only in the loss, pooled over initialisations, seeds and the
# extra-COVID arms of each task:

# %%
focal_vs_ce = results.paired(runs, "loss", "focal", "ce")
display(Markdown(results.describe(focal_vs_ce, "focal", "cross-entropy")))
results.comparison_table(focal_vs_ce)

# %% [markdown]
# ## Chest-X-ray vs. ImageNet initialisation
#
# The paper's question: does a ResNet50 pretrained on chest X-rays (CheXNet's data) transfer better
# than one pretrained on ImageNet? Where one of the two has no complete run, the pair of
# initialisations that did run is compared instead, and the text says so.

# %%
init_pairs, said = results.init_comparison(runs)
display(Markdown(said))
results.comparison_table(init_pairs)

# %% [markdown]
# ## Extra COVID-19 images in training
#
# Runs trained with and without the extra ieee8023 COVID-19 images; both arms are tested on the
# same test images, so the comparison is paired.

# %%
extra_pairs = results.paired(runs, "extra_covid_train", True, False)
display(Markdown(results.describe(extra_pairs, "with extra COVID-19 images", "without")))
results.comparison_table(extra_pairs)
