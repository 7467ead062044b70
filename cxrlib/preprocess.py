"""RunConfig.preprocess: the image-level remedies for source shortcuts and the lung experiments' controls.

Each remedy maps a decoded uint8 image to another before resizing (`PREPROCESSORS`), cached in a store of its
own (`PreprocessedCache`), so training, evaluation and prediction see identical pixels. The controls plant a
marker on every COVID-19 image by label (`MarkerCache.mark`, called by images.CXRDataset): after
`lungs_removed` (the model must find it) or before `lungs_only` (the painting must remove it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import CXRError
from .images import ImageCache, _decode_bytes, decode_image, resize_square
from .lungfields import NEUTRAL_GREY, lung_masks

CLAHE_TILES = 8  # tiles per side
CLAHE_CLIP = 0.01  # histogram cap per tile, as a share of the tile's pixels (excess spread evenly)
LUNG_CROP_SIZE = 128  # the lung field is estimated at this size
LUNG_CROP_MARGIN = 0.05  # of the side, around the lung fields' bounding box
LUNGS_REMOVED_MARGIN = 3  # pixels at LUNG_CROP_SIZE by which lungs_removed grows the mask (edges, blur)


def clahe(img: np.ndarray, tiles: int = CLAHE_TILES, clip: float = CLAHE_CLIP) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 (H, W) image (Zuiderveld 1994).

    Each tile's clipped histogram gives an intensity map; each pixel blends the maps of its four nearest
    tile centres (bilinear). Equalising every image this way removes much of what differs between
    scanners and their processing (brightness, contrast, gamma) while keeping local structure.
    """
    img = np.asarray(img, np.uint8)
    h, w = img.shape
    ys, xs = (np.linspace(0, n, tiles + 1).round().astype(int) for n in (h, w))
    maps = np.empty((tiles, tiles, 256))
    for i in range(tiles):
        for j in range(tiles):
            hist = np.bincount(img[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].ravel(), minlength=256).astype(float)
            cap = max(1.0, clip * hist.sum())
            hist = np.minimum(hist, cap) + (hist - np.minimum(hist, cap)).sum() / 256
            maps[i, j] = 255 * np.cumsum(hist) / max(hist.sum(), 1)
    fy = np.interp(np.arange(h) + 0.5, (ys[:-1] + ys[1:]) / 2, np.arange(tiles))
    fx = np.interp(np.arange(w) + 0.5, (xs[:-1] + xs[1:]) / 2, np.arange(tiles))
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    yy, xx, v = y0[:, None], x0[None, :], img
    out = ((1 - wy) * (1 - wx) * maps[yy, xx, v] + (1 - wy) * wx * maps[yy, x1[None, :], v]
           + wy * (1 - wx) * maps[y1[:, None], xx, v] + wy * wx * maps[y1[:, None], x1[None, :], v])
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def lung_crop(img: np.ndarray) -> np.ndarray:
    """The image cropped to its estimated lung fields (lungfields.lung_masks, refined) plus a small margin.

    Cuts away borders, corners, neck and abdomen, where markers, text and collimation edges sit.
    """
    img = np.asarray(img, np.uint8)
    h, w = img.shape
    mask = lung_masks(resize_square(img, LUNG_CROP_SIZE)[None], refine=True)[0]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    pad = LUNG_CROP_MARGIN * LUNG_CROP_SIZE
    top, bottom = max(0.0, rows[0] - pad), min(LUNG_CROP_SIZE, rows[-1] + 1 + pad)
    left, right = max(0.0, cols[0] - pad), min(LUNG_CROP_SIZE, cols[-1] + 1 + pad)
    sy, sx = h / LUNG_CROP_SIZE, w / LUNG_CROP_SIZE
    return img[int(top * sy):max(int(top * sy) + 1, round(bottom * sy)),
               int(left * sx):max(int(left * sx) + 1, round(right * sx))]  # fmt: skip


def _lung_field(img: np.ndarray) -> np.ndarray:
    """The (H, W) lung-field mask of a uint8 image: lungfields.lung_masks (refined) at LUNG_CROP_SIZE, grown by
    LUNGS_REMOVED_MARGIN pixels there (lung edges and blur count as lung), scaled back to the image."""
    h, w = img.shape
    mask = lung_masks(resize_square(img, LUNG_CROP_SIZE)[None], refine=True)[0]
    mask = ndimage.binary_dilation(mask, iterations=LUNGS_REMOVED_MARGIN)
    return mask[np.ix_(np.arange(h) * LUNG_CROP_SIZE // h, np.arange(w) * LUNG_CROP_SIZE // w)]


def lungs_removed(img: np.ndarray) -> np.ndarray:
    """The image with its estimated lung fields (`_lung_field`) painted grey.

    A model trained and tested on such images can only use what lies outside the lungs (age, body habitus,
    markers, scanner processing); how well it still separates the classes measures those shortcuts.
    """
    img = np.asarray(img, np.uint8)
    return np.where(_lung_field(img), np.uint8(NEUTRAL_GREY), img)


def lungs_only(img: np.ndarray) -> np.ndarray:
    """The mirror of `lungs_removed`: everything outside the estimated lung fields painted grey.

    The remedy for shortcuts outside the lungs (markers, text, collimation, body habitus, the child's shape): a
    model trained and tested on such images sees the lungs and what the mask wrongly includes, nothing else.
    """
    img = np.asarray(img, np.uint8)
    return np.where(_lung_field(img), img, np.uint8(NEUTRAL_GREY))


def lungs_only_clahe(img: np.ndarray) -> np.ndarray:
    """`lungs_only` after `clahe`: lung segmentation plus histogram equalisation, the pre-processing that
    Teixeira et al. 2021 (Sensors 21:7116) and Maguolo & Nanni 2021 propose against source bias; CLAHE evens
    out the scanners' and web figures' brightness and contrast that the lungs themselves still carry."""
    return lungs_only(clahe(img))


MARKED = "lungs_removed_marker"  # lungs_removed + plant_marker on every COVID image (the positive control)
MARKED_OUTSIDE = "lungs_only_marker"  # plant_marker on every COVID image, then lungs_only: the marker must vanish
# When a control's marker is planted (by label, in CXRDataset, every split): after the preprocessing, so the
# model can find it, or before, so the preprocessing must remove it.
MARKER_ORDER = {MARKED: "after", MARKED_OUTSIDE: "before"}


def plant_marker(images: np.ndarray, where: np.ndarray, value: int = 250) -> np.ndarray:
    """Copies of uint8 `images` (N, H, W) with a striped text-like block burned into the top-left corner
    (outside every lung mask) of rows `where`: the marker the synthetic `shortcut=True` data puts on COVID images."""
    out = np.array(images, copy=True)
    size = out.shape[1]
    rows, cols = slice(int(0.05 * size), max(int(0.11 * size), int(0.05 * size) + 2)), slice(int(0.05 * size), int(0.30 * size))
    stripes = np.zeros(out.shape[1:], bool)
    stripes[rows, cols] = (np.arange(out.shape[2]) // 2 % 2 == 0)[None, cols]
    out[np.asarray(where, bool)[:, None, None] & stripes[None]] = value
    return out


PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clahe": clahe, "lung_crop": lung_crop, "lungs_removed": lungs_removed,
    MARKED: lungs_removed,  # + plant_marker by label, in CXRDataset (predict has no label: no marker)
    "lungs_only": lungs_only, MARKED_OUTSIDE: lungs_only, "lungs_only_clahe": lungs_only_clahe,
}


def preprocess_store(method: str) -> str:
    """The cache store of a remedy, named with the settings its output depends on, so that changing
    one (say LUNGS_REMOVED_MARGIN) starts a new store instead of reusing stale images. The lungs-removed
    control shares lungs_removed's store (its marker is planted after loading); the lungs-only control reads
    the plain images and paints them itself, after its marker (`CXRDataset`)."""
    lungs = f"at{LUNG_CROP_SIZE}-grow{LUNGS_REMOVED_MARGIN}"
    settings = {"clahe": f"tiles{CLAHE_TILES}-clip{CLAHE_CLIP}",
                "lung_crop": f"at{LUNG_CROP_SIZE}-margin{LUNG_CROP_MARGIN}",
                "lungs_removed": lungs, "lungs_only": lungs,
                "lungs_only_clahe": f"{lungs}-tiles{CLAHE_TILES}-clip{CLAHE_CLIP}"}
    method = "lungs_removed" if method == MARKED else method
    if method not in settings:
        raise CXRError(f"preprocess={method!r} has no store of its own")
    return f"{method}-{settings[method]}"


class MarkerCache(ImageCache):
    """The lungs-only control's cache: the plain images (`ImageCache`), each COVID-19 image marked and then
    painted by `lungs_only` when a dataset loads them, so the marker goes through the painting."""

    marker = MARKER_ORDER[MARKED_OUTSIDE]

    def mark(self, images: np.ndarray, covid: np.ndarray) -> np.ndarray:
        return np.stack([lungs_only(img) for img in plant_marker(images, covid)]) if len(images) else images


class PreprocessedCache(ImageCache):
    """An ImageCache of images passed through one remedy before resizing, in a store of its own.

    Training, evaluation and prediction build it from the run's `preprocess` (`make_cache`), so the
    remedy is applied identically everywhere and decoded once per (setting, size).
    """

    def __init__(self, size: int, method: str, root: str | Path | None = None, workers: int | None = None):
        if method not in PREPROCESSORS:
            raise CXRError(f"preprocess={method!r}: choose none or one of {', '.join(PREPROCESSORS)}")
        self.method = method
        self.marker = MARKER_ORDER.get(method, "")  # lungs_removed_marker: "after"
        base = Path(root or os.environ.get("CXRLIB_CACHE") or Path.home() / ".cache" / "cxrlib" / "images")
        super().__init__(size, base / f"preprocess-{preprocess_store(method)}", workers)

    def _decode_one(self, data: bytes, path: str) -> np.ndarray:
        return resize_square(PREPROCESSORS[self.method](_decode_bytes(data, path)), self.size)

    def mark(self, images: np.ndarray, covid: np.ndarray) -> np.ndarray:
        return plant_marker(images, covid) if self.marker else images


def make_cache(size: int, preprocess: str = "none") -> ImageCache:
    """The image cache for a run's `image_size` and `preprocess` setting (the lungs-only control: the plain
    images, which CXRDataset marks and then paints)."""
    if preprocess == MARKED_OUTSIDE:
        return MarkerCache(size)
    return ImageCache(size) if preprocess == "none" else PreprocessedCache(size, preprocess)


def load_preprocessed(path: str | Path, size: int, preprocess: str = "none") -> np.ndarray:
    """One file decoded, preprocessed and resized exactly as `make_cache(size, preprocess)` stores it."""
    return preprocess_image(decode_image(path), size, preprocess)


def preprocess_image(img: np.ndarray, size: int, preprocess: str = "none") -> np.ndarray:
    """A decoded image preprocessed and resized exactly as `make_cache(size, preprocess)` stores it."""
    return resize_square(img if preprocess == "none" else PREPROCESSORS[preprocess](img), size)
