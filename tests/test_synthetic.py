"""The synthetic default: real layouts and columns, deterministic, learnable signal, planted shortcut."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.data import load_table, read_coronahack, read_ieee8023
from cxrlib.synthetic import (
    IEEE_COLUMNS,
    SOURCE_SIZE,
    _build_once,
    _patient,
    chest_image,
    ensure_synthetic,
    lung_mask,
    make_coronahack,
    make_ieee8023,
)

KAGGLE_HEADER = ",X_ray_image_name,Label,Dataset_type,Label_2_Virus_category,Label_1_Virus_category"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)


def header(path) -> str:
    return path.read_text(encoding="latin-1").splitlines()[0].strip()


def test_layout_and_columns_match_the_real_downloads(synthetic, request):
    coronahack, ieee = synthetic
    assert header(coronahack / "Chest_xray_Corona_Metadata.csv") == KAGGLE_HEADER
    assert header(ieee / "metadata.csv") == ",".join(IEEE_COLUMNS) + ","
    assert (coronahack / "Coronahack-Chest-XRay-Dataset" / "Coronahack-Chest-XRay-Dataset" / "train").is_dir()
    assert (ieee / "images").is_dir()
    shared = request.config.rootpath.parent / "shared" / "data"
    if (shared / "coronahack" / "Chest_xray_Corona_Metadata.csv").is_file():  # compare with the real files
        assert header(shared / "coronahack" / "Chest_xray_Corona_Metadata.csv") == KAGGLE_HEADER
        assert header(shared / "covid-chestxray-dataset" / "metadata.csv") == header(ieee / "metadata.csv")


def test_contains_the_real_datas_traps(synthetic):
    coronahack, ieee = synthetic
    meta = pd.read_csv(ieee / "metadata.csv", dtype=str, keep_default_na=False)
    assert (meta["view"] == "L").any() and (meta["modality"] == "CT").any()
    assert meta["finding"].str.startswith("Pneumonia/").any() and (meta["finding"] == "COVID-19").any()
    kaggle = pd.read_csv(coronahack / "Chest_xray_Corona_Metadata.csv", dtype=str, keep_default_na=False)
    covid = kaggle[kaggle["Label_2_Virus_category"] == "COVID-19"]
    assert set(covid["Dataset_type"]) == {"TRAIN"} and (kaggle["Dataset_type"] == "TEST").any()
    copies = covid[covid["X_ray_image_name"].isin(meta["filename"])]
    assert len(copies) >= 10
    name = copies["X_ray_image_name"].iloc[0]
    train = coronahack / "Coronahack-Chest-XRay-Dataset" / "Coronahack-Chest-XRay-Dataset" / "train"
    assert (train / name).read_bytes() == (ieee / "images" / name).read_bytes()
    _, report = read_coronahack(coronahack)
    assert len(report.missing) == 2
    table, report = read_ieee8023(ieee)
    assert set(table["view"]) <= {"PA", "AP", "AP Supine"} and len(report.skipped) == 1


def test_default_sizes_and_enough_covid(synthetic):
    table, report = load_table(*map(str, synthetic))
    assert 300 <= len(table) <= 500
    covid = table[table["label"] == "covid"]
    assert covid["patient_id"].nunique() >= 40
    assert table["label"].value_counts()["covid"] < table["label"].value_counts()["pneumonia"]
    assert len(report.duplicates) >= 10 and not any("cannot" in s for s in report.skipped)
    sizes = {Image.open(p).size for p in table.loc[table["source"] == "ieee8023", "path"].head(20)}
    assert len(sizes) > 1  # adult images keep varied shapes; paediatric ones are squares
    assert {Image.open(p).size for p in table.loc[table["patient_id"].str.startswith("kermany"), "path"]} == {
        (SOURCE_SIZE, SOURCE_SIZE)
    }


def digest(folder) -> str:
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    a = digest(make_ieee8023(tmp_path / "a", n=50, seed=3))
    assert a == digest(make_ieee8023(tmp_path / "b", n=50, seed=3))
    assert a != digest(make_ieee8023(tmp_path / "c", n=50, seed=4))
    assert digest(make_coronahack(tmp_path / "d", n=40, seed=1)) == digest(make_coronahack(tmp_path / "e", n=40, seed=1))


def test_ensure_synthetic_is_idempotent(tmp_path):
    first = ensure_synthetic(tmp_path, seed=1)
    marker = first[0].parent / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, seed=1) == first and marker.stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_build_that_finishes_second_keeps_the_first(tmp_path):
    """Shards started at once each build the synthetic default: the one that finishes second used to replace the
    complete folder, which the first was already reading (its run failed: "no train/ or test/ image folder")."""
    final = tmp_path / "set"

    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "made").write_text("second")
        first = tmp_path / "first"  # meanwhile, another process completes the same folder
        first.mkdir()
        (first / "made").write_text("first")
        (first / "COMPLETE").write_text("")
        first.rename(final)

    _build_once(final, build)
    assert (final / "made").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["set"]


def test_lung_mask_is_two_lung_fields():
    mask = lung_mask(64)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert 0.15 < mask.mean() < 0.4
    assert mask[:, :32].sum() > 0 and mask[:, 32:].sum() > 0 and not mask[:, 31:33].any()


def lung_stats(label: str, n: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = lung_mask(SOURCE_SIZE)
    for shift in (-4, 4):  # stay off the lung border, which the blur brightens
        mask = mask & np.roll(mask, shift, 0) & np.roll(mask, shift, 1)
    periphery = mask & (np.abs(np.arange(SOURCE_SIZE) / SOURCE_SIZE - 0.5) > 0.3)[None, :]
    out = []
    for _ in range(n):
        img = chest_image(rng, label, _patient(rng, label, adult=False)).astype(float)
        out.append((img[periphery].mean(), np.percentile(img[mask], 99) - np.median(img[mask])))
    return np.array(out)


def test_each_class_has_its_sign_in_the_lungs():
    normal, pneumonia, covid = lung_stats("normal"), lung_stats("pneumonia"), lung_stats("covid")
    assert covid[:, 0].mean() > normal[:, 0].mean() + 10  # peripheral haze
    assert pneumonia[:, 1].mean() > normal[:, 1].mean() + 20  # a focal bright blob


def test_shortcut_marks_covid_only():
    rng = np.random.default_rng(0)
    corner = (slice(6, 14), slice(6, 38))
    covid = chest_image(rng, "covid", _patient(rng, "covid", True), shortcut=True)
    normal = chest_image(rng, "normal", _patient(rng, "normal", True), shortcut=True)
    plain = chest_image(rng, "covid", _patient(rng, "covid", True), shortcut=False)
    assert covid[corner].mean() > normal[corner].mean() + 60 and covid[corner].mean() > plain[corner].mean() + 60
