"""`python -m cxrlib train | evaluate | predict`, end to end on a tiny synthetic set."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib import cli, config, metrics, train
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
    # On the training data, only the images the model never saw are scored: the run's own test split. The same
    # computation by construction: training scores its test split in fp32 (whatever amp trained in) in batches of
    # eval_batch_size (256: the whole split), and so does evaluate here. A smaller batch or bf16 would pick other
    # CPU kernels (bf16 autocast on an AVX512-BF16 CPU moved p_covid by 2e-4); 1e-6 allows float32 rounding only.
    assert cli.main(["evaluate", "--checkpoint", str(out / "model.pt"), "--manifest", str(train_csv),
                     "--out", str(tmp_path / "same"), "--n-boot", "20", "--batch-size", "256"]) == 0
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


def test_train_without_out_reads_the_data_once(tmp_path, monkeypatch, capsys):
    """The default folder is named by the data's fingerprint; that read also feeds the training."""
    csv = tiny_manifest(tmp_path / "hospital", per_class=3, seed=0)
    reads = []
    monkeypatch.setattr(train, "load_data", lambda cfg, real=train.load_data: reads.append(1) or real(cfg))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--task", "binary", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--batch-size", "4", "--manifest", str(csv), "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 0 and len(reads) == 1
    assert "run folder: runs/custom/" in capsys.readouterr().out
    assert cli.main(argv) == 0 and len(reads) == 2  # a complete folder: read once to check its fingerprint
    assert "already complete" in capsys.readouterr().out


def test_train_flags_are_the_runconfig_fields():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    dests = {a.dest for a in train_parser._actions} - {"help", "resume", "progress", "strict"}  # how to run, not what
    assert dests == {f.name for f in dataclasses.fields(RunConfig)}
    args = parser.parse_args(["train", "--coronahack", "C", "--extra-covid", "E", "--out", "O", "--no-augment",
                              "--lr", "0.01", "--alpha", "1,2,3"])
    assert (args.coronahack_dir, args.extra_covid_dir, args.run_dir, args.augment, args.lr, args.alpha) == (
        "C", "E", "O", False, 0.01, "1,2,3")
    assert not hasattr(args, "epochs")  # unset flags keep RunConfig's (or the profile's) defaults


def test_user_errors_print_a_message_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a choice outside config.CHOICES: argparse refuses it
        cli.main(["train", "--task", "ternary", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'ternary' (choose from 'binary', 'multiclass')" in err
    assert cli.main(["train", "--epochs", "0", "--out", str(tmp_path)]) == 2  # RunConfig's own checks
    err = capsys.readouterr().err
    assert "cxrlib train: error: parameter epochs must be at least 1, got 0" in err and "Traceback" not in err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "x.png"]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_evaluate_errors_name_the_checkpoint_and_have_one_prefix(tmp_path, capsys):
    """The old messages said "weights file" for a missing --checkpoint and "cxrlib evaluate: error: evaluate: ..."."""
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--manifest", str(tmp_path / "m.csv"),
                     "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"cxrlib evaluate: error: checkpoint {tmp_path / 'nope.pt'} does not exist" in err
    assert "weights file" not in err
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "give --manifest" in err and err.count("evaluate") == 1, err


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command line of the project: `python -m cxrlib <command>`, cxrlib.runs, cxrlib.bundle <command>,
    cxrlib.transport."""
    from cxrlib import bundle, runs, transport

    def subcommands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        return {f"{prefix} {k}": v for k, v in sub.choices.items()} if sub else {prefix: parser}

    return {**subcommands(cli.build_parser(), "cxrlib"), "cxrlib.runs": runs.build_parser(),
            **subcommands(bundle.build_parser(), "cxrlib.bundle"), "cxrlib.transport": transport.build_parser()}


CHOICE_LIKE = {*config.CHOICES, "profile", "extra_covid_axis", "executor"}


COMMANDS = ("cxrlib data", "cxrlib pretrain", "cxrlib train", "cxrlib evaluate", "cxrlib predict", "cxrlib results",
            "cxrlib verify",
            "cxrlib.runs", "cxrlib.bundle pack", "cxrlib.bundle render", "cxrlib.transport")


def test_the_commands_walked_are_all_there_are():
    assert sorted(command_parsers()) == sorted(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_its_default_choices_and_examples(name):
    parser = command_parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert action.help and action.help.strip(), f"{name} {action.dest}: no help"
        if action.option_strings and not action.required:
            assert "default" in shown, f"{name} {action.dest}: help does not show its default: {shown!r}"
        if action.dest in CHOICE_LIKE:
            assert action.choices, f"{name} {action.dest}: a choice without argparse choices"
        if action.dest in config.CHOICES:
            assert tuple(action.choices) == config.CHOICES[action.dest], f"{name} {action.dest}: not CHOICES"
    assert "examples:" in (parser.epilog or "") and f"-m {name.split()[0]}" in parser.epilog, name
    assert "examples:" in parser.format_help().split("options:")[-1]


def test_train_out_says_where_the_run_lands():
    text = command_parsers()["cxrlib train"].format_help()
    assert "(default: runs/<profile>/<data tag>/<run name>" in " ".join(text.split())


@pytest.mark.parametrize("argv", [["train", "--loss", "nope"], ["train", "--epochs", "0"],
                                  ["pretrain", "--backbone", "vgg"], ["evaluate", "--rows", "some"]])
def test_a_bad_argument_fails_before_torch_is_imported(argv, tmp_path):
    """Robust, not timed: `-X importtime` lists every module imported before the exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxrlib", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "cxrlib.config" in imported and "torch" not in imported


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


def test_the_matrix_makes_folders_absolute(tmp_path, monkeypatch):
    """Its chapters run from notebooks/: a folder given relative to the repository root must still be found."""
    from cxrlib import runs

    monkeypatch.chdir(tmp_path)
    args = runs.parse_args(["--coronahack-dir", "data/coronahack", "--extra-covid-dir", "", "--run-root", "r"])
    assert args.coronahack_dir == str(tmp_path / "data" / "coronahack") and args.run_root == str(tmp_path / "r")
    assert args.extra_covid_dir == ""  # not given stays not given


def test_chapters_default_folders_are_in_the_repository():
    """papermill from the repository root used to write the fine-tuning run to ../runs, outside the repository."""
    import re
    from pathlib import Path

    from cxrlib import book

    root = Path(__file__).resolve().parents[1]
    assert book.repo_path("runs") == root / "runs" and book.repo_path("runs").is_absolute()
    for chapter in ("01_data_analysis", "02_chexnet_transfer", "03_finetune", "05_results"):
        source = (root / "notebooks" / f"{chapter}.py").read_text()
        assert not re.search(r"""["']\.\./""", source), f"{chapter} has a path relative to notebooks/"


def test_cli_defaults_are_read_from_config_not_restated():
    import re
    from pathlib import Path

    source = Path(cli.__file__).read_text()
    assert not re.findall(r"""default=(?:-?\d|["'][^"']+["'])""", source)  # no literal default but "" and False
    for name in ("cxrlib train", "cxrlib pretrain"):
        flags = [a for a in command_parsers()[name]._actions if a.dest in config.RunConfig.__dataclass_fields__
                 or a.dest in config.PretrainConfig.__dataclass_fields__]
        assert flags and all(a.default is argparse.SUPPRESS for a in flags), name  # the profile, then the dataclass
    data = {a.dest: a.default for a in command_parsers()["cxrlib data"]._actions}
    assert (data["task"], data["seed"], data["split"]) == tuple(config.field_default(RunConfig, k)
                                                               for k in ("task", "seed", "split"))
