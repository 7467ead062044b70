"""The run matrix, and the book's executed chapters.

`python -m cxrlib.runs --profile quick` trains every configuration (task x loss x init x seed x extra-COVID)
into runs/<profile>/<data tag>/ (through notebooks/03_finetune.ipynb with papermill, or in-process with
`--executor inline`; `--concurrent N` worker processes), writes matrix.json (arms asked, run and not run
with the reason and the command that would run them, wall times, hardware); `--book` then executes the
other chapters into book/generated/ from that folder only (nothing is retrained to render the book).
`--shard I/N` (or `--shard slurm` in a Slurm job array task) runs one share of the matrix, so that many
machines fill one run root on a shared filesystem; `--gather` then says what each planned run became, and where.

One module (about 700 lines) on purpose: what the matrix runs, why an arm did not run and the command that
would run it are built from the same arguments, and matrix.json records all three.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import socket
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text
from .config import (CHOICES, MATRIX_PROFILES, PREPROCESS, PRETRAIN_PROFILES, PROFILES, RunConfig, check_paths,
                     profile_config, type_name, typed_value, with_profile)
from .errors import CXRError, report
from .paths import GENERATED, NOTEBOOKS, ROOT
from .rundir import (HOST, MATRIX, NOT_THERE, Run, check_reusable, damage, locked, read_json, read_status, settle,
                     write_status)

FINETUNE = "03_finetune"
CHAPTERS = ("01_data_analysis", "02_chexnet_transfer", "04_error_analysis", "05_results", "06_generalisation")
PAPER_LOSSES = ("ce", "focal")  # the losses the paper compares (CHOICES["loss"] also has weighted_ce)
ARMS = ("random", "imagenet", "chest_xray")  # the initialisations the paper compares
EXTRA_AXIS = {"both": (True, False), "with": (True,), "without": (False,)}
NOT_STARTED = "not run: the matrix's time budget (--time-budget) was spent before it could start"
INTERRUPTED, NOT_REACHED = "interrupted", "not started"  # a Ctrl-C's run(s) in flight, and those after them


@dataclass
class RunStatus:
    name: str
    run_dir: Path
    status: str  # complete | failed: <reason> | missing
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.status == "complete"


class MatrixInterrupted(KeyboardInterrupt):
    """Ctrl-C during the runs, with what each run of the matrix had become by then (matrix.json records it)."""

    def __init__(self, results: list[RunStatus]):
        super().__init__()
        self.results = results


@dataclass
class Arms:
    """Initialisations: the weight spec of each arm that runs, and for the others why not and how to run them."""

    run: dict[str, str] = field(default_factory=dict)
    not_run: dict[str, dict[str, str]] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)


# --- where runs live -----------------------------------------------------------------------------


def data_root(run_root: str | Path, record: dict) -> Path:
    """The run root of one data set: runs of other data (synthetic vs each real fingerprint) never mix. Given the
    data set's own folder (what the chapters' `run_root` means), that folder itself: one meaning accepted both ways."""
    root = Path(run_root)
    return root if root.name == record["tag"] else root / record["tag"]


def pretrain_dir(run_root: str | Path, backbone: str = "resnet50", chestxray14_dir: str = "") -> Path:
    """The matrix's ChestX-ray14 pretraining folder: synthetic, or one per real ChestX-ray14 folder."""
    if not chestxray14_dir:
        return Path(run_root) / f"pretrain-synthetic-chestxray14-{backbone}"
    digest = hashlib.sha1(str(Path(chestxray14_dir).resolve()).encode()).hexdigest()[:8]
    return Path(run_root) / f"pretrain-chestxray14-{digest}-{backbone}"


# --- the initialisations -------------------------------------------------------------------------


def matrix_command(args: argparse.Namespace, **changes: str) -> str:
    """The `python -m cxrlib.runs` command of `args` with some flags changed (what would run a skipped arm)."""
    values = {**vars(args), **changes}
    parts = ["python", "-m", "cxrlib.runs", "--profile", values["profile"]]
    for flag in ("run_root", "coronahack_dir", "extra_covid_dir", "chestxray14_dir", "chest_init"):
        if values.get(flag):
            parts += [f"--{flag.replace('_', '-')}", str(values[flag])]
    return shlex.join(parts)


def imagenet_arm(profile: str, backbone: str) -> tuple[str | None, str]:
    """("imagenet", "") when the weights are here (the paper profile downloads them), else (None, why)."""
    from .models import fetch_imagenet, imagenet_available, imagenet_file

    if imagenet_available(backbone):
        return "imagenet", ""
    if profile != "paper":
        return None, (f"torchvision's ImageNet weights are not in the cache ({imagenet_file(backbone)}); the "
                      f"{profile} profile never downloads: run the paper profile online, or put the file there")
    try:
        fetch_imagenet(backbone, progress=True)
    except CXRError as err:
        return None, str(err)
    return "imagenet", ""


def ensure_pretrained(run_root: Path, profile: str, chestxray14_dir: str = "", backbone: str = "resnet50",
                      **overrides: Any) -> RunStatus:
    """Pretrain the chest-X-ray init once on ChestX-ray14 (real, or synthetic for synthetic data), from ImageNet
    when cached, with the profile's pretraining settings."""
    from .config import PretrainConfig
    from .pretrain import pretrain
    from .models import imagenet_available

    out = pretrain_dir(run_root, backbone, chestxray14_dir)
    if read_status(out) != "complete":
        weights = "imagenet" if imagenet_available(backbone) else "none"
        names = {f.name for f in dataclasses.fields(PretrainConfig)}
        given = {"chestxray14": chestxray14_dir, "backbone": backbone, "weights": weights, "profile": profile,
                 **{k: v for k, v in overrides.items() if k in names}}
        cfg = PretrainConfig(**{k: v for k, v in with_profile(PRETRAIN_PROFILES, given).items() if k != "profile"})
        try:
            with locked(out):  # a second matrix waits here, then finds it complete (pretrain returns it untouched)
                pretrain(cfg, out, progress=False)
        except Exception as err:  # kept as the folder's status; the matrix goes on without this init
            print(f"pretraining failed ({out / 'status'}): {err}", file=sys.stderr)
    return RunStatus(out.name, out, read_status(out))


def resolve_arms(args: argparse.Namespace, root: Path, synthetic: bool, overrides: dict[str, Any],
                 backbone: str = "resnet50") -> Arms:
    """The weight spec of each asked arm, or why it cannot run here and the command that would run it.

    The chest-X-ray arm uses --chest-init as given, else pretrains on --chestxray14-dir, else (synthetic
    data only) on a synthetic ChestX-ray14. Real data with neither is not run: a synthetic pretraining
    must never be called a chest-X-ray init of a real-data result.
    """
    from .train import init_quality

    arms = Arms()
    for arm in args.arms.split(","):
        weights, why, command = None, "", ""
        if arm == "random":
            weights = "none"
        elif arm == "imagenet":
            weights, why = imagenet_arm(args.profile, backbone)
            command = matrix_command(args, profile="paper") + "   # online; or copy the file as said"
        elif args.chest_init:
            weights = args.chest_init
        elif args.chestxray14_dir or synthetic:
            done = ensure_pretrained(root, args.profile, args.chestxray14_dir, backbone, **overrides)
            weights = f"file:{done.run_dir / 'model.pt'}" if done.complete else None
            why = f"ChestX-ray14 pretraining did not complete ({done.run_dir}: {done.status})"
            command = matrix_command(args)
        else:
            why = ("real fine-tuning data, but neither real ChestX-ray14 (--chestxray14-dir) nor a ready chest-X-ray "
                   "init (--chest-init) was given; pretraining on synthetic images would not be a chest-X-ray init")
            command = (matrix_command(args, chestxray14_dir="PATH/TO/ChestX-ray14") + "   # or --chest-init "
                       "chexnet:PATH | torchxrayvision:NAME[@PATH] | file:PATH (make: CHESTXRAY14_DIR=, CHEST_INIT=)")
        if weights is None:
            arms.not_run[arm] = {"reason": why, "command": command}
            print(f"arm {arm} not run: {why}", file=sys.stderr)
        else:
            arms.run[arm] = weights
            arms.quality[arm] = init_quality(weights)
    return arms


# --- the matrix ----------------------------------------------------------------------------------


def matrix(profile: str, run_root: Path, data: dict[str, str], inits: list[str], tasks=CHOICES["task"],
           losses=PAPER_LOSSES,
           seeds: int | None = None, extra_covid_train: tuple[bool, ...] = (True,),
           variants: list[dict[str, Any]] = (), variant_losses: tuple[str, ...] | None = None,
           **overrides) -> list[RunConfig]:
    """One RunConfig per seed x extra-COVID value x task x loss x init, each with its run_dir in run_root; then,
    per seed, the generalisation `variants` (`parse_variants`) of the first init, with the extra COVID images,
    for each task and each of `variant_losses` (default: `losses`).

    Seeds come outermost, so a matrix cut short by its time budget (or run with --concurrent equal to the
    runs of one seed) still holds complete comparisons, the variants' included.
    """
    n_seeds = seeds or MATRIX_PROFILES[profile]["seeds"]
    configs = []

    def add(**values: Any) -> None:
        cfg = profile_config(profile, **{**overrides, **data}, **values)
        cfg.run_dir = str(Path(run_root) / cfg.run_name())
        configs.append(cfg)

    for seed in range(n_seeds):
        for extra in extra_covid_train:
            for task in tasks:
                for loss in losses:
                    for weights in inits:
                        add(task=task, loss=loss, weights=weights, seed=seed, extra_covid_train=extra)
        for variant in variants:
            for task in tasks:
                for loss in variant_losses or losses:
                    add(task=task, loss=loss, weights=inits[0], seed=seed, extra_covid_train=True, **variant)
    return configs


def parse_variants(spec: str, extra_negatives: str = "") -> list[dict[str, Any]]:
    """`--variants`: comma-separated arms of chapter 06, each `+`-joined from negs (train with the extra adult
    negatives), adults (cohort=adults: no paediatric image, the extra adult negatives instead), unweighted (no
    class-balanced sampling: claim (c)), a preprocess choice (clahe, lung_crop, lungs_only, lungs_only_clahe;
    lungs_removed, lungs_removed_marker: chapter 4's audit; lungs_only_marker: the lungs-only control) and
    holdout:COLUMN=VALUE (a source kept out of training)."""

    variants = []
    for arm in filter(None, (a.strip() for a in spec.split(","))):
        values: dict[str, Any] = {}
        for part in arm.split("+"):
            if part in ("negs", "adults"):
                if not extra_negatives:
                    raise CXRError(f"--variants {arm}: '{part}' needs --extra-negatives DIR")
                values["extra_negatives"] = extra_negatives
                if part == "adults":
                    values["cohort"] = "adults"
            elif part == "unweighted":
                values["weighted_sampler"] = False
            elif part in PREPROCESS and part != "none":
                values["preprocess"] = part
            elif part.startswith("holdout:") and "=" in part:
                values["hold_out"] = part.split(":", 1)[1]
            else:
                raise CXRError(f"--variants: unknown part {part!r} of {arm!r}; use negs, adults, unweighted, "
                               f"{', '.join(p for p in PREPROCESS if p != 'none')} or holdout:COLUMN=VALUE")
        variants.append(values)
    return variants


# --- shards: one matrix over many machines ------------------------------------------------------------


def parse_shard(spec: str, environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """`--shard`: "I/N" is shard I of N (0 <= I < N); "slurm" is this Slurm job array task's, I the task id less the
    array's first (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) and N its task count; "" is the whole matrix (None)."""
    if not spec:
        return None
    if spec == "slurm":
        try:
            index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as err:
            raise CXRError("--shard slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not both set to numbers "
                           "(not a Slurm job array task): submit with sbatch --array, or give --shard I/N") from err
    else:
        index_text, _, count_text = spec.partition("/")
        try:
            index, count = int(index_text), int(count_text)
        except ValueError:
            index, count = -1, 0
    if not 0 <= index < count:
        raise CXRError(f"--shard {spec}: give I/N with 0 <= I < N (shards 0/3, 1/3 and 2/3 cover a matrix once), or "
                       "slurm in a job array of consecutive task ids (sbatch --array=0-N-1)")
    return index, count


def share(configs: list[RunConfig], shard: tuple[int, int] | None) -> list[RunConfig]:
    """The runs of shard I of N: those at positions I, I + N, I + 2N, ... of the matrix's order. The N shares are
    disjoint and cover the matrix, differ in size by one run at most, and depend on the flags alone, never on which
    runs are complete (a shard rerun after a crash takes the same runs). Shards must be given the same flags and see
    the same weights: an arm that runs on one machine only shifts the positions."""
    return configs if shard is None else configs[shard[0]::shard[1]]


def save_record(root: Path, record: dict[str, Any], shard: tuple[int, int] | None, mine: set[str],
                started_at: float) -> None:
    """Write matrix.json. A shard writes under the root's lock over what the other shards wrote there: its own runs'
    statuses and its entry in "shards" (wall time, hardware); the other runs keep theirs, and "wall_seconds" spans
    the first shard's start to the last write."""
    if shard is None:
        write_text(root / MATRIX, json.dumps(record, indent=2, default=str))
        return
    with locked(root):
        earlier = read_json(root / MATRIX) if (root / MATRIX).is_file() else {}
        theirs = {r["name"]: r for r in earlier.get("runs", [])}
        runs = [r if r["name"] in mine else theirs.get(r["name"], r) for r in record["runs"]]
        shards = {**earlier.get("shards", {}), f"{shard[0]}/{shard[1]}": {
            "runs": sorted(mine), "started_at": started_at, "ended_at": time.time(),
            "wall_seconds": record["wall_seconds"], "hardware": record["hardware"], "concurrent": record["concurrent"]}}
        span = max(s["ended_at"] for s in shards.values()) - min(s["started_at"] for s in shards.values())
        merged = {**record, "runs": runs, "shards": shards, "wall_seconds": span}
        write_text(root / MATRIX, json.dumps(merged, indent=2, default=str))


def gather(root: Path) -> int:
    """Print what each planned run of the root has become (`rundir.settle`) and on which host, then the count of
    each state; 0 when every run is complete, else 1."""
    settled = settle(root)
    if not settled:
        raise CXRError(f"{root}: no run matrix planned there (no {MATRIX} listing runs): run python -m cxrlib.runs")
    for run in settled:
        said = f"  ({run['status']})" if run["state"] == "failed" else ""
        print(f"{run['state']:>11}  {run['host'] or '-':<20}  {run['run']}{said}")
    counts = Counter(run["state"] for run in settled)
    rerun = "; rerun the matrix (or the shard) that has them" if counts["interrupted"] + counts["missing"] else ""
    print(f"{len(settled)} planned: " + ", ".join(f"{counts[k]} {k}" for k in ("complete", "failed", *NOT_THERE))
          + f" (in {root}{rerun})")
    return 0 if counts["complete"] == len(settled) else 1


def execute_notebook(name: str, output: Path, parameters: dict) -> None:
    """Run one chapter with papermill, from the notebooks folder so relative paths behave as in Jupyter, with
    only the parameters it declares (papermill warns of any other), then tidy it for the book."""
    import papermill

    from .book import chapter_names, tidy_notebook

    source = str(NOTEBOOKS / f"{name}.ipynb")
    declared, _ = chapter_names(name, NOTEBOOKS)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        source, str(output), parameters={k: v for k, v in parameters.items() if k in declared},
        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False, log_output=False,
    )
    tidy_notebook(output)


def notebook_parameters(cfg: RunConfig) -> dict:
    """The fields of `cfg` that 03_finetune declares; the notebook takes the others from cfg.profile's defaults,
    so a config that changes an undeclared field would be run wrongly: refuse it."""
    from .book import chapter_names

    declared = set(chapter_names(FINETUNE, NOTEBOOKS)[0])
    values = cfg.to_dict()
    implied = RunConfig.from_parameters({k: v for k, v in values.items() if k in declared}).to_dict()
    differ = sorted(k for k in values if values[k] != implied[k] and k not in declared)
    if differ:
        raise CXRError(f"{FINETUNE} does not declare parameter(s) {', '.join(differ)}: add them to its parameters cell")
    return {k: v for k, v in values.items() if k in declared}


def execute_run(cfg: RunConfig, executor: str = "papermill", data_record: dict | None = None,
                deadline: float | None = None) -> RunStatus:
    """Train and evaluate one configuration (03_finetune through papermill, or train.run in-process); failures
    are kept in the folder. A complete folder is reused only if its parameters and data match. A run that
    would start after `deadline` (time.time()) is not started: its status says so and no folder is made."""
    run_dir, start = Path(cfg.run_dir), time.monotonic()
    if deadline is not None and time.time() > deadline and read_status(run_dir) != "complete":
        return RunStatus(run_dir.name, run_dir, NOT_STARTED)
    with locked(run_dir):  # a second matrix on the same root waits here, then finds the run complete
        return _execute_locked(cfg, run_dir, executor, data_record, start)


def _execute_locked(cfg: RunConfig, run_dir: Path, executor: str, data_record: dict | None,
                    start: float) -> RunStatus:
    from . import train

    status = read_status(run_dir)
    if status == "complete" and damage(run_dir):
        status = f"damaged: {damage(run_dir)}"
    if status == "complete":
        try:
            check_reusable(cfg, run_dir, data_record)
        except CXRError as err:
            return RunStatus(run_dir.name, run_dir, f"failed: not reused: {err}")
        return RunStatus(run_dir.name, run_dir, "complete")
    if status.startswith("damaged: "):
        print(f"  {run_dir.name}: {status}; training it again", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")  # what was asked for, so a run that fails early is still listed
    write_text(run_dir / HOST, socket.gethostname() + "\n")  # where it ran, for --gather
    try:
        if executor == "inline":
            train.run(cfg, run_dir, progress=False)
        else:
            execute_notebook(FINETUNE, run_dir / "notebook.ipynb", notebook_parameters(cfg))
    except Exception as err:  # the notebook's (or run's) error; keep it as the run's status
        reason = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        if read_status(run_dir) in ("missing", "complete", "running"):
            write_status(run_dir, reason)
    return RunStatus(run_dir.name, run_dir, read_status(run_dir), time.monotonic() - start)


def _worker_init(threads: int) -> None:
    """A matrix worker process: its share of the CPU threads (the GPU, if any, is shared)."""
    import torch

    torch.set_num_threads(threads)


def execute_all(configs: list[RunConfig], executor: str, concurrent: int, data_record: dict,
                table_paths: list[str], deadline: float | None = None) -> list[RunStatus]:
    """Run the configurations one by one, or in `concurrent` spawned worker processes taking them in turn;
    results come back in the order of `configs` and do not depend on `concurrent`. Ctrl-C raises
    MatrixInterrupted, which holds each run's status by then (`settled`)."""
    def show(result: RunStatus) -> RunStatus:
        print(f"{result.status:>10}  {result.name}  ({result.seconds:.0f} s)", flush=True)
        return result

    if concurrent <= 1:
        done: list[RunStatus] = []
        try:
            for cfg in configs:
                done.append(show(execute_run(cfg, executor, data_record, deadline)))
        except KeyboardInterrupt:
            raise MatrixInterrupted(settled(configs, dict(enumerate(done)), {len(done)})) from None
        return done
    from .images import warm_cache

    for size in sorted({cfg.image_size for cfg in configs}):  # decoded once, before the workers: they only read
        warm_cache(table_paths, size)
    threads = max(1, (os.cpu_count() or 1) // concurrent)
    with ProcessPoolExecutor(concurrent, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(execute_run, cfg, executor, data_record, deadline) for cfg in configs]
        try:
            return [show(f.result()) for f in futures]
        except KeyboardInterrupt:
            finished = {i: f.result() for i, f in enumerate(futures) if f.done() and not f.cancelled()
                        and f.exception() is None}
            flying = {i for i, f in enumerate(futures) if f.running()}
            for f in futures:
                f.cancel()  # the runs not started stay so
            raise MatrixInterrupted(settled(configs, finished, flying)) from None


def settled(configs: list[RunConfig], finished: dict[int, RunStatus], flying: set[int]) -> list[RunStatus]:
    """Each run's status when the matrix was interrupted: as it finished, INTERRUPTED in flight, else NOT_REACHED."""
    def status(i: int, cfg: RunConfig) -> RunStatus:
        if i in finished:
            return finished[i]
        return RunStatus(cfg.run_name(), Path(cfg.run_dir), INTERRUPTED if i in flying else NOT_REACHED)

    return [status(i, cfg) for i, cfg in enumerate(configs)]


# RunConfig fields the matrix sets itself, and the flag that sets them (a --set of one would be lost or clash).
MATRIX_FIELDS = {"task": "--tasks", "loss": "--losses", "weights": "--arms and --chest-init", "seed": "--seeds",
                 "extra_covid_train": "--extra-covid-axis", "coronahack_dir": "--coronahack-dir",
                 "extra_covid_dir": "--extra-covid-dir", "run_dir": "--run-root", "profile": "--profile"}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set NAME=VALUE` pairs as RunConfig values of the field's type (e.g. image_size=32 epochs=1); a value
    that is not of that type is a CXRError naming it (RunConfig checks the rest)."""
    types = typing.get_type_hints(RunConfig)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise CXRError(f"--set {item!r}: use NAME=VALUE with NAME a RunConfig field")
        if name in MATRIX_FIELDS:
            raise CXRError(f"--set {item!r}: the matrix sets {name} itself; use {MATRIX_FIELDS[name]}")
        try:
            out[name] = typed_value(types[name], text)
        except ValueError as err:
            raise CXRError(f"--set {item!r}: {name} takes values of type {type_name(types[name])}") from err
    return out


def build_book_notebooks(root: Path, data: dict[str, str], profile: str) -> None:
    """Execute the chapters into book/generated/ from one data set's run root; chapter 3 is the featured run."""
    from .book import featured_run  # pandas and nbformat: not for --help or a bad flag

    featured = featured_run(root)
    if featured is None:
        raise CXRError(f"no complete run in {root}: run `python -m cxrlib.runs --profile {profile}` first")
    GENERATED.mkdir(parents=True, exist_ok=True)
    if (featured / "notebook.ipynb").is_file():
        shutil.copyfile(featured / "notebook.ipynb", GENERATED / f"{FINETUNE}.ipynb")
    else:  # an inline run: the notebook reads the complete folder (nothing is retrained)
        saved = Run(featured).config
        cfg = RunConfig.from_dict({k: v for k, v in saved.items() if k in RunConfig.__dataclass_fields__})
        local = {k: v for k, v in data.items() if v}  # the data as found here (the run may come from another machine)
        execute_notebook(FINETUNE, GENERATED / f"{FINETUNE}.ipynb", {**notebook_parameters(cfg), **local,
                                                                      "run_dir": str(featured)})
    parameters = {**data, "run_root": str(root), "run_dir": str(featured), "profile": profile}
    for name in CHAPTERS:
        print(f"executing {name} ...", flush=True)
        execute_notebook(name, GENERATED / f"{name}.ipynb", parameters)


def hardware() -> str:
    """The matrix's machine, as params.json describes devices (no host name)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, {os.cpu_count()} CPU cores"
    return f"cpu: {os.cpu_count()} cores"


def default_executor() -> str:
    """papermill where it is installed (the book's notebooks are the record), else in-process."""
    try:
        import papermill  # noqa: F401
    except ImportError:
        return "inline"
    return "papermill"


def comma_list(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type: comma-separated items of `choices`, at least one, so a typo fails at parsing."""
    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}: "
                                             f"give comma-separated items of {', '.join(choices)}")
        return ",".join(items)

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, at_least, examples

    p = argparse.ArgumentParser(
        prog="python -m cxrlib.runs", description=__doc__, formatter_class=HelpFormatter,
        epilog=examples("python -m cxrlib.runs --profile quick && python -m cxrlib.runs --book --profile quick"
                        "   # synthetic data on CPU, then the chapters from those runs",
                        "python -m cxrlib.runs --profile paper --coronahack-dir data/coronahack "
                        "--extra-covid-dir data/covid-chestxray-dataset --concurrent 4   # GPU"))
    p.add_argument("--profile", default="quick", choices=list(PROFILES),
                   help="the defaults of every run (config.PROFILES) and of the seeds (config.MATRIX_PROFILES)")
    p.add_argument("--run-root", default="", help="runs go to RUN_ROOT/<data tag>/ (default: runs/<profile> "
                                                  "in the repository)")
    p.add_argument("--coronahack-dir", default="", help="Kaggle CoronaHack folder (empty, with no "
                                                        "--extra-covid-dir: the synthetic default)")
    p.add_argument("--extra-covid-dir", default="", help="ieee8023 covid-chestxray-dataset folder")
    p.add_argument("--chestxray14-dir", default="", help="real ChestX-ray14 to pretrain the chest-X-ray arm on")
    p.add_argument("--chest-init", default="",
                   help="a ready chest-X-ray init: chexnet:PATH | torchxrayvision:NAME[@PATH] | file:PATH")
    p.add_argument("--tasks", type=comma_list(CHOICES["task"]), default=",".join(CHOICES["task"]),
                   help=f"comma-separated, of {', '.join(CHOICES['task'])}")
    p.add_argument("--losses", type=comma_list(CHOICES["loss"]), default=",".join(PAPER_LOSSES),
                   help=f"comma-separated, of {', '.join(CHOICES['loss'])}")
    p.add_argument("--arms", type=comma_list(ARMS), default=",".join(ARMS),
                   help=f"initialisations asked for, comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=at_least(1), default=None,
                   help="seeds 0..N-1 per configuration (default: " +
                        ", ".join(f"{k} {v['seeds']}" for k, v in MATRIX_PROFILES.items()) + ")")
    p.add_argument("--extra-covid-axis", choices=list(EXTRA_AXIS), default=None,
                   help="train with/without the ieee8023-only images (same test set); default: both when "
                        "--extra-covid-dir is given, else with")
    p.add_argument("--executor", choices=["papermill", "inline"], default=None,
                   help="papermill (03_finetune per run) or inline (train.run in-process); default: papermill "
                        "if installed")
    p.add_argument("--concurrent", type=at_least(1), default=1,
                   help="worker processes (spawned; they share CPU threads and GPU)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help="a RunConfig value for every run, over the profile (e.g. --set image_size=32); "
                        "same-named pretraining settings follow it")
    p.add_argument("--extra-negatives", default="",
                   help="adult non-COVID images (ChestX-ray14 layout or manifest) for the 'negs' variant")
    p.add_argument("--variants", default="", help="chapter 06 arms, e.g. negs,negs+clahe,holdout:country=italy "
                   "(each with the extra COVID images and the first init)")
    p.add_argument("--variant-losses", type=comma_list(CHOICES["loss"]), default=None,
                   help="losses of the variants, comma-separated (default: --losses)")
    p.add_argument("--time-budget", type=at_least(0, float, strict=True), default=None, metavar="SECONDS",
                   help="start no run after this many seconds (those are listed as not run in matrix.json); "
                        "default: no budget")
    p.add_argument("--shard", default="", metavar="I/N",
                   help="run only shard I of N (0 <= I < N: the runs at positions I, I+N, ... of the matrix); "
                        "slurm: this Slurm job array task's shard; empty: the whole matrix")
    p.add_argument("--book", action="store_true", help="execute the book chapters from the run folder")
    p.add_argument("--where", action="store_true", help="print this data set's run folder (RUN_ROOT/<data tag>)")
    p.add_argument("--gather", action="store_true",
                   help="say what each planned run became (complete, failed, running, interrupted, missing) and on "
                        "which host; exit 0 only when all are complete")
    return p


PATH_FLAGS = ("run_root", "coronahack_dir", "extra_covid_dir", "chestxray14_dir", "extra_negatives")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with every folder made absolute: the chapters run from notebooks/ (papermill's cwd), so a
    relative path given from the repository root would point elsewhere there."""
    args = build_parser().parse_args(argv)
    for name in PATH_FLAGS:
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    return args


def extra_axis(args: argparse.Namespace) -> tuple[bool, ...]:
    """--extra-covid-axis, else both when the ieee8023 folder is given, else with."""
    return EXTRA_AXIS[args.extra_covid_axis or ("both" if args.extra_covid_dir else "with")]


def plan(args: argparse.Namespace, root: Path, inits: list[str], overrides: dict[str, Any]) -> list[RunConfig]:
    """The runs the flags ask for, over `inits` (`matrix`)."""
    data = {"coronahack_dir": args.coronahack_dir, "extra_covid_dir": args.extra_covid_dir}
    return matrix(args.profile, root, data, inits, args.tasks.split(","), args.losses.split(","), args.seeds,
                  extra_axis(args), parse_variants(args.variants, args.extra_negatives),
                  tuple(args.variant_losses.split(",")) if args.variant_losses else None, **overrides)


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --set values, once every run the flags ask for has passed RunConfig's checks and every folder and file
    they name is found: a bad flag fails before any data is read or any model pretrained."""
    overrides = parse_settings(args.settings)
    for cfg in plan(args, Path(args.run_root or "."), [args.chest_init or "none"], overrides):
        check_paths(cfg)
    check_paths(args)  # --chestxray14-dir, which no RunConfig holds
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report("cxrlib.runs", lambda: run_matrix(args))


def run_matrix(args: argparse.Namespace) -> int:
    """Train the matrix of `args`, or one shard of it (or, with --where, --gather or --book, print its folder, say
    what its runs became or execute its chapters)."""
    started, started_at = time.monotonic(), time.time()
    shard = parse_shard(args.shard)
    overrides = check_args(args)
    from .evaluate import dropped_line
    from .train import load_data

    data = {"coronahack_dir": args.coronahack_dir, "extra_covid_dir": args.extra_covid_dir}
    loaded = load_data(RunConfig(**data))
    root = data_root(Path(args.run_root or ROOT / "runs" / args.profile).resolve(), loaded.record)
    if args.where:
        print(root)
        return 0
    if args.gather:
        return gather(root)
    if dropped := dropped_line(loaded.report):  # once here: the runs themselves train quietly
        print(dropped, flush=True)
    if args.book:
        build_book_notebooks(root, data, args.profile)
        return 0
    root.mkdir(parents=True, exist_ok=True)
    arms = resolve_arms(args, root, loaded.record["synthetic"], overrides)
    executor = args.executor or default_executor()
    configs = plan(args, root, list(arms.run.values()), overrides)
    mine = share(configs, shard)
    whose = "" if shard is None else f" of {len(configs)} (shard {shard[0]}/{shard[1]})"
    print(f"{len(mine)} run(s){whose} in {root} ({executor}, {args.concurrent} at a time)", flush=True)
    record = {
        "profile": args.profile, "data": loaded.record, "executor": executor, "concurrent": args.concurrent,
        "hardware": hardware(), "wall_seconds": time.monotonic() - started,
        "arms": {"asked": args.arms.split(","), "run": arms.run, "init_quality": arms.quality,
                 "not_run": arms.not_run},
        "axes": {"tasks": args.tasks.split(","), "losses": args.losses.split(","),
                 "seeds": sorted({c.seed for c in configs}), "extra_covid_train": list(extra_axis(args))},
        "settings": overrides, "variants": args.variants, "variant_losses": args.variant_losses,
        "not_run": [{"arm": arm, **why} for arm, why in arms.not_run.items()],  # what results.read_not_run reads
        "runs": [{"name": c.run_name(), "status": "planned"} for c in configs],
    }
    names = {c.run_name() for c in mine}
    save_record(root, record, shard, names, started_at)  # a cut-short matrix still says what it planned
    deadline = time.time() + args.time_budget if args.time_budget else None

    def record_runs(results: list[RunStatus]) -> None:
        done = {r.name: {"name": r.name, "status": r.status, "wall_seconds": r.seconds} for r in results}
        record.update(wall_seconds=time.monotonic() - started, time_budget_seconds=args.time_budget,
                      runs=[done.get(r["name"], r) for r in record["runs"]])
        save_record(root, record, shard, names, started_at)

    try:
        results = execute_all(mine, executor, args.concurrent, loaded.record, loaded.table["path"].tolist(),
                              deadline)
    except MatrixInterrupted as stop:  # matrix.json says what ran before errors.report says "interrupted"
        record_runs(stop.results)
        raise
    record_runs(results)
    failed = sum(r.status.startswith("failed") for r in results)
    skipped = sum(r.status == NOT_STARTED for r in results)
    print(f"{len(mine) - failed - skipped} complete, {failed} failed, {skipped} not started (time budget), "
          f"in {root} (see {MATRIX}" + ("; --gather: every shard's runs)" if shard else ")"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
