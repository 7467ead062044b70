"""Does it generalise: NIH adults in the COVID task, extra negatives, external sets scored by every run,
source hold-out, the image-level remedies. Synthetic NIH-layout folders at 32 px; the real NIH rows when present."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib import data, generalise, images, metrics, readers, synthetic, train
from cxrlib.cli import build_parser
from cxrlib.config import RunConfig, external_sets
from cxrlib.errors import CXRError

pytestmark = pytest.mark.usefixtures("one_thread")

# (Finding Labels, patient, age, sex, view): two normals, two pneumonias (one with other findings), one
# finding-only row that has no class in the COVID task.
NIH_ROWS = [("No Finding", 1, 34, "F", "PA"), ("No Finding", 2, 61, "M", "AP"), ("Pneumonia", 3, 70, "M", "AP"),
            ("Edema|Infiltration|Pneumonia", 4, 45, "F", "PA"), ("Effusion", 5, 52, "M", "PA")]  # fmt: skip


def tiny_nih(root: Path, copies: int = 1, seed: int = 0) -> Path:
    """A ChestX-ray14-layout folder without official lists (like the shared NIH subset): NIH_ROWS x `copies`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(copies):
        for labels, patient, age, sex, view in NIH_ROWS:
            pid = patient + 10 * k
            name = f"{pid:08d}_000.png"
            findings = set() if labels == "No Finding" else set(labels.split("|"))
            img = synthetic.nih_image(rng, findings, synthetic._patient(rng, "pneumonia", adult=True))
            Image.fromarray(img).resize((48, 48)).save(root / "images" / name)
            rows.append([name, labels, 0, pid, age, sex, view, 2500, 2048, 0.14, 0.14])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(synthetic.NIH_COLUMNS)
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    return tiny_nih(tmp_path_factory.mktemp("nih"))


def test_nih_maps_into_the_covid_task_and_reports_what_it_skips(nih):
    table, report = data.read_nih(nih)
    assert list(table.columns) == readers.COLUMNS
    assert table["label"].tolist() == ["normal", "normal", "pneumonia", "pneumonia"]
    assert table["patient_id"].tolist() == ["nih:1", "nih:2", "nih:3", "nih:4"]
    assert set(table["source"]) == {"nih"} and set(table["published_split"]) == {""}
    assert table["age"].tolist() == [34.0, 61.0, 70.0, 45.0] and table["sex"].tolist() == ["F", "M", "M", "F"]
    assert table["view"].tolist() == ["PA", "AP", "AP", "PA"]
    assert table["subtype"].tolist()[2:] == ["Pneumonia", "Pneumonia with other findings"]
    assert len(report.skipped) == 1 and "Effusion" in report.skipped[0]
    assert any("no official split lists" in note for note in report.notes)


def test_nih_real_rows(real_data):
    root = real_data / "nih-chestxray14-subset"
    if not (root / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"no NIH subset at {root}")
    meta = pd.read_csv(root / "Data_Entry_2017.csv", dtype=str)
    table, report = data.read_nih(root)
    pneumonia = meta["Finding Labels"].str.split("|").map(lambda labels: "Pneumonia" in labels)
    normal = meta["Finding Labels"] == "No Finding"
    assert len(table) + len(report.skipped) + len(report.missing) == len(meta)
    assert (table["label"] == "normal").sum() == normal.sum() and (table["label"] == "pneumonia").sum() == pneumonia.sum()
    assert table["patient_id"].nunique() == meta.loc[normal | pneumonia, "Patient ID"].nunique()
    assert table["age"].notna().all() and set(table["view"]) <= {"AP", "PA"} and set(table["sex"]) <= {"M", "F"}
    assert not (table["label"] == "covid").any()


def test_extra_negatives_join_the_table_with_their_own_patients(nih):
    base, _ = data.load_table()
    table, report = data.load_table(extra_negatives=str(nih))
    nih_rows = table[table["source"] == "nih"]
    assert len(table) == len(base) + 4 and len(nih_rows) == 4
    assert set(nih_rows["patient_id"]) == {"nih:1", "nih:2", "nih:3", "nih:4"}
    split = data.split_table(table, "binary", seed=0)
    data.check_no_leakage(split)


def test_extra_negatives_refuse_covid_rows(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,covid\n")
    with pytest.raises(CXRError, match="labelled covid"):
        data.read_extra_negatives(tmp_path / "m.csv")
    with pytest.raises(CXRError, match="cannot tell its layout"):
        data.read_any(tmp_path)


def test_cli_flags_and_papermill_names_of_the_new_parameters(nih):
    args = build_parser().parse_args(["train", "--extra-negatives", str(nih), "--external", f"nih={nih}",
                                      "--hold-out", "country=Italy", "--preprocess", "clahe"])  # fmt: skip
    assert (args.extra_negatives, args.external, args.hold_out, args.preprocess) == (
        str(nih), f"nih={nih}", "country=Italy", "clahe")
    cfg = RunConfig.from_parameters({"extra_negatives": str(nih), "preprocess": "lung_crop", "hold_out": "site=sirm.org"})
    assert cfg.run_name() == "multiclass-ce-resnet50-none-negs-holdout-site_sirm.org-lung_crop-s0"
    assert external_sets("nih=/a, other=/b.csv") == {"nih": "/a", "other": "/b.csv"}
    for bad in ({"external": "nih"}, {"external": "a=/x,a=/y"}, {"preprocess": "sharpen"}, {"hold_out": "Italy"}):
        with pytest.raises(CXRError):
            RunConfig(**bad)


def test_hold_out_sends_a_source_to_test_only():
    table, _ = data.load_table()
    sizes = data.source_sizes(table, min_images=1)
    assert {"column", "value", "images", "patients", "hold_out", "enough"} <= set(sizes.columns)
    spec = sizes.loc[sizes["column"] == "country", "hold_out"].iloc[0]
    split = data.split_table(table, "multiclass", seed=0, hold_out=spec)
    held = data.held_out(table, spec)
    assert held.any() and (split.loc[held.to_numpy(), "split"] == "test").all()
    assert not split.loc[~held.to_numpy(), "patient_id"].isin(split.loc[held.to_numpy(), "patient_id"]).any()
    assert any(spec in note for note in split.attrs["notes"])
    with pytest.raises(CXRError, match="no image has"):
        data.split_table(table, "multiclass", hold_out="country=atlantis")
    with pytest.raises(CXRError, match="column one of"):
        data.held_out(table, "patient_id=1")


def test_clahe_equalises_contrast_and_lung_crop_cuts_the_border():
    rng = np.random.default_rng(0)
    dull = (100 + 20 * rng.random((64, 80))).astype(np.uint8)  # a low-contrast image
    out = images.clahe(dull)
    assert out.shape == dull.shape and out.dtype == np.uint8 and out.std() > 3 * dull.std()
    assert np.array_equal(images.clahe(dull), out)
    img = synthetic.chest_image(rng, "normal", synthetic._patient(rng, "normal", adult=True))
    crop = images.lung_crop(img)
    assert crop.shape[0] < img.shape[0] and crop.shape[1] < img.shape[1]


def test_preprocessed_cache_is_its_own_store_and_matches_prediction_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "x.png"
    rng = np.random.default_rng(1)
    Image.fromarray(synthetic.chest_image(rng, "covid", synthetic._patient(rng, "covid", adult=True))).save(path)
    plain, clahe = images.make_cache(32), images.make_cache(32, "clahe")
    assert plain.dir != clahe.dir
    a, b = plain.load([path])[0][0], clahe.load([path])[0][0]
    assert not np.array_equal(a, b)
    assert np.array_equal(b, images.load_preprocessed(path, 32, "clahe"))
    assert np.array_equal(a, images.load_preprocessed(path, 32))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """Two 1-epoch 32 px runs on a tiny manifest: the paper set-up and adult negatives, both with external sets."""
    from test_train import tiny_manifest

    root = tmp_path_factory.mktemp("gen")
    negatives, outside = tiny_nih(root / "negatives", copies=3, seed=1), tiny_nih(root / "outside", seed=2)
    common = dict(manifest=str(tiny_manifest(root / "m")), image_size=32, epochs=1, batch_size=8, patience=0,
                  device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))
        train.run(RunConfig(**common, external=f"nih={outside}", run_dir=str(root / "runs" / "paper")), progress=False)
        train.run(RunConfig(**common, extra_negatives=str(negatives), external=f"nih={outside},again={negatives}",
                            run_dir=str(root / "runs" / "negs")), progress=False)  # fmt: skip
    return root / "runs"


def test_every_run_scores_its_external_sets_on_unseen_images(run_root):
    run_dir = run_root / "negs"
    params = json.loads((run_dir / "params.json").read_text())
    assert params["data"]["summary"]["sources"]["train"].get("nih", 0) > 0
    m = json.loads((run_dir / "external" / "nih" / "metrics.json").read_text())
    pred = pd.read_csv(run_dir / "external" / "nih" / "predictions.csv")
    assert m["n"] == 4 == len(pred) and set(pred["source"]) == {"nih"}
    assert m["threshold_from_validation"] == json.loads((run_dir / "metrics.json").read_text())["threshold_selection"]["threshold"]
    assert m["covid_specificity"] is not None and m["covid_sensitivity"] is None
    # the set the run trained on: only its test-split images are scored
    again = pd.read_csv(run_dir / "external" / "again" / "predictions.csv")
    test_ids = set(pd.read_csv(run_dir / "predictions.csv")["image_id"])
    assert set(again["image_id"]) == {i for i in test_ids if i.startswith("nih/")}


def test_chapter_06_measures_read_run_folders_and_mark_what_is_no_evidence(run_root):
    arms = generalise.load_arms(run_root).set_index("run")
    assert arms.loc["paper", "arm"] == "paper set-up" and arms.loc["negs", "arm"] == "adult negatives"
    table = generalise.measures(arms.reset_index())
    ext = table[table["population"] == "external: nih"].set_index("arm")
    assert ext.loc["paper set-up", "evidence"] and not ext.loc["adult negatives", "evidence"]
    assert "trained on nih" in ext.loc["adult negatives", "note"]
    assert (ext["n"] == 4).all() and not ext["enough"].any()  # 4 images: too few to say
    text = "\n".join(generalise.verdicts(table))
    assert "**held-out source**: not run." in text and "**remedy**: not run." in text
    assert "external: nih specificity too few to say (n=4) is no evidence" in text
    assert "0.000" not in text and "nan" not in text.lower()
    by_sex = generalise.external_subgroups(run_root / "paper", "nih", "sex").set_index("sex")
    assert set(by_sex.index) == {"F", "M"} and by_sex.loc["F", "covid_specificity"] == "too few to say (n=2)"
    with pytest.raises(CXRError, match="no external set 'elsewhere'"):
        generalise.external_subgroups(run_root / "paper", "elsewhere")


def test_verdicts_compare_intervals():
    def row(population, metric, value, low, high, n=200, arm="held-out source", evidence=True):
        return {"run": "r", "arm": arm, "population": population, "metric": metric, "value": value, "ci_low": low,
                "ci_high": high, "n": n, "ci_unit": "x", "enough": n >= 10, "evidence": evidence, "note": ""}

    table = pd.DataFrame([row("own test split", "covid_specificity", 0.97, 0.95, 0.99, evidence=False),
                          row("own test split", "covid_sensitivity", 0.9, 0.85, 0.95, evidence=False),
                          row("external: nih", "covid_specificity", 0.6, 0.55, 0.65),
                          row("held-out source country=italy", "covid_sensitivity", 0.88, 0.8, 0.93),
                          row(generalise.OTHER_SOURCES, "covid_sensitivity", 0.9, 0.85, 0.95, evidence=False)])
    text = generalise.verdicts(table)[ARMS_INDEX]
    assert "external: nih: specificity 0.60 [0.55–0.65] (n=200), so it calls 40% of these adults COVID-19 (lower than" in text
    assert "COVID-19 sensitivity 0.88 [0.80–0.93] (n=200), against 0.90 [0.85–0.95] (n=200) on the test images" in text
    assert "other sources" not in text
    assert "(no clear difference from there)" in text
    comparison = generalise.arm_comparison(pd.concat([table, table.assign(arm="paper set-up", value=0.2, ci_low=0.1,
                                                                          ci_high=0.3)]), "external: nih")
    assert comparison.set_index("arm").loc["held-out source", "vs paper set-up"] == "higher"
    with pytest.raises(CXRError, match="no 'paper set-up' run"):
        generalise.arm_comparison(table, "external: nih")


ARMS_INDEX = 2  # "held-out source" in generalise.ARMS


def test_goal_verdict_needs_both_measures_on_unseen_sources():
    def row(run, population, metric, value, n=200, evidence=True):
        return {"run": run, "arm": "held-out source", "population": population, "metric": metric, "value": value,
                "ci_low": value - 0.05, "ci_high": value + 0.05, "n": n, "ci_unit": "x", "enough": n >= 10,
                "evidence": evidence, "note": ""}

    good = [row("a", "external: nih", "covid_specificity", 0.85), row("a", "held-out source x", "covid_sensitivity", 0.93)]
    text = generalise.goal_verdict(pd.DataFrame(good))
    assert "met by 1 run(s)" in text and "`a` (held-out source): specificity 0.85" in text
    worse = good + [row("a", "ieee8023 adults without COVID-19 (test split)", "covid_specificity", 0.7)]
    assert "**not met** by any run" in generalise.goal_verdict(pd.DataFrame(worse))  # the worst unseen population counts
    few = [good[0], row("a", "held-out source x", "covid_sensitivity", 1.0, n=4),
           row("b", "own test split", "covid_sensitivity", 0.99, evidence=False), row("b", "external: nih", "covid_specificity", 0.9)]
    text = generalise.goal_verdict(pd.DataFrame(few))
    assert "**not met** by any run" in text and "2 run(s) lack one of the two measurements" in text


def test_load_arms_leaves_the_lungs_removed_audit_to_chapter_04(tmp_path):
    for preprocess in ("none", "lungs_removed", "lungs_removed_marker"):
        run = tmp_path / preprocess
        run.mkdir()
        (run / "params.json").write_text(json.dumps({"config": RunConfig(preprocess=preprocess).to_dict()}))
        (run / "status").write_text("complete")
    assert generalise.load_arms(tmp_path)["preprocess"].tolist() == ["none"]
