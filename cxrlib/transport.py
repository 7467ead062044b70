"""A smaller copy of a data folder, in the publisher's own layout, to carry to a GPU machine.

The lent GPU machine takes at most 64 MiB of files with it, so the real data travels re-encoded:
images whose longer side exceeds `max_side`, and every PNG, are written as JPEG (under their
original file names, so the readers find them) with the longer side at most `max_side`; JPEGs
already small enough are copied byte for byte; everything else (CSV metadata) is copied unchanged.
Training resizes to a square of at most `max_side` anyway, so results differ only by JPEG
re-encoding of the re-written files. `TRANSPORT.json` in the copy records what was done, so a
results bundle can say which data it was trained on.

    python -m cxrlib.transport ../shared/data .transport/data --max-side 224 --quality 85
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import CXRError, report

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
RECORD = "TRANSPORT.json"


def transport_copy(src: str | Path, dst: str | Path, *, max_side: int = 224, quality: int = 85) -> dict:
    """Copy `src` to `dst` as described in the module docstring; returns (and writes) the record."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CXRError(f"{src}: not a folder")
    counts = {"copied": 0, "reencoded": 0, "other_files": 0}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            shutil.copyfile(path, out)
            counts["other_files"] += 1
            continue
        try:
            with Image.open(path) as img:
                small_jpeg = img.format == "JPEG" and max(img.size) <= max_side
                if not small_jpeg:
                    img = img.convert("L")
                    img.thumbnail((max_side, max_side), Image.LANCZOS)
                    img.save(out, "JPEG", quality=quality)
                    counts["reencoded"] += 1
                    continue
        except (UnidentifiedImageError, OSError) as err:
            raise CXRError(f"{path}: cannot read image ({err})") from err
        shutil.copyfile(path, out)
        counts["copied"] += 1
    record = {"source": str(src.resolve()), "max_side": max_side, "jpeg_quality": quality, **counts,
              "bytes": sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()),
              "note": (f"images with a longer side over {max_side} px, and every PNG, re-encoded as 8-bit "
                       f"grayscale JPEG (quality {quality}) under their original names; smaller JPEGs copied "
                       "byte for byte; metadata unchanged")}
    (dst / RECORD).write_text(json.dumps(record, indent=2))
    return record


def build_parser() -> argparse.ArgumentParser:
    import inspect

    from .cli import HelpFormatter, at_least, examples

    defaults = inspect.signature(transport_copy).parameters
    parser = argparse.ArgumentParser(prog="python -m cxrlib.transport", description=__doc__.split("\n\n    ")[0],
                                     formatter_class=HelpFormatter,
                                     epilog=examples("python -m cxrlib.transport ../shared/data .transport/data "
                                                     "--max-side 224 --quality 85"))
    parser.add_argument("src", help="data folder to copy (e.g. ../shared/data)")
    parser.add_argument("dst", help="where the copy goes")
    parser.add_argument("--max-side", type=at_least(1), default=defaults["max_side"].default,
                        help="longest image side in the copy")
    parser.add_argument("--quality", type=at_least(1), default=defaults["quality"].default,
                        help="JPEG quality of re-encoded images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def copy() -> None:
        record = transport_copy(args.src, args.dst, max_side=args.max_side, quality=args.quality)
        print(json.dumps(record, indent=2))

    return report("cxrlib.transport", copy)


if __name__ == "__main__":
    raise SystemExit(main())
