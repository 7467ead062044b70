"""explain.py: error tables, Grad-CAM on both backbones, lung masks and the masking transforms."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from cxrlib import explain, lungfields, synthetic
from cxrlib.errors import CXRError
from cxrlib.models import build_model
from cxrlib.synthetic import lung_mask


def _pred() -> pd.DataFrame:
    """Four images: two right, a covid called pneumonia (0.7) and a normal called covid (0.9)."""
    return pd.DataFrame({
        "image_id": ["a", "b", "c", "d"], "path": ["/a", "/b", "/c", "/d"],
        "patient_id": ["p1", "p2", "p3", "p3"], "source": ["ieee8023", "coronahack", "coronahack", "ieee8023"],
        "split": "test", "true": ["covid", "normal", "pneumonia", "covid"],
        "pred": ["pneumonia", "covid", "pneumonia", "covid"],
        "p_covid": [0.2, 0.9, 0.1, 0.8], "p_pneumonia": [0.7, 0.05, 0.8, 0.1], "p_normal": [0.1, 0.05, 0.1, 0.1],
    })  # fmt: skip


def test_misclassified_lists_false_negatives_and_positives_per_class():
    errors = explain.misclassified(_pred())
    got = {(r["class"], r["kind"], r["image_id"]) for _, r in errors.iterrows()}
    assert got == {
        ("covid", "false_negative", "a"), ("pneumonia", "false_positive", "a"),
        ("normal", "false_negative", "b"), ("covid", "false_positive", "b"),
    }  # fmt: skip
    fn_covid = errors[(errors["class"] == "covid") & (errors["kind"] == "false_negative")].iloc[0]
    assert fn_covid["p_class"] == pytest.approx(0.2) and fn_covid["confidence"] == pytest.approx(0.7)
    assert {"source", "patient_id"} <= set(errors.columns)


def test_most_confident_errors_orders_by_confidence():
    top = explain.most_confident_errors(_pred(), n=5)
    assert top["image_id"].tolist() == ["b", "a"]
    assert top["confidence"].tolist() == pytest.approx([0.9, 0.7])
    assert explain.most_confident_errors(_pred(), n=1)["image_id"].tolist() == ["b"]


def test_error_gallery_one_panel_per_image():
    errors = explain.most_confident_errors(_pred())
    images = [np.full((32, 32), 100, np.uint8)] * len(errors)
    fig = explain.error_gallery(errors, images, cams=[np.zeros((32, 32))] * len(errors), ncols=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("normal -> covid (0.90)")
    assert len(titles) == 2
    with pytest.raises(CXRError, match="one image per row"):
        explain.error_gallery(errors, images[:1])


@pytest.mark.parametrize("backbone,freeze", [("resnet50", "none"), ("densenet121", "none"), ("resnet50", "backbone")])
def test_grad_cam_shape_and_range(backbone, freeze):
    torch.manual_seed(0)
    model, _ = build_model(backbone, "none", num_classes=3, freeze=freeze)
    batch = torch.randn(3, 3, 64, 64)
    cams = explain.grad_cam(model, batch, target_classes=[0, 1, 2], batch_size=2)  # two chunks
    assert cams.shape == (3, 64, 64) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    for cam in cams:  # scaled per image: max 1, unless the map is all zero
        assert cam.max() == pytest.approx(1, abs=1e-3) or cam.max() == 0
    with torch.no_grad():  # as a notebook might call it; default target: the predicted class
        assert explain.grad_cam(model, batch[:1]).shape == (1, 64, 64)


def test_grad_cam_rejects_wrong_targets():
    model, _ = build_model("resnet50", "none", num_classes=2)
    with pytest.raises(CXRError, match="target classes"):
        explain.grad_cam(model, torch.zeros(2, 3, 32, 32), target_classes=[1])


def test_cam_lung_share_on_hand_made_cams():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half
    inside, uniform, zero = np.zeros((4, 4)), np.ones((4, 4)), np.zeros((4, 4))
    inside[1, 1] = 1.0
    mixed = np.zeros((4, 4))
    mixed[0, 0], mixed[0, 3] = 0.75, 0.25
    share = explain.cam_lung_share(np.stack([inside, uniform, mixed, zero]), mask)
    assert share[:3] == pytest.approx([1.0, 0.5, 0.75])  # uniform -> the mask's area share
    assert np.isnan(share[3])
    per_image = explain.cam_lung_share(np.stack([uniform, uniform]), np.stack([mask, ~mask & False]))
    assert per_image == pytest.approx([0.5, 0.0])
    with pytest.raises(CXRError, match="same size"):
        explain.cam_lung_share(np.stack([uniform]), np.zeros((8, 8), bool))


def test_lung_masks_template_and_refinement():
    template = lung_mask(64)
    wide = ndimage.binary_dilation(template, iterations=4)  # lungs wider than the template
    images = np.full((2, 64, 64), 200, np.uint8)
    images[0][wide] = 40
    masks = lungfields.lung_masks(images)
    assert masks.shape == (2, 64, 64) and masks.dtype == bool
    assert (masks == template).all()
    refined = lungfields.lung_masks(images, refine=True)
    assert (refined[0] >= template).all()  # grows the template, never shrinks it
    assert (refined[0] & wide).sum() > 0.9 * wide.sum() and refined[0].sum() < 1.1 * wide.sum()
    assert (refined[1] == template).all()  # no dark lungs to find: the template
    with pytest.raises(CXRError, match="square"):
        lungfields.lung_masks(np.zeros((1, 32, 48), np.uint8))


def test_masking_transforms_blank_inside_or_outside_the_lungs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    masks = lungfields.lung_masks(images)
    removed = lungfields.mask_images(images, masks, "lungs_removed")
    only = lungfields.mask_images(images, masks, "lungs_only", fill="grey")
    for i in range(3):
        inside, outside = masks[i], ~masks[i]
        assert removed[i][inside].std() == 0 and (removed[i][outside] == images[i][outside]).all()
        assert removed[i][inside][0] == round(images[i].mean())  # fill: the image's own mean
        assert (only[i][outside] == 128).all() and (only[i][inside] == images[i][inside]).all()
    assert removed.shape == images.shape and removed.dtype == np.uint8
    assert (lungfields.mask_images(images, masks, "intact") == images).all()
    with pytest.raises(CXRError, match="mask mode"):
        lungfields.mask_images(images, masks, "lungs")
    with pytest.raises(CXRError, match="fill"):
        lungfields.mask_images(images, masks, "lungs_only", fill=300)


def test_grad_cam_from_layer3_resolves_what_layer4_cannot():
    """At 32 px layer4 is 1x1 (every map flat, 0); layer3 is 2x2 and still has a shape. At 64 px layer3's
    maps have 4x4 cells where layer4's have 2x2."""
    torch.manual_seed(0)
    model, _ = build_model("resnet50", "none", num_classes=2)
    assert explain.cam_layer(model) is model.layer3[-1] and explain.cam_layer(model, "layer4") is model.layer4[-1]
    small = torch.randn(4, 3, 32, 32)
    assert np.all(explain.grad_cam(model, small, [0] * 4, layer="layer4") == 0)
    assert np.ptp(explain.grad_cam(model, small, [0] * 4), axis=(1, 2)).min() > 0.1  # (class 1 of this random net: all 0)
    fine, coarse = (explain.grad_cam(model, torch.randn(2, 3, 64, 64), [1, 1], layer=layer) for layer in ("layer3", "layer4"))
    assert fine.shape == coarse.shape == (2, 64, 64)
    densenet, _ = build_model("densenet121", "none", num_classes=2)
    assert explain.cam_layer(densenet) is densenet.features.denseblock3
    with pytest.raises(CXRError, match="layer5"):
        explain.cam_layer(model, "layer5")


def test_lung_share_summary_knows_maps_inside_even_and_outside_the_lungs():
    """Maps on synthetic chest images whose answer is known: all mass in the per-image lung mask, evenly spread,
    all outside. The CI of the difference from the area share says which, patients resampled together."""
    rng = np.random.default_rng(0)
    pixels = np.stack([synthetic.chest_image(rng, "normal", synthetic._patient(rng, "normal", adult=bool(i % 2)))
                       for i in range(12)])
    masks = lungfields.lung_masks(pixels, refine=True)
    patients = np.repeat(np.arange(6), 2)
    blur = rng.uniform(0.5, 1.0, pixels.shape)  # uneven maps, so the shares are means of something
    inside = explain.lung_share_summary(masks * blur, masks, patients, n_boot=200)
    even = explain.lung_share_summary(np.ones(pixels.shape), masks, patients, n_boot=200)
    outside = explain.lung_share_summary(~masks * blur, masks, patients, n_boot=200)
    assert inside["cam_lung_share"] == pytest.approx(1) and outside["cam_lung_share"] == pytest.approx(0)
    assert even["cam_lung_share"] == pytest.approx(even["lung_area_share"]) == pytest.approx(masks.mean())
    assert inside["difference_ci"][0] > 0 and outside["difference_ci"][1] < 0
    assert inside["n"] == 12 and inside["n_patients"] == 6 and inside["lung_area_share_ci"][0] < masks.mean()
    assert "favour the lungs" in explain.lung_share_sentence(inside)
    assert "no different" in explain.lung_share_sentence(even)
    assert "outside the lungs" in explain.lung_share_sentence(outside)
    flat = explain.lung_share_summary(np.concatenate([masks * blur, np.zeros((1, *pixels.shape[1:]))]),
                                      np.concatenate([masks, masks[:1]]), [*patients, 9], n_boot=50)
    assert flat["n_flat"] == 1 and "1 all-zero map(s) left out" in explain.lung_share_sentence(flat)
    with pytest.raises(CXRError, match="all zero"):
        explain.lung_share_summary(np.zeros(pixels.shape), masks, patients)


def test_lung_share_by_group_shows_a_class_whose_maps_sit_outside_the_lungs():
    """A pooled verdict can favour the lungs while one class's maps lie outside them: each group gets its own."""
    rng = np.random.default_rng(1)
    pixels = np.stack([synthetic.chest_image(rng, "normal", synthetic._patient(rng, "normal", adult=bool(i % 2)))
                       for i in range(16)])
    masks = lungfields.lung_masks(pixels, refine=True)
    labels = np.array(["covid"] * 4 + ["normal"] * 12)
    cams = np.where((labels == "covid")[:, None, None], ~masks, masks) * rng.uniform(0.5, 1.0, pixels.shape)
    cams[-1] = 0  # one all-zero map among the normals
    patients = np.arange(16)
    assert "favour the lungs" in explain.lung_share_sentence(explain.lung_share_summary(cams, masks, patients))
    text = explain.lung_share_by_group(cams, masks, patients, labels)
    covid, normal = text.split("\n")
    assert covid.startswith("- **COVID-19**") and "outside the lungs" in covid
    assert normal.startswith("- **normal**") and "favour the lungs" in normal and "1 all-zero" in normal


def _run_metrics(pred: pd.DataFrame, classes: list[str]) -> dict:
    from cxrlib.metrics import compute_metrics, majority_baseline

    m = compute_metrics(pred, classes, n_boot=200, seed=0, threshold=0.5)
    m["majority_baseline"] = majority_baseline(pred["true"], pred["true"], classes)
    m["threshold_selection"] = {"target_sensitivity": 0.95, "threshold": 0.5, "chosen_on": "val"}
    return m


def _three_class(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    true = rng.choice(["covid", "pneumonia", "normal"], n, p=[0.2, 0.5, 0.3])
    p = rng.dirichlet(np.ones(3), n) + np.c_[true == "covid", true == "pneumonia", true == "normal"] * 0.8
    p = p / p.sum(axis=1, keepdims=True)
    names = np.array(["covid", "pneumonia", "normal"])
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                         "true": true, "pred": names[p.argmax(axis=1)], "p_covid": p[:, 0], "p_pneumonia": p[:, 1],
                         "p_normal": p[:, 2]})


def test_covid_auc_is_sklearns_with_the_runs_patient_bootstrap():
    from sklearn.metrics import roc_auc_score

    pred = _three_class()
    value, ci = explain.covid_auc(pred, n_boot=200, seed=0)
    assert value == pytest.approx(roc_auc_score(pred["true"] == "covid", pred["p_covid"]))
    assert ci[0] <= value <= ci[1] and explain.covid_auc(pred, n_boot=200, seed=0) == (value, ci)
    assert explain.covid_auc(pred[pred["true"] != "covid"]) == (None, None)
    with pytest.raises(CXRError, match="p_covid"):
        explain.covid_auc(pred.drop(columns="p_covid"))


def test_headline_table_reads_intervals_names_the_macro_auc_and_adds_covid_vs_rest():
    pred = _three_class()
    m = _run_metrics(pred, ["covid", "pneumonia", "normal"])
    table = explain.headline_table(m, pred)
    assert table.columns.tolist() == ["metric", "value (95% CI)"]
    cells = dict(zip(table["metric"], table["value (95% CI)"]))
    macro = next(k for k in cells if "macro one-vs-rest" in k)
    assert cells[macro].startswith(f"{m['roc_auc']:.3f} (")
    assert cells["ROC AUC, COVID-19 vs the rest"].startswith(f"{m['roc_auc_per_class']['covid']:.3f} (")
    text = " ".join(table.astype(str).to_numpy().ravel())
    assert re.search(r"\d\.\d{3} \(\d\.\d{3}–\d\.\d{3}\)", text) and "nan" not in text.lower() and "[" not in text
    assert not re.search(r"\d\.\d{4}", text)  # 3 decimals, never 16 digits
    no_covid = pred[pred["true"] != "covid"]
    m2 = _run_metrics(no_covid, ["covid", "pneumonia", "normal"])
    cells2 = dict(explain.headline_table(m2, no_covid).to_numpy())
    assert cells2["COVID-19 sensitivity (recall)"] == "– (no COVID-19 image in the test split)"
    assert cells2["ROC AUC, COVID-19 vs the rest"].startswith("– (")


def test_class_table_and_threshold_sentence():
    pred = _three_class()
    pred.loc[pred["pred"] == "normal", "pred"] = "pneumonia"  # normal never predicted: precision undefined
    m = _run_metrics(pred, ["covid", "pneumonia", "normal"])
    table = explain.class_table(m).set_index("class")
    assert table.loc["normal", "precision (95% CI)"] == "– (never predicted)"
    assert table.loc["COVID-19", "test images"] == (pred["true"] == "covid").sum()
    assert re.fullmatch(r"\d\.\d{3} \(\d\.\d{3}–\d\.\d{3}\)", table.loc["COVID-19", "recall = sensitivity (95% CI)"])
    said = explain.threshold_sentence(m)
    assert "p(COVID-19) ≥ 0.500" in said and "at least 0.95" in said and "sensitivity" in said
    assert "no COVID-19 operating point" in explain.threshold_sentence({})


def test_cam_examples_put_covid_found_and_missed_first_and_only_publishable_images():
    pred = _three_class(80)
    ok = pd.Series(True, index=pred.index)
    chosen = explain.cam_examples(pred, ok, n=6, seed=0)
    assert len(chosen) == 6 and chosen["true"].iloc[0] == "covid" and chosen["outcome"].iloc[0] == "found"
    if ((pred["true"] == "covid") & (pred["pred"] != "covid")).any():
        assert chosen["outcome"].iloc[1] == "missed"
    assert set(chosen["outcome"]) <= {"found", "missed", "right", "wrong"}
    is_covid = (chosen["true"] == "covid").to_numpy()
    assert is_covid[: is_covid.sum()].all()  # every COVID-19 image before the others
    assert (chosen["p_pred"] > 0).all()
    hidden = pred["true"] == "covid"
    none_covid = explain.cam_examples(pred, ~hidden, n=6)
    assert not (none_covid["true"] == "covid").any() and len(none_covid) == 6
    note = explain.publishable_note(pred.assign(license="CC BY-NC-SA 4.0"), ~hidden)
    assert note.startswith(f"0 of the {hidden.sum()} COVID-19 test images") and "CC BY-NC-SA 4.0" in note
    assert explain.cam_examples(pred, pd.Series(False, index=pred.index)).empty
