"""ResNet50 training throughput, and how close it gets to the machine's own matmul rate.

Run by hand (not in CI): `python bench/bench_train.py [--quick] [--threads N] [--device cuda]`.
For 128 and 224 px it times full training steps (forward, backward, AdamW step, as cxrlib.loop.fit
runs them) for both memory layouts and a few batch sizes, counts the FLOPs of one step with
torch.utils.flop_counter.FlopCounterMode, and divides the achieved FLOP rate by the torch.mm rate
measured in the same run (fp32 on CPU; bf16 on a GPU, where fit trains under bf16 autocast). CPU
timings are only meaningful on an otherwise idle machine: the load average is recorded, and with
other processes on the cores, OpenMP threads wait for each other at every parallel region.
Results go to stdout and bench/results/bench_train-<time>.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulProbe:
    """The torch.mm rate on n x n matrices (2 n^3 FLOPs each), measured again and again during the run.

    `peak` is the best rate seen in the whole run (the machine's practical peak); `once()` is one
    product's rate, timed next to a training step so both see the same competition for the cores.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.device, self.n = device, n
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.peak = 0.0
        for _ in range(6):  # the first products warm up the thread pool / cuBLAS
            self.once()

    def once(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        sync(self.device)
        rate = 2 * self.n**3 / (time.perf_counter() - start) / 1e9
        self.peak = max(self.peak, rate)
        return rate


def make_step(size: int, batch: int, channels_last: bool, autocast: torch.dtype | None, device: torch.device):
    """A ResNet50 (3 classes) training step on a fixed random batch, as fit() runs it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=3).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as loop.make_optimizer
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(step) -> int:
    """FLOPs of one training step (convolutions and matmuls, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def bench(size: int, batch: int, channels_last: bool, autocast: torch.dtype | None, device: torch.device,
          seconds: float, probe: MatmulProbe) -> dict:
    step = make_step(size, batch, channels_last, autocast, device)
    for _ in range(2):  # warm-up: oneDNN / cuDNN pick and cache their kernels for these shapes
        step()
    flops = step_flops(step)
    times, fractions = [], []
    while len(times) < 3 or sum(times) < seconds:
        mm_rate = probe.once()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        fractions.append(flops / times[-1] / 1e9 / mm_rate)
    median = statistics.median(times)  # robust to a step slowed by another process
    return {
        "image_size": size, "batch_size": batch, "channels_last": channels_last,
        "autocast": str(autocast).replace("torch.", "") if autocast else "fp32", "steps": len(times),
        "median_step_s": median, "images_per_s": batch / median, "gflop_per_image": flops / 1e9 / batch,
        "achieved_gflops": flops / median / 1e9, "fraction_of_adjacent_matmul": statistics.median(fractions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations, shorter timings")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (CPU)")
    parser.add_argument("--seconds", type=float, default=None, help="minimum timing per configuration")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    load = os.getloadavg()[0]
    if not gpu and load > 0.5:
        print(f"warning: load average {load:.1f}: other processes share the CPU; timings will be low and noisy")

    peak_dtype = torch.bfloat16 if gpu else torch.float32
    probe = MatmulProbe(device, peak_dtype, 8192 if gpu else 4096)
    name = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
    print(f"{str(peak_dtype).replace('torch.', '')} torch.mm: {probe.peak:.1f} GFLOP/s on {device.type} ({name}) "
          "so far; 'of peak' uses the best rate of the whole run, 'of adj.' the product timed next to each step")
    if gpu:
        batches, autocasts = ((64,) if args.quick else (64, 128, 256)), (torch.bfloat16,)
    else:
        batches, autocasts = ((32,) if args.quick else (16, 32, 64)), (None,)
    configs = [(size, batch, cl, ac) for size in (128, 224) for batch in batches for cl in (False, True)
               for ac in autocasts]
    if not gpu:  # bf16 autocast on CPU (AMX where present): not fp32, so reported beside, not as the goal
        configs += [(size, 32, True, torch.bfloat16) for size in (128, 224)]
    rows = []
    print(f"{'px':>4} {'batch':>5} {'layout':>14} {'dtype':>8} {'img/s':>8} {'GFLOP/img':>9} {'GFLOP/s':>9} "
          f"{'of adj.':>7}")
    for size, batch, channels_last, autocast in configs:
        row = bench(size, batch, channels_last, autocast, device, seconds, probe)
        rows.append(row)
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{size:>4} {batch:>5} {layout:>14} {row['autocast']:>8} {row['images_per_s']:>8.2f} "
              f"{row['gflop_per_image']:>9.2f} {row['achieved_gflops']:>9.1f} "
              f"{row['fraction_of_adjacent_matmul']:>7.1%}", flush=True)
    peak = probe.peak
    for row in rows:
        row["fraction_of_peak_matmul"] = row["achieved_gflops"] / peak
    print(f"best {str(peak_dtype).replace('torch.', '')} torch.mm rate of the run: {peak:.1f} GFLOP/s")
    goal_dtype = "bfloat16" if gpu else "fp32"
    best = {}
    for size in (128, 224):
        same = [r for r in rows if r["image_size"] == size and r["autocast"] == goal_dtype]
        best[size] = b = max(same, key=lambda r: r["images_per_s"])
        print(f"best {goal_dtype} at {size} px: {b['images_per_s']:.2f} img/s (batch {b['batch_size']}, "
              f"{'channels_last' if b['channels_last'] else 'contiguous'}), {b['achieved_gflops']:.1f} GFLOP/s "
              f"= {b['fraction_of_peak_matmul']:.1%} of the run's peak {goal_dtype} matmul rate, "
              f"{b['fraction_of_adjacent_matmul']:.1%} of the products timed beside its steps")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_train-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "device": name, "matmul_dtype": str(peak_dtype), "matmul_peak_gflops": peak, "threads": torch.get_num_threads(),
        "load_average_at_start": load, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "results": rows, "best": {str(k): v for k, v in best.items()},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
