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
# # The data: CoronaHack and the extra COVID-19 images
#
# The paper trains on the Kaggle *CoronaHack Chest X-Ray* dataset plus extra COVID-19 images.
# CoronaHack's normal and pneumonia images are children (aged 1–5) from one hospital in Guangzhou
# {cite:p}`kermany2018`; its COVID-19 images, like the extra ones, come from the ieee8023 collection
# of adults from many hospitals {cite:p}`cohen2020covid`. This chapter counts what is there, finds
# the copies shared by the two sources, makes the patient-disjoint split every later chapter uses,
# and shows the confound: the sources differ in ways a classifier can see without looking at lungs.

# %% tags=["parameters"]
# None = not set: the profile's default (cxrlib.config.PROFILES), else RunConfig's, applies.
profile = "quick"
coronahack_dir = None
extra_covid_dir = None
task = None
seed = None
image_size = None

# %% tags=["hide-input", "nbval-ignore-output"]
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from cxrlib import RunConfig, audit, book, data, licences, plots
from cxrlib.config import classes, data_banner, data_record, encode_labels
from cxrlib.images import ImageCache

cfg = RunConfig.from_parameters(globals())
tables = book.Tables(1)  # "Table 1.n." captions, full cell text
coronahack_dir, extra_covid_dir, task, seed, image_size = (cfg.coronahack_dir, cfg.extra_covid_dir, cfg.task,
                                                           cfg.seed, cfg.image_size)
table, report = data.load_table(coronahack_dir, extra_covid_dir)
record = data_record(data.data_fingerprint(table), len(table), coronahack_dir, extra_covid_dir)
display(book.banner(data_banner(record)))
table = data.split_table(table, task, seed=seed)
summary = data.summarize(table, report)
assert not summary["leakage"]

# %% [markdown]
# ## What was read, and what was not
#
# Metadata rows whose image file is absent are reported, never silently dropped or invented;
# duplicates across the two sources are removed (same file name, or the same pixels after decoding).

# %% tags=["nbval-check-output"]
print(f"images: {summary['n_images']}, patients: {summary['n_patients']}")
print(f"metadata rows without an image: {summary['missing']}")
print(f"duplicates removed: {summary['duplicates_removed']}")
for note in summary["notes"]:
    print("note:", note.split(" in /")[0])

# %% tags=["nbval-ignore-output"]
tables(table.groupby(["source", "label", "subtype"]).size().rename("images").to_frame(),
       "Images per source, class and subtype, after removing the copies shared by the two sources.", index=True)

# %% [markdown]
# ## The imbalance
#
# COVID-19 is the minority class. Training draws images with probability inversely proportional to
# their class frequency (as the paper does); these are the weights.

# %% tags=["nbval-ignore-output"]
train_labels = encode_labels(table.loc[table.split == "train", "label"], task)
n_classes = len(classes(task))
imbalance = pd.DataFrame({
    "train images": np.bincount(train_labels, minlength=n_classes),
    "sampling weight": data.class_weights(train_labels, n_classes),
}, index=pd.Index(classes(task), name="class"))
tables(imbalance, "Training images per class, and the weight with which training draws each class's images "
       "(inversely proportional to its frequency).", index=True)

# %% mystnb={"figure": {"caption": "Images per class and source, after removing the copies shared by the two sources.", "name": "fig-data-class-source"}} tags=["nbval-ignore-output"]
sns.countplot(table, y="label", hue="source", order=["covid", "pneumonia", "normal"]).set_title("images per class and source");

# %% [markdown]
# ## Duplicates across the sources

# %% tags=["nbval-ignore-output"]
duplicates = pd.DataFrame(report.duplicates, columns=["removed", "kept (copy of)"])
tables(duplicates.head(10), f"Images removed as copies of an image in the other source: the first "
       f"{min(len(duplicates), 10)} of {len(duplicates)}.", empty="No image was found in both sources.")

# %% [markdown]
# ## The patient-disjoint split
#
# CoronaHack's published TEST split holds no COVID-19 image, and its TRAIN and TEST share patient
# numbers. We re-split by patient from a seed, stratified by label and source: every split holds
# every class, no patient (and no image) is on two sides — checked by `data.check_no_leakage`.

# %% tags=["nbval-check-output", "remove-cell"]
# What nbval compares, as plain text (the same on every machine); the page shows the table below.
for split, counts in summary["counts"].items():
    print(f"{split}: {summary['patients'][split]} patients;", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

# %% tags=["nbval-ignore-output"]
split_counts = pd.DataFrame(summary["counts"]).fillna(0).astype(int)
split_counts.loc["all classes"] = split_counts.sum()
split_counts.loc["patients"] = pd.Series(summary["patients"])
tables(split_counts.rename_axis(None), f"The patient-disjoint split (seed {seed}): images per class, and "
       "patients, in each split.", index=True)

# %% [markdown]
# ## How the images differ by source
#
# File sizes and intensities per source and class. In the real CoronaHack download the paediatric
# images were squashed to 224 × 224 upstream while the COVID-19 ones keep their aspect ratio, so the
# shape alone gives the class away; every image is therefore resized to one square size.

# %% tags=["nbval-ignore-output"]
sizes = audit.original_sizes(table.path).set_index(table.index)
cache = ImageCache(image_size)
pixels, skipped = cache.load(list(table.path))
stats = audit.image_statistics(pixels, parts=("whole", "border")).set_index(table.index)
look = pd.concat([table[["source", "label"]], sizes, stats[["whole_mean", "whole_std", "border_mean"]]], axis=1)
medians = look.groupby(["source", "label"])[["width", "height", "aspect", "whole_mean", "border_mean"]].median()
pixels_text = lambda v: "–" if pd.isna(v) else f"{v:g}"  # medians of whole pixels: 143 or 134.5, not 143.000
tables(medians.assign(width=medians.width.map(pixels_text), height=medians.height.map(pixels_text))
       .rename(columns={"width": "width (px)", "height": "height (px)", "whole_mean": "mean intensity",
                        "border_mean": "border mean intensity"}),
       "Medians per source and class: width, height and aspect ratio of the images as stored; mean intensity "
       "(0–255) of the whole image and of its border strip after resizing.", index=True)

# %% mystnb={"figure": {"caption": "Aspect ratio (width / height) of the images as stored, per class (panels) and source (colour).", "name": "fig-data-aspect"}} tags=["nbval-ignore-output"]
fig = sns.displot(look, x="aspect", hue="source", col="label", kind="hist", height=2.6, facet_kws={"sharey": False})

# %% mystnb={"figure": {"caption": "Mean pixel intensity of each image after resizing, per class (panels) and source (colour); densities normalised per source.", "name": "fig-data-intensity"}} tags=["nbval-ignore-output"]
fig = sns.displot(look, x="whole_mean", hue="source", col="label", kind="kde", height=2.6, fill=True,
                  common_norm=False, facet_kws={"sharey": False})

# %% [markdown]
# ## A sample per class
#
# Only images whose licence allows publishing them are drawn (`cxrlib.licences`: on real data,
# Kermany's CC BY 4.0 images and openly licensed ieee8023 rows; never NC, ND or unknown licences).
# A class with fewer such images shows fewer.

# %% mystnb={"figure": {"caption": "Up to four images per class whose licence allows publishing, drawn with the chapter's seed; each caption gives the class, then the image's source and licence.", "name": "fig-data-samples"}} tags=["hide-input", "nbval-ignore-output"]
picks = licences.sample_per_class(table, per_class=4, seed=seed, synthetic=record["synthetic"])
plots.image_grid([pixels[i] for i in picks], [f"{table.label.iloc[i]} · "
                 f"{licences.caption(table.iloc[i], synthetic=record['synthetic'])}" for i in picks], ncols=6);

# %% [markdown]
# ## The confound, measured
#
# How well do trivial image statistics (intensity percentiles of the whole image, of the border
# strip and of the corners, plus the original file size) predict the **source**, and the **COVID-19
# label**, with patient-grouped cross-validation? If borders and file sizes alone predict COVID-19,
# a classifier can score well without looking at the lungs.

# %% tags=["nbval-ignore-output"]
probe = audit.source_probe(table.reset_index(drop=True), pixels, sizes=sizes.reset_index(drop=True), seed=seed)
tables(audit.probe_table(probe), "How well trivial image statistics predict the source (origin) and the "
       "COVID-19 label: balanced accuracy with patient-grouped cross-validation, against chance.")

# %% tags=["hide-input", "nbval-ignore-output"]
display(Markdown(audit.probe_lines(probe)))
