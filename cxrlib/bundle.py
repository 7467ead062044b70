"""Results bundles: what the published book renders, without data, GPU or training.

A bundle is a folder (committed under `results/<name>/`)::

    bundle.json       data fingerprints, code commit, hardware, wall time, what did not run and why, planned
                      runs packed without a result (`pack --partial`)
    claims.json       the paper's claims with their verdicts, as the results chapter computed them
    generalisation.json, ages.csv   chapter 6's goal verdicts, and the ages behind its "adults"
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
from pathlib import Path
from typing import Any

import nbformat

from .errors import CXRError, report
from .paths import GENERATED, ROOT
from .rundir import MANIFEST, MATRIX, METRICS, NOT_THERE, PARAMS, PLANNED, PREDICTIONS, open_run, read_status, settle

RECORD = "bundle.json"
# What a run folder keeps in a bundle: everything but the weights and checkpoints.
RUN_FILES = (PARAMS, PLANNED, METRICS, "history.csv", PREDICTIONS, "status", "notebook.ipynb", MANIFEST)
MAX_BYTES = 30 * 2**20  # the size a committed bundle should stay under
REQUIRED_RUN_FILES = (PARAMS, METRICS, PREDICTIONS, "history.csv")  # what a complete run keeps
CLAIMS = "claims.json"  # written into the run root by the results chapter (results.save_claims)
GENERALISATION = "generalisation.json"  # written into the run root by chapter 06 (generalise.save_summary)
AGES = "ages.csv"  # beside it, the ages its "adults" rest on (generalise.AGES), so `cxrlib verify` can recompute it


def pack(run_root: str | Path, out: str | Path, *, chapters: str | Path | None = None,
         bench: list[str | Path] = (), data_dirs: list[str | Path] = (), note: str = "",
         commit: str = "", also: dict[str, str | Path] | None = None, scratch: bool = False,
         partial: bool = False) -> dict[str, Any]:
    """Copy the run folders of `run_root` (no weights), `chapters/*.ipynb` and bench JSON into `out`.

    `also` ({name: run root}) adds run roots made apart from the matrix (e.g. an experiment trained on another
    machine and at other settings) under `out/<name>/`; bundle.json lists their runs under `also`. A bundle is
    made to be committed, so a destination whose files git would ignore is refused before anything is written
    (the 14 run folders of an earlier bundle were lost that way); `scratch=True` is for bundles that are only
    rendered (`make book PROFILE=quick` packs into _build/).

    A run root whose matrix.json plans runs that have no result yet (missing, interrupted or still running:
    `rundir.settle`; e.g. a shard that has not run) is refused, unless `partial`: bundle.json then lists them under
    "missing" (it is [] for a whole matrix).
    """
    run_root, out = Path(run_root), Path(out)
    missing = [str(p) for p in bench if not Path(p).is_file()]
    if missing:
        raise CXRError(f"benchmark file(s) not found: {', '.join(missing)}")
    absent = [{"run": r["run"], "state": r["state"]} for r in settle(run_root) if r["state"] in NOT_THERE]
    if absent and not partial:
        shown = ", ".join(f"{r['run']} ({r['state']})" for r in absent[:3]) + (
            f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise CXRError(f"{run_root}: {len(absent)} planned run(s) have no result: {shown}; finish them (rerun the "
                       "matrix or its shards; python -m cxrlib.runs --gather lists them) or pack what is there with "
                       "--partial (bundle.json lists them as missing)")
    if not scratch:
        refuse_ignored(out, run_root, also or {})
    runs = _copy_runs(run_root, out / "runs")
    extra = {name: _copy_runs(Path(root), out / name) for name, root in (also or {}).items()}
    for name in (MATRIX, CLAIMS, GENERALISATION, AGES):
        if (run_root / name).is_file():
            shutil.copyfile(run_root / name, out / name)
    if chapters:
        (out / "chapters").mkdir(exist_ok=True)
        for nb in sorted(Path(chapters).glob("*.ipynb")):
            public_chapter(nb, out / "chapters" / nb.name)
    for path in map(Path, bench):
        (out / "bench").mkdir(exist_ok=True)
        shutil.copyfile(path, out / "bench" / path.name)
    matrix = _read_json(run_root / MATRIX)
    record = {
        "name": out.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_commit": commit or _git_commit(runs),  # given where the run machine has no git checkout
        "hardware": sorted({r["device"] for r in runs if r.get("device")}),
        "data_fingerprints": sorted({r["data_fingerprint"] for r in runs if r.get("data_fingerprint")}),
        "data": [_data_record(Path(d)) for d in data_dirs],
        "wall_seconds": matrix.get("wall_seconds"),
        "aggregate_train_images_per_second": _aggregate_throughput(run_root, matrix.get("wall_seconds")),
        "not_run": matrix.get("not_run", []),
        "missing": absent,
        "runs": runs,
        "also": extra,
        "note": note,
    }
    (out / RECORD).write_text(json.dumps(record, indent=2))
    record["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / RECORD).write_text(json.dumps(record, indent=2))
    return record


def refuse_ignored(out: Path, run_root: Path, also: dict[str, str | Path]) -> None:
    """A CXRError when git would ignore a file the bundle writes under `out` (inside a git work tree)."""
    probes = [out / RECORD, out / CLAIMS, out / GENERALISATION, out / AGES, out / "chapters" / "probe.ipynb",
              out / "bench" / "probe.json"]
    for sub, root in [("runs", run_root), *also.items()]:
        probes += [out / sub / "run" / name for name in RUN_FILES]
        probes += [out / sub / p.name / name for p in Path(root).glob("*") if p.is_dir() for name in RUN_FILES[:1]]
    ignored = git_ignored(probes)
    if ignored:
        shown = ", ".join(str(p) for p in ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
        raise CXRError(f"bundle destination {out}: git ignores {shown} (see `git check-ignore -v`), so the bundle "
                       f"would not be committed whole; change the ignore rule or the destination, or pass --scratch "
                       f"for a bundle that is only rendered")


def git_ignored(paths: list[Path]) -> list[Path]:
    """Those of `paths` that git would ignore; [] outside a git work tree or without git."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        return []
    cwd = next((p for p in paths[0].parents if p.is_dir()), Path.cwd())
    try:
        done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=cwd, capture_output=True,
                              text=True, input="\n".join(map(str, paths)))
    except OSError:
        return []
    if done.returncode not in (0, 1):  # 128: not a git work tree
        return []
    return [Path(line) for line in done.stdout.splitlines() if line]


def check_tracked(bundle: str | Path) -> list[str]:
    """What a committed bundle lacks in git: for every run bundle.json lists (runs and also), each of
    REQUIRED_RUN_FILES that git does not track. [] when whole."""
    bundle = Path(bundle).resolve()
    record = load(bundle)
    done = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=bundle, capture_output=True, text=True,
                          check=True)
    tracked = {bundle / p for p in done.stdout.split("\0") if p}
    listed = [("runs", r) for r in record.get("runs", [])]
    listed += [(name, r) for name, entries in (record.get("also") or {}).items() for r in entries]
    return [f"{sub}/{r['run']}/{name}" for sub, r in listed if r.get("status") == "complete"
            for name in REQUIRED_RUN_FILES if bundle / sub / r["run"] / name not in tracked]


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
        _restate_manifest(target_root / run_dir.name, {str(p.relative_to(run_dir)) for p in kept})
        runs.append(_run_summary(run_dir))
    return runs


def _restate_manifest(copy: Path, kept: set[str]) -> None:
    """The copied run's manifest lists only what the bundle keeps; the weights it leaves out are named as such,
    so the copy reads as whole (rundir.damage) and a file lost later still shows."""
    path = copy / MANIFEST
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    files = record.get("files", {})
    record["files"] = {k: v for k, v in files.items() if k in kept}
    record["left_out"] = sorted(set(files) - kept)  # by bundle pack: model weights
    path.write_text(json.dumps(record, indent=1) + "\n")


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
    (generated / "findings.md").write_text(findings_markdown(bundle))
    (generated / "speed.md").write_text(speed_markdown(bundle))
    return [generated / nb.name for nb in chapters]


def findings_markdown(bundle: str | Path) -> str:
    """The intro's first box, "what this replication found", computed from the bundle: which of the paper's arms
    ran and which could not (with the command that runs them), each claim with its verdict, number and seeds
    (claims.json, as the results chapter computed them), the questions beyond the paper, and what data and
    settings stand behind all of it."""
    from . import results

    bundle = Path(bundle)
    record = load(bundle)
    claims = results.read_claims(bundle / CLAIMS) if (bundle / CLAIMS).is_file() else None
    ran = (claims or {}).get("runs", {})
    configs = _run_configs(bundle)
    lines = [*bottom_line(bundle, record, claims, configs), "", setup_table(record, claims, configs), "",
             f"*Computed from the results bundle `{record.get('name', bundle.name)}`: "
             f"{ran.get('complete', 0)} complete run(s), {', '.join(record.get('hardware') or ['unknown hardware'])}, "
             f"code {str(record.get('code_commit'))[:10]}, made {str(record.get('created', '?'))[:10]}.*", ""]
    inits = ", ".join(ran.get("inits") or ["none"])
    not_run = record.get("not_run") or []
    if not_run:
        said = "; ".join(f"**{e.get('arm')}**: {results.public_text(str(e.get('reason', '')))}" for e in not_run)
        commands = sorted({results.public_text(str(e.get("command", ""))).split("   #")[0] for e in not_run} - {""})
        lines.append(f"\n**What could not run.** {said}. So every verdict below is about the initialisation(s) that "
                     f"ran ({inits}), not about the paper's pretrained ones."
                     + (f" Where the weights can be had, this runs them: `{commands[0]}`." if commands else ""))
    lines += ["", *_claims_said(claims)]
    beyond = _beyond_the_paper(bundle, record)
    if beyond:
        lines += ["", "**Beyond the paper:**", *beyond]
    lines += ["", f"**Data.** {_data_said(record)}"]
    return _box(lines)


TASK_WORDS = {"binary": "binary", "multiclass": "3-class"}
VERDICT_WORDS = {"supported": "supported", "not supported": "not supported",  # a verdict's start: its short form
                 "no evidence": "no evidence of a difference", "not testable": "not testable here"}


def bottom_line(bundle: str | Path, record: dict[str, Any], claims: dict[str, Any] | None,
                configs: list[dict[str, Any]]) -> list[str]:
    """The first page's three sentences in plain words, from the bundle's own records (`configs`: its runs'
    parameters): what ran and how far it is from the paper's set-up, what the paper's claims came to, whether the
    models work on people from elsewhere."""
    ran = (claims or {}).get("runs", {})
    if not ran.get("complete"):
        return ["**In short.** This bundle records no complete run of the paper's matrix, so it says nothing about "
                "the paper's claims."]
    inits = ran.get("inits") or []
    pretrained = [i for i in inits if i != "random init"]
    paper = _paper_setup()
    seeds = ran.get("seeds") or []
    first = (f"**In short.** {ran.get('complete', 0)} runs of ResNet50 from {', '.join(inits) or 'no recorded init'} "
             f"at {_listed(ran.get('image_size'))} px for {_listed(ran.get('epochs_run'))} epochs, "
             f"seed{'s' if len(seeds) > 1 else ''} {_listed(seeds)}, on "
             f"{', '.join(record.get('hardware') or ['unknown hardware'])}"
             + (", on cxrlib's synthetic images (they show that the code works and say nothing about COVID-19)"
                if _synthetic(configs) else "") + ": "
             + ("none of the paper's pretrained weights could run here, " if not pretrained else "")
             + f"against the paper's {paper['image_size']} px and up to {paper['epochs']} epochs (table below): a test "
             "of the paper's design at a small scale, not of its numbers.")
    rows = (claims or {}).get("claims", [])
    letters = list(dict.fromkeys(c["claim"].split()[0] for c in rows))  # the claims' own order
    by_verdict: dict[str, dict[str, list[str]]] = {}
    for c in rows:
        word = next((w for w in VERDICT_WORDS if c["verdict"].startswith(w)), c["verdict"])
        by_verdict.setdefault(word, {}).setdefault(c["claim"].split()[0], []).append(TASK_WORDS.get(c["task"], c["task"]))
    said = [f"{VERDICT_WORDS.get(verdict, verdict)}: " + ", ".join(
        letter + ("" if len(tasks) == len(TASK_WORDS) else " " + " and ".join(tasks))
        for letter, tasks in sorted(by_verdict[verdict].items(), key=lambda item: letters.index(item[0])))
        for verdict in dict.fromkeys([*VERDICT_WORDS, *by_verdict]) if verdict in by_verdict]
    second = ("The paper's claims: " + "; ".join(said) + "."
              if said else "No claim of the paper was tested in this bundle.")
    return [first, "", second, "", _generalisation_sentence(Path(bundle))]


def _generalisation_sentence(bundle: Path) -> str:
    """Whether the models work on people no run trained on, from chapter 6's generalisation.json."""
    if not (bundle / GENERALISATION).is_file():
        return "Whether the models work on people from elsewhere was not measured in this bundle (no chapter 6 runs)."
    summary = json.loads((bundle / GENERALISATION).read_text())
    verdict = re.sub(r"\*\*Generalisation goal: (.*?)\.\*\*.*", r"\1", summary["verdict"].split("\n")[0])
    said = {"not met": "No: on people from sources no run trained on, no arm meets the goal",
            "met": "Yes: on people from sources no run trained on, the goal is met"}.get(
        verdict, f"Not decided: on people from sources no run trained on, the goal is {verdict}")
    learned = [a["unseen_auc"]["value"] for a in (summary.get("remedies") or {}).get("arms", [])
               if a.get("learned") and a.get("unseen_auc", {}).get("value") is not None]
    if learned:
        said += (f"; threshold-free, the remedy arms that learned the task rank unseen COVID-19 images against unseen "
                 f"adults without COVID-19 at ROC AUC {min(learned):.2f} to {max(learned):.2f}, where 0.5 is chance")
    return said + " (chapter 6)."


def _paper_setup() -> dict[str, Any]:
    """The paper's set-up as this book's paper profile reads it (RunConfig's defaults under PROFILES['paper'])."""
    from .config import MATRIX_PROFILES, PROFILES, RunConfig

    return {**{k: getattr(RunConfig, k) for k in ("image_size", "epochs", "lr", "patience")}, **PROFILES["paper"],
            "seeds": MATRIX_PROFILES["paper"]["seeds"]}


def _run_configs(bundle: str | Path) -> list[dict[str, Any]]:
    """The recorded parameters of the bundle's runs (runs/), for what claims.json does not summarise."""
    return [run.config for run in filter(None, map(open_run, sorted((Path(bundle) / "runs").glob("*/"))))]


def _synthetic(configs: list[dict[str, Any]]) -> bool:
    """Whether the runs recorded no data folder or manifest at all: the synthetic default (RunConfig's rule)."""
    return bool(configs) and not any(c.get("coronahack_dir") or c.get("extra_covid_dir") or c.get("manifest")
                                     for c in configs)


def setup_table(record: dict[str, Any], claims: dict[str, Any] | None, configs: list[dict[str, Any]]) -> str:
    """The paper's set-up beside this bundle's, row by row, as a markdown table: the bundle's side read from
    claims.json's summary and its runs' recorded parameters (`configs`)."""
    ran = (claims or {}).get("runs", {})
    recorded = lambda key: _listed(sorted({c.get(key) for c in configs if c.get(key) is not None}))  # noqa: E731
    patience = sorted({c.get("patience") for c in configs if c.get("patience") is not None})
    paper = _paper_setup()
    rows = [("initialisation", "ImageNet or chest-X-ray (CheXNet) weights", ", ".join(ran.get("inits") or ["?"])),
            ("image size", f"{paper['image_size']} px", f"{_listed(ran.get('image_size'))} px"),
            ("epochs", f"up to {paper['epochs']}", f"{_listed(ran.get('epochs_run'))} (of at most "
                                                   f"{_listed(ran.get('epochs'))})"),
            ("early stopping", f"after {paper['patience']} epochs without a better validation macro-F1",
             "none" if patience == [0] else f"patience {_listed(patience)}"),
            ("learning rate", f"{paper['lr']:g}", recorded("lr")),
            ("arms", "the paper set-up: binary and 3-class, cross-entropy and focal loss, ImageNet and CheXNet "
                     "initialisation", "; ".join(ran.get("arms") or ["none"])),
            ("seeds", f"{paper['seeds']} per configuration", f"{len(ran.get('seeds') or [])} per configuration"),
            ("data", "CoronaHack + extra COVID-19 images (ieee8023)",
             "cxrlib's synthetic images" if _synthetic(configs) else
             ", ".join(e.get("folder", "?") for e in record.get("data") or []) or "not recorded"),
            ("hardware", "a GPU", ", ".join(record.get("hardware") or ["not recorded"]))]
    head = "| | the paper (as this book's paper profile reads it) | this bundle |\n|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def _claims_said(claims: dict[str, Any] | None) -> list[str]:
    """Each claim per task with its verdict, number and seeds; or why there is none."""
    if claims is None:
        return ["**No claim was tested:** this bundle holds no `claims.json` (the results chapter writes it when it "
                "runs), so there is no verdict to state."]
    lines = ["**The paper's claims** (each on its own metric; mean paired difference over seeds, 95% interval over "
             "test patients and seeds; verdicts from the p after Holm's adjustment over the family):", ""]
    by_claim: dict[str, list[dict[str, Any]]] = {}
    for c in claims.get("claims", []):
        by_claim.setdefault(c["claim"], []).append(c)
    for claim, rows in by_claim.items():
        said = "; ".join(f"{r['task']}: **{_short(r['verdict'])}**"
                         + (f" ({r['result']}; {r['seeds']})" if r.get("result") not in (None, "–", "") else "")
                         for r in rows)
        lines.append(f"- {claim} — {said}")
    return [*lines, "", claims.get("holm", "")]


def _box(lines: list[str]) -> str:
    return ":::{admonition} What this replication found\n:class: important\n\n" + "\n".join(lines) + "\n:::\n"


def _listed(values: Any) -> str:
    values = list(values or [])
    return ", ".join(map(str, values)) if values else "?"


def _data_said(record: dict[str, Any]) -> str:
    """What data copy stands behind the bundle, as bundle.json records it."""
    said, described = [], {}
    for entry in record.get("data") or []:
        copy = entry.get("transport_copy")
        if copy:
            said.append(f"`{entry['folder']}`: a transport copy of the data (longer side ≤ {copy.get('max_side')} px, "
                        f"re-encoded as JPEG quality {copy.get('jpeg_quality')} where larger; {copy.get('note', '')})")
        else:  # folders that share a README are said once
            described.setdefault(entry.get("description") or "", []).append(f"`{entry['folder']}`")
    said += [", ".join(folders) + (f": {text}" if text else "") for text, folders in described.items()]
    fingerprints = ", ".join(record.get("data_fingerprints") or []) or "none recorded"
    return ("; ".join(said) or "no data folder recorded") + f". Data fingerprint(s): {fingerprints}."


def _beyond_the_paper(bundle: Path, record: dict[str, Any]) -> list[str]:
    """The generalisation goal (chapter 6) and the train-on-lungs-removed verdict (chapter 4), where the bundle
    holds their runs: the questions the paper did not ask, computed like its claims."""
    from . import generalise, lungs_removed, remedies

    lines = []
    if (bundle / GENERALISATION).is_file():  # as chapter 6 computed it (the ages behind "adults" are not in a bundle)
        summary = json.loads((bundle / GENERALISATION).read_text())
        called = generalise.called_covid(summary)
        lines.append("- Generalisation (chapter 6) — " + summary["verdict"].split("\n")[0]
                     + (" On people it never trained on: " + "; ".join(called) + "." if called else ""))
        if summary.get("remedies"):
            lines.append(remedies.findings_line(summary["remedies"]))
    for root in [bundle / "runs", *(bundle / name for name in record.get("also") or {})]:
        arms = lungs_removed.find_arms(root)
        if len(arms):
            table = lungs_removed.arm_table(arms)
            pooled = lungs_removed.across_seeds(table)  # repeats: their tally, not each seed's sentences
            said = pooled if len(pooled) == table["experiment"].nunique() else lungs_removed.verdicts(table)
            settings = lungs_removed.describe_settings(arms.config.iloc[0], table["seed"].unique().tolist())
            lines.append(f"- A model trained without lungs (chapter 4; {settings}) — " + " ".join(said))
    return lines


def _short(verdict: str) -> str:
    """A verdict with its long reason left to the results chapter."""
    return verdict if len(verdict) < 120 else verdict.split(" (", 1)[0] + " (why: chapter 5)"


SPEED_WORDS = {"a": "fit throughput over the bare train step", "b": "run matrix",  # bench/bench_speed.py's figures
               "c": "CPU bf16 train step over fp32", "d": "CPU fp32 train step over the measured matmul rate",
               "e": "an epoch from cached backbone features over a full forward epoch"}


def speed_markdown(bundle: str | Path) -> str:
    """The Reproducing chapter's speed table, from the bundle's benchmark JSON (with the hardware of each): each
    figure named in words, its verdict against its goal, n/a where the goal is not for this hardware."""
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
            name = " ".join(filter(None, [SPEED_WORDS.get(key, key), fig.get("what", "")]))
            rows.append(f"| {name} | {fig['ratio']:.3g} | ≥ {fig.get('goal', '–')} | {met} | {where} |")
    record = load(bundle)
    hardware = ", ".join(record.get("hardware") or [])
    on_gpu = "cuda" in hardware
    if record.get("wall_seconds"):
        done = sum(r.get("status") == "complete" for r in record.get("runs", []))
        met = ("met" if record["wall_seconds"] <= 600 else "not met") if on_gpu else "n/a (not a GPU)"
        rows.append(f"| {SPEED_WORDS['b']} wall time, {done} complete run(s) | {record['wall_seconds']:.0f} s | "
                    f"≤ 600 s for 24 runs on one GPU | {met} | {hardware} |")
    if record.get("aggregate_train_images_per_second"):
        rate = record["aggregate_train_images_per_second"]
        rows.append(f"| {SPEED_WORDS['b']}'s training throughput, all concurrent runs (images/s) | {rate:.0f} | "
                    f"≥ 6000 on one H200 | {('met' if rate >= 6000 else 'not met') if on_gpu else 'n/a (not a GPU)'}"
                    f" | {hardware} |")
    if not rows:
        return "*This bundle holds no benchmark results.*\n"
    return "\n".join(["| figure | measured | goal | verdict | hardware |", "|---|---|---|---|---|", *rows]) + "\n"


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
    params, metrics = _records(run_dir)
    return {"run": run_dir.name, "status": read_status(run_dir),
            "data_fingerprint": (params.get("data") or {}).get("fingerprint") or metrics.get("data_fingerprint"),
            "device": metrics.get("device") or params.get("device"),
            "git_commit": metrics.get("git_commit") or params.get("git_commit"),
            "train_seconds": metrics.get("train_seconds")}


def _aggregate_throughput(run_root: Path, wall_seconds: float | None) -> float | None:
    """Training images seen by all runs of the matrix (train images x epochs run) over its wall time: the
    throughput of the whole matrix, concurrent runs together, beside a bare step's figure in bench/."""
    if not wall_seconds:
        return None
    seen = 0
    for run_dir in (p for p in run_root.iterdir() if p.is_dir()):
        params, metrics = _records(run_dir)
        counts = (params.get("data") or {}).get("train_class_counts") or {}
        seen += sum(counts.values()) * int(metrics.get("epochs_run") or 0)
    return round(seen / wall_seconds, 1) if seen else None


def _data_record(folder: Path) -> dict[str, Any]:
    """Where the data came from: the transport record when the folder is a transport copy, and the title of the
    README that describes the folder (its own or its parent's), e.g. "... (reduced resolution)"."""
    transport = _read_json(folder / "TRANSPORT.json")
    readme = next((p for p in (folder / "README.md", folder.parent / "README.md") if p.is_file()), None)
    title = readme.read_text(errors="replace").splitlines()[0].lstrip("# ").strip() if readme else ""
    return {"folder": folder.name, "transport_copy": transport or None, "description": title}


def _git_commit(runs: list[dict[str, Any]]) -> str | None:
    commits = {r["git_commit"] for r in runs if r.get("git_commit")}
    if len(commits) == 1:
        return commits.pop()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _records(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's params and metrics records, {} for what it does not hold (planned, failed, not a run)."""
    run = open_run(run_dir)
    return (run.record, run.metrics(missing_ok=True)) if run else ({}, {})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_parser() -> argparse.ArgumentParser:
    from .clihelp import HelpFormatter, examples

    parser = argparse.ArgumentParser(prog="python -m cxrlib.bundle", description=__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="make a bundle from a run root", formatter_class=HelpFormatter,
                       description="Copies a run root's run folders (without weights), executed chapters and "
                                   "speed figures into a bundle folder and writes its bundle.json.",
                       epilog=examples("python -m cxrlib.bundle pack runs/quick/synthetic _build/bundle-quick "
                                       "--chapters book/generated --note 'by hand'"))
    p.add_argument("run_root", help="folder of run folders (python -m cxrlib.runs --where prints it)")
    p.add_argument("out", help="bundle folder to write, e.g. results/real-cpu-3seeds")
    p.add_argument("--chapters", default="", help="folder of executed chapter notebooks to include (empty: none)")
    p.add_argument("--bench", nargs="*", default=[], help="benchmark JSON files to include")
    p.add_argument("--data", nargs="*", default=[], help="data folders used (their TRANSPORT.json is recorded)")
    p.add_argument("--note", default="", help="free text kept in bundle.json")
    p.add_argument("--commit", default="", help="code commit, where the run folder's machine has no git checkout "
                                                "(empty: this checkout's)")
    p.add_argument("--scratch", action="store_true", help="a bundle only to be rendered, never committed: allow a "
                   "destination that git ignores (e.g. _build/bundle-quick)")
    p.add_argument("--partial", action="store_true", help="pack a matrix some of whose planned runs have no result "
                   "(missing, interrupted, running); bundle.json lists them under \"missing\"")
    p.add_argument("--also", nargs="*", default=[], metavar="NAME=RUN_ROOT",
                   help="other run roots to include under NAME/ (e.g. an experiment run apart from the matrix)")
    r = sub.add_parser("render", help="copy a bundle's executed chapters into book/generated/",
                       formatter_class=HelpFormatter, description="Puts a bundle's chapters where the book build "
                       "reads them (then: jupyter-book build .).",
                       epilog=examples("python -m cxrlib.bundle render results/real-cpu-3seeds"))
    r.add_argument("bundle", help="bundle folder, e.g. results/real-cpu-3seeds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(f"cxrlib.bundle {args.command}", lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    if args.command == "pack":
        also = dict(item.partition("=")[::2] for item in args.also)
        if not all(also) or not all(also.values()):
            raise CXRError(f"--also {' '.join(args.also)}: give NAME=RUN_ROOT")
        record = pack(args.run_root, args.out, chapters=args.chapters or None, bench=args.bench,
                      data_dirs=args.data, note=args.note, commit=args.commit, also=also, scratch=args.scratch,
                      partial=args.partial)
        print(f"bundle {args.out}: {len(record['runs'])} runs, {record['bytes'] / 2**20:.1f} MiB"
              + (" (over the 30 MiB a committed bundle should stay under)" if record["bytes"] > MAX_BYTES else "")
              + (f"; {len(record['missing'])} planned run(s) missing (--partial)" if record["missing"] else ""))
    else:
        for path in render(args.bundle):
            print(f"rendered {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
