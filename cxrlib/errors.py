"""The one exception type users see: a message naming the file, row or parameter, and what to do; and the one
way every command line turns it (or an interrupt, or a failed read or write) into a single line (a notebook
shows it as that line too)."""

from __future__ import annotations

import sys
from collections.abc import Callable

RERUN = "rerun the same command to continue"


class CXRError(Exception):
    """A problem the user can fix (bad data, missing weights, bad parameter).

    The command line prints its message without a traceback; so does a notebook (Jupyter, papermill).
    """

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for it in place of a traceback: the one line (`%debug` still reaches the frames)."""
        return [f"{type(self).__name__}: {self}"]


def report(prog: str, work: Callable[[], int | None], interrupted: str = RERUN) -> int:
    """Run a command's `work` and return its exit code; a CXRError or an OSError (a file that cannot be read or
    written, named) is one line `<prog>: error: ...` and exit code 2, Ctrl-C one line and 130: never a traceback."""
    try:
        return int(work() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except CXRError as err:
        message = str(err)
    except OSError as err:  # permission denied, disk full, ...: the path and the system's reason
        message = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
