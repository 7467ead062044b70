"""ChestX-ray14: the NIH reader (official lists; bad rows reported, not dropped), the seeded patient-disjoint
split, multi-label AUROC, the synthetic set's learnable signs, pretraining in one process and under torchrun
(2 gloo processes: rank 0 alone writes), and its model.pt as weights=file: for fine-tuning.

Everything runs on a synthetic NIH-layout set at 32 px (seconds on a CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import CXRError, metrics
from cxrlib.chestxray14 import COLUMNS, FINDINGS, read_chestxray14
from cxrlib.cli import main
from cxrlib.images import ImageCache
from cxrlib.models import build_model
from cxrlib.pretrain import PretrainConfig, finding_scores, pretrain, split_chestxray14
from cxrlib.synthetic import ensure_chestxray14, make_chestxray14

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(weights="none", image_size=32, epochs=1, batch_size=8, device="cpu", num_workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    return make_chestxray14(tmp_path_factory.mktemp("nih") / "ChestX-ray14", n=120, seed=0)


@pytest.fixture
def nih_copy(nih, tmp_path) -> Path:
    return Path(shutil.copytree(nih, tmp_path / "nih"))


def test_findings_are_the_official_fourteen_in_order():
    assert FINDINGS == ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                        "Hernia")  # fmt: skip


def test_synthetic_layout_is_nih(nih):
    header = (nih / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                      "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # fmt: skip
    assert sorted(p.name for p in nih.glob("images_*")) == ["images_001", "images_002"]
    train, test = (set((nih / name).read_text().split()) for name in ("train_val_list.txt", "test_list.txt"))
    assert not train & test and train | test == {p.name for p in nih.glob("images_*/images/*.png")}


def test_ensure_chestxray14_builds_once(tmp_path):
    first = ensure_chestxray14(tmp_path, n=12)
    stamp = (first / "Data_Entry_2017.csv").stat().st_mtime_ns
    assert ensure_chestxray14(tmp_path, n=12) == first and (first / "COMPLETE").is_file()
    assert (first / "Data_Entry_2017.csv").stat().st_mtime_ns == stamp
    assert len(read_chestxray14(first)[0]) >= 12


def test_reader_reads_labels_lists_and_reports_bad_rows(nih_copy):
    csv = nih_copy / "Data_Entry_2017.csv"
    meta = pd.read_csv(csv)
    first, second, third = meta["Image Index"].iloc[:3]
    # Bad rows: an unknown label (a new image, listed), a missing image, an image in neither list.
    shutil.copy(nih_copy / "images_001" / "images" / first, nih_copy / "images_001" / "images" / "09999999_000.png")
    with open(csv, "a") as f:
        f.write("09999999_000.png,Covid|Effusion,0,9999999,50,M,PA,2500,2048,0.143,0.143,\n")
    with open(nih_copy / "train_val_list.txt", "a") as f:
        f.write("09999999_000.png\n")
    (nih_copy / "images_001" / "images" / second).unlink()
    for name in ("train_val_list.txt", "test_list.txt"):
        path = nih_copy / name
        path.write_text("".join(f"{n}\n" for n in path.read_text().split() if n != third))

    table, report = read_chestxray14(nih_copy)
    assert list(table.columns) == COLUMNS
    assert len(table) == len(meta) - 2
    assert report.missing == [second]
    assert any(s.startswith("09999999_000.png: unknown finding label(s) ['Covid']") for s in report.skipped)
    assert any(s.startswith(f"{third}: listed in neither") for s in report.skipped)
    assert len(report.skipped) == 2
    assert any("age above 120" in n for n in report.notes) and table["age"].max() <= 120

    row = meta.set_index("Image Index").loc[table["image_id"].str.removeprefix("chestxray14/")]
    for name, labels, hot in zip(table["image_id"], row["Finding Labels"], table[list(FINDINGS)].to_numpy()):
        expected = [] if labels == "No Finding" else labels.split("|")
        assert [f for f, h in zip(FINDINGS, hot) if h] == sorted(expected, key=FINDINGS.index), name
    assert (table["patient_id"] == "nih:" + row["Patient ID"].astype(str).to_numpy()).all()
    test_names = set((nih_copy / "test_list.txt").read_text().split())
    assert (table["published_split"] == np.where(row.index.isin(test_names), "test", "train")).all()


def test_reader_v2020_csv_flat_images_and_missing_list(nih_copy):
    csv = nih_copy / "Data_Entry_2017.csv"
    csv.rename(nih_copy / "Data_Entry_2017_v2020.csv")
    text = (nih_copy / "Data_Entry_2017_v2020.csv").read_text().replace("Patient Gender", "Patient Sex", 1)
    (nih_copy / "Data_Entry_2017_v2020.csv").write_text(text)
    (nih_copy / "images").mkdir()
    for png in nih_copy.glob("images_*/images/*.png"):
        png.rename(nih_copy / "images" / png.name)
    table, report = read_chestxray14(nih_copy)
    assert len(table) == len(pd.read_csv(nih_copy / "Data_Entry_2017_v2020.csv"))
    assert set(table["sex"]) == {"M", "F"} and not report.missing and not report.skipped
    (nih_copy / "test_list.txt").unlink()
    with pytest.raises(CXRError, match="test_list.txt not found"):
        read_chestxray14(nih_copy)
    with pytest.raises(CXRError, match="Data_Entry_2017"):
        read_chestxray14(nih_copy / "images")


def test_split_keeps_the_official_test_list_and_is_patient_disjoint(nih):
    table, _ = read_chestxray14(nih)
    split = split_chestxray14(table, seed=0, val_frac=0.2)
    assert (split["split"] == "test").equals(split["published_split"] == "test")
    sides = split.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all()
    assert split["split"].value_counts().to_dict().keys() == {"train", "val", "test"}
    assert split["split"].equals(split_chestxray14(table, seed=0, val_frac=0.2)["split"])
    assert not split["split"].equals(split_chestxray14(table, seed=1, val_frac=0.2)["split"])
    # A patient on both sides of the official lists is leakage, named in the error.
    row = table[table["published_split"] == "test"].iloc[[0]]
    leaked = pd.concat([table, row.assign(image_id="chestxray14/copy.png", published_split="train")], ignore_index=True)
    with pytest.raises(CXRError, match=f"leakage: .*patient {row['patient_id'].iloc[0]} "):
        split_chestxray14(leaked, seed=0)


def test_reader_and_split_work_without_the_official_lists(nih_copy):
    for name in ("train_val_list.txt", "test_list.txt"):
        (nih_copy / name).unlink()
    table, report = read_chestxray14(nih_copy)
    assert set(table["published_split"]) == {""} and not report.skipped
    assert any("no official split lists" in note for note in report.notes)
    split = split_chestxray14(table, seed=0, val_frac=0.2)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    assert 0.15 < (split["split"] == "test").mean() < 0.35 and "no official split lists" in split.attrs["notes"][0]


def test_multilabel_auroc_per_finding_and_mean():
    rng = np.random.default_rng(0)
    y = (rng.random((200, len(FINDINGS))) < 0.3).astype(int)
    y[:, -1] = 0  # Hernia: no positive -> no AUROC, left out of the mean
    probs = rng.random(y.shape)
    probs[:, 1] = y[:, 1]  # Cardiomegaly predicted perfectly
    result = metrics.multilabel_auroc(y, probs, FINDINGS)
    assert result["per_finding"]["Cardiomegaly"] == 1.0
    assert result["per_finding"]["Hernia"] is None
    finite = [v for v in result["per_finding"].values() if v is not None]
    assert result["mean"] == pytest.approx(np.mean(finite)) and len(finite) == 13
    scores = finding_scores(y, probs)
    assert scores["mean_auroc"] == pytest.approx(result["mean"]) and np.isnan(scores["auroc_Hernia"])


def test_synthetic_findings_are_learnable(nih):
    """Drawn signs (cardiomegaly, effusion) separate positives from negatives: pretraining has a signal."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    table, _ = read_chestxray14(nih)
    x, _ = ImageCache(24).load(table["path"])
    x = x.reshape(len(x), -1) / 255.0
    for finding in ("Cardiomegaly", "Effusion"):
        y = table[finding].to_numpy()
        p = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000), x, y, cv=3, method="predict_proba")[:, 1]
        auroc = metrics.multilabel_auroc(y[:, None], p[:, None], [finding])["mean"]
        assert auroc > 0.75, (finding, auroc)


def test_pretrain_one_process_writes_a_complete_run_folder(nih, tmp_path):
    cfg = PretrainConfig(chestxray14=str(nih), backbone="densenet121", class_weighted=True, **TINY)
    out = pretrain(cfg, tmp_path / "run", progress=False)
    assert (out / "status").read_text() == "complete\n"
    assert {p.name for p in out.iterdir()} == {"model.pt", "history.csv", "metrics.json", "params.json", "status",
                                               "manifest.json"}  # manifest.json: what "complete" holds (rundir.seal)
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["per_finding_auroc"]) == set(FINDINGS) and "mean_auroc" in result
    finite = [v for v in result["per_finding_auroc"].values() if v is not None]
    assert result["mean_auroc"] == pytest.approx(np.mean(finite))  # the recorded mean is the findings' mean
    params = json.loads((out / "params.json").read_text())
    assert params["training"]["world_size"] == 1 and len(params["training"]["pos_weight"]) == len(FINDINGS)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [1]
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert pretrain(cfg, out) == out and (out / "model.pt").stat().st_mtime_ns == stamp  # complete: untouched
    with pytest.raises(CXRError, match="complete run with other parameters"):
        pretrain(PretrainConfig(**{**cfg.to_dict(), "lr": 1.0}), out)


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    code = main(["pretrain", "--chestxray14", str(tmp_path / "absent"), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--weights", "none"])  # fmt: skip
    assert code == 2 and f"no such folder: {tmp_path / 'absent'}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # checked before anything is written


SPY = """
    import json, os, sys
    from pathlib import Path

    written = []
    _replace = os.replace


    def replace(src, dst, *args, **kwargs):  # every atomic write of cxrlib ends in os.replace
        written.append(str(dst))
        return _replace(src, dst, *args, **kwargs)


    os.replace = replace
    from cxrlib.cli import main

    try:
        code = main(sys.argv[1:])
    finally:
        Path(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(written))
    sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_gloo_processes_rank0_writes_and_result_fine_tunes(nih, tmp_path):
    spy = tmp_path / "spy.py"
    spy.write_text(textwrap.dedent(SPY))
    out = tmp_path / "run"
    env = {**os.environ, "SPY_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    args = ["pretrain", "--chestxray14", str(nih), "--out", str(out), "--backbone", "resnet50"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(spy), *args], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "status").read_text() == "complete\n"
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == []  # rank 1 wrote nothing
    assert {Path(p).name for p in rank0} >= {"model.pt", "checkpoint-last.pt", "history.csv", "params.json",
                                             "metrics.json", "status"}  # fmt: skip
    assert not (out / "checkpoint-last.pt").exists()  # removed once complete
    assert json.loads((out / "params.json").read_text())["training"]["world_size"] == 2
    assert proc.stdout.count("pretrain: test mean AUROC") == 1  # rank 0 alone reports

    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert saved["classes"] == list(FINDINGS) and saved["state_dict"]["fc.weight"].shape == (len(FINDINGS), 2048)
    for num_classes in (2, 3):  # binary and 3-class fine-tuning heads
        model, report = build_model("resnet50", f"file:{out / 'model.pt'}", num_classes)
        backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
        assert report.loaded == backbone  # every backbone key matched
        assert report.reinitialised == ["fc.weight", "fc.bias"] and model.fc.out_features == num_classes
        state = model.state_dict()
        assert all(torch.equal(state[k], saved["state_dict"][k]) for k in backbone)
