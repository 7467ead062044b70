"""Which images may appear in the published book (thumbnails, Grad-CAM overlays), and their captions.

Only images whose licence allows redistribution: CoronaHack's paediatric images (Kermany et al. 2018,
CC BY 4.0), NIH ChestX-ray14 (no restrictions) and ieee8023 rows licensed CC BY, CC BY-SA, CC0,
Apache-2.0 or public domain. NC, ND, empty or unclear licences are never shown. CoronaHack's COVID-19
and SARS images are copies of ieee8023 images and follow the ieee8023 row's `license`.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .audit import origin
from .config import LABELS
from .errors import CXRError

OPEN_LICENCES = re.compile(r"^(cc[ -]?by|cc[ -]?by[ -]sa|cc0|apache[ -]?2(\.0)?|public domain)( \d(\.\d)?)?$")
KERMANY = "Kermany et al. 2018, CC BY 4.0"
NIH = "NIH Clinical Center, no restrictions; cite Wang et al. 2017"
NIH_SOURCES = ("nih", "chestxray14")
SYNTHETIC = "synthetic image made by cxrlib, MIT"


def open_licence(licence: str) -> bool:
    """Whether an ieee8023 `license` value allows redistribution (CC BY[-SA] [4.0], CC0, Apache-2.0,
    public domain); NC, ND, empty and free-text values ("listed as authorized for everyone") do not."""
    text = " ".join(str(licence).lower().replace("_", " ").split())
    return bool(OPEN_LICENCES.match(text))


def _kind(table: pd.DataFrame) -> pd.Series:
    """kermany | nih | ieee8023 | other, from where each image was taken (not only its `source`)."""
    where = origin(table)
    nih = table["source"].astype(str).str.lower().isin(NIH_SOURCES) | table["patient_id"].astype(str).str.startswith("nih:")
    kind = where.map({"guangzhou": "kermany", "ieee8023": "ieee8023"}).fillna("other")
    return kind.mask(nih, "nih")


def redistributable(table: pd.DataFrame, synthetic: bool = False) -> pd.Series:
    """True for the rows whose image may be published; `synthetic`: the table is cxrlib's synthetic data."""
    if synthetic:
        return pd.Series(True, index=table.index, name="redistributable")
    licence = table["license"] if "license" in table else pd.Series("", index=table.index)
    kind = _kind(table)
    allowed = kind.isin(["kermany", "nih"]) | ((kind == "ieee8023") & licence.fillna("").map(open_licence))
    return allowed.rename("redistributable")


def caption(row: pd.Series, synthetic: bool = False) -> str:
    """"source, licence" for one redistributable row (a thumbnail's caption); CXRError for any other row."""
    if synthetic:
        return SYNTHETIC
    kind = _kind(row.to_frame().T).iloc[0]
    if kind == "kermany":
        return KERMANY
    if kind == "nih":
        return NIH
    if kind == "ieee8023" and open_licence(row.get("license", "")):
        return f"ieee8023 (Cohen et al. 2020), {row['license']}"
    raise CXRError(f"{row.get('image_id', row.name)}: not redistributable (licence {row.get('license', '')!r}); "
                     "filter with licences.redistributable first")


def sample_per_class(table: pd.DataFrame, per_class: int, seed: int, synthetic: bool = False,
                     labels: tuple[str, ...] = LABELS) -> list[int]:
    """Positions (iloc) of up to `per_class` redistributable images of each label, drawn with `seed`: the sample
    a chapter may show. A label with fewer such images gives fewer."""
    rng = np.random.default_rng(seed)
    shareable = redistributable(table, synthetic=synthetic).to_numpy()
    picks: list[int] = []
    for label in labels:
        rows = np.flatnonzero((table["label"].to_numpy() == label) & shareable)
        picks += [int(i) for i in rng.choice(rows, min(per_class, len(rows)), replace=False)]
    return picks
