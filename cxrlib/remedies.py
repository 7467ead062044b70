"""Can any remedy make it generalise? Chapter 06's opening: each remedy arm beside the paper set-up, measured on
people no run trained or validated on, and what it cost inside the data.

The arms (`python -m cxrlib.runs --variants ...`, `make remedies`), told apart by their recorded parameters:
the paper set-up; *lungs only* (`preprocess=lungs_only`: all outside the estimated lung fields painted grey);
*adults only* (`cohort=adults`: the paediatric images dropped, NIH adults as the non-COVID class); both; and
*adults only + lungs only + CLAHE* (the literature's lung segmentation plus histogram equalisation). The
control (`lungs_only_marker`: a marker planted outside the lungs on every COVID-19 image, then painted) is
no remedy: it shows that lungs-only painting removes what lies outside the lungs, so it is compared with the
lungs-only arm, not judged against the goal.

Every arm holds out the same populations (`hold_out`, e.g. "country=italy;collection=ieee8023&covid=no"):
the ieee8023 adults without COVID-19 (the same collection and web-figure processing as the COVID-19 images:
no source shortcut helps there) and one country's COVID-19 images; the NIH adults are a third unseen
population for the arms that do not train on NIH images. The measures and verdicts are `generalise`'s.
The internal cost is the paired difference from the paper set-up of the same seed on the test images both
scored, held-out images excluded (`metrics.paired_bootstrap`, each run at its validation operating point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import generalise
from .config import hold_out_terms
from .data import column_values, held_out
from .metrics import apply_threshold, paired_bootstrap
from .results import fmt_ci
from .rundir import Run

# (cohort, preprocess) -> the arm's name, in the chapter's order; the first is the comparison for the rest
REMEDIES = {("all", "none"): "paper set-up", ("all", "lungs_only"): "lungs only",
            ("adults", "none"): "adults only", ("adults", "lungs_only"): "adults only + lungs only",
            ("adults", "lungs_only_clahe"): "adults only + lungs only + CLAHE"}
CONTROL = ("all", "lungs_only_marker")
CONTROL_NAME = "lungs only + marker outside the lungs (control)"
BASELINE = REMEDIES[("all", "none")]
INTERNAL = {"roc_auc": "ROC AUC", "covid_sensitivity": "COVID-19 sensitivity"}  # paired_bootstrap's, at the operating point
SAME = 0.02  # the control "left no trace" when its ROC AUC interval vs lungs only lies within ±SAME


def _key(config: dict[str, Any]) -> tuple[str, str]:
    return config.get("cohort", "all"), config.get("preprocess", "none")


def load_arms(run_root: str | Path) -> pd.DataFrame:
    """`generalise.load_arms` of the runs that hold out populations (`hold_out` set) and are an arm of REMEDIES
    or the control, labelled by arm name; other runs under `run_root` are left out."""
    found = generalise.load_arms(run_root)
    names = {**REMEDIES, CONTROL: CONTROL_NAME}
    keep = found["config"].map(lambda c: bool(c.get("hold_out")) and _key(c) in names) if len(found) else []
    out = found[keep].copy() if len(found) else found
    out["label"] = [names[_key(c)] for c in out["config"]]
    out["arm"] = "remedy"  # one of generalise.ARMS, so its measures sort; the label carries the arm
    order = list(names.values())
    return out.sort_values(["label", "seed"], key=lambda s: s.map(order.index) if s.name == "label" else s,
                           ignore_index=True)


def goal_rows(arms: pd.DataFrame, ages: pd.Series | None = None, n_boot: int = generalise.N_BOOT) -> pd.DataFrame:
    """The pooled measures held to the goal (unseen adults' specificity, the held-out country's COVID-19
    sensitivity), per remedy arm in REMEDIES order; `arm_runs` names the arm with its runs and seeds."""
    remedies = arms[arms["label"] != CONTROL_NAME] if len(arms) else arms
    if remedies.empty:
        return pd.DataFrame(columns=[*generalise.MEASURE_COLUMNS, "arm_runs"])
    table = generalise.measures(remedies, ages, n_boot)
    rows = generalise.summary(table)
    rows = rows[rows["goal"].notna()].copy()
    order = list(REMEDIES.values())
    rows["_order"] = rows["label"].map(order.index)
    return rows.sort_values(["_order", "metric"], kind="stable", ignore_index=True).drop(columns="_order")


def _test(run_dir: str | Path) -> pd.DataFrame:
    """A run's own test predictions at its operating point, its held-out images left out."""
    run = Run(run_dir)
    m = run.metrics()
    held = set(run.data.get("held_out_images", []))
    pred = run.predictions()
    threshold = m.get("threshold_selection", {}).get("threshold")
    pred = apply_threshold(pred, threshold, m["classes"]) if threshold is not None else pred
    return pred[~pred["image_id"].isin(held)].reset_index(drop=True)


def versus(arms: pd.DataFrame, label: str, against: str = BASELINE, n_boot: int = 1000) -> dict[str, Any] | None:
    """Arm `label` minus arm `against`, paired by seed on the test images both scored (held-out ones excluded):
    `metrics.paired_bootstrap`'s record (difference, CI, per pair), or None when no seed has both."""
    mine, theirs = (arms[arms["label"] == name].set_index("seed")["run_dir"] for name in (label, against))
    seeds = sorted(set(mine.index) & set(theirs.index))
    if not seeds:
        return None
    classes = Run(mine[seeds[0]]).metrics()["classes"]
    pairs = [(_test(mine[s]), _test(theirs[s])) for s in seeds]
    return {**paired_bootstrap(pairs, classes, n_boot=n_boot), "seeds": seeds}


def _difference(record: dict[str, Any] | None, metric: str) -> str:
    if not record or record[metric]["difference"] is None or not np.isfinite(record[metric]["difference"]):
        return "undefined on these images"
    return fmt_ci(record[metric]["difference"], record[metric]["ci"], signed=True)


def paragraphs(arms: pd.DataFrame, goals: pd.DataFrame, n_boot: int = 1000) -> list[str]:
    """One computed Markdown paragraph per remedy arm (internal cost, what it bought outside, its goal verdict),
    and one for the control."""
    out = []
    base = goals[goals["label"] == BASELINE]
    for label in [name for name in REMEDIES.values() if name in set(arms["label"])]:
        rows = goals[goals["label"] == label]
        word, why = generalise.arm_decision(rows)
        runs = arms[arms["label"] == label]
        head = f"**{label}** ({generalise.seed_words(len(runs), runs['seed'].tolist())}): goal **{word}**. {why}"
        if label == BASELINE:
            out.append(head)
            continue
        cost = versus(arms, label, n_boot=n_boot)
        if cost is None:
            out.append(head + f" No {BASELINE} run of the same seed: no internal comparison.")
            continue
        inside = "; ".join(f"{INTERNAL[m]} {_difference(cost, m)}" for m in INTERNAL)
        outside = []
        for _, r in rows.iterrows():
            same = base[(base["population"] == r["population"]) & (base["metric"] == r["metric"])]
            if len(same):
                outside.append(f"{r['population']}: {generalise.fmt(r, n=False)} against "
                               f"{generalise.fmt(same.iloc[0], n=False)}")
        out.append(head + f" *Cost inside the data* (minus the {BASELINE}, same seeds, on the "
                   f"{sum(cost['n_images'])} test images both scored, {cost['n_patients']} patients): {inside}."
                   + (" *Bought outside* (this arm against the paper set-up): " + "; ".join(outside) + "."
                      if outside else ""))
    if CONTROL_NAME in set(arms["label"]):
        out.append(control_paragraph(arms, n_boot))
    return out


def control_paragraph(arms: pd.DataFrame, n_boot: int = 1000) -> str:
    """Did the painting remove a marker planted outside the lungs? The control against the lungs-only arm."""
    record = versus(arms, CONTROL_NAME, REMEDIES[("all", "lungs_only")], n_boot)
    if record is None:
        return f"**{CONTROL_NAME}**: no lungs-only run of the same seed to compare it with."
    auc = record["roc_auc"]
    low, high = auc["ci"] if auc["ci"] and None not in auc["ci"] else (np.nan, np.nan)
    verdict = ("the marker left no trace: the painting removes what lies outside the lungs"
               if -SAME <= low and high <= SAME else
               "the marker changed the result: something outside the lungs survives the painting"
               if low > 0 else "the comparison is too loose to say (its interval reaches beyond ±"
               f"{SAME})")
    return (f"**{CONTROL_NAME}** ({generalise.seed_words(len(record['seeds']), record['seeds'])}): chapter 4's "
            "marker was planted on every COVID-19 image, outside the lungs, before the outside was painted. ROC AUC minus the lungs-only arm's, on the same "
            f"{sum(record['n_images'])} test images: {_difference(record, 'roc_auc')}: {verdict}.")


def settings(arms: pd.DataFrame) -> str:
    """What the remedy runs were, from their records: "binary, cross-entropy loss, random init; 128 px, at most 2
    epochs (2 run); seeds 0, 1; on cpu (1 threads); held out: ...". Every distinct value is named."""
    if arms.empty:
        return "no remedy run"
    configs = arms["config"].tolist()

    def values(name: str) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(c.get(name) for c in configs))

    runs = [Run(d) for d in arms["run_dir"]]
    devices = ", ".join(dict.fromkeys(run.record.get("device", "?") for run in runs))
    words = dict.fromkeys(generalise.run_words({**c, "seed": None}).rsplit(", seed", 1)[0] for c in configs)
    epochs_run = sorted({run.metrics().get("epochs_run") for run in runs}, key=str)
    return (f"{'; '.join(words)}; {values('image_size')} px, {values('epochs')} epochs asked "
            f"(epochs run: {', '.join(map(str, epochs_run))}); {generalise.seed_words(len(arms), arms['seed'].tolist())}; "
            f"on {devices}; held out of training and validation: "
            + "; ".join(dict.fromkeys(held_words(c["hold_out"]) for c in configs)))


def held_words(spec: str) -> str:
    """A `hold_out` in words: "every patient with an image of country=italy, or of collection=ieee8023 without
    COVID-19"."""
    terms = [" and ".join(f"{c}={v}" for c, v in term if c != "covid")
             + (" without COVID-19" if ("covid", "no") in term else " with COVID-19" if ("covid", "yes") in term else "")
             for term in hold_out_terms(spec)]
    return "every patient with an image of " + ", or of ".join(terms)


def source_and_label(table: pd.DataFrame, spec: str) -> str:
    """Why a source-adversarial head or source-balanced sampling does not fit, when it does not: among the images
    a remedy run may train on (`table` less `hold_out` `spec`), the share of COVID-19 per collection."""
    left = table[~held_out(table, spec)]
    share = left["label"].eq("covid").groupby(column_values(left, "collection")).mean()
    said = ", ".join(f"{name} {value:.0%}" for name, value in share.items())
    if set(share.round(6)) <= {0.0, 1.0}:
        return (f"Among the images the remedy arms may train on, the share of COVID-19 per collection is {said}: "
                "collection and label coincide, so a source-adversarial head or source-balanced sampling, which "
                "need both labels within a source, would remove the label with the source. They are not run.")
    return (f"Among the images the remedy arms may train on, the share of COVID-19 per collection is {said}: "
            "some collection holds both labels, so source-balanced sampling could be tried.")


def record(arms: pd.DataFrame, goals: pd.DataFrame) -> dict[str, Any]:
    """What the book's first page says of the remedies (generalisation.json's "remedies"): the settings and each
    arm's goal verdict with its runs and seeds."""
    verdicts = []
    for label in [name for name in REMEDIES.values() if name in set(arms["label"])]:
        runs = arms[arms["label"] == label]
        word, _ = generalise.arm_decision(goals[goals["label"] == label])
        verdicts.append({"arm": label, "runs": generalise.seed_words(len(runs), runs["seed"].tolist()), "goal": word})
    return {"settings": settings(arms), "arms": verdicts}


def findings_line(record: dict[str, Any]) -> str:
    """One line for the book's first page from `record`'s output."""
    arms = "; ".join(f"{a['arm']} ({a['runs']}): {a['goal']}" for a in record.get("arms", []))
    return f"- Remedies (chapter 6; {record.get('settings', '')}) — generalisation goal per arm: {arms}."
