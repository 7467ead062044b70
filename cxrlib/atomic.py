"""Atomic file writes: a temporary file in the same folder, then os.replace.

A crash or a kill never leaves a truncated file that a later run or the book would trust: readers see
the old file or the new one. Every file cxrlib writes into a run folder goes through `write_atomic`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _new_file(path)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only folder: name the file written, not its temporary
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `_new_file`'s temporaries (never part of a run's record)."""
    return re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", name) is not None


def _new_file(path: Path) -> Path:
    """An empty, new `.<name>.<random>.tmp` beside `path`, made as a plain open() makes files (0o666 less the
    umask), not tempfile's 0o600: others on a shared machine read run files as the writer's umask allows."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer's name: draw again
            continue


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_csv(frame: Any, path: str | Path) -> Path:
    """A pandas DataFrame as CSV without its index."""
    return write_text(path, frame.to_csv(index=False))


def save_torch(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically: a crash never leaves a truncated checkpoint."""
    import torch  # here, so that modules reading run folders do not import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # through Python's file: a full disk is an OSError (errno 28), not a
            torch.save(obj, handle)     # RuntimeError of torch's own writer that names no file

    return write_atomic(path, save)
