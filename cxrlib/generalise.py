"""Does it generalise? Chapter 06's numbers and sentences, from run folders only.

A run's arm is read from its parameters: the paper set-up (CoronaHack + ieee8023), adult negatives
(`extra_negatives`, e.g. NIH adults in training), a held-out source (`hold_out`) and an image-level remedy
(`preprocess`). Each run is measured on populations it may never have seen:

- its external sets (`<run>/external/<name>/`, scored at the validation threshold): specificity on
  adults without COVID-19 is the cross-population test. A run that trained on images of the same
  source is not tested by them (it can learn "this scanner -> non-COVID"): such rows are kept but
  marked `evidence` False;
- the ieee8023 adults without COVID-19 in its own test split (the same collection as the COVID images,
  so no source shortcut helps): adult specificity where NIH images are no evidence;
- for a held-out source, COVID-19 sensitivity on that source's images (`params.json` lists them).
Every number is at the run's operating point: COVID-19 called when p_covid reaches the threshold chosen
on validation for 95% sensitivity (argmax when the run has none). Intervals: patient bootstrap where
metrics.json has one, else Wilson on images; denominators below `audit.MIN_SUBGROUP` are "too few to say".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .audit import MIN_SUBGROUP, format_subgroups, origin, subgroup_metrics, wilson
from .config import external_sets
from .data import read_any
from .errors import CXRError
from .lungs_removed import AUDIT_ONLY
from .metrics import apply_threshold
from .rundir import read_status

OTHER_SOURCES = "test split, other sources"  # a held-out run's test images of the sources it trained on
ARMS = ("paper set-up", "adult negatives", "held-out source", "remedy")  # chapter 06's order
GOAL = {"covid_specificity": 0.80, "covid_sensitivity": 0.90}  # issue 10's target, on sources never trained on
MEASURE_COLUMNS = ["run", "arm", "population", "metric", "value", "ci_low", "ci_high", "n", "ci_unit",
                   "enough", "evidence", "note"]  # fmt: skip


def arm_of(config: dict[str, Any]) -> str:
    """The arm of a run's parameters: one of ARMS (a remedy and adult negatives together count as the remedy)."""
    if config.get("hold_out"):
        return "held-out source"
    if config.get("preprocess", "none") != "none":
        return "remedy"
    return "adult negatives" if config.get("extra_negatives") else "paper set-up"


def load_arms(run_root: str | Path) -> pd.DataFrame:
    """One row per complete fine-tuning run folder under `run_root` (any depth): its arm and set-up."""
    root = Path(run_root)
    rows = []
    for params_file in sorted(root.rglob("params.json")) if root.is_dir() else []:
        run_dir = params_file.parent
        params = json.loads(params_file.read_text())
        config = params.get("config", {})
        if "task" not in config or read_status(run_dir) != "complete" or config.get("preprocess") in AUDIT_ONLY:
            continue
        sources = params.get("data", {}).get("summary", {}).get("sources", {}).get("train", {})
        rows.append({"run": str(run_dir.relative_to(root)), "run_dir": str(run_dir), "arm": arm_of(config),
                     "task": config["task"], "seed": config.get("seed"), "hold_out": config.get("hold_out", ""),
                     "preprocess": config.get("preprocess", "none"), "trained_sources": sorted(sources)})  # fmt: skip
    columns = ["run", "run_dir", "arm", "task", "seed", "hold_out", "preprocess", "trained_sources"]
    return pd.DataFrame(rows, columns=columns)


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"value": k / n if n else np.nan, "ci_low": low, "ci_high": high, "n": n, "ci_unit": "image (Wilson)",
            "enough": n >= MIN_SUBGROUP}


def _from_metrics(m: dict[str, Any], metric: str, n: int) -> dict[str, Any]:
    """A metric at the run's operating point: the validation threshold (`at_threshold`) when it has one."""
    m = m.get("at_threshold", m)
    low, high = m.get("ci", {}).get(metric) or (None, None)
    value = m.get(metric)
    return {"value": np.nan if value is None else value, "ci_low": np.nan if low is None else low,
            "ci_high": np.nan if high is None else high, "n": n, "ci_unit": "patient (bootstrap)",
            "enough": n >= MIN_SUBGROUP}  # fmt: skip


def _negatives(m: dict[str, Any]) -> int:
    return int(m["n"] - m.get("per_class", {}).get("covid", {}).get("support", 0))


def run_measures(run: pd.Series) -> pd.DataFrame:
    """The measurements of one run (a row of `load_arms`), one row each (columns MEASURE_COLUMNS)."""
    run_dir = Path(run["run_dir"])
    base = {"run": run["run"], "arm": run["arm"]}
    m = json.loads((run_dir / "metrics.json").read_text())
    rows = [{**base, "population": "own test split", "metric": "covid_specificity",
             **_from_metrics(m, "covid_specificity", _negatives(m)), "evidence": False,
             "note": "the sources it trained on"},
            {**base, "population": "own test split", "metric": "covid_sensitivity",
             **_from_metrics(m, "covid_sensitivity", m["n"] - _negatives(m)), "evidence": False,
             "note": "the sources it trained on"}]  # fmt: skip
    for ext in sorted((run_dir / "external").glob("*/metrics.json")):
        e = json.loads(ext.read_text())
        sources = set(pd.read_csv(ext.parent / "predictions.csv", usecols=["source"])["source"].astype(str))
        trained = sorted(sources & set(run["trained_sources"]))
        note = (f"trained on {', '.join(trained)} images: a source shortcut can pass this test" if trained
                else "no image of this source in training")
        rows.append({**base, "population": f"external: {ext.parent.name}", "metric": "covid_specificity",
                     **_from_metrics(e, "covid_specificity", _negatives(e)), "evidence": not trained, "note": note})
    pred = pd.read_csv(run_dir / "predictions.csv", dtype={"patient_id": str})
    threshold = m.get("threshold_selection", {}).get("threshold")
    if threshold is not None:  # the same operating point as every other row
        pred = apply_threshold(pred, threshold, m["classes"])
    adults = pred[(origin(pred) == "ieee8023") & (pred["true"] != "covid")]
    rows.append({**base, "population": "ieee8023 adults without COVID-19 (test split)", "metric": "covid_specificity",
                 **_rate(int((adults["pred"] != "covid").sum()), len(adults)), "evidence": True,
                 "note": "same collection as the COVID images: no source shortcut helps"})  # fmt: skip
    if run["hold_out"]:
        held = set(json.loads((run_dir / "params.json").read_text())["data"].get("held_out_images", []))
        covid = pred[pred["true"] == "covid"]
        for inside, population, note in ((True, f"held-out source {run['hold_out']}", "a source the model never trained on"),
                                         (False, OTHER_SOURCES, "the sources it trained on, for comparison")):
            part = covid[covid["image_id"].isin(held) == inside]
            rows.append({**base, "population": population, "metric": "covid_sensitivity",
                         **_rate(int((part["pred"] == "covid").sum()), len(part)), "evidence": inside, "note": note})
    return pd.DataFrame(rows, columns=MEASURE_COLUMNS)


def measures(arms: pd.DataFrame) -> pd.DataFrame:
    """`run_measures` of every run of `load_arms`, in ARMS order."""
    parts = [run_measures(run) for _, run in arms.iterrows()]
    if not parts:
        return pd.DataFrame(columns=MEASURE_COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values("arm", key=lambda a: a.map(ARMS.index), kind="stable", ignore_index=True)


def fmt(row: pd.Series) -> str:
    """"0.62 [0.55–0.70] (n=300)", "too few to say (n=4)" or "none (n=0)": never a bare 0 or NaN."""
    n = int(row["n"])
    if n == 0 or pd.isna(row["value"]):
        return f"none (n={n})"
    if not row["enough"]:
        return f"too few to say (n={n})"
    ci = f" [{row['ci_low']:.2f}–{row['ci_high']:.2f}]" if pd.notna(row["ci_low"]) else ""
    return f"{row['value']:.2f}{ci} (n={n})"


def compare(a: pd.Series, b: pd.Series) -> str:
    """"lower", "higher" or "no clear difference": whether the 95% intervals of two measures are disjoint."""
    if not (a["enough"] and b["enough"]) or pd.isna([a["ci_low"], a["ci_high"], b["ci_low"], b["ci_high"]]).any():
        return "not comparable"
    if a["ci_high"] < b["ci_low"]:
        return "lower"
    if a["ci_low"] > b["ci_high"]:
        return "higher"
    return "no clear difference"


def versus(a: pd.Series, b: pd.Series, what: str) -> str:
    """`compare` as words: "lower than <what>", "no clear difference from <what>", ..."""
    word = compare(a, b)
    if word in ("lower", "higher"):
        return f"{word} than {what}"
    return f"no clear difference from {what}" if word == "no clear difference" else f"not comparable with {what}: too few images"


def verdicts(table: pd.DataFrame) -> list[str]:
    """Markdown sentences, one per run (arms in ARMS order), computed from `measures`; "not run" for a missing arm."""
    out = []
    for arm in ARMS:
        if not (table["arm"] == arm).any():
            out.append(f"- **{arm}**: not run.")
        for run, rows in table[table["arm"] == arm].groupby("run", sort=True):
            out.append(f"- **{arm}** (`{run}`): " + "; ".join(_run_sentences(rows)) + ".")
    return out


def goal_verdict(table: pd.DataFrame) -> str:
    """Whether a run meets the goal on sources it never trained on (`evidence`, enough images): specificity on
    adults without COVID-19 >= GOAL["covid_specificity"] in every such population it was measured on, and
    COVID-19 sensitivity >= GOAL["covid_sensitivity"] on a held-out source, both at the validation operating point.
    A run lacking either measurement cannot meet it; the sentence says how many such runs there were."""
    usable = table[table["evidence"].astype(bool) & table["enough"].astype(bool)]
    head = (f"**Goal** (on sources never trained on: adult non-COVID specificity ≥ {GOAL['covid_specificity']:.2f} "
            f"while COVID-19 sensitivity ≥ {GOAL['covid_sensitivity']:.2f}): ")
    judged, lacking = [], 0
    for run, rows in table.groupby("run", sort=True):
        rows = usable[usable["run"] == run]
        worst = {m: rows[rows["metric"] == m].sort_values("value").head(1) for m in GOAL}
        if any(w.empty for w in worst.values()):
            lacking += 1
            continue
        spec, sens = (worst[m].iloc[0] for m in GOAL)
        met = spec["value"] >= GOAL["covid_specificity"] and sens["value"] >= GOAL["covid_sensitivity"]
        judged.append(f"`{run}` ({spec['arm']}): specificity {fmt(spec)} on {spec['population']}, sensitivity "
                      f"{fmt(sens)} on {sens['population']}: {'met' if met else 'not met'}")
    met_by = [j for j in judged if j.endswith(": met")]
    missing = (f" {lacking} run(s) lack one of the two measurements on an unseen source with enough images (COVID-19 "
               "sensitivity on an unseen source needs a held-out-source run), so they cannot show it." if lacking else "")
    verdict = f"met by {len(met_by)} run(s)." if met_by else "**not met** by any run."
    return head + verdict + "".join(f"\n- {j}." for j in judged) + ("\n\n" if judged and missing else "") + missing


def _run_sentences(rows: pd.DataFrame) -> list[str]:
    """One run's measures as clauses: each population against the run's own test split."""
    own = rows[(rows["population"] == "own test split") & (rows["metric"] == "covid_specificity")].iloc[0]
    parts = [f"own test split specificity {fmt(own)}"]
    for _, r in rows[~rows["population"].isin(["own test split", OTHER_SOURCES])].iterrows():
        if not r["evidence"]:
            parts.append(f"{r['population']} specificity {fmt(r)} is no evidence ({r['note']})")
        elif r["metric"] == "covid_specificity":
            called = f", so it calls {1 - r['value']:.0%} of these adults COVID-19" if r["enough"] else ""
            parts.append(f"{r['population']}: specificity {fmt(r)}{called} ({versus(r, own, 'its own test split')})")
        else:
            inside = rows[(rows["population"] == OTHER_SOURCES) & (rows["metric"] == r["metric"])].iloc[0]
            parts.append(f"{r['population']}: COVID-19 sensitivity {fmt(r)}, against {fmt(inside)} on the test "
                         f"images of the sources it trained on ({versus(r, inside, 'there')})")
    return parts


def arm_comparison(table: pd.DataFrame, population: str, metric: str = "covid_specificity",
                   reference: str = "paper set-up") -> pd.DataFrame:
    """Each arm's `metric` on one `population` next to the reference arm's, with `compare`'s word."""
    rows = table[(table["population"] == population) & (table["metric"] == metric) & table["evidence"]]
    ref = rows[rows["arm"] == reference]
    if ref.empty:
        raise CXRError(f"no {reference!r} run measured {metric} on {population!r}: run that arm first")
    ref_row = ref.iloc[0]
    return pd.DataFrame([{"arm": r["arm"], "run": r["run"], population: fmt(r),
                          f"vs {reference}": "—" if r["arm"] == reference else compare(r, ref_row)}
                         for _, r in rows.iterrows()])  # fmt: skip


def external_subgroups(run_dir: str | Path, name: str, by: str = "age_band", where: str = "") -> pd.DataFrame:
    """One external set of a run by subgroup (age band, sex, view, ...), formatted by `format_subgroups`.

    The metadata comes from re-reading the set's folder or manifest (no image is decoded): `where` it is
    on this machine, else where the run found it.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "params.json").read_text())["config"]
    where = where or external_sets(config.get("external", "")).get(name)
    pred_file = run_dir / "external" / name / "predictions.csv"
    if where is None or not pred_file.is_file():
        raise CXRError(f"{run_dir}: no external set {name!r} (its external parameter: {config.get('external')!r})")
    meta, _ = read_any(where)
    pred = pd.read_csv(pred_file, dtype={"patient_id": str})
    m = json.loads((pred_file.parent / "metrics.json").read_text())
    if m.get("threshold_from_validation") is not None:
        pred = apply_threshold(pred, m["threshold_from_validation"], m["classes"])
    return format_subgroups(subgroup_metrics(pred, meta, by))
