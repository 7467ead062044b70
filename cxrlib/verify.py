"""`python -m cxrlib verify BUNDLE`: every number a results bundle states, recomputed from its predictions.

A bundle's verdicts rest on three kinds of file, all computed once when the chapters ran: each run's
`metrics.json` (from its `predictions.csv`), `claims.json` (chapter 5, from the runs' predictions) and
`generalisation.json` (chapter 6, from the runs' predictions and the ages in `ages.csv`). The book's first
page states them as they are (`bundle.findings_markdown`), so checking these files checks it too. Each is
recomputed here with the settings it recorded (bootstrap resamples and seed), and every number, word and
list is compared with what the file says: a number differs when it moves by more than TOLERANCE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CXRError

TOLERANCE = 1e-9  # a recomputed number may differ from the recorded one by float rounding, nothing more
RECOMPUTED = ("n", "n_patients", "classes", "accuracy", "macro_f1", "balanced_accuracy", "covid_sensitivity",
              "covid_specificity", "per_class", "macro", "confusion", "roc_auc", "roc_auc_per_class", "ci",
              "at_threshold", "held_out")  # what compute_metrics recomputes from predictions.csv (the rest: provenance)


def verify(bundle: str | Path) -> tuple[int, list[str]]:
    """(numbers that agree, one line per value that differs) over the bundle's run metrics, claims and
    generalisation records."""
    from . import bundle as bundles

    bundle = Path(bundle)
    record = bundles.load(bundle)
    checked, differ = 0, []
    folders = ["runs", *(record.get("also") or {})]
    for folder in folders:
        for run_dir in sorted(p for p in (bundle / folder).iterdir() if p.is_dir()):
            n, lines = _run_metrics(run_dir, f"{folder}/{run_dir.name}")
            checked, differ = checked + n, differ + lines
    if (bundle / bundles.CLAIMS).is_file():
        n, lines = compare(json.loads((bundle / bundles.CLAIMS).read_text()), recompute_claims(bundle),
                           bundles.CLAIMS)
        checked, differ = checked + n, differ + lines
    if (bundle / bundles.GENERALISATION).is_file():
        recorded = json.loads((bundle / bundles.GENERALISATION).read_text())
        n, lines = compare(recorded, recompute_generalisation(bundle, recorded), bundles.GENERALISATION)
        checked, differ = checked + n, differ + lines
    return checked, differ


def recompute_claims(bundle: Path) -> dict[str, Any]:
    """claims.json as chapter 5 makes it, from the bundle's run folders and matrix.json alone."""
    from . import results

    recorded = json.loads((bundle / "claims.json").read_text())
    boot = recorded.get("bootstrap") or {"n_boot": results.N_BOOT, "seed": 0}
    runs = results.load_runs(bundle / "runs")
    claims = results.claims_table(runs, results.read_not_run(bundle), n_boot=boot["n_boot"], seed=boot["seed"])
    against = (recorded.get("noise_floor") or {}).get("against") or ""
    noise = results.rerun_noise(runs, results.load_runs(bundle / against), boot["n_boot"], boot["seed"]) \
        if against else None
    return results.claims_record(claims, runs, noise, against, boot["n_boot"], boot["seed"])


def recompute_generalisation(bundle: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """generalisation.json as chapter 6 makes it, from the bundle's run folders and its ages.csv."""
    from . import generalise, remedies

    ages_file = bundle / generalise.AGES
    if not ages_file.is_file():
        raise CXRError(f"{bundle}: generalisation.json without {generalise.AGES}: the ages behind its \"adults\" are "
                       "not in the bundle, so it cannot be recomputed; re-execute chapter 6 with this code")
    ages = generalise.saved_ages(ages_file)
    table = generalise.measures(generalise.load_arms(bundle / "runs"), ages)
    remedy_root = recorded.get("remedy_root") or ""
    said = None
    if "remedies" in recorded:
        arms = remedies.load_arms(bundle / remedy_root if remedy_root else bundle / "runs")
        said = remedies.record(arms, remedies.goal_rows(arms, ages), remedies.auc_rows(arms, ages))
    return generalise.summary_record(table, said, remedy_root)


def compare(recorded: Any, fresh: Any, where: str) -> tuple[int, list[str]]:
    """(numbers that agree, a line per value that differs or is missing on one side) of two JSON values."""
    same, lines = 0, []
    left, right = dict(_leaves(recorded)), dict(_leaves(fresh))
    for key in sorted(set(left) | set(right), key=str):
        a, b = left.get(key, _MISSING), right.get(key, _MISSING)
        if _agree(a, b):
            same += isinstance(a, (int, float)) and not isinstance(a, bool)
        else:
            lines.append(f"{where}: {key}: recorded {_show(a)}, recomputed {_show(b)}")
    return same, lines


def _run_metrics(run_dir: Path, name: str) -> tuple[int, list[str]]:
    """A complete run's test metrics recomputed from its predictions.csv with the CI settings it recorded."""
    from . import metrics
    from .rundir import open_run

    run = open_run(run_dir)
    if run is None or run.status != "complete":
        return 0, []
    recorded = run.metrics()
    info = recorded.get("ci_info") or {}
    threshold = (recorded.get("at_threshold") or {}).get("threshold")
    fresh = metrics.compute_metrics(run.predictions(), recorded["classes"], n_boot=info.get("n_boot", 1000),
                                    seed=info.get("seed", 0), threshold=threshold,
                                    held_out=run.data.get("held_out_images", []))
    keys = [k for k in RECOMPUTED if k in fresh or k in recorded]
    said, again = {k: recorded.get(k) for k in keys}, {k: fresh.get(k) for k in keys}
    chosen = recorded.get("threshold_selection") or {}
    if chosen.get("threshold") is not None:  # the threshold rule of today: bounded below, the bound's runs flagged
        unbounded = chosen.get("unbounded_threshold", chosen["threshold"])
        said["threshold_selection"] = {"threshold": chosen["threshold"],  # a run from before the bound: not at it
                                       "at_bound": chosen.get("at_bound", False)}
        again["threshold_selection"] = {k: metrics.bounded_threshold(unbounded)[k] for k in ("threshold", "at_bound")}
    return compare(said, again, f"{name}/metrics.json")


_MISSING = object()


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(v, (int, float)) for v in (a, b)):
        return a == b or (_nan(a) and _nan(b))
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE) or (math.isnan(a) and math.isnan(b))


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _show(value: Any) -> str:
    return "nothing" if value is _MISSING else json.dumps(value, default=str)[:120]


def run(bundle: str) -> int:
    """The command: one line per value that differs (exit 1), else "N numbers verified" (exit 0)."""
    checked, differ = verify(bundle)
    for line in differ:
        print(line)
    if differ:
        print(f"{len(differ)} value(s) differ from what {bundle}'s predictions give ({checked} agree)")
        return 1
    print(f"{checked} numbers verified in {bundle} (and every word and list beside them)")
    return 0
