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
# # Results: the paper's claims, tested
#
# This chapter reads every run folder of the run matrix (task × loss × initialisation × seed × extra
# COVID-19 images in training, executed by `python -m cxrlib.runs`) and the matrix's own record of
# the arms it could not run. It opens with what ran, then tests each claim of the paper
# (Bolhassani, arXiv 2105.08382) on those runs, then lays the numbers out in the paper's form, then
# shows each comparison in full.
#
# **How a comparison is made.** Two runs are compared only when they differ in one factor (same
# task, data, seed and every other parameter), on the test images both saw; each seed has its own
# patient-disjoint split. The difference of two arms is the mean over seeds of each seed's paired
# difference. Its 95% interval and p come from one bootstrap that draws the seeds with replacement
# and, within each drawn seed, that seed's test patients with replacement, scoring both runs of a pair
# on the same draw: the interval holds both the test set's luck and the seed-to-seed spread. Each
# claim is judged on the metric it is about, fixed in `cxrlib.results.CLAIMS` before any run was
# read: macro-F1 for the losses and initialisations, COVID-19 sensitivity (the minority class) for
# the two remedies of the class imbalance, accuracy for "high accuracy". The verdicts follow the p
# after Holm's adjustment over the family of claims: **supported** when it is below 0.05 and the
# claimed arm is ahead, **not supported** when it is below 0.05 and the other arm is ahead, and
# **no evidence of a difference** otherwise, whatever the means say. McNemar's exact test on the
# images one run gets right and the other wrong is shown per pair. Accuracy, macro-F1 and AUC of
# single runs carry patient-level bootstrap intervals; sensitivity, specificity and precision carry
# Wilson score intervals, which stay meaningful at 0 % and 100 %.

# %% tags=["parameters"]
profile = "quick"
# None = not set: the synthetic default data, and the run matrix's folder for the data in the repository.
coronahack_dir = None
extra_covid_dir = None
run_root = None  # None: runs/<profile>/<data tag> in the repository (python -m cxrlib.runs --where)
rerun_root = None  # run folders of some of the same configurations and seeds made again (the noise floor); None: none

# %% tags=["hide-input", "nbval-ignore-output"]
from pathlib import Path

from IPython.display import Markdown, display

from cxrlib import book, plots, results

run_root = run_root or book.default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(book.banner_from_record(run_root)))  # what the runs recorded, not this notebook's parameters
tables = book.Tables(5)
runs = results.load_runs(run_root)
assert not runs.empty, f"no runs in {run_root}: run `python -m cxrlib.runs --profile {profile}` first"
complete = runs[runs.status == "complete"]
assert complete.accuracy.between(0, 1).all() and complete.macro_f1.between(0, 1).all()

# %% [markdown]
# ## What ran, and what did not
#
# Each arm of the matrix with its complete and unfinished runs; arms the run matrix did not start
# are listed with the reason it recorded (in the run root's `matrix.json`).

# %% tags=["nbval-ignore-output"]
not_run = results.read_not_run(run_root)
tables(results.arms_table(runs, not_run), "Each arm of the run matrix: complete and unfinished runs, and the seeds "
       "that completed; arms the matrix could not start, with the reason it recorded.")

# %% tags=["nbval-check-output", "remove-cell"]
shown, same = results.narrow(results.run_table(runs))
print(shown.drop(columns=["status"], errors="ignore").to_string(index=False))  # the configurations: same everywhere

# %% tags=["nbval-ignore-output"]
tables(shown, f"Every run folder read by this chapter, labelled by its arm. {same}")

# %% [markdown]
# ## The paper's claims
#
# Each claim, per task: the verdict and the Holm-adjusted p it follows, the metric it is judged on,
# the mean paired difference (claimed arm minus the other) with its 95% interval over test patients
# and seeds, each seed's own difference and in how many seeds the claimed arm was ahead, the
# unadjusted p, and the code that made the runs. "High accuracy" has no figure in the abstract, so it
# is read here as "above always predicting the majority class". The claims are also written as data
# (`claims.json` beside the run folders), from which the book's first page states them and
# `python -m cxrlib verify` recomputes them.

# %% tags=["hide-input", "nbval-ignore-output"]
claims = results.claims_table(runs, not_run)
assert claims.verdict.str.match(r"supported|not supported|no evidence of a difference|not testable here \(").all()
noise = results.rerun_noise(runs, results.load_runs(rerun_root)) if rerun_root else None
results.save_claims(claims, runs, Path(run_root) / "claims.json", noise, Path(rerun_root).name if rerun_root else "")
display(tables(results.claims_for_reading(claims), "The paper's claims, tested on the runs of this chapter."),
        Markdown(results.holm_sentence(claims)))

# %% [markdown]
# ### The noise floor: the same run, trained again
#
# Where some configurations were trained twice with the same seed (the run matrix, and an experiment
# that kept its own baseline), the two runs are compared like two arms. Whatever separates them is
# what training the same thing again moves (thread scheduling, code versions, floating-point order);
# a claim's difference has to clear it to mean more than that.

# %% tags=["hide-input", "nbval-ignore-output"]
if noise is None or noise.empty:
    display(Markdown("No configuration was trained twice with the same seed here, so the rerun noise floor is not "
                     "measured on this page."))
else:
    display(tables(noise, f"Runs of one configuration and seed trained twice (this chapter's runs vs "
                          f"`{Path(rerun_root).name}`): the images they call differently and the paired differences "
                          f"(95% interval over test patients)."),
            Markdown(results.noise_sentence(noise)))

# %% tags=["nbval-check-output", "remove-cell"]
# Which claims could be tested here, and by which runs, is the same on every machine; a verdict on a 2-epoch
# synthetic model is not (it rests on the last decimals of the CPU's kernels), nor is a reason that quotes a
# folder of the machine (the weights cache), so neither is checked.
for _, claim in claims.iterrows():
    testable = "not testable" if claim["verdict"].startswith("not testable") else "tested"
    print(f"{claim['task']} {claim['claim'].split()[0]} on {claim['metric']}: {testable}; {claim['tested by']}")

# %% [markdown]
# ## The paper's tables
#
# One row per run. Accuracy, macro-F1 and ROC AUC with patient-level bootstrap 95% intervals; per
# class, precision, recall (sensitivity) and specificity with Wilson 95% intervals. Failed runs are
# listed with their status, not dropped. What is the same for every run is said once above each table.
#
# ### Binary task: COVID-19 vs. the rest

# %% tags=["nbval-ignore-output"]
shown, same = results.narrow(results.paper_table(runs, "binary"))
tables(shown, f"Binary task, the paper's set-up: overall scores per run. {same}", index=True,
       empty="No complete run of the paper's set-up for this task.")

# %% tags=["nbval-ignore-output"]
shown, same = results.narrow(results.class_table(runs, "binary"))
tables(shown, f"Binary task, the paper's set-up: per-class scores (Wilson 95% intervals). {same}", index=True,
       empty="No complete run of the paper's set-up for this task.")

# %% [markdown]
# ### Three classes: COVID-19 / pneumonia / normal

# %% tags=["nbval-ignore-output"]
shown, same = results.narrow(results.paper_table(runs, "multiclass"))
tables(shown, "Three classes, the paper's set-up: overall scores per run. \"ROC AUC (macro one-vs-rest)\" is the "
       f"mean of the three one-vs-rest AUCs; the COVID-vs-rest AUC is COVID-19's own. {same}", index=True,
       empty="No complete run of the paper's set-up for this task.")

# %% tags=["nbval-ignore-output"]
shown, same = results.narrow(results.class_table(runs, "multiclass"))
tables(shown, f"Three classes, the paper's set-up: per-class scores (Wilson 95% intervals). {same}", index=True,
       empty="No complete run of the paper's set-up for this task.")

# %% mystnb={"figure": {"caption": "Test macro-F1 of every complete run of the matrix (dot) with its patient-level 95% interval (bar), one panel per task; where a configuration has runs of several seeds, a black tick marks their mean.", "name": "fig-run-comparison"}} tags=["nbval-ignore-output"]
plots.run_comparison(runs);

# %% [markdown]
# ## Focal loss vs. cross-entropy
#
# Pairs of runs that differ only in the loss, pooled over initialisations, seeds and the
# extra-COVID arms of each task:

# %% tags=["nbval-ignore-output"]
focal_vs_ce = results.paired(results.paper_runs(runs), "loss", "focal", "ce")
display(Markdown(results.describe(focal_vs_ce, "focal", "cross-entropy")))
tables(results.comparison_table(focal_vs_ce), "Focal loss minus cross-entropy, paired runs of the paper's set-up.",
       empty="No pair of runs differs only in the loss.")

# %% [markdown]
# ## Chest-X-ray vs. ImageNet initialisation
#
# The paper's question: does a ResNet50 pretrained on chest X-rays (CheXNet's data) transfer better
# than one pretrained on ImageNet? Where one of the two has no complete run, the pair of
# initialisations that did run is compared instead, and the text says so.

# %% tags=["nbval-ignore-output"]
init_pairs, said = results.init_comparison(results.paper_runs(runs))
display(Markdown(said))
if len(init_pairs):
    display(tables(results.comparison_table(init_pairs), "Initialisations compared on paired runs."))

# %% [markdown]
# ## Extra COVID-19 images in training
#
# Claim (c′): runs trained with and without the extra ieee8023 COVID-19 images; both arms are
# tested on the same test images, so the comparison is paired. Judged on COVID-19 sensitivity, the
# class the extra images add to; macro-F1 beside it.

# %% tags=["nbval-ignore-output"]
extra_pairs = results.paired(results.paper_runs(runs), "extra_covid_train", True, False)
display(Markdown(results.describe(extra_pairs, "with extra COVID-19 images", "without", "covid_sensitivity")))
tables(results.comparison_table(extra_pairs), "With minus without the extra COVID-19 training images (validation "
       "and test images identical in both arms).", empty="No pair of runs differs only in the extra COVID-19 images.")

# %% [markdown]
# ## Weighted sampling vs. none
#
# Claim (c): the paper draws training images with class-balanced probabilities to handle the
# imbalance. The arm without it (`--variants unweighted`) is otherwise the paper's set-up, on the
# same splits, so the comparison is paired. Judged on COVID-19 sensitivity, the minority class.

# %% tags=["nbval-ignore-output"]
sampling = results.paired(runs[runs.arm.isin([results.PAPER_ARM, results.UNWEIGHTED])], "weighted_sampler", True,
                          False)
display(Markdown(results.describe(sampling, "with weighted sampling", "without", "covid_sensitivity")))
tables(results.comparison_table(sampling), "With minus without class-balanced sampling, paired runs.",
       empty="No run without weighted sampling completed, so claim (c) is not tested here.")
