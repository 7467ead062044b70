"""`python -m cxrlib.rescore RUN_DIR...`: a complete run's metrics re-scored from its own predictions.csv with
today's rules, no model needed (a results bundle has no weights).

Two rules changed after runs were committed (issue 32): metrics.json's own-test numbers exclude the held-out
populations (`metrics.compute_metrics`'s `held_out` blocks), and the operating threshold is bounded below
(`metrics.bounded_threshold`). The validation predictions are not kept, but the bounded threshold needs only
the unbounded one the run recorded. Where the threshold moves, each external set's metrics move with it.
Each rewritten file's size and hash are restated in the run's manifest (`rundir.reseal`), and metrics.json
records the commit that re-scored it (`rescored`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import metrics
from .errors import CXRError
from .rundir import EXTERNAL, METRICS, Run, reseal


def rescored_metrics(run: Run) -> dict[str, Any]:
    """The run's metrics.json as today's code writes it from its predictions.csv: own test and `held_out` apart,
    the bounded threshold; the recorded bootstrap settings and everything that is not a metric kept."""
    old = run.metrics()
    chosen = dict(old.get("threshold_selection") or {})
    unbounded = chosen.get("unbounded_threshold", chosen.get("threshold"))
    if unbounded is not None:
        chosen.update(metrics.bounded_threshold(unbounded))
    info = old.get("ci_info") or {}
    fresh = metrics.compute_metrics(run.predictions(), old["classes"], n_boot=info.get("n_boot", 1000),
                                    seed=info.get("seed", 0), threshold=chosen.get("threshold"),
                                    held_out=run.data.get("held_out_images", []))
    kept = {k: v for k, v in old.items() if k not in ("held_out", "at_threshold", "rescored")}
    return {**kept, **fresh, **({"threshold_selection": chosen} if chosen else {})}


def rescore(run_dir: str | Path) -> list[str]:
    """Rewrite a complete run's metrics.json (and its external sets' where the threshold moved); the files
    rewritten, relative to the run folder."""
    run = Run(run_dir)
    if run.status != "complete":
        raise CXRError(f"{run_dir}: status {run.status!r}; only a complete run can be re-scored")
    fresh = rescored_metrics(run)
    commit = metrics.provenance("")["git_commit"]
    fresh["rescored"] = {"by": "python -m cxrlib.rescore", "git_commit": commit,
                         "why": "own test without held-out images; threshold bounded below (issue 32)"}
    metrics.save_metrics(fresh, run.dir / METRICS)
    written = [METRICS]
    threshold = (fresh.get("threshold_selection") or {}).get("threshold")
    for name in run.externals():
        e = run.external_metrics(name)
        if e.get("threshold_from_validation") == threshold:
            continue
        info = e.get("ci_info") or {}
        again = metrics.compute_metrics(run.predictions(name), e["classes"], n_boot=info.get("n_boot", 1000),
                                        seed=info.get("seed", 0), threshold=threshold)
        kept = {k: v for k, v in e.items() if k != "at_threshold"}
        metrics.save_metrics({**kept, **again, "threshold_from_validation": threshold,
                              "rescored": fresh["rescored"]}, run.dir / EXTERNAL / name / METRICS)
        written.append(f"{EXTERNAL}/{name}/{METRICS}")
    reseal(run.dir, written)
    return written


def main(argv: list[str] | None = None) -> int:
    """The command: re-score each run folder named, saying which files changed."""
    parser = argparse.ArgumentParser(prog="python -m cxrlib.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="complete run folders")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.runs:
            print(f"{run_dir}: rewrote {', '.join(rescore(run_dir))}")
    except CXRError as err:
        parser.exit(2, f"python -m cxrlib.rescore: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
