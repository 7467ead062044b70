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
# # Error analysis, Grad-CAM and the shortcut audit
#
# The paper reports scores; its critics asked what the model gets wrong, where it looks, and whether
# it scores for the right reason. CoronaHack is the textbook case of shortcut learning: every COVID-19
# image is an adult from other hospitals, every other image a child from one hospital
# {cite:p}`degrave2021shortcuts,roberts2021pitfalls`. This chapter answers with numbers, for the run
# shown in the fine-tuning chapter (or any `run_dir`):
#
# 1. the false positives and false negatives, and the errors the model was surest of;
# 2. Grad-CAM {cite:p}`selvaraju2017gradcam` maps from ResNet's layer3 (16x finer than the input, 14x14
#    cells at 224 px), and how much of their mass lies in the lung fields, with a CI;
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
run_root = ""  # empty: runs/<profile>/<data tag> in the repository (the run matrix's folder for this data)
run_dir = ""  # empty: runs.featured_run(run_root), the 3-class focal-loss run with the extra COVID images
lungs_root = ""  # where the lungs-removed training runs are (any depth); empty: run_root
external_manifest = ""
n_cam = 12  # Grad-CAM maps shown
n_cam_share = 60  # test images whose Grad-CAM lung share is measured (a CI needs more than a handful)
seed = 0

# %% tags=["hide-input"]
import json
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from cxrlib import audit, book, data, explain, licences, lungfields, lungs_removed, plots
from cxrlib.config import banner_from_record
from cxrlib.images import ImageCache, to_batch
from cxrlib.runs import default_run_root, featured_run
from cxrlib.evaluate import evaluate, load_model

root = Path(run_root or default_run_root(profile, coronahack_dir, extra_covid_dir))
run_dir = Path(run_dir or featured_run(root) or "")  # the library's choice of the run to show
assert (run_dir / "model.pt").is_file(), f"no complete run in {root}: run `python -m cxrlib.runs` first"
model, meta = load_model(run_dir / "model.pt")
classes = list(meta["classes"])
display(book.banner(banner_from_record(run_dir)))  # what the run recorded, not this notebook's parameters
synthetic = json.loads((run_dir / "params.json").read_text())["data"]["record"]["synthetic"]
coronahack_dir = coronahack_dir or meta["config"]["coronahack_dir"]  # the data here, else where the run read it
extra_covid_dir = extra_covid_dir or meta["config"]["extra_covid_dir"]
table, report = data.load_table(coronahack_dir, extra_covid_dir)
recorded = json.loads((run_dir / "params.json").read_text())["data"]["record"]["fingerprint"]
assert data.data_fingerprint(table) == recorded, f"these data are not the run's (fingerprint {recorded})"
predictions = pd.read_csv(run_dir / "predictions.csv")
predictions["license"] = predictions.image_id.map(table.set_index("image_id").license).fillna("")
predictions["path"] = predictions.image_id.map(table.set_index("image_id").path)  # the files here, not the run machine's
shareable = licences.redistributable(predictions, synthetic=synthetic)  # images the book may show
print(f"run: {run_dir.name} ({meta['task']}, {len(predictions)} test images, {int(shareable.sum())} of them publishable)")

# %% [markdown]
# ## False positives and false negatives
#
# One row per wrong test image and per class it is an error of (a COVID-19 image called pneumonia
# is a false negative of COVID-19 and a false positive of pneumonia).

# %% tags=["nbval-check-output"]
print(f"test split of the run: {len(predictions)} images; classes {', '.join(sorted(predictions['true'].unique()))}")

# %%
errors = explain.misclassified(predictions)
errors.groupby(["class", "kind"]).size().unstack(fill_value=0) if len(errors) else "no errors"

# %% [markdown]
# ## The most confident errors, with Grad-CAM
#
# The table lists the eight errors the model was surest of; the figure shows those of them whose
# licence allows publishing the image (`cxrlib.licences`; never NC, ND or unknown licences).

# %%
worst = explain.most_confident_errors(predictions, n=8)
worst[["image_id", "source", "true", "pred", "confidence"]].round(3)

# %% mystnb={"figure": {"caption": "The publishable ones among the test images the model was surest of and wrong about, with the Grad-CAM map of the predicted class; each caption reads true \u2192 predicted (confidence), then the image's source and licence.", "name": "fig-confident-errors"}} tags=["hide-input"]
cache = ImageCache(meta["image_size"])
shown = worst[licences.redistributable(worst, synthetic=synthetic)]
if len(shown):
    shown_pixels, _ = cache.load(shown.path.tolist())
    shown_cams = explain.grad_cam(model, to_batch(shown_pixels, meta["input_spec"]))
    plots.image_grid(list(shown_pixels), [f"{r.true} → {r.pred} ({r.confidence:.2f}) · {licences.caption(r, synthetic=synthetic)}"
                                          for _, r in shown.iterrows()], ncols=4, overlays=list(shown_cams));
else:
    display(Markdown("None of these errors has an image whose licence allows publishing it."))

# %% [markdown]
# ## Where the model looks: Grad-CAM mass in the lung fields
#
# For a sample of test images per true class, the share of the Grad-CAM mass (layer3, for the
# predicted class) inside each image's lung fields, next to the lung fields' share of the image: a map
# spread evenly over the image would score exactly that area share. The intervals resample patients.

# %% tags=["hide-input"]
sample = predictions.sample(frac=1, random_state=seed).groupby("true").head(max(1, n_cam_share // len(classes)))
sample, pixels = audit.readable(sample, cache)
cams = explain.grad_cam(model, to_batch(pixels, meta["input_spec"]))
masks = lungfields.lung_masks(pixels, refine=True)
assert cams.shape == pixels.shape and cams.min() >= 0 and cams.max() <= 1
sample = sample.assign(cam_lung_share=explain.cam_lung_share(cams, masks), lung_area_share=masks.mean(axis=(1, 2)))
cells = meta["image_size"] // 16  # layer3's stride
display(Markdown(f"At this run's {meta['image_size']} px, layer3 maps have {cells}×{cells} cells. "
                 + explain.lung_share_sentence(explain.lung_share_summary(cams, masks, sample.patient_id, seed=seed))
                 + "\n\nBy true class:\n\n" + explain.lung_share_by_group(cams, masks, sample.patient_id, sample["true"], seed)))
sample.groupby("true")[["cam_lung_share", "lung_area_share"]].agg(["mean", "count"]).round(3)

# %% mystnb={"figure": {"caption": "Grad-CAM maps (layer3) of the predicted class for the publishable images of the sample; each caption reads true \u2192 predicted class, then the image's source and licence.", "name": "fig-gradcam-sample"}} tags=["hide-input"]
keep = np.flatnonzero(licences.redistributable(sample, synthetic=synthetic).to_numpy())[:n_cam]  # publishable ones
plots.image_grid([pixels[i] for i in keep],
                 [f"{r.true} → {r.pred} · {licences.caption(r, synthetic=synthetic)}" for _, r in sample.iloc[keep].iterrows()],
                 ncols=6, overlays=[cams[i] for i in keep]) if len(keep) else None;

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

# %%
probed, all_pixels = audit.readable(table[table.image_id.isin(predictions.image_id)], cache)
features = audit.backbone_features(model, all_pixels)
sizes = audit.original_sizes(probed.path)
probe = audit.source_probe(probed, all_pixels, features=features, sizes=sizes, seed=seed)
audit.probe_table(probe)

# %% [markdown]
# **Positive control.** Is the probe able to see a shortcut at all? A small marker is planted on the
# images of half the patients; the image-statistics probe must flag it, and must not flag the same
# halves without the marker. A probe that misses it is blind, and its "none" verdicts above mean nothing.

# %% tags=["hide-input"]
control = audit.positive_control(all_pixels, probed.patient_id, audit.image_statistics, seed=seed)
assert control.loc["planted", "flagged"], "the probe missed a planted marker: its verdicts cannot be trusted"
audit.probe_table(control)

# %% [markdown]
# ### 2. The model with the lungs removed, and with only the lungs
#
# The test images evaluated three ways: intact; lung fields blanked (painted with each image's mean
# intensity, leaving borders, text and collimation); everything but the lung fields blanked.
# `f1_retained` is macro-F1 relative to intact.

# %% tags=["hide-input"]
masked = audit.evaluate_masked(model, predictions, cache, task=meta["task"], seed=seed)
assert set(masked.index) == {"intact", "lungs_removed", "lungs_only"}
audit.masked_table(masked)

# %% tags=["hide-input"]
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

# %% tags=["hide-input"]
arms = lungs_removed.find_arms(lungs_root or root)
if arms.empty:
    display(Markdown(f"No lungs-removed training runs under `{Path(lungs_root or root).name}`: run "
                     "`python -m cxrlib.runs --variants lungs_removed,lungs_removed_marker` (same data) to add them."))
else:
    trained = lungs_removed.arm_table(arms)
    display(book.banner(banner_from_record(arms.run_dir.iloc[0])))  # as recorded by these runs, not this notebook
    for n, rows in arms.groupby("set"):  # one comparison per set of settings (e.g. per seed)
        display(Markdown(f"Arms trained alike: {lungs_removed.describe_settings(rows.config.iloc[0])}; each scored on "
                         "its own test split."), lungs_removed.display_table(trained[trained.set == n]))
    display(Markdown("\n\n".join(lungs_removed.verdicts(trained))))

# %% [markdown]
# ### 4. Subgroups
#
# Accuracy and COVID-19 sensitivity/specificity per source, and for ieee8023 images per view, sex
# and age band (metadata the Kermany images do not have).

# %%
audit.format_subgroups(audit.subgroup_metrics(predictions, table, "source"))

# %%
adults = table[audit.origin(table) == "ieee8023"]
pd.concat({by: audit.format_subgroups(audit.subgroup_metrics(predictions[predictions.image_id.isin(adults.image_id)],
                                                            adults, by).rename(columns={by: "group"}))
           for by in ("view", "sex", "age_band")}) if len(adults) else None

# %% [markdown]
# ### 5. External validation
#
# With `external_manifest` set to a CSV of another hospital's images (`path,label[,patient_id,...]`),
# the model is evaluated on all of them, with the operating threshold chosen on validation, and the
# COVID-19 sensitivity/specificity are reported with patient-level 95% intervals. The same is
# available from the command line: `python -m cxrlib evaluate --checkpoint RUN/model.pt --manifest CSV --out DIR`.

# %%
if external_manifest:
    external = evaluate(run_dir / "model.pt", {"manifest": external_manifest}, run_dir / "external", progress=False)
    display(audit.external_validation_summary(external).round(3))
else:
    print("no external_manifest given: external validation skipped")
