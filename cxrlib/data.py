"""Data: readers (CoronaHack, ieee8023, manifest) -> one table -> dedup -> patient-disjoint split.

One row per image; columns in `COLUMNS` (contract), plus `image_hash` after `load_table` (hash of the
decoded 64x64 image, used for dedup and for the leakage check) and `split` after `split_table`.
Problems with the data are never silent: rows without an image go to `ReadReport.missing`, rows that
cannot be used (unreadable image, unknown finding) to `.skipped`, removed copies to `.duplicates`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

from .config import LABELS, classes, task_label
from .errors import CXRError
from .images import ImageCache, file_digest
from .synthetic import CORONAHACK_IMAGES, ensure_synthetic

COLUMNS = ["path", "image_id", "label", "subtype", "patient_id", "source", "published_split",
           "view", "sex", "age", "location", "site", "license"]  # fmt: skip
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")
SPLITS = ("train", "val", "test")
DEDUP_SIZE = 64  # duplicates = same pixels after decoding and resizing to this size
SOURCE_ORDER = {"coronahack": 0, "ieee8023": 1, "nih": 2}  # which copy of a duplicate is kept (others after)
NIH_SOURCE = "nih"
LABEL_PRIORITY = ("covid", "pneumonia", "normal")  # a patient's stratum is its rarest label
# ieee8023 findings that are pneumonias but not COVID-19 (June 2020 names and the newer
# "Pneumonia/<Viral|Bacterial|Fungal>/<agent>" parts); anything containing "pneumonia" also counts.
OTHER_PNEUMONIA = {
    "sars", "mers", "mers-cov", "pneumocystis", "streptococcus", "klebsiella", "e.coli", "legionella",
    "varicella", "influenza", "h1n1", "bacterial", "viral", "fungal", "chlamydophila", "staphylococcus",
    "nocardia", "aspergillosis", "herpes", "candida", "mycoplasma", "lipoid",
}  # fmt: skip


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


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the table, every contract column present ("" for text, NaN for age)."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    text = [c for c in COLUMNS if c != "age"]
    table[text] = table[text].fillna("").astype(str)
    table["age"] = pd.to_numeric(table["age"], errors="coerce").astype(float)
    return table


def _read_csv(path: Path, required: list[str], hint: str) -> pd.DataFrame:
    """A metadata CSV as text, or CXRError naming the file or the missing column."""
    if not path.is_file():
        raise CXRError(f"{path} not found: {hint}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:  # older ieee8023 metadata.csv files are Latin-1
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="latin-1")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CXRError(f"{path}: cannot parse as CSV ({err})") from err
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
    meta = _read_csv(csv, ["X_ray_image_name", "Label", "Dataset_type", "Label_1_Virus_category",
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
    return _frame(rows), report


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
    meta = _read_csv(csv, ["patientid", "finding", "view", "modality", "filename"],
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
    return _frame(rows), report


def _site(url: str) -> str:
    """The web site an ieee8023 image was taken from ("radiopaedia.org", "sirm.org", a journal): its source."""
    host = urlparse(url).netloc.lower()
    return host[4:] if host.startswith("www.") else host


def read_manifest(csv_path: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """Your own images: a CSV with `path,label` and optional `patient_id,split,source,view`.

    Paths are relative to the CSV's folder (absolute ones work too); label is covid, pneumonia or
    normal; split (optional) is train, val or test and is used by split mode "published".
    Without patient_id every image counts as its own patient (noted: patient-disjointness then rests
    on your file layout).
    """
    csv = Path(csv_path)
    meta = _read_csv(csv, ["path", "label"], "check the --manifest path")
    report, rows, seen = ReadReport(), [], {}
    if "patient_id" not in meta.columns:
        report.notes.append(f"{csv}: no patient_id column; each image is treated as its own patient")
    for line, r in enumerate(meta.to_dict("records"), start=2):
        label, raw = r["label"].lower(), r["path"]
        if label not in LABELS:
            raise CXRError(f"{csv}, row {line} ({raw}): unknown label {r['label']!r}; use one of {', '.join(LABELS)}")
        if not raw:
            raise CXRError(f"{csv}, row {line}: empty path")
        if raw in seen:
            raise CXRError(f"{csv}, row {line}: path {raw} already listed on row {seen[raw]}")
        seen[raw] = line
        split = r.get("split", "").lower()
        if split not in ("", *SPLITS):
            raise CXRError(f"{csv}, row {line} ({raw}): unknown split {r['split']!r}; use train, val, test or leave empty")
        path = Path(raw) if Path(raw).is_absolute() else csv.parent / raw
        if not path.is_file():
            report.missing.append(raw)
            continue
        source = r.get("source") or "manifest"
        rows.append({"path": str(path.resolve()), "image_id": f"{source}/{raw}", "label": label,
                     "subtype": label, "patient_id": f"{source}:{r.get('patient_id') or raw}",
                     "source": source, "published_split": split, "view": r.get("view", "")})  # fmt: skip
    if report.missing:
        report.notes.append(f"{csv}: {len(report.missing)} listed image(s) not found")
    return _frame(rows), report


def read_nih(root: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """NIH ChestX-ray14 (all of it or a subset) as COVID-task rows: adults without COVID-19.

    "No Finding" -> normal; any label list containing Pneumonia -> pneumonia (subtype "Pneumonia" alone or
    "Pneumonia with other findings");
    other findings only (effusion, mass, ...) have no place in the task and go to `skipped`.
    Patient ids "nih:<Patient ID>", NIH's age, sex and view, source "nih"; published_split from the
    official lists, or "" without them (noted by the reader).
    """
    from .chestxray14 import NO_FINDING, read_chestxray14  # chestxray14 imports this module

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
    return _frame(rows.to_dict("records")), report


def read_any(where: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """A CSV (manifest) or a folder in any layout a reader knows: ChestX-ray14, CoronaHack or ieee8023."""
    from .chestxray14 import CSV_NAMES

    path = Path(where)
    if path.is_file():
        return read_manifest(path)
    if not path.is_dir():
        raise CXRError(f"{path} not found: give a folder (ChestX-ray14, CoronaHack or ieee8023 layout) or a "
                       "manifest CSV")  # fmt: skip
    layouts = ((CSV_NAMES, read_nih), (("Chest_xray_Corona_Metadata.csv",), read_coronahack),
               (("metadata.csv",), read_ieee8023))  # fmt: skip
    for names, reader in layouts:
        if any((path / name).is_file() for name in names):
            return reader(path)
    raise CXRError(f"{path}: no Data_Entry_2017.csv, Chest_xray_Corona_Metadata.csv or metadata.csv; "
                   "cannot tell its layout (a manifest CSV works for any images)")  # fmt: skip


def read_extra_negatives(where: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """`read_any` for images that must not be COVID-19 (e.g. NIH adults): a COVID row is an error."""
    table, report = read_any(where)
    covid = table["label"] == "covid"
    if covid.any():
        raise CXRError(f"extra_negatives {where}: {int(covid.sum())} row(s) labelled covid (e.g. "
                       f"{table.loc[covid, 'image_id'].iloc[0]}); extra negatives must be pneumonia or normal")  # fmt: skip
    return table, report


def _dedup(table: pd.DataFrame, report: ReadReport, cache: ImageCache) -> pd.DataFrame:
    """Remove copies: same file name in two sources, or same decoded pixels (at DEDUP_SIZE) anywhere.

    The kept copy is CoronaHack's, then ieee8023's, then others'. All patient ids of one duplicate
    group are merged into one (the ieee8023 id when there is one, so CoronaHack's copies of ieee8023
    images join their real patient), and the kept row fills empty sex/age/view/location/site/license from the
    removed ones (so CoronaHack's COVID copies carry their ieee8023 row's licence). Unreadable images are
    skipped and reported here, before any split.
    """
    images, skipped = cache.load(table["path"].tolist())
    bad = {p for p, _ in skipped}
    report.skipped += [f"{p}: {why}" for p, why in skipped]
    table = table[~table["path"].isin(bad)].copy()
    table["image_hash"] = [hashlib.sha1(img.tobytes()).hexdigest() for img in images]
    table["_order"] = table["source"].map(SOURCE_ORDER).fillna(len(SOURCE_ORDER))
    table = table.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    table["_name"] = table["path"].map(lambda p: Path(p).name)

    remove: dict[int, int] = {}  # removed row -> kept row
    for _, group in table.groupby("_name", sort=False):
        if group["source"].nunique() > 1:
            kept = group.index[0]
            for i in group.index[1:]:
                if group.at[i, "source"] != group.at[kept, "source"]:
                    remove[i] = kept
                    if group.at[i, "image_hash"] != group.at[kept, "image_hash"]:
                        report.notes.append(f"{table.at[i, 'image_id']} and {table.at[kept, 'image_id']}: "
                                            "same file name, different pixels; treated as the same image")  # fmt: skip
    for _, group in table.drop(index=list(remove)).groupby("image_hash", sort=False):
        for i in group.index[1:]:
            remove[i] = group.index[0]

    merged = 0
    for removed, kept in remove.items():
        ids = {table.at[kept, "patient_id"], table.at[removed, "patient_id"]}
        ieee = sorted(i for i in ids if i.startswith("ieee8023:"))
        canonical = ieee[0] if ieee else table.at[kept, "patient_id"]
        for other in ids - {canonical}:
            table.loc[table["patient_id"] == other, "patient_id"] = canonical
            merged += 1
        for column in ("sex", "view", "location", "site", "license"):
            if not table.at[kept, column]:
                table.at[kept, column] = table.at[removed, column]
        if pd.isna(table.at[kept, "age"]):
            table.at[kept, "age"] = table.at[removed, "age"]
        if table.at[kept, "label"] != table.at[removed, "label"]:
            report.notes.append(f"{table.at[kept, 'image_id']} ({table.at[kept, 'label']}) is a copy of "
                                f"{table.at[removed, 'image_id']} ({table.at[removed, 'label']}); kept the first label")  # fmt: skip
        report.duplicates.append((table.at[removed, "image_id"], table.at[kept, "image_id"]))
    if remove:
        report.notes.append(f"dedup: removed {len(remove)} duplicate image(s); merged {merged} patient id(s) into "
                            "the id of their copy (CoronaHack copies of ieee8023 images take the ieee8023 patient)")  # fmt: skip
    return table.drop(index=list(remove)).drop(columns="_name").reset_index(drop=True)


def load_table(
    coronahack_dir: str = "", extra_covid_dir: str = "", manifest: str = "", cache: ImageCache | None = None,
    extra_negatives: str = "",
) -> tuple[pd.DataFrame, ReadReport]:
    """Read every given source, merge, drop unreadable images and duplicates (all reported).

    With no CoronaHack, ieee8023 or manifest source, the synthetic default (`ensure_synthetic()`).
    `extra_negatives` (`read_extra_negatives`: e.g. the NIH adults) joins with its own patients.
    Decodes each image once into the DEDUP_SIZE cache; later calls only look the files up.
    """
    report = ReadReport()
    if not (coronahack_dir or extra_covid_dir or manifest):
        coronahack_dir, extra_covid_dir = map(str, ensure_synthetic())
        report.notes.append(f"no data given: using the synthetic default in {Path(coronahack_dir).parent}")
    parts = []
    for reader, where in ((read_coronahack, coronahack_dir), (read_ieee8023, extra_covid_dir), (read_manifest, manifest),
                          (read_extra_negatives, extra_negatives)):  # fmt: skip
        if where:
            part, part_report = reader(where)
            parts.append(part.assign(extra_negative=reader is read_extra_negatives))
            report.extend(part_report)
    table = pd.concat(parts, ignore_index=True) if parts else _frame([])
    if table.empty:
        raise CXRError("no usable images in " + ", ".join(p for p in (coronahack_dir, extra_covid_dir, manifest,
                                                                      extra_negatives) if p))
    table = _dedup(table, report, cache or ImageCache(DEDUP_SIZE))
    return table, report


def extra_negative_rows(table: pd.DataFrame) -> pd.Series:
    """Rows that joined as `extra_negatives` (split on their own, so the other rows keep their split)."""
    if "extra_negative" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["extra_negative"].fillna(False).astype(bool)


def load_external(where: str, cache: ImageCache | None = None) -> tuple[pd.DataFrame, ReadReport]:
    """An external set (`read_any`: any layout or a manifest) with `image_hash`, copies within it removed.

    The hash is what `train.evaluate` matches against the images a model trained or validated on.
    """
    table, report = read_any(where)
    if table.empty:
        raise CXRError(f"{where}: no usable image (missing: {len(report.missing)}, skipped: {len(report.skipped)})")
    return _dedup(table, report, cache or ImageCache(DEDUP_SIZE)), report


def encode_labels(table: pd.DataFrame, task: str) -> np.ndarray:
    """Class indices (into `config.classes(task)`) of the table's rows."""
    names = classes(task)
    return np.array([names.index(task_label(label, task)) for label in table["label"]], dtype=np.int64)


def _allocate(units: pd.DataFrame, fracs: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Patients -> split, per stratum, so each split gets about its share of the stratum's images.

    `units`: one row per patient (patient_id, n images, stratum). In each stratum the patients are
    shuffled; the first ones seed every split (so each split sees each stratum when it has enough
    patients), then each next patient goes to the split furthest below its target.
    """
    order = sorted(fracs, key=lambda s: fracs[s])  # smallest share first when seeding
    out: dict[str, str] = {}
    for _, group in units.sort_values("patient_id").groupby("stratum", sort=True):
        group = group.iloc[rng.permutation(len(group))]
        total = group["n"].sum()
        counts = dict.fromkeys(fracs, 0)
        for k, (pid, n) in enumerate(zip(group["patient_id"], group["n"])):
            if k < len(order) and len(group) >= len(order):
                split = order[k]
            else:
                split = max(order, key=lambda s: fracs[s] * total - counts[s])
            out[pid] = split
            counts[split] += n
    return out


def _units(table: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: its image count and stratum (rarest label, source of its first image)."""
    rank = table["label"].map({label: i for i, label in enumerate(LABEL_PRIORITY)})
    grouped = table.assign(rank=rank).groupby("patient_id", sort=True)
    units = grouped.agg(n=("rank", "size"), rank=("rank", "min"), source=("source", "first")).reset_index()
    units["stratum"] = units["rank"].astype(str) + "/" + units["source"]
    return units


HOLD_OUT_COLUMNS = ("country", "location", "site", "source", "view", "sex")


def _column(table: pd.DataFrame, column: str) -> pd.Series:
    """A table column as lower-case text; "country" is the last comma-separated part of `location`."""
    if column == "country":
        return table["location"].astype(str).str.split(",").str[-1].str.strip().str.lower()
    return table[column].astype(str).str.strip().str.lower()


def held_out(table: pd.DataFrame, spec: str) -> pd.Series:
    """Rows of every patient with a row matching `spec` ("column=value", e.g. "country=Italy",
    "site=sirm.org"; case-insensitive, whole value), as a boolean Series; "" holds nothing out."""
    if not spec:
        return pd.Series(False, index=table.index)
    column, _, value = spec.partition("=")
    column, value = column.strip(), value.strip().lower()
    if column not in HOLD_OUT_COLUMNS or not value:
        raise CXRError(f"parameter hold_out={spec!r}: use column=value with column one of "
                       f"{', '.join(HOLD_OUT_COLUMNS)} (see data.source_sizes for the values)")  # fmt: skip
    match = _column(table, column) == value
    if not match.any():
        raise CXRError(f"parameter hold_out={spec!r}: no image has {column} {value!r} (see data.source_sizes)")
    return table["patient_id"].isin(table.loc[match, "patient_id"])


def source_sizes(table: pd.DataFrame, columns: Sequence[str] = ("country", "site"), label: str = "covid",
                 min_images: int = 20) -> pd.DataFrame:
    """Images and patients of `label` per value of each column: which sources can be held out.

    One row per (column, value) with `images`, `patients` and `enough` (>= `min_images`), largest first;
    the `hold_out` parameter takes "<column>=<value>". Empty values are left out.
    """
    rows = table[table["label"] == label]
    out = []
    for column in columns:
        values = _column(rows, column)
        for value, group in rows[values != ""].groupby(values[values != ""]):
            out.append({"column": column, "value": value, "images": len(group),
                        "patients": group["patient_id"].nunique(), "hold_out": f"{column}={value}"})
    frame = pd.DataFrame(out, columns=["column", "value", "images", "patients", "hold_out"])
    frame["enough"] = frame["images"] >= min_images
    return frame.sort_values(["column", "images"], ascending=[True, False], ignore_index=True)


def split_table(
    table: pd.DataFrame, task: str, seed: int = 0, mode: str = "patient", val_frac: float = 0.15,
    test_frac: float = 0.15, hold_out: str = "",
) -> pd.DataFrame:
    """Add `split` (train/val/test): patient-disjoint, stratified by label and source, from `seed`.

    mode "patient": a fresh split of all patients (the default: the published TEST has no COVID-19).
    mode "published": CoronaHack's TRAIN/TEST kept; val carved out of TRAIN by patient; rows with no
    published split (ieee8023, manifests without split) split 3-way by patient; a patient on both
    sides of the published split (170 Kermany person numbers) is moved to train, noted in
    `result.attrs["notes"]`. `hold_out` (`held_out`) sends every patient of one source to test only,
    before the split of the rest. Every split must hold every class of `task`; then `check_no_leakage`.
    """
    names = classes(task)
    if mode not in ("patient", "published"):
        raise CXRError(f"split mode {mode!r}: choose patient or published")
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise CXRError(f"val_frac={val_frac}, test_frac={test_frac}: each must be in (0, 1) and their sum below 1")
    table = table.reset_index(drop=True)
    present = {task_label(label, task) for label in table["label"]}
    for name in names:
        if name not in present:
            raise CXRError(f"task {task}: class {name!r} has no image in the table; add data with that label "
                           f"or use another task")  # fmt: skip
    rng = np.random.default_rng(seed)
    fracs = {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac}
    held = held_out(table, hold_out)
    extra = extra_negative_rows(table)
    units = _units(table[~held & ~extra])
    notes: list[str] = []
    if held.any():
        notes.append(f"hold_out {hold_out}: {int(held.sum())} image(s) of {table.loc[held, 'patient_id'].nunique()} "
                     "patient(s) are in test only; the rest is split as usual")  # fmt: skip
    if mode == "patient":
        assignment = _allocate(units, fracs, rng)
    else:
        sides = table[~held & (table["published_split"] != "")].groupby("patient_id")["published_split"].agg(set)
        crossing = sides[sides.map(lambda s: {"train", "test"} <= s)].index
        if len(crossing):
            moved = table["patient_id"].isin(crossing) & (table["published_split"] == "test")
            notes.append(f"published split: {len(crossing)} patient(s) had images in both TRAIN and TEST; "
                         f"moved their {int(moved.sum())} TEST image(s) to train")  # fmt: skip
        pinned = sides.map(lambda s: "train" if "train" in s else ("test" if "test" in s else "val"))
        free = units[~units["patient_id"].isin(pinned.index)]
        inner = {"train": 1 - val_frac / (1 - test_frac), "val": val_frac / (1 - test_frac)}
        assignment = {**pinned[pinned != "train"].to_dict(),
                      **_allocate(units[units["patient_id"].isin(pinned[pinned == "train"].index)], inner, rng),
                      **(_allocate(free, fracs, rng) if len(free) else {})}  # fmt: skip
    if extra.any():  # own generator: the other rows' split is that of the run without extra negatives
        assignment.update(_allocate(_units(table[extra & ~held]), fracs, np.random.default_rng([seed, 1])))
    out = table.copy()
    out["split"] = out["patient_id"].map(assignment).where(~held, "test")
    for split in SPLITS:
        if not (out["split"] == split).any():
            raise CXRError(f"split {split!r} is empty: {out['patient_id'].nunique()} patients are too few for "
                           f"val_frac={val_frac}, test_frac={test_frac}; add data or change the fractions")  # fmt: skip
        in_split = {task_label(label, task) for label in out.loc[out["split"] == split, "label"]}
        for name in names:
            if name not in in_split:
                hint = ("the published TEST has no COVID-19: add --extra-covid or use --split patient"
                        if mode == "published" else "too few patients of that class: add data or change the fractions")
                raise CXRError(f"split {split!r} has no image of class {name!r} ({hint})")
    check_no_leakage(out)
    out.attrs["notes"] = notes
    return out


def check_no_leakage(table: pd.DataFrame) -> None:
    """CXRError if a patient, or an image (same `image_hash`, else same file content), is in two splits."""
    if "split" not in table.columns:
        raise CXRError("check_no_leakage needs a table with a `split` column (use split_table)")
    hashes = table["image_hash"] if "image_hash" in table.columns else table["path"].map(file_digest)
    for key, values in (("patient", table["patient_id"]), ("image hash", hashes)):
        sides = table["split"].groupby(values.to_numpy()).agg(lambda s: sorted(set(s)))
        leaks = sides[sides.map(len) > 1]
        if len(leaks):
            first = leaks.index[0]
            raise CXRError(f"leakage: {len(leaks)} {key}(s) on two sides of the split, e.g. {key} {first} "
                           f"in {', '.join(leaks.iloc[0])}")  # fmt: skip


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so a balanced set gets weight 1: n / (n_classes * count)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    if (counts == 0).any():
        raise CXRError(f"class index {int(np.argmin(counts))} has no example; cannot weight by inverse frequency")
    return len(labels) / (n_classes * counts.astype(np.float64))


def weighted_sampler(labels: np.ndarray, n_classes: int, seed: int) -> torch.utils.data.WeightedRandomSampler:
    """Draws each class about equally often (with replacement), one epoch = len(labels) draws.

    `.class_counts` and `.class_weights` are attached for logging.
    """
    labels = np.asarray(labels, dtype=np.int64)
    weights = class_weights(labels, n_classes)
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights[labels], dtype=torch.double), num_samples=len(labels), replacement=True,
        generator=torch.Generator().manual_seed(int(seed)),
    )  # fmt: skip
    sampler.class_counts = np.bincount(labels, minlength=n_classes)
    sampler.class_weights = weights
    return sampler


def _count(table: pd.DataFrame, by: str, column: str) -> dict:
    counts = table.groupby([by, column]).size()
    return {k: {c: int(n) for c, n in counts[k].items()} for k in counts.index.get_level_values(0).unique()}


def summarize(table: pd.DataFrame, report: ReadReport) -> dict:
    """Counts and checks of a (split) table, JSON-ready: what `python -m cxrlib data` prints."""
    t = table if "split" in table.columns else table.assign(split="all")
    order = [s for s in (*SPLITS, "all") if s in set(t["split"])]
    leakage, leakage_detail = False, "no patient and no image on two sides"
    if "split" not in table.columns:
        leakage_detail = "not split yet"
    else:
        try:
            check_no_leakage(t)
        except CXRError as err:
            leakage, leakage_detail = True, str(err)
    counts, subtypes, sources = _count(t, "split", "label"), _count(t, "split", "subtype"), _count(t, "split", "source")
    return {
        "n_images": len(t),
        "n_patients": int(t["patient_id"].nunique()),
        "missing": len(report.missing),
        "missing_files": list(report.missing),
        "duplicates_removed": len(report.duplicates),
        "duplicates": [list(d) for d in report.duplicates],
        "skipped": list(report.skipped),
        "counts": {s: counts[s] for s in order},
        "subtypes": {s: subtypes[s] for s in order},
        "sources": {s: sources[s] for s in order},
        "patients": {s: int(t.loc[t["split"] == s, "patient_id"].nunique()) for s in order},
        "leakage": leakage,
        "leakage_detail": leakage_detail,
        "notes": list(report.notes) + list(table.attrs.get("notes", [])),
        "fingerprint": data_fingerprint(table),
    }


def format_summary(summary: dict, show: int = 10) -> str:
    """`summarize`'s dict as plain-text tables (the CLI's default output); lists cut after `show` items."""

    def table(title: str, nested: dict) -> str:
        frame = pd.DataFrame(nested).fillna(0).astype(int).sort_index()
        frame.loc["total"] = frame.sum()
        return f"{title}\n{frame.to_string()}\n"

    def listing(title: str, items: list[str]) -> str:
        more = [f"  ... and {len(items) - show} more"] if len(items) > show else []
        return "\n".join([f"{title}: {len(items)}"] + [f"  {item}" for item in items[:show]] + more)

    patients = ", ".join(f"{split} {n}" for split, n in summary["patients"].items())
    verdict = "LEAKAGE" if summary["leakage"] else "passed"
    return "\n".join([
        f"images: {summary['n_images']}   patients: {summary['n_patients']}   fingerprint: {summary['fingerprint']}\n",
        table("images per label and split", summary["counts"]),
        table("images per subtype and split", summary["subtypes"]),
        table("images per source and split", summary["sources"]),
        f"patients per split: {patients}\n",
        listing("metadata rows without an image", summary["missing_files"]),
        listing("duplicates removed", [f"{removed}  (copy of {kept})" for removed, kept in summary["duplicates"]]),
        listing("rows skipped", summary["skipped"]),
        listing("notes", summary["notes"]),
        f"leakage check: {verdict}: {summary['leakage_detail']}",
    ])  # fmt: skip


def data_fingerprint(table: pd.DataFrame) -> str:
    """Short hash of which images, with which labels, are in which split: identifies a data set-up."""
    split = table["split"] if "split" in table.columns else pd.Series("", index=table.index)
    lines = sorted(f"{i}\t{label}\t{s}" for i, label, s in zip(table["image_id"], table["label"], split))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]
