"""Readers of the COVID task's sources: CoronaHack, the ieee8023 collection and manifest CSVs, each into one
table with the columns `COLUMNS` (the contract every reader writes), plus what they could not use.

ChestX-ray14 has its own reader (chestxray14.py); data.py merges the readers' tables, removes duplicates
and splits them. Problems with the data are never silent: rows without an image go to `ReadReport.missing`,
rows that cannot be used (unknown label or finding) to `.skipped`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from .config import LABELS
from .errors import CXRError

COLUMNS = ["path", "image_id", "label", "subtype", "patient_id", "source", "published_split",
           "view", "sex", "age", "location", "site", "license"]  # fmt: skip
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")
SPLITS = ("train", "val", "test")
OTHER_PNEUMONIA = {
    "sars", "mers", "mers-cov", "pneumocystis", "streptococcus", "klebsiella", "e.coli", "legionella",
    "varicella", "influenza", "h1n1", "bacterial", "viral", "fungal", "chlamydophila", "staphylococcus",
    "nocardia", "aspergillosis", "herpes", "candida", "mycoplasma", "lipoid",
}  # fmt: skip
# The publisher's nested image folder in the Kaggle download (synthetic.make_coronahack writes it too).
CORONAHACK_IMAGES = Path("Coronahack-Chest-XRay-Dataset") / "Coronahack-Chest-XRay-Dataset"


@dataclass
class ReadReport:
    """What a reader or `load_table` could not use, and what it decided (never silent)."""

    missing: list[str] = field(default_factory=list)  # names of metadata rows whose image is absent
    skipped: list[str] = field(default_factory=list)  # "name: why" for rows left out
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (removed image_id, kept image_id)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: "ReadReport") -> None:
        self.missing += other.missing
        self.skipped += other.skipped
        self.duplicates += other.duplicates
        self.notes += other.notes


def as_table(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the table, every contract column present ("" for text, NaN for age)."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    text = [c for c in COLUMNS if c != "age"]
    table[text] = table[text].fillna("").astype(str)
    table["age"] = pd.to_numeric(table["age"], errors="coerce").astype(float)
    return table


def read_csv(path: Path, required: list[str], hint: str) -> pd.DataFrame:
    """A metadata CSV as text, or CXRError naming the file or the missing column."""
    if not path.is_file():
        raise CXRError(f"{path} not found: {hint}")
    with open(path, "rb") as handle:
        if b"\0" in handle.read(4096):  # an image or other binary file, which the Latin-1 reading would accept
            raise CXRError(f"{path}: not a CSV file of text (it holds NUL bytes: an image? UTF-16 text? save it "
                           f"as a UTF-8 CSV): {hint}")
    try:
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except UnicodeDecodeError:  # older ieee8023 metadata.csv files are Latin-1
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="latin-1")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CXRError(f"{path}: cannot parse as CSV ({str(err).strip().splitlines()[0]}): {hint}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in required:
        if column not in frame.columns:
            raise CXRError(f"{path}: required column {column!r} is missing (columns: {', '.join(frame.columns)})")
    return frame.apply(lambda col: col.str.strip())


def kermany_patient(name: str) -> str:
    """Patient id from a Guangzhou (Kermany) file name, or "" when the name has none.

    `person<N>_bacteria_<k>` and `person<N>_virus_<k>` -> "kermany:person<N>" (one id for both kinds:
    the numbering is shared); `IM-<N>-<k>` -> "kermany:IM-<N>"; `NORMAL2-IM-<N>-<k>` ->
    "kermany:NORMAL2-IM-<N>" (a second normal series with its own numbering). Treating a number as one
    patient can only merge patients, which costs a little randomness but never leaks.
    """
    for pattern, prefix in ((r"person(\d+)_(?:bacteria|virus)", "person"), (r"NORMAL2-IM-(\d+)-", "NORMAL2-IM-"),
                            (r"IM-(\d+)-", "IM-")):  # fmt: skip
        match = re.match(pattern, name)
        if match:
            return f"kermany:{prefix}{int(match.group(1))}"
    return ""


def read_coronahack(root: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """Kaggle CoronaHack: Chest_xray_Corona_Metadata.csv + the nested train/ and test/ folders.

    Label Normal -> normal; Pnemonia (sic) with Label_2_Virus_category COVID-19 -> covid, other
    Pnemonia -> pneumonia. subtype = Label_2 (COVID-19, SARS, ARDS, Streptococcus) or Label_1
    (bacteria, virus). The adult (non-Kermany) images get a per-image patient id here
    ("coronahack:<name>"); `load_table` replaces it with the ieee8023 patient of the original.
    """
    root = Path(root)
    csv = root / "Chest_xray_Corona_Metadata.csv"
    meta = read_csv(csv, ["X_ray_image_name", "Label", "Dataset_type", "Label_1_Virus_category",
                           "Label_2_Virus_category"], "point --coronahack at the folder that holds it")  # fmt: skip
    candidates = [root / CORONAHACK_IMAGES, root / CORONAHACK_IMAGES.parts[0], root]
    images = next((c for c in candidates if (c / "train").is_dir() or (c / "test").is_dir()), None)
    if images is None:
        raise CXRError(f"{root}: no train/ or test/ image folder (looked in {', '.join(map(str, candidates))})")
    report, rows = ReadReport(), []
    for line, r in enumerate(meta.to_dict("records"), start=2):
        name, label1, label2 = r["X_ray_image_name"], r["Label_1_Virus_category"], r["Label_2_Virus_category"]
        if r["Label"] == "Normal":
            label, subtype = "normal", "normal"
        elif r["Label"] in ("Pnemonia", "Pneumonia"):
            label = "covid" if label2 == "COVID-19" else "pneumonia"
            subtype = label2 or label1.lower() or "pneumonia"
        else:
            raise CXRError(f"{csv}, row {line} ({name}): unknown Label {r['Label']!r}; expected Normal or Pnemonia")
        split = r["Dataset_type"].lower()
        if split not in ("train", "test"):
            raise CXRError(f"{csv}, row {line} ({name}): unknown Dataset_type {r['Dataset_type']!r}; expected TRAIN or TEST")
        path = images / split / name
        if not path.is_file():
            report.missing.append(name)
            continue
        rows.append({"path": str(path.resolve()), "image_id": f"coronahack/{name}", "label": label,
                     "subtype": subtype, "patient_id": kermany_patient(name) or f"coronahack:{name}",
                     "source": "coronahack", "published_split": split})  # fmt: skip
    if report.missing:
        report.notes.append(f"coronahack: {len(report.missing)} of {len(meta)} metadata rows have no image file")
    return as_table(rows), report


def map_finding(finding: str) -> tuple[str, str] | None:
    """An ieee8023 `finding` -> (label, subtype), or None when it is not one we can place.

    Handles the June 2020 names ("COVID-19", "COVID-19, ARDS", "SARS", "No Finding") and the newer
    paths ("Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus").
    """
    parts = [p.strip() for p in re.split(r"[/,]", finding) if p.strip()]
    lower = [p.lower() for p in parts]
    if any(p.replace(" ", "") in ("covid-19", "covid19", "sars-cov-2") for p in lower):
        return "covid", "COVID-19"
    if lower and lower[0] in ("no finding", "normal"):
        return "normal", "normal"
    if any("pneumonia" in p or p in OTHER_PNEUMONIA for p in lower):
        return "pneumonia", parts[-1]
    return None


def read_ieee8023(root: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """ieee8023 covid-chestxray-dataset: metadata.csv + images/, frontal X-rays (PA, AP, AP Supine) only.

    Lateral views and CT rows are filtered (counted in `notes`); findings `map_finding` cannot place
    go to `skipped`. Keeps patientid ("ieee8023:<id>"), sex, age, location and
    site (the web site of its `url`: radiopaedia.org, sirm.org, a journal).
    """
    root = Path(root)
    csv = root / "metadata.csv"
    meta = read_csv(csv, ["patientid", "finding", "view", "modality", "filename"],
                     "point --extra-covid at the covid-chestxray-dataset folder")  # fmt: skip
    report, rows = ReadReport(), []
    not_xray = meta["modality"] != "X-ray"
    not_frontal = ~not_xray & ~meta["view"].isin(FRONTAL_VIEWS)
    for r in meta[~not_xray & ~not_frontal].to_dict("records"):
        name = r["filename"]
        mapped = map_finding(r["finding"])
        if mapped is None:
            report.skipped.append(f"{name}: unknown finding {r['finding']!r}")
            continue
        path = root / (r.get("folder") or "images") / name
        if not path.is_file():
            report.missing.append(name)
            continue
        rows.append({"path": str(path.resolve()), "image_id": f"ieee8023/{name}", "label": mapped[0],
                     "subtype": mapped[1], "patient_id": f"ieee8023:{r['patientid']}", "source": "ieee8023",
                     "view": r["view"], "sex": r.get("sex", "") if r.get("sex") in ("M", "F") else "",
                     "age": r.get("age", ""), "location": r.get("location", ""), "site": _site(r.get("url", "")),
                     "license": r.get("license", "")})  # fmt: skip
    report.notes.append(
        f"ieee8023: kept {len(rows)} frontal X-rays of {len(meta)} rows; filtered out "
        f"{int(not_xray.sum())} non-X-ray (CT) and {int(not_frontal.sum())} non-frontal (lateral) rows"
    )
    return as_table(rows), report


def _site(url: str) -> str:
    """The web site an ieee8023 image was taken from ("radiopaedia.org", "sirm.org", a journal): its source."""
    host = urlparse(url).netloc.lower()
    return host[4:] if host.startswith("www.") else host


def read_manifest(csv_path: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """Your own images: a CSV with `path,label` and optional `patient_id,split,source,view`.

    Paths are relative to the CSV's folder (absolute ones work too); label is covid, pneumonia or
    normal; split (optional) is train, val or test and is used by split mode "published".
    Without patient_id every image counts as its own patient (noted: patient-disjointness then rests
    on your file layout). Image and patient ids name each file by `manifest_key`, whatever its spelling.
    """
    csv = Path(csv_path)
    meta = read_csv(csv, ["path", "label"], "check the --manifest path")
    report, rows, seen = ReadReport(), [], {}
    if "patient_id" not in meta.columns:
        report.notes.append(f"{csv}: no patient_id column; each image is treated as its own patient")
    for line, r in enumerate(meta.to_dict("records"), start=2):
        label, raw = r["label"].lower(), r["path"]
        if label not in LABELS:
            raise CXRError(f"{csv}, row {line} ({raw}): unknown label {r['label']!r}; use one of {', '.join(LABELS)}")
        if not raw:
            raise CXRError(f"{csv}, row {line}: empty path")
        key = manifest_key(raw, csv.parent)
        if key in seen:
            raise CXRError(f"{csv}, row {line}: path {raw} already listed on row {seen[key]}")
        seen[key] = line
        split = r.get("split", "").lower()
        if split not in ("", *SPLITS):
            raise CXRError(f"{csv}, row {line} ({raw}): unknown split {r['split']!r}; use train, val, test or leave empty")
        path = Path(raw) if Path(raw).is_absolute() else csv.parent / raw
        if path.is_dir():
            report.skipped.append(f"{raw}: a folder, not an image file (row {line})")
            continue
        if not path.is_file():
            report.missing.append(raw)
            continue
        source = r.get("source") or "manifest"
        rows.append({"path": str(path.resolve()), "image_id": f"{source}/{key}", "label": label,
                     "subtype": label, "patient_id": f"{source}:{r.get('patient_id') or key}",
                     "source": source, "published_split": split, "view": r.get("view", "")})  # fmt: skip
    if report.missing:
        report.notes.append(f"{csv}: {len(report.missing)} listed image(s) not found")
    return as_table(rows), report


def manifest_key(raw: str, folder: str | Path) -> str:
    """A manifest row's image as one spelling: its path from the manifest's folder, so "a.png", "./a.png" and
    "/data/set/a.png" (in /data/set/m.csv) are one image, as are "../x/b.png" and "/data/x/b.png": the data
    fingerprint hashes these ids, and the same images must give the same fingerprint (and reuse the same runs)."""
    base = os.path.realpath(folder)
    if os.path.isabs(raw):  # its folder resolved as the manifest's is (links, ".."); the file itself may be a link
        path = os.path.join(os.path.realpath(os.path.dirname(raw)), os.path.basename(raw))
    else:
        path = os.path.normpath(os.path.join(base, raw))
    return Path(os.path.relpath(path, base)).as_posix()
