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
population for the arms that do not train on NIH images.

An arm is judged threshold-free first (`auc_rows`): the ROC AUC of its held-out COVID-19 images against its
held-out adults without COVID-19 (two populations it never trained or validated on), the mean over its runs
with a patient-bootstrap interval (`metrics.pooled_auc`), against AUC_GOAL; beside it, the ROC AUC on its own
test images (held-out ones excluded), and an arm below LEARNED_FLOOR there "learned the task only weakly here":
its unseen-population numbers are shown apart and not judged, since a model that cannot rank its own test
images says nothing about generalising. The operating-point measures (`goal_rows`, `generalise`'s, at each
run's validation threshold and at argmax) follow as secondary. The internal cost is the paired difference
from the paper set-up of the same seed on the test images both scored, held-out images excluded
(`metrics.paired_bootstrap`, each run at its validation operating point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import generalise
from .config import hold_out_terms
from .data import column_values, held_out
from .metrics import METRIC_WORDS, MIN_THRESHOLD, apply_threshold, paired_bootstrap, pooled_auc
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
# The threshold-free goal: the area under the least concave ROC curve through the operating-point goal
# (generalise.GOAL: specificity 0.80, so false-positive rate 0.20, with sensitivity 0.90): 0.2 * 0.9 / 2 +
# 0.8 * (0.9 + 1) / 2. A model ranking the unseen populations worse cannot meet that goal on a concave ROC curve.
AUC_GOAL = round((1 - generalise.GOAL["covid_specificity"]) * generalise.GOAL["covid_sensitivity"] / 2
                 + generalise.GOAL["covid_specificity"] * (generalise.GOAL["covid_sensitivity"] + 1) / 2, 6)
# Own-test ROC AUC below which an arm "learned the task only weakly here": its own test images share the training
# sources' shortcuts, so below 0.90 it misranks more than one COVID-19/non-COVID pair in ten even where shortcuts
# help it, and a chance-level AUC on unseen people cannot be told from a failure to learn at all.
LEARNED_FLOOR = 0.90
WEAK = "learned only weakly"  # an arm's verdict below LEARNED_FLOOR (plots.VERDICT_COLOURS colours it)
CONTROL_VERDICT = "control: held to no goal"  # the control is no remedy (it is compared with lungs only)
UNSEEN = "held-out COVID-19 images against held-out adults without COVID-19"
AUC_WORDS = {"unseen_auc": "ROC AUC on the unseen populations",  # plots.forest adds the goal (its dashed line)
             "own_auc": "ROC AUC on its own test images, against the learned floor"}


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


def goal_rows(arms: pd.DataFrame, ages: pd.Series | None = None, n_boot: int = generalise.N_BOOT,
              argmax: bool = False) -> pd.DataFrame:
    """The pooled measures held to the operating-point goal (unseen adults' specificity, the held-out country's
    COVID-19 sensitivity), per remedy arm in REMEDIES order, at each run's validation threshold (or at argmax);
    `arm_runs` names the arm with its runs and seeds."""
    remedies = arms[arms["label"] != CONTROL_NAME] if len(arms) else arms
    if remedies.empty:
        return pd.DataFrame(columns=[*generalise.MEASURE_COLUMNS, "arm_runs"])
    table = generalise.measures(remedies, ages, n_boot, argmax)
    rows = generalise.summary(table)
    rows = rows[rows["goal"].notna()].copy()
    order = list(REMEDIES.values())
    rows["_order"] = rows["label"].map(order.index)
    return rows.sort_values(["_order", "metric"], kind="stable", ignore_index=True).drop(columns="_order")


def auc_sets(run_dir: str | Path, ages: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's test predictions (unseen, own): its held-out COVID-19 images with its held-out adults without
    COVID-19 (`ages`: image_id -> age; children and unknown ages left out, as in `generalise`), and its own test
    images, every held-out one excluded."""
    run = Run(run_dir)
    pred = run.predictions()
    held = pred["image_id"].isin(set(run.data.get("held_out_images", [])))
    unseen = pred[held]
    adult = generalise.age_group(unseen["image_id"].map(ages)).to_numpy() == "adults"
    return unseen[(unseen["true"] == "covid").to_numpy() | adult], pred[~held]


def auc_word(auc: dict[str, Any], goal: float = AUC_GOAL) -> str:
    """A pooled AUC against `goal`, judged by its interval as generalise.goal_word judges a share."""
    low, high = auc["ci"] if auc.get("ci") else (None, None)
    return generalise.goal_word({"goal": goal, "enough": auc.get("value") is not None, "ci_low": low, "ci_high": high})


def threshold_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's operating threshold: the one it uses, the unbounded one, and whether the bound decided it."""
    run = Run(run_dir)
    chosen = run.metrics().get("threshold_selection") or {}
    return {"seed": run.config.get("seed"), "threshold": chosen.get("threshold"),
            "unbounded": chosen.get("unbounded_threshold", chosen.get("threshold")),
            "at_bound": bool(chosen.get("at_bound", False))}


def auc_rows(arms: pd.DataFrame, ages: pd.Series, n_boot: int = generalise.N_BOOT) -> pd.DataFrame:
    """Per arm, in `load_arms`' order (the control last): the threshold-free ROC AUC on the unseen populations and
    on its own test images, each pooled over its runs (`metrics.pooled_auc`), whether it learned the task (own
    AUC ≥ LEARNED_FLOOR), its verdict (AUC_GOAL's word, WEAK below the floor, CONTROL_VERDICT) and each run's
    threshold."""
    rows = []
    for label, runs in arms.groupby("label", sort=False) if len(arms) else []:
        sets = [auc_sets(d, ages) for d in runs["run_dir"]]
        unseen, own = (pooled_auc([s[k] for s in sets], n_boot=n_boot) for k in (0, 1))
        learned = own["value"] is not None and own["value"] >= LEARNED_FLOOR
        rows.append({"label": label, "arm_runs": f"{label} ({generalise.seed_words(len(runs), runs['seed'].tolist())})",
                     "unseen": unseen, "own": own, "learned": learned,
                     "verdict": CONTROL_VERDICT if label == CONTROL_NAME else auc_word(unseen) if learned else WEAK,
                     "thresholds": [threshold_record(d) for d in runs["run_dir"]]})
    return pd.DataFrame(rows, columns=["label", "arm_runs", "unseen", "own", "learned", "verdict", "thresholds"])


def _auc(auc: dict[str, Any]) -> str:
    return fmt_ci(auc["value"], auc["ci"]) if auc.get("value") is not None else "undefined (a class is missing)"


def thresholds_said(records: list[dict[str, Any]]) -> str:
    """Each run's threshold, "seed 1: 0.010, at the bound (unbounded 0.00065)" where the bound decided it."""
    return "; ".join(f"seed {r['seed']}: " + ("none" if r["threshold"] is None else f"{r['threshold']:.3f}")
                     + (f", at the bound (unbounded {r['unbounded']:.2g})" if r["at_bound"] else "")
                     for r in records)


def verdict_said(row: pd.Series | dict[str, Any]) -> str:
    """An arm's threshold-free verdict in words: the goal's word, or "learned the task only weakly here (AUC …)"."""
    if row["verdict"] == WEAK:
        return f"learned the task only weakly here (AUC {_auc(row['own'])} on its own test images)"
    return row["verdict"]


def auc_table(rows: pd.DataFrame) -> pd.DataFrame:
    """`auc_rows` for reading, chapter 6's first table: the unseen-population AUC first (marked not judged below
    the learned floor), each run's beside it, the own-test AUC, the verdict, and each run's threshold (the bound's
    runs flagged)."""
    return pd.DataFrame({
        "arm": rows["arm_runs"],
        "ROC AUC, unseen (95% CI)": [_auc(r["unseen"]) + ("" if r["learned"] else ", apart: not judged")
                                     for _, r in rows.iterrows()],
        "per run": [", ".join("–" if v is None else f"{v:.3f}" for v in r["unseen"]["per_run"])
                    for _, r in rows.iterrows()],
        "ROC AUC, own test (95% CI)": [_auc(r["own"]) for _, r in rows.iterrows()],
        "verdict": [verdict_said(r) for _, r in rows.iterrows()],
        "threshold per run": [thresholds_said(r["thresholds"]) for _, r in rows.iterrows()],
    })


def auc_forest_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """`auc_rows` as `plots.forest` rows: per arm its unseen AUC (coloured by its verdict) and its own-test AUC
    (coloured "learned" or WEAK), metrics named as in AUC_WORDS."""
    out = []
    for _, r in rows.iterrows():
        for metric, auc, population, verdict in (
                ("unseen_auc", r["unseen"], UNSEEN, r["verdict"]),
                ("own_auc", r["own"], "its own test images", "learned" if r["learned"] else WEAK)):
            low, high = auc["ci"] if auc.get("ci") else (np.nan, np.nan)
            out.append({"arm_runs": r["arm_runs"], "population": population, "metric": metric, "enough": True,
                        "value": np.nan if auc["value"] is None else auc["value"], "verdict": verdict,
                        "ci_low": np.nan if low is None else low, "ci_high": np.nan if high is None else high})
    return pd.DataFrame(out).sort_values("metric", key=lambda m: m.map(list(AUC_WORDS).index), kind="stable",
                                         ignore_index=True) if out else pd.DataFrame(out)


def auc_paragraph(rows: pd.DataFrame) -> str:
    """The threshold-free result in one paragraph, chapter 6's (and the book's first page's) opening statement."""
    if rows.empty:
        return "No remedy run: nothing to judge."
    judged = rows[rows["learned"] & (rows["label"] != CONTROL_NAME)]
    weak = rows[~rows["learned"]]
    first = rows.iloc[0]["unseen"]
    said = [f"**Threshold-free, on people no run saw.** ROC AUC of the {first['n_positive']} held-out COVID-19 "
            f"images against the {first['n_negative']} held-out adults without COVID-19 (mean over each arm's runs, "
            f"95% patient-bootstrap interval; goal ≥ {AUC_GOAL:.2f}, 0.5 is chance): "
            + "; ".join(f"{r['arm_runs']}: {_auc(r['unseen'])}" for _, r in rows.iterrows()) + "."]
    if len(judged):
        said.append(f"Judged (own-test ROC AUC at least {LEARNED_FLOOR:.2f}): "
                    + "; ".join(f"{r['label']} {r['verdict']} (own test {_auc(r['own'])})"
                                for _, r in judged.iterrows()) + ".")
    if len(weak):
        said.append("Not judged: " + "; ".join(f"{r['label']} {verdict_said(r)}" for _, r in weak.iterrows())
                    + f", below the floor of {LEARNED_FLOOR:.2f}: "
                    + ("their unseen-population AUCs say" if len(weak) > 1 else "its unseen-population AUC says")
                    + " nothing about generalising.")
    return " ".join(said)


def auc_rule() -> str:
    """The threshold-free verdict rule in words, with its goal and floor."""
    goal = generalise.GOAL
    return (f"*The rule.* Goal: ROC AUC ≥ {AUC_GOAL:.2f} on the unseen populations, the area under the least concave "
            f"ROC curve through the operating-point goal (specificity {goal['covid_specificity']:.2f} with COVID-19 "
            f"sensitivity {goal['covid_sensitivity']:.2f}); met when the interval's lower end reaches it, not met "
            "when its upper end is below it, else undecided. Judged only where the own-test ROC AUC is at least "
            f"{LEARNED_FLOOR:.2f}: below it the model misranks more than one COVID-19/non-COVID pair in ten even on "
            "the sources whose shortcuts it could use.")


def threshold_rule(arms: pd.DataFrame) -> str:
    """The operating-point rule in words, from what the runs recorded (their sensitivity target) and the bound;
    which runs the bound decided."""
    chosen = [Run(d).metrics().get("threshold_selection") or {} for d in arms["run_dir"]]
    targets = ", ".join(f"{t:.2f}" for t in sorted({c["target_sensitivity"] for c in chosen
                                                    if c.get("target_sensitivity") is not None}))
    flagged = generalise.at_bound(arms)
    return (f"*Threshold rule.* Each run's threshold is the highest whose validation COVID-19 sensitivity reaches "
            f"{targets or 'its target'}, but never below {MIN_THRESHOLD}: under it the model itself gives COVID-19 "
            "less than one chance in a hundred, and reaching the sensitivity there means calling nearly every image "
            "COVID-19. The bound decided the threshold of "
            + ("; ".join(flagged) + " (flagged in the first table)." if flagged else "no run."))


def operating_table(goals: pd.DataFrame, at_argmax: pd.DataFrame) -> pd.DataFrame:
    """The secondary measures: each arm's operating-point goal measures at its validation threshold (with the
    verdict) and, beside them, the same runs called at argmax."""
    if goals.empty:
        return pd.DataFrame(columns=["arm", "population", "measure", "at the threshold", "verdict", "at argmax"])
    keys = ["label", "population", "metric"]
    both = goals.merge(at_argmax[[*keys, "value", "ci_low", "ci_high", "n", "enough"]], on=keys, how="left",
                       suffixes=("", "_argmax"))
    argmax = both[[c + "_argmax" for c in ("value", "ci_low", "ci_high", "n", "enough")]]
    argmax.columns = ["value", "ci_low", "ci_high", "n", "enough"]
    return pd.DataFrame({"arm": both["arm_runs"], "population": both["population"],
                         "measure": both["metric"].map(METRIC_WORDS),
                         "at the threshold": both.apply(generalise.fmt, axis=1), "verdict": both["verdict"],
                         "at argmax": argmax.apply(generalise.fmt, axis=1)})


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


def paragraphs(arms: pd.DataFrame, goals: pd.DataFrame, aucs: pd.DataFrame, n_boot: int = 1000) -> list[str]:
    """One computed Markdown paragraph per remedy arm (its threshold-free verdict from `auc_rows`, then the
    operating-point goal, the internal cost and what it bought outside), and one for the control."""
    out = []
    base = goals[goals["label"] == BASELINE]
    by_label = aucs.set_index("label") if len(aucs) else aucs
    for label in [name for name in REMEDIES.values() if name in set(arms["label"])]:
        rows = goals[goals["label"] == label]
        word, why = generalise.arm_decision(rows)
        runs = arms[arms["label"] == label]
        auc = by_label.loc[label]
        judged = (f"**{auc['verdict']}**: ROC AUC {_auc(auc['unseen'])} on the unseen populations, "
                  f"{_auc(auc['own'])} on its own test images" if auc["learned"] else
                  f"**learned the task only weakly here** (ROC AUC {_auc(auc['own'])} on its own test images, below "
                  f"{LEARNED_FLOOR:.2f}); apart, not judged: {_auc(auc['unseen'])} on the unseen populations")
        head = (f"**{label}** ({generalise.seed_words(len(runs), runs['seed'].tolist())}): threshold-free {judged}. "
                f"At the validation operating point (secondary; thresholds {thresholds_said(auc['thresholds'])}): "
                f"goal **{word}**. {why}")
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


def record(arms: pd.DataFrame, goals: pd.DataFrame, aucs: pd.DataFrame) -> dict[str, Any]:
    """What the book's first page says of the remedies (generalisation.json's "remedies"): the settings, the
    threshold-free paragraph (`auc_paragraph`), and per arm its runs and seeds, unseen and own-test AUC, verdict,
    thresholds and operating-point goal verdict."""
    verdicts = []
    for _, a in aucs.iterrows():
        runs = arms[arms["label"] == a["label"]]
        word = generalise.arm_decision(goals[goals["label"] == a["label"]])[0] if a["label"] != CONTROL_NAME else ""
        verdicts.append({"arm": a["label"], "runs": generalise.seed_words(len(runs), runs["seed"].tolist()),
                         "unseen_auc": a["unseen"], "own_auc": a["own"], "learned": bool(a["learned"]),
                         "verdict": a["verdict"], "thresholds": a["thresholds"], "operating_point_goal": word})
    return {"settings": settings(arms), "auc_goal": AUC_GOAL, "learned_floor": LEARNED_FLOOR,
            "threshold_free": auc_paragraph(aucs), "arms": verdicts}


def findings_line(record: dict[str, Any]) -> str:
    """One line for the book's first page from `record`'s output: the threshold-free result first."""
    arms = "; ".join(f"{a['arm']} ({a['runs']}): {a['operating_point_goal']}" for a in record.get("arms", [])
                     if a.get("operating_point_goal"))
    return (f"- Remedies (chapter 6; {record.get('settings', '')}) — {record.get('threshold_free', '')} "
            f"At each run's validation operating point (secondary), goal per arm: {arms}.")
