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

from cxrlib import data, images, metrics, synthetic, train
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
    assert list(table.columns) == data.COLUMNS
    assert table["label"].tolist() == ["normal", "normal", "pneumonia", "pneumonia"]
    assert table["patient_id"].tolist() == ["nih:1", "nih:2", "nih:3", "nih:4"]
    assert set(table["source"]) == {"nih"} and set(table["published_split"]) == {""}
    assert table["age"].tolist() == [34.0, 61.0, 70.0, 45.0] and table["sex"].tolist() == ["F", "M", "M", "F"]
    assert table["view"].tolist() == ["PA", "AP", "AP", "PA"]
    assert table["subtype"].iloc[3] == "Edema|Infiltration|Pneumonia"
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


def test_every_run_scores_its_external_sets_on_unseen_images(tmp_path, monkeypatch):
    from test_train import tiny_manifest

    monkeypatch.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))
    negatives = tiny_nih(tmp_path / "negatives", copies=3, seed=1)
    outside = tiny_nih(tmp_path / "outside", seed=2)
    cfg = RunConfig(manifest=str(tiny_manifest(tmp_path / "m")), extra_negatives=str(negatives),
                    external=f"nih={outside},again={negatives}", image_size=32, epochs=1, batch_size=8,
                    patience=0, run_dir=str(tmp_path / "run"), device="cpu")  # fmt: skip
    run_dir = train.run(cfg, progress=False)
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
