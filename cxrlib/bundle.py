"""Results bundles: what the published book renders, without data, GPU or training.

A bundle is a folder (committed under `results/<name>/`)::

    bundle.json       data fingerprints, code commit, hardware, wall time, what did not run and why
    runs/<run>/       run folders without model weights (params, metrics, history, predictions, status)
    chapters/*.ipynb  the executed chapters
    bench/*.json      speed figures with the hardware they came from

`pack` makes one from a run root (after `python -m cxrlib.runs`), `render` puts its chapters where
the book build reads them. `make book` renders the committed bundle; `make book PROFILE=quick` and
`make book CORONAHACK_DIR=...` execute first and render the bundle they made.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat

from .errors import CXRError
from .rundir import read_status

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "book" / "generated"
RECORD = "bundle.json"
# What a run folder keeps in a bundle: everything but the weights and checkpoints.
RUN_FILES = ("params.json", "config.json", "metrics.json", "history.csv", "predictions.csv", "status",
             "notebook.ipynb")
MAX_BYTES = 30 * 2**20  # the size a committed bundle should stay under


def pack(run_root: str | Path, out: str | Path, *, chapters: str | Path | None = None,
         bench: list[str | Path] = (), data_dirs: list[str | Path] = (), note: str = "",
         commit: str = "", also: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Copy the run folders of `run_root` (no weights), `chapters/*.ipynb` and bench JSON into `out`.

    `also` ({name: run root}) adds run roots made apart from the matrix (e.g. an experiment trained on another
    machine and at other settings) under `out/<name>/`; bundle.json lists their runs under `also`.
    """
    run_root, out = Path(run_root), Path(out)
    runs = _copy_runs(run_root, out / "runs")
    extra = {name: _copy_runs(Path(root), out / name) for name, root in (also or {}).items()}
    for name in ("matrix.json",):
        if (run_root / name).is_file():
            shutil.copyfile(run_root / name, out / name)
    if chapters:
        (out / "chapters").mkdir(exist_ok=True)
        for nb in sorted(Path(chapters).glob("*.ipynb")):
            public_chapter(nb, out / "chapters" / nb.name)
    for path in map(Path, bench):
        (out / "bench").mkdir(exist_ok=True)
        shutil.copyfile(path, out / "bench" / path.name)
    matrix = _read_json(run_root / "matrix.json")
    record = {
        "name": out.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_commit": commit or _git_commit(runs),  # given where the run machine has no git checkout
        "hardware": sorted({r["device"] for r in runs if r.get("device")}),
        "data_fingerprints": sorted({r["data_fingerprint"] for r in runs if r.get("data_fingerprint")}),
        "data": [_data_record(Path(d)) for d in data_dirs],
        "wall_seconds": matrix.get("wall_seconds"),
        "not_run": matrix.get("not_run", []),
        "runs": runs,
        "also": extra,
        "note": note,
    }
    (out / RECORD).write_text(json.dumps(record, indent=2))
    record["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / RECORD).write_text(json.dumps(record, indent=2))
    return record


def _copy_runs(run_root: Path, target_root: Path) -> list[dict[str, Any]]:
    """Copy each run folder of `run_root` without weights; their summaries for bundle.json."""
    if not run_root.is_dir():
        raise CXRError(f"{run_root}: no such run root")
    target_root.mkdir(parents=True, exist_ok=True)
    runs = []
    for run_dir in sorted(p for p in run_root.iterdir() if p.is_dir()):
        kept = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
        kept += [p for p in run_dir.glob("external/*/*") if p.suffix in (".csv", ".json")]
        if not kept:
            continue
        for path in kept:
            target = target_root / run_dir.name / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        runs.append(_run_summary(run_dir))
    return runs


def public_chapter(source: str | Path, target: str | Path) -> Path:
    """Copy an executed chapter without the folder names of the machine that executed it: the absolute paths
    in papermill's injected parameters and metadata become `…/<last two parts>` (a download of the
    chapter's notebook should not show where someone kept their data)."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = _ABSOLUTE.sub(_short_path, cell.source)
    papermill = nb.metadata.get("papermill", {})
    if papermill:
        nb.metadata["papermill"] = json.loads(_ABSOLUTE.sub(_short_path, json.dumps(papermill)))
    nbformat.write(nb, target)
    return Path(target)


_ABSOLUTE = re.compile(r"(?<=[\"'=,])/[^\"'\s,]+")  # an absolute path: a quoted value, or after NAME= / a comma


def _short_path(match: re.Match) -> str:
    parts = Path(match.group(0)).parts[1:]
    return "…/" + "/".join(parts[-2:]) if len(parts) > 2 else match.group(0)


def load(bundle: str | Path) -> dict[str, Any]:
    """A bundle's record, with a clear error when the folder is not a bundle."""
    path = Path(bundle) / RECORD
    if not path.is_file():
        raise CXRError(f"{bundle} is not a results bundle (no {RECORD}); make one with `python -m cxrlib.bundle pack`")
    return json.loads(path.read_text())


def render(bundle: str | Path, generated: str | Path = GENERATED) -> list[Path]:
    """Put the bundle's executed chapters where the book build reads them; nothing is executed."""
    load(bundle)
    chapters = sorted((Path(bundle) / "chapters").glob("*.ipynb"))
    if not chapters:
        raise CXRError(f"{bundle}/chapters holds no executed chapter")
    generated = Path(generated)
    if generated.exists():
        shutil.rmtree(generated)
    generated.mkdir(parents=True)
    for nb in chapters:
        shutil.copyfile(nb, generated / nb.name)
    (generated / "verdict.md").write_text(verdict_markdown(bundle))
    (generated / "speed.md").write_text(speed_markdown(bundle))
    return [generated / nb.name for nb in chapters]


def verdict_markdown(bundle: str | Path) -> str:
    """The intro's verdict paragraph: each of the paper's claims with its computed verdict, from the bundle."""
    from . import results

    bundle = Path(bundle)
    record = load(bundle)
    runs = results.load_runs(bundle / "runs") if (bundle / "runs").is_dir() else None
    if runs is None or runs.empty:
        return "*This bundle holds no run, so no claim could be tested.*\n"
    claims = results.claims_table(runs, results.read_not_run(bundle))
    done = runs[runs.status == "complete"]
    lines = [f"*Computed from the results bundle `{record.get('name', bundle.name)}` "
             f"({len(done)} complete run(s) of {len(runs)}, seeds {sorted(set(done.seed.dropna().astype(int)))}, "
             f"{', '.join(record.get('hardware') or ['unknown hardware'])}, code {str(record.get('code_commit'))[:10]}).*",
             ""]
    for claim, rows in claims.groupby("claim", sort=False):
        said = "; ".join(f"{r.task}: **{_short(r.verdict)}**" + (f" ({r.result})" if r.result not in ("–", "") else "")
                         for r in rows.itertuples())
        lines.append(f"- {claim} — {said}")
    return "\n".join(lines + _beyond_the_paper(bundle, record)) + "\n"


def _beyond_the_paper(bundle: Path, record: dict[str, Any]) -> list[str]:
    """The generalisation goal (chapter 6) and the train-on-lungs-removed verdict (chapter 4), where the bundle
    holds their runs: the questions the paper did not ask, computed like its claims."""
    from . import generalise, lungs_removed

    lines = []
    measures = generalise.measures(generalise.load_arms(bundle / "runs"))
    if len(measures):
        lines.append("- Generalisation (chapter 6) — " + generalise.goal_verdict(measures).split("\n")[0])
    for root in [bundle / "runs", *(bundle / name for name in record.get("also") or {})]:
        arms = lungs_removed.find_arms(root)
        if len(arms):
            table = lungs_removed.arm_table(arms)
            pooled = lungs_removed.across_seeds(table)  # repeats: their tally, not each seed's sentences
            said = pooled if len(pooled) == table["experiment"].nunique() else lungs_removed.verdicts(table)
            settings = lungs_removed.describe_settings(arms.config.iloc[0], table["seed"].unique().tolist())
            lines.append(f"- A model trained without lungs (chapter 4; {settings}) — " + " ".join(said))
    return [""] + lines if lines else []


def _short(verdict: str) -> str:
    """A verdict with its long reason left to the results chapter."""
    return verdict if len(verdict) < 120 else verdict.split(" (", 1)[0] + " (why: chapter 5)"


def speed_markdown(bundle: str | Path) -> str:
    """The Reproducing chapter's speed table, from the bundle's benchmark JSON (with the hardware of each)."""
    rows = []
    for path in sorted((Path(bundle) / "bench").glob("*.json")):
        bench = json.loads(path.read_text())
        hardware = bench.get("hardware", {})
        where = hardware.get("gpu") or hardware.get("cpu") or hardware.get("device") or path.stem
        busy = hardware.get("load_average_at_start")
        if not hardware.get("gpu") and busy:  # CPU figures on a shared machine say little: show how busy it was
            where += f" ({hardware.get('cpu_count', '?')} cores, load average {busy[0] if isinstance(busy, list) else busy} at start)"
        for key, fig in sorted((bench.get("figures") or {}).items()):
            if not isinstance(fig, dict) or fig.get("ratio") is None:
                continue
            met = {True: "met", False: "not met", None: "n/a"}.get(fig.get("met"), "n/a")
            rows.append(f"| ({key}) {fig.get('what', '')} | {fig['ratio']:.3g} | {fig.get('goal', '–')} | {met} | {where} |")
    record = load(bundle)
    if record.get("wall_seconds"):
        done = sum(r.get("status") == "complete" for r in record.get("runs", []))
        rows.append(f"| (b) run matrix wall time: {done} complete run(s) | {record['wall_seconds']:.0f} s | "
                    f"≤ 600 s for 24 runs | see text | {', '.join(record.get('hardware') or [])} |")
    if not rows:
        return "*This bundle holds no benchmark results.*\n"
    return "\n".join(["| figure | measured | goal | | hardware |", "|---|---|---|---|---|", *rows]) + "\n"


def split_weights(checkpoint: str | Path, out: str | Path, chunk_mib: float = 15) -> list[Path]:
    """Write a model.pt as fp16 chunks small enough to come back from a machine that returns few, small
    files; `join_weights` restores a loadable model.pt (float tensors in fp32 again, rounded by fp16)."""
    import io

    import torch

    checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k: v.half() if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    checkpoint["carried_as"] = "fp16 chunks (cxrlib.bundle.split_weights)"
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data, size = buf.getvalue(), int(chunk_mib * 2**20)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for k in range(0, len(data), size):
        parts.append(out / f"weights.part{k // size:02d}")
        parts[-1].write_bytes(data[k:k + size])
    return parts


def join_weights(parts: list[str | Path], out: str | Path) -> Path:
    """The model.pt that `split_weights` cut up, float tensors back in fp32."""
    import io

    import torch

    data = b"".join(Path(p).read_bytes() for p in sorted(map(str, parts)))
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k: v.float() if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, out)
    return Path(out)


def _run_summary(run_dir: Path) -> dict[str, Any]:
    params = _read_json(run_dir / "params.json")
    metrics = _read_json(run_dir / "metrics.json")
    return {"run": run_dir.name, "status": read_status(run_dir),
            "data_fingerprint": (params.get("data") or {}).get("fingerprint") or metrics.get("data_fingerprint"),
            "device": metrics.get("device") or params.get("device"),
            "git_commit": metrics.get("git_commit") or params.get("git_commit"),
            "train_seconds": metrics.get("train_seconds")}


def _data_record(folder: Path) -> dict[str, Any]:
    """Where the data came from: the transport record when the folder is a transport copy."""
    transport = _read_json(folder / "TRANSPORT.json")
    return {"folder": folder.name, "transport_copy": transport or None}


def _git_commit(runs: list[dict[str, Any]]) -> str | None:
    commits = {r["git_commit"] for r in runs if r.get("git_commit")}
    if len(commits) == 1:
        return commits.pop()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, examples

    parser = argparse.ArgumentParser(prog="python -m cxrlib.bundle", description=__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="make a bundle from a run root", formatter_class=HelpFormatter,
                       description="Copies a run root's run folders (without weights), executed chapters and "
                                   "speed figures into a bundle folder and writes its bundle.json.",
                       epilog=examples("python -m cxrlib.bundle pack runs/quick/synthetic _build/bundle-quick "
                                       "--chapters book/generated --note 'by hand'"))
    p.add_argument("run_root", help="folder of run folders (python -m cxrlib.runs --where prints it)")
    p.add_argument("out", help="bundle folder to write, e.g. results/paper-h200")
    p.add_argument("--chapters", default="", help="folder of executed chapter notebooks to include (empty: none)")
    p.add_argument("--bench", nargs="*", default=[], help="benchmark JSON files to include")
    p.add_argument("--data", nargs="*", default=[], help="data folders used (their TRANSPORT.json is recorded)")
    p.add_argument("--note", default="", help="free text kept in bundle.json")
    p.add_argument("--commit", default="", help="code commit, where the run folder's machine has no git checkout "
                                                "(empty: this checkout's)")
    p.add_argument("--also", nargs="*", default=[], metavar="NAME=RUN_ROOT",
                   help="other run roots to include under NAME/ (e.g. an experiment run apart from the matrix)")
    r = sub.add_parser("render", help="copy a bundle's executed chapters into book/generated/",
                       formatter_class=HelpFormatter, description="Puts a bundle's chapters where the book build "
                       "reads them (then: jupyter-book build .).",
                       epilog=examples("python -m cxrlib.bundle render results/paper-h200"))
    r.add_argument("bundle", help="bundle folder, e.g. results/paper-h200")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            also = dict(item.partition("=")[::2] for item in args.also)
            if not all(also) or not all(also.values()):
                raise CXRError(f"--also {' '.join(args.also)}: give NAME=RUN_ROOT")
            record = pack(args.run_root, args.out, chapters=args.chapters or None, bench=args.bench,
                          data_dirs=args.data, note=args.note, commit=args.commit, also=also)
            print(f"bundle {args.out}: {len(record['runs'])} runs, {record['bytes'] / 2**20:.1f} MiB"
                  + (" (over the 30 MiB a committed bundle should stay under)" if record["bytes"] > MAX_BYTES else ""))
        else:
            for path in render(args.bundle):
                print(f"rendered {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    except CXRError as err:
        print(f"cxrlib.bundle {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
