"""Speed figures of cxrlib training, each beside the hardware it was measured on, as one JSON file.

Run by hand: `python bench/bench_speed.py --quick` (CPU, about a minute) or
`python bench/bench_speed.py --device cuda` (the paper's 224 px, batch 32, 4,356 + 937 images).

  a  fit throughput (train images per second of an epoch, validation included) / the bare train-step
     throughput of the same model, batch and size; also for the DataLoader path. Goal >= 0.8 on a GPU.
  b  the paper run matrix's wall time: measured by the run matrix, not here (null).
  c  CPU bf16 autocast train step / fp32 train step. Goal >= 1.8 where the CPU has AMX/AVX512-BF16.
  d  CPU fp32 train step FLOP rate / the fp32 torch.mm rate measured in the same run. Goal >= 0.6.
  e  a frozen-backbone epoch from backbone forwards / one from cached features (head only). Goal >= 50.
  f  the quick book's wall time: measured by `make book`, not here (null).

Every figure records its goal and whether it was met; a figure that fails records its error and the
others still run. Synthetic uint8 images stand in for the data (speed does not depend on pixels).
CPU timings need an idle machine; the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_train import MatmulProbe, bench as bench_step, make_step, sync
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxrlib import distributed, images, models  # noqa: E402
from cxrlib.infer import amp_dtype, backbone_features, cpu_has_fast_bf16, forward_all  # noqa: E402
from cxrlib.loop import FitOptions, fit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"a": 0.8, "c": 1.8, "d": 0.6, "e": 50.0}


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images in memory with labels and a transform: what images.CXRDataset holds, without files."""

    def __init__(self, n: int, size: int, seed: int, augment: bool):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        self.labels = rng.integers(0, 3, n).astype(np.int64)
        self.transform = images.make_transform("imagenet", train=augment)
        self.table = pd.DataFrame({"row": range(n)})

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i]), i


def hardware(device: torch.device) -> dict:
    """What the figures were measured on."""
    cpu_model, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu_model = re.search(r"model name\s*:\s*(.*)", info).group(1)
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
        flags = [f for f in wanted if re.search(rf"\b{f}\b", info)]
    except (OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model, "cpu_flags": flags, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda if gpu else None, "load_average_at_start": os.getloadavg()[0],
            "device": str(device), "python": platform.python_version()}


def figure(name: str, goal: float | None, work: Callable[[], dict]) -> dict:
    """Run one measurement; its ratio against the goal, or the error that stopped it."""
    print(f"[{name}] ...", flush=True)
    start = time.perf_counter()
    try:
        out = work()
    except Exception as err:  # fail soft: the other figures still run
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}", "goal": goal, "met": None}
    ratio = out.get("ratio")
    applies = out.pop("goal_applies", True)
    out.update(goal=goal, met=None if ratio is None or goal is None or not applies else bool(ratio >= goal),
               bench_seconds=round(time.perf_counter() - start, 1))
    print(f"[{name}] ratio {ratio if ratio is None else round(ratio, 3)} (goal {goal}): {out['met']}", flush=True)
    return out


def bare_step_rate(size: int, batch: int, device: torch.device, amp: str, seconds: float) -> float:
    """Images per second of the bare train step (random batch already on the device), as fit runs it."""
    step = make_step(size, batch, True, amp_dtype(amp, device), device)
    for _ in range(3):
        step()
    times = []
    while len(times) < 5 or sum(times) < seconds:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def fit_rate(args, device: torch.device, device_batches: bool) -> dict:
    """Train images per second of fit's epochs after the first (validation included). Checkpoints are written
    as in a run; their cost (with set-up) is outside_epochs_seconds."""
    train_set = ArrayDataset(args.n_train, args.image_size, 0, augment=True)
    val_set = ArrayDataset(args.n_val, args.image_size, 1, augment=False)
    torch.manual_seed(0)
    model = models.build_model("resnet50", "none", 3)[0]
    opts = FitOptions(epochs=args.epochs, batch_size=args.batch_size, patience=0, device=str(device),
                      amp=args.amp, progress=False, device_batches=device_batches,
                      num_workers=0 if device_batches else args.workers)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = fit(model, train_set, val_set, nn.CrossEntropyLoss(), opts, out)
        wall = time.perf_counter() - start
    epoch_s = float(result.history["seconds"].iloc[1:].median())
    epochs = result.history["seconds"]
    return {"images_per_s": args.n_train / epoch_s, "epoch_seconds": epochs.round(3).tolist(),
            "fit_wall_seconds": round(wall, 2), "outside_epochs_seconds": round(wall - float(epochs.sum()), 2),
            "num_workers": opts.num_workers}


def figure_a(args, device: torch.device) -> dict:
    bare = bare_step_rate(args.image_size, args.batch_size, device, args.amp, args.seconds)
    fast = fit_rate(args, device, device_batches=True)
    out = {"bare_step_images_per_s": bare, "fit_device_batches": fast, "ratio": fast["images_per_s"] / bare,
           "image_size": args.image_size, "batch_size": args.batch_size, "n_train": args.n_train, "n_val": args.n_val,
           "amp_dtype": str(amp_dtype(args.amp, device)), "channels_last": True}
    if not args.skip_loader:
        loader = fit_rate(args, device, device_batches=False)
        out.update(fit_dataloader=loader, ratio_dataloader=loader["images_per_s"] / bare)
    return out


def figure_c(args) -> dict:
    cpu = torch.device("cpu")
    rates = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        step = make_step(args.cpu_size, args.cpu_batch, True, dtype, cpu)
        step()
        times = []
        while len(times) < args.min_steps or sum(times) < args.cpu_seconds:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rates[name] = args.cpu_batch / statistics.median(times)
    supported = cpu_has_fast_bf16()
    return {"fp32_images_per_s": rates["fp32"], "bf16_images_per_s": rates["bf16"],
            "ratio": rates["bf16"] / rates["fp32"], "cpu_fast_bf16": supported, "goal_applies": supported,
            "note": "" if supported else "this CPU has neither AMX nor AVX512-BF16: bf16 is emulated, the goal "
                                         "does not apply and amp=auto trains in fp32 here",
            "image_size": args.cpu_size, "batch_size": args.cpu_batch}


def figure_d(args) -> dict:
    cpu = torch.device("cpu")
    probe = MatmulProbe(cpu, torch.float32, 2048 if args.quick else 4096)
    rows = [bench_step(args.cpu_size, args.cpu_batch, cl, None, cpu, args.cpu_seconds, probe) for cl in (False, True)]
    for _ in range(10):  # the run's best matmul rate: the machine's practical fp32 peak
        probe.once()
    best = max(rows, key=lambda r: r["achieved_gflops"])
    return {"ratio": best["achieved_gflops"] / probe.peak, "matmul_peak_gflops": probe.peak,
            "best_layout": "channels_last" if best["channels_last"] else "contiguous",
            "ratio_to_adjacent_matmul": best["fraction_of_adjacent_matmul"], "rows": rows,
            "flops": "counted by torch.utils.flop_counter (forward + backward convolutions and matmuls)"}


def figure_e(args, device: torch.device) -> dict:
    sets = {s: ArrayDataset(n, args.image_size, k, augment=False) for k, (s, n) in
            enumerate((("train", args.n_train), ("val", args.n_val)))}
    torch.manual_seed(0)
    features, head = models.backbone_and_head(models.build_model("resnet50", "none", 3)[0])
    batch = args.eval_batch_size
    forward_all(features, sets["val"], batch_size=batch, device=device, amp=args.amp)  # warm-up
    sync(device)
    start = time.perf_counter()
    cached = {s: backbone_features(features, ds, batch_size=batch, device=device, amp=args.amp)
              for s, ds in sets.items()}
    sync(device)
    forward_s = time.perf_counter() - start
    opts = FitOptions(epochs=3, batch_size=args.batch_size, patience=0, device=str(device), amp=args.amp,
                      progress=False)
    result = fit(head, cached["train"], cached["val"], nn.CrossEntropyLoss(), opts)
    head_s = float(result.history["seconds"].iloc[1:].median())
    return {"forward_epoch_seconds": forward_s, "cached_epoch_seconds": head_s, "ratio": forward_s / head_s,
            "note": "backbone forward over train + val (what every epoch would pay without the feature cache) / "
                    "a head-only epoch on cached features (train + validation)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute on a CPU")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (figures a and e)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3, help="fit epochs for figure a (the first is warm-up)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the comparison in figure a")
    parser.add_argument("--skip-loader", action="store_true", help="figure a without the DataLoader comparison")
    parser.add_argument("--only", default="acde", help="which figures to measure, e.g. 'ae'")
    args = parser.parse_args()
    device = distributed.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # as fit sets it, so the bare step is not handicapped
    quick = args.quick
    args.image_size = args.image_size or (224 if gpu else 64 if quick else 128)
    args.n_train = args.n_train or (4356 if gpu else 32 if quick else 512)
    args.n_val = args.n_val or (937 if gpu else 8 if quick else 128)
    if quick and not gpu:
        args.batch_size, args.eval_batch_size, args.epochs = min(args.batch_size, 8), 64, 2
    args.seconds = 1.0 if quick else 5.0
    args.cpu_size, args.cpu_batch, args.cpu_seconds = (64, 4, 0.5) if quick else (224, 32, 8.0)
    args.min_steps = 2 if quick else 3
    if not gpu:
        args.workers = 0  # no worker processes on a CPU that also trains
    print(f"bench_speed on {device}: {args.image_size} px, batch {args.batch_size}, {args.n_train} + {args.n_val} "
          f"images, {torch.get_num_threads()} threads", flush=True)
    report = {"hardware": hardware(device), "args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    skipped = {"goal": None, "met": None, "ratio": None}
    work = {"a": lambda: figure_a(args, device), "c": lambda: figure_c(args), "d": lambda: figure_d(args),
            "e": lambda: figure_e(args, device)}
    figures = {}
    for name in "abcdef":
        if name == "b":
            figures[name] = {**skipped, "note": "the paper run matrix's wall time is measured by the run matrix"}
        elif name == "f":
            figures[name] = {**skipped, "note": "the quick book's wall time is measured by make book"}
        elif name in args.only:
            figures[name] = figure(name, GOALS[name], work[name])
        else:
            figures[name] = {**skipped, "note": "not asked for (--only)"}
    report["figures"] = figures
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
