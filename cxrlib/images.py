"""Images: decode (JPEG/PNG/DICOM) to one uint8 channel, resize, cache on disk, transform to tensors.

Every image, whatever its format or bit depth, becomes one uint8 grayscale channel, then a square of
one size. Squashing (not padding or cropping) is deliberate: in CoronaHack the paediatric images were
squashed to 224x224 upstream while the adult COVID ones keep their aspect ratio, so any padding would
hand the model the class for free, and cropping would cut lungs off wide images.

One module on purpose: decoding, the cache (keyed by decode version and size), the transforms and the batched
device path are one contract, "the pixels a model saw", and the device path must repeat the per-image
transform's arithmetic exactly. The image-level remedies and controls (`preprocess`) build on the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pydicom
import torch
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from torchvision.transforms import v2

from .config import classes, encode_labels
from .errors import CXRError

# Model input conventions. "imagenet": torchvision weights; "xrv": TorchXRayVision models, which take
# one channel scaled to [-1024, 1024].
INPUT_SPECS: dict[str, dict] = {
    "imagenet": {"channels": 3, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "xrv": {"channels": 1, "mean": (0.5,), "std": (1 / 2048,)},  # (x - 0.5) * 2048 = [-1024, 1024]
}

CACHE_VERSION = "v1"  # bump when decode/resize changes, so stale cached pixels are never reused


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch any numeric array to the full uint8 range (per image min..max)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _decode_dicom(data: bytes) -> np.ndarray:
    """DICOM pixels with the modality LUT (RescaleSlope/Intercept) and VOI LUT/window applied.

    MONOCHROME1 stores bright as low values; it is inverted so bone is always bright.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:  # multi-frame: the first frame
        arr = arr[0]
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:  # colour DICOM (rare for X-rays): average
        return _to_uint8(arr.mean(axis=-1))
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return _to_uint8(arr)


def _decode_pil(data: bytes) -> np.ndarray:
    """JPEG/PNG/TIFF/... in any PIL mode to one uint8 channel.

    8-bit images keep their values; deeper ones (16-bit PNG, float TIFF) are stretched min..max,
    because 12-bit data stored in 16 bits would otherwise be nearly black. Transparent pixels are
    composited onto black, the X-ray background.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return _to_uint8(np.asarray(im))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            black = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(black, im)
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def _is_dicom(data: bytes, path: str) -> bool:
    return data[128:132] == b"DICM" or str(path).lower().endswith((".dcm", ".dicom"))


def _decode_bytes(data: bytes, path: str | Path) -> np.ndarray:
    if not data:
        raise CXRError(f"{path}: empty file (0 bytes)")
    try:
        img = _decode_dicom(data) if _is_dicom(data, str(path)) else _decode_pil(data)
    except CXRError:
        raise
    except Exception as err:  # PIL/pydicom raise many types for truncated or corrupt files
        raise CXRError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
    if img.ndim != 2 or min(img.shape) < 1:
        raise CXRError(f"{path}: decoded to an unusable array of shape {img.shape}")
    return img


def decode_image(path: str | Path) -> np.ndarray:
    """Read one image file (JPEG/PNG in any bit depth or mode, or DICOM) as uint8 (H, W)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CXRError(f"{path}: cannot read file ({err})") from err
    return _decode_bytes(data, path)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Squash a uint8 (H, W) image to (size, size); PIL's bilinear filter antialiases when shrinking."""
    if img.shape == (size, size):
        return img
    return np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def file_digest(path: str | Path) -> str:
    """Content hash of a file: the cache key, so a moved or renamed file is still found."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class ImageCache:
    """Decoded, resized images on disk, one uint8 record per file content hash, per size.

    Layout: ``<root>/v1-<size>px/pixels.u8`` (records of size*size bytes, appended) and ``index.tsv``
    (``<sha1>\\t<record>`` lines). Appends take an exclusive lock and write the pixels (fsync) before
    the index line, so a crash leaves at most unused bytes, never an index line pointing at garbage;
    runs in parallel or one after the other share the store. Reads memory-map the pixels.
    ``files.tsv`` remembers each path's hash with its size and mtime, so a later run re-reads only
    files that changed (like git's index); the key is still the content hash.
    """

    def __init__(self, size: int, root: str | Path | None = None, workers: int | None = None):
        if int(size) < 1:
            raise CXRError(f"image size must be at least 1, got {size}")
        self.size = int(size)
        base = root or os.environ.get("CXRLIB_CACHE") or Path.home() / ".cache" / "cxrlib" / "images"
        self.dir = Path(base) / f"{CACHE_VERSION}-{self.size}px"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.dir, os.W_OK):
                raise PermissionError("not writable")
        except OSError as err:  # a read-only HOME: say which variable moves the cache
            raise CXRError(f"cannot write the image cache {self.dir} ({err.strerror or err}): set CXRLIB_CACHE to a "
                           "writable folder (default ~/.cache/cxrlib/images)") from err
        self.pixels_path = self.dir / "pixels.u8"
        self.index_path = self.dir / "index.tsv"
        self.files_path = self.dir / "files.tsv"
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.decoded_count = 0  # decodes done by this object (the tests check a warm pass does none)

    marker = ""  # a control arm's marker order, "after" or "before" the preprocessing (preprocess.MARKER_ORDER)

    def mark(self, images: np.ndarray, covid: np.ndarray) -> np.ndarray:
        """A control arm's images, the marker on the rows `covid` (preprocess.MarkerCache); here: as they are."""
        return images

    @property
    def record_bytes(self) -> int:
        return self.size * self.size

    @staticmethod
    def _lines(path: Path, n_fields: int) -> list[list[str]]:
        """Tab-separated lines of an append-only file; a torn last line (crash mid-write) is ignored."""
        if not path.exists():
            return []
        rows = [line.split("\t") for line in path.read_text().split("\n")[:-1]]  # newline-terminated only
        return [r for r in rows if len(r) == n_fields and len(r[0]) == 40 and r[1].isdigit()]

    def _read_index(self) -> dict[str, int]:
        return {key: int(record) for key, record in self._lines(self.index_path, 2)}

    def _read_files(self) -> dict[str, tuple[str, str, str]]:
        """path -> (size, mtime_ns, sha1) as last seen (later lines win)."""
        return {path: (size, mtime, key) for key, size, mtime, path in self._lines(self.files_path, 4)}

    def _append_lines(self, path: Path, text: str) -> None:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _append(self, items: dict[str, np.ndarray]) -> None:
        """Add new records under an exclusive lock (another process may be appending too)."""
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = self._read_index()
            new = {k: v for k, v in items.items() if k not in known}
            if not new:
                return
            with open(self.pixels_path, "ab") as f:
                start = f.tell()
                if start % self.record_bytes:  # a torn record from a crash: pad past it
                    pad = self.record_bytes - start % self.record_bytes
                    f.write(b"\0" * pad)
                    start += pad
                for arr in new.values():
                    f.write(np.ascontiguousarray(arr, np.uint8).tobytes())
                f.flush()
                os.fsync(f.fileno())
            first = start // self.record_bytes
            self._append_lines(self.index_path, "".join(f"{k}\t{first + i}\n" for i, k in enumerate(new)))

    def _decode_one(self, data: bytes, path: str) -> np.ndarray:
        return resize_square(_decode_bytes(data, path), self.size)

    def load(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Images of `paths` as (N, size, size) uint8, decoding only files not cached yet.

        Unreadable files (missing, empty, truncated, corrupt) do not stop the load: they are
        returned in `skipped` as (path, reason), and their rows are left out of the array, so
        array row i belongs to the i-th path that is not in `skipped`.
        """
        paths = [str(p) for p in paths]
        skipped: list[tuple[str, str]] = []
        keys: dict[str, str] = {}
        blobs: dict[str, bytes] = {}
        index, seen, stats = self._read_index(), self._read_files(), []
        for p in paths:
            try:
                st = os.stat(p)
                stamp = (str(st.st_size), str(st.st_mtime_ns))
                known = seen.get(os.path.abspath(p))
                if known and known[:2] == stamp and known[2] in index:  # unchanged since hashed
                    keys[p] = known[2]
                    continue
                data = Path(p).read_bytes()
            except OSError as err:
                skipped.append((p, f"cannot read file ({err.strerror or err})"))
                continue
            keys[p] = hashlib.sha1(data).hexdigest()
            if not any(c in p for c in "\t\n"):
                stats.append(f"{keys[p]}\t{stamp[0]}\t{stamp[1]}\t{os.path.abspath(p)}\n")
            if keys[p] not in index:
                blobs[p] = data

        todo = {keys[p]: p for p in blobs}  # identical files are decoded once
        decoded: dict[str, np.ndarray] = {}
        if todo:
            def work(item: tuple[str, str]):
                key, p = item
                try:
                    return key, self._decode_one(blobs[p], p), ""
                except CXRError as err:
                    return key, None, str(err)

            failed: dict[str, str] = {}
            with ThreadPoolExecutor(self.workers) as pool:  # PIL releases the GIL while decoding
                for key, arr, why in pool.map(work, todo.items()):
                    self.decoded_count += 1
                    if arr is None:
                        failed[key] = why
                    else:
                        decoded[key] = arr
            for p in [p for p in keys if keys[p] in failed]:
                skipped.append((p, failed[keys.pop(p)]))
            self._append(decoded)
            index = self._read_index()
        if stats:
            with open(self.dir / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._append_lines(self.files_path, "".join(stats))

        good = [p for p in paths if p in keys]
        out = np.empty((len(good), self.size, self.size), np.uint8)
        if good:
            store = np.memmap(self.pixels_path, np.uint8, mode="r")
            n_records = store.size // self.record_bytes
            store = store[: n_records * self.record_bytes].reshape(n_records, self.size, self.size)
            for i, p in enumerate(good):
                k = keys[p]
                out[i] = decoded[k] if k in decoded else store[index[k]]
            del store
        return out, skipped


# The light training augmentation, shared by the per-image (DataLoader) and the batched (device) paths:
# what differs between two radiographs of one patient. No flips (see make_transform).
AUGMENT = {"degrees": 5.0, "translate": 0.05, "scale": 0.05, "brightness": 0.1, "contrast": 0.1}


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(3, -1, -1)


class ImageTransform:
    """make_transform's result: uint8 (H, W) -> normalised float (C, H, W), one image at a time.

    It carries `input_spec` and `augment` so that `DeviceBatches` can do the same to a whole batch
    on the training device instead (one gather, one grid_sample, one normalisation per batch).
    """

    def __init__(self, input_spec: str = "imagenet", augment: bool = False):
        if input_spec not in INPUT_SPECS:
            raise CXRError(f"unknown input spec {input_spec!r}: choose one of {', '.join(INPUT_SPECS)}")
        self.input_spec, self.augment = input_spec, augment
        spec = INPUT_SPECS[input_spec]
        steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if augment:
            a = AUGMENT
            steps += [
                v2.RandomAffine(degrees=a["degrees"], translate=(a["translate"],) * 2,
                                scale=(1 - a["scale"], 1 + a["scale"])),
                v2.ColorJitter(brightness=a["brightness"], contrast=a["contrast"]),
            ]
        if spec["channels"] == 3:
            steps.append(v2.Lambda(_three_channels))
        steps.append(v2.Normalize(mean=list(spec["mean"]), std=list(spec["std"])))
        self._steps = v2.Compose(steps)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return self._steps(img)


def make_transform(input_spec: str = "imagenet", train: bool = False, augment: bool = True) -> ImageTransform:
    """uint8 (H, W) array -> float tensor (C, H, W) normalised for `input_spec`.

    Train-time augmentation is deliberately light (AUGMENT): a small affine (+-5 degrees, 5% shift,
    5% zoom) and +-10% brightness/contrast, i.e. what differs between two radiographs of one patient.
    No horizontal flip: chest anatomy is not mirror-symmetric (heart on the patient's left) and
    radiographs carry side markers, so a flipped film is not a plausible input.
    """
    return ImageTransform(input_spec, augment=train and augment)


def to_batch(pixels: np.ndarray, input_spec: str = "imagenet") -> torch.Tensor:
    """uint8 images (N, H, W) -> the model's evaluation input batch (N, C, H, W)."""
    transform = make_transform(input_spec, train=False)
    return torch.stack([transform(img) for img in pixels])


# --- the batched input path: whole splits on the training device ---------------------------------


def augment_params(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random draws of the light augmentation for n images, on the CPU from `generator` (the run's).

    angle in degrees, shift (x, y) as a fraction of the side, zoom, brightness and contrast factors,
    each uniform within AUGMENT's bounds. Drawn on the CPU so a seed gives the same draws on any device.
    """
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64) * 2 - 1
    a = AUGMENT
    return {"angle": u[:, 0] * a["degrees"], "shift": u[:, 1:3] * a["translate"], "zoom": 1 + u[:, 3] * a["scale"],
            "brightness": 1 + u[:, 4] * a["brightness"], "contrast": 1 + u[:, 5] * a["contrast"]}


def augment_batch(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Square images x (B, 1, H, W) in [0, 1] -> rotated, shifted, zoomed (bilinear, black outside) and
    brightness- then contrast-jittered, as ColorJitter does (contrast blends with each image's mean).
    One affine_grid/grid_sample for the whole batch, on x's device.
    """
    p = {k: v.to(x.device, torch.float32) for k, v in params.items()}
    rad = torch.deg2rad(p["angle"])
    cos, sin = torch.cos(rad) / p["zoom"], torch.sin(rad) / p["zoom"]
    shift = 2 * p["shift"]  # fractions of the side in affine_grid's [-1, 1] coordinates
    # Output point o samples the input at R^-1 (o - shift) / zoom.
    theta = torch.stack([torch.stack([cos, sin, -(cos * shift[:, 0] + sin * shift[:, 1])], 1),
                         torch.stack([-sin, cos, sin * shift[:, 0] - cos * shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = (x * p["brightness"].view(-1, 1, 1, 1)).clamp_(0, 1)
    c = p["contrast"].view(-1, 1, 1, 1)
    return (x * c + x.mean(dim=(1, 2, 3), keepdim=True) * (1 - c)).clamp_(0, 1)


class DeviceBatches:
    """A split held as one tensor on the training device; batches are gathered by index there.

    For uint8 images with an ImageTransform, each batch is converted, augmented (augment_batch) and
    normalised on the device, batched, with the same arithmetic as the per-image transform (so
    without augmentation the two paths give the same numbers). Other inputs (e.g. cached features)
    are gathered as they are. On a GPU the tensor lives in GPU memory when it takes under a quarter
    of what is free, else in pinned host memory (copied per batch); on the CPU nothing is copied.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device | str,
                 transform: ImageTransform | None = None):
        self.device = torch.device(device)
        self.transform = transform
        self.inputs = self._place(inputs)
        self.targets = targets.to(self.device)
        if transform is not None:
            spec = INPUT_SPECS[transform.input_spec]
            self.mean, self.std = (torch.tensor(spec[k], device=self.device).view(1, -1, 1, 1) for k in ("mean", "std"))
            self.channels = spec["channels"]

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        return t.to(self.device) if t.nbytes < free // 4 else t.pin_memory()

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, index: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of rows `index` on the device; augmented (draws from `generator`) if the
        transform augments and a generator is given."""
        index = torch.as_tensor(index, dtype=torch.long)
        x = self.inputs.index_select(0, index.to(self.inputs.device)).to(self.device, non_blocking=True)
        y = self.targets.index_select(0, index.to(self.device))
        if self.transform is None:
            return x, y
        x = x.unsqueeze(1).to(torch.float32).mul_(1.0 / 255)
        if self.transform.augment and generator is not None:
            x = augment_batch(x, augment_params(len(index), generator))
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return x.sub(self.mean).div_(self.std), y

    def batches(self, order: Sequence[int] | torch.Tensor, batch_size: int, drop_last: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows of `order` in chunks of `batch_size` (a DataLoader's chunks, the short last one dropped
        if `drop_last`), each gathered (and augmented, see `batch`) on the device."""
        order = torch.as_tensor(order, dtype=torch.long)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size], generator)

    @classmethod
    def of(cls, dataset: torch.utils.data.Dataset, device: torch.device | str) -> "DeviceBatches | None":
        """The batched path for `dataset`, or None when it has none (then use a DataLoader).

        Supported: CXRDataset-like sets (uint8 `.images` (N, H, W), `.labels`, an ImageTransform
        `.transform`) and TensorDatasets of (inputs, targets).
        """
        if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
            return cls(*dataset.tensors, device)
        pixels, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
        transform = getattr(dataset, "transform", None)
        if (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3
                and isinstance(transform, ImageTransform) and labels is not None):
            return cls(torch.from_numpy(pixels), torch.as_tensor(labels), device, transform)
        return None


def warm_cache(paths: Sequence[str], image_size: int, root: str | Path | None = None) -> dict[str, int]:
    """Decode every image at `image_size` into the on-disk cache, once, before a run matrix's workers start.

    Runs then only memory-map their pixels. Returns {"images", "decoded", "unreadable"} counts.
    """
    cache = ImageCache(image_size, root)
    pixels, skipped = cache.load(list(paths))
    return {"images": len(pixels), "decoded": cache.decoded_count, "unreadable": len(skipped)}


class CXRDataset(torch.utils.data.Dataset):
    """Rows of the table as (tensor, class index, row index), images held in memory from the cache.

    Images are loaded through `cache` once, at construction; epochs then only transform arrays.
    Unreadable images are removed with a warning and listed in `.skipped` (path, reason); `.table`
    holds the rows kept, in order, so the returned row index addresses `.table.iloc`.
    Multi-label (ChestX-ray14 pretraining): `targets` names 0/1 columns of the table; the target is then
    a float tensor with one entry per column (`task` is ignored) and `.labels` an (N, len(targets)) array.
    """

    def __init__(self, table: pd.DataFrame, task: str, cache: ImageCache, transform: Callable | None = None,
                 targets: Sequence[str] | None = None):
        self.task = task
        self.classes = tuple(targets) if targets else classes(task)
        self.transform = transform or make_transform()
        images, self.skipped = cache.load(table["path"].tolist())
        if self.skipped:
            bad = {p for p, _ in self.skipped}
            warnings.warn(
                f"{len(bad)} unreadable image(s) left out: "
                + "; ".join(f"{p}: {why}" for p, why in self.skipped[:5])
                + (" ..." if len(bad) > 5 else ""),
                stacklevel=2,
            )
            table = table[~table["path"].astype(str).isin(bad)]
        self.table = table.reset_index(drop=True)
        # a control arm's marker goes on by label (preprocess.MarkerCache); multi-label tables have no label
        self.images = cache.mark(images, self.table["label"].eq("covid").to_numpy()) if cache.marker else images
        if targets:
            self.labels = self.table[list(targets)].to_numpy(np.float32, copy=True)  # writable for torch
        else:
            self.labels = encode_labels(self.table["label"], task)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor, int]:
        label = self.labels[i]
        return self.transform(self.images[i]), int(label) if label.ndim == 0 else torch.from_numpy(label), int(i)
