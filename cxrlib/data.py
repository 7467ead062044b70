"""Data: the readers' tables (readers.py, chestxray14.py) -> one table -> dedup -> patient-disjoint split.

One row per image; columns in `readers.COLUMNS` (contract), plus `image_hash` after `load_table` (hash of the
decoded 64x64 image, used for dedup and for the leakage check) and `split` after `split_table`.
Problems with the data are never silent: rows without an image go to `ReadReport.missing`, rows that
cannot be used (unreadable image, unknown finding) to `.skipped`, removed copies to `.duplicates`.
Merge, dedup, split and the leakage check stay together (about 410 lines): they act on one table through
its patient and image-hash columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.utils.class_weight import compute_class_weight

from .chestxray14 import CSV_NAMES, read_nih
from .config import ADULT_AGE, classes, data_sources, hold_out_terms, task_label
from .errors import CXRError
from .images import ImageCache, file_digest
from .readers import SPLITS, ReadReport, as_table, read_coronahack, read_ieee8023, read_manifest
from .synthetic import ensure_synthetic

DEDUP_SIZE = 64  # duplicates = same pixels after decoding and resizing to this size
SOURCE_ORDER = {"coronahack": 0, "ieee8023": 1, "nih": 2}  # which copy of a duplicate is kept (others after)
LABEL_PRIORITY = ("covid", "pneumonia", "normal")  # a patient's stratum is its rarest label


def read_any(where: str | Path) -> tuple[pd.DataFrame, ReadReport]:
    """A CSV (manifest) or a folder in any layout a reader knows: ChestX-ray14, CoronaHack or ieee8023."""
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
    if not data_sources(coronahack_dir, extra_covid_dir, manifest):
        coronahack_dir, extra_covid_dir = map(str, ensure_synthetic())
        report.notes.append(f"no data given: using the synthetic default in {Path(coronahack_dir).parent}")
    parts = []
    for reader, where in ((read_coronahack, coronahack_dir), (read_ieee8023, extra_covid_dir), (read_manifest, manifest),
                          (read_extra_negatives, extra_negatives)):  # fmt: skip
        if where:
            part, part_report = reader(where)
            parts.append(part.assign(extra_negative=reader is read_extra_negatives))
            report.extend(part_report)
    table = pd.concat(parts, ignore_index=True) if parts else as_table([])
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

    The hash is what `evaluate.evaluate` matches against the images a model trained or validated on.
    """
    table, report = read_any(where)
    if table.empty:
        raise CXRError(f"{where}: no usable image (missing: {len(report.missing)}, skipped: {len(report.skipped)})")
    return _dedup(table, report, cache or ImageCache(DEDUP_SIZE)), report


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


HOLD_OUT_COLUMNS = ("country", "location", "site", "source", "view", "sex", "collection", "covid")


def column_values(table: pd.DataFrame, column: str) -> pd.Series:
    """A table column as lower-case text; "country" is the last comma-separated part of `location`,
    "collection" the collection a patient id names (kermany, ieee8023, nih: a CoronaHack copy of an ieee8023
    image is ieee8023's), "covid" yes or no."""
    if column == "country":
        return table["location"].astype(str).str.split(",").str[-1].str.strip().str.lower()
    if column == "collection":
        return table["patient_id"].astype(str).str.partition(":")[0].str.lower()
    if column == "covid":
        return table["label"].eq("covid").map({True: "yes", False: "no"})
    return table[column].astype(str).str.strip().str.lower()


def held_out(table: pd.DataFrame, spec: str) -> pd.Series:
    """Rows of every patient with a row matching `spec` (config.hold_out_terms: "country=Italy",
    "country=Italy;collection=ieee8023&covid=no"; case-insensitive, whole values), as a boolean Series;
    "" holds nothing out. A term that matches no image is an error, not an empty hold-out."""
    match = pd.Series(False, index=table.index)
    for term in hold_out_terms(spec):
        hit = pd.Series(True, index=table.index)
        for column, value in term:
            if column not in HOLD_OUT_COLUMNS:
                raise CXRError(f"parameter hold_out={spec!r}: unknown column {column!r}; use column=value with column one "
                               f"of {', '.join(HOLD_OUT_COLUMNS)} (see data.source_sizes for the values)")  # fmt: skip
            hit &= column_values(table, column) == value.lower()
        if not hit.any():
            raise CXRError(f"parameter hold_out={spec!r}: no image has {' and '.join(f'{c} {v!r}' for c, v in term)} "
                           "(see data.source_sizes)")
        match |= hit
    return table["patient_id"].isin(table.loc[match, "patient_id"])


def in_cohort(table: pd.DataFrame, cohort: str) -> pd.Series:
    """Rows a run of `cohort` keeps: all, or "adults": age >= ADULT_AGE, or age unknown outside the paediatric
    Guangzhou collection (kermany: children aged 1-5); NIH images record every age, so NIH children go."""
    if cohort == "all":
        return pd.Series(True, index=table.index)
    age = pd.to_numeric(table["age"], errors="coerce")
    return (age >= ADULT_AGE) | (age.isna() & (column_values(table, "collection") != "kermany"))


def source_sizes(table: pd.DataFrame, columns: Sequence[str] = ("country", "site"), label: str = "covid",
                 min_images: int = 20) -> pd.DataFrame:
    """Images and patients of `label` per value of each column: which sources can be held out.

    One row per (column, value) with `images`, `patients` and `enough` (>= `min_images`), largest first;
    the `hold_out` parameter takes "<column>=<value>". Empty values are left out.
    """
    rows = table[table["label"] == label]
    out = []
    for column in columns:
        values = column_values(rows, column)
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


def without_extra_covid(table: pd.DataFrame) -> pd.Series:
    """Rows a run with extra_covid_train=False keeps: all but the ieee8023-only COVID-19 images of the train split.

    Validation and test stay those of the run with the extra images, so early stopping, the threshold and the
    scored images are the same on both sides of the comparison; only the training images differ.
    """
    extra = table["source"].eq("ieee8023") & table["label"].eq("covid") & table["split"].eq("train")
    return ~extra


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
    """Inverse class frequency, scaled so a balanced set gets weight 1: n / (n_classes * count) (scikit-learn's
    "balanced"). The weighted sampler draws by these; loss=weighted_ce weights the cross-entropy by them."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise CXRError(f"class index {int(np.argmin(counts))} has no example; cannot weight by inverse frequency")
    return compute_class_weight("balanced", classes=np.arange(n_classes), y=labels)


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
