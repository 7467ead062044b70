"""Readers, merge + dedup, splits, leakage check, sampler, summary and the `data` command."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.cli import main
from cxrlib.config import encode_labels
from cxrlib.data import (
    check_no_leakage,
    class_weights,
    data_fingerprint,
    load_table,
    split_table,
    summarize,
    weighted_sampler,
)
from cxrlib.errors import CXRError
from cxrlib.images import ImageCache
from cxrlib.readers import (
    COLUMNS,
    CORONAHACK_IMAGES,
    kermany_patient,
    manifest_key,
    map_finding,
    read_coronahack,
    read_ieee8023,
    read_manifest,
)
from cxrlib.synthetic import IEEE_COLUMNS, ensure_synthetic

KAGGLE = ["X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category", "Label_1_Virus_category"]


def write_image(path: Path, seed: int, size=(20, 16)) -> Path:
    """A unique small image (noise from `seed`), PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_kaggle(root: Path, rows: list[tuple], skip_images=()) -> Path:
    """A CoronaHack folder: rows (name, Label, Dataset_type, Label_2, Label_1); images unless skipped."""
    for i, (name, _, split, *_) in enumerate(rows):
        if name not in skip_images:
            write_image(root / CORONAHACK_IMAGES / split.lower() / name, seed=1000 + i)
    pd.DataFrame(rows, columns=KAGGLE).to_csv(root / "Chest_xray_Corona_Metadata.csv")
    return root


def make_ieee(root: Path, rows: list[dict], skip_images=()) -> Path:
    """An ieee8023 folder: rows with patientid, finding, view, modality, filename (+ optional)."""
    for i, row in enumerate(rows):
        if row["filename"] not in skip_images:
            write_image(root / "images" / row["filename"], seed=2000 + i)
    frame = pd.DataFrame([{**dict.fromkeys(IEEE_COLUMNS, ""), "folder": "images", **r} for r in rows])
    frame[IEEE_COLUMNS].to_csv(root / "metadata.csv", index=False)
    return root


KAGGLE_ROWS = [
    ("IM-0001-0001.jpeg", "Normal", "TRAIN", "", ""),
    ("NORMAL2-IM-0007-0001.jpeg", "Normal", "TEST", "", ""),
    ("person12_bacteria_44.jpeg", "Pnemonia", "TRAIN", "", "bacteria"),
    ("person12_virus_45.jpeg", "Pnemonia", "TEST", "", "Virus"),
    ("covid-a.jpg", "Pnemonia", "TRAIN", "COVID-19", "Virus"),
    ("sars-a.jpg", "Pnemonia", "TRAIN", "SARS", "Virus"),
    ("gone.jpeg", "Pnemonia", "TRAIN", "ARDS", "Stress-Smoking"),
]


def test_read_coronahack_labels_patients_and_missing(tmp_path):
    root = make_kaggle(tmp_path / "ch", KAGGLE_ROWS, skip_images={"gone.jpeg"})
    table, report = read_coronahack(root)
    assert list(table.columns) == COLUMNS and len(table) == 6
    by_name = table.set_index(table["image_id"].str.split("/").str[1])
    assert by_name.loc["covid-a.jpg", ["label", "subtype"]].tolist() == ["covid", "COVID-19"]
    assert by_name.loc["sars-a.jpg", ["label", "subtype"]].tolist() == ["pneumonia", "SARS"]
    assert by_name.loc["person12_virus_45.jpeg", ["label", "subtype"]].tolist() == ["pneumonia", "virus"]
    assert by_name.loc["IM-0001-0001.jpeg", ["label", "subtype", "published_split"]].tolist() == ["normal", "normal", "train"]
    assert by_name.loc["person12_bacteria_44.jpeg", "patient_id"] == by_name.loc["person12_virus_45.jpeg", "patient_id"]
    assert by_name.loc["covid-a.jpg", "patient_id"] == "coronahack:covid-a.jpg"
    assert report.missing == ["gone.jpeg"]  # reported, not invented
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])


@pytest.mark.parametrize(
    "name, patient",
    [("person1_bacteria_1.jpeg", "kermany:person1"), ("person1_virus_6.jpeg", "kermany:person1"),
     ("IM-0128-0001.jpeg", "kermany:IM-128"), ("NORMAL2-IM-0128-0001.jpeg", "kermany:NORMAL2-IM-128"),
     ("NORMAL2-IM-0246-0001-0002.jpeg", "kermany:NORMAL2-IM-246"), ("ryct.2020.jpeg", "")],
)  # fmt: skip
def test_kermany_patient_ids(name, patient):
    assert kermany_patient(name) == patient


def test_read_coronahack_bad_inputs_name_row_and_column(tmp_path):
    root = make_kaggle(tmp_path / "a", [("x.jpeg", "Influenza", "TRAIN", "", "")])
    with pytest.raises(CXRError, match=r"row 2 \(x.jpeg\).*Influenza"):
        read_coronahack(root)
    root = make_kaggle(tmp_path / "b", [("ok.jpeg", "Normal", "TRAIN", "", ""), ("x.jpeg", "Normal", "VALID", "", "")])
    with pytest.raises(CXRError, match=r"row 3 \(x.jpeg\).*VALID"):
        read_coronahack(root)
    root = make_kaggle(tmp_path / "c", [("x.jpeg", "Normal", "TRAIN", "", "")])
    pd.read_csv(root / "Chest_xray_Corona_Metadata.csv").drop(columns="Label").to_csv(root / "Chest_xray_Corona_Metadata.csv")
    with pytest.raises(CXRError, match="'Label'"):
        read_coronahack(root)
    with pytest.raises(CXRError, match="not found"):
        read_coronahack(tmp_path / "nowhere")


IEEE_ROWS = [
    {"patientid": "5", "finding": "COVID-19", "view": "PA", "modality": "X-ray", "filename": "c1.jpg", "sex": "M", "age": "60",
     "license": "CC BY-NC-SA 4.0"},
    {"patientid": "5", "finding": "COVID-19", "view": "L", "modality": "X-ray", "filename": "c1-lateral.jpg"},
    {"patientid": "6", "finding": "Pneumonia/Viral/COVID-19", "view": "AP Supine", "modality": "X-ray", "filename": "c2.png"},
    {"patientid": "7", "finding": "COVID-19", "view": "Axial", "modality": "CT", "filename": "ct.png"},
    {"patientid": "8", "finding": "Streptococcus", "view": "AP", "modality": "X-ray", "filename": "s1.jpg", "sex": "F"},
    {"patientid": "9", "finding": "No Finding", "view": "PA", "modality": "X-ray", "filename": "n1.jpg"},
    {"patientid": "10", "finding": "todo", "view": "PA", "modality": "X-ray", "filename": "t1.jpg"},
    {"patientid": "11", "finding": "SARS", "view": "PA", "modality": "X-ray", "filename": "absent.jpg"},
]  # fmt: skip


def test_read_ieee8023_keeps_frontal_xrays_only(tmp_path):
    table, report = read_ieee8023(make_ieee(tmp_path / "ieee", IEEE_ROWS, skip_images={"absent.jpg"}))
    assert sorted(table["image_id"]) == ["ieee8023/c1.jpg", "ieee8023/c2.png", "ieee8023/n1.jpg", "ieee8023/s1.jpg"]
    row = table.set_index("image_id").loc["ieee8023/c1.jpg"]
    assert (row["label"], row["patient_id"], row["sex"], row["age"], row["view"]) == ("covid", "ieee8023:5", "M", 60.0, "PA")
    assert table.set_index("image_id").loc["ieee8023/c2.png", "label"] == "covid"
    assert table.set_index("image_id").loc["ieee8023/s1.jpg", ["label", "subtype"]].tolist() == ["pneumonia", "Streptococcus"]
    assert np.isnan(table.set_index("image_id").loc["ieee8023/n1.jpg", "age"])
    assert report.missing == ["absent.jpg"]
    assert report.skipped == ["t1.jpg: unknown finding 'todo'"]
    assert any("1 non-X-ray" in n and "1 non-frontal" in n for n in report.notes)


@pytest.mark.parametrize(
    "finding, expected",
    [("COVID-19", ("covid", "COVID-19")), ("COVID-19, ARDS", ("covid", "COVID-19")),
     ("Pneumonia/Viral/COVID-19", ("covid", "COVID-19")), ("SARS", ("pneumonia", "SARS")),
     ("Pneumonia/Bacterial/Streptococcus", ("pneumonia", "Streptococcus")), ("Pneumocystis", ("pneumonia", "Pneumocystis")),
     ("Mycoplasma Bacterial Pneumonia", ("pneumonia", "Mycoplasma Bacterial Pneumonia")),
     ("No Finding", ("normal", "normal")), ("Tuberculosis", None), ("todo", None)],
)  # fmt: skip
def test_map_finding(finding, expected):
    assert map_finding(finding) == expected


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.csv").write_text(text)
    return folder / "m.csv"


def test_read_manifest(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", 1)
    absolute = write_image(tmp_path / "elsewhere" / "b.png", 2)
    csv = write_manifest(tmp_path, f"path,label,patient_id,split\nimgs/a.png,COVID,p1,test\n{absolute},normal,p2,\nimgs/none.png,normal,p3,\n")
    table, report = read_manifest(csv)
    assert list(table.columns) == COLUMNS and table["label"].tolist() == ["covid", "normal"]
    assert table["patient_id"].tolist() == ["manifest:p1", "manifest:p2"]
    assert table["published_split"].tolist() == ["test", ""] and table["source"].tolist() == ["manifest", "manifest"]
    assert Path(table["path"][0]) == (tmp_path / "imgs" / "a.png").resolve()
    assert report.missing == ["imgs/none.png"]
    table, report = read_manifest(write_manifest(tmp_path / "x", f"path,label\n{absolute},pneumonia\n"))
    assert table["patient_id"][0].startswith("manifest:") and any("own patient" in n for n in report.notes)



def test_one_set_of_images_has_one_fingerprint_however_its_paths_are_spelt(tmp_path, monkeypatch):
    """A manifest's image ids were its paths as written: the same images listed by absolute paths (or "./...")
    gave another fingerprint, so their complete runs were not reused. The manifest given by a relative or an
    absolute path, and its relative spellings, keep the ids (and fingerprints) they had."""
    labels = ("covid", "pneumonia", "normal")
    files = [write_image(tmp_path / "set" / "imgs" / f"{k}.png", k) for k in range(12)]
    spellings = {"plain": lambda f: f"imgs/{f.name}", "dotted": lambda f: f"./imgs/../imgs/{f.name}",
                 "absolute": str, "outside": lambda f: f"../set/imgs/{f.name}"}
    for name, spell in spellings.items():
        rows = "".join(f"{spell(f)},{labels[k % 3]}\n" for k, f in enumerate(files))
        write_manifest(tmp_path / "set", "path,label\n" + rows).rename(tmp_path / "set" / f"{name}.csv")
    monkeypatch.chdir(tmp_path)
    given = [f"set/{name}.csv" for name in spellings] + [str(tmp_path / "set" / "absolute.csv")]
    tables = [load_table(manifest=csv)[0] for csv in given]
    assert all(t.image_id.tolist() == tables[0].image_id.tolist() for t in tables), [t.image_id[0] for t in tables]
    assert tables[0].image_id[0] == "manifest/imgs/0.png"  # as written: fingerprints of relative paths unchanged
    fingerprints = {data_fingerprint(split_table(t, "multiclass", seed=0)) for t in tables}
    assert len(fingerprints) == 1 and len({data_fingerprint(t) for t in tables}) == 1
    outside = write_image(tmp_path / "other" / "b.png", 99)
    assert manifest_key(str(outside), tmp_path / "set") == manifest_key("../other/b.png", "set") == "../other/b.png"
    with pytest.raises(CXRError, match=r"row 3: path ./imgs/0.png already listed on row 2"):
        read_manifest(write_manifest(tmp_path / "set", f"path,label\nimgs/0.png,covid\n./imgs/0.png,covid\n"))


def test_read_manifest_errors_name_row_and_column(tmp_path):
    write_image(tmp_path / "a.png", 1)
    with pytest.raises(CXRError, match=r"row 3 \(a.png\): unknown label 'tuberculosis'"):
        read_manifest(write_manifest(tmp_path, "path,label\na.png,normal\na.png,tuberculosis\n"))
    with pytest.raises(CXRError, match="required column 'label'"):
        read_manifest(write_manifest(tmp_path, "path,diagnosis\na.png,normal\n"))
    with pytest.raises(CXRError, match="required column 'path'"):
        read_manifest(write_manifest(tmp_path, "file,label\na.png,normal\n"))
    with pytest.raises(CXRError, match="row 2.*split 'holdout'"):
        read_manifest(write_manifest(tmp_path, "path,label,split\na.png,normal,holdout\n"))


def test_merge_removes_copies_and_gives_ieee_patient_ids(tmp_path):
    ch = make_kaggle(tmp_path / "ch", KAGGLE_ROWS[:5])
    ieee = make_ieee(tmp_path / "ieee", IEEE_ROWS[:1])
    ch_images = ch / CORONAHACK_IMAGES / "train"
    (ch_images / "c1.jpg").write_bytes((ieee / "images" / "c1.jpg").read_bytes())  # same name, as on Kaggle
    extra = pd.read_csv(ch / "Chest_xray_Corona_Metadata.csv", index_col=0)
    extra.loc[len(extra)] = ["c1.jpg", "Pnemonia", "TRAIN", "COVID-19", "Virus"]
    # Same pixels under another name (lossless re-save, different bytes): a copy of covid-a.jpg's
    # twin in the manifest, and a paediatric image duplicated under another patient's number.
    Image.open(ch_images / "IM-0001-0001.jpeg").save(ch_images / "IM-0099-0001.png")
    extra.loc[len(extra)] = ["IM-0099-0001.png", "Normal", "TRAIN", "", ""]
    extra.to_csv(ch / "Chest_xray_Corona_Metadata.csv")
    Image.open(ch_images / "covid-a.jpg").save(tmp_path / "same-pixels.png")
    manifest = write_manifest(tmp_path, "path,label,patient_id\nsame-pixels.png,covid,zz\n")

    table, report = load_table(str(ch), str(ieee), str(manifest))
    removed = dict(report.duplicates)
    assert removed["ieee8023/c1.jpg"] == "coronahack/c1.jpg"
    assert removed["manifest/same-pixels.png"] == "coronahack/covid-a.jpg"
    assert removed["coronahack/IM-0099-0001.png"] == "coronahack/IM-0001-0001.jpeg"
    assert len(table) == 6 and table["image_id"].is_unique and table["image_hash"].is_unique
    kept = table.set_index("image_id").loc["coronahack/c1.jpg"]
    assert kept["patient_id"] == "ieee8023:5" and kept["sex"] == "M" and kept["age"] == 60.0 and kept["view"] == "PA"
    assert kept["license"] == "CC BY-NC-SA 4.0"  # the ieee8023 row's licence, so the copy is never published


def test_load_table_skips_unreadable_images_with_a_report(tmp_path):
    ch = make_kaggle(tmp_path / "ch", KAGGLE_ROWS[:5])
    train = ch / CORONAHACK_IMAGES / "train"
    (train / "IM-0001-0001.jpeg").write_bytes(b"")  # zero bytes
    data = (train / "covid-a.jpg").read_bytes()
    (train / "covid-a.jpg").write_bytes(data[: len(data) // 3])  # truncated
    table, report = load_table(str(ch), cache=ImageCache(16, root=tmp_path / "cache"))
    assert len(table) == 3
    assert sorted(Path(s.split(":")[0]).name for s in report.skipped) == ["IM-0001-0001.jpeg", "covid-a.jpg"]


def test_load_table_defaults_to_synthetic():
    table, report = load_table()
    assert len(table) > 300 and set(table["source"]) == {"coronahack", "ieee8023"}
    assert any("synthetic" in n for n in report.notes)


@pytest.fixture(scope="module")
def synthetic_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    table, report = load_table(*map(str, ensure_synthetic(root)), cache=ImageCache(64, root=root / "cache"))
    return table, report


def sides(split: pd.DataFrame, key: str) -> int:
    return int((split.groupby(key)["split"].nunique() > 1).sum())


def test_patient_split_is_disjoint_stratified_and_seeded(synthetic_table):
    table, _ = synthetic_table
    split = split_table(table, "multiclass", seed=0)
    assert set(split["split"]) == {"train", "val", "test"} and sides(split, "patient_id") == 0
    for name in ("train", "val", "test"):
        assert set(split.loc[split["split"] == name, "label"]) == {"covid", "pneumonia", "normal"}
    share = split["split"].value_counts(normalize=True)
    assert 0.6 < share["train"] < 0.8 and 0.08 < share["test"] < 0.22
    assert split["split"].equals(split_table(table, "multiclass", seed=0)["split"])
    assert not split["split"].equals(split_table(table, "multiclass", seed=1)["split"])
    binary = split_table(table, "binary", seed=0)
    assert encode_labels(binary["label"], "binary").max() == 1 and sides(binary, "patient_id") == 0
    assert data_fingerprint(split) == data_fingerprint(split.sample(frac=1, random_state=0))
    assert data_fingerprint(split) != data_fingerprint(split_table(table, "multiclass", seed=1))


def test_published_split_keeps_test_and_moves_crossing_patients(synthetic_table):
    table, _ = synthetic_table
    split = split_table(table, "multiclass", seed=0, mode="published")
    assert sides(split, "patient_id") == 0
    published_train = split["published_split"] == "train"
    assert (split.loc[published_train, "split"] != "test").all()
    crossing = table.groupby("patient_id")["published_split"].agg(lambda s: {"train", "test"} <= set(s))
    moved = split["patient_id"].isin(crossing[crossing].index) & (split["published_split"] == "test")
    assert moved.any() and (split.loc[moved, "split"] == "train").all()
    assert (split.loc[(split["published_split"] == "test") & ~moved, "split"] == "test").all()
    assert any("both TRAIN and TEST" in n for n in split.attrs["notes"])
    assert set(split.loc[split["split"] == "test", "label"]) == {"covid", "pneumonia", "normal"}
    without_extra = table[table["published_split"] != ""]  # CoronaHack alone: no COVID in TEST
    with pytest.raises(CXRError, match="split 'test' has no image of class 'covid'.*extra-covid"):
        split_table(without_extra, "multiclass", mode="published")


def test_split_errors(synthetic_table):
    table, _ = synthetic_table
    with pytest.raises(CXRError, match="class 'covid' has no image"):
        split_table(table[table["label"] != "covid"], "binary")
    tiny = table[table["patient_id"].isin(table.groupby("label")["patient_id"].first())]
    with pytest.raises(CXRError, match="empty|no image of class"):
        split_table(tiny, "multiclass")
    with pytest.raises(CXRError, match="mode"):
        split_table(table, "multiclass", mode="random")
    with pytest.raises(CXRError, match="task=.fourclass.: choose one of binary, multiclass"):
        split_table(table, "fourclass")


def test_check_no_leakage_names_patient_and_image(synthetic_table):
    table, report = synthetic_table
    split = split_table(table, "multiclass", seed=0)
    check_no_leakage(split)
    leaky = split.copy()
    one = leaky.index[leaky["split"] == "test"][0]
    leaky.loc[one, "patient_id"] = leaky.loc[leaky["split"] == "train", "patient_id"].iloc[0]
    with pytest.raises(CXRError, match="patient"):
        check_no_leakage(leaky)
    leaky = split.copy()
    leaky.loc[one, "image_hash"] = leaky.loc[leaky["split"] == "train", "image_hash"].iloc[0]
    with pytest.raises(CXRError, match="image hash"):
        check_no_leakage(leaky)
    no_hash = split.drop(columns="image_hash")  # falls back to file-content hashes
    check_no_leakage(no_hash)
    assert summarize(leaky, report)["leakage"] is True


def test_class_weights_and_sampler():
    labels = np.array([0] * 10 + [1] * 30 + [2] * 60)
    weights = class_weights(labels, 3)
    assert np.allclose(weights, [100 / 30, 100 / 90, 100 / 180])
    sampler = weighted_sampler(labels, 3, seed=0)
    assert sampler.class_counts.tolist() == [10, 30, 60] and np.allclose(sampler.class_weights, weights)
    drawn = Counter(labels[list(sampler)])
    assert len(list(sampler)) == 100 and all(20 <= drawn[c] <= 47 for c in range(3))
    assert list(weighted_sampler(labels, 3, seed=0)) == list(weighted_sampler(labels, 3, seed=0))
    with pytest.raises(CXRError, match="class index 2"):
        class_weights(np.array([0, 1, 1]), 3)


def test_summarize_and_cli_json(synthetic_table, capsys):
    table, report = synthetic_table
    summary = summarize(split_table(table, "multiclass"), report)
    assert summary["leakage"] is False and summary["n_images"] == len(table)
    assert summary["missing"] == 2 and summary["duplicates_removed"] == len(report.duplicates) > 0
    assert main(["data", "--json", "--task", "binary", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"n_images", "missing", "duplicates_removed", "counts", "patients", "leakage"} <= set(out)
    assert set(out["counts"]) == {"train", "val", "test"} and out["leakage"] is False
    assert all(out["counts"][s]["covid"] > 0 for s in out["counts"])
    assert main(["data", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "images per label and split" in text and "leakage check: passed" in text


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    csv = write_manifest(tmp_path, "path,label\na.png,flu\n")
    assert main(["data", "--manifest", str(csv)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "Traceback" not in err


# --- the real data (../shared/data), skipped when absent ----------------------------------------


_REAL: dict[Path, tuple] = {}


@pytest.fixture
def real_table(real_data):
    """The merged real table, read once per test session."""
    if real_data not in _REAL:
        _REAL[real_data] = load_table(str(real_data / "coronahack"), str(real_data / "covid-chestxray-dataset"))
    return _REAL[real_data]


@pytest.mark.realdata
def test_real_missing_rows_and_copies(real_data, real_table):
    table, report = real_table
    assert len(report.missing) == 9
    meta = pd.read_csv(real_data / "covid-chestxray-dataset" / "metadata.csv", dtype=str)
    kaggle = pd.read_csv(real_data / "coronahack" / "Chest_xray_Corona_Metadata.csv", dtype=str)
    copies = kaggle[kaggle["Label_2_Virus_category"].isin(["COVID-19", "SARS"])]
    copies = copies[~copies["X_ray_image_name"].isin(report.missing)]
    removed = dict(report.duplicates)
    for name in copies["X_ray_image_name"]:
        assert removed[f"ieee8023/{name}"] == f"coronahack/{name}"
    by_id = table.set_index("image_id")
    patients = by_id.loc["coronahack/" + copies["X_ray_image_name"], "patient_id"]
    assert patients.str.startswith("ieee8023:").all()
    assert set(patients) <= {f"ieee8023:{p}" for p in meta["patientid"]}
    licences = by_id.loc["coronahack/" + copies["X_ray_image_name"], "license"]  # the ieee8023 row's, via dedup
    own = dict(zip(meta.filename, meta.license.fillna("").str.strip()))
    assert licences.tolist() == copies["X_ray_image_name"].map(own).tolist()
    assert table["image_hash"].is_unique and table["image_id"].is_unique


@pytest.mark.realdata
def test_real_patient_split(real_table):
    table, report = real_table
    split = split_table(table, "multiclass", seed=0)
    assert sides(split, "patient_id") == 0
    for name in ("train", "val", "test"):
        assert (split.loc[split["split"] == name, "label"] == "covid").sum() >= 20
    summary = summarize(split, report)
    assert summary["leakage"] is False and summary["missing"] == 9
    published = split_table(table, "multiclass", seed=0, mode="published")
    assert sides(published, "patient_id") == 0
    assert any("170 patient(s) had images in both TRAIN and TEST" in n for n in published.attrs["notes"])
    assert (published.loc[published["published_split"] == "train", "split"] != "test").all()
    assert os.environ.get("CXRLIB_CACHE")  # the session's own cache, never the user's


def test_without_extra_covid_drops_only_the_extra_covid_training_images():
    from cxrlib.data import without_extra_covid

    table = pd.DataFrame({"source": ["ieee8023", "ieee8023", "ieee8023", "ieee8023", "coronahack"],
                          "label": ["covid", "covid", "covid", "pneumonia", "covid"],
                          "split": ["train", "val", "test", "train", "train"]})
    kept = table[without_extra_covid(table)]
    assert len(kept) == 4 and not ((kept.source == "ieee8023") & (kept.label == "covid") & (kept.split == "train")).any()
    assert kept[kept.split != "train"].equals(table[table.split != "train"])  # validation and test unchanged
