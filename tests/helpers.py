"""Helpers several test files use (tests/ is on sys.path under pytest): data makers and fault injection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch import nn
from torch.utils.data import TensorDataset

from cxrlib import loop, synthetic
from cxrlib.config import RunConfig
from cxrlib.rundir import LAST


def tiny_manifest(folder: Path, per_class: int = 8, seed: int = 0, size: int = 48) -> Path:
    """A manifest CSV of `per_class` synthetic patients per label, one small PNG each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("covid", "pneumonia", "normal"):
        for k in range(per_class):
            patient = synthetic._patient(rng, label, adult=label == "covid")
            img = Image.fromarray(synthetic.chest_image(rng, label, patient)).resize((size, size))
            name = f"{label}-{seed}-{k}.png"
            img.save(folder / name)
            rows.append({"path": name, "label": label, "patient_id": f"p{seed}-{label}-{k}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def tiny_config(manifest: Path, run_dir: Path, **overrides) -> RunConfig:
    """A 2-epoch, 32 px CPU run of `manifest` (tiny_manifest) into `run_dir`."""
    values = dict(manifest=str(manifest), image_size=32, epochs=2, batch_size=4, lr=1e-3, patience=0,
                  weighted_sampler=True, run_dir=str(run_dir), device="cpu")
    return RunConfig(**{**values, **overrides})


def tiny_cnn() -> nn.Module:
    """A seeded 3-class CNN small enough for loop.fit tests on 8 px inputs."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 3))


def tiny_data() -> TensorDataset:
    """48 seeded 8 px inputs whose 3 classes follow their first two channels' means."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.2).long()
    return TensorDataset(x, y)


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> None:
    """A minimal uncompressed grayscale DICOM file: 8-bit for uint8 `pixels`, else 16-bit (12 stored)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    eight = pixels.dtype == np.uint8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8, 8, 7, 0) if eight else (16, 12, 11, 0)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if eight else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@contextlib.contextmanager
def crash_after_checkpoint() -> Iterator[None]:
    """Inside the block, training stops (KeyboardInterrupt) right after its first checkpoint-last.pt is
    written: an interrupted run, for the resume tests."""
    real = loop.save_torch

    def crash(obj, path):
        real(obj, path)
        if Path(path).name == LAST:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_torch", crash)
        yield
