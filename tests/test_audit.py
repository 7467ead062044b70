"""audit.py: the shortcut probes (must flag a planted shortcut and only then), masking evaluation,
external-validation summary and subgroup metrics."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import audit, data, preprocess, synthetic
from cxrlib.errors import CXRError
from cxrlib.images import ImageCache
from cxrlib.metrics import compute_metrics
from cxrlib.models import build_model

SIZE = 64


@pytest.fixture(scope="module")
def synthetic_sets(tmp_path_factory):
    """The synthetic default without and with the planted corner marker: (table, images at 64 px) each."""
    base = tmp_path_factory.getbasetemp()
    cache = ImageCache(SIZE, root=base / "cxrlib-cache")
    sets = {}
    for shortcut in (False, True):
        folders = synthetic.ensure_synthetic(root=base / "cxrlib-data", shortcut=shortcut)
        table, _ = data.load_table(*map(str, folders), cache=cache)
        images, skipped = cache.load(table["path"].tolist())
        assert not skipped
        sets[shortcut] = (table, images)
    return sets


def test_border_probe_flags_the_planted_shortcut_only(synthetic_sets):
    """Borders and corners predict COVID when the marker is planted, and not without it.

    Without the plant the synthetic adults are a little brighter than the children (by design, like
    the real confound), so the probe may say "weak", but never "shortcut".
    """
    verdicts, adults = {}, {}
    for shortcut, (table, images) in synthetic_sets.items():
        result = audit.source_probe(table, images, n_permutations=0)
        result = result[result["subset"] == "all images"].set_index("features")
        verdicts[shortcut] = result.loc["border and corners"]
        assert result.loc["border and corners", "target"] == "covid label"
        # Among adults only (no age confound left), the borders know nothing of COVID without the plant.
        adult = (audit.origin(table) == "ieee8023").to_numpy()
        stats = audit.image_statistics(images[adult], parts=("border", "corners"))
        adults[shortcut] = audit.probe(stats, table["label"][adult] == "covid", table["patient_id"][adult])
    assert verdicts[True]["flagged"] and verdicts[True]["balanced_accuracy"] >= 0.95
    assert not verdicts[False]["flagged"] and verdicts[False]["balanced_accuracy"] < 0.8
    assert adults[True]["verdict"] == "shortcut" and adults[False]["verdict"] != "shortcut"
    assert adults[False]["balanced_accuracy"] < 0.7


def test_source_probe_reports_chance_and_origin(synthetic_sets):
    table, images = synthetic_sets[False]
    sizes = audit.original_sizes(table["path"])
    assert (sizes[["width", "height"]] > 0).all().all()
    result = audit.source_probe(table, images, sizes=sizes, n_permutations=0)
    assert (result.groupby("features", sort=False)["subset"].agg(list).to_dict() ==
            {"image statistics": ["all images", "non-COVID only"], "image statistics + file size":
             ["all images", "non-COVID only"], "border and corners": ["all images"]})
    # every COVID image is an adult: no origin to tell apart within COVID, and the table says so
    assert any("COVID only" in why for why in result.attrs["skipped"])
    result = result[result["subset"] == "all images"].set_index("features")
    row = result.loc["image statistics"]
    assert row["target"] == "origin" and row["n"] == len(table)
    origin = audit.origin(table)
    assert set(origin) == {"guangzhou", "ieee8023"}
    assert row["chance_accuracy"] == pytest.approx(origin.value_counts(normalize=True).max())
    assert row["chance_balanced_accuracy"] == 0.5
    # The synthetic sources differ by design (adult vs child anatomy and exposure): a real finding.
    assert row["flagged"]


def test_probe_on_noise_is_chance_and_on_a_clean_signal_is_flagged():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), 2)
    y = np.repeat(rng.integers(0, 2, 100), 2)
    noise = audit.probe(rng.normal(size=(200, 5)), y, groups)
    assert noise["verdict"] == "none" and abs(noise["balanced_accuracy"] - 0.5) < 0.1
    signal = audit.probe(np.c_[y + rng.normal(0, 0.1, 200), rng.normal(size=200)], y, groups)
    assert signal["verdict"] == "shortcut" and signal["auc"] > 0.99
    assert audit.verdict(0.65, 2) == "weak" and audit.verdict(0.64, 3) == "shortcut"
    with pytest.raises(CXRError, match="one value"):
        audit.probe(np.zeros((4, 1)), [1, 1, 1, 1], [0, 1, 2, 3])


def test_image_statistics_reads_borders_and_corners():
    images = np.zeros((2, 20, 20), np.uint8)
    images[1, :3, :3] = 255  # a marker in image 1's top-left corner
    stats = audit.image_statistics(images, border=0.1, corner=0.15)
    assert len(stats) == 2 and stats.shape[1] == 6 * 7  # whole, border, 4 corners x (mean, std, 5 percentiles)
    assert stats.loc[1, "corner_tl_mean"] == 255 and stats.loc[0, "corner_tl_mean"] == 0
    assert stats.loc[1, "corner_br_mean"] == 0 and stats.loc[1, "border_p95"] > 0
    with pytest.raises(CXRError, match="unknown image part"):
        audit.image_statistics(images, parts=("lungs",))


def test_evaluate_masked_returns_one_row_per_mode(synthetic_sets):
    table, _ = synthetic_sets[False]
    rows = table.groupby("label").head(3)
    torch.manual_seed(0)
    model, _ = build_model("resnet50", "none", num_classes=3)
    result = audit.evaluate_masked(model, rows, ImageCache(32), batch_size=9)
    assert list(result.index) == ["intact", "lungs_removed", "lungs_only"]
    assert {"accuracy", "macro_f1", "covid_sensitivity", "covid_specificity", "f1_retained"} <= set(result.columns)
    assert (result["n"] == len(rows)).all()
    assert result.loc["intact", "f1_retained"] == pytest.approx(1.0)
    as_predictions = rows.drop(columns="label").assign(true=rows["label"])  # a run's predictions.csv works too
    again = audit.evaluate_masked(model, as_predictions, ImageCache(32), modes=("intact",), batch_size=9)
    assert again.loc["intact", "accuracy"] == pytest.approx(result.loc["intact", "accuracy"])
    features = audit.backbone_features(model, np.zeros((2, 32, 32), np.uint8))
    assert features.shape == (2, 2048)


def test_external_validation_summary_reads_patient_cis():
    pred = pd.DataFrame({
        "image_id": list("abcdefgh"), "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5", "p6", "p7"],
        "true": ["covid"] * 4 + ["normal"] * 4,
        "pred": ["covid", "covid", "covid", "normal"] + ["normal"] * 3 + ["covid"],
    })  # fmt: skip
    pred["p_covid"] = (pred["pred"] == "covid") * 0.8 + 0.1
    pred["p_normal"] = 1 - pred["p_covid"]
    pred["p_pneumonia"] = 0.0
    summary = audit.external_validation_summary(compute_metrics(pred, ["covid", "pneumonia", "normal"], n_boot=200))
    assert summary.loc["covid_sensitivity", "value"] == pytest.approx(0.75)
    assert summary.loc["covid_specificity", "value"] == pytest.approx(0.75)
    assert summary.loc["covid_sensitivity", "n_images"] == 4 and summary.loc["covid_specificity", "n_images"] == 4
    assert (summary["ci_low"] <= summary["value"]).all() and (summary["value"] <= summary["ci_high"]).all()
    assert (summary["ci_unit"] == "patient").all()
    with pytest.raises(CXRError, match="no metrics file"):
        audit.external_validation_summary("/nonexistent/metrics.json")


def test_subgroup_metrics_on_a_small_table():
    table = pd.DataFrame({
        "image_id": list("abcdef"), "source": ["ieee8023"] * 4 + ["coronahack"] * 2,
        "view": ["PA", "PA", "AP", "AP Supine", "", ""], "sex": ["M", "F", "F", "M", "", ""],
        "age": [30, 65, 70, np.nan, np.nan, np.nan],
    })  # fmt: skip
    pred = pd.DataFrame({
        "image_id": list("abcdef"), "patient_id": ["1", "2", "3", "3", "k1", "k2"], "source": table["source"],
        "true": ["covid", "covid", "covid", "pneumonia", "normal", "normal"],
        "pred": ["covid", "normal", "covid", "covid", "normal", "normal"],
    })  # fmt: skip
    by_view = audit.subgroup_metrics(pred, table, "view").set_index("view")
    assert by_view.loc["PA", "n"] == 2 and by_view.loc["PA", "covid_sensitivity"] == 0.5
    assert np.isnan(by_view.loc["PA", "covid_specificity"])  # no non-COVID image in the group
    assert by_view.loc["unknown", "n"] == 2 and by_view.loc["unknown", "covid_specificity"] == 1.0
    by_age = audit.subgroup_metrics(pred, table, "age_band").set_index("age_band")
    assert set(by_age.index) == {"18-39", "60-79", "unknown"} and by_age.loc["60-79", "n"] == 2
    both = audit.subgroup_metrics(pred, table, ["source", "sex"])
    assert both["n"].sum() == 6 and {"source", "sex", "n_patients", "accuracy"} <= set(both.columns)
    assert by_view.loc["AP Supine", "covid_specificity"] == 0.0
    with pytest.raises(CXRError, match="no column"):
        audit.subgroup_metrics(pred, table, "hospital")


def test_conclusion_states_the_findings():
    probe = pd.DataFrame({
        "features": ["image statistics", "border and corners"], "target": ["origin", "covid label"],
        "balanced_accuracy": [0.92, 0.89], "chance_balanced_accuracy": [0.5, 0.5], "auc": [0.97, 0.95],
        "verdict": ["shortcut", "shortcut"], "flagged": [True, True],
    })  # fmt: skip
    masked = pd.DataFrame({"macro_f1": [0.8, 0.68], "covid_sensitivity": [0.9, 0.8], "covid_specificity": [0.98, 0.9]},
                          index=pd.Index(["intact", "lungs_removed"], name="mode"))
    text = audit.conclusion(probe, masked)
    assert "border and corners → covid label: balanced accuracy 0.890" in text and "85% retained" in text
    assert "suspect" in text and "border and corner statistics alone" in text and "keeps 85%" in text
    assert "still finds 80% of COVID-19" in text
    source_only = probe.iloc[:1]
    partial = masked.assign(macro_f1=[0.8, 0.5], covid_sensitivity=[0.9, 0.3])
    assert "Part of what the model uses" in audit.conclusion(source_only, partial)
    assert "suspect" in audit.conclusion(source_only, masked.assign(macro_f1=[0.8, 0.3]))  # COVID still found
    masked.loc["lungs_removed"] = [0.2, 0.1, 0.5]
    assert "loses most of its score" in audit.conclusion(source_only, masked)
    assert "could* use it. Only external" in audit.conclusion(source_only)
    assert "No shortcut was flagged" in audit.conclusion(source_only.assign(flagged=False, verdict="none"))


def test_permutation_null_rejects_a_signal_and_not_noise():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(60), 2)
    y = np.repeat(rng.integers(0, 2, 60), 2)
    noise = audit.probe(rng.normal(size=(120, 4)), y, groups, n_permutations=30)
    signal = audit.probe(np.c_[y + rng.normal(0, 0.5, 120), rng.normal(size=120)], y, groups, n_permutations=30)
    assert signal["p_value"] == pytest.approx(1 / 31) and signal["null_p95"] < signal["ci_low"]
    assert noise["p_value"] > 0.05 and noise["verdict"] == "none" and noise["n_permutations"] == 30
    assert noise["ci_low"] <= noise["balanced_accuracy"] <= noise["ci_high"]
    # a score the null reaches as easily is "none", however high
    assert audit.verdict(0.95, 2, p_value=0.2) == "none" and audit.verdict(0.95, 2, p_value=0.01) == "shortcut"
    permuted = audit.permute_by_group(y, groups, np.random.default_rng(0))
    assert (pd.Series(permuted).groupby(groups).nunique() == 1).all()  # a patient keeps one target
    assert sorted(permuted) == sorted(y)


def test_origin_probe_within_a_class_measures_origin_not_the_label():
    """Features that carry only the label: flagged on all images (origin = label there), not within a class."""
    rng = np.random.default_rng(0)
    n = 80
    label = np.array(["covid"] * 20 + ["pneumonia"] * 30 + ["normal"] * 30)
    origin = np.where(label == "covid", "ieee8023", np.where(np.arange(n) % 3 == 0, "ieee8023", "guangzhou"))
    origin[label == "covid"] = "ieee8023"
    table = pd.DataFrame({"label": label, "origin": origin, "patient_id": [f"p{i}" for i in range(n)]})
    features = np.c_[(label == "covid") * 3.0 + rng.normal(0, 0.3, n), rng.normal(size=n)]
    images = rng.integers(0, 255, (n, 16, 16)).astype(np.uint8)
    result = audit.source_probe(table, images, features=features, n_permutations=20).set_index(["features", "subset"])
    assert result.loc[("learned features", "non-COVID only"), "verdict"] == "none"
    assert result.loc[("learned features", "all images"), "balanced_accuracy"] > 0.6
    text = audit.conclusion(result.reset_index())
    assert "learned features → origin (non-COVID only)" in text and "p = " in text


def test_positive_control_finds_the_planted_marker_and_nothing_without_it(synthetic_sets):
    table, images = synthetic_sets[False]
    keep = (table["label"] != "covid").to_numpy()  # one class: the marker is the only difference
    stats = functools.partial(audit.image_statistics, parts=("border", "corners"))
    control = audit.positive_control(images[keep], table["patient_id"][keep], stats, n_permutations=20)
    assert control.loc["planted", "flagged"] and control.loc["planted", "p_value"] < 0.05
    assert not control.loc["not planted", "flagged"] and control.loc["not planted", "verdict"] != "shortcut"
    marked = preprocess.plant_marker(images[:2], np.array([True, False]))
    assert (marked[1] == images[1]).all() and (marked[0] != images[0]).any()


def test_masked_evaluation_has_cis_and_the_majority_baseline():
    masked = pd.DataFrame({"macro_f1": [0.8, 0.3], "macro_f1_ci_low": [0.7, 0.2], "macro_f1_ci_high": [0.9, 0.4],
                           "baseline_macro_f1": [0.31, 0.31], "covid_sensitivity": [0.9, 0.2],
                           "covid_specificity": [0.98, 0.9]}, index=pd.Index(["intact", "lungs_removed"], name="mode"))
    probe = pd.DataFrame({"features": ["image statistics"], "target": ["origin"], "balanced_accuracy": [0.6],
                          "chance_balanced_accuracy": [0.5], "auc": [0.6], "verdict": ["none"], "flagged": [False]})
    text = audit.conclusion(probe, masked)
    assert "no better" in text and "0.310 for always answering the majority class" in text
    assert "much of its score survives" not in text and "0.300 (0.200–0.400, 95% CI)" in text
    # 0.62 keeps 60% of the old ratio, but only (0.62-0.5)/(0.8-0.5) = 40% above a 0.5 baseline
    above = masked.assign(macro_f1=[0.8, 0.62], macro_f1_ci_low=[0.7, 0.55], baseline_macro_f1=[0.5, 0.5])
    assert "40% of its score above the baseline" in audit.conclusion(probe, above)
    assert "much of its score survives" not in audit.conclusion(probe, above)
    assert "much of its score survives" in audit.conclusion(probe, above.assign(macro_f1=[0.8, 0.7]))


def test_evaluate_masked_reports_cis_and_baseline(synthetic_sets):
    table, _ = synthetic_sets[False]
    rows = table.groupby("label").head(4)
    torch.manual_seed(0)
    model, _ = build_model("resnet50", "none", num_classes=3)
    result = audit.evaluate_masked(model, rows, ImageCache(32), batch_size=12, n_boot=20)
    assert {"macro_f1_ci_low", "macro_f1_ci_high", "baseline_macro_f1"} <= set(result.columns)
    assert (result["macro_f1_ci_low"] <= result["macro_f1"] + 1e-9).all()
    assert result["baseline_macro_f1"].iloc[0] == pytest.approx(1 / 6)  # one of three classes right, F1 0.5


def test_subgroups_get_wilson_intervals_and_small_groups_say_too_few():
    n = 30
    table = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "sex": ["M"] * 25 + ["F"] * 5,
                          "age": np.nan, "location": ["Milan, Italy"] * 30})
    pred = pd.DataFrame({"image_id": table["image_id"], "patient_id": table["image_id"],
                         "true": ["covid"] * 20 + ["normal"] * 10, "pred": ["covid"] * 15 + ["normal"] * 15})
    groups = audit.subgroup_metrics(pred, table, "sex").set_index("sex")
    m = groups.loc["M"]
    assert m["covid_sensitivity"] == 15 / 20 and m["covid_sensitivity_enough"]
    assert m["covid_sensitivity_ci_low"] < 0.75 < m["covid_sensitivity_ci_high"]
    assert audit.wilson(0, 10)[0] == 0 and audit.wilson(0, 10)[1] > 0.2  # 0/10 is not "exactly 0"
    shown = audit.format_subgroups(groups.reset_index()).set_index("sex")
    assert shown.loc["F", "covid_sensitivity"] == "none (n=0)"
    assert shown.loc["F", "covid_specificity"] == "too few to say (n=5)"
    assert shown.loc["M", "covid_sensitivity"].startswith("0.750 (0.") and shown.loc["M", "covid_sensitivity"].endswith(", n=20")
    assert "0.000" not in shown.to_string() and "nan" not in shown.to_string().lower()
    assert audit.subgroup_metrics(pred, table, "country")["country"].tolist() == ["Italy"]


def test_probe_table_is_narrow_with_intervals():
    probe = pd.DataFrame({
        "features": ["image statistics", "border and corners"], "target": ["origin", "covid label"],
        "subset": ["all images", "all images"], "n": [40, 40], "balanced_accuracy": [0.923, 0.5],
        "ci_low": [0.81, float("nan")], "ci_high": [0.97, float("nan")], "chance_balanced_accuracy": [0.5, 0.5],
        "null_p95": [0.6, 0.6], "p_value": [0.001, float("nan")], "auc": [0.97, 0.5], "verdict": ["shortcut", "none"],
    })  # fmt: skip
    shown = audit.probe_table(probe)
    assert shown.columns.tolist() == ["features", "target", "subset", "balanced accuracy (95% CI)", "chance",
                                      "p (permutation)", "verdict"]
    assert shown.iloc[0].tolist()[3:] == ["0.923 (0.810–0.970)", "0.500", "0.001", "shortcut"]
    assert shown.iloc[1].tolist()[3:6] == ["0.500", "0.500", "–"]


def test_masked_table_puts_intervals_beside_the_scores():
    masked = pd.DataFrame({"n": [56, 56], "macro_f1": [0.182, 0.133], "macro_f1_ci_low": [0.085, 0.057],
                           "macro_f1_ci_high": [0.289, 0.2], "roc_auc": [0.602, 0.392],
                           "baseline_macro_f1": [0.222, 0.222], "f1_retained": [1.0, 0.731]},
                          index=pd.Index(["intact", "lungs_removed"], name="mode"))
    shown = audit.masked_table(masked)
    assert shown.columns.tolist() == ["test images shown", "images", "macro-F1", "ROC AUC", "majority-class macro-F1",
                                      "macro-F1 retained"]
    assert shown.iloc[1].tolist() == ["lung fields blanked", 56, "0.133 (0.057–0.200)", "0.392", "0.222", "0.731"]
    assert shown.iloc[0, 0] == "intact" and "_" not in " ".join(shown.iloc[:, 0])


def test_readable_keeps_rows_and_pixels_in_step(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((20, 20), 40 * (i + 1), np.uint8)).save(paths[-1])
    paths[1].write_bytes(b"not an image")
    rows = pd.DataFrame({"path": [str(p) for p in paths], "image_id": ["a", "b", "c"]}, index=[7, 8, 9])
    with pytest.warns(UserWarning, match="1 unreadable image"):
        kept, pixels = audit.readable(rows, ImageCache(8, root=tmp_path / "cache"))
    assert kept["image_id"].tolist() == ["a", "c"] and list(kept.index) == [0, 1]
    assert pixels.shape == (2, 8, 8) and pixels[0, 0, 0] == 40 and pixels[1, 0, 0] == 120
