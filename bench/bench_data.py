"""Benchmark (run by hand, not in CI): the cached loader vs decoding the files every epoch.

    python bench/bench_data.py [--n 120] [--px 2000] [--size 224]

Makes `--n` full-size (~2000 px) JPEGs in a temporary folder outside the repository (upsampled from
../shared/data when present, else from the synthetic default), then times one pass over the same
images at the same size through both paths, each ending in the same tensor transform:
  decode  -- read, decode, resize every file (what an uncached Dataset does each epoch);
  cached  -- a *new run* on a warm cache: stat the files (only changed ones are re-hashed), read the
             memory-mapped store (what CXRDataset does once per run), then transform; later
             epochs skip even that.
Prints images/s of each and the ratio (goal: >= 10x).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxrlib.images import ImageCache, decode_image, make_transform, resize_square  # noqa: E402
from cxrlib.synthetic import ensure_synthetic  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def source_images(n: int) -> list[Path]:
    real = sorted((SHARED / "coronahack").rglob("*.jpeg"))[::20] + sorted((SHARED / "covid-chestxray-dataset").rglob("*.jpg"))[::5]
    if len(real) >= 10:
        return real[:n]
    coronahack, extra = ensure_synthetic()
    return (sorted(coronahack.rglob("*.jpeg")) + sorted(extra.rglob("*.jp*g")))[:n]


def make_full_size(sources: list[Path], n: int, px: int, folder: Path) -> list[str]:
    paths = []
    for i in range(n):
        img = decode_image(sources[i % len(sources)])
        scale = px / max(img.shape)
        big = Image.fromarray(img).resize((round(img.shape[1] * scale), round(img.shape[0] * scale)), Image.BICUBIC)
        noise = np.random.default_rng(i).integers(-2, 3, (big.height, big.width))  # distinct files
        path = folder / f"full-{i:04d}.jpg"
        Image.fromarray(np.clip(np.asarray(big, int) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--px", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers; tiny tensor ops are slower with a thread pool
    work = Path(tempfile.mkdtemp(prefix="cxrlib-bench-"))  # outside the repository
    try:
        paths = make_full_size(source_images(args.n), args.n, args.px, work)
        transform = make_transform("imagenet")
        print(f"{len(paths)} JPEGs of ~{args.px} px ({sum(Path(p).stat().st_size for p in paths) / 1e6:.0f} MB), size {args.size}")

        start = time.perf_counter()
        for p in paths:
            transform(resize_square(decode_image(p), args.size))
        decode_s = time.perf_counter() - start

        cold = ImageCache(args.size, root=work / "cache")
        start = time.perf_counter()
        cold.load(paths)
        build_s = time.perf_counter() - start

        warm = ImageCache(args.size, root=work / "cache")  # a later run: nothing decoded
        start = time.perf_counter()
        images, _ = warm.load(paths)
        for img in images:
            transform(img)
        cached_s = time.perf_counter() - start
        assert warm.decoded_count == 0

        start = time.perf_counter()
        for img in images:  # a later epoch of the same run
            transform(img)
        epoch_s = time.perf_counter() - start

        rate = lambda s: len(paths) / s  # noqa: E731
        print(f"decode every epoch : {rate(decode_s):8.1f} images/s")
        print(f"cache build (once) : {rate(build_s):8.1f} images/s ({cold.workers} threads)")
        print(f"cached, new run    : {rate(cached_s):8.1f} images/s")
        print(f"cached, next epoch : {rate(epoch_s):8.1f} images/s")
        print(f"ratio cached/decode: {decode_s / cached_s:.1f}x (new run), {decode_s / epoch_s:.1f}x (next epoch)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
