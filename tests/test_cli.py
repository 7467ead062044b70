"""`python -m cxrlib train | evaluate | predict`, end to end on a tiny synthetic set."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib import cli, metrics, train
from cxrlib.config import RunConfig
from helpers import tiny_manifest, write_dicom  # noqa: E402  (tests/ is on sys.path under pytest)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fast_metrics(monkeypatch):
    """Few bootstrap resamples: CIs are tested in test_metrics; here only the plumbing."""
    monkeypatch.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))


def test_train_evaluate_predict_end_to_end(tmp_path, capsys):
    train_csv = tiny_manifest(tmp_path / "hospital_a", seed=0)
    other_csv = tiny_manifest(tmp_path / "hospital_b", per_class=3, seed=1)
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "multiclass", "--loss", "focal", "--gamma", "2", "--alpha", "0.5,0.25,0.25",
                     "--backbone", "resnet50", "--weights", "none", "--image-size", "32", "--epochs", "1",
                     "--batch-size", "4", "--manifest", str(train_csv), "--seed", "3", "--device", "cpu",
                     "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "majority-class baseline" in printed
    for name in ("model.pt", "metrics.json", "predictions.csv", "history.csv", "params.json"):
        assert (out / name).is_file(), name
    params = json.loads((out / "params.json").read_text())["config"]
    assert params["loss"] == "focal" and params["alpha"] == [0.5, 0.25, 0.25] and params["seed"] == 3

    assert cli.main(["evaluate", "--checkpoint", str(out / "model.pt"), "--manifest", str(other_csv),
                     "--out", str(tmp_path / "external"), "--n-boot", "20", "--batch-size", "1"]) == 0
    pred = pd.read_csv(tmp_path / "external" / "predictions.csv")
    assert len(pred) == 9  # external validation: every manifest row is scored
    m = json.loads((tmp_path / "external" / "metrics.json").read_text())
    assert m["n"] == 9 and m["rows"] == "auto" and "macro_f1" in m and m["checkpoint"].endswith("model.pt")
    assert m["rows_note"].startswith("left out 0 of 9")
    # On the training data, only the images the model never saw are scored: the run's own test split.
    assert cli.main(["evaluate", "--checkpoint", str(out / "model.pt"), "--manifest", str(train_csv),
                     "--out", str(tmp_path / "same"), "--n-boot", "20", "--batch-size", "4"]) == 0
    again, original = (pd.read_csv(d / "predictions.csv") for d in (tmp_path / "same", out))
    assert again.image_id.tolist() == original.image_id.tolist()
    pd.testing.assert_frame_equal(again, original, atol=1e-6)

    # predict: the evaluation pipeline's probabilities (batch size 1 on both sides, so the same kernels run);
    # a DICOM of the same pixels gives the same answer.
    first = pred.iloc[0]
    pixels = np.asarray(Image.open(first["path"]).convert("L")).copy()
    pixels[0, 0], pixels[0, 1] = 0, 255  # full range: DICOM decoding stretches min..max
    Image.fromarray(pixels).save(tmp_path / "same.png")
    write_dicom(tmp_path / "same.dcm", pixels)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(out / "model.pt"), first["path"], str(tmp_path / "same.png"),
                     str(tmp_path / "same.dcm"), "--json", "--batch-size", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [first["path"], str(tmp_path / "same.png"), str(tmp_path / "same.dcm")]
    probs = [[r[f"p_{c}"] for c in ("covid", "pneumonia", "normal")] for r in rows]
    np.testing.assert_allclose(probs[0], [first[f"p_{c}"] for c in ("covid", "pneumonia", "normal")], atol=1e-6)
    np.testing.assert_allclose(probs[1], probs[2], atol=1e-6)
    assert cli.main(["predict", "--checkpoint", str(out / "model.pt"), str(tmp_path / "same.png")]) == 0
    assert "p_covid" in capsys.readouterr().out  # the table form


def test_train_flags_are_the_runconfig_fields():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    dests = {a.dest for a in train_parser._actions} - {"help", "resume", "progress"}
    assert dests == {f.name for f in dataclasses.fields(RunConfig)}
    args = parser.parse_args(["train", "--coronahack", "C", "--extra-covid", "E", "--out", "O", "--no-augment",
                              "--lr", "0.01", "--alpha", "1,2,3"])
    assert (args.coronahack_dir, args.extra_covid_dir, args.run_dir, args.augment, args.lr, args.alpha) == (
        "C", "E", "O", False, 0.01, "1,2,3")
    assert not hasattr(args, "epochs")  # unset flags keep RunConfig's (or the profile's) defaults


def test_user_errors_print_a_message_without_traceback(tmp_path, capsys):
    assert cli.main(["train", "--task", "ternary", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cxrlib train: error: parameter task='ternary': choose one of binary, multiclass" in err and "Traceback" not in err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "x.png"]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "e")]) == 2
    assert "give --manifest" in capsys.readouterr().err


@pytest.mark.parametrize("profile, epochs", [("quick", 2), ("custom", 10)])
def test_profile_gives_defaults_and_flags_override(profile, epochs, monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(train, "run", fake_run)
    with pytest.raises(Stop):
        cli.main(["train", "--profile", profile, "--lr", "0.5", "--out", str(tmp_path)])
    assert seen["cfg"].epochs == epochs and seen["cfg"].lr == 0.5
