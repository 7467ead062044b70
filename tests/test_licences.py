"""Only redistributable images may reach the published book: checked on hand-made and real rows."""

from __future__ import annotations

import pandas as pd
import pytest

from cxrlib import data, licences
from cxrlib.errors import CXRError


def _rows() -> pd.DataFrame:
    return pd.DataFrame([
        {"image_id": "coronahack/person1_virus_1.jpeg", "source": "coronahack", "patient_id": "kermany:person1", "license": ""},
        {"image_id": "coronahack/IM-0001-0001.jpeg", "source": "coronahack", "patient_id": "kermany:IM-1", "license": ""},
        {"image_id": "ieee8023/a.jpg", "source": "ieee8023", "patient_id": "ieee8023:1", "license": "CC BY 4.0"},
        {"image_id": "ieee8023/b.jpg", "source": "ieee8023", "patient_id": "ieee8023:2", "license": "CC BY-NC-SA"},
        {"image_id": "ieee8023/c.jpg", "source": "ieee8023", "patient_id": "ieee8023:3", "license": "CC BY-NC-ND 4.0"},
        {"image_id": "ieee8023/d.jpg", "source": "ieee8023", "patient_id": "ieee8023:4", "license": ""},
        {"image_id": "ieee8023/e.jpg", "source": "ieee8023", "patient_id": "ieee8023:5", "license": "listed as authorized for everyone"},
        {"image_id": "ieee8023/f.jpg", "source": "ieee8023", "patient_id": "ieee8023:6", "license": "CC0"},
        {"image_id": "ieee8023/g.jpg", "source": "ieee8023", "patient_id": "ieee8023:7", "license": "Apache-2.0"},
        {"image_id": "ieee8023/h.jpg", "source": "ieee8023", "patient_id": "ieee8023:8", "license": "CC BY-SA 4.0"},
        {"image_id": "ieee8023/i.jpg", "source": "ieee8023", "patient_id": "ieee8023:9", "license": "public domain"},
        # CoronaHack's copy of an ieee8023 image: follows the ieee8023 row's licence (carried over by dedup)
        {"image_id": "coronahack/covid1.jpg", "source": "coronahack", "patient_id": "ieee8023:1", "license": "CC BY"},
        {"image_id": "coronahack/covid2.jpg", "source": "coronahack", "patient_id": "ieee8023:2", "license": "CC BY-NC-SA 4.0"},
        {"image_id": "coronahack/covid3.jpg", "source": "coronahack", "patient_id": "coronahack:covid3.jpg", "license": ""},
        {"image_id": "chestxray14/00000001_000.png", "source": "chestxray14", "patient_id": "nih:1", "license": ""},
        {"image_id": "nih/x.png", "source": "nih", "patient_id": "nih:2", "license": ""},
        {"image_id": "hospital/x.png", "source": "hospital", "patient_id": "hospital:1", "license": "CC BY"},
    ])


EXPECTED = [True, True, True, False, False, False, False, True, True, True, True, True, False, False, True, True, False]


def test_redistributable_hand_made_rows():
    rows = _rows()
    assert licences.redistributable(rows).tolist() == EXPECTED


def test_without_a_licence_column_only_kermany_and_nih():
    rows = _rows().drop(columns="license")
    assert licences.redistributable(rows).tolist() == [e and i in (0, 1, 14, 15) for i, e in enumerate(EXPECTED)]


def test_synthetic_tables_are_ours_to_publish():
    rows = _rows()
    assert licences.redistributable(rows, synthetic=True).all()
    assert "synthetic" in licences.caption(rows.iloc[3], synthetic=True)


def test_captions_name_source_and_licence():
    rows = _rows()
    assert licences.caption(rows.iloc[0]) == licences.KERMANY and "CC BY 4.0" in licences.KERMANY
    assert licences.caption(rows.iloc[14]) == licences.NIH and "Wang et al. 2017" in licences.NIH
    assert licences.caption(rows.iloc[2]).endswith(", CC BY 4.0") and "ieee8023" in licences.caption(rows.iloc[2])
    assert licences.caption(rows.iloc[11]).endswith(", CC BY")
    with pytest.raises(CXRError, match="ieee8023/b.jpg: not redistributable"):
        licences.caption(rows.iloc[3])


def test_real_ieee8023_licences(real_data):
    """The collection's own `license` values: only CC BY rows (8 in this copy, before filtering views) pass."""
    root = real_data / "covid-chestxray-dataset"
    table, _ = data.read_ieee8023(root)
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    licence = table.image_id.str.removeprefix("ieee8023/").map(dict(zip(meta.filename, meta.license.str.strip())))
    assert table.license.tolist() == licence.tolist()  # the reader keeps the collection's own column
    ok = licences.redistributable(table)
    assert 0 < ok.sum() <= 8
    assert set(table.license[ok]) <= {"CC BY", "CC BY 4.0"}
    assert not table.license[~ok].str.fullmatch("CC BY( 4.0)?").any()
    assert all(licences.caption(r).startswith("ieee8023") for _, r in table[ok].iterrows())


def test_real_coronahack_rows(real_data):
    """Kermany's paediatric images pass; CoronaHack's COVID-19 copies have no licence of their own."""
    table, _ = data.read_coronahack(real_data / "coronahack")
    ok = licences.redistributable(table)
    kermany = table.patient_id.str.startswith("kermany:")
    assert ok[kermany].all() and not ok[~kermany].any()
    assert (~kermany & (table.label == "covid")).sum() > 0


def test_sample_per_class_draws_only_publishable_images_per_label():
    rows = _rows().assign(label=["normal", "pneumonia", "covid", "covid", "covid", "covid", "covid", "covid", "covid",
                                 "covid", "covid", "covid", "covid", "covid", "normal", "normal", "normal"])
    picks = licences.sample_per_class(rows, per_class=2, seed=0)
    shown = rows.iloc[picks]
    assert licences.redistributable(shown).all() and shown.label.value_counts().to_dict() == {
        "covid": 2, "pneumonia": 1, "normal": 2}  # pneumonia has only one publishable image
    assert picks == licences.sample_per_class(rows, per_class=2, seed=0)
    assert len(licences.sample_per_class(rows, per_class=4, seed=0)) == 4 + 1 + 3  # normal: 3 of 4 publishable
    assert len(licences.sample_per_class(rows, per_class=4, seed=0, synthetic=True)) == 4 + 1 + 4
