"""Lung fields: an estimated mask per image, and images with the lungs (or all else) blanked.

Synthetic images are drawn inside `synthetic.lung_mask(size)`, so for them that template
is the exact lung field. Real images have no segmentation here: `lung_masks` puts the same anatomical
template (two ellipses at standard PA positions, the left one cut by the heart) on every image; with
`refine=True` it adds the dark (air-filled) region around the template, which follows wider or
shifted lungs better. Both are approximations, not segmentations: the template misses lung off its
ellipses (wide, off-centre or rotated chests; the paediatric lungs are often wider) and both include
some mediastinum, diaphragm or soft tissue. Treat lung-share and lungs-removed numbers as coarse.

The lungs-removed audit (audit.py), the lungs-removed and lung-crop remedies (images.py) and the Grad-CAM
lung share (explain.py) all take their masks from here.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import CXRError
from .synthetic import lung_mask

MASK_MODES = ("intact", "lungs_removed", "lungs_only")
NEUTRAL_GREY = 128


def lung_masks(images: np.ndarray, refine: bool = False) -> np.ndarray:
    """Lung-field masks (N, H, W) bool for uint8 images (N, H, W) of square size H == W.

    The template `synthetic.lung_mask(H)` for every image (exact for synthetic images); with
    `refine`, each grown to its image's dark lung region (see the module docstring: an estimate).
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CXRError(f"lung_masks needs square images (N, H, H), got shape {images.shape}")
    template = lung_mask(images.shape[1])
    if not refine:
        return np.repeat(template[None], len(images), axis=0)
    return np.stack([_refine(img, template) for img in images])


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut that best separates them into dark and bright."""
    hist = np.bincount(values.ravel(), minlength=256).astype(float)
    if np.count_nonzero(hist) < 2:
        return float(values.max())
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * np.arange(256))
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mean[-1] * weight - mean * weight[-1]) ** 2 / (weight * (weight[-1] - weight))
    return float(np.nanargmax(between[:-1]))


def _refine(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The template grown to the dark (air-filled) lung region around it; the template when that looks implausible.

    Lungs hold air, so inside the body they are darker than mediastinum, bone and diaphragm: Otsu's
    threshold of the smoothed image within the template widened by ~8% of the side, the largest dark
    region on each side, holes filled. The result always contains the template, so blanking it removes
    at least as much lung as the template does; a dark region over twice the template's area (the
    threshold caught the background) falls back to the template.
    """
    size = image.shape[0]
    region = ndimage.binary_dilation(template, iterations=max(1, size // 12))
    smooth = ndimage.gaussian_filter(image.astype(np.float32), size / 64)  # ribs would split the lung
    dark = region & (smooth <= _otsu(np.round(smooth[region]).astype(np.uint8)))
    if dark.sum() == region.sum():  # no contrast: nothing to separate
        return template
    dark = ndimage.binary_closing(dark, iterations=max(1, size // 32))
    dark = ndimage.binary_fill_holes(ndimage.binary_opening(dark, iterations=max(1, size // 64)))
    lungs = template.copy()
    left = np.zeros_like(dark)
    left[:, : size // 2] = True
    for side in (left, ~left):
        labels, n = ndimage.label(dark & side)
        if n:
            lungs |= labels == 1 + np.argmax(ndimage.sum(dark, labels, range(1, n + 1)))
    return lungs if lungs.sum() <= 2 * template.sum() else template


def mask_images(images: np.ndarray, masks: np.ndarray, mode: str, fill: str | int = "mean") -> np.ndarray:
    """uint8 images with the lung fields blanked (`lungs_removed`) or everything else blanked (`lungs_only`).

    Apply before normalisation. `fill="mean"` paints the blanked part with each image's own mean
    intensity (so overall brightness, which normalisation sees, barely moves and only structure is
    removed); `"grey"` paints 128; an int paints that value. `intact` returns a copy.
    """
    if mode not in MASK_MODES:
        raise CXRError(f"mask mode {mode!r}: choose one of {', '.join(MASK_MODES)}")
    images = np.asarray(images)
    masks = np.broadcast_to(np.asarray(masks, dtype=bool), images.shape)
    out = images.copy()
    if mode == "intact":
        return out
    if fill == "mean":
        values = images.reshape(len(images), -1).mean(axis=1).round()
    elif fill == "grey":
        values = np.full(len(images), NEUTRAL_GREY)
    elif isinstance(fill, (int, np.integer)) and 0 <= fill <= 255:
        values = np.full(len(images), fill)
    else:
        raise CXRError(f"parameter fill={fill!r}: use 'mean', 'grey' or an int in 0..255")
    blank = masks if mode == "lungs_removed" else ~masks
    out[blank] = np.broadcast_to(values.astype(images.dtype)[:, None, None], images.shape)[blank]
    return out
