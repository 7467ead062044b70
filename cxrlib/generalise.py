"""Does it generalise? Chapter 06's numbers, verdicts and sentences, from run folders only.

A run's arm is read from its parameters: the paper set-up (CoronaHack + ieee8023), adult negatives
(`extra_negatives`, e.g. NIH adults in training), a held-out source (`hold_out`) and an image-level remedy
(`preprocess`); `arm_label` says it in words ("held-out source: country=italy", "adult negatives + CLAHE").
Each run is measured on populations it may never have seen, every image once per run (`outcomes`):

- its external sets (`<run>/external/<name>/`, scored at the validation threshold), split by age: adults
  (age >= ADULT_AGE) without COVID-19, children without COVID-19 and images of unknown age, each reported
  apart, so that only adults count as adults. A run that trained on images of the same source is not tested
  by them (it can learn "this scanner -> non-COVID"): such rows are kept but marked `evidence` False;
- the ieee8023 images without COVID-19 in its own test split (the same collection as the COVID images, so no
  source shortcut helps), split by age the same way;
- for a held-out source, COVID-19 sensitivity on that source's images (`params.json` lists them).
Run folders record no ages (predictions.csv holds ids; an `age` column there is used when present): `read_ages`
re-reads them from the metadata.

Every number is at the run's operating point: COVID-19 called when p_covid reaches the threshold chosen on
validation for 95% sensitivity (argmax when the run has none). Each measure is given per run and pooled over
the runs of one arm (`level` "run" / "arm"); its 95% interval is the wider, at each end, of the Wilson interval
on images and the percentile interval of a patient bootstrap (a patient's images move together), so neither
a patient with many images nor a proportion near 0 or 1 makes it too narrow. Fewer than `audit.MIN_SUBGROUP`
images is "too few to say".

The goal (GOAL, on sources a model never trained on) is judged by the interval: "met" when its lower end
reaches the goal, "not met" when its upper end is below it, else "undecided" (`goal_word`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import write_text
from .audit import MIN_SUBGROUP, format_subgroups, origin, subgroup_metrics, wilson
from .config import ADULT_AGE, external_sets, hold_out_terms
from .data import load_table, read_any
from .errors import CXRError
from .lungs_removed import AUDIT_ONLY
from .metrics import METRIC_WORDS, MIN_THRESHOLD, apply_threshold
from .results import LOSS_WORDS, arm_name, fmt_ci
from .rundir import Run, find_runs
from .weights import Weights

ARMS = ("paper set-up", "adult negatives", "held-out source", "remedy")  # chapter 06's order
GOAL = {"covid_specificity": 0.80, "covid_sensitivity": 0.90}  # issue 10's target, on sources never trained on
N_BOOT = 2000  # patient-bootstrap resamples per interval
AGES = "ages.csv"  # beside generalisation.json: the ages its "adults" rest on (save_summary)
EXTERNAL_WORDS = {"nih": "NIH ChestX-ray14"}  # an external set's name (the `external` parameter) in words
GROUP_WORDS = {"adults": "adults without COVID-19", "children": f"children (under {ADULT_AGE}) without COVID-19",
               "age unknown": "images without COVID-19, age unknown"}
OWN = "own test split"
IEEE = "ieee8023 {} (test split)"
OTHER_SOURCES = "COVID-19 images of the other sources (test split)"  # a held-out run's, of the sources it trained on
VERDICTS = ("met", "not met", "undecided", "too few to say")
OUTCOME_COLUMNS = ["run", "population", "group", "metric", "image_id", "patient_id", "hit", "evidence", "note"]
MEASURE_COLUMNS = ["level", "arm", "label", "run", "run_name", "runs", "seeds", "population", "group", "metric",
                   "value", "ci_low", "ci_high", "n", "n_patients", "enough", "evidence", "goal", "verdict",
                   "per_run", "note"]  # fmt: skip


# --- runs and their arms -----------------------------------------------------------------------------


def arm_of(config: dict[str, Any]) -> str:
    """The arm of a run's parameters: one of ARMS (a remedy with adult negatives or a held-out source counts as
    the remedy; adults only is a remedy)."""
    if config.get("preprocess", "none") != "none" or config.get("cohort", "all") != "all":
        return "remedy"
    if config.get("hold_out"):
        return "held-out source"
    return "adult negatives" if config.get("extra_negatives") else "paper set-up"


def arm_label(config: dict[str, Any]) -> str:
    """A run's arm in words, precise enough to pool its runs: results.arm_name ("paper set-up", "held-out source:
    country=italy", "adult negatives + CLAHE", "..., without weighted sampling"), and ", no extra COVID-19
    images" for runs trained without them (another training set). Seeds, tasks, losses and initialisations are
    the runs of one label."""
    return arm_name(config) + (", no extra COVID-19 images" if config.get("extra_covid_train") is False else "")


def run_words(config: dict[str, Any]) -> str:
    """A run in words: "binary, focal loss, random init, seed 0" (its folder name is not for readers)."""
    backbone, weights = config.get("backbone", "resnet50"), config.get("weights") or "none"
    loss = config.get("loss", "")
    return ", ".join(filter(None, [config.get("task", "?"), f"{LOSS_WORDS.get(loss, loss)} loss", Weights.parse(weights).label,
                                   "" if backbone == "resnet50" else backbone, f"seed {config.get('seed', 0)}"]))


def load_arms(run_root: str | Path) -> pd.DataFrame:
    """One row per complete fine-tuning run folder under `run_root` (any depth): its arm, label and set-up."""
    root = Path(run_root)
    rows = []
    for run in find_runs(root, preprocess=lambda p: p not in AUDIT_ONLY):
        config = run.config
        sources = run.data.get("summary", {}).get("sources", {}).get("train", {})
        rows.append({"run": str(run.dir.relative_to(root)), "run_dir": str(run.dir), "arm": arm_of(config),
                     "label": arm_label(config), "run_name": run_words(config), "task": config["task"],
                     "seed": config.get("seed"), "hold_out": config.get("hold_out", ""),
                     "preprocess": config.get("preprocess", "none"), "trained_sources": sorted(sources),
                     "config": config})  # fmt: skip
    columns = ["run", "run_dir", "arm", "label", "run_name", "task", "seed", "hold_out", "preprocess",
               "trained_sources", "config"]
    return pd.DataFrame(rows, columns=columns)


# --- ages --------------------------------------------------------------------------------------------


def read_ages(arms: pd.DataFrame, where: Mapping[str, str] | None = None,
              cohorts: Sequence[pd.DataFrame] = ()) -> tuple[pd.Series, list[str]]:
    """Age in years of the images the runs were scored on (image_id -> age, NaN unknown), and a note for each
    source whose metadata could not be read here (its images then count as "age unknown", never as adults).

    Run folders record ids, not ages. The runs' own images: the data each run recorded, re-read with
    `load_table` (copies merged as in training, so a CoronaHack copy of an ieee8023 image has its age), else
    `cohorts` (tables of `data.load_table`, e.g. the chapter's own data). External sets: their metadata
    (`read_any`, no image decoded), where `where` (name -> folder or manifest) says, else where the run found them.
    """
    where = dict(where or {})
    parts: list[pd.DataFrame] = []
    notes: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for config in arms["config"] if len(arms) else []:
        own = tuple(str(config.get(k) or "") for k in ("coronahack_dir", "extra_covid_dir", "manifest"))
        if own not in seen:
            seen.add(own)
            try:
                parts.append(load_table(*own)[0][["image_id", "age"]])
            except (CXRError, OSError, ValueError):
                if not cohorts:
                    notes.append("the runs' own data is not where they recorded it: the ages of their test images "
                                 "are unknown, so the ieee8023 test split has no adults here")
    parts += [c[["image_id", "age"]] for c in cohorts]
    for config in arms["config"] if len(arms) else []:
        for name, found in external_sets(config.get("external", "")).items():
            key = (name, where.get(name) or found)
            if key in seen:
                continue
            seen.add(key)
            try:
                parts.append(read_any(key[1])[0][["image_id", "age"]])
            except (CXRError, OSError, ValueError):
                notes.append(f"external set {name}: its metadata is not where the runs found it (give external_dirs="
                             f"{name}=<folder>): its ages are unknown, so none of its images counts as an adult")
    ages = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["image_id", "age"])
    ages = ages.drop_duplicates("image_id").set_index("image_id")["age"].astype(float)
    return ages, notes


def age_group(age: pd.Series) -> pd.Series:
    """"adults" (age >= ADULT_AGE), "children" (younger) or "age unknown" (NaN), per image."""
    age = pd.to_numeric(age, errors="coerce")
    return pd.Series(np.where(age.isna(), "age unknown", np.where(age >= ADULT_AGE, "adults", "children")),
                     index=age.index)


# --- outcomes: one row per image a run called ----------------------------------------------------------


def _called(pred: pd.DataFrame, threshold: float | None, classes: Sequence[str]) -> pd.DataFrame:
    """Predictions at the run's operating point (the validation threshold; argmax without one)."""
    pred = apply_threshold(pred, threshold, classes) if threshold is not None else pred
    return pred.assign(patient_id=pred["patient_id"].fillna(pred["image_id"]).astype(str))


def _hits(pred: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The images that `metric` counts, each with `hit`: a negative not called COVID-19 (specificity), or a
    COVID-19 image called COVID-19 (sensitivity)."""
    covid = pred["true"] == "covid"
    rows = pred[~covid] if metric == "covid_specificity" else pred[covid]
    hit = rows["pred"] != "covid" if metric == "covid_specificity" else rows["pred"] == "covid"
    return rows[["image_id", "patient_id"]].assign(metric=metric, hit=hit.to_numpy())


def _by_age(pred: pd.DataFrame, where: str, ages: pd.Series, evidence: bool, note: str) -> list[pd.DataFrame]:
    """The negatives of `pred` by age group (adults, children, age unknown: each a population of its own, named
    `where` with the group's words in place of "{}"). The age is the predictions' own `age` column where they
    have one, else `ages` (image_id -> age)."""
    negatives = pred[pred["true"] != "covid"]
    own = negatives["age"] if "age" in negatives.columns else pd.Series(np.nan, index=negatives.index)
    groups = age_group(pd.to_numeric(own, errors="coerce").fillna(negatives["image_id"].map(ages)))
    hits = _hits(negatives, "covid_specificity")
    return [hits[groups == group].assign(population=where.format(GROUP_WORDS[group]), group=group,
                                         evidence=evidence, note=note)
            for group in GROUP_WORDS if (groups == group).any()]  # fmt: skip


def run_outcomes(run: pd.Series, ages: pd.Series | None = None, argmax: bool = False) -> pd.DataFrame:
    """Every image one run (a row of `load_arms`) was measured on, one row per population and metric
    (columns OUTCOME_COLUMNS); `ages`: image_id -> age (`read_ages`), unknown when absent. `argmax`: the run
    called at argmax rather than at its validation threshold (the operating point's effect, shown beside it)."""
    ages = pd.Series(dtype=float) if ages is None else ages
    store = Run(run["run_dir"])
    m = store.metrics()
    threshold = None if argmax else m.get("threshold_selection", {}).get("threshold")
    pred = _called(store.predictions(), threshold, m["classes"])
    held = set(store.data.get("held_out_images", []))
    own = pred[~pred["image_id"].isin(held)]  # its own test split: the held-out images are populations of their own
    parts = [_hits(own, metric).assign(population=OWN, group="", evidence=False, note="the sources it trained on")
             for metric in GOAL]  # fmt: skip
    for ext in store.externals():
        e = store.external_metrics(ext)
        scored = _called(store.predictions(ext), None if argmax else e.get("threshold_from_validation"), e["classes"])
        trained = sorted(set(scored["source"].astype(str)) & set(run["trained_sources"]))
        note = (f"trained on {', '.join(trained)} images: a source shortcut can pass this test" if trained
                else "no image of this source in training")
        name = EXTERNAL_WORDS.get(ext, ext)
        parts += _by_age(scored, name + " {}", ages, not trained, note)
        if (scored["true"] == "covid").any():
            parts.append(_hits(scored, "covid_sensitivity").assign(population=f"{name} COVID-19 images", group="",
                                                                   evidence=not trained, note=note))
    ieee = pred[origin(pred) == "ieee8023"]
    parts += _by_age(ieee, IEEE, ages, True, "same collection as the COVID images: no source shortcut helps")
    if run["hold_out"]:
        covid = _hits(pred, "covid_sensitivity")
        inside = covid["image_id"].isin(held)
        held_words = f"COVID-19 images of the held-out source ({held_source(run['hold_out'])})"
        parts += [covid[inside].assign(population=held_words, group="", evidence=True,
                                       note="a source the model never trained on"),
                  covid[~inside].assign(population=OTHER_SOURCES, group="", evidence=False,
                                        note="the sources it trained on, for comparison")]  # fmt: skip
    out = pd.concat(parts, ignore_index=True).assign(run=run["run"])
    return out[OUTCOME_COLUMNS]


def held_source(spec: str) -> str:
    """The part of a `hold_out` that can hold COVID-19 images, in words ("country=italy"): a term asking for
    covid=no holds out people without COVID-19, measured as a population of its own."""
    terms = [term for term in hold_out_terms(spec) if ("covid", "no") not in [(c, v.lower()) for c, v in term]]
    return "; ".join(" and ".join(f"{c}={v}" for c, v in term) for term in terms) or spec


def outcomes(arms: pd.DataFrame, ages: pd.Series | None = None, argmax: bool = False) -> pd.DataFrame:
    """`run_outcomes` of every run of `load_arms`, with each run's arm, label and seed."""
    parts = [run_outcomes(run, ages, argmax) for _, run in arms.iterrows()]
    if not parts:
        return pd.DataFrame(columns=[*OUTCOME_COLUMNS, "arm", "label", "run_name", "seed"])
    return pd.concat(parts, ignore_index=True).merge(arms[["run", "arm", "label", "run_name", "seed"]], on="run")


# --- estimates and verdicts ----------------------------------------------------------------------------


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of a share `p` of `n` images (audit.wilson; NaN, NaN for n = 0); `p` may be a mean
    over several runs' calls of the same images."""
    return wilson(p * n, n) if math.isfinite(p) else (np.nan, np.nan)


def estimate(calls: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The share of `hit` among `calls` (one run's, or several runs' pooled), with its 95% interval: at each end
    the wider of the Wilson interval on the distinct images and a patient-bootstrap percentile interval."""
    n = int(calls["image_id"].nunique())
    if n == 0:
        return {"value": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0, "n_patients": 0, "enough": False}
    per = calls.groupby("patient_id", sort=True)["hit"].agg(["sum", "count"])
    k, c = per["sum"].to_numpy(float), per["count"].to_numpy(float)
    value = float(k.sum() / c.sum())
    low, high = wilson_interval(value, n)
    if len(per) > 1:
        pick = np.random.default_rng(seed).integers(0, len(per), size=(n_boot, len(per)))
        b_low, b_high = np.quantile(k[pick].sum(axis=1) / c[pick].sum(axis=1), [0.025, 0.975])
        low, high = min(low, float(b_low)), max(high, float(b_high))
    return {"value": value, "ci_low": low, "ci_high": high, "n": n, "n_patients": len(per), "enough": n >= MIN_SUBGROUP}


def goal_word(row: pd.Series | Mapping[str, Any]) -> str:
    """A measure against its goal: "met" (the interval's lower end reaches it), "not met" (its upper end is
    below it), "undecided" (the interval holds it), "too few to say"; "" where the row has no goal."""
    goal = row.get("goal")
    if goal is None or pd.isna(goal):
        return ""
    if not row["enough"] or pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return "too few to say"
    return "met" if row["ci_low"] >= goal else "not met" if row["ci_high"] < goal else "undecided"


def _goal(population_group: str, metric: str, evidence: bool) -> float:
    """The goal a measure is held to: adults' specificity and COVID-19 sensitivity, on unseen sources only."""
    if not evidence:
        return np.nan
    if metric == "covid_specificity":
        return GOAL[metric] if population_group == "adults" else np.nan
    return GOAL[metric]


def seed_words(runs: int, seeds: Sequence[Any]) -> str:
    """"8 runs, seed 0" / "6 runs, seeds 0, 1, 2": how many runs and seeds stand behind a number."""
    kept = sorted({int(s) for s in seeds if pd.notna(s)})
    seed_text = (f"seed{'s' if len(kept) != 1 else ''} {', '.join(map(str, kept))}") if kept else "seed unknown"
    return f"{runs} run{'s' if runs != 1 else ''}, {seed_text}"


def _tally(verdicts: pd.Series) -> str:
    """"6 not met, 2 undecided": the runs' own verdicts behind a pooled one."""
    counts = verdicts.value_counts()
    return ", ".join(f"{int(counts[v])} {v}" for v in VERDICTS if v in counts) or "–"


def measures(arms: pd.DataFrame, ages: pd.Series | None = None, n_boot: int = N_BOOT,
             argmax: bool = False) -> pd.DataFrame:
    """Every measure (columns MEASURE_COLUMNS), per run (`level` "run") and pooled over the runs of one arm
    label (`level` "arm", `run` ""), in ARMS order; `ages` as `read_ages` gives them (None: read here from
    where the runs found their data).

    A pooled verdict is the pooled interval's, except that where the label's runs contradict each other (one
    "met", another "not met") it is "undecided"; `per_run` tallies the runs' own verdicts. `argmax`: every run
    called at argmax instead of at its threshold (`run_outcomes`).
    """
    if ages is None:
        ages = read_ages(arms)[0]
    calls = outcomes(arms, ages, argmax)
    if calls.empty:
        return pd.DataFrame(columns=MEASURE_COLUMNS)
    order = {p: i for i, p in enumerate(dict.fromkeys(calls["population"]))}
    rows = []
    for (label, population, metric), part in calls.groupby(["label", "population", "metric"], sort=False):
        first = part.iloc[0]
        evidence = bool(part["evidence"].all())
        goal = _goal(first["group"], metric, evidence)
        base = {"arm": first["arm"], "label": label, "population": population, "group": first["group"],
                "metric": metric, "evidence": evidence, "goal": goal, "note": first["note"]}
        per_run = []
        for run, mine in part.groupby("run", sort=True):
            row = {**base, "level": "run", "run": run, "run_name": mine["run_name"].iloc[0], "runs": 1,
                   "seeds": str(mine["seed"].iloc[0]), "evidence": bool(mine["evidence"].iloc[0]),
                   "note": mine["note"].iloc[0], **estimate(mine, n_boot), "per_run": ""}
            row["verdict"] = goal_word(row)
            per_run.append(row)
        runs = pd.DataFrame(per_run)
        pooled = {**base, "level": "arm", "run": "", "run_name": "", "runs": len(runs),
                  "seeds": ", ".join(str(s) for s in sorted(set(part["seed"].dropna().astype(int)))),
                  **estimate(part, n_boot), "per_run": _tally(runs["verdict"]) if pd.notna(goal) else ""}
        pooled["verdict"] = goal_word(pooled)
        if pooled["verdict"] in ("met", "not met") and {"met", "not met"} <= set(runs["verdict"]):
            pooled["verdict"] = "undecided"  # the runs contradict each other: the pool cannot settle it
        rows += [pooled, *per_run]
    out = pd.DataFrame(rows)[MEASURE_COLUMNS]
    out["_arm"], out["_pop"] = out["arm"].map(ARMS.index), out["population"].map(order)
    out["_metric"], out["_level"] = out["metric"].map(list(GOAL).index), out["level"].map(["arm", "run"].index)
    out = out.sort_values(["_arm", "label", "_pop", "_metric", "_level", "run"], kind="stable", ignore_index=True)
    return out.drop(columns=["_arm", "_pop", "_metric", "_level"])


def fmt(row: pd.Series | Mapping[str, Any], n: bool = True) -> str:
    """"0.460 (0.290–0.650), n=300" (results.fmt_ci), "too few to say (n=4)" or "none (n=0)": never a bare NaN."""
    count = int(row["n"])
    if count == 0 or pd.isna(row["value"]):
        return f"none (n={count})"
    if not row["enough"]:
        return f"too few to say (n={count})"
    return fmt_ci(row["value"], (row["ci_low"], row["ci_high"])) + (f", n={count}" if n else "")


# --- what the chapter shows ------------------------------------------------------------------------------


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per arm label x population x metric on sources the runs never trained on (pooled over the
    label's runs), in `measures`' order: the chapter's one table and its forest plot; `arm_runs` is the label
    with its runs and seeds ("paper set-up (8 runs, seed 0)")."""
    keep = (table["level"] == "arm") & table["evidence"].astype(bool)
    out = table[keep].reset_index(drop=True)
    out["arm_runs"] = [f"{r['label']} ({seed_words(int(r['runs']), _seeds(r))})" for _, r in out.iterrows()]
    return out


def summary_for_reading(rows: pd.DataFrame) -> pd.DataFrame:
    """`summary` (or `measures`' run rows) as text: arm, population, measure, goal, estimate, images, verdict,
    and how many runs and seeds stand behind it."""
    per_run = rows["level"].eq("run").all() if len(rows) else False

    def goal(r: pd.Series) -> str:
        if pd.notna(r["goal"]):
            return f"≥ {r['goal']:.2f}"
        return "none: not adults" if r["metric"] == "covid_specificity" and r["evidence"] else "none"

    out = pd.DataFrame({
        "arm": rows["label"], **({"run": rows["run_name"]} if per_run else {}),
        "population": rows["population"], "measure": rows["metric"].map(METRIC_WORDS),
        "goal": rows.apply(goal, axis=1) if len(rows) else [],
        "estimate (95% CI)": rows.apply(fmt, axis=1, n=False) if len(rows) else [],
        "images": rows["n"].astype(int), "verdict": rows["verdict"].replace("", "–"),
    })  # fmt: skip
    if per_run:  # one column, so the run-by-run table fits the text column
        out["evidence"] = [("yes" if e else "no") + (f": {n}" if n else "")
                           for e, n in zip(rows["evidence"].astype(bool), rows["note"].fillna(""))]
    else:
        out["runs"] = [seed_words(int(r["runs"]), str(r["seeds"]).split(", ") if r["seeds"] else [])
                       for _, r in rows.iterrows()]
        out["runs' own verdicts"] = rows["per_run"].replace("", "–").to_numpy()
    return out.reset_index(drop=True)


def goal_verdict(table: pd.DataFrame) -> str:
    """The generalisation goal, decided per arm label from `measures`' pooled rows, as Markdown: one line that
    says it all ("**Generalisation goal: not met.** No arm meets it: paper set-up (8 runs, seed 0). The goal, ..."),
    with the runs and seeds behind each arm (the book's first page quotes it), then one line per arm with its
    numbers, and the arms not run.

    An arm meets the goal when every goal measure it has is "met" and it has both (adult specificity and COVID-19
    sensitivity, on sources it never trained on); it misses it when any is "not met"; else it is undecided (an
    interval holds the goal, too few images, the runs disagree, or a measure is missing: COVID-19 sensitivity on
    an unseen source needs a held-out-source run). The goal is met when an arm meets it, not met when every arm
    misses it, else undecided.
    """
    rule = (f"The goal, on sources a model never trained on and at its validation operating point: specificity ≥ "
            f"{GOAL['covid_specificity']:.2f} on adults without COVID-19 and COVID-19 sensitivity ≥ "
            f"{GOAL['covid_sensitivity']:.2f}; met when the 95% interval's lower end reaches it, not met when its "
            "upper end is below it, else undecided.")
    pooled = table[table["level"] == "arm"] if len(table) else table
    if pooled.empty:
        return "**Generalisation goal: not measured.** No complete run. " + rule
    decided, lines = [], []
    for label, rows in pooled.groupby("label", sort=False):
        runs = seed_words(int(rows["runs"].max()), sorted({s for _, r in rows.iterrows() for s in _seeds(r)}))
        word, why = arm_decision(rows[rows["goal"].notna()])
        decided.append((word, f"{label} ({runs})"))
        lines.append(f"- **{label}** ({runs}): **{word}**. {why}")
    lines += [f"- **{arm}**: not run." for arm in ARMS if not (pooled["arm"] == arm).any()]
    words = [w for w, _ in decided]
    if "met" in words:
        others = [f"{who}: {w}" for w, who in decided if w != "met"]
        first = ("**Generalisation goal: met.** Met by " + "; ".join(who for w, who in decided if w == "met") + "."
                 + (" Others: " + "; ".join(others) + "." if others else ""))
    elif set(words) == {"not met"}:
        first = "**Generalisation goal: not met.** No arm meets it: " + "; ".join(who for _, who in decided) + "."
    else:
        first = "**Generalisation goal: undecided.** " + "; ".join(f"{who}: {w}" for w, who in decided) + "."
    return first + " " + rule + "\n\n" + "\n".join(lines)


def summary_record(table: pd.DataFrame, remedies: dict[str, Any] | None = None, remedy_root: str = "") -> dict:
    """generalisation.json's content: the goal verdict and the pooled measures; `remedies` (remedies.record) and
    the name of the folder of their runs where the chapter measured remedy arms."""
    rows = summary(table) if len(table) else table
    keep = ["arm_runs", "population", "group", "metric", "value", "ci_low", "ci_high", "n", "verdict"]
    record = {"verdict": goal_verdict(table),
              "measures": json.loads(rows[[c for c in keep if c in rows]].to_json(orient="records")) if len(rows) else []}
    if remedies:
        record["remedies"] = remedies
        record["remedy_root"] = remedy_root
    return json.loads(json.dumps(record, allow_nan=False))


def save_summary(table: pd.DataFrame, path: str | Path, remedies: dict[str, Any] | None = None,
                 remedy_root: str = "", ages: pd.Series | None = None) -> Path:
    """generalisation.json (summary_record), as data the book's first page reads, and beside it `AGES` (the ages
    behind "adults", which come from metadata a results bundle does not carry), so `cxrlib verify` can recompute
    it from the bundle alone."""
    if ages is not None:
        frame = ages.rename("age").rename_axis("image_id").reset_index()
        write_text(Path(path).with_name(AGES), frame.to_csv(index=False))
    return write_text(path, json.dumps(summary_record(table, remedies, remedy_root), indent=1) + "\n")


def saved_ages(path: str | Path) -> pd.Series:
    """The ages save_summary wrote (image_id -> age, NaN unknown), with an error naming the file."""
    try:
        frame = pd.read_csv(path, dtype={"image_id": str})
    except (OSError, ValueError) as err:
        raise CXRError(f"{path}: cannot read the ages chapter 6 used ({err})") from err
    return frame.set_index("image_id")["age"].astype(float)


def called_covid(record: Mapping[str, Any]) -> list[str]:
    """Sentences from generalisation.json: the share of adults without COVID-19, on sources a run never trained
    on, that each arm called "COVID-19" (1 − specificity, its interval turned round)."""
    said = []
    for m in record.get("measures", []):
        if (m.get("metric") != "covid_specificity" or m.get("group") != "adults" or m.get("value") is None
                or m.get("verdict") == "too few to say"):
            continue
        share = fmt_ci(1 - m["value"], (1 - m["ci_high"], 1 - m["ci_low"]) if m.get("ci_low") is not None else None)
        said.append(f"{m['arm_runs']} called a share of {share} of the {m['n']} {m['population']} \"COVID-19\"")
    return said


def _seeds(row: pd.Series) -> list[str]:
    return str(row["seeds"]).split(", ") if row["seeds"] else []


def _said(r: pd.Series) -> str:
    """One pooled goal measure in words, with its runs' own verdicts when there are several."""
    if r["verdict"] == "too few to say":
        return f"{r['population']}: too few images to say (n={int(r['n'])})"
    runs = ""
    if r["runs"] > 1:
        runs = (" in every run" if r["per_run"] == f"{int(r['runs'])} {r['verdict']}"
                else f" (the runs one by one: {r['per_run']})")
    return f"{r['population']}: {METRIC_WORDS[r['metric']]} {fmt(r)}, {r['verdict']}{runs}"


def arm_decision(rows: pd.DataFrame) -> tuple[str, str]:
    """One arm label's goal verdict and why, from its pooled goal rows."""
    missing = [f"no {METRIC_WORDS[m]} measured on {'adults from ' if m == 'covid_specificity' else ''}a source it "
               "never trained on" + ("" if m == "covid_specificity" else " (that needs a held-out-source run)")
               for m in GOAL if not (rows["metric"] == m).any()]
    verdicts = set(rows["verdict"])
    if "not met" in verdicts:
        word = "not met"
    elif not missing and verdicts == {"met"}:
        word = "met"
    else:
        word = "undecided"
    return word, "; ".join([_said(r) for _, r in rows.iterrows()] + missing) + "."


def at_bound(arms: pd.DataFrame) -> list[str]:
    """The runs of `arms` (`load_arms`) whose operating threshold the lower bound decided
    (`metrics.bounded_threshold`: their validation rule reached for a threshold under it), in words."""
    return [f"{r['label']} ({r['run_name']})" for _, r in arms.iterrows()
            if (Run(r["run_dir"]).metrics().get("threshold_selection") or {}).get("at_bound")]


def bound_note(arms: pd.DataFrame) -> str:
    """A sentence flagging the runs whose threshold sits at the lower bound; "" when none does."""
    flagged = at_bound(arms)
    if not flagged:
        return ""
    many = len(flagged) > 1
    return (f"**Threshold at the bound.** The validation rule of {'; '.join(flagged)} reached for a threshold below "
            f"{MIN_THRESHOLD} (calling nearly every image COVID-19); {'their thresholds are' if many else 'its threshold is'}"
            f" that bound, and {'their' if many else 'its'} operating-point numbers rest on it.")


def population_counts(table: pd.DataFrame) -> str:
    """Which arms were measured on which populations, with how many images: facts that do not depend on the
    machine (no estimate, no verdict), for the chapter's checked output."""
    if table.empty:
        return "arms measured: none"
    pooled = table[table["level"] == "arm"]
    lines = ["arms measured: " + "; ".join(dict.fromkeys(pooled["label"]))]
    for _, r in pooled.iterrows():
        lines.append(f"  {r['label']} | {r['population']} | {METRIC_WORDS[r['metric']]} | {int(r['n'])} images "
                     f"| {seed_words(int(r['runs']), _seeds(r))}")
    return "\n".join(lines)


def external_names(run_dir: str | Path) -> list[str]:
    """The external sets a run was scored on, by name."""
    return Run(run_dir).externals()


def external_subgroups(run_dir: str | Path, name: str, by: str = "age_band", where: str = "") -> pd.DataFrame:
    """One external set of a run by subgroup (age band, sex, view, ...), formatted by `format_subgroups`, columns
    in words; a measure no subgroup has an image for (COVID-19 sensitivity on a set without COVID-19) is left out,
    and then accuracy too (it equals the specificity).

    The metadata comes from re-reading the set's folder or manifest (no image is decoded): `where` it is
    on this machine, else where the run found it.
    """
    run = Run(run_dir)
    where = where or external_sets(run.config.get("external", "")).get(name)
    if where is None or name not in run.externals():
        raise CXRError(f"{run_dir}: no external set {name!r} (its external parameter: {run.config.get('external')!r})")
    meta, _ = read_any(where)
    pred = run.predictions(name)
    m = run.external_metrics(name)
    if m.get("threshold_from_validation") is not None:
        pred = apply_threshold(pred, m["threshold_from_validation"], m["classes"])
    shown = format_subgroups(subgroup_metrics(pred, meta, by))
    shown = shown.drop(columns=[c for c in shown.columns if (shown[c].astype(str) == "none (n=0)").all()])
    if "covid_sensitivity" not in shown.columns:  # no COVID-19 image: accuracy is the specificity, said once
        shown = shown.drop(columns="accuracy", errors="ignore")
    return shown.rename(columns={by: by.replace("_", " "), "n": "images", **METRIC_WORDS})
