"""ChestX-ray14 (NIH): the reader, in the data layer beside readers.py.

Wang et al. (2017) released 112,120 frontal radiographs of 30,805 patients, each with 14 findings
text-mined from its report. `read_chestxray14` reads the download (or a subset) as a 14-finding table
for pretraining (pretrain.py); `read_nih` turns it into COVID-task rows (adults without COVID-19: normal
or pneumonia), the extra negatives of the debiasing arm and an external set.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CXRError
from .readers import ReadReport, as_table, read_csv

# The 14 findings in the official order (NIH's README, CheXNet's table, torchvision-style heads).
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
SOURCE = "chestxray14"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the newer one wins when both are there
LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}  # published_split -> official list file
IMAGE_GLOBS = ("images*/images/*.png", "images/*.png")  # Kaggle's images_001..012/images/, or one folder
COLUMNS = ["path", "image_id", "patient_id", "source", "published_split", "view", "sex", "age",
           "follow_up", "finding_labels", *FINDINGS]  # fmt: skip
MAX_AGE = 120  # the 2017 CSV has a few impossible ages (up to 414): read as unknown
DOWNLOAD = ("https://nihcc.app.box.com/v/ChestXray-NIHCC (or Kaggle's nih-chest-xrays/data): "
            "Data_Entry_2017*.csv, train_val_list.txt, test_list.txt and the images_0xx archives")  # fmt: skip
NIH_SOURCE = "nih"  # the `source` of NIH images as COVID-task rows (read_nih)


def read_chestxray14(root: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """The NIH download as a table: one row per image that has metadata, an image and an official list.

    Columns: `COLUMNS` (path, image_id "chestxray14/<file>", patient_id "nih:<Patient ID>", source,
    published_split "train" (train_val_list.txt), "test" (test_list.txt) or "" when the folder has no
    official lists (noted in `report.notes`), view, sex, age, follow_up,
    finding_labels as written, then one 0/1 column per finding in FINDINGS order; "No Finding" is all 0).
    Rows that cannot be used are reported, never dropped silently: no image file -> `report.missing`;
    an unknown finding label, an image in neither or both list files, a repeated image name ->
    `report.skipped` with the reason.
    """
    root = Path(root)
    found = [root / name for name in CSV_NAMES if (root / name).is_file()]
    if not found:
        raise CXRError(f"{root}: no {' or '.join(CSV_NAMES)}; download ChestX-ray14 from {DOWNLOAD}")
    csv_path, report = found[0], ReadReport()
    if len(found) > 1:
        report.notes.append(f"read {csv_path.name}; {found[1].name} is also there and was not used")
    meta = read_csv(csv_path, ["Image Index", "Finding Labels", "Patient ID"], hint=DOWNLOAD)
    sex_column = next((c for c in ("Patient Gender", "Patient Sex") if c in meta.columns), None)

    listed = _official_lists(root, csv_path, report)
    files: dict[str, Path] = {}
    for pattern in IMAGE_GLOBS:
        for path in sorted(root.glob(pattern)):
            if path.name in files:
                report.notes.append(f"{path.name} is in two image folders; using {files[path.name]}")
            else:
                files[path.name] = path

    rows, seen, bad_ages = [], set(), 0
    for line, rec in enumerate(meta.to_dict("records"), start=2):  # line 1 is the header
        name, labels = rec["Image Index"], [t.strip() for t in rec["Finding Labels"].split("|")]
        unknown = [t for t in labels if t not in FINDINGS and t != NO_FINDING]
        why = ""
        if not name or not rec["Patient ID"]:
            why = f"{csv_path.name} line {line}: empty Image Index or Patient ID"
        elif name in seen:
            why = f"{name}: a second metadata row (line {line}); the first was kept"
        elif unknown or (NO_FINDING in labels and len(labels) > 1):
            why = (f"{name}: unknown finding label(s) {unknown} in 'Finding Labels' (line {line}); expected "
                   f"'{NO_FINDING}' or names from {', '.join(FINDINGS)}" if unknown else
                   f"{name}: '{NO_FINDING}' together with findings ({rec['Finding Labels']}, line {line})")  # fmt: skip
        elif listed and (name in listed["train"]) == (name in listed["test"]):
            where = "both" if name in listed["train"] else "neither"
            why = f"{name}: listed in {where} of {LISTS['train']} and {LISTS['test']}"
        if why:
            report.skipped.append(why)
            continue
        seen.add(name)
        if name not in files:
            report.missing.append(name)
            continue
        age = _age(rec.get("Patient Age", ""))
        bad_ages += age > MAX_AGE
        pid = rec["Patient ID"]
        rows.append({
            "path": str(files[name].resolve()), "image_id": f"{SOURCE}/{name}",
            "patient_id": f"nih:{int(pid)}" if pid.isdigit() else f"nih:{pid}", "source": SOURCE,
            "published_split": "" if not listed else "train" if name in listed["train"] else "test",
            "view": rec.get("View Position", ""), "sex": rec.get(sex_column, "") if sex_column else "",
            "age": age if age <= MAX_AGE else np.nan, "follow_up": rec.get("Follow-up #", ""),
            "finding_labels": rec["Finding Labels"], **{f: int(f in labels) for f in FINDINGS},
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["age"] = table["age"].astype(float)
    if bad_ages:
        report.notes.append(f"{bad_ages} row(s) with an age above {MAX_AGE} (a known error of the 2017 CSV): "
                            "age unknown")
    if report.missing:
        report.notes.append(f"{len(report.missing)} metadata row(s) have no image file under {root} "
                            f"({', '.join(IMAGE_GLOBS)}): an archive not downloaded or not extracted?")  # fmt: skip
    unused = len(set(files) - set(meta["Image Index"]))
    if unused:
        report.notes.append(f"{unused} PNG file(s) in the image folders have no metadata row: not used")
    if table.empty:
        raise CXRError(f"{root}: no usable image ({len(report.missing)} without a file, {len(report.skipped)} skipped)")
    return table, report


def _official_lists(root: Path, csv_path: Path, report: ReadReport) -> dict[str, set[str]]:
    """The official train/test lists, or {} (noted) when neither file is there: subsets such as the
    910-image NIH sample ship without them. One list without the other is an incomplete download."""
    paths = {split: root / name for split, name in LISTS.items()}
    present = [p for p in paths.values() if p.is_file()]
    if not present:
        report.notes.append(f"{root}: no official split lists ({', '.join(LISTS.values())}); published_split "
                            "is empty and any split is a seeded patient-disjoint one")  # fmt: skip
        return {}
    if len(present) < len(paths):
        lost = next(p for p in paths.values() if not p.is_file())
        raise CXRError(f"{lost} not found: the official split ships as two lists; put {lost.name} next to "
                       f"{csv_path.name} (from {DOWNLOAD}) or remove both lists")  # fmt: skip
    return {split: set(path.read_text().split()) for split, path in paths.items()}


def _age(text: str) -> float:
    """'58', or '058Y' as in NIH's first release -> 58.0; '' -> NaN."""
    match = re.match(r"\s*(\d+)", str(text))
    return float(match.group(1)) if match else float("nan")


# --- pretraining ---------------------------------------------------------------------------------


def read_nih(root: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """NIH ChestX-ray14 (all of it or a subset) as COVID-task rows: adults without COVID-19.

    "No Finding" -> normal; any label list containing Pneumonia -> pneumonia (subtype "Pneumonia" alone or
    "Pneumonia with other findings");
    other findings only (effusion, mass, ...) have no place in the task and go to `skipped`.
    Patient ids "nih:<Patient ID>", NIH's age, sex and view, source "nih"; published_split from the
    official lists, or "" without them (noted by the reader).
    """
    nih, report = read_chestxray14(root)
    normal, pneumonia = nih["finding_labels"] == NO_FINDING, nih["Pneumonia"] == 1
    for name, labels in nih.loc[~(normal | pneumonia), ["image_id", "finding_labels"]].itertuples(index=False):
        report.skipped.append(f"{name}: findings {labels!r} are neither {NO_FINDING!r} nor Pneumonia "
                              "(no class of the COVID task)")  # fmt: skip
    nih = nih[normal | pneumonia]
    rows = pd.DataFrame({
        "path": nih["path"], "image_id": NIH_SOURCE + "/" + nih["image_id"].str.split("/").str[-1],
        "label": np.where(normal[nih.index], "normal", "pneumonia"),
        "subtype": np.where(normal[nih.index], "normal", np.where(nih["finding_labels"] == "Pneumonia", "Pneumonia",
                                                                  "Pneumonia with other findings")),
        "patient_id": nih["patient_id"], "source": NIH_SOURCE, "published_split": nih["published_split"],
        "view": nih["view"], "sex": nih["sex"], "age": nih["age"], "location": "NIH Clinical Center, USA",
    })  # fmt: skip
    return as_table(rows.to_dict("records")), report
