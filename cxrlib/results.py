"""The results chapter's numbers: the run table, the paper's tables, paired comparisons, the claims table.

Everything is read from run folders (params.json, metrics.json, predictions.csv, status) and from the run
root's matrix.json when the run matrix wrote one; nothing re-trains. A comparison of two arms is made only
on runs that differ in that one factor, on the test images both saw, with a patient-level paired
bootstrap (metrics.paired_bootstrap): a sentence says "no evidence of a difference" whenever the 95 %
interval of the difference contains 0, whatever the means.

One module (about 460 lines) on purpose: every table and sentence of the chapter reads the same run table
with the same rules for which runs form an arm (NOT_COMPARED, DERIVED_FROM, ARM_WORDS).
"""

from __future__ import annotations

import json
import re
import math
import numbers
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .config import RunConfig, check_exists
from .errors import CXRError
from . import metrics
from .atomic import write_text
from .metrics import METRIC_WORDS, PAIRED, paired_bootstrap
from .weights import Weights
from .paths import ROOT
from .rundir import MATRIX, PARAMS, PLANNED, Run, open_run, read_status

# Config fields that do not change what a run tests: two runs differing only in these are the same arm.
# How a run was executed or what it was scored on afterwards, not what it trained and tested: `external` sets are
# scored after training on images no run saw, so a run with and one without them are the same run.
NOT_COMPARED = ("run_dir", "device", "num_workers", "weights", "seed", "amp", "profile", "external")
# A factor that is a derived column also frees the columns it is derived from.
DERIVED_FROM = {"init_family": ("init",), "debiased": ("extra_negatives",)}
RECORDED_LATER = {f.name: f.default for f in dataclasses.fields(RunConfig)
                  if f.default is not dataclasses.MISSING}
SHOWN = ("arm", "task", "loss", "init", "extra_covid_train", "seed", "image_size", "epochs")
COLUMN_WORDS = {"extra_covid_train": "extra COVID in training", "image_size": "image size (px)"}  # for readers
PAPER_ARM = "paper set-up"  # the paper's own design: no hold-out, preprocessing, extra negatives; weighted sampling
UNWEIGHTED = "paper set-up, without weighted sampling"  # claim (c)'s other arm
N_BOOT = 1000  # resamples of every paired comparison of chapter 5 (claims.json records it)
LOSS_WORDS = {"ce": "cross-entropy", "weighted_ce": "class-weighted cross-entropy", "focal": "focal"}  # + " loss"
PREPROCESS_WORDS = {"clahe": "CLAHE", "lung_crop": "lung crop", "lungs_removed": "lungs removed",
                    "lungs_removed_marker": "lungs removed + marker (control)", "lungs_only": "lungs only",
                    "lungs_only_marker": "lungs only + marker outside (control)",
                    "lungs_only_clahe": "lungs only + CLAHE"}
ARM_WORDS = {  # words by which a matrix.json "not_run" entry names an arm, per (factor, value)
    ("init_family", "chest_xray"): ("chest", "chexnet", "chestxray14", "torchxrayvision", "file:"),
    ("init_family", "imagenet"): ("imagenet",),
    ("init_family", "random"): ("random", "none"),
    ("extra_covid_train", True): ("extra",), ("extra_covid_train", False): ("noextra", "without"),
    ("debiased", True): ("extra_negatives", "debias", "negatives"),
}


def arm_name(params: dict[str, Any]) -> str:
    """A run's arm in words, from its recorded parameters: "paper set-up", or what departs from it
    ("held-out source: country=italy", "adult negatives + CLAHE", "lungs removed", "paper set-up, without
    weighted sampling"). Task, loss, initialisation, seed and the extra-COVID axis are runs of one arm."""
    preprocess = params.get("preprocess") or "none"
    words = [f"held-out source: {params['hold_out']}" if params.get("hold_out") else "",
             "adults only" if params.get("cohort") == "adults" else
             "adult negatives" if params.get("extra_negatives") else "",
             PREPROCESS_WORDS.get(preprocess, preprocess) if preprocess != "none" else ""]
    departures = ["without weighted sampling"] if params.get("weighted_sampler") is False else []
    return ", ".join([" + ".join(filter(None, words)) or PAPER_ARM, *departures])


def load_runs(run_root: str | Path) -> pd.DataFrame:
    """One row per run folder: parameters, status and the metrics the paper reports (None when not complete).

    Parameters are read with .get(), so fields added later (extra_covid_train, extra_negatives) are optional.
    """
    rows = []
    for run in filter(None, map(open_run, sorted(p for p in Path(run_root).iterdir() if p.is_dir()))):
        if "task" in run.config:  # not the ChestX-ray14 pretraining folder
            rows.append(_run_row(run))
    return pd.DataFrame(rows)


def read_not_run(run_root: str | Path) -> list[dict[str, str]]:
    """The arms the run matrix asked for but did not run, with its reason and the command that would run them
    (matrix.json "not_run"; [] if absent; command "" when none was recorded)."""
    path = Path(run_root) / MATRIX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text()).get("not_run", [])
    except json.JSONDecodeError as err:
        raise CXRError(f"{path} is not valid JSON ({err}): rerun the run matrix") from err
    return [{"arm": str(e.get("arm", "?")), "reason": public_text(str(e.get("reason", "no reason recorded"))),
             "command": public_text(str(e.get("command", "")))} for e in entries]


def public_text(text: str) -> str:
    """A recorded message fit for the published book: the repository's folders relative to it, home folders as
    `~`, temporary and work folders (/tmp, /work, /mnt, ...) as `…/<last two parts>` (the machine that ran the matrix is not the reader's)."""
    text = text.replace(f"{ROOT}/", "")  # the repository's own folders, relative to it
    text = re.sub(r"(?<![\w.~])/(?:root|home/[^/\s]+)(?=/)", "~", text)
    return re.sub(r"(?<![\w.~])/(?:tmp|work|mnt|srv|scratch)(?:/[^/\s'\")]+)*?((?:/[^/\s'\")]+){1,2})(?=[\s'\")]|$)",
                  r"…\1", text)


def fmt_ci(value: Any, ci: Any = None, signed: bool = False) -> str:
    """`0.460 (0.290–0.650)`; a signed difference reads `+0.012 (−0.030 to +0.051)`; '–' when undefined."""
    if not _finite(value):
        return "–"
    spec = "+.3f" if signed else ".3f"
    text = f"{value:{spec}}".replace("-", "−")
    if isinstance(ci, (tuple, list)) and len(ci) == 2 and all(_finite(v) for v in ci):
        low, high = (f"{v:{spec}}".replace("-", "−") for v in ci)
        text += f" ({low} to {high})" if signed else f" ({low}–{high})"
    return text


def narrow(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """`frame` without the index levels and columns that hold one value in every row, and a sentence naming
    those values once: a table of many runs then fits the page without hiding anything."""
    if len(frame) < 2:
        return frame, ""
    same: dict[str, Any] = {}
    if isinstance(frame.index, pd.MultiIndex):
        levels = [n for n in frame.index.names if frame.index.get_level_values(n).nunique(dropna=False) == 1]
        levels = levels[: frame.index.nlevels - 1]  # one level stays
        same.update({str(n): frame.index.get_level_values(n)[0] for n in levels})
        frame = frame.droplevel(levels) if levels else frame
    columns = [c for c in frame.columns if frame[c].astype(str).nunique() == 1][: len(frame.columns) - 1]
    same.update({str(c): frame[c].iloc[0] for c in columns})
    text = ("Same in every row: " + "; ".join(f"{k} = {v}" for k, v in same.items()) + ".") if same else ""
    return frame.drop(columns=columns), text


def run_table(runs: pd.DataFrame, scores: Sequence[str] = (), words: bool = True) -> pd.DataFrame:
    """Every run's configuration and status: what the matrix ran (deterministic, so the book checks it); and its
    test `scores` (e.g. RUN_SCORES), empty where the run is not complete. Columns in words for readers, or
    (`words` False) as load_runs names them, for programs."""
    columns = [c for c in (*SHOWN, "status") if c in runs] + list(scores)
    table = runs.reindex(columns=columns).sort_values([c for c in ("task", "loss", "init", "extra_covid_train", "seed")
                                                       if c in runs]).reset_index(drop=True)
    return table.rename(columns={**COLUMN_WORDS, **METRIC_WORDS}) if words else table


RUN_SCORES = ("macro_f1", "roc_auc", "covid_sensitivity")  # a run's test scores in `python -m cxrlib results`
RUN_ROOT_WORDS = "give the folder that holds the run folders (`python -m cxrlib.runs --where` prints it)"


def matrix_results(run_root: str | Path, **options: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(load_runs, claims_table with `options`) of a run root, as the results chapter computes them; a folder that
    is not there or holds no run folder is a CXRError that says which folder to give."""
    root = Path(run_root)
    check_exists("run_root", str(run_root), "folder")
    runs = load_runs(root)
    if runs.empty:
        below = [str(p) for p in sorted(root.iterdir()) if p.is_dir() and _holds_runs(p)]
        raise CXRError(f"{run_root}: no run folder in it" + (f"; {', '.join(below)} hold(s) run folders"
                                                            if below else "") + f"; {RUN_ROOT_WORDS}")
    return runs, claims_table(runs, read_not_run(root), **options)


def _holds_runs(folder: Path) -> bool:
    """Whether a folder holds a run folder (trained, or planned by the matrix): a run root."""
    return any((p / name).is_file() for p in folder.iterdir() if p.is_dir() for name in (PARAMS, PLANNED))


def arms_table(runs: pd.DataFrame, not_run: Sequence[dict[str, str]] = ()) -> pd.DataFrame:
    """One row per arm of the matrix (task, loss, init, extra COVID): complete/failed runs and seeds; then the
    arms that were not run, with the reason matrix.json gives."""
    keys = [c for c in ("arm", "task", "loss", "init", "extra_covid_train") if c in runs]
    rows = []
    for arm, sub in runs.groupby(keys, dropna=False, sort=True) if not runs.empty else ():
        done = sub.status == "complete"
        rows.append({"arm": " · ".join(_label(k, v) for k, v in zip(keys, arm)), "complete": int(done.sum()),
                     "not complete": int((~done).sum()),
                     "seeds": ", ".join(str(s) for s in sorted(sub.seed[done].dropna().astype(int))),
                     "note": "; ".join(sorted(set(sub.status[~done]))) or ""})
    rows += [{"arm": e["arm"], "complete": 0, "not complete": 0, "seeds": "", "note": f"not run: {e['reason']}"}
             for e in not_run]
    return pd.DataFrame(rows, columns=["arm", "complete", "not complete", "seeds", "note"])


def paper_table(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """The paper's overall table for one task: one row per run, accuracy, macro precision/recall/F1, AUC.

    Accuracy, macro-F1 and AUC with patient-bootstrap 95 % CIs; failed runs stay, with their status.
    """
    out = []
    auc = "ROC AUC" if task == "binary" else "ROC AUC (macro one-vs-rest)"
    for _, r in _task_runs(paper_runs(runs), task).iterrows():
        row = {**_index(r), "status": r.status}
        if r.status == "complete":
            row.update({"accuracy": fmt_ci(r.accuracy, r.get("accuracy_ci")),
                        "macro precision": fmt_ci(r.macro_precision), "macro recall": fmt_ci(r.macro_recall),
                        "macro F1": fmt_ci(r.macro_f1, r.get("macro_f1_ci")),
                        auc: fmt_ci(r.roc_auc, r.get("roc_auc_ci"))})
            if task != "binary":  # the macro AUC averages three one-vs-rest AUCs; COVID's own is the paper's question
                row["COVID-vs-rest AUC"] = fmt_ci(r.get("covid_auc"))
        out.append(row)
    return _indexed(out)


def paper_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the paper's own set-up (its tables and claims), without chapter 06's arms or claim (c)'s."""
    return runs[runs.paper_arm.astype(bool)] if "paper_arm" in runs else runs


def class_table(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per class of one task: precision, recall (sensitivity) and specificity with Wilson 95 % CIs, and F1."""
    out = []
    for _, r in _task_runs(paper_runs(runs), task).iterrows():
        if r.status != "complete":
            continue
        for cls in r.classes:
            cell = {k: fmt_ci(r.get(f"{cls}_{k}"), r.get(f"{cls}_{k}_wilson"))
                    for k in ("precision", "recall", "specificity")}
            out.append({**_index(r), "class": cls, **cell, "F1": fmt_ci(r.get(f"{cls}_f1"))})
    return _indexed(out, extra=["class"])


def paired(
    runs: pd.DataFrame, factor: str, a: Any, b: Any, by: Sequence[str] = ("task",), n_boot: int = N_BOOT,
    seed: int = 0, primary: str = "macro_f1",
) -> pd.DataFrame:
    """Arm a vs arm b of `factor` (e.g. "loss", "focal", "ce"), one row per group of `by`.

    Runs are paired when they are complete and differ only in `factor` (same seed, task, data and every other
    parameter); each group's pairs give one paired_bootstrap with the training seed as its unit, so the
    interval covers the test patients and the spread between seeds: per metric of PAIRED the mean of a and b,
    the mean difference a − b with its 95 % CI and p, each seed's own difference and in how many seeds a was
    ahead; McNemar's p per pair; `commits`, the code that made the runs. `interval` reads `primary`'s CI.
    """
    pairs = matched_pairs(runs, factor, a, b)
    by = [k for k in by if k in pairs]
    groups = pairs.groupby(by, sort=True) if by else [((), pairs)] if len(pairs) else []
    rows = []
    for group, sub in groups:
        classes = sub["classes"].iloc[0]
        result = paired_bootstrap([(_predictions(x), _predictions(y)) for x, y in zip(sub.run_dir_a, sub.run_dir_b)],
                                  classes, n_boot=n_boot, seed=seed, units=[int(s) for s in sub.seed])
        row = dict(zip(by, group if isinstance(group, tuple) else (group,)))
        row.update(pairs=result["n_pairs"], images=min(result["n_images"]), patients=result["n_patients"],
                   seeds=tuple(int(s) for s in sub.seed), units=tuple(result["units"]),
                   commits=code_words([*sub.git_commit_a, *sub.git_commit_b], [*sub.git_dirty_a, *sub.git_dirty_b]))
        for m in PAIRED:
            r = result[m]
            row.update({f"{m}_a": r["a"], f"{m}_b": r["b"], f"{m}_difference": r["difference"],
                        f"{m}_ci": tuple(r["ci"]), f"{m}_ahead": r["ahead"], f"{m}_p": r.get("p_value"),
                        f"{m}_per_seed": tuple(r["per_unit"])})
        row["mcnemar_p"] = tuple(p["mcnemar"]["p_value"] for p in result["pairs"])
        row["interval"] = interval_words(row[f"{primary}_ci"])
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else [*by, "pairs", "interval"])


def code_words(commits: Sequence[Any], dirty: Sequence[Any]) -> str:
    """Which code made a set of runs: "one clean commit abc1234", or what keeps a comparison from being about
    one factor only (runs of several commits, or of a work tree with uncommitted changes)."""
    known = sorted({str(c) for c in commits if c})
    said = (f"one commit {known[0][:7]}" if len(known) == 1 else
            f"{len(known)} commits ({', '.join(c[:7] for c in known)})" if known else "commit not recorded")
    if any(d is True or str(d).lower() == "true" for d in dirty):
        return said + ", uncommitted changes in the work tree"
    return ("one clean commit " + known[0][:7]) if len(known) == 1 else said


def matched_pairs(runs: pd.DataFrame, factor: str, a: Any, b: Any) -> pd.DataFrame:
    """Complete runs with factor == a joined to those with factor == b on everything else (seed included)."""
    if runs.empty or factor not in runs:
        return pd.DataFrame(columns=["run_dir_a", "run_dir_b"])
    done = runs[runs.status == "complete"].copy()
    freed = {factor, *DERIVED_FROM.get(factor, ())}
    done["_key"] = [json.dumps({k: v for k, v in ident.items() if k not in freed}, sort_keys=True, default=str)
                    + f"|seed={s}" for ident, s in zip(done["identity"], done["seed"])]
    left, right = done[_is(done[factor], a)], done[_is(done[factor], b)]
    pairs = left.merge(right[["_key", "run_dir", "git_commit", "git_dirty"]], on="_key", suffixes=("_a", "_b"))
    return pairs.drop(columns="_key")


VERDICTS = ("supported", "not supported", "no evidence of a difference")
JUDGED = "(from p (Holm))"  # a paired claim's verdict until the family's p-values are adjusted (claims_table)


def interval_words(ci: Any) -> str:
    """Where a difference's unadjusted 95 % interval lies: "above 0", "below 0", "contains 0" (a description of one
    comparison; the claims' verdicts read the Holm-adjusted p instead)."""
    if not isinstance(ci, (tuple, list)) or len(ci) != 2 or not all(_finite(v) for v in ci):
        return "undefined on these test images"
    return "above 0" if ci[0] > 0 else "below 0" if ci[1] < 0 else "contains 0"


def holm_verdict(difference: Any, p_holm: Any, level: float = 0.05) -> str:
    """A claim's verdict from its family-adjusted p: 'supported' when p (Holm) < level and the claimed arm is
    ahead, 'not supported' when p (Holm) < level and the other arm is ahead, else 'no evidence of a difference'."""
    if not (_finite(difference) and _finite(p_holm)):
        return "not testable here (the difference is undefined on these test images)"
    if p_holm >= level:
        return VERDICTS[2]
    return VERDICTS[0] if difference > 0 else VERDICTS[1]


def describe(pairs: pd.DataFrame, a: str, b: str, metric: str = "macro_f1") -> str:
    """Sentences stating each row of `paired`, from the paired difference and its CI (never from the means)."""
    if pairs.empty:
        return f"No pair of complete runs differs only in {a} vs {b}, so this comparison cannot be made here."
    name = METRIC_WORDS.get(metric, metric)
    sentences = []
    for _, r in pairs.iterrows():
        where = f"{r['task']} task: " if "task" in r else ""
        ci = r[f"{metric}_ci"]
        outcome = {"above 0": f"{a} scored higher (the interval excludes 0)",
                   "below 0": f"{b} scored higher (the interval excludes 0)",
                   "contains 0": "no evidence of a difference (the interval contains 0)"}
        said = outcome.get(interval_words(ci), "the difference is undefined on these test images")
        p_values = ", ".join("p " + (v if v[0] in "<>" else "= " + v) for v in map(fmt_p, r["mcnemar_p"]))
        sentences.append(
            f"{where}{a} − {b} {name} = {fmt_ci(r[f'{metric}_difference'], ci, signed=True)}, the mean over "
            f"{len(r['units'])} seed(s) ({r['pairs']} paired run(s); at least {r['images']} shared test images; 95% "
            f"interval over test patients and seeds, unadjusted): {said}. By seed: {per_seed(r, metric)}. "
            f"Code: {r['commits']}. McNemar's "
            f"exact test on the paired right/wrong calls, per pair: {p_values}."
        )
    return "\n\n".join(sentences)


def per_seed(row: pd.Series | dict, metric: str) -> str:
    """"seed 0: +0.021, seed 1: −0.004, seed 2: +0.010; ahead in 2 of 3 seeds": a `paired` row's own differences."""
    said = ", ".join(f"seed {u}: {fmt_ci(d, signed=True)}" for u, d in zip(row["units"], row[f"{metric}_per_seed"]))
    n = len(row["units"])
    return f"{said}; ahead in {row[f'{metric}_ahead']} of {n} seed{'s' if n != 1 else ''}"


def comparison_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """`paired`'s output for readers: differences with CIs (test patients and seeds), each seed's own, 3 decimals."""
    if pairs.empty:
        return pd.DataFrame()
    out = pairs[[c for c in pairs.columns if c in ("task", "loss", "init", "init_family", "extra_covid_train")]
                ].copy()
    out["pairs"] = pairs["pairs"]
    for m in PAIRED:
        out[f"Δ {METRIC_WORDS[m]}"] = [fmt_ci(d, ci, signed=True) for d, ci in zip(pairs[f"{m}_difference"],
                                                                                   pairs[f"{m}_ci"])]
    out["per seed (macro-F1)"] = [", ".join(fmt_ci(d, signed=True) for d in ds) for ds in pairs["macro_f1_per_seed"]]
    out["McNemar p"] = [", ".join(fmt_p(p) for p in ps) for ps in pairs["mcnemar_p"]]
    out["code"] = pairs["commits"]
    return out.reset_index(drop=True)


INIT_NAMES = {"chest_xray": "chest-X-ray", "imagenet": "ImageNet", "random": "random"}
INIT_PAIRS = (("chest_xray", "imagenet"), ("chest_xray", "random"), ("imagenet", "random"))  # the paper's first


def init_comparison(runs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The paper's question on the initialisations that have complete runs: chest-X-ray vs ImageNet, else the
    first pair of INIT_PAIRS that ran. Returns (`paired`'s table, Markdown saying which pair and the result),
    so chapters 02 and 05 make the same comparison with the same words."""
    families = set(runs.loc[runs.status == "complete", "init_family"]) if not runs.empty else set()
    ran = ", ".join(INIT_NAMES.get(f, f) for f in sorted(families)) or "none"
    pair = next((p for p in INIT_PAIRS if set(p) <= families), None)
    if pair is None:
        return (pd.DataFrame(columns=["task", "pairs", "verdict"]),
                f"Fewer than two initialisations have complete runs ({ran}): there is nothing to compare.")
    a, b = (f"{INIT_NAMES[f]} initialisation" for f in pair)
    pairs = paired(runs, "init_family", *pair, n_boot=n_boot, seed=seed)
    note = ("" if pair == INIT_PAIRS[0] else f"Initialisations with complete runs: {ran}; so the {a} is compared "
            f"with the {b}.\n\n")
    return pairs, note + describe(pairs, a, b)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims and the metric its verdict reads, fixed before any run was looked at."""

    letter: str
    text: str
    primary: str  # the verdict's metric: what the claim is about
    beside: tuple[str, ...] = ()  # shown next to it, never judged


# (b) and (d) are about overall performance; (c) and (c′) about the minority class the imbalance hurts.
CLAIMS = (
    Claim("(a)", "chest-X-ray (CheXNet) pretraining beats ImageNet initialisation", "macro_f1"),
    Claim("(b)", "focal loss beats cross-entropy", "macro_f1"),
    Claim("(b′)", "focal loss helps most once extra COVID-19 images are added", "macro_f1"),
    Claim("(c)", "weighted sampling handles the class imbalance", "covid_sensitivity", ("macro_f1",)),
    Claim("(c′)", "extra COVID-19 images handle the class imbalance", "covid_sensitivity", ("macro_f1",)),
    Claim("(d)", "high accuracy (read here: above always predicting the majority class)", "accuracy"),
)


def claims_table(
    runs: pd.DataFrame, not_run: Sequence[dict[str, str]] = (), n_boot: int = N_BOOT, seed: int = 0
) -> pd.DataFrame:
    """The paper's claims (arXiv 2105.08382, CLAIMS), each per task: the runs that test it and a computed verdict.

    Each paired claim's difference is the mean over seeds of the paired difference in its primary metric, its
    95 % interval and p from a bootstrap over seeds and, within each seed, test patients; the verdicts read the
    p after Holm's adjustment over the family of paired tests ("supported" / "not supported" when it is below
    0.05, with the sign saying which; "no evidence of a difference" otherwise), "not testable here (why)" when the
    runs it needs are missing (with matrix.json's reason where it gives one).
    """
    paper = paper_runs(runs)
    with_unweighted = runs[runs.arm.isin([PAPER_ARM, UNWEIGHTED])] if "arm" in runs else runs  # claim (c)'s two arms
    tasks = sorted(paper.task.dropna().unique()) if not paper.empty else []
    rows = []
    for task in tasks:
        sub = paper[paper.task == task]
        tests = {"(a)": (sub, "init_family", "chest_xray", "imagenet"), "(b)": (sub, "loss", "focal", "ce"),
                 "(c)": (with_unweighted[with_unweighted.task == task], "weighted_sampler", True, False),
                 "(c′)": (sub, "extra_covid_train", True, False)}
        for claim in CLAIMS:
            if claim.letter in tests:
                found = _paired_claim(claim, *tests[claim.letter], not_run, n_boot, seed)
            elif claim.letter == "(b′)":
                found = _interaction_claim(claim, sub, not_run, n_boot, seed)
            else:
                found = _accuracy_claim(sub)
            rows.append({"claim": f"{claim.letter} {claim.text}", "task": task, "metric": METRIC_WORDS[claim.primary],
                         **found})
    columns = ["claim", "task", "metric", "tested by", "seeds", "result", "difference", "ci", "p", "code", "verdict"]
    table = pd.DataFrame(rows, columns=columns)
    table["seeds"] = table["seeds"].fillna("–")
    table["code"] = table["code"].fillna("–")
    table["p (Holm)"] = metrics.holm([p if _finite(p) else None for p in table["p"]])
    judged = table["verdict"] == JUDGED
    table.loc[judged, "verdict"] = [holm_verdict(d, p) for d, p in
                                    zip(table.loc[judged, "difference"], table.loc[judged, "p (Holm)"])]
    return table


def claims_for_reading(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table for the page: the verdict beside the Holm-adjusted p it follows, then the unadjusted p;
    p-values as text ("–" where a claim has no paired test)."""
    out = claims.copy()
    for column in ("p", "p (Holm)"):
        out[column] = [fmt_p(p) for p in out[column]]
    out["verdict"] = [v if len(v) < 90 else v.split(" (", 1)[0] + " (why: \"What ran, and what did not\" above)"
                      for v in out["verdict"]]  # the arms' full reasons are in that table, said once
    return out[["claim", "task", "verdict", "p (Holm)", "metric", "result", "seeds", "p", "code", "tested by"]]


def fmt_p(p: Any) -> str:
    """A p-value for readers: two significant digits, "< 0.001" below that; "–" when there is none."""
    if not _finite(p):
        return "–"
    return "< 0.001" if p < 0.001 else "> 0.99" if p > 0.99 else f"{p:.2g}"


def holm_sentence(claims: pd.DataFrame, level: float = 0.05) -> str:
    """How the verdicts were reached, and how many of the family's tested claims keep p < level after Holm, once."""
    tested = claims[[_finite(p) for p in claims["p (Holm)"]]]
    if tested.empty:
        return "No claim had a paired test here, so there is no family of p-values to adjust."
    kept = int((tested["p (Holm)"] < level).sum())
    return (f"Each paired claim is judged on its own metric (column \"metric\"): the mean over seeds of the paired "
            f"difference, whose 95% interval and two-sided p come from one bootstrap that draws the seeds with "
            f"replacement and, within each drawn seed, that seed's test patients with replacement, so both the test "
            f"images and the seed-to-seed spread are in it. The {len(tested)} paired tests (claims × tasks) form one "
            f"family, and each verdict follows its p after Holm's adjustment: {kept} of {len(tested)} keep "
            f"p < {level}. Claim (d) compares each run's own interval with a fixed baseline and has no p-value.")


def rerun_noise(runs: pd.DataFrame, reruns: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """The noise floor: runs of one configuration and seed made twice (in `runs` and in `reruns`, e.g. the matrix
    and an experiment's baseline), compared like two arms. A claim's difference smaller than this is what
    training the same thing again moves, not an effect. One row per matched pair."""
    rows = []
    if runs.empty or reruns.empty:
        return pd.DataFrame(rows)
    key = lambda r: json.dumps(r["identity"], sort_keys=True, default=str) + f"|seed={r['seed']}"  # noqa: E731
    again = {key(r): r for _, r in reruns[reruns.status == "complete"].iterrows()}
    for _, r in runs[runs.status == "complete"].iterrows():
        other = again.get(key(r))
        if other is None:
            continue
        a, b = _predictions(r.run_dir), _predictions(other.run_dir)
        result = paired_bootstrap([(a, b)], r["classes"], n_boot=n_boot, seed=seed)
        left, right = metrics.join_predictions(a, b)
        rows.append({"run": r["run"], "task": r["task"], "seed": int(r["seed"]),
                     "images called differently": int((left["pred"].astype(str) != right["pred"].astype(str)).sum()),
                     "images": int(len(left)),
                     **{f"Δ {METRIC_WORDS[m]}": fmt_ci(result[m]["difference"], result[m]["ci"], signed=True)
                        for m in ("macro_f1", "covid_sensitivity")},
                     "code": code_words([r.git_commit, other.git_commit], [r.git_dirty, other.git_dirty])})
    return pd.DataFrame(rows)


def noise_sentence(noise: pd.DataFrame) -> str:
    """What the rerun pairs say, in one sentence: whether training again moved any test image's call."""
    same = int((noise["images called differently"] == 0).sum())
    if same == len(noise):
        return (f"In all {len(noise)} pairs the run trained again called every test image as the first did: on this "
                "hardware a seed fixes the result, so what moves the claims' numbers is the seed, which the claims' "
                "intervals resample.")
    return (f"In {len(noise) - same} of {len(noise)} pairs the run trained again called some test images differently "
            f"(up to {int(noise['images called differently'].max())} of {int(noise['images'].max())}): a claim's "
            "difference within that range is what training again moves.")


def claims_record(claims: pd.DataFrame, runs: pd.DataFrame, noise: pd.DataFrame | None = None,
                  noise_against: str = "", n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """claims.json's content: the claims, their verdicts and what stands behind them (the bootstrap's settings, the
    rerun noise floor and the folder of its reruns), as data for the book's first page and `cxrlib verify`."""
    done = runs[runs.status == "complete"] if not runs.empty else runs
    record = {"claims": json.loads(claims.to_json(orient="records")),
              "holm": holm_sentence(claims),
              "bootstrap": {"n_boot": n_boot, "seed": seed},
              "noise_floor": {"against": noise_against,
                              "pairs": json.loads(noise.to_json(orient="records")) if noise is not None else []},
              "runs": {"complete": int(len(done)), "all": int(len(runs)),
                       "seeds": sorted({int(s) for s in done.seed.dropna()}) if len(done) else [],
                       "epochs": sorted({int(e) for e in done.epochs.dropna()}) if len(done) else [],
                       "epochs_run": sorted({int(e) for e in done.epochs_run.dropna()})
                       if "epochs_run" in done and len(done) else [],
                       "image_size": sorted({int(e) for e in done.image_size.dropna()}) if len(done) else [],
                       "inits": sorted(set(done.init)) if len(done) else [],
                       "arms": sorted(set(done.arm)) if "arm" in done and len(done) else [],
                       "code": code_words(done.git_commit.tolist(), done.git_dirty.tolist()) if len(done) else "–"}}
    return json.loads(json.dumps(record, allow_nan=False))


def save_claims(claims: pd.DataFrame, runs: pd.DataFrame, path: str | Path, noise: pd.DataFrame | None = None,
                noise_against: str = "", n_boot: int = N_BOOT, seed: int = 0) -> Path:
    """Write claims.json (claims_record)."""
    record = claims_record(claims, runs, noise, noise_against, n_boot, seed)
    return write_text(path, json.dumps(record, indent=2) + "\n")


def read_claims(path: str | Path) -> dict[str, Any]:
    """A claims.json, with an error that names the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CXRError(f"{path}: cannot read the claims ({err}); re-execute the results chapter") from err


# --- internals ---------------------------------------------------------------------------------


def _run_row(run: Run) -> dict[str, Any]:
    """One load_runs row: shown parameters, identity for pairing, and the metrics of a complete run."""
    run_dir, params = run.dir, run.config
    weights = params.get("weights", "none")
    row = {k: params.get(k) for k in ("task", "loss", "backbone", "weights", "seed", "image_size", "epochs",
                                      "weighted_sampler", "extra_negatives")}
    row["arm"] = arm_name(params)
    row["paper_arm"] = row["arm"] == PAPER_ARM  # chapter 06's arms and claim (c)'s unweighted arm are not the paper's
    row["extra_covid_train"] = params.get("extra_covid_train", True)  # before the axis existed: always True
    row.update(git_commit=run.record.get("git_commit"), git_dirty=run.record.get("git_dirty"))
    row.update(run=run_dir.name, run_dir=str(run_dir), status=read_status(run_dir), init=Weights.parse(weights).label,
               init_family=Weights.parse(weights).family, debiased=bool(params.get("extra_negatives")))
    recorded = {**RECORDED_LATER, **params}  # a field added after a run was made holds its default there
    identity = {k: v for k, v in recorded.items() if k not in NOT_COMPARED}
    row["identity"] = {**identity, "init": row["init"], "init_family": row["init_family"],
                       "extra_covid_train": row["extra_covid_train"], "debiased": row["debiased"]}
    if row["status"] == "complete":
        m = run.metrics()
        row.update(classes=m.get("classes"), accuracy=m["accuracy"], macro_precision=m["macro"]["precision"],
                   macro_recall=m["macro"]["recall"], macro_f1=m["macro_f1"],
                   covid_sensitivity=m.get("covid_sensitivity"), roc_auc=m.get("roc_auc"),
                   covid_auc=(m.get("roc_auc_per_class") or {}).get("covid"),
                   majority_accuracy=m.get("majority_baseline", {}).get("accuracy"), epochs_run=m.get("epochs_run"))
        for name, ci in m.get("ci", {}).items():
            row[f"{name}_ci"] = tuple(ci) if ci else None
        wilson = m.get("wilson", {}).get("per_class", {})
        for cls, scores in m["per_class"].items():
            for key in ("precision", "recall", "specificity", "f1"):
                row[f"{cls}_{key}"] = scores.get(key)
                if key in wilson.get(cls, {}):
                    row[f"{cls}_{key}_wilson"] = tuple(wilson[cls][key])
    return row


def _predictions(run_dir: str) -> pd.DataFrame:
    return Run(run_dir).predictions()


def _paired_claim(claim: Claim, runs: pd.DataFrame, factor: str, a: Any, b: Any, not_run, n_boot: int,
                  seed: int) -> dict:
    result = paired(runs, factor, a, b, by=(), n_boot=n_boot, seed=seed, primary=claim.primary)
    if result.empty:
        return {"tested by": f"{_label(factor, a)} vs {_label(factor, b)}: no paired runs",
                "result": "–", "verdict": f"not testable here ({_why_missing(runs, factor, (a, b), not_run)})"}
    r = result.iloc[0]
    said = [f"Δ {METRIC_WORDS[m]} {fmt_ci(r[f'{m}_difference'], r[f'{m}_ci'], signed=True)}"
            for m in (claim.primary, *claim.beside)]
    return {"tested by": f"{r['pairs']} paired run(s): {_label(factor, a)} vs {_label(factor, b)}",
            "seeds": _seed_count(r["seeds"]), "code": r["commits"],
            "result": "; ".join(said) + f"; {per_seed(r, claim.primary)}",
            "difference": r[f"{claim.primary}_difference"], "ci": r[f"{claim.primary}_ci"],
            "p": r[f"{claim.primary}_p"], "verdict": JUDGED}


def _seed_count(seeds: Sequence[Any]) -> str:
    """"1 seed (0)" / "3 seeds (0, 1, 2)": how many seeds stand behind a verdict."""
    kept = sorted({int(s) for s in seeds})
    return f"{len(kept)} seed{'s' if len(kept) != 1 else ''} ({', '.join(map(str, kept))})" if kept else "–"


def _interaction_claim(claim: Claim, runs: pd.DataFrame, not_run, n_boot: int, seed: int) -> dict:
    """(focal − CE with extra COVID) − (focal − CE without), on runs matched in everything else, seeds as units."""
    arms = {}
    for extra in (True, False):
        sub = runs[_is(runs.extra_covid_train, extra)] if "extra_covid_train" in runs else runs.iloc[:0]
        arms[extra] = matched_pairs(sub, "loss", "focal", "ce")
    if arms[True].empty or arms[False].empty:
        missing = [extra for extra in (True, False) if arms[extra].empty]
        why = _why_missing(runs, "extra_covid_train", missing, not_run)
        return {"tested by": "focal vs CE, with and without extra COVID-19 in training: no paired runs",
                "result": "–", "verdict": f"not testable here ({why})"}
    key = [c for c in ("init", "seed", "backbone", "image_size", "epochs", "weighted_sampler", "debiased")
           if c in arms[True]]
    both = arms[True].merge(arms[False], on=key, suffixes=("_with", "_without"))
    if both.empty:
        return {"tested by": "focal vs CE, with and without extra COVID-19", "result": "–",
                "verdict": "not testable here (no init and seed has focal and CE runs in both extra-COVID arms)"}
    m = len(both)
    pairs = [(_predictions(x), _predictions(y)) for x, y in zip(both.run_dir_a_with, both.run_dir_b_with)]
    pairs += [(_predictions(x), _predictions(y)) for x, y in zip(both.run_dir_a_without, both.run_dir_b_without)]
    seeds = [int(s) for s in both.seed] * 2
    result = paired_bootstrap(pairs, both["classes_with"].iloc[0], n_boot=n_boot, seed=seed,
                              coef=[1 / m] * m + [-1 / m] * m, units=seeds)
    r = result[claim.primary]
    row = {"units": result["units"], f"{claim.primary}_per_seed": r["per_unit"], f"{claim.primary}_ahead": r["ahead"]}
    columns = [f"{side}_{arm}" for side in ("a", "b") for arm in ("with", "without")]
    commits = code_words([c for col in columns for c in both[f"git_commit_{col}"]],
                         [d for col in columns for d in both[f"git_dirty_{col}"]])
    return {"tested by": f"{m} set(s) of 4 runs: (focal − CE with extra COVID) − (focal − CE without)",
            "seeds": _seed_count(both.seed), "p": r.get("p_value"), "code": commits,
            "difference": r["difference"], "ci": r["ci"],
            "result": f"Δ of Δ {METRIC_WORDS[claim.primary]} {fmt_ci(r['difference'], r['ci'], signed=True)}; "
                      f"{per_seed(row, claim.primary)}",
            "verdict": JUDGED}


def _accuracy_claim(runs: pd.DataFrame) -> dict:
    """Each run of the paper's arm (focal, chest-X-ray init; else every run) against its majority baseline."""
    done = runs[(runs.status == "complete") & runs.get("majority_accuracy", pd.Series(index=runs.index)).notna()]
    if done.empty:
        return {"tested by": "no complete run with a majority baseline", "result": "–",
                "verdict": "not testable here (no complete run of this task)"}
    paper_arm = done[(done.loss == "focal") & (done.init_family == "chest_xray")]
    chosen, which = (paper_arm, "focal · chest X-ray") if not paper_arm.empty else (done, "all arms")
    low = [ci[0] if isinstance(ci, tuple) and _finite(ci[0]) else math.nan for ci in chosen.accuracy_ci]
    high = [ci[1] if isinstance(ci, tuple) and _finite(ci[1]) else math.nan for ci in chosen.accuracy_ci]
    base = chosen.majority_accuracy.to_numpy(float)
    if all(lo > ba for lo, ba in zip(low, base)):
        said = "supported"
    elif all(hi < ba for hi, ba in zip(high, base)):
        said = "not supported"
    else:
        said = "no evidence of a difference"
    worst = chosen.accuracy.idxmin()
    return {"tested by": f"{len(chosen)} run(s), {which}, vs always the majority class",
            "seeds": _seed_count(chosen.seed),
            "result": f"lowest accuracy {fmt_ci(chosen.accuracy[worst], chosen.accuracy_ci[worst])} vs majority "
                      f"{fmt_ci(chosen.majority_accuracy[worst])}",
            "verdict": said}


def _why_missing(runs: pd.DataFrame, factor: str, values: Sequence[Any], not_run) -> str:
    """Why an arm has no paired runs: matrix.json's reason for it, else what the run folders show."""
    reasons = []
    for value in values:
        words = ARM_WORDS.get((factor, value), (str(value).lower(),))
        said = [f"{e['arm']}: {e['reason']}" for e in not_run if any(w in e["arm"].lower() for w in words)]
        arm = runs[_is(runs[factor], value)] if factor in runs else runs.iloc[:0]
        if said:
            reasons += said
        elif not (arm.status == "complete").any():
            label = _label(factor, value)
            failed = sorted(set(arm.status))
            reasons.append(f"no complete run {label if label.startswith('with') else f'with {factor} {value}'}"
                           + (f" ({', '.join(failed)})" if failed else ""))
    return "; ".join(reasons) or f"the runs differ in more than {factor}"


def _task_runs(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    sub = runs[runs.task == task] if not runs.empty else runs
    return sub.sort_values([c for c in ("loss", "init", "extra_covid_train", "seed") if c in sub])


def _index(r: pd.Series) -> dict[str, Any]:
    return {"loss": r.loss, "init": r.init, "extra COVID": _yes_no(r.get("extra_covid_train")), "seed": r.seed}


def _indexed(rows: list[dict], extra: Sequence[str] = ()) -> pd.DataFrame:
    return pd.DataFrame(rows).set_index(["loss", "init", "extra COVID", "seed", *extra]) if rows else pd.DataFrame()


def _label(factor: str, value: Any) -> str:
    """How an arm is named in the tables: the value itself, or with/without for the on/off factors."""
    what = {"extra_covid_train": "extra COVID", "weighted_sampler": "weighted sampling", "debiased": "extra negatives"}
    if factor in what:
        return f"{'with' if value else 'without'} {what[factor]}"
    return str(value)


def _yes_no(value: Any) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _is(column: pd.Series, value: Any) -> pd.Series:
    """column == value, where booleans also match their JSON/CSV spellings."""
    if isinstance(value, bool):
        return column.map(lambda v: v is not None and str(v).lower() in (("true", "1") if value else ("false", "0")))
    return column == value


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
