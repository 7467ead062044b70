"""cxrlib.results on hand-made run folders whose answers are known: pairing, paired sentences, claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlib import metrics, results
from cxrlib.errors import CXRError
from cxrlib.weights import Weights

BINARY = ["non_covid", "covid"]
CHEST = "file:/runs/pretrain-chestxray14-resnet50/model.pt"


def predictions(skill: float, seed: int, n_patients: int = 120) -> pd.DataFrame:
    """The same 2 images x n_patients test set for every run; the model is right with chance `skill`."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    y = (np.arange(n) % 4 == 0).astype(int)  # 25 % covid
    right = rng.random(n) < skill
    p_true = np.where(right, rng.uniform(0.6, 0.95, n), rng.uniform(0.05, 0.4, n))
    p_covid = np.where(y == 1, p_true, 1 - p_true)
    rows = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)]})
    return metrics.predictions_table(rows, np.c_[1 - p_covid, p_covid], BINARY, y)


def make_run(root: Path, status: str = "complete", skill: float = 0.8, pred_seed: int = 0, **config) -> Path:
    """A run folder as training writes it (params.json, predictions.csv, metrics.json, status)."""
    config = {"task": "binary", "loss": "ce", "backbone": "resnet50", "weights": "imagenet", "seed": 0,
              "image_size": 32, "epochs": 1, "weighted_sampler": True, "extra_covid_train": True, **config}
    name = "-".join(str(config[k]) for k in ("task", "loss", "weights", "seed", "extra_covid_train",
                                             "weighted_sampler")).replace("/", "_").replace(":", "_")
    run = root / name
    run.mkdir(parents=True)
    (run / "params.json").write_text(json.dumps({"config": config}))
    (run / "status").write_text(status + "\n")
    if status == "complete":
        pred = predictions(skill, pred_seed)
        pred.to_csv(run / "predictions.csv", index=False)
        m = metrics.compute_metrics(pred, BINARY, n_boot=100, seed=0)
        m["majority_baseline"] = metrics.majority_baseline([0, 0, 0, 1], pred["true"], BINARY)
        metrics.save_metrics(m, run / "metrics.json")
    return run


@pytest.fixture
def matrix(tmp_path: Path) -> Path:
    """chest X-ray clearly better than ImageNet; focal identical to CE; no arm without extra COVID."""
    for seed in (0, 1):
        for loss in ("ce", "focal"):
            make_run(tmp_path, loss=loss, weights=CHEST, seed=seed, skill=0.92, pred_seed=seed)
            make_run(tmp_path, loss=loss, weights="imagenet", seed=seed, skill=0.62, pred_seed=10 + seed)
    make_run(tmp_path, "failed: out of memory", loss="focal", weights="none")
    (tmp_path / "matrix.json").write_text(json.dumps(
        {"not_run": [{"arm": "binary without extra COVID (noextra)", "reason": "no extra_covid_dir given"}]}))
    return tmp_path


def verdicts(table: pd.DataFrame) -> dict[str, str]:
    return {claim.split(" ", 1)[0]: v for claim, v in zip(table.claim, table.verdict)}


def test_load_runs_reads_old_and_new_params(tmp_path):
    make_run(tmp_path, weights=CHEST, extra_covid_train=False)
    old = tmp_path / "old"
    old.mkdir()
    (old / "params.json").write_text(json.dumps({"task": "multiclass", "loss": "focal", "weights": "none", "seed": 3}))
    (old / "status").write_text("failed: killed\n")
    runs = results.load_runs(tmp_path).set_index("run")
    assert runs.loc["old", "extra_covid_train"] and runs.loc["old", "init"] == "random init"  # before the axis: True
    new = runs.drop(index="old").iloc[0]
    assert not new.extra_covid_train and new.init_family == "chest_xray" and new.classes == BINARY
    assert new.covid_recall_wilson[0] < new.covid_recall < new.covid_recall_wilson[1]
    assert 0 < new.majority_accuracy < 1


def test_fmt_ci():
    assert results.fmt_ci(0.46, (0.29, 0.65)) == "0.460 (0.290–0.650)"
    assert results.fmt_ci(0.0123, [-0.03, 0.051], signed=True) == "+0.012 (−0.030 to +0.051)"
    assert results.fmt_ci(None) == "–" and results.fmt_ci(float("nan"), (0.1, 0.2)) == "–"
    assert results.fmt_ci(np.float64(0.5), (None, None)) == "0.500"


def test_pairs_only_runs_differing_in_the_factor(matrix):
    runs = results.load_runs(matrix)
    pairs = results.matched_pairs(runs, "loss", "focal", "ce")
    assert len(pairs) == 4  # 2 inits x 2 seeds; the failed focal run has no partner
    for _, p in pairs.iterrows():  # same seed and init on both sides
        a, b = (runs.set_index("run_dir").loc[p[f"run_dir_{s}"]] for s in "ab")
        assert (a.seed, a.init, a.loss, b.loss) == (b.seed, b.init, "focal", "ce")
    assert results.matched_pairs(runs, "init_family", "chest_xray", "imagenet").shape[0] == 4
    assert results.matched_pairs(runs, "loss", "focal", "weighted_ce").empty


def test_identical_runs_give_no_evidence_and_a_planted_better_run_is_found(matrix):
    runs = results.load_runs(matrix)
    same = results.paired(runs, "loss", "focal", "ce", n_boot=200)
    assert same.loc[0, "pairs"] == 4 and same.loc[0, "macro_f1_difference"] == 0
    low, high = same.loc[0, "macro_f1_ci"]
    assert low <= 0 <= high and same.loc[0, "interval"] == "contains 0"
    text = results.describe(same, "focal", "ce")
    assert "no evidence of a difference" in text and "By seed: seed 0: +0.000, seed 1: +0.000; ahead in 0 of 2 seeds" in text
    better = results.paired(runs, "init_family", "chest_xray", "imagenet", n_boot=200)
    assert better.loc[0, "macro_f1_ci"][0] > 0 and better.loc[0, "interval"] == "above 0"
    assert all(p < 0.001 for p in better.loc[0, "mcnemar_p"])
    assert "chest X-ray scored higher" in results.describe(better, "chest X-ray", "ImageNet")
    assert "Δ macro-F1" in results.comparison_table(better).columns
    assert "cannot be made" in results.describe(results.paired(runs, "loss", "focal", "x"), "focal", "x")


def test_init_comparison_takes_the_papers_pair_else_says_which(matrix):
    runs = results.load_runs(matrix)
    pairs, text = results.init_comparison(runs, n_boot=200)
    assert pairs.loc[0, "interval"] == "above 0" and text.startswith("binary task: chest-X-ray initialisation")
    no_imagenet = runs[runs.init_family != "imagenet"]
    no_imagenet = pd.concat([no_imagenet, runs[runs.init_family == "imagenet"].assign(init_family="random")])
    pairs, text = results.init_comparison(no_imagenet, n_boot=200)
    assert text.startswith("Initialisations with complete runs: chest-X-ray, random; so the chest-X-ray "
                           "initialisation is compared with the random initialisation.") and len(pairs) == 1
    pairs, text = results.init_comparison(runs[runs.init_family == "imagenet"])
    assert pairs.empty and "Fewer than two initialisations have complete runs (ImageNet)" in text
    assert results.comparison_table(pairs).empty


def test_claims_table_verdicts(matrix):
    runs = results.load_runs(matrix)
    table = results.claims_table(runs, results.read_not_run(matrix), n_boot=200)
    assert list(table.task.unique()) == ["binary"]
    found = verdicts(table)
    assert found["(a)"] == "supported"
    assert found["(b)"] == "no evidence of a difference"
    assert found["(c)"].startswith("not testable here (no complete run without weighted sampling")
    assert found["(b′)"].startswith("not testable here (binary without extra COVID (noextra): no extra_covid_dir")
    assert found["(c′)"].startswith("not testable here (binary without extra COVID (noextra): no extra_covid_dir")
    assert found["(d)"] == "supported"  # focal · chest X-ray at 0.92 vs always non-COVID at 0.75


def test_claims_table_contrary_and_interaction(tmp_path):
    # ImageNet clearly better: (a) not supported. Focal beats CE only with extra COVID: the interaction is found.
    make_run(tmp_path, weights=CHEST, skill=0.6, pred_seed=1)
    make_run(tmp_path, weights="imagenet", skill=0.93, pred_seed=2)
    for extra, focal_skill in ((True, 0.95), (False, 0.6)):
        make_run(tmp_path, loss="focal", weights="none", extra_covid_train=extra, skill=focal_skill, pred_seed=3)
        make_run(tmp_path, loss="ce", weights="none", extra_covid_train=extra, skill=0.6, pred_seed=4)
    found = verdicts(results.claims_table(results.load_runs(tmp_path), n_boot=400))
    assert found["(a)"] == "not supported"
    assert found["(b′)"] == "supported"
    assert found["(c)"].startswith("not testable here")
    make_run(tmp_path, "failed: CUDA out of memory", weighted_sampler=False)
    found = verdicts(results.claims_table(results.load_runs(tmp_path), n_boot=20))
    assert found["(c)"] == "not testable here (no complete run without weighted sampling (failed: CUDA out of memory))"


def test_arms_and_run_tables(matrix):
    runs = results.load_runs(matrix)
    arms = results.arms_table(runs, results.read_not_run(matrix))
    assert arms.complete.sum() == 8 and arms["not complete"].sum() == 1
    assert arms.note.iloc[-1] == "not run: no extra_covid_dir given"
    assert "out of memory" in " ".join(arms.note)
    table = results.run_table(runs)
    assert list(table.columns[:4]) == ["arm", "task", "loss", "init"] and len(table) == 9 and table.shape[1] <= 9
    assert "extra COVID in training" in table.columns  # headers in words
    assert set(table.arm) == {"paper set-up"}
    paper = results.paper_table(runs, "binary")
    assert paper.shape[1] <= 8 and "failed: out of memory" in set(paper.status)
    assert paper.loc[("ce", "ImageNet", "yes", 0), "accuracy"].count("(") == 1  # value (low–high)
    assert set(results.class_table(runs, "binary").columns) == {"precision", "recall", "specificity", "F1"}



def test_the_results_command_prints_the_runs_and_the_claims(matrix, capsys):
    """What a matrix found took papermill and chapter 05 to see: `python -m cxrlib results RUN_ROOT` prints it."""
    from cxrlib import cli

    assert cli.main(["results", str(matrix)]) == 0
    out = capsys.readouterr().out
    header, *rows = out.split("\n\n")[0].splitlines()
    for column in ("loss", "init", "seed", "status", "macro-F1", "ROC AUC", "COVID-19 sensitivity"):
        assert column in header, column  # the task is binary in every row: said once, below
    assert len(rows) == 9 + 1 and sum(" complete " in r for r in rows) == 8 and "failed: out of memory" in rows[-2]
    assert rows[-1] == "Same in every row: arm = paper set-up; task = binary; extra COVID in training = True; " \
                       "image size (px) = 32; epochs = 1."
    assert "(a) chest-X-ray (CheXNet) pretraining beats ImageNet initialisation [binary]: supported; Δ macro-F1" in out
    assert "(b) focal loss beats cross-entropy [binary]: no evidence of a difference; " in out
    assert "[binary]: not testable here (binary without extra COVID (noextra): no extra_covid_dir given" in out
    assert cli.main(["results", str(matrix), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["runs"]) == 9 and {"task", "seed", "status", "macro_f1", "roc_auc"} <= set(found["runs"][0])
    assert [r["macro_f1"] is None for r in found["runs"]].count(True) == 1  # the failed run has no score
    chapter = results.claims_table(results.load_runs(matrix), results.read_not_run(matrix))  # chapter 05's
    assert verdicts(pd.DataFrame(found["claims"])) == verdicts(chapter)


def test_the_results_command_names_a_folder_without_runs(tmp_path, capsys):
    from cxrlib import cli

    make_run(tmp_path / "synthetic")
    for root, said in ((tmp_path / "nope", f"RUN_ROOT: no such folder: {tmp_path / 'nope'}"),
                       (tmp_path, f"{tmp_path}: no run folder in it; {tmp_path / 'synthetic'} hold(s) run folders; "
                                  "give the folder that holds the run folders")):
        assert cli.main(["results", str(root)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"cxrlib results: error: {said}"), err


def test_debiasing_arm_pairs_on_extra_negatives(tmp_path):
    plain = make_run(tmp_path, extra_negatives="", pred_seed=1)
    debiased = make_run(tmp_path / "debiased", extra_negatives="/data/nih", pred_seed=1)  # same name, own root
    runs = pd.concat([results.load_runs(tmp_path), results.load_runs(tmp_path / "debiased")], ignore_index=True)
    assert list(runs.debiased) == [False, True]
    pairs = results.matched_pairs(runs, "debiased", True, False)
    assert list(zip(pairs.run_dir_a, pairs.run_dir_b)) == [(str(debiased), str(plain))]
    same_loss = results.matched_pairs(runs, "loss", "ce", "ce")  # the negatives are part of what a run is
    assert (same_loss.run_dir_a == same_loss.run_dir_b).all()


def test_read_not_run_keeps_reason_and_command(tmp_path):
    assert results.read_not_run(tmp_path) == []
    (tmp_path / "matrix.json").write_text(json.dumps({"not_run": [
        {"arm": "chest_xray", "reason": "no ChestX-ray14", "command": "python -m cxrlib.runs --chestxray14-dir X"},
        {"arm": "imagenet"}]}))
    assert results.read_not_run(tmp_path) == [
        {"arm": "chest_xray", "reason": "no ChestX-ray14", "command": "python -m cxrlib.runs --chestxray14-dir X"},
        {"arm": "imagenet", "reason": "no reason recorded", "command": ""}]


def test_narrow_says_the_constant_levels_and_columns_once():
    index = pd.MultiIndex.from_tuples([("ce", "random", "yes", 0), ("focal", "random", "yes", 0)],
                                      names=["loss", "init", "extra COVID", "seed"])
    frame = pd.DataFrame({"status": ["complete", "complete"], "accuracy": ["0.5", "0.6"]}, index=index)
    shown, same = results.narrow(frame)
    assert shown.index.names == ["loss"] and shown.columns.tolist() == ["accuracy"]
    assert same == "Same in every row: init = random; extra COVID = yes; seed = 0; status = complete."
    one, text = results.narrow(frame.iloc[:1])
    assert one.equals(frame.iloc[:1]) and text == ""
    alike = frame.assign(accuracy="0.5")
    assert results.narrow(alike)[0].shape[1] == 1  # one column always stays


def test_claim_c_pairs_the_unweighted_arm_and_every_claim_says_its_seeds_and_p(tmp_path):
    """Claim (c) pairs the paper set-up with the unweighted arm; that arm stays out of the paper's tables; every
    verdict shows its seed count; the family's p-values are Holm-adjusted; claims.json reads back."""
    for seed in (0, 1):
        make_run(tmp_path, weights="none", seed=seed, skill=0.9, pred_seed=seed)
        make_run(tmp_path, weights="none", seed=seed, weighted_sampler=False, skill=0.55, pred_seed=20 + seed)
    runs = results.load_runs(tmp_path)
    assert sorted(runs.arm) == ["paper set-up"] * 2 + ["paper set-up, without weighted sampling"] * 2
    assert len(results.paper_table(runs, "binary")) == 2  # the paper's tables: its own arm only
    table = results.claims_table(runs, n_boot=200)
    row = table[table.claim.str.startswith("(c)")].iloc[0]
    assert row.verdict == "supported" and row.seeds == "2 seeds (0, 1)" and row.p < 0.05
    assert "ahead in 2 of 2 seeds" in row.result and row.metric == "COVID-19 sensitivity"
    tested = [p for p in table["p"] if p == p]
    assert table["p (Holm)"].dropna().ge(pd.Series(tested).values).all()  # Holm never lowers a p
    assert (table.seeds != "").all() and not table.seeds.isna().any()
    shown = results.claims_for_reading(table)
    assert shown["p"].str.match(r"^(–|< 0\.001|> 0\.99|0\.[0-9]+)$").all()
    path = results.save_claims(table, runs, tmp_path / "claims.json")
    back = results.read_claims(path)
    assert back["runs"]["seeds"] == [0, 1] and len(back["claims"]) == len(table)
    assert back["claims"][3]["verdict"] == "supported" and "Holm" in back["holm"]
    assert back["bootstrap"] == {"n_boot": 1000, "seed": 0}  # what `cxrlib verify` recomputes with
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CXRError, match="bad.json"):
        results.read_claims(tmp_path / "bad.json")


def test_arm_names_are_words():
    assert results.arm_name({}) == "paper set-up"
    assert results.arm_name({"extra_negatives": "/n", "preprocess": "clahe"}) == "adult negatives + CLAHE"
    assert results.arm_name({"hold_out": "country=italy"}) == "held-out source: country=italy"
    assert results.arm_name({"preprocess": "lungs_removed", "weighted_sampler": True}) == "lungs removed"
    assert results.arm_name({"weighted_sampler": False}) == "paper set-up, without weighted sampling"
    assert Weights.parse("none").label == "random init"


def test_rerun_noise_pairs_a_rerun_recorded_before_a_field_existed_or_scored_on_an_external_set(tmp_path):
    """The same configuration and seed made twice: once by older code that recorded no `cohort` and scored no
    external set, once by newer code. They are one run made twice; another seed or loss is not."""
    make_run(tmp_path / "old", skill=0.8, pred_seed=3)
    make_run(tmp_path / "old", loss="focal", skill=0.8, pred_seed=4)
    make_run(tmp_path / "new", skill=0.8, pred_seed=5, cohort="all", external="nih=/somewhere")
    make_run(tmp_path / "new", seed=1, skill=0.8, pred_seed=5, cohort="all")
    noise = results.rerun_noise(results.load_runs(tmp_path / "new"), results.load_runs(tmp_path / "old"), n_boot=50)
    assert list(noise.run) == ["binary-ce-imagenet-0-True-True"] and noise.iloc[0]["images called differently"] > 0
    assert results.noise_sentence(noise).startswith("In 1 of 1 pairs the run trained again called some test images")
    make_run(tmp_path / "other", skill=0.8, pred_seed=3, cohort="adults")
    assert results.rerun_noise(results.load_runs(tmp_path / "new"), results.load_runs(tmp_path / "other")).empty



def test_mcnemar_p_values_read_as_p_values():
    """Neither "p = 1" nor "p = 9.6e-05": each pair's p in fmt_p's words, with its own sign."""
    row = {"task": "binary", "macro_f1_ci": (-0.1, 0.1), "macro_f1_difference": 0.0, "units": [0], "pairs": 3,
           "images": 10, "commits": "one clean commit abc1234", "mcnemar_p": (1.0, 9.6e-05, 0.25),
           "macro_f1_per_seed": [0.0], "macro_f1_ahead": 0}
    said = results.describe(pd.DataFrame([row]), "focal", "ce")
    assert "per pair: p > 0.99, p < 0.001, p = 0.25." in said
