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
# # Error analysis, Grad-CAM and the shortcut audit
#
# The paper reports scores; its critics asked what the model gets wrong, where it looks, and whether
# it scores for the right reason. CoronaHack is the textbook case of shortcut learning: every COVID-19
# image is an adult from other hospitals, every other image a child from one hospital
# {cite:p}`degrave2021shortcuts,roberts2021pitfalls`. This chapter answers with numbers, for the run
# shown in the fine-tuning chapter (or any `run_dir`):
#
# 1. the false positives and false negatives, and the errors the model was surest of;
# 2. Grad-CAM {cite:p}`selvaraju2017gradcam` maps from ResNet's layer3 (16x coarser than the input: 14x14
#    cells at 224 px, 4x4 at 64 px), and how much of their mass lies in the lung fields, with a CI;
# 3. the shortcut audit: can the data **source** be predicted from trivial image statistics or from
#    the model's own features? How does the model score with the **lungs removed**, or with only the
#    lungs left? And does a model **trained** without lungs still tell COVID-19 apart?
# 4. subgroups (source, view, sex, age) and, when a manifest of another hospital's images is given,
#    external validation.
#
# *Lung fields* here are estimated per image: an anatomical template (two ellipses at standard PA
# positions; exact for the synthetic images, which are drawn inside it) grown to the image's dark
# air-filled region. An estimate, not a segmentation.

# %% tags=["parameters"]
profile = "quick"
coronahack_dir = ""
extra_covid_dir = ""
run_root = ""  # empty: the folder of run_dir when given, else runs/<profile>/<data tag> in the repository (the matrix's)
run_dir = ""  # empty: book.featured_run(run_root), the 3-class focal-loss run with the extra COVID images
lungs_root = ""  # where the lungs-removed training runs are (any depth); empty: run_root
external_manifest = ""
n_cam = 6  # Grad-CAM examples shown (true COVID-19 first), each panel at least 2.5 in wide
n_cam_share = 60  # test images whose Grad-CAM lung share is measured (a CI needs more than a handful)
analysis_seed = 0  # the Grad-CAM sample, bootstraps and probes; not a training seed (the run recorded its own)

# %% tags=["hide-input", "nbval-ignore-output"]
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from cxrlib import audit, book, data, explain, licences, lungfields, lungs_removed, plots
from cxrlib.evaluate import evaluate, load_model
from cxrlib.images import ImageCache, to_batch
from cxrlib.results import fmt_ci
from cxrlib.rundir import Run

tables = book.Tables(4)
words = plots.class_words  # "COVID-19", "not COVID-19", "pneumonia", "normal"

# a given run_dir's own folder is the run root (its lungs-removed arms are next to it), else the matrix's for this data
root = Path(run_root or (Path(run_dir).parent if run_dir else book.default_run_root(profile, coronahack_dir, extra_covid_dir)))
run_dir = Path(run_dir or book.featured_run(root) or "")  # the library's choice of the run to show
assert (run_dir / "model.pt").is_file(), f"no complete run in {root}: run `python -m cxrlib.runs` first"
model, meta = load_model(run_dir / "model.pt")
classes = list(meta["classes"])
display(book.banner(book.banner_from_record(run_dir)))  # what the run recorded, not this notebook's parameters
record = Run(run_dir)
synthetic = record.data["record"]["synthetic"]
coronahack_dir = coronahack_dir or meta["config"]["coronahack_dir"]  # the data here, else where the run read it
extra_covid_dir = extra_covid_dir or meta["config"]["extra_covid_dir"]
table, report = data.load_table(coronahack_dir, extra_covid_dir)
recorded = record.data["record"]["fingerprint"]
assert data.data_fingerprint(table) == recorded, f"these data are not the run's (fingerprint {recorded})"
predictions = record.predictions()
predictions["license"] = predictions.image_id.map(table.set_index("image_id").license).fillna("")
predictions["path"] = predictions.image_id.map(table.set_index("image_id").path)  # the files here, not the run machine's
shareable = licences.redistributable(predictions, synthetic=synthetic)  # images the book may show
display(Markdown(f"Run `{run_dir.name}` ({meta['task']} task): {len(predictions)} test images, "
                 f"{int(shareable.sum())} of them with a licence that allows publishing them."))

# %% [markdown]
# ## False positives and false negatives
#
# One row per wrong test image and per class it is an error of (a COVID-19 image called pneumonia
# is a false negative of COVID-19 and a false positive of pneumonia).

# %% tags=["nbval-check-output"]
print(f"test split of the run: {len(predictions)} images of {predictions.patient_id.nunique()} patients; "
      f"classes {', '.join(words(c) for c in sorted(predictions['true'].unique()))}")

# %% tags=["nbval-ignore-output"]
errors = explain.misclassified(predictions)
counts = errors.groupby(["class", "kind"]).size().unstack(fill_value=0) if len(errors) else pd.DataFrame()
counts = counts.reindex(index=classes, columns=["false_negative", "false_positive"], fill_value=0)
tables(pd.DataFrame({"class": [words(c) for c in counts.index],
                     "false negatives (images of the class called something else)": counts["false_negative"].to_numpy(),
                     "false positives (other images called the class)": counts["false_positive"].to_numpy()}),
       f"Errors per class on the {len(predictions)} test images ({len(errors) // 2} wrong images).")

# %% [markdown]
# ## The most confident errors, with Grad-CAM
#
# The table lists the eight errors the model was surest of; the figure shows those of them whose
# licence allows publishing the image (`cxrlib.licences`; never NC, ND or unknown licences).

# %% tags=["nbval-ignore-output"]
worst = explain.most_confident_errors(predictions, n=8)
tables(pd.DataFrame({"image": worst.image_id, "source": worst.source, "true class": worst["true"].map(words),
                     "predicted class": worst["pred"].map(words),
                     "probability of the predicted class": worst.confidence,
                     "may be published": licences.redistributable(worst, synthetic=synthetic)}),
       "The test errors the model was surest of.", empty="The model made no error on the test split.")

# %% mystnb={"figure": {"caption": "The publishable ones among the test images the model was surest of and wrong about, with the Grad-CAM map (layer3) of the predicted class over each image; each caption reads true \u2192 predicted class (the model's probability for it; \"map all zero\" where Grad-CAM gives no weight anywhere), then the image's source and licence.", "name": "fig-confident-errors"}} tags=["hide-input", "nbval-ignore-output"]
cache = ImageCache(meta["image_size"])
shown = worst[licences.redistributable(worst, synthetic=synthetic)]
if len(shown):
    shown_pixels, _ = cache.load(shown.path.tolist())
    shown_cams = explain.grad_cam(model, to_batch(shown_pixels, meta["input_spec"]))
    plots.image_grid(list(shown_pixels), [f"true {words(r.true)} → {words(r.pred)} ({r.confidence:.3f})"
                                          f"{'; map all zero' if cam.max() == 0 else ''}\n"
                                          f"{licences.caption(r, synthetic=synthetic)}"
                                          for (_, r), cam in zip(shown.iterrows(), shown_cams)],
                     ncols=3, overlays=list(shown_cams));
else:
    display(Markdown("None of these errors has an image whose licence allows publishing it."))

# %% [markdown]
# ## Where the model looks: Grad-CAM mass in the lung fields
#
# For a sample of test images per true class, the share of the Grad-CAM mass (layer3, for the
# predicted class) inside each image's lung fields, next to the lung fields' share of the image: a map
# spread evenly over the image would score exactly that area share. The intervals resample patients.

# %% tags=["hide-input", "nbval-ignore-output"]
sample = predictions.sample(frac=1, random_state=analysis_seed).groupby("true").head(max(1, n_cam_share // len(classes)))
sample, pixels = audit.readable(sample, cache)
cams = explain.grad_cam(model, to_batch(pixels, meta["input_spec"]))
masks = lungfields.lung_masks(pixels, refine=True)
assert cams.shape == pixels.shape and cams.min() >= 0 and cams.max() <= 1
sample = sample.assign(cam_lung_share=explain.cam_lung_share(cams, masks), lung_area_share=masks.mean(axis=(1, 2)))
cells = meta["image_size"] // 16  # layer3's stride
display(Markdown(f"At this run's {meta['image_size']} px, layer3 maps have {cells}×{cells} cells. "
                 + explain.lung_share_sentence(explain.lung_share_summary(cams, masks, sample.patient_id, seed=analysis_seed))
                 + "\n\nBy true class:\n\n" + explain.lung_share_by_group(cams, masks, sample.patient_id, sample["true"], analysis_seed)))
share = sample.groupby("true").agg(images=("cam_lung_share", "size"), maps=("cam_lung_share", "count"),
                                   cam=("cam_lung_share", "mean"), area=("lung_area_share", "mean"))
tables(pd.DataFrame({"true class": share.index.map(words), "images": share.images.to_numpy(),
                     "maps not all zero": share.maps.to_numpy(),
                     "mean share of the Grad-CAM mass inside the lungs": share.cam.to_numpy(),
                     "mean share of the image the lungs cover": share.area.to_numpy()}),
       "Where the Grad-CAM maps of the sample lie, by true class (an all-zero map has no share and is left out).")

# %% [markdown]
# ### Grad-CAM examples, COVID-19 first
#
# The maps the paper's question turns on are those of COVID-19 images: below, the publishable test
# images of true COVID-19 the model found and those it missed, then the other classes, right and wrong.
# Only images whose licence allows redistribution are shown (`cxrlib.licences`); the others are
# measured above but never drawn.

# %% tags=["hide-input", "nbval-ignore-output"]
examples = explain.cam_examples(predictions, shareable, n=n_cam, seed=analysis_seed)
display(Markdown(explain.publishable_note(predictions, shareable)
                 + (" None of them can be shown here, so the figure has no COVID-19 image."
                    if not (examples["true"] == "covid").any() and (predictions["true"] == "covid").any() else "")))

# %% mystnb={"figure": {"caption": "Grad-CAM maps (layer3) of the predicted class over publishable test images, true COVID-19 first (found and missed, where the test split has publishable ones), then the other classes right and wrong; each caption reads true \u2192 predicted class (the model's probability for it) and the outcome (\"map all zero\" where Grad-CAM gives no weight anywhere), then the image's source and licence.", "name": "fig-gradcam-sample"}} tags=["hide-input", "nbval-ignore-output"]
if len(examples):
    example_pixels, _ = cache.load(examples.path.tolist())
    example_cams = explain.grad_cam(model, to_batch(example_pixels, meta["input_spec"]))
    plots.image_grid(list(example_pixels),
                     [f"true {words(r.true)} → {words(r.pred)} ({r.p_pred:.3f}), {r.outcome}"
                      f"{'; map all zero' if cam.max() == 0 else ''}\n{licences.caption(r, synthetic=synthetic)}"
                      for (_, r), cam in zip(examples.iterrows(), example_cams)],
                     ncols=3, overlays=list(example_cams));
else:
    display(Markdown("No test image of this run may be published, so no Grad-CAM example is shown."))

# %% [markdown]
# ## The shortcut audit
#
# ### 1. Can the source be read off the pixels?
#
# Logistic-regression probes with patient-grouped cross-validation on the test split's images (never
# trained on; the model's features of every image would take hours on a CPU):
# trivial image statistics (intensity percentiles of the whole image, the border strip and the
# corners, plus the original file size) and the model's own pooled features predicting the **source**
# (Kermany children vs ieee8023 adults); and border/corner statistics alone predicting **COVID-19**.
# Rule: balanced accuracy ≥ 0.80 (or ≥ chance + 0.30) flags a shortcut.

# %% tags=["nbval-ignore-output"]
probed, all_pixels = audit.readable(table[table.image_id.isin(predictions.image_id)], cache)
features = audit.backbone_features(model, all_pixels)
sizes = audit.original_sizes(probed.path)
probe = audit.source_probe(probed, all_pixels, features=features, sizes=sizes, seed=analysis_seed)
tables(audit.probe_table(probe), "What the probes read off the test images: balanced accuracy with its 95% interval "
       "(patient-grouped cross-validation), chance, and the permutation p-value.")

# %% [markdown]
# **Positive control.** Is the probe able to see a shortcut at all? A small marker is planted on the
# images of half the patients; the image-statistics probe must flag it, and must not flag the same
# halves without the marker. A probe that misses it is blind, and its "none" verdicts above mean nothing.

# %% tags=["hide-input", "nbval-ignore-output"]
control = audit.positive_control(all_pixels, probed.patient_id, audit.image_statistics, seed=analysis_seed)
assert control.loc["planted", "flagged"], "the probe missed a planted marker: its verdicts cannot be trusted"
tables(audit.probe_table(control), "Positive control of the image-statistics probe: the same images with and "
       "without a planted marker.", index=True)

# %% [markdown]
# ### 2. The model with the lungs removed, and with only the lungs
#
# The test images evaluated three ways: intact; lung fields blanked (painted with each image's mean
# intensity, leaving borders, text and collimation); everything but the lung fields blanked.
# `f1_retained` is macro-F1 relative to intact.

# %% tags=["hide-input", "nbval-ignore-output"]
masked = audit.evaluate_masked(model, predictions, cache, task=meta["task"], seed=analysis_seed)
assert set(masked.index) == {"intact", "lungs_removed", "lungs_only"}
macro = meta["task"] != "binary"  # a 3-class "ROC AUC" is the mean of three one-vs-rest AUCs
tables(audit.masked_table(masked).rename(columns={"ROC AUC": "ROC AUC (macro one-vs-rest)"} if macro else {}),
       "The run's model on its test images shown three ways (95% patient-bootstrap intervals); the majority class's "
       "macro-F1 is the score of always giving one answer.")

# %% tags=["hide-input", "nbval-ignore-output"]
display(Markdown(audit.conclusion(probe, masked)))

# %% [markdown]
# ### 3. A model trained without lungs, and its positive control
#
# Blanking the lungs of a model trained on whole images shows it images unlike any it learned from. The
# cleaner test trains on lungs-removed images: the same run, identical but for `preprocess`, once intact,
# once with every image's estimated lung fields painted grey in train, validation and test
# (`lungs_removed`), and once more with, in addition, a marker planted on every COVID-19 image
# (`lungs_removed_marker`, the positive control). The control must find its marker: that shows a model
# *can* learn from lungs-removed images here, so a low score of the plain arm is not a broken pipeline.
# A plain arm far above the majority baseline learned something outside the lung fields. The arms are
# matched by what the runs recorded (`cxrlib.lungs_removed`); they come from
# `python -m cxrlib.runs --variants lungs_removed,lungs_removed_marker` or three `python -m cxrlib train
# --preprocess ...` runs.

# %% tags=["hide-input", "nbval-ignore-output"]
arms = lungs_removed.find_arms(lungs_root or root)
if arms.empty:
    display(Markdown(f"No lungs-removed training runs under `{Path(lungs_root or root).name}`: run "
                     "`python -m cxrlib.runs --variants lungs_removed,lungs_removed_marker` (same data) to add them."))
else:
    trained = lungs_removed.arm_table(arms)
    display(book.banner(book.banner_from_record(arms.run_dir.iloc[0])))  # as recorded by these runs, not this notebook
    for n, rows in arms.groupby("set"):  # one comparison per set of settings (e.g. per seed)
        macro = rows.config.iloc[0]["task"] != "binary"  # a 3-class "ROC AUC" is the mean of three one-vs-rest AUCs
        display(tables(lungs_removed.display_table(trained[trained.set == n]).rename(
                           columns={"ROC AUC (95% CI)": "ROC AUC, macro one-vs-rest (95% CI)",
                                    "AUC − intact (paired 95% CI)": "macro AUC − intact (paired 95% CI)"} if macro else {}),
                       f"Arms trained alike: {lungs_removed.describe_settings(rows.config.iloc[0])}; each scored on "
                       "its own test split (95% patient-bootstrap intervals).", index=True))
    display(Markdown("\n\n".join(lungs_removed.verdicts(trained))))

# %% [markdown]
# ### 4. Subgroups
#
# Accuracy and COVID-19 sensitivity/specificity per source, and for ieee8023 images per view, sex
# and age band (metadata the Kermany images do not have).

# %% tags=["nbval-ignore-output"]
SUBGROUP_COLUMNS = {"n": "test images", "accuracy": "accuracy (Wilson 95% CI), images",
                    "covid_sensitivity": "COVID-19 sensitivity (Wilson 95% CI), images",
                    "covid_specificity": "COVID-19 specificity (Wilson 95% CI), images"}
tables(audit.format_subgroups(audit.subgroup_metrics(predictions, table, "source")).rename(columns=SUBGROUP_COLUMNS),
       "Test metrics per source (intervals count images, not patients: read them as a lower bound on the uncertainty).")

# %% tags=["nbval-ignore-output"]
adults = table[audit.origin(table) == "ieee8023"]
BY_WORDS = {"view": "view", "sex": "sex", "age_band": "age band"}
by_group = pd.concat([audit.format_subgroups(audit.subgroup_metrics(predictions[predictions.image_id.isin(adults.image_id)],
                                                                    adults, by).rename(columns={by: "group"}))
                      .assign(**{"grouped by": BY_WORDS[by]}) for by in BY_WORDS]) if len(adults) else pd.DataFrame()
tables(by_group[["grouped by", *[c for c in by_group.columns if c != "grouped by"]]].rename(columns=SUBGROUP_COLUMNS)
       if len(by_group) else by_group,
       "Test metrics of the ieee8023 (adult) images per view, sex and age band.",
       empty="The test split holds no ieee8023 image.")

# %% [markdown]
# ### 5. External validation
#
# With `external_manifest` set to a CSV of another hospital's images (`path,label[,patient_id,...]`),
# the model is evaluated on all of them, with the operating threshold chosen on validation, and the
# COVID-19 sensitivity/specificity are reported with patient-level 95% intervals. The same is
# available from the command line: `python -m cxrlib evaluate --checkpoint RUN/model.pt --manifest CSV --out DIR`.

# %% tags=["nbval-ignore-output"]
if external_manifest:
    external = evaluate(run_dir / "model.pt", {"manifest": external_manifest}, run_dir / "external", progress=False)
    summary = audit.external_validation_summary(external)
    display(tables(pd.DataFrame({"metric": summary.index.map({"covid_sensitivity": "COVID-19 sensitivity",
                                                              "covid_specificity": "COVID-19 specificity"}),
                                 "value (95% CI)": [fmt_ci(r.value, (r.ci_low, r.ci_high)) for r in summary.itertuples()],
                                 "images": summary.n_images.to_numpy()}),
                   f"External validation on `{Path(external_manifest).name}` at the threshold chosen on validation "
                   "(95% patient-bootstrap intervals)."))
else:
    print("no external_manifest given: external validation skipped")
