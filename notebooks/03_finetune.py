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
# # Fine-tuning one configuration
#
# This chapter trains and evaluates **one** configuration of the paper's experiment — a backbone
# (ResNet50 by default), an initialisation, a task (binary or 3-class) and a loss (cross-entropy or
# focal) — and writes everything into its run folder: `params.json`, `model.pt`, `history.csv`,
# `predictions.csv`, `metrics.json`. The run matrix executes this same notebook with papermill once
# per configuration; the results chapter compares them. If the run folder is already complete,
# nothing is retrained.
#
# Training follows the paper: inverse-class-frequency weighted sampling against the imbalance,
# AdamW, a cosine schedule, and model selection on the validation macro-F1. Test metrics come from a
# patient-disjoint test split, with patient-level bootstrap 95% intervals.

# %% tags=["parameters"]
# None = not set: the profile's default (cxrlib.config.PROFILES), else RunConfig's, applies.
profile = "quick"
coronahack_dir = None
extra_covid_dir = None
manifest = None
task = None
loss = None
gamma = None
alpha = None
backbone = None
weights = None
image_size = None
epochs = None
batch_size = None
freeze = None
lr = None
patience = None
seed = None
extra_covid_train = None
extra_negatives = None
external = None
hold_out = None
preprocess = None
amp = None
device = None
run_dir = None  # None: runs/<profile>/<data tag>/<run name> in the repository

# %% tags=["hide-input", "nbval-ignore-output"]
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from cxrlib import RunConfig, book, explain, plots
from cxrlib.rundir import Run
from cxrlib.train import run

# every parameter above, and any other RunConfig field papermill injects; a misspelt name or a value of the wrong
# type stops the chapter here, in one line
cfg = RunConfig.from_parameters(book.chapter_parameters(globals(), "03_finetune", RunConfig))
tables = book.Tables(3)

# %% tags=["nbval-ignore-output", "remove-cell"]
out = Path(run(cfg, root=book.repo_path("runs")))  # cfg.run_dir, else runs/<profile>/<data tag>/<run name>

# %% tags=["hide-input", "nbval-ignore-output"]
# what the run folder recorded (its data, then what it trained), not this notebook's parameters
display(book.banner(book.banner_from_record(out)), book.banner(book.run_banner(out)))
record = Run(out)
metrics = record.metrics()
history = pd.read_csv(out / "history.csv")
predictions = record.predictions()
classes = list(cfg.classes)
assert (out / "status").read_text().strip() == "complete"
assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
assert set(predictions.split) == {"test"} and len(predictions) == sum(metrics["per_class"][c]["support"] for c in classes)

# %% tags=["nbval-check-output"]
tables(pd.DataFrame({"class": [plots.class_words(c) for c in classes],
                     "test images": [metrics["per_class"][c]["support"] for c in classes]}),
       f"The test split of this run: {len(predictions)} images of {predictions.patient_id.nunique()} patients, "
       "patient-disjoint from training and validation.")

# %% [markdown]
# ## Training curves

# %% mystnb={"figure": {"caption": "Training and validation loss per epoch (log scale when the first epoch dwarfs the rest), and the validation scores used for model selection.", "name": "fig-training-curves"}} tags=["nbval-ignore-output"]
plots.training_curves(history);

# %% [markdown]
# ## Test metrics
#
# Per class: precision, recall (sensitivity), specificity and F1, with Wilson 95% intervals (unit: image);
# then the headline metrics with their patient-level bootstrap 95% intervals, and the majority-class
# baseline a model has to beat. Every interval reads `value (low–high)`. With three classes, "ROC AUC"
# is the **macro one-vs-rest** AUC, the mean of three class-vs-rest AUCs; the COVID-19-vs-rest AUC, the
# paper's question, is shown beside it.

# %% tags=["nbval-ignore-output"]
tables(explain.class_table(metrics), "Test metrics per class (Wilson 95% intervals; a precision is undefined "
       "when the model never predicted the class).")

# %% tags=["nbval-ignore-output"]
ci_info = metrics.get("ci_info", {})
tables(explain.headline_table(metrics, predictions),
       f"Headline test metrics, each with its 95% interval from {ci_info.get('n_boot', 1000)} bootstrap resamples "
       f"of the {metrics.get('n_patients', predictions.patient_id.nunique())} test patients.")

# %% [markdown]
# ## Confusion matrix and ROC curves

# %% mystnb={"figure": {"caption": "Confusion matrix on the test split: counts, coloured by the share of each true class.", "name": "fig-confusion"}} tags=["nbval-ignore-output"]
plots.confusion_matrix(metrics["confusion"]["matrix"], metrics["confusion"]["labels"]);

# %% mystnb={"figure": {"caption": "ROC curves on the test split: COVID-19 against the rest (binary task), or each class against the rest (3-class task; the title gives their mean, the macro one-vs-rest AUC), each with the area under its curve.", "name": "fig-roc"}} tags=["nbval-ignore-output"]
plots.roc_curves(predictions, classes);

# %% [markdown]
# ## Calibration and the COVID-19 operating point
#
# A screening use would fix a COVID-19 sensitivity first. The threshold below was chosen on the
# validation split to reach the target sensitivity, then applied unchanged to the test split.

# %% mystnb={"figure": {"caption": "Reliability diagram on the test split: observed accuracy against the model's confidence, per confidence bin; the expected calibration error (ECE) is in the title.", "name": "fig-reliability"}} tags=["nbval-ignore-output"]
plots.reliability(metrics["reliability"], metrics["ece"]);

# %% tags=["nbval-ignore-output"]
display(Markdown(explain.threshold_sentence(metrics)))
