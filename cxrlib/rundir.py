"""The run folder's life cycle, for fine-tuning (train.run) and pretraining (pretrain.pretrain) alike.

The run folder is the contract between training and the notebooks and the book; its files:

    params.json      every parameter, data fingerprint, what the model loaded, versions, git commit, device
    model.pt         the best epoch by the validation monitor (models.load_checkpoint reads it)
    checkpoint-last.pt  everything needed to resume: model, optimiser, scheduler, scaler, RNG states
    history.csv      one row per epoch
    predictions.csv  the test split, one row per image (metrics.predictions_table)
    metrics.json     metrics on test + validation-chosen threshold + majority baseline + provenance
    status           "running", then "complete" written last; "failed: <reason>" when an exception escapes
    manifest.json    written just before "complete": every file the run holds, with its size and SHA-256
    host             the machine the run matrix last started it on (`settle` reports it; never published)

"Complete" means whole: `read_status` reports a complete folder whose files no longer match its manifest
(a truncated metrics.json, a deleted predictions.csv, a cut model.pt) as "damaged: <file>: <what>", so the
matrix reruns it and every reader treats it as unfinished, naming the file. A folder of the earlier layout
(no manifest) is whole when its result files are present and its JSON parses.

A run folder belongs to one process and to the run alone. `locked` serialises two matrix commands on one
folder (the second waits, then finds the run complete and skips it); `claimed`, which every writer (train,
pretrain, and so every matrix stage) holds, fails at once naming the process that holds the folder, refuses a
folder holding files no run writes or a run of other parameters, and removes a folder it made for a run that
failed before training. Only the files a run writes are sealed (`is_run_file`), never a temporary or a user's.

torch is imported inside `running` only, so that the results chapter reads statuses without it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import is_temporary, write_text
from .errors import CXRError

LAST = "checkpoint-last.pt"
BEST = "model.pt"
# What a fresh (not resumed) run removes from an unfinished folder; never the papermill notebook.
OUTPUTS = (BEST, LAST, "history.csv", "predictions.csv", "metrics.json")
# Parameters that may differ between a complete run folder and a request for it (they do not change results).
# Data folders are not identity either: the data fingerprint is (the same data may sit elsewhere on another machine).
NOT_IDENTITY = ("run_dir", "device", "num_workers", "profile", "coronahack_dir", "extra_covid_dir", "manifest",
                "extra_negatives", "external")


MANIFEST = "manifest.json"
MATRIX = "matrix.json"  # a run root's record of what the run matrix planned, ran and did not run (runs writes it)
RESULT_FILES = ("params.json", "metrics.json", "predictions.csv")  # what every complete fine-tuning run holds
PARAMS, METRICS, PREDICTIONS = RESULT_FILES
PLANNED = "config.json"  # written by the run matrix before training starts: a run that fails early is still listed
EXTERNAL = "external"  # <run>/external/<name>/{metrics.json,predictions.csv}: the run scored on other data
LOCK = ".lock"
HOST = "host"  # the host name is kept out of params.json and metrics.json, which bundles publish
# Not in the manifest: the status and lock, the resume checkpoint (deleted on completion), papermill's notebook
# (papermill writes it once more after the run inside it has completed) and the host it ran on.
UNSEALED = ("status", MANIFEST, LOCK, LAST, "notebook.ipynb", HOST)
SEALED = (PARAMS, PLANNED, BEST, "history.csv", PREDICTIONS, METRICS)  # the manifest's files, with EXTERNAL's
EVALUATION = (METRICS, PREDICTIONS)  # what `evaluate` writes into its folder (and a run into each external set's)


def read_status(run_dir: str | Path) -> str:
    """A run folder's status file: complete | running | failed: <reason> | missing | damaged: <file>: <what>
    (a complete folder whose files do not match its manifest, checked by size; `damage` also checks hashes)."""
    path = Path(run_dir) / "status"
    status = path.read_text().strip() if path.is_file() else "missing"
    if status == "complete":
        why = damage(run_dir, hashes=False)
        return f"damaged: {why}" if why else status
    return status


def is_run_file(relative: str | Path) -> bool:
    """Whether a path inside a run folder is one a run writes there (a temporary of an atomic write included)."""
    parts = Path(relative).parts
    if is_temporary(parts[-1]):
        return True
    if len(parts) == 1:
        return parts[0] in SEALED or parts[0] in UNSEALED
    return parts[0] == EXTERNAL and parts[-1] in EVALUATION


def seal(run_dir: str | Path) -> dict[str, Any]:
    """Record what the complete run holds: the files it wrote, but the status, lock and resume checkpoint; never a
    temporary file of a write in flight, nor a file a user put there (editing it later is no damage)."""
    run_dir = Path(run_dir)
    files = {str(p.relative_to(run_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(run_dir.rglob("*"))
             if p.is_file() and is_run_file(p.relative_to(run_dir)) and p.name not in UNSEALED
             and not is_temporary(p.name)}
    record = {"files": files}
    write_text(run_dir / MANIFEST, json.dumps(record, indent=1) + "\n")
    return record


def reseal(run_dir: str | Path, names: Sequence[str]) -> None:
    """Restate the manifest's size and hash of files rewritten on purpose after completion (`cxrlib.rescore`),
    leaving every other entry, and what a bundle left out, as sealed: the folder stays whole, a later edit
    still shows."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return
    record = read_json(path)
    for name in names:
        file = Path(run_dir) / name
        record["files"][name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    write_text(path, json.dumps(record, indent=1) + "\n")


def damage(run_dir: str | Path, hashes: bool = True) -> str:
    """"" when a complete folder is whole, else what is wrong, naming the file. Files a results bundle leaves out
    on purpose (the weights) are listed under "left_out" by bundle pack and not expected."""
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    if not manifest.is_file():  # the earlier layout: result files present and parseable
        if not (run_dir / "params.json").is_file() and not (run_dir / "metrics.json").is_file():
            return ""  # not a fine-tuning folder this module can judge (e.g. a pretraining folder of old)
        for name in RESULT_FILES:
            if not (run_dir / name).is_file():
                return f"{name}: missing"
        for name in ("params.json", "metrics.json"):
            try:
                json.loads((run_dir / name).read_text())
            except (OSError, json.JSONDecodeError) as err:
                return f"{name}: not valid JSON ({err})"
        return ""
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        return f"{MANIFEST}: unreadable ({err})"
    for name, want in files.items():
        path = run_dir / name
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name}: {size} bytes, {want['bytes']} when the run completed"
        if hashes and _sha256(path) != want["sha256"]:
            return f"{name}: contents changed since the run completed"
    return ""


def read_json(path: str | Path) -> dict[str, Any]:
    """A run file's JSON, with an error that names the file (never a bare JSONDecodeError deep in a chapter)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise CXRError(f"{path}: missing; rerun the run (python -m cxrlib.runs) or restore the file") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CXRError(f"{path}: not valid JSON ({err}); the run folder is damaged: rerun it") from err


_HELD: dict[Path, int] = {}  # run folders this process holds -> the thread holding each


@contextlib.contextmanager
def locked(run_dir: str | Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the run folder for the block. A second process waits here, or with `wait=False` fails at
    once, naming the process that holds it (the lock file records it). The thread holding it, and the processes it
    started (the matrix's papermill kernel), pass: they work for the holder. The lock file goes with the lock
    (a waiter on a removed one takes the new one), so a folder no one holds has none."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if _HELD.get(key) == threading.get_ident():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # not emptied on open: it names the holder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if holder.partition(" ")[0] not in {str(pid) for pid in _ancestors()}:
                raise CXRError(f"{run_dir} is in use by {'process ' + holder if holder else 'another process'}: "
                               "wait for it to finish, or choose another folder") from None
            fd = None
            break
        if _same_file(fd, run_dir / LOCK):
            break
        os.close(fd)  # the file went while we waited (its holder let go, or removed the folder): take the new one
    if fd is None:
        yield
        return
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.pwrite(fd, f"{os.getpid()} ({shlex.join(sys.orig_argv)[:200]}), since {started}\n".encode(), 0)
    _HELD[key] = threading.get_ident()
    try:
        yield
    finally:
        del _HELD[key]
        if _same_file(fd, run_dir / LOCK):
            os.unlink(run_dir / LOCK)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holder(run_dir: str | Path) -> str:
    """Who holds the run folder's lock ("" when no process does), read without taking or making anything: a lock
    file left by a killed process is not held (the system released it)."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _ancestors() -> list[int]:
    """This process's parent, its parent, ... (Linux's /proc; the parent alone elsewhere)."""
    pids, pid = [], os.getppid()
    while pid > 1 and pid not in pids:
        pids.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


@contextlib.contextmanager
def claimed(cfg: Any, run_dir: str | Path, resume: bool = False,
            data_record: Callable[[], dict] | None = None) -> Iterator[None]:
    """`run_dir` for one run of `cfg` in this process, for the block: what every writer of a run folder holds.

    Refused, before anything is made there: a folder holding a file no run writes (named), one another process
    holds (`locked`, without waiting), one holding a run of other parameters (and, resuming, other data). A folder
    this call made is removed when the block fails before the run wrote its params.json (before training): an
    error in the data or the settings leaves nothing behind. Under torchrun, rank 0 holds it for every rank.
    """
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    check_run_folder(run_dir)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # the folders this call makes, deepest first
    with locked(run_dir, wait=False):
        try:
            if not made:
                resumed = resume and (run_dir / LAST).is_file()
                check_reusable(cfg, run_dir, data_record() if resumed and data_record else None)
            yield
        except BaseException:
            if made and not (run_dir / PARAMS).is_file():
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in made[1:]:  # empty ones only: another run may have made its folder there meanwhile
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise


def check_run_folder(run_dir: Path) -> None:
    """A run writes into a new folder or a run's (one with a status, or the matrix's config.json), never into one
    holding anything else: the first such file is named, and nothing there is changed."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CXRError(f"{run_dir} is a file, not a folder: give the run a new folder")
    a_run = any((run_dir / name).is_file() for name in ("status", PLANNED))
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        inside = a_run and entry.is_dir() and entry.name == EXTERNAL  # the one folder a run makes: external sets
        for path in [p for p in sorted(entry.rglob("*")) if p.is_file()] if inside else [entry]:
            name = path.relative_to(run_dir)
            ours = is_run_file(name) and (a_run or path.name == LOCK or is_temporary(path.name))
            if path.is_dir() or not ours:
                raise CXRError(f"{run_dir} holds {name}{'/' if path.is_dir() else ''}, which is no run's: give the "
                               "run a new folder (nothing in that one is changed)")


def check_evaluation_folder(out_dir: str | Path) -> None:
    """`evaluate` writes into a new folder or replaces an earlier evaluation there; it never writes into a run folder
    (its own test results would go) nor beside files it does not write (the first is named)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CXRError(f"{out_dir} is a file, not a folder: give evaluate a new folder")
    if any((out_dir / name).exists() for name in (PARAMS, PLANNED, BEST, "status")):
        raise CXRError(f"{out_dir} is a run folder: evaluating into it would replace the run's own test results; "
                       f"give a new folder, e.g. {out_dir / EXTERNAL / 'NAME'}")
    for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if path.is_file() and path.name not in EVALUATION and not is_temporary(path.name):
            raise CXRError(f"{out_dir} holds {path.name}, which evaluate does not write: give a new or empty folder "
                           "(nothing in that one is changed)")
    if (out_dir / METRICS).is_file():
        try:
            earlier = json.loads((out_dir / METRICS).read_text())
        except (OSError, json.JSONDecodeError):
            earlier = {}
        if not isinstance(earlier, dict) or "checkpoint" not in earlier:  # evaluate records the model it scored
            raise CXRError(f"{out_dir / METRICS} is not an earlier evaluation's: give a new or empty folder "
                           "(nothing in that one is changed)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_status(run_dir: str | Path, status: str) -> None:
    path = Path(run_dir) / "status"
    try:
        write_text(path, status + "\n")
    except OSError:
        if not path.is_file():
            raise
        with open(path, "r+") as handle:  # a full disk has no room for a new file: the old one's block takes it
            handle.write(status + "\n")
            handle.truncate()


def reuse(cfg: Any, run_dir: str | Path, data_record: Callable[[], dict] | None = None) -> bool:
    """True when `run_dir` is complete: it is then returned untouched, after checking that it was made with
    `cfg.to_dict()` (and the fingerprint of `data_record()`: data are read only to check a complete folder)."""
    if read_status(run_dir) != "complete" or damage(run_dir):
        return False  # a damaged folder is trained again (running() clears its outputs)
    check_reusable(cfg, Path(run_dir), data_record() if data_record else None)
    return True


@contextlib.contextmanager
def running(run_dir: str | Path, device: str = "auto", *, resume: bool = False,
            outputs: Sequence[str] = OUTPUTS) -> Iterator[Any]:
    """The run-folder life cycle around the block, which gets the distributed.DistInfo of this process.

    Join the torchrun process group (if any), clear stale `outputs` unless resuming, write status
    "running"; after the block "complete", written last; an exception writes "failed: <reason>" and is
    re-raised. The process group is left again if this call created it. Rank 0 alone writes.
    """
    import torch

    from . import distributed

    run_dir = Path(run_dir)
    owns_group = not torch.distributed.is_initialized()
    info = distributed.setup(device)
    ok = False
    try:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume or not (run_dir / LAST).is_file():
                for name in (*outputs, MANIFEST):
                    (run_dir / name).unlink(missing_ok=True)
            write_status(run_dir, "running")
        distributed.barrier()
        yield info
        if info.is_main:
            seal(run_dir)
            write_status(run_dir, "complete")
        ok = True
    except BaseException as err:
        if info.is_main:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            write_status(run_dir, f"failed: {type(err).__name__}{': ' + reason if reason else ''}")
        raise
    finally:
        if owns_group and torch.distributed.is_initialized():
            distributed.shutdown() if ok else torch.distributed.destroy_process_group()


def check_reusable(cfg: Any, run_dir: Path, data_record: dict | None = None) -> None:
    """A folder holding a run (complete or not) made with other parameters or other data is an error, not a silent
    substitute, nor a run to clear or resume."""
    found = open_run(run_dir)
    if found is None:
        return
    params = found.record
    saved, wanted = found.config, cfg.to_dict()
    diff = [f"{k}: {saved.get(k)!r} there, {wanted[k]!r} asked" for k in wanted
            if k not in NOT_IDENTITY and k in saved and saved[k] != wanted[k]]
    if data_record is not None:
        had = params.get("data", {}).get("record", {})
        if had.get("fingerprint") != data_record["fingerprint"]:
            diff.append(f"data fingerprint: {had.get('fingerprint')!r} there, {data_record['fingerprint']!r} "
                        f"({data_record['tag']}) asked")
        negs = [(r.get("extra_negatives") or {}).get("fingerprint") for r in (had, data_record)]
        if negs[0] != negs[1]:
            diff.append(f"extra negatives fingerprint: {negs[0]!r} there, {negs[1]!r} asked")
    if diff:
        state = "a complete run" if read_status(run_dir) == "complete" else "an unfinished run"
        raise CXRError(f"{run_dir} is {state} with other parameters ({'; '.join(diff)}); "
                       "choose another run_dir or delete that folder to retrain")


# --- reading run folders: every reader goes through `Run` --------------------------------------------------


class Run:
    """One run folder as recorded: its parameters (`config`), data record, model record and status, with its
    metrics and predictions read on demand. Every read names the file it could not parse (`read_json`)."""

    def __init__(self, run_dir: str | Path, record: dict[str, Any] | None = None):
        self.dir = Path(run_dir)
        self.record = record if record is not None else read_json(self.dir / PARAMS)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @property
    def config(self) -> dict[str, Any]:
        """The run's parameters (the earliest layout's params.json held them at its top level)."""
        return self.record.get("config", self.record)

    @property
    def data(self) -> dict[str, Any]:
        return self.record.get("data", {})

    @property
    def model(self) -> dict[str, Any]:
        return self.record.get("model", {})

    @property
    def status(self) -> str:
        return read_status(self.dir)

    def metrics(self, missing_ok: bool = False) -> dict[str, Any]:
        """metrics.json; {} when it is not there and `missing_ok` (a run that has not finished)."""
        if missing_ok and not (self.dir / METRICS).is_file():
            return {}
        return read_json(self.dir / METRICS)

    def predictions(self, external: str = "") -> "pd.DataFrame":
        """The test split's predictions, or an external set's (`external` = its name); ids read as text."""
        import pandas as pd

        path = (self.dir / EXTERNAL / external if external else self.dir) / PREDICTIONS
        try:
            return pd.read_csv(path, dtype={"patient_id": str})
        except FileNotFoundError as err:
            raise CXRError(f"{path}: missing; rerun the run (python -m cxrlib.runs) or restore the file") from err
        except (OSError, ValueError) as err:
            raise CXRError(f"{path}: not a readable predictions table ({err}); rerun the run") from err

    def external_metrics(self, name: str) -> dict[str, Any]:
        return read_json(self.dir / EXTERNAL / name / METRICS)

    def externals(self) -> list[str]:
        """The external sets the run was scored on, by name."""
        return sorted(p.parent.name for p in (self.dir / EXTERNAL).glob(f"*/{PREDICTIONS}"))


def open_run(run_dir: str | Path) -> Run | None:
    """The run in a folder: trained (params.json), or only planned by the matrix (config.json: its `config` is
    what was asked for); None for a folder that is neither."""
    run_dir = Path(run_dir)
    if (run_dir / PARAMS).is_file():
        return Run(run_dir)
    if (run_dir / PLANNED).is_file():
        return Run(run_dir, {"config": read_json(run_dir / PLANNED)})
    return None


def find_runs(root: str | Path, status: str | None = "complete", **filters: Any) -> list[Run]:
    """The fine-tuning runs under `root` (any depth), selected by their recorded parameters, never their folder
    names: each filter is a config field and a value, or a predicate on the value (`preprocess=lambda p: p !=
    "none"`); a field a run did not record reads as RunConfig's default. `status` None keeps every status."""
    from .config import RunConfig

    root = Path(root)
    defaults = RunConfig.__dataclass_fields__
    runs = []
    for params in sorted(root.rglob(PARAMS)) if root.is_dir() else []:
        run = Run(params.parent)
        if "task" not in run.config or (status is not None and run.status != status):
            continue  # pretraining folders record no task
        def value(name: str) -> Any:
            return run.config.get(name, defaults[name].default if name in defaults else None)
        if all(want(value(k)) if callable(want) else value(k) == want for k, want in filters.items()):
            runs.append(run)
    return runs


NOT_THERE = ("running", "interrupted", "missing")  # `settle` states of a planned run that has no result yet


def settle(root: str | Path) -> list[dict[str, str]]:
    """Each run the root's matrix.json plans, in its order, as its folder shows it now: complete, failed (a failed or
    damaged status), running (a process holds it), interrupted (started, its process gone: the same command resumes
    it) or missing (never started); with its status and the host it was last started on ("" if not recorded). The
    folders decide, not matrix.json's statuses: shards on many machines fill one root. [] when nothing is planned."""
    root = Path(root)
    planned = read_json(root / MATRIX).get("runs", []) if (root / MATRIX).is_file() else []
    settled = []
    for name in (entry["name"] for entry in planned):
        run_dir = root / name
        status = read_status(run_dir)
        if status == "complete":
            state = "complete"
        elif status.startswith(("failed", "damaged")):
            state = "failed"
        elif holder(run_dir):
            state = "running"
        elif status == "running" or (run_dir / PLANNED).is_file():
            state = "interrupted"
        else:
            state = "missing"
        host = (run_dir / HOST).read_text().strip() if (run_dir / HOST).is_file() else ""
        settled.append({"run": name, "state": state, "status": status, "host": host})
    return settled


def run_root(profile: str, tag: str, base: str | Path | None = None) -> Path:
    """Where the run matrix puts the runs of one profile and data tag: <base>/runs/<profile>/<tag> (base: the
    repository)."""
    from .paths import ROOT

    return Path(base or ROOT) / "runs" / profile / tag
