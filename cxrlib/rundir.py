"""The run folder's life cycle, for fine-tuning (train.run) and pretraining (pretrain.pretrain) alike.

The run folder is the contract between training and the notebooks and the book; its files:

    params.json      every parameter, data fingerprint, what the model loaded, versions, git commit, device
    model.pt         the best epoch by the validation monitor (models.load_checkpoint reads it)
    checkpoint-last.pt  everything needed to resume: model, optimiser, scheduler, scaler, RNG states
    history.csv      one row per epoch
    predictions.csv  the test split, one row per image (metrics.predictions_table)
    metrics.json     metrics on test + validation-chosen threshold + majority baseline + provenance
    status           "running", then "complete" written last; "failed: <reason>" when an exception escapes

torch is imported inside `running` only, so that the results chapter reads statuses without it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text
from .errors import CXRError

LAST = "checkpoint-last.pt"
BEST = "model.pt"
# What a fresh (not resumed) run removes from an unfinished folder; never the papermill notebook.
OUTPUTS = (BEST, LAST, "history.csv", "predictions.csv", "metrics.json")
# Parameters that may differ between a complete run folder and a request for it (they do not change results).
# Data folders are not identity either: the data fingerprint is (the same data may sit elsewhere on another machine).
NOT_IDENTITY = ("run_dir", "device", "num_workers", "profile", "coronahack_dir", "extra_covid_dir", "manifest",
                "extra_negatives", "external")


def read_status(run_dir: str | Path) -> str:
    """A run folder's status file: complete | running | failed: <reason> | missing."""
    path = Path(run_dir) / "status"
    return path.read_text().strip() if path.is_file() else "missing"


def write_status(run_dir: str | Path, status: str) -> None:
    write_text(Path(run_dir) / "status", status + "\n")


def reuse(cfg: Any, run_dir: str | Path, data_record: Callable[[], dict] | None = None) -> bool:
    """True when `run_dir` is complete: it is then returned untouched, after checking that it was made with
    `cfg.to_dict()` (and the fingerprint of `data_record()`: data are read only to check a complete folder)."""
    if read_status(run_dir) != "complete":
        return False
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
                for name in outputs:
                    (run_dir / name).unlink(missing_ok=True)
            write_status(run_dir, "running")
        distributed.barrier()
        yield info
        if info.is_main:
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
    """A complete folder made with other parameters or other data is an error, not a silent substitute."""
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    params = json.loads(params_file.read_text())
    saved, wanted = params.get("config", {}), cfg.to_dict()
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
        raise CXRError(f"{run_dir} is a complete run with other parameters ({'; '.join(diff)}); "
                       "choose another run_dir or delete that folder to retrain")
