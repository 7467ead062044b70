"""ChestX-ray14 pretraining throughput on whatever device is present, and the epoch time it implies.

Run by hand (not in CI): `python bench/bench_pretrain.py [--backbones resnet50 densenet121]
[--batch-sizes 32 64 128] [--seconds 10] [--fit-images 20000 --workers 8]`. At 224 px it times:

- the training step exactly as cxrlib.loop.fit runs it for `cxrlib pretrain` (14 logits, BCEWithLogits,
  AdamW, channels_last; on a GPU bf16 autocast, or fp16 with a GradScaler; on a CPU fp32), on a batch
  already on the device: the model's ceiling, no data loading;
- the evaluation forward pass (validation and test scoring);
- the CPU input pipeline per process: images.make_transform (the training augmentation) from the
  cached uint8 image to the normalised tensor, which DataLoader workers run when fit cannot batch on
  the device (FitOptions.device_batches=False);
- (on a GPU by default) loop.fit itself, end to end, on random in-memory images: batches gathered and
  augmented on the device (images.DeviceBatches), training steps and validation, i.e. what one epoch
  of `cxrlib pretrain` costs after the image cache is warm.

It then prints the epoch time these imply for the real ChestX-ray14 (official split, 10% of the
train_val patients for validation) on this device, and for N such devices with ideal scaling.
Results also go to bench/results/bench_pretrain-<time>.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cxrlib import distributed, images, models
from cxrlib.infer import amp_dtype, describe_device
from cxrlib.loop import FitOptions, fit, train_step
from cxrlib.chestxray14 import FINDINGS
from cxrlib.pretrain import finding_scores

RESULTS = Path(__file__).resolve().parent / "results"
# The real set: 86,524 train_val images (10% of their patients -> val) and 25,596 in test_list.txt.
N_TRAIN, N_VAL, N_TEST = 77_870, 8_654, 25_596


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, n_images: int, device: torch.device, seconds: float) -> float:
    """Images/s of `fn` (one batch of n_images per call), after two warm-up calls."""
    fn(), fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    _sync(device)
    return n * n_images / (time.perf_counter() - start)


def bench_model(backbone: str, batch: int, size: int, device: torch.device, seconds: float) -> dict:
    """Train-step and eval-forward images/s for one backbone and batch size, as fit() runs them."""
    torch.manual_seed(0)
    model, _ = models.build_model(backbone, "none", len(FINDINGS))
    dtype = amp_dtype("auto", device)
    model.to(device, memory_format=torch.channels_last)  # fit() always uses channels_last
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, len(FINDINGS), device=device) < 0.1).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step() -> None:
        train_step(model, x, y, loss_fn, optimizer, scaler, dtype)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(**autocast):
            model(x)

    model.train()
    train_ips = _timed(step, batch, device, seconds)
    model.eval()
    eval_ips = _timed(forward, batch, device, seconds / 2)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"backbone": backbone, "batch_size": batch, "amp_dtype": str(dtype), "channels_last": True,
            "train_images_per_s": train_ips, "eval_images_per_s": eval_ips, "peak_gpu_memory_gib": peak}


def bench_transform(size: int, seconds: float) -> float:
    """Images/s of the training transform in one process with one thread (a DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (32, size, size), dtype=np.uint8)
    transform = images.make_transform("imagenet", train=True, augment=True)
    k = iter(range(10**9))
    ips = _timed(lambda: transform(imgs[next(k) % len(imgs)]), 1, torch.device("cpu"), seconds)
    torch.set_num_threads(threads)
    return ips


class InMemoryFindings(torch.utils.data.Dataset):
    """What images.CXRDataset serves in pretraining (cached uint8 image -> transform, 14 multi-hot targets),
    from random pixels in memory instead of files."""

    def __init__(self, n: int, size: int, train_mode: bool):
        rng = np.random.default_rng(n)
        self.images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        self.labels = (rng.random((n, len(FINDINGS))) < 0.1).astype(np.float32)
        self.transform = images.make_transform("imagenet", train=train_mode, augment=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.transform(self.images[i]), torch.from_numpy(self.labels[i]), i


def bench_fit(backbone: str, batch: int, size: int, n: int, workers: int) -> dict:
    """End to end: loop.fit itself (device batches, step, validation) for two epochs of n images.

    The second epoch is reported: the first also pays for cuDNN's autotuning.
    """
    model, _ = models.build_model(backbone, "none", len(FINDINGS))
    opts = FitOptions(epochs=2, batch_size=batch, scheduler="none", patience=0, monitor="mean_auroc",
                      num_workers=workers, progress=False)  # fmt: skip
    result = fit(model, InMemoryFindings(n, size, True), InMemoryFindings(n // 9, size, False),
                 torch.nn.BCEWithLogitsLoss(), opts, score_fn=finding_scores, output="sigmoid")  # fmt: skip
    seconds = float(result.history["seconds"].iloc[-1])
    return {"backbone": backbone, "batch_size": batch, "num_workers": workers, "train_images": n,
            "val_images": n // 9, "epoch_seconds": seconds, "images_per_s": (n + n // 9) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 32 64 128 on a GPU, 16 on a CPU")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--size", type=int, default=224, help="image size (the real runs use 224)")
    parser.add_argument("--fit-images", type=int, default=None,
                        help="also time loop.fit end to end on this many in-memory images "
                             "(default: 20000 on a GPU, 0 = skip, on a CPU)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers for the end-to-end timing")
    args = parser.parse_args()
    device = distributed.resolve_device("auto")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit() sets it
    batches = args.batch_sizes or ([32, 64, 128] if device.type == "cuda" else [16])
    name = describe_device(device)
    print(f"device: {name}; torch {torch.__version__}; {args.size} px; {len(FINDINGS)} findings")

    transform_ips = bench_transform(args.size, min(args.seconds, 5.0))
    cores = os.cpu_count() or 1
    print(f"input pipeline: {transform_ips:.0f} images/s per DataLoader worker (training augmentation, "
          f"1 thread); this machine has {cores} CPU cores")
    rows = []
    for backbone in args.backbones:
        for batch in batches:
            r = bench_model(backbone, batch, args.size, device, args.seconds)
            rows.append(r)
            train_s = N_TRAIN / r["train_images_per_s"]
            eval_s = N_VAL / r["eval_images_per_s"]
            mem = f", peak {r['peak_gpu_memory_gib']:.1f} GiB" if r["peak_gpu_memory_gib"] is not None else ""
            print(f"{backbone:12s} batch {batch:4d}: train {r['train_images_per_s']:7.1f} img/s, "
                  f"eval {r['eval_images_per_s']:7.1f} img/s{mem}; one epoch of ChestX-ray14 "
                  f"({N_TRAIN:,} train + {N_VAL:,} val) ~ {(train_s + eval_s) / 60:.1f} min on this device "
                  f"(model-bound; needs >= {r['train_images_per_s'] / transform_ips:.1f} workers to feed it)")
    best = {}
    for r in rows:
        if r["train_images_per_s"] > best.get(r["backbone"], {}).get("train_images_per_s", 0):
            best[r["backbone"]] = r
    for backbone, r in best.items():
        epoch_min = (N_TRAIN / r["train_images_per_s"] + N_VAL / r["eval_images_per_s"]) / 60
        print(f"{backbone}: best batch {r['batch_size']}: epoch ~ {epoch_min:.1f} min on 1 device; with ideal "
              f"DDP scaling ~ {epoch_min / 8:.1f} min on 8, {epoch_min / 16:.1f} min on 16 "
              f"(+ test scoring {N_TEST / r['eval_images_per_s'] / 60:.1f} min once)")
    fit_images = args.fit_images if args.fit_images is not None else (20_000 if device.type == "cuda" else 0)
    fits = []
    if fit_images:
        for backbone, r in best.items():
            f = bench_fit(backbone, r["batch_size"], args.size, fit_images, args.workers)
            fits.append(f)
            print(f"{backbone}: loop.fit end to end, batch {f['batch_size']}, {f['num_workers']} workers: "
                  f"{f['images_per_s']:.0f} img/s ({f['train_images']:,} train + {f['val_images']:,} val in "
                  f"{f['epoch_seconds']:.1f} s) -> one ChestX-ray14 epoch ~ "
                  f"{(N_TRAIN + N_VAL) / f['images_per_s'] / 60:.1f} min on this device")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_pretrain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "python": platform.python_version(),
                               "image_size": args.size, "transform_images_per_s_per_worker": transform_ips,
                               "results": rows, "fit": fits}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
