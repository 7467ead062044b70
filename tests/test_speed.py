"""The device input path (images.DeviceBatches), its augmentation, amp resolution and bf16 on the CPU."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_cnn, tiny_data, tiny_manifest
from torch import nn

from cxrlib import data, images, infer, loop, models
from cxrlib.infer import amp_dtype, cpu_has_fast_bf16, predict_dataset
from cxrlib.data import SPLITS
from cxrlib.config import RunConfig
from cxrlib.errors import CXRError

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, pd.DataFrame]:
    table, _ = data.load_table("", "", str(tiny_manifest(tmp_path_factory.mktemp("tiny"))))
    table = data.split_table(table, "multiclass", seed=0)
    return {s: table[table["split"] == s] for s in SPLITS}


def datasets(splits, spec: str = "imagenet", augment: bool = False) -> dict[str, images.CXRDataset]:
    cache = images.ImageCache(32)
    sets = {s: images.CXRDataset(t, "multiclass", cache, images.make_transform(spec)) for s, t in splits.items()}
    sets["train"].transform = images.make_transform(spec, train=True, augment=augment)
    return sets


@pytest.mark.parametrize("spec", ["imagenet", "xrv"])
def test_device_batch_equals_the_per_image_transform(splits, spec):
    ds = datasets(splits, spec)["val"]
    source = images.DeviceBatches.of(ds, "cpu")
    index = [2, 0, 1]
    x, y = source.batch(index)
    assert torch.equal(x, torch.stack([ds[i][0] for i in index]))  # same arithmetic, bit for bit
    assert y.tolist() == [ds[i][1] for i in index]
    features = torch.utils.data.TensorDataset(torch.randn(5, 7), torch.arange(5))
    fx, fy = images.DeviceBatches.of(features, "cpu").batch([4, 1])
    assert torch.equal(fx, features.tensors[0][[4, 1]]) and fy.tolist() == [4, 1]
    assert images.DeviceBatches.of(torch.utils.data.Subset(ds, [0]), "cpu") is None  # unknown sets: DataLoader


def test_fit_on_device_batches_equals_the_dataloader_path(splits, monkeypatch):
    """augment=False, same seed and data: the batched path gives the DataLoader path's numbers (1e-5)."""
    sets = datasets(splits)
    sampler = data.weighted_sampler(sets["train"].labels, 3, seed=0)
    results = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        model = models.build_model("resnet50", "none", 3)[0]
        opts = loop.FitOptions(epochs=2, batch_size=4, lr=1e-3, patience=0, device="cpu", amp="off",
                               progress=False, device_batches=on_device, eval_batch_size=8)
        if on_device:  # prove the path: no DataLoader may be built
            for module in (loop, infer):
                monkeypatch.setattr(module, "DataLoader", lambda *a, **k: pytest.fail("DataLoader used"))
        sampler.generator.manual_seed(0)
        results[on_device] = (loop.fit(model, sets["train"], sets["val"], nn.CrossEntropyLoss(), opts,
                                       sampler=sampler), model.state_dict())
    (old, old_state), (new, new_state) = results[False], results[True]
    cols = ["train_loss", "val_loss", "val_macro_f1", "val_accuracy"]
    pd.testing.assert_frame_equal(new.history[cols], old.history[cols], rtol=0, atol=1e-5)
    for key in old_state:
        torch.testing.assert_close(new_state[key], old_state[key], rtol=0, atol=1e-5, msg=key)
    monkeypatch.undo()
    test_old = predict_dataset(model, sets["test"], batch_size=3, device_batches=False)[0]
    test_new = predict_dataset(model, sets["test"], batch_size=64)[0]
    np.testing.assert_allclose(test_new, test_old, rtol=0, atol=1e-5)


def test_augmentation_draws_stay_within_the_documented_ranges():
    p = images.augment_params(20000, torch.Generator().manual_seed(0))
    bounds = {"angle": (-5, 5), "shift": (-0.05, 0.05), "zoom": (0.95, 1.05), "brightness": (0.9, 1.1),
              "contrast": (0.9, 1.1)}
    for name, (lo, hi) in bounds.items():
        v = p[name]
        assert v.min() >= lo and v.max() <= hi, name
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), name  # the whole range is used
    again = images.augment_params(3, torch.Generator().manual_seed(0))
    assert torch.equal(again["angle"], p["angle"][:3])  # the run's seed fixes the draws


def _blob(size: int = 64, at: tuple[float, float] = (42.0, 32.0)) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((xx - at[0]) ** 2 + (yy - at[1]) ** 2) / 8).view(1, 1, size, size)


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    size = x.shape[-1]
    grid = torch.arange(size, dtype=torch.float32)
    w = x[0, 0] / x[0, 0].sum()
    return float((w.sum(0) * grid).sum()), float((w.sum(1) * grid).sum())


def _params(angle=0.0, shift=(0.0, 0.0), zoom=1.0, brightness=1.0, contrast=1.0) -> dict[str, torch.Tensor]:
    return {"angle": torch.tensor([angle]), "shift": torch.tensor([shift]), "zoom": torch.tensor([zoom]),
            "brightness": torch.tensor([brightness]), "contrast": torch.tensor([contrast])}


def test_augment_batch_geometry_and_intensity():
    blob, centre = _blob(), 31.5  # pixel centres 0..63
    torch.testing.assert_close(images.augment_batch(blob, _params()), blob, atol=1e-6, rtol=0)
    x, y = _centroid(images.augment_batch(blob, _params(shift=(0.05, -0.05))))
    assert x == pytest.approx(42 + 0.05 * 64, abs=0.05) and y == pytest.approx(32 - 0.05 * 64, abs=0.05)
    x, y = _centroid(images.augment_batch(blob, _params(zoom=1.05)))
    assert x - centre == pytest.approx(1.05 * (42 - centre), abs=0.05)
    x, y = _centroid(images.augment_batch(blob, _params(angle=5.0)))
    turned = math.degrees(math.atan2(y - centre, x - centre) - math.atan2(32 - centre, 42 - centre))
    assert abs(turned) == pytest.approx(5.0, abs=0.2) and math.hypot(x - centre, y - centre) == pytest.approx(
        math.hypot(42 - centre, 32 - centre), abs=0.05)
    grey = torch.linspace(0.2, 0.6, 64 * 64).view(1, 1, 64, 64)
    torch.testing.assert_close(images.augment_batch(grey, _params(brightness=1.1)), grey * 1.1)
    stretched = images.augment_batch(grey, _params(contrast=0.9))
    assert float(stretched.mean()) == pytest.approx(float(grey.mean()), abs=1e-6)
    assert float(stretched.std()) == pytest.approx(0.9 * float(grey.std()), rel=1e-4)


def test_augmented_device_batches_are_seeded_and_in_range(splits):
    ds = datasets(splits, augment=True)["train"]
    source = images.DeviceBatches.of(ds, "cpu")
    index = list(range(len(ds)))
    a, _ = source.batch(index, torch.Generator().manual_seed(1))
    b, _ = source.batch(index, torch.Generator().manual_seed(1))
    c, _ = source.batch(index, torch.Generator().manual_seed(2))
    plain, _ = source.batch(index)  # no generator: evaluation, no augmentation
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    spec = images.INPUT_SPECS["imagenet"]
    mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = a * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    ratio = pixels.mean((1, 2, 3)) / (plain * std + mean).mean((1, 2, 3))
    assert ((ratio > 0.75) & (ratio < 1.25)).all()  # brightness +-10%, zoom/shift lose a little border


def test_amp_auto_resolves_as_documented(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for fast, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(infer, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert amp_dtype("auto", cpu) is expected
        assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert amp_dtype("auto", gpu) is expected
    assert amp_dtype("fp16", gpu) is torch.float16
    with pytest.raises(CXRError, match="amp="):
        amp_dtype("fp8", cpu)
    with pytest.raises(CXRError, match="amp="):
        RunConfig(amp="fp8")
    assert RunConfig().amp == "auto" and loop.FitOptions.from_config(RunConfig(amp="off")).amp == "off"


def test_cpu_bf16_detection_follows_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo.read_text()) is not None
    assert cpu_has_fast_bf16() == flags


def test_bf16_cpu_fit_is_close_to_fp32():
    """bf16 autocast on the CPU (emulated where the CPU lacks AMX/AVX512-BF16, so slower there, same numbers).

    Tolerance: per-epoch losses within 2% of fp32, validation accuracy within 1/16 (one image in 16)
    and final weights within 0.02 absolute: bf16 keeps 8 bits of mantissa, about 2-3 decimal digits.
    """
    runs = {}
    for amp in ("off", "bf16"):
        model = tiny_cnn()
        opts = loop.FitOptions(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", device="cpu", amp=amp,
                               patience=0, progress=False)
        runs[amp] = (loop.fit(model, tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts).history,
                     model.state_dict())
    (h32, w32), (h16, w16) = runs["off"], runs["bf16"]
    for col in ("train_loss", "val_loss"):
        np.testing.assert_allclose(h16[col], h32[col], rtol=0.02, err_msg=col)
    np.testing.assert_allclose(h16["val_accuracy"], h32["val_accuracy"], atol=1 / 16)
    for key in w32:
        torch.testing.assert_close(w16[key], w32[key], rtol=0, atol=0.02, msg=key)
    assert not torch.equal(w16["0.weight"], w32["0.weight"])  # bf16 really ran


def test_warm_cache_decodes_once(splits):
    table = pd.concat(splits.values())
    first = images.warm_cache(table["path"], 24)
    assert first == {"images": len(table), "decoded": len(table), "unreadable": 0}
    assert images.warm_cache(table["path"], 24)["decoded"] == 0


@cuda
def test_cuda_device_batches_match_the_cpu(splits):
    ds = datasets(splits, augment=True)["train"]
    index = list(range(len(ds)))
    on_gpu = images.DeviceBatches.of(ds, "cuda")
    assert on_gpu.inputs.is_cuda and on_gpu.inputs.dtype == torch.uint8
    cpu_x, _ = images.DeviceBatches.of(ds, "cpu").batch(index, torch.Generator().manual_seed(3))
    gpu_x, gpu_y = on_gpu.batch(index, torch.Generator().manual_seed(3))
    assert gpu_x.is_cuda and gpu_y.is_cuda
    torch.testing.assert_close(gpu_x.cpu(), cpu_x, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimisers_are_fused_and_match_the_for_each_ones(name):
    """The fused step (3x faster on one CPU thread) gives the for-each step's weights."""
    weights = {}
    for fused in (True, False):
        model = tiny_cnn()
        opt = loop.make_optimizer(model.parameters(), loop.FitOptions(optimizer=name, lr=0.05))
        assert opt.defaults["fused"] is True
        if not fused:
            opt.defaults["fused"] = False
            for group in opt.param_groups:
                group["fused"] = False
        x, y = tiny_data().tensors
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        weights[fused] = model.state_dict()
    for key in weights[True]:
        torch.testing.assert_close(weights[True][key], weights[False][key], rtol=1e-5, atol=1e-6, msg=key)
