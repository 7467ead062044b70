"""explain.py: error tables, Grad-CAM on both backbones, lung masks and the masking transforms."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from cxrlib import explain
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
    masks = explain.lung_masks(images)
    assert masks.shape == (2, 64, 64) and masks.dtype == bool
    assert (masks == template).all()
    refined = explain.lung_masks(images, refine=True)
    assert (refined[0] >= template).all()  # grows the template, never shrinks it
    assert (refined[0] & wide).sum() > 0.9 * wide.sum() and refined[0].sum() < 1.1 * wide.sum()
    assert (refined[1] == template).all()  # no dark lungs to find: the template
    with pytest.raises(CXRError, match="square"):
        explain.lung_masks(np.zeros((1, 32, 48), np.uint8))


def test_masking_transforms_blank_inside_or_outside_the_lungs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    masks = explain.lung_masks(images)
    removed = explain.mask_images(images, masks, "lungs_removed")
    only = explain.mask_images(images, masks, "lungs_only", fill="grey")
    for i in range(3):
        inside, outside = masks[i], ~masks[i]
        assert removed[i][inside].std() == 0 and (removed[i][outside] == images[i][outside]).all()
        assert removed[i][inside][0] == round(images[i].mean())  # fill: the image's own mean
        assert (only[i][outside] == 128).all() and (only[i][inside] == images[i][inside]).all()
    assert removed.shape == images.shape and removed.dtype == np.uint8
    assert (explain.mask_images(images, masks, "intact") == images).all()
    with pytest.raises(CXRError, match="mask mode"):
        explain.mask_images(images, masks, "lungs")
    with pytest.raises(CXRError, match="fill"):
        explain.mask_images(images, masks, "lungs_only", fill=300)
