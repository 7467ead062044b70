"""cxrlib.metrics on small hand-checked cases (every expected value below is worked out by hand)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from pytest import approx

from cxrlib import CXRError
from cxrlib import metrics as M

BINARY = ("non_covid", "covid")
MULTI = ("covid", "pneumonia", "normal")


def table(y, yhat_or_probs, classes, patients=None):
    """A predictions table from labels and either predicted labels (-> peaked probs) or probabilities."""
    y = np.asarray(y)
    probs = np.asarray(yhat_or_probs, dtype=float)
    if probs.ndim == 1:  # predicted labels: 0.8 on the prediction, the rest spread evenly
        k = len(classes)
        probs = np.full((len(y), k), 0.2 / (k - 1))
        probs[np.arange(len(y)), yhat_or_probs] = 0.8
    rows = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(len(y))],
        "patient_id": patients if patients is not None else [f"p{i}" for i in range(len(y))],
        "label": "ignored",
    })
    return M.predictions_table(rows, probs, classes, y)


def from_confusion(cm):
    """(y, yhat) lists realising confusion matrix `cm` (rows = true, columns = predicted)."""
    pairs = [(t, p) for t, row in enumerate(cm) for p, n in enumerate(row) for _ in range(n)]
    return [t for t, _ in pairs], [p for _, p in pairs]


def random_table(n_patients, seed, images_per_patient=3, classes=MULTI):
    """A noisy but informative model on `n_patients` patients."""
    rng = np.random.default_rng(seed)
    n = n_patients * images_per_patient
    y = rng.integers(0, len(classes), n)
    logits = rng.normal(size=(n, len(classes)))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return table(y, probs, classes, patients=[f"p{i // images_per_patient}" for i in range(n)])


def test_predictions_table_columns_and_names():
    pred = table([1, 0], [[0.3, 0.7], [0.6, 0.4]], BINARY)
    assert list(pred.columns) == ["image_id", "patient_id", "true", "pred", "p_non_covid", "p_covid"]
    assert pred["true"].tolist() == ["covid", "non_covid"] and pred["pred"].tolist() == ["covid", "non_covid"]
    with pytest.raises(CXRError, match="same order"):
        M.predictions_table(pred.iloc[:1], np.ones((2, 2)) / 2, BINARY, np.array([0, 1]))
    with pytest.raises(CXRError, match="softmax"):
        M.predictions_table(pred, np.array([[2.0, -1.0], [0.5, 0.1]]), BINARY, np.array([1, 0]))
    with pytest.raises(CXRError, match="row 1 are NaN"):
        M.compute_metrics(pred.assign(p_covid=[0.7, np.nan]), BINARY, n_boot=0)
    with pytest.raises(CXRError, match="not classes"):
        M.compute_metrics(pred.assign(true=["covid", "cat"]), BINARY, n_boot=0)


def test_binary_confusion_by_hand():
    # true non_covid: 4 right, 2 called covid; true covid: 1 missed, 3 found
    y, yhat = from_confusion([[4, 2], [1, 3]])
    m = M.compute_metrics(table(y, yhat, BINARY), BINARY, n_boot=0)
    assert m["confusion"] == {"labels": list(BINARY), "matrix": [[4, 2], [1, 3]]}
    assert m["per_class"]["covid"] == approx(
        {"precision": 3 / 5, "recall": 3 / 4, "specificity": 4 / 6, "f1": 2 / 3, "support": 4})
    assert m["per_class"]["non_covid"] == approx(
        {"precision": 4 / 5, "recall": 4 / 6, "specificity": 3 / 4, "f1": 8 / 11, "support": 6})
    assert m["accuracy"] == approx(7 / 10)
    assert m["balanced_accuracy"] == approx(17 / 24)
    assert m["macro_f1"] == approx(23 / 33) and m["macro"]["f1"] == approx(23 / 33)
    assert m["weighted_f1"] == approx((6 * 8 / 11 + 4 * 2 / 3) / 10)
    assert m["macro"]["precision"] == approx(0.7) and m["weighted"]["recall"] == approx(0.7)
    assert (m["covid_sensitivity"], m["covid_specificity"]) == approx((3 / 4, 4 / 6))
    assert m["n"] == 10 and m["ci"] == {}


def test_three_class_confusion_by_hand():
    cm = [[2, 1, 0], [1, 3, 1], [0, 1, 4]]  # rows: true covid, pneumonia, normal
    y, yhat = from_confusion(cm)
    m = M.compute_metrics(table(y, yhat, MULTI), MULTI, n_boot=0)
    assert m["confusion"]["matrix"] == cm
    assert m["per_class"]["covid"] == approx(
        {"precision": 2 / 3, "recall": 2 / 3, "specificity": 9 / 10, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["pneumonia"] == approx(
        {"precision": 3 / 5, "recall": 3 / 5, "specificity": 6 / 8, "f1": 3 / 5, "support": 5})
    assert m["per_class"]["normal"] == approx(
        {"precision": 4 / 5, "recall": 4 / 5, "specificity": 7 / 8, "f1": 4 / 5, "support": 5})
    assert m["accuracy"] == approx(9 / 13)
    assert m["balanced_accuracy"] == approx(31 / 45) and m["macro_f1"] == approx(31 / 45)
    assert (m["covid_sensitivity"], m["covid_specificity"]) == approx((2 / 3, 9 / 10))


@pytest.mark.parametrize("classes", [BINARY, MULTI])
def test_auc_perfect_and_reversed(classes):
    y = np.arange(12) % len(classes)
    onehot = np.eye(len(classes))[y]
    perfect = M.compute_metrics(table(y, onehot, classes), classes, n_boot=0)
    reversed_ = M.compute_metrics(table(y, (1 - onehot) / (len(classes) - 1), classes), classes, n_boot=0)
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == 1.0
    assert all(v == 1.0 for v in perfect["roc_auc_per_class"].values())
    assert reversed_["roc_auc"] == 0.0
    assert all(v == 0.0 for v in reversed_["roc_auc_per_class"].values())


def test_class_absent_from_truth_does_not_crash():
    y = [0, 0, 2, 2, 2, 0]  # no pneumonia in the test set, yet predicted once
    yhat = [0, 1, 2, 2, 2, 0]
    m = M.compute_metrics(table(y, yhat, MULTI), MULTI, n_boot=50)
    assert m["roc_auc_per_class"]["pneumonia"] is None and m["pr_auc_per_class"]["pneumonia"] is None
    assert m["roc_auc"] == approx(np.mean([m["roc_auc_per_class"]["covid"], m["roc_auc_per_class"]["normal"]]))
    assert m["per_class"]["pneumonia"]["recall"] is None and m["per_class"]["pneumonia"]["support"] == 0
    assert m["per_class"]["pneumonia"]["f1"] == 0.0  # predicted but never true: a wrong call counts
    assert m["balanced_accuracy"] == approx((2 / 3 + 1) / 2)  # over the classes present
    no_covid = M.compute_metrics(table([0, 0, 0], [0, 1, 0], BINARY), BINARY, n_boot=20)
    assert no_covid["roc_auc"] is None and no_covid["covid_sensitivity"] is None
    assert no_covid["covid_specificity"] == approx(2 / 3) and no_covid["ci"]["roc_auc"] == [None, None]


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    pred = random_table(60, seed=1)
    m = M.compute_metrics(pred, MULTI, n_boot=200, seed=3)
    assert set(m["ci"]) == set(M.HEADLINE)
    for name, (low, high) in m["ci"].items():
        assert low <= m[name] <= high, name
    assert M.compute_metrics(pred, MULTI, n_boot=200, seed=3)["ci"] == m["ci"]
    assert M.compute_metrics(pred, MULTI, n_boot=200, seed=4)["ci"] != m["ci"]


def test_bootstrap_ci_narrower_with_more_patients():
    def width(n_patients):
        low, high = M.compute_metrics(random_table(n_patients, seed=2), MULTI, n_boot=200)["ci"]["accuracy"]
        return high - low

    assert width(400) < width(40) / 2  # sqrt(10) ~ 3.2 times narrower in theory


def test_bootstrap_resamples_whole_patients():
    patients = ["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 2  # unequal sizes: rows are not drawn alone
    counts = M.bootstrap_counts(patients, n_boot=50, seed=0)
    assert counts.shape == (50, len(patients))
    for row in counts:
        for p in set(patients):
            rows = [i for i, q in enumerate(patients) if q == p]
            assert len(set(row[rows])) == 1  # all images of a patient appear equally often
        draws_per_patient = {p: row[patients.index(p)] for p in set(patients)}
        assert sum(draws_per_patient.values()) == 4  # four patients drawn, whatever their sizes
    assert len({tuple(row) for row in counts}) > 10  # resamples differ
    # All images from one patient: every resample is the whole set, so the interval collapses.
    y, yhat = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1]
    one_patient = M.compute_metrics(table(y, yhat, BINARY, patients=["x"] * 6), BINARY, n_boot=100)
    assert one_patient["ci"]["accuracy"] == approx([4 / 6, 4 / 6]) and one_patient["n_patients"] == 1
    per_image = M.compute_metrics(table(y, yhat, BINARY), BINARY, n_boot=100)
    assert per_image["ci"]["accuracy"][1] - per_image["ci"]["accuracy"][0] > 0.2


def test_ece_zero_when_calibrated_and_hand_value():
    # 4 images said 75 % (3 right) and 1 said 100 % (right): calibrated
    probs = np.array([[0.25, 0.75]] * 4 + [[0.0, 1.0]])
    ece, curve = M.calibration(np.array([1, 1, 1, 0, 1]), probs)
    assert ece == approx(0.0)
    assert curve["counts"][7] == 4 and curve["counts"][9] == 1 and curve["accuracy"][7] == approx(0.75)
    assert curve["accuracy"][0] is None and curve["bin_centers"][0] == approx(0.05)
    # 3 said 90 % all right (gap 0.1), 1 said 60 % and wrong (gap 0.6): ECE = 3/4 * 0.1 + 1/4 * 0.6
    probs = np.array([[0.1, 0.9]] * 3 + [[0.6, 0.4]])
    ece, curve = M.calibration(np.array([1, 1, 1, 1]), probs)
    assert ece == approx(0.225)
    assert curve["confidence"][9] == approx(0.9) and curve["accuracy"][6] == 0.0
    m = M.compute_metrics(table([1, 1, 1, 1], probs, BINARY), BINARY, n_boot=0)
    assert m["ece"] == approx(0.225) and m["reliability"] == curve


def test_threshold_for_sensitivity_reaches_target():
    p_covid = np.r_[np.linspace(0.05, 0.95, 20), np.linspace(0.0, 0.6, 30)]  # 20 covid, 30 others
    y = np.r_[np.ones(20, int), np.zeros(30, int)]
    val = table(y, np.c_[1 - p_covid, p_covid], BINARY)
    t = M.threshold_for_sensitivity(val, target=0.95)
    assert t == approx(np.linspace(0.05, 0.95, 20)[1])  # 19 of 20 covid at or above: the 2nd lowest
    sens = lambda thr: (p_covid[:20] >= thr).mean()  # noqa: E731
    assert sens(t) >= 0.95 and sens(t + 1e-9) < 0.95  # the highest such threshold
    m = M.compute_metrics(val, BINARY, n_boot=50, threshold=t)
    assert m["at_threshold"]["threshold"] == t and m["at_threshold"]["covid_sensitivity"] >= 0.95
    assert "roc_auc" not in m["at_threshold"]["ci"] and "covid_sensitivity" in m["at_threshold"]["ci"]
    with pytest.raises(CXRError, match="no 'covid'"):
        M.threshold_for_sensitivity(val[val["true"] != "covid"])


def test_apply_threshold_multiclass_and_binary():
    probs = [[0.30, 0.50, 0.20], [0.10, 0.30, 0.60], [0.60, 0.10, 0.30]]
    pred = table([0, 2, 0], probs, MULTI)
    assert M.apply_threshold(pred, 0.25, MULTI)["pred"].tolist() == ["covid", "normal", "covid"]
    assert M.apply_threshold(pred, 0.65, MULTI)["pred"].tolist() == ["pneumonia", "normal", "normal"]
    assert pred["pred"].tolist() == ["pneumonia", "normal", "covid"]  # the input is left alone
    binary = table([1, 0], [[0.7, 0.3], [0.9, 0.1]], BINARY)
    assert M.apply_threshold(binary, 0.3, BINARY)["pred"].tolist() == ["covid", "non_covid"]


def test_majority_baseline():
    base = M.majority_baseline([2, 2, 2, 0, 1], np.array([2, 2, 2, 0, 1]), MULTI)
    # always "normal": 3 of 5 right; F1 normal = 2*0.6*1/1.6 = 0.75, the others 0
    assert base == approx({"class": "normal", "accuracy": 0.6, "balanced_accuracy": 1 / 3, "macro_f1": 0.25})
    assert M.majority_baseline(["covid", "non_covid", "non_covid"], ["covid"], BINARY)["accuracy"] == 0.0


def test_metrics_json_round_trip_and_atomic_save(tmp_path):
    m = M.compute_metrics(table([0, 0, 2, 2], [0, 1, 2, 2], MULTI), MULTI, n_boot=30, threshold=0.5)
    assert json.loads(json.dumps(m, allow_nan=False)) == m  # plain types, NaN already None
    extra = {"params": {"seed": 0, "task": "multiclass"}, "data_fingerprint": "abc", **M.provenance("cpu")}
    path = M.save_metrics(m, tmp_path / "run" / "metrics.json", extra)
    assert json.loads(path.read_text()) == {**m, **json.loads(json.dumps(extra))}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left
    with pytest.raises(CXRError, match="overwrite"):
        M.save_metrics(m, path, {"accuracy": 1.0})


def test_provenance(monkeypatch):
    prov = M.provenance("cuda:0")
    assert prov["device"] == "cuda:0"
    assert set(prov["packages"]) == {"torch", "torchvision", "numpy", "sklearn", "cxrlib"}
    assert prov["packages"]["cxrlib"] and prov["python"].count(".") == 2
    assert socket.gethostname() not in json.dumps(prov)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(M.subprocess, "run", no_git)
    assert M.provenance("cpu")["git_commit"] is None and M.provenance("cpu")["git_dirty"] is None


def test_multilabel_auroc_constant_column():
    y = np.array([[0, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0]])
    p = np.array([[0.1, 0.5, 0.2], [0.9, 0.5, 0.4], [0.8, 0.5, 0.3], [0.2, 0.5, 0.1]])
    out = M.multilabel_auroc(y, p, ["Atelectasis", "Hernia", "Mass"])
    assert out["per_finding"] == {"Atelectasis": 1.0, "Hernia": None, "Mass": 0.5}
    assert out["mean"] == approx(0.75) and out["n"] == 4
    with pytest.raises(CXRError, match="must both be"):
        M.multilabel_auroc(y, p[:, :2], ["a", "b", "c"])


def test_auroc_is_the_probability_a_positive_outranks_a_negative():
    # positives 0.9, 0.4, 0.4 vs negatives 0.4, 0.2: 0.9 wins 2, each 0.4 ties one (1/2) and wins one -> 5 of 6
    pred = table([1, 1, 1, 0, 0], [[0.1, 0.9], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.8, 0.2]], BINARY)
    assert M.compute_metrics(pred, BINARY, n_boot=0)["roc_auc"] == approx(5 / 6)
    # and on random scores with ties, against the brute-force count over every (positive, negative) pair
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    p = np.round(rng.random(80) * 0.5 + 0.3 * y, 1)  # rounding makes ties
    wins = (p[y == 1][:, None] > p[y == 0][None, :]) + 0.5 * (p[y == 1][:, None] == p[y == 0][None, :])
    assert M.compute_metrics(table(y, np.c_[1 - p, p], BINARY), BINARY, n_boot=0)["roc_auc"] == approx(wins.mean())


def test_wilson_interval_does_not_collapse_at_0_and_1():
    assert M.wilson_interval(0, 10) == approx([0.0, 0.2775], abs=1e-4)
    assert M.wilson_interval(10, 10) == approx([0.7225, 1.0], abs=1e-4)
    assert M.wilson_interval(3, 10) == approx([0.1078, 0.6032], abs=1e-4)  # textbook value
    assert M.wilson_interval(0, 0) == [None, None]
    # A perfect COVID detector: the bootstrap interval of its sensitivity is [1, 1], Wilson's is not.
    y = [1] * 8 + [0] * 12
    m = M.compute_metrics(table(y, y, BINARY), BINARY, n_boot=200)
    assert m["ci"]["covid_sensitivity"] == [1.0, 1.0]
    low, high = m["wilson"]["covid_sensitivity"]
    assert high == approx(1.0) and 0.6 < low < 0.7  # 8 of 8: Wilson lower bound 0.676
    assert m["ci_info"]["proportions"].startswith("wilson")


def test_wilson_per_class_from_the_confusion_matrix():
    y, yhat = from_confusion([[4, 2], [1, 3]])
    wilson = M.compute_metrics(table(y, yhat, BINARY), BINARY, n_boot=0)["wilson"]
    assert wilson["per_class"]["covid"] == approx({"precision": M.wilson_interval(3, 5),
                                                    "recall": M.wilson_interval(3, 4),
                                                    "specificity": M.wilson_interval(4, 6)})
    assert wilson["per_class"]["non_covid"]["precision"] == approx(M.wilson_interval(4, 5))
    assert wilson["covid_specificity"] == wilson["per_class"]["covid"]["specificity"]


def test_vectorised_metrics_equal_sklearn_on_every_resample():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    pred = random_table(12, seed=7, images_per_patient=2)  # few patients: resamples often miss a class
    y, yhat, probs = M._arrays(pred, list(MULTI))
    counts = M.bootstrap_counts(pred["patient_id"], n_boot=40, seed=1)
    batch = M.headline_batch(y, yhat, probs, MULTI, counts)
    for b, row in enumerate(counts):
        i = np.repeat(np.arange(len(y)), row)
        with M._quiet():
            expected = {
                "accuracy": accuracy_score(y[i], yhat[i]),
                "macro_f1": f1_score(y[i], yhat[i], labels=[0, 1, 2], average="macro", zero_division=np.nan),
                "balanced_accuracy": balanced_accuracy_score(y[i], yhat[i]),
                "roc_auc": M._ovr(roc_auc_score, y[i], probs[i], list(MULTI))[0],
                "covid_sensitivity": (yhat[i][y[i] == 0] == 0).mean() if (y[i] == 0).any() else np.nan,
                "covid_specificity": (yhat[i][y[i] != 0] != 0).mean(),
            }
        for name, value in expected.items():
            assert batch[name][b] == approx(value, nan_ok=True), (name, b)


def test_vectorised_bootstrap_matches_the_loop_it_replaced():
    """Same intervals as resampling patients one draw at a time with scikit-learn, within Monte-Carlo noise."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = random_table(60, seed=3)
    y, yhat, _ = M._arrays(pred, list(MULTI))
    codes, uniques = pd.factorize(pred["patient_id"])
    rng = np.random.default_rng(11)
    loop = {"accuracy": [], "macro_f1": []}
    for _ in range(1000):
        i = np.repeat(np.arange(len(y)), np.bincount(rng.integers(0, len(uniques), len(uniques)),
                                                     minlength=len(uniques))[codes])
        loop["accuracy"].append(accuracy_score(y[i], yhat[i]))
        loop["macro_f1"].append(f1_score(y[i], yhat[i], average="macro"))
    ci = M.compute_metrics(pred, MULTI, n_boot=1000, seed=0)["ci"]
    for name, draws in loop.items():
        assert ci[name] == approx(np.percentile(draws, [2.5, 97.5]), abs=0.03), name


def test_mcnemar_exact_by_hand():
    a = np.array([True] * 8 + [False] * 1 + [True] * 5 + [False] * 3)
    b = np.array([False] * 8 + [True] * 1 + [True] * 5 + [False] * 3)
    out = M.mcnemar_exact(a, b)
    # 9 discordant pairs, 8 for a: two-sided binomial p = 2 * (1 + 9) / 2**9
    assert out == approx({"a_only_correct": 8, "b_only_correct": 1, "p_value": 20 / 512})
    assert M.mcnemar_exact(a, a)["p_value"] == 1.0


def planted(n_patients, seed, skill):
    """A binary model whose probability of the right class is high with chance `skill` per image."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    y = (np.arange(n) % 5 == 0).astype(int)  # 20 % covid
    right = rng.random(n) < skill
    p_true = np.where(right, rng.uniform(0.6, 0.95, n), rng.uniform(0.05, 0.4, n))
    p_covid = np.where(y == 1, p_true, 1 - p_true)
    return table(y, np.c_[1 - p_covid, p_covid], BINARY, patients=[f"p{i // 2}" for i in range(n)])


def test_paired_bootstrap_identical_runs_show_no_difference():
    run = planted(100, seed=0, skill=0.8)
    out = M.paired_bootstrap([(run, run.copy())], BINARY, n_boot=200)
    for name in M.PAIRED:
        assert out[name]["difference"] == 0 and out[name]["ci"] == [0.0, 0.0] and out[name]["ahead"] == 0
    assert out["pairs"][0]["mcnemar"]["p_value"] == 1.0 and out["n_images"] == [200]


def test_paired_bootstrap_finds_a_planted_better_run_and_pairs_by_image():
    pairs = [(planted(150, seed=s, skill=0.9), planted(150, seed=s + 10, skill=0.65)) for s in range(2)]
    out = M.paired_bootstrap(pairs, BINARY, n_boot=300)
    for name in M.PAIRED:
        low, high = out[name]["ci"]
        assert 0 < low <= out[name]["difference"] <= high, name
        assert out[name]["ahead"] == 2 and out[name]["a"] > out[name]["b"]
    assert all(p["mcnemar"]["p_value"] < 0.01 for p in out["pairs"])
    # Each pair is its own seed; the patient resample is shared, so the same seed gives the same interval.
    assert M.paired_bootstrap(pairs, BINARY, n_boot=300) == out
    # Only the images both runs saw are compared, and the count says so.
    a, b = pairs[0]
    part = M.paired_bootstrap([(a, b.iloc[::2])], BINARY, n_boot=50)
    assert part["n_images"] == [150]
    # A difference of differences: the same pair counted + and - is exactly 0.
    assert M.paired_bootstrap([pairs[0], pairs[0]], BINARY, n_boot=50, coef=[1, -1])["macro_f1"]["ci"] == [0, 0]


def test_paired_bootstrap_refuses_different_test_data():
    a = planted(20, seed=0, skill=0.8)
    with pytest.raises(CXRError, match="img3.*not the same test data"):
        M.paired_bootstrap([(a, a.assign(true=np.where(a.index == 3, "covid", a["true"])))], BINARY, n_boot=10)
    with pytest.raises(CXRError, match="no image in common"):
        M.paired_bootstrap([(a, a.assign(image_id=a["image_id"] + "x"))], BINARY, n_boot=10)
    with pytest.raises(CXRError, match="2 coefficients for 1 pairs"):
        M.paired_bootstrap([(a, a)], BINARY, n_boot=10, coef=[1, -1])


def test_holm_and_bootstrap_p():
    from cxrlib.metrics import bootstrap_p, holm

    adjusted = holm([0.01, 0.04, None, 0.03])
    assert adjusted[2] is None and adjusted[0] == pytest.approx(0.03)  # smallest of 3: times 3
    assert adjusted[3] == pytest.approx(0.06) and adjusted[1] == pytest.approx(0.06)  # step-down, monotone
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert bootstrap_p(np.full(999, 0.2)) == pytest.approx(2 / 1000)  # never 0
    assert bootstrap_p(np.linspace(-1, 1, 1001)) == 1.0
    assert bootstrap_p(np.array([np.nan])) is None


def test_held_out_images_are_scored_apart_from_the_own_test_split():
    """Issue 32: metrics.json's top level is the run's own test; each held-out population has a block of its own."""
    p_covid = [0.9, 0.8, 0.2, 0.1, 0.3, 0.7, 0.6, 0.4]  # own: 4 images ranked perfectly; held out: ranked backwards
    y = [1, 1, 0, 0, 1, 1, 0, 0]
    pred = table(y, np.c_[1 - np.array(p_covid), p_covid], BINARY)
    held = ["img4", "img5", "img6", "img7"]
    m = M.compute_metrics(pred, BINARY, n_boot=20, threshold=0.5, held_out=held)
    assert m["n"] == 4 and m["roc_auc"] == approx(1.0)
    assert set(m["held_out"]) == {"all", "covid", "non_covid"}
    assert m["held_out"]["all"]["n"] == 4 and m["held_out"]["all"]["roc_auc"] == approx(0.5)  # 2 of 4 pairs right
    assert m["held_out"]["covid"]["n"] == 2 and m["held_out"]["covid"]["roc_auc"] is None  # one class alone
    assert m["held_out"]["covid"]["at_threshold"]["covid_sensitivity"] == approx(0.5)  # 0.7 called, 0.3 missed
    assert "held_out" not in M.compute_metrics(pred, BINARY, n_boot=20, held_out=["elsewhere.png"])


def test_the_threshold_is_bounded_below_and_the_bound_is_flagged():
    low = M.bounded_threshold(0.00065)
    assert low == {"threshold": M.MIN_THRESHOLD, "unbounded_threshold": 0.00065, "bound": M.MIN_THRESHOLD,
                   "at_bound": True}
    assert M.bounded_threshold(0.3) == {**low, "threshold": 0.3, "unbounded_threshold": 0.3, "at_bound": False}
    p_covid = np.r_[np.full(19, 0.9), 0.001, np.full(30, 0.2)]  # one COVID-19 image the model is sure is not
    val = table(np.r_[np.ones(20, int), np.zeros(30, int)], np.c_[1 - p_covid, p_covid], BINARY)
    unbounded = M.threshold_for_sensitivity(val, target=1.0)
    assert unbounded == approx(0.001) and M.bounded_threshold(unbounded)["threshold"] == M.MIN_THRESHOLD


def test_pooled_auc_averages_the_runs_and_resamples_patients_once_for_all():
    y = [1, 1, 1, 0, 0, 0]
    good = table(y, np.c_[1 - np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]], BINARY)
    worse = table(y, np.c_[1 - np.array([0.9, 0.2, 0.7, 0.3, 0.8, 0.1]), [0.9, 0.2, 0.7, 0.3, 0.8, 0.1]], BINARY)
    one = M.pooled_auc([worse], n_boot=200)
    assert one["value"] == approx(6 / 9) and one["per_run"] == [approx(6 / 9)]  # 6 of 9 pairs ranked right
    both = M.pooled_auc([good, worse], n_boot=200)
    assert both["value"] == approx((1 + 6 / 9) / 2) and both["per_run"] == [approx(1.0), approx(6 / 9)]
    assert both["n_images"] == 6 and both["n_positive"] == 3 and both["n_patients"] == 6  # the same images twice
    low, high = both["ci"]
    assert low < both["value"] < high and high <= 1
    assert M.pooled_auc([good.iloc[:3]], n_boot=20)["value"] is None  # no negative: undefined, not a crash
    with pytest.raises(CXRError, match="lacks column"):
        M.pooled_auc([good.drop(columns="p_covid")])
