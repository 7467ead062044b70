"""The results chapter's tables: every run in the paper's form, and paired comparisons from the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


PAIR_KEYS = ("task", "backbone", "seed", "image_size", "epochs")


def read_status(run_dir: str | Path) -> str:
    """A run folder's status file: complete | running | failed: <reason> | missing."""
    path = Path(run_dir) / "status"
    return path.read_text().strip() if path.is_file() else "missing"


def init_name(weights: str) -> str:
    """Human name of a weights spec: random, ImageNet, or chest X-ray (with its source)."""
    kind, _, rest = weights.partition(":")
    if kind == "none":
        return "random"
    if kind == "imagenet":
        return "ImageNet"
    return f"chest X-ray ({kind}: {Path(rest).parent.name if kind == 'file' else Path(rest).stem or rest})"


def init_family(weights: str) -> str:
    kind = weights.partition(":")[0]
    return {"none": "random", "imagenet": "imagenet"}.get(kind, "chest_xray")


def load_runs(run_root: str | Path) -> pd.DataFrame:
    """One row per run folder: parameters, status and the metrics the paper reports (None when failed)."""
    rows = []
    for run_dir in sorted(p for p in Path(run_root).iterdir() if p.is_dir()):
        if (run_dir / "params.json").is_file():  # written by training
            params = json.loads((run_dir / "params.json").read_text())
            params = params.get("config", params)
        elif (run_dir / "config.json").is_file():  # written by the run matrix before training starts
            params = json.loads((run_dir / "config.json").read_text())
        else:
            continue
        if "task" not in params:  # e.g. the ChestX-ray14 pretraining folder
            continue
        row = {k: params.get(k) for k in ("task", "loss", "backbone", "weights", "seed", "image_size", "epochs")}
        row.update(run=run_dir.name, run_dir=str(run_dir), status=read_status(run_dir), init=init_name(row["weights"]),
                   init_family=init_family(row["weights"]))
        metrics_file = run_dir / "metrics.json"
        if row["status"] == "complete" and metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            row.update(accuracy=m["accuracy"], macro_precision=m["macro"]["precision"],
                       macro_recall=m["macro"]["recall"], macro_f1=m["macro_f1"],
                       covid_sensitivity=m.get("covid_sensitivity"), roc_auc=m.get("roc_auc"))
            for name, ci in m.get("ci", {}).items():
                row[f"{name}_ci"] = tuple(ci) if ci else None
            for cls, scores in m["per_class"].items():
                for key in ("precision", "recall", "f1"):
                    row[f"{cls}_{key}"] = scores[key]
        rows.append(row)
    return pd.DataFrame(rows)


def _with_ci(value, ci) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(ci, tuple) and None not in ci:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def paper_table(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows (loss, init), columns accuracy, per-class and macro precision/recall/F1; 95% CIs in brackets."""
    sub = runs[runs.task == task]
    out = []
    for _, r in sub.sort_values(["loss", "init"]).iterrows():
        row = {"loss": r.loss, "init": r.init, "status": r.status}
        if r.status == "complete":
            row["accuracy"] = _with_ci(r.accuracy, r.get("accuracy_ci"))
            classes = [c[: -len("_f1")] for c in r.index if c.endswith("_f1") and c not in ("macro_f1",)
                       and not c.endswith("_ci") and pd.notna(r[c])]
            for cls in classes:
                for key in ("precision", "recall", "f1"):
                    row[f"{cls} {key}"] = _with_ci(r[f"{cls}_{key}"], None)
            row["macro precision"] = _with_ci(r.macro_precision, None)
            row["macro recall"] = _with_ci(r.macro_recall, None)
            row["macro F1"] = _with_ci(r.macro_f1, r.get("macro_f1_ci"))
        out.append(row)
    return pd.DataFrame(out).set_index(["loss", "init"]) if out else pd.DataFrame()


def paired(runs: pd.DataFrame, factor: str, a: str, b: str, metric: str = "macro_f1") -> pd.DataFrame:
    """Runs that differ only in `factor` (a vs b): the metric for each, the difference, CI overlap."""
    done = runs[runs.status == "complete"]
    keys = [k for k in PAIR_KEYS if k in done] + [k for k in ("loss", "init_family") if k != factor]
    left = done[done[factor] == a]
    right = done[done[factor] == b]
    pairs = left.merge(right, on=keys, suffixes=(f"_{a}", f"_{b}"))
    if pairs.empty:
        return pd.DataFrame(columns=[*keys, f"{metric}_{a}", f"{metric}_{b}", "difference", "cis_overlap"])
    pairs["difference"] = pairs[f"{metric}_{a}"] - pairs[f"{metric}_{b}"]
    ci_a, ci_b = pairs.get(f"{metric}_ci_{a}"), pairs.get(f"{metric}_ci_{b}")
    if ci_a is not None and ci_b is not None:
        pairs["cis_overlap"] = [bool(x and y and x[0] <= y[1] and y[0] <= x[1]) for x, y in zip(ci_a, ci_b)]
    else:
        pairs["cis_overlap"] = None
    return pairs[[*keys, f"{metric}_{a}", f"{metric}_{b}", "difference", "cis_overlap"]]


def describe(pairs: pd.DataFrame, a: str, b: str, metric: str = "macro_f1") -> str:
    """One sentence stating a comparison from the paired numbers, including how uncertain it is."""
    if pairs.empty:
        return f"No pair of complete runs differs only in {a} vs {b}, so this comparison cannot be made here."
    diff = pairs["difference"]
    better = int((diff > 0).sum())
    overlap = int(pairs["cis_overlap"].fillna(True).sum())
    direction = "higher" if diff.mean() > 0 else "lower"
    return (
        f"Over {len(pairs)} paired run(s), {a} gave a {direction} test {metric.replace('_', '-')} than {b} "
        f"by {abs(diff.mean()):.3f} on average (range {diff.min():+.3f} to {diff.max():+.3f}); "
        f"{a} was ahead in {better} of {len(pairs)}. The patient-level 95% intervals overlap in {overlap} "
        f"of {len(pairs)} pair(s)" + (", so these differences are within the uncertainty." if overlap == len(pairs)
                                       else ".")
    )
