"""Train on lungs removed: does a model that never sees the lungs still tell COVID from the rest?

Three arms, identical but for `preprocess` (preprocess.PREPROCESSORS), each trained and tested on its own images:
- `none` (intact): the reference;
- `lungs_removed`: every image's estimated lung fields (refined per-image masks) painted grey, in train, val
  and test. A model that still separates the classes far above the majority baseline learned something
  outside the lungs (age, body shape, markers, scanner processing);
- `lungs_removed_marker`, the positive control: the same, plus a planted marker on every COVID image
  (preprocess.plant_marker, by label, in every split). It must reach a near-perfect score: that shows the
  pipeline *can* learn from lungs-removed images, so a low score of the plain arm is not a broken pipeline.

Arms are matched from what the runs recorded (params.json: every run parameter but the preprocess and
the machine's, and the data fingerprint), so a comparison is only made between runs trained alike.
The numbers come from each run's metrics.json: test macro-F1 and ROC AUC with patient-bootstrap 95% CIs
and the majority-class baseline (chance AUC is 0.5). The verdicts go by AUC, which needs no threshold: a short
run can rank the classes perfectly while its default threshold still calls every image one class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .metrics import paired_bootstrap
from .results import LOSS_WORDS, fmt_ci
from .rundir import Run, find_runs
from .weights import Weights

ARMS = {"none": "intact", "lungs_removed": "lungs removed", "lungs_removed_marker": "lungs removed + marker (control)"}
AUDIT_ONLY = ("lungs_removed", "lungs_removed_marker")  # arms of this audit, not remedies: chapter 06 leaves them out
IGNORED = ("run_dir", "device", "amp", "num_workers", "profile", "preprocess")  # not part of how a run learned
CONTROL_AUC = 0.95  # the positive control "finds the marker" when its test ROC AUC CI lies at or above this


def _settings(params: dict[str, Any], but: tuple[str, ...] = ()) -> tuple:
    config = {k: v for k, v in params["config"].items() if k not in IGNORED + but}
    return params["data"]["record"]["fingerprint"], json.dumps(config, sort_keys=True)


def find_arms(root: str | Path) -> pd.DataFrame:
    """The complete runs under `root` (any depth) that form a lungs-removed comparison, one row per arm.

    Every `lungs_removed` run is joined with the intact and marker runs recorded with the same settings and
    data; `set` numbers the comparisons, `experiment` numbers the sets that differ only by their seed (repeats of
    one experiment, pooled by `across_seeds`). Empty when `root` holds no lungs-removed run.
    """
    runs = []
    for run in find_runs(root, preprocess=lambda p: p in ARMS):
        if "record" in run.data:
            runs.append({"run_dir": run.dir, "preprocess": run.config["preprocess"], "key": _settings(run.record),
                         "experiment": _settings(run.record, but=("seed",)), "config": run.config})
    frame = pd.DataFrame(runs, columns=["run_dir", "preprocess", "key", "experiment", "config"])
    rows = []
    for n, key in enumerate(frame.loc[frame["preprocess"] == "lungs_removed", "key"].drop_duplicates()):
        same = frame[frame["key"] == key].drop_duplicates("preprocess").sort_values(
            "preprocess", key=lambda p: p.map(list(ARMS).index))  # intact, lungs removed, control
        rows += [{"set": n, "arm": ARMS[r.preprocess], **r._asdict()} for r in same.itertuples(index=False)]
    out = pd.DataFrame(rows, columns=["set", "arm", "run_dir", "preprocess", "key", "experiment", "config"])
    out["experiment"] = pd.factorize(out["experiment"])[0]
    return out.drop(columns="key")


def describe_settings(config: dict[str, Any], seeds: list[int] | None = None) -> str:
    """How the arms were trained, from one run's recorded config (they share it but for `preprocess`); `seeds`
    names the seeds of repeats pooled together instead of the config's own."""
    seeds = sorted(seeds or [config["seed"]])
    said = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
    loss = LOSS_WORDS.get(config["loss"], config["loss"])
    backbone = {"resnet50": "ResNet50", "densenet121": "DenseNet121"}.get(config["backbone"], config["backbone"])
    return (f"{config['task']} task, {loss} loss, {backbone} ({Weights.parse(config['weights']).label}), "
            f"{config['image_size']} px, {config['epochs']} epoch(s), {said} (profile `{config['profile']}`)")


def arm_table(arms: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per arm of `find_arms`: test macro-F1 and ROC AUC with their 95% CIs, the majority baseline, and
    `auc_vs_intact`: the ROC AUC difference from the intact arm of its set on the same test images, with a paired
    patient-bootstrap CI (`metrics.paired_bootstrap`; absent without an intact arm or predictions.csv)."""
    rows = []
    for r in arms.itertuples():
        m = Run(r.run_dir).metrics()
        ci = m.get("ci", {})
        rows.append({"set": r.set, "experiment": r.experiment, "seed": r.config["seed"], "task": r.config["task"],
                     "arm": r.arm, "preprocess": r.preprocess, "n": m["n"], "n_patients": m.get("n_patients"),
                     "macro_f1": m["macro_f1"], "macro_f1_ci": ci.get("macro_f1"), "roc_auc": m.get("roc_auc"),
                     "roc_auc_ci": ci.get("roc_auc"), "baseline_macro_f1": m["majority_baseline"]["macro_f1"],
                     "run": Path(r.run_dir).name, **_versus_intact(arms, r, m["classes"], n_boot, seed)})
    return pd.DataFrame(rows)


def _versus_intact(arms: pd.DataFrame, arm: Any, classes: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    intact = arms[(arms["set"] == arm.set) & (arms["preprocess"] == "none")]
    if arm.preprocess == "none" or intact.empty:
        return {"auc_vs_intact": None, "auc_vs_intact_ci": None}
    pred = [Run(d).predictions() for d in (arm.run_dir, *intact["run_dir"])]
    auc = paired_bootstrap([(pred[0], pred[1])], classes, n_boot=n_boot, seed=seed)["roc_auc"]
    return {"auc_vs_intact": auc["difference"], "auc_vs_intact_ci": auc["ci"]}


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """`arm_table` for a page: scores with CIs beside the majority baseline."""
    return pd.DataFrame({
        "arm": table["arm"], "test images (patients)": [f"{n} ({p})" for n, p in zip(table["n"], table["n_patients"])],
        "macro-F1 (95% CI)": [fmt_ci(v, c) for v, c in zip(table["macro_f1"], table["macro_f1_ci"])],
        "majority macro-F1": table["baseline_macro_f1"].map(fmt_ci),
        "ROC AUC (95% CI)": [fmt_ci(v, c) for v, c in zip(table["roc_auc"], table["roc_auc_ci"])],
        "AUC − intact (paired 95% CI)": [fmt_ci(v, c, signed=True) if pd.notna(v) else "–"
                                         for v, c in zip(table["auc_vs_intact"], table["auc_vs_intact_ci"])],
    }).set_index("arm")


def _low(ci: Any, value: float) -> float:
    """The lower CI bound, or the value itself when there is no interval."""
    return float(ci[0]) if isinstance(ci, (list, tuple)) and ci[0] is not None else float(value)


def _separates(row: pd.Series) -> bool:
    """Whether the arm ranks COVID above the rest better than chance: its ROC AUC CI lies above 0.5. AUC, not
    macro-F1, decides: a short run can rank perfectly while its default threshold still calls every image one class."""
    return _low(row["roc_auc_ci"], row["roc_auc"]) > 0.5


def _finds_marker(row: pd.Series) -> bool:
    """Whether the positive control found its marker: its ROC AUC CI lies at or above CONTROL_AUC."""
    return _low(row["roc_auc_ci"], row["roc_auc"]) >= CONTROL_AUC


def _score(row: pd.Series) -> str:
    f1 = _low(row["macro_f1_ci"], row["macro_f1"]) > row["baseline_macro_f1"]
    auc = "macro one-vs-rest ROC AUC" if row.get("task", "binary") != "binary" else "ROC AUC"  # 3 classes: their mean
    return (f"{auc} {fmt_ci(row['roc_auc'], row['roc_auc_ci'])}, macro-F1 {fmt_ci(row['macro_f1'], row['macro_f1_ci'])} "
            f"({'above' if f1 else 'not above'} the majority class's {row['baseline_macro_f1']:.3f})")


def verdicts(table: pd.DataFrame) -> list[str]:
    """Sentences computed from `arm_table`, one comparison set at a time: the control first (does the pipeline
    learn at all without lungs?), then what the plain lungs-removed model learned, against intact."""
    lines = []
    for _, rows in table.groupby("set", sort=True):
        if table["set"].nunique() > 1:
            lines.append(f"**{rows['task'].iloc[0].capitalize()} task, seed {rows['seed'].iloc[0]}.**")
        arm = {r["preprocess"]: r for _, r in rows.iterrows()}
        removed, control, intact = arm["lungs_removed"], arm.get("lungs_removed_marker"), arm.get("none")
        works = None
        if control is None:
            lines.append("No positive-control run (`lungs_removed_marker`) with the same settings: a low score of the "
                         "lungs-removed model could also mean that this pipeline cannot learn from such images.")
        else:
            works = _finds_marker(control)
            lines.append(f"Positive control (lungs removed, marker on every COVID image): {_score(control)}. "
                         + ("The model finds the marker, so a lungs-removed model *can* learn here."
                            if works else f"Its AUC interval does not lie at or above {CONTROL_AUC}: the pipeline "
                            "did not reliably learn even a planted marker, so the plain arm's score is no evidence "
                            "either way."))
        if _separates(removed):
            share = ""
            if intact is not None and intact["roc_auc"] > 0.5:
                kept = (removed["roc_auc"] - 0.5) / (intact["roc_auc"] - 0.5)
                share = f" It keeps {max(kept, 0.0):.0%} of the intact model's AUC above chance (intact: {_score(intact)})."
                if pd.notna(removed.get("auc_vs_intact")):
                    share += (" AUC difference from intact on the same test images: "
                              f"{fmt_ci(removed['auc_vs_intact'], removed['auc_vs_intact_ci'], signed=True)} (paired).")
            lines.append(f"**Trained and tested without lungs, the model still separates the classes**: {_score(removed)}."
                         f"{share} It learned something outside the lung fields (or lung the masks missed).")
        elif works is False:
            lines.append(f"Trained and tested without lungs: {_score(removed)}; with a failed control, this says nothing.")
        else:
            lines.append(f"Trained and tested without lungs, the model ranks no better than chance: {_score(removed)}. "
                         "No evidence here that it learned from outside the lung fields"
                         + ("." if works else " (but without a working control this proves little)."))
    return lines + across_seeds(table)


def across_seeds(table: pd.DataFrame) -> list[str]:
    """One sentence per experiment repeated with several seeds (`arm_table` rows of sets that differ only by
    their seed): in how many seeds the control found its marker and the lungs-removed model separated the
    classes, and the range of its paired AUC difference from intact. One seed can be luck; this says whether
    the verdict held across repeats."""
    lines = []
    for _, rows in table.groupby("experiment", sort=True):
        seeds = sorted(rows["seed"].unique())
        if len(seeds) < 2:
            continue
        removed = rows[rows["preprocess"] == "lungs_removed"]
        control = rows[rows["preprocess"] == "lungs_removed_marker"]
        found = sum(_finds_marker(r) for _, r in control.iterrows())
        separates = sum(_separates(r) for _, r in removed.iterrows())
        diff = removed["auc_vs_intact"].dropna()
        spread = (f"; its AUC minus the intact model's on the same test images ranges from "
                  f"{fmt_ci(diff.min(), signed=True)} to {fmt_ci(diff.max(), signed=True)} (paired, {len(diff)} seed(s))"
                  if len(diff) else "")
        lines.append(f"**Over {len(seeds)} seeds ({rows['task'].iloc[0]} task, seeds {', '.join(map(str, seeds))})**: "
                     f"the control found its marker in {found} of {len(control)}; trained and tested without lungs, "
                     f"the model separated the classes in {separates} of {len(removed)}{spread}.")
    return lines
