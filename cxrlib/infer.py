"""Inference: a model's outputs on a dataset in dataset order, on one device or sharded under torchrun, and
the device and precision helpers inference and training share (autocast dtype, device names, progress bars).

Frozen-backbone training computes the pooled features here once (`backbone_features`) and trains the head
on them.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from . import distributed, images
from .config import CHOICES
from .errors import CXRError


def forward_all(module: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                amp: str = "off", channels_last: bool = True, num_workers: int = 0,
                progress: bool | None = False, desc: str = "",
                device_batches: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of `module` on every item of `dataset`, in dataset order, on every rank.

    `dataset` may be an images.DeviceBatches; other sets that have one are batched on the device
    too (no per-image transforms, no DataLoader) unless `device_batches=False`. Under torchrun each
    rank computes a shard (rank, rank + world_size, ...) and the shards are gathered.
    """
    info = distributed.current()
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    shard = distributed.ShardSampler(len(dataset), info.rank, info.world_size)
    source = dataset if isinstance(dataset, images.DeviceBatches) else (
        images.DeviceBatches.of(dataset, device) if device_batches else None)
    if source is not None:
        loader = source.batches(shard.indices, batch_size)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
    was_training = module.training
    module.to(device).eval()
    outs, targets = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not (info.is_main and progress_enabled(progress)), leave=False,
                          total=-(-len(shard) // batch_size)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = module(to_device(batch[0], device, channels_last))
            outs.append(out.float().cpu())
            targets.append(torch.as_tensor(batch[1]).cpu())
    module.train(was_training)
    empty = torch.empty(0)
    parts = distributed.gather_objects((shard.indices, torch.cat(outs) if outs else empty,
                                        torch.cat(targets) if targets else empty))
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    order = torch.as_tensor([i for p in parts for i in p[0]]).argsort()
    return (torch.cat([p[1] for p in parts if len(p[0])])[order],
            torch.cat([p[2] for p in parts if len(p[0])])[order])


def predict_dataset(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                    amp: str = "off", output: str = "softmax", loss_fn: nn.Module | None = None,
                    channels_last: bool = True, num_workers: int = 0, progress: bool | None = False,
                    device_batches: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities, targets, mean loss or NaN) of `model` on `dataset`, in dataset order (see forward_all)."""
    logits, targets = forward_all(model, dataset, batch_size=batch_size, device=device, amp=amp,
                                  channels_last=channels_last, num_workers=num_workers, progress=progress,
                                  desc="predict", device_batches=device_batches)
    loss = float("nan")
    if loss_fn is not None and len(logits):
        with torch.no_grad():
            loss = float(loss_fn(logits.to(device), targets.to(device)))
    probs = logits.softmax(dim=1) if output == "softmax" else logits.sigmoid()
    return probs.numpy(), targets.numpy(), loss


class FeatureDataset(TensorDataset):
    """Pooled backbone features of a CXRDataset with its labels and table: what the head trains on."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, table: pd.DataFrame):
        super().__init__(features, labels)
        self.table = table
        self.labels = labels.numpy()


def backbone_features(features: nn.Module, dataset: Dataset, *, batch_size: int = 64,
                      device: torch.device | str = "cpu", amp: str = "off",
                      progress: bool | None = False) -> FeatureDataset:
    """Run the (frozen) feature extractor once over `dataset` (its own, non-augmenting transform).

    Frozen-backbone training then needs only the head's forward and backward per epoch: the
    backbone forward is the bulk of the cost, and with fixed weights and no augmentation it
    would give the same features every epoch.
    """
    feats, labels = forward_all(features, dataset, batch_size=batch_size, device=device, amp=amp,
                                progress=progress, desc="backbone features")
    return FeatureDataset(feats, labels.long(), dataset.table)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """`x` on `device` (non-blocking), channels-last for image batches when asked."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32. "auto": on a GPU bf16 where supported, else fp16 (fit then adds
    a GradScaler); on a CPU bf16 where it multiplies bf16 in hardware (cpu_has_fast_bf16), else fp32."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise CXRError(f"parameter amp={amp!r}: choose one of {', '.join(CHOICES['amp'])}")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (bf16 autocast about 2x fp32 there); elsewhere bf16 is
    emulated and slower than fp32. torch's own probes where it has them, else /proc/cpuinfo's flags."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if getattr(torch.cpu, probe, lambda: False)():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def progress_enabled(flag: bool | None) -> bool:
    """Progress bars: as asked, else on when stderr is a terminal or we run inside a Jupyter kernel."""
    if flag is not None:
        return flag
    try:
        from IPython import get_ipython

        if type(get_ipython()).__name__ == "ZMQInteractiveShell":
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


def describe_device(device: torch.device, info: distributed.DistInfo | None = None) -> str:
    """E.g. "cpu (2 threads)" or "cuda: NVIDIA H100 80GB HBM3 x 4 processes"."""
    info = info or distributed.current()
    if device.type == "cuda":
        text = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        text = f"cpu ({torch.get_num_threads()} threads)"
    return text + (f" x {info.world_size} processes" if info.distributed else "")
