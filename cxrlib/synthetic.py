"""Synthetic chest X-rays in the real datasets' layouts: the default data when no real data is given.

The files look like the real downloads (same folders, same metadata columns, same file-name patterns)
so the readers run the same code on them, including the real data's traps: metadata rows without an
image, lateral and CT rows to filter, CoronaHack COVID images that are copies of ieee8023 files under
the same name, a paediatric patient on both sides of the published split, duplicate images under two
names, and per-source image shapes (paediatric squashed to a square, adult with its aspect ratio).

Each class has a learnable sign in the lungs: focal consolidation blob(s) for pneumonia, bilateral
peripheral haze for COVID-19, clear lungs for normal. `shortcut=True` also stamps a bright text-like
block in the top-left corner of COVID images only, a planted shortcut for the audit chapter.

One module (about 430 lines) on purpose: the three layouts share one patient and image generator, so
the same classes carry the same signs in every source.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from .chestxray14 import FINDINGS
from .errors import CXRError
from .readers import CORONAHACK_IMAGES

SOURCE_SIZE = 128  # the generator draws on this square; paediatric files keep it, adult ones are stretched
KAGGLE_COLUMNS = ["X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category", "Label_1_Virus_category"]
IEEE_COLUMNS = [
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated", "intubation_present",
    "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature", "pO2_saturation",
    "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality", "date", "location",
    "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
]  # fmt: skip
LOCATIONS = ["Wuhan, China", "Milan, Italy", "Madrid, Spain", "Toronto, Canada", "Seoul, South Korea"]
OTHER_PNEUMONIAS = [  # (finding as written in the June 2020 metadata, newer "Pneumonia/..." form)
    ("SARS", "Pneumonia/Viral/SARS"),
    ("Pneumocystis", "Pneumonia/Fungal/Pneumocystis"),
    ("Streptococcus", "Pneumonia/Bacterial/Streptococcus"),
    ("Klebsiella", "Pneumonia/Bacterial/Klebsiella"),
    ("Legionella", "Pneumonia/Bacterial/Legionella"),
]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (y, x)."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def lung_mask(size: int) -> np.ndarray:
    """The two lung fields (bool, size x size) the generator draws: explain.py scores Grad-CAM inside it.

    Image left is the patient's right lung (radiological convention); the left lung is a little
    narrower and cut by the heart.
    """
    y, x = _grid(size)
    right = ((x - 0.31) / 0.15) ** 2 + ((y - 0.48) / 0.31) ** 2 <= 1
    left = ((x - 0.69) / 0.14) ** 2 + ((y - 0.48) / 0.30) ** 2 <= 1
    heart = ((x - 0.58) / 0.12) ** 2 + ((y - 0.70) / 0.11) ** 2 <= 1
    return (right | (left & ~heart)) & (y > 0.2)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Low-frequency noise in [0, 1] (blurred white noise), for texture and haze."""
    small = max(2, int(size / scale))
    noise = Image.fromarray((rng.random((small, small)) * 255).astype(np.uint8))
    noise = noise.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(size / small / 2))
    arr = np.asarray(noise, np.float32)
    return (arr - arr.min()) / max(1e-6, float(arr.max() - arr.min()))


def _patient(rng: np.random.Generator, label: str, adult: bool) -> dict:
    """What stays fixed across one patient's images: anatomy and where the disease sits."""
    mask = lung_mask(SOURCE_SIZE)
    ys, xs = np.nonzero(mask & (_grid(SOURCE_SIZE)[0] > 0.35))
    n_blobs = int(rng.integers(1, 3)) if label == "pneumonia" else 0
    picks = rng.choice(len(ys), size=n_blobs, replace=False)
    return {
        "brightness": rng.normal(0, 8) + (6 if adult else 0),
        "contrast": rng.uniform(0.85, 1.15),
        "rib_phase": rng.uniform(0, 1),
        "rib_count": rng.uniform(6.0, 8.0) if adult else rng.uniform(5.0, 6.5),
        "blobs": [(ys[i] / SOURCE_SIZE, xs[i] / SOURCE_SIZE, rng.uniform(0.05, 0.08)) for i in picks],
        "haze": rng.uniform(0.75, 1.0),
        "noise": rng.uniform(3.0, 6.0),
        "adult": adult,
    }


def chest_image(rng: np.random.Generator, label: str, patient: dict, shortcut: bool = False) -> np.ndarray:
    """One synthetic frontal chest radiograph, uint8 (SOURCE_SIZE, SOURCE_SIZE)."""
    size = SOURCE_SIZE
    y, x = _grid(size)
    lungs = lung_mask(size).astype(np.float32)
    img = np.full((size, size), 12.0, np.float32)
    body = (np.abs(x - 0.5) / (0.36 + 0.12 * np.clip(y, 0, 1))) ** 4 + ((y - 0.62) / 0.6) ** 4 <= 1
    img[body] = 125
    img += 40 * (np.abs(x - 0.5) < 0.07 + 0.03 * y) * body  # spine and mediastinum
    img += 35 * (((x - 0.58) / 0.13) ** 2 + ((y - 0.70) / 0.12) ** 2 <= 1)  # heart
    lung_value = 55 + 14 * _smooth_noise(rng, size, 16)
    img = img * (1 - lungs) + lung_value * lungs
    phase = y * patient["rib_count"] + 2.0 * (x - 0.5) ** 2 + patient["rib_phase"]
    img += 16 * lungs * (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6  # ribs
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)), np.float32)
    if label == "pneumonia":  # focal consolidation, jittered a little between a patient's images
        for cy, cx, sigma in patient["blobs"]:
            cy, cx = cy + rng.normal(0, 0.01), cx + rng.normal(0, 0.01)
            blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
            img += rng.uniform(55, 75) * blob * (0.7 + 0.3 * _smooth_noise(rng, size, 10)) * lungs
    elif label == "covid":  # bilateral, peripheral, lower-zone ground-glass haze
        periphery = np.clip((np.abs(x - 0.5) - 0.06) / 0.22, 0, 1)
        lower = 0.5 + 0.5 * np.clip((y - 0.25) / 0.5, 0, 1)
        haze = periphery * lower * (0.4 + 0.6 * _smooth_noise(rng, size, 12))
        img += rng.uniform(50, 65) * patient["haze"] * haze * lungs
    img = (img - 80) * patient["contrast"] + 80 + patient["brightness"]
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8)))
    img = img + rng.normal(0, patient["noise"], img.shape)
    if shortcut and label == "covid":  # a burned-in text-like block, COVID images only
        rows, cols = slice(int(0.05 * size), int(0.11 * size)), slice(int(0.05 * size), int(0.30 * size))
        block = np.zeros((size, size), bool)
        block[rows, cols] = True
        stripes = (np.arange(size) // 2 % 2 == 0)[None, :]
        img[block & stripes] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(img: np.ndarray, path: Path, shape: tuple[int, int] | None = None) -> None:
    """Save as JPEG (quality 90, like the shared data) or PNG by suffix; `shape` = (width, height)."""
    im = Image.fromarray(img)
    if shape and shape != im.size:
        im = im.resize(shape, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else im.save(path)


def _uuid_name(rng: np.random.Generator) -> str:
    """An upper-case UUID file name, like many ieee8023 images; drawn from `rng` so it is reproducible."""
    return f"{str(uuid.UUID(bytes=rng.bytes(16))).upper()}.jpeg"


def _n_images(rng: np.random.Generator) -> int:
    """Images per patient: mostly one, sometimes two or three (like both real sources)."""
    return int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))


def make_ieee8023(root: str | Path, n: int = 110, seed: int = 0, shortcut: bool = False) -> Path:
    """An ieee8023 covid-chestxray-dataset copy: metadata.csv (the collection's columns) + images/.

    About `n` frontal X-ray images (about 80% COVID-19 from >= 40 patients, other adult pneumonias,
    one "No Finding"), plus rows the reader must drop: lateral views, CT slices and one finding it
    does not know ("todo"). A few findings use the newer "Pneumonia/Viral/COVID-19" spelling.
    """
    root = Path(root)
    rng = np.random.default_rng([seed, 8023])
    rows: list[dict] = []
    pid = 0

    def add_patient(finding: str, label: str, n_img: int, **extra) -> None:
        nonlocal pid
        pid += 1
        patient = _patient(rng, label, adult=True)
        sex, age, loc = rng.choice(["M", "F"]), int(rng.integers(25, 90)), rng.choice(LOCATIONS)
        for k in range(n_img):
            view = extra.get("view") or rng.choice(["PA", "AP", "AP Supine"], p=[0.55, 0.25, 0.2])
            name = extra.get("name") or (
                _uuid_name(rng) if rng.random() < 0.5 else f"ieee-{pid:03d}-{k}.{rng.choice(['jpg', 'png'])}"
            )
            width, height = int(rng.integers(110, 170)), int(rng.integers(115, 160))
            _save(chest_image(rng, label, patient, shortcut), root / "images" / name, (width, height))
            rows.append({
                "patientid": str(pid), "offset": k * 3, "sex": sex, "age": age, "finding": finding,
                "view": view, "modality": extra.get("modality", "X-ray"), "location": loc,
                "folder": "images", "filename": name, "license": "synthetic",
                "date": "2020", "doi": "", "url": "",
            })  # fmt: skip

    n_other = max(6, n // 10)
    n_covid_images = max(40, n - n_other - 1)
    while sum(r["finding"].endswith("COVID-19") for r in rows) < n_covid_images:
        finding = "Pneumonia/Viral/COVID-19" if rng.random() < 0.15 else "COVID-19"
        add_patient(finding, "covid", _n_images(rng))
    for i in range(n_other):
        old, new = OTHER_PNEUMONIAS[i % len(OTHER_PNEUMONIAS)]
        add_patient(new if rng.random() < 0.2 else old, "pneumonia", int(rng.integers(1, 3)))
    add_patient("No Finding", "normal", 1)
    # Rows the reader must filter out: lateral X-rays, CT slices, a finding it cannot map.
    for i in range(4):
        add_patient("COVID-19", "covid", 1, view="L", name=f"lateral-{i}.jpg")
    for i in range(3):
        add_patient("COVID-19", "covid", 1, view="Axial", modality="CT", name=f"ct-slice-{i}.png")
    add_patient("todo", "normal", 1, view="PA", name="unlabelled-0.jpg")
    with open(root / "metadata.csv", "w", newline="") as f:  # the real header ends with a comma
        writer = csv.writer(f)
        writer.writerow(IEEE_COLUMNS + [""])
        writer.writerows([[row.get(c, "") for c in IEEE_COLUMNS] + [""] for row in rows])
    return root


def make_coronahack(
    root: str | Path, n: int = 260, seed: int = 0, shortcut: bool = False, covid_source: str | Path | None = None
) -> Path:
    """A Kaggle CoronaHack copy: Chest_xray_Corona_Metadata.csv (Kaggle's columns) + train/ and test/.

    About `n` paediatric images (Kermany file names; normal, bacterial and viral pneumonia; 224x224-like
    squares) in TRAIN and TEST, and COVID-19/SARS/Streptococcus images in TRAIN only. With
    `covid_source` (an ieee8023 folder) those adult images are byte copies of its files under the same
    names, as in the real download; without it they are drawn here. Like the real download, two
    metadata rows have no image, one pneumonia patient has images in both TRAIN and TEST, and two
    images are exact duplicates under other names (one of them filed under another patient).
    """
    root = Path(root)
    images = root / CORONAHACK_IMAGES
    rng = np.random.default_rng([seed, 2020])
    rows: list[dict] = []
    counters = {"bacteria": 0, "virus": 0}

    def add(name: str, label: str, split: str, label1: str, label2: str, img: np.ndarray | None = None) -> None:
        if img is not None:
            _save(img, images / split.lower() / name)
        rows.append(dict(zip(KAGGLE_COLUMNS, [name, label, split, label2, label1])))

    n_normal, person, im_number = 0, 0, 0
    while len(rows) < n:
        split = "TEST" if rng.random() < 0.2 else "TRAIN"
        if n_normal < 0.35 * n:  # normals: IM-<N>-<k> and NORMAL2-IM-<N>-<k>
            im_number += 1
            prefix = "NORMAL2-IM" if im_number % 2 else "IM"
            patient = _patient(rng, "normal", adult=False)
            for k in range(_n_images(rng)):
                add(f"{prefix}-{im_number:04d}-{k + 1:04d}.jpeg", "Normal", split, "", "",
                    chest_image(rng, "normal", patient))  # fmt: skip
                n_normal += 1
            continue
        person += 1  # pneumonia: person<N>_bacteria_<k> / person<N>_virus_<k>; some have both kinds
        patient = _patient(rng, "pneumonia", adult=False)
        kinds = ["bacteria", "virus"] if rng.random() < 0.2 else [rng.choice(["bacteria", "virus"], p=[0.6, 0.4])]
        for kind in kinds:  # the second kind draws its own split: some persons cross TRAIN/TEST
            kind_split = split if kind == kinds[0] else ("TEST" if rng.random() < 0.3 else "TRAIN")
            for _ in range(_n_images(rng)):
                counters[kind] += 1
                add(f"person{person}_{kind}_{counters[kind]}.jpeg", "Pnemonia", kind_split,
                    "bacteria" if kind == "bacteria" else "Virus", "", chest_image(rng, "pneumonia", patient))  # fmt: skip

    # Exact duplicates under another name: same patient (a re-save) and another patient's number.
    pneu = next(r for r in rows if r["X_ray_image_name"].startswith("person"))
    normal = next(r for r in rows if r["X_ray_image_name"].startswith("IM-"))
    person_n, kind = pneu["X_ray_image_name"].split("_")[:2]
    counters[kind] += 1
    for src, name in [(pneu, f"{person_n}_{kind}_{counters[kind]}.jpeg"), (normal, "IM-9999-0001.jpeg")]:
        shutil.copyfile(images / src["Dataset_type"].lower() / src["X_ray_image_name"], images / src["Dataset_type"].lower() / name)
        rows.append({**src, "X_ray_image_name": name})

    # Adult images, TRAIN only: copies of the ieee8023 files (same names) or drawn here.
    if covid_source:
        meta = pd.read_csv(Path(covid_source) / "metadata.csv", dtype=str, keep_default_na=False)
        frontal = meta[meta["view"].isin(["PA", "AP", "AP Supine"]) & (meta["modality"] == "X-ray")]
        covid = frontal[frontal["finding"].str.endswith("COVID-19")].head(24)
        other = frontal[frontal["finding"].str.endswith(("SARS", "Streptococcus"))].head(4)
        normal_adult = frontal[frontal["finding"] == "No Finding"].head(1)
        for _, r in pd.concat([covid, other, normal_adult]).iterrows():
            label2 = r["finding"].split("/")[-1]
            label, label1 = ("Normal", "") if label2 == "No Finding" else ("Pnemonia", "Virus")
            label1 = "bacteria" if label2 == "Streptococcus" else label1
            shutil.copyfile(Path(covid_source) / r["folder"] / r["filename"], images / "train" / r["filename"])
            add(r["filename"], label, "TRAIN", label1, "" if label == "Normal" else label2)
    else:
        for _ in range(24):
            patient = _patient(rng, "covid", adult=True)
            name = _uuid_name(rng)
            width, height = int(rng.integers(110, 170)), int(rng.integers(115, 160))
            img = np.asarray(Image.fromarray(chest_image(rng, "covid", patient, shortcut)).resize((width, height)))
            add(name, "Pnemonia", "TRAIN", "Virus", "COVID-19", img)
    # Metadata rows whose image is absent, as in the real download.
    add("acute-respiratory-distress-syndrome-ards.jpg", "Pnemonia", "TRAIN", "Stress-Smoking", "ARDS")
    add("2C10A413-AAAA-4807-8CCE-6A2025594067.jpeg", "Pnemonia", "TRAIN", "Virus", "COVID-19")

    table = pd.DataFrame(rows, columns=KAGGLE_COLUMNS)
    table.to_csv(root / "Chest_xray_Corona_Metadata.csv")  # leading unnamed index column, like Kaggle's
    summary = table.fillna("").groupby(["Label", "Label_1_Virus_category", "Label_2_Virus_category"]).size()
    summary.rename("Image_Count").reset_index().to_csv(root / "Chest_xray_Corona_dataset_Summary.csv")
    return root


def _build_once(final: Path, build) -> None:
    """Make a data set folder once: `build(tmp)` in a temporary folder, a COMPLETE marker, then a rename.

    An interrupted or concurrent build never leaves a half-written dataset that later runs would trust. A folder
    that cannot be written (a read-only HOME, a full disk) is one error naming it and CXRLIB_DATA.
    """
    if (final / "COMPLETE").exists():
        return
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        (tmp / "COMPLETE").write_text("synthetic chest X-rays made by cxrlib.synthetic\n")
        if (final / "COMPLETE").exists():  # another process finished first: its folder may be in use, keep it
            return
        if final.exists():  # a stale, incomplete build
            shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            if not (final / "COMPLETE").exists():
                raise
    except OSError as err:
        raise CXRError(f"cannot write cxrlib's synthetic data to {final.parent} ({err.strerror or err}): set "
                       "CXRLIB_DATA to a writable folder (default ~/.cache/cxrlib/synthetic)") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _data_root(root: str | Path | None) -> Path:
    return Path(root or os.environ.get("CXRLIB_DATA") or Path.home() / ".cache" / "cxrlib" / "synthetic")


def ensure_synthetic(root: str | Path | None = None, seed: int = 0, shortcut: bool = False) -> tuple[Path, Path]:
    """The synthetic default (CoronaHack + ieee8023 folders), made once (atomically: `_build_once`) and reused."""
    final = _data_root(root) / f"synthetic-v1-s{seed}{'-shortcut' if shortcut else ''}"

    def build(tmp: Path) -> None:
        make_ieee8023(tmp / "covid-chestxray-dataset", seed=seed, shortcut=shortcut)
        make_coronahack(tmp / "coronahack", seed=seed, shortcut=shortcut, covid_source=tmp / "covid-chestxray-dataset")

    _build_once(final, build)
    return final / "coronahack", final / "covid-chestxray-dataset"


# --- ChestX-ray14 (NIH) layout -------------------------------------------------------------------
# Data_Entry_2017.csv's header as NIH/Kaggle ship it: two bracketed names hold a comma, so pandas reads
# them as four columns, and every line ends with a comma (an unnamed 12th column).
NIH_COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]  # fmt: skip
# Share of images with each finding. Effusion, Cardiomegaly, Pneumonia, Consolidation, Nodule and Mass get
# a drawn sign (learnable); the others are labels only, so their AUROC should stay near 0.5.
NIH_PREVALENCE = {
    "Atelectasis": 0.06, "Cardiomegaly": 0.15, "Effusion": 0.18, "Infiltration": 0.08, "Mass": 0.10,
    "Nodule": 0.10, "Pneumonia": 0.10, "Pneumothorax": 0.04, "Consolidation": 0.10, "Edema": 0.03,
    "Emphysema": 0.03, "Fibrosis": 0.03, "Pleural_Thickening": 0.03, "Hernia": 0.02,
}  # fmt: skip
NIH_IMAGES_PER_FOLDER = 100  # the real archives hold about 10,000 each (images_001 .. images_012)


def _round_opacity(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A soft-edged round opacity (nodule or mass) at a random point of the lungs, as a float field."""
    y, x = _grid(SOURCE_SIZE)
    ys, xs = np.nonzero(lung_mask(SOURCE_SIZE) & (y > 0.3) & (y < 0.7))
    i = rng.integers(len(ys))
    cy, cx = ys[i] / SOURCE_SIZE, xs[i] / SOURCE_SIZE
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / radius
    return np.clip(1.5 - d, 0, 1)


def nih_image(rng: np.random.Generator, findings: set[str], patient: dict) -> np.ndarray:
    """One synthetic frontal radiograph with the signs of `findings` (NIH names), uint8 (SOURCE_SIZE,)*2.

    Pneumonia/Consolidation: chest_image's focal blob(s). Cardiomegaly: a heart shadow reaching far into
    both lungs.
    Effusion: an opaque lung base with a meniscus (blunted costophrenic angle). Nodule: a small round
    opacity; Mass: a large one.
    """
    focal = bool(findings & {"Pneumonia", "Consolidation"})
    img = chest_image(rng, "pneumonia" if focal else "normal", patient).astype(np.float32)
    y, x = _grid(SOURCE_SIZE)
    lungs = lung_mask(SOURCE_SIZE)
    signs = np.zeros_like(img)
    if "Cardiomegaly" in findings:
        signs += 85 * lungs * (((x - 0.56) / 0.22) ** 2 + ((y - 0.69) / 0.14) ** 2 <= 1)
    if "Effusion" in findings:
        level = rng.uniform(0.58, 0.66)
        sides = [rng.random() < 0.5] if rng.random() < 0.7 else [True, False]  # True: image left
        for left in sides:
            half = x < 0.5 if left else x >= 0.5
            meniscus = level - 0.3 * np.clip(np.abs(x - 0.5) - 0.1, 0, None)  # fluid climbs the chest wall
            signs += 70 * (lungs & half & (y > meniscus))
    if "Nodule" in findings:
        signs += 70 * _round_opacity(rng, 0.03)
    if "Mass" in findings:
        signs += 65 * _round_opacity(rng, 0.08)
    signs = np.asarray(Image.fromarray(np.clip(signs, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)))
    return np.clip(img + signs, 0, 255).astype(np.uint8)


def make_chestxray14(root: str | Path, n: int = 400, seed: int = 0) -> Path:
    """A ChestX-ray14 copy in the NIH/Kaggle layout, about `n` PNG images.

    Data_Entry_2017.csv (NIH's columns and header, trailing comma included), train_val_list.txt and
    test_list.txt (patient-disjoint, about a quarter of the patients in test, like the official lists),
    images in images_001/images/, images_002/images/, ... File names are `<patient:08d>_<follow-up:03d>.png`.
    About half the images are "No Finding"; one age is an impossible 414 years, like a few rows of the
    real 2017 file.
    """
    root = Path(root)
    rng = np.random.default_rng([seed, 14])
    prevalence = np.array([NIH_PREVALENCE[f] for f in FINDINGS])
    rows, test_names, train_names = [], [], []
    pid = 0
    while len(rows) < n:
        pid += 1
        patient = _patient(rng, "pneumonia", adult=True)
        sex, age, test = rng.choice(["M", "F"], p=[0.56, 0.44]), int(rng.integers(18, 90)), rng.random() < 0.25
        for k in range(_n_images(rng)):
            findings = {f for f, hit in zip(FINDINGS, rng.random(len(FINDINGS)) < prevalence) if hit}
            if rng.random() < 0.45:  # like NIH, about half the images have no finding
                findings = set()
            name = f"{pid:08d}_{k:03d}.png"
            folder = f"images_{len(rows) // NIH_IMAGES_PER_FOLDER + 1:03d}"
            _save(nih_image(rng, findings, patient), root / folder / "images" / name)
            view = rng.choice(["PA", "AP"], p=[0.6, 0.4])
            width, height = (2500, 2048) if view == "AP" else (int(rng.integers(2400, 3000)), int(rng.integers(2400, 3000)))
            spacing = 0.139 if view == "AP" else 0.143
            label = "|".join(f for f in FINDINGS if f in findings) or "No Finding"
            rows.append([name, label, k, pid, age + k // 2, sex, view, width, height, spacing, spacing, ""])
            (test_names if test else train_names).append(name)
    rows[len(rows) // 2][4] = 414  # an impossible age, as in the real 2017 file
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(NIH_COLUMNS + [""])
        writer.writerows(rows)
    (root / "train_val_list.txt").write_text("".join(f"{name}\n" for name in train_names))
    (root / "test_list.txt").write_text("".join(f"{name}\n" for name in test_names))
    return root


def ensure_chestxray14(root: str | Path | None = None, seed: int = 0, n: int = 400) -> Path:
    """The synthetic ChestX-ray14 default, made once (atomically, like ensure_synthetic) and reused."""
    final = _data_root(root) / f"chestxray14-v1-n{n}-s{seed}"
    _build_once(final, lambda tmp: make_chestxray14(tmp, n=n, seed=seed))
    return final
