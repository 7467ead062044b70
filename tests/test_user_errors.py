"""Every mistake a user makes gets one clear line, fast; nothing is dropped without a word.

A bad flag, value or path fails before torch is imported and before any folder is made (checked in a subprocess
with `-X importtime`, which lists every module imported before the exit); an image or manifest row that cannot
be used is named, and the rest is still scored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib import bundle, cli, config, distributed, errors, evaluate, models, runs, train, transport
from cxrlib.config import PretrainConfig, RunConfig
from cxrlib.errors import CXRError
from helpers import tiny_manifest, write_dicom  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(cli.__file__).resolve().parents[1]
HEAVY = ("torch", "pandas")  # what a bad flag must not wait for


def run_module(module: str, argv: list[str], cwd: Path) -> tuple[int, list[str], set[str]]:
    """(exit code, stderr lines other than argparse's usage and -X importtime's, modules imported)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    said = [line for line in lines if not line.startswith("import time:") and ": error: " in line
            or line.startswith(("Traceback", "cxrlib"))]
    return done.returncode, said, imported


def assert_one_line_fast(module: str, argv: list[str], cwd: Path, *named: str) -> str:
    """Exit code 2, one error line naming `named`, no traceback, nothing heavy imported, nothing written."""
    before = sorted(cwd.iterdir())
    code, said, imported = run_module(module, argv, cwd)
    assert code == 2 and len(said) == 1, said
    assert all(text in said[0] for text in named), said[0]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert sorted(cwd.iterdir()) == before  # no run folder, no matrix.json
    return said[0]


# --- python -m cxrlib.runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--losses", "ce,bogus"], ["--losses", "'bogus'"]), (["--tasks", "bogus"], ["--tasks", "'bogus'"]),
    (["--seeds", "0"], ["--seeds", "got 0"]), (["--seeds", "-1"], ["--seeds", "got -1"]),
    (["--concurrent", "0"], ["--concurrent", "got 0"]), (["--time-budget", "-5"], ["--time-budget", "got -5"]),
    (["--arms", "random,bogus"], ["--arms", "'bogus'"]), (["--profile", "bogus"], ["--profile", "'bogus'"]),
    (["--variant-losses", "bogus"], ["--variant-losses", "'bogus'"]),
    (["--set", "lr=-1"], ["lr", "got -1"]), (["--set", "epochs=x"], ["epochs=x", "int"]),
    (["--set", "task=binary"], ["task", "--tasks"]), (["--set", "augment=maybe"], ["augment=maybe"]),
    (["--chest-init", "bogus"], ["bogus"]), (["--chest-init", "file:/missing.pt"], ["/missing.pt"]),
    (["--coronahack-dir", "/nope"], ["coronahack_dir", "/nope"]),
    (["--chestxray14-dir", "/nope"], ["chestxray14_dir", "/nope"]),
    (["--variants", "flip"], ["'flip'"]),
    (["--shard", "3/3"], ["--shard 3/3", "0 <= I < N"]), (["--shard=-1/2"], ["--shard -1/2"]),
    (["--shard", "a/b"], ["--shard a/b"]), (["--shard", "slurm"], ["SLURM_ARRAY_TASK_ID"]),
])
def test_the_matrix_refuses_a_bad_flag_before_reading_data_or_pretraining(argv, named, tmp_path):
    assert_one_line_fast("cxrlib.runs", argv, tmp_path, *named)


@pytest.mark.parametrize("module", ["cxrlib.runs", "cxrlib"])
def test_help_imports_nothing_heavy(module, tmp_path):
    """`python -m cxrlib.runs --help` took 8 s: the module imported the results tables (pandas) and main
    imported train (torch) before parsing."""
    code, said, imported = run_module(module, ["--help"], tmp_path)
    assert code == 0 and not said and not imported & set(HEAVY)


def test_set_values_are_typed_and_matrix_fields_are_refused():
    assert runs.parse_settings(["augment=no", "epochs=3", "lr=0.5"]) == {"augment": False, "epochs": 3, "lr": 0.5}
    for bad, why in (["seed=1"], "--seeds"), (["weights=imagenet"], "--arms"), (["image_size=big"], "int"):
        with pytest.raises(CXRError, match=why):
            runs.parse_settings(bad)


# --- python -m cxrlib train, and RunConfig for papermill and the matrix ---------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--lr", "-1"], ["lr", "greater than 0", "got -1"]), (["--lr", "0"], ["lr", "got 0"]),
    (["--gamma", "-2"], ["gamma", "got -2"]), (["--weight-decay", "-1"], ["weight_decay", "got -1"]),
    (["--val-frac", "1.5"], ["val_frac", "got 1.5"]), (["--test-frac", "0"], ["test_frac", "got 0"]),
    (["--val-frac", "0.5", "--test-frac", "0.6"], ["val_frac + test_frac", "0.5 + 0.6"]),
    (["--weights", "bogus"], ["'bogus'", "file:PATH"]), (["--weights", "file:/missing.pt"], ["/missing.pt"]),
    (["--weights", "chexnet:/missing"], ["no such file: /missing"]), (["--device", "tpu"], ["'tpu'", "cuda:N"]),
    (["--patience", "-1"], ["patience", "got -1"]), (["--num-workers", "-2"], ["num_workers", "got -2"]),
    (["--seed", "-1"], ["seed", "got -1"]),
    (["--coronahack", "/nope"], ["coronahack_dir", "/nope"]), (["--extra-covid", "/nope"], ["extra_covid_dir"]),
    (["--manifest", "/nope.csv"], ["manifest", "/nope.csv"]), (["--extra-negatives", "/nope"], ["extra_negatives"]),
    (["--external", "nih=/nope"], ["external nih", "/nope"]),
])
def test_train_refuses_a_bad_value_or_path_before_torch_and_any_folder(argv, named, tmp_path):
    line = assert_one_line_fast("cxrlib", ["train", *argv], tmp_path, *named)
    assert line.startswith("cxrlib train: error: ")


def test_the_checks_are_runconfigs_so_papermill_and_the_matrix_get_them():
    for bad in ({"lr": 0}, {"val_frac": 0.5, "test_frac": 0.5}, {"weights": "file:"}, {"device": "cuda:x"},
                {"num_workers": -1}):
        with pytest.raises(CXRError):
            RunConfig.from_parameters(bad)
    assert PretrainConfig(num_workers=-1).num_workers == -1  # pretraining's "per machine"
    with pytest.raises(CXRError, match="num_workers"):
        PretrainConfig(num_workers=-2)
    far = RunConfig(coronahack_dir="/data/of/another/machine", weights="file:/elsewhere/model.pt")
    with pytest.raises(CXRError, match="coronahack_dir"):  # a run made elsewhere is described; running it is checked
        config.check_paths(far)


def test_a_gpu_that_is_not_here_is_one_line_at_the_start(tmp_path, capsys):
    count = torch.cuda.device_count()
    with pytest.raises(CXRError, match=rf"'cuda:9' is not available: this machine has .*{count or 'no CUDA GPU'}"):
        distributed.resolve_device("cuda:9")
    assert cli.main(["train", "--device", "cuda:9", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda:9" in err[0] and not (tmp_path / "run").exists()
    with pytest.raises(CXRError, match="cuda:9"):  # the library's entry point too, before making the folder
        train.run(RunConfig(device="cuda:9"), tmp_path / "lib")
    assert not (tmp_path / "lib").exists()



@pytest.mark.parametrize("parameters, said", [
    ({"los": "focal"}, "03_finetune has no parameter 'los': did you mean 'loss'?"),
    ({"image_size": "abc"}, "03_finetune: parameter image_size='abc' is not of type int"),
])
def test_a_chapter_stops_at_a_misspelt_parameter_or_a_wrong_type_in_one_line(parameters, said, tmp_path):
    """`papermill 03_finetune.ipynb out.ipynb -p los focal` trained the default with only papermill's warning, and
    `-p image_size abc` died in int() deep in training: now the cell after the parameters stops, in one line."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as failed:  # papermill itself, as a user runs it
        papermill.execute_notebook(str(runs.NOTEBOOKS / "03_finetune.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={**parameters, "run_dir": str(tmp_path / "run")},
                                   cwd=str(runs.NOTEBOOKS), kernel_name="python3", progress_bar=False)
    error = failed.value
    assert (error.ename, error.evalue, error.traceback) == ("CXRError", said, [f"CXRError: {said}"])
    assert error.exec_count == 3 and not (tmp_path / "run").exists()  # parameters, papermill's, then this check


def test_chapter_parameters_types_them_and_spare_the_chapters_own_names():
    """Text converts as --set converts it; a chapter run twice in one kernel has its own names (metrics,
    classes) in its globals: they are no injected parameter."""
    from cxrlib import book

    declared, own = book.chapter_names("03_finetune")
    assert declared["profile"] == "quick" and declared["loss"] is None and {"metrics", "classes"} <= own
    namespace = {**declared, "In": [], "_i3": "", "image_size": "32", "weight_decay": 0.5, "metrics": {},
                 "classes": ["covid"], "get_ipython": print}
    values = book.chapter_parameters(namespace, "03_finetune", RunConfig)
    assert values["image_size"] == 32 and values["weight_decay"] == 0.5 and values["loss"] is None
    assert RunConfig.from_parameters(values).image_size == 32
    with pytest.raises(CXRError, match=r"parameter augment='maybe' is not of type bool \(1, true, yes, 0,"):
        book.chapter_parameters({**declared, "augment": "maybe"}, "03_finetune", RunConfig)
    with pytest.raises(CXRError, match=r"no parameter 'weight_decay' \(its parameters: coronahack_dir,"):
        book.chapter_parameters({"weight_decay": 0.5}, "05_results")  # without RunConfig's fields

# --- evaluate and predict -------------------------------------------------------------------------------------


@pytest.fixture
def not_a_checkpoint(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")  # torch.load said KeyError: 101
    return path


def test_results_refuses_a_folder_that_is_not_there_before_pandas(tmp_path):
    assert_one_line_fast("cxrlib", ["results", "/nope"], tmp_path, "RUN_ROOT: no such folder: /nope")

def test_a_text_file_as_checkpoint_is_named(not_a_checkpoint, tmp_path):
    for argv in (["predict", "--checkpoint", str(not_a_checkpoint), "x.png"],
                 ["evaluate", "--checkpoint", str(not_a_checkpoint), "--manifest", "m.csv", "--out", "o"]):
        assert_one_line_fast("cxrlib", argv, tmp_path, str(not_a_checkpoint), "is not a cxrlib checkpoint")
    with pytest.raises(CXRError, match="is not a cxrlib checkpoint"):  # the library's loader too
        evaluate.load_model(not_a_checkpoint)


def test_a_text_file_as_weights_is_named(not_a_checkpoint):
    """--weights file:notes.txt exists, so it passes the path check; reading it raised a bare KeyError."""
    with pytest.raises(CXRError, match=f"{not_a_checkpoint} is not a readable PyTorch weights file"):
        models.build_model("resnet50", f"file:{not_a_checkpoint}", 3)


@pytest.mark.parametrize("argv, named", [
    (["predict", "--batch-size", "0", "a.png"], ["--batch-size", "got 0"]),
    (["evaluate", "--n-boot", "-5", "--manifest", "m.csv", "--out", "o"], ["--n-boot", "got -5"]),
    (["evaluate", "--batch-size", "0", "--manifest", "m.csv", "--out", "o"], ["--batch-size", "got 0"]),
    (["predict", "--device", "tpu", "a.png"], ["--device", "'tpu'"]),
    (["evaluate", "--manifest", "/nope.csv", "--out", "o"], ["manifest", "/nope.csv"]),
])
def test_inference_inputs_are_checked_before_the_model_is_loaded(argv, named, checkpoint, tmp_path):
    command, *rest = argv
    assert_one_line_fast("cxrlib", [command, "--checkpoint", str(checkpoint), *rest], tmp_path, *named)


def test_predict_with_no_image_there_names_each_path_before_the_model_is_loaded(checkpoint, tmp_path):
    code, said, imported = run_module("cxrlib", ["predict", "--checkpoint", str(checkpoint), "/nope.png", "/nope"],
                                      tmp_path)
    assert code == 2 and not imported & set(HEAVY)
    assert said == ["cxrlib predict: skipped /nope.png: no such file or folder",
                    "cxrlib predict: skipped /nope: no such file or folder",
                    "cxrlib predict: error: no image to score: every path given is named above"]


def _png(path: Path, seed: int = 0) -> Path:
    """A smooth 40 px image, a different one per seed (pure noise would be scored with a warning: see
    test_user_safety)."""
    ramp = np.add.outer(np.arange(40), np.arange(40)) * 3
    pixels = (ramp + np.random.default_rng(seed).integers(0, 30)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_predict_scores_the_good_files_and_names_each_bad_one(checkpoint, tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    bad = [tmp_path / "notes.png", tmp_path / "empty.png", tmp_path / "missing.png", tmp_path / "nothing"]
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--json", str(good), *map(str, bad)]) == 0
    captured = capsys.readouterr()
    assert [row["path"] for row in json.loads(captured.out)] == [str(good)]
    err = captured.err.strip().splitlines()
    assert all(line.startswith("cxrlib predict: skipped ") for line in err)
    assert len(err) == len(bad) and all(any(str(path) in line for line in err) for path in bad), err
    assert "BytesIO" not in captured.err  # PIL names its buffer: "cannot identify image file <_io.BytesIO ...>"
    assert f"cannot identify image file {tmp_path / 'notes.png'}" in captured.err


def test_predict_with_nothing_readable_is_one_error_line(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cxrlib predict: error: no image could be read: ")
    assert str(tmp_path / "notes.png") in err[0] and "BytesIO" not in err[0]


def test_predict_reads_a_folder_as_its_image_files_sorted(checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    _png(scans / "b.PNG", 1)
    Image.open(_png(scans / "c.png", 2)).convert("RGB").save(scans / "a.jpg")
    write_dicom(scans / "d.dcm", np.asarray(Image.open(scans / "c.png")))
    (scans / "notes.txt").write_text("not scored")
    _png(scans / "sub" / "deeper.png")
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--json", str(scans)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in rows] == ["a.jpg", "b.PNG", "c.png", "d.dcm"]


def test_evaluate_names_what_it_did_not_score(checkpoint, tmp_path, capsys):
    """Missing, unreadable and duplicate images used to shrink n silently ("unreadable": [] in metrics.json)."""
    csv = tiny_manifest(tmp_path / "hospital", per_class=2, seed=0)
    folder = csv.parent.resolve()  # the manifest reader's paths
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "copy.png").write_bytes((folder / "covid-0-0.png").read_bytes())
    extra = pd.DataFrame({"path": ["gone.png", "text.png", "empty.png", "copy.png"], "label": ["covid"] * 4})
    pd.concat([pd.read_csv(csv), extra]).to_csv(csv, index=False)
    out = tmp_path / "external"
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(csv), "--out", str(out),
                     "--n-boot", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{out}: n=6 ")
    assert printed[1].startswith("not scored: 1 missing (gone.png); 2 unreadable (") and "1 duplicates (" in printed[1]
    m = json.loads((out / "metrics.json").read_text())
    skipped = m["skipped"]
    assert m["n"] == 6 and skipped["missing"] == ["gone.png"] and len(skipped["duplicates"]) == 1
    assert sorted(Path(item.partition(": ")[0]).name for item in skipped["unreadable"]) == ["empty.png", "text.png"]
    assert all(item.count(str(folder / "text.png")) == 2 or "empty" in item for item in skipped["unreadable"])
    assert "BytesIO" not in json.dumps(skipped)


# --- one error wrapper ----------------------------------------------------------------------------------------


def _raise(err: BaseException):
    """A command body (or a patched train.run) that fails with `err`."""
    def work(*args, **kwargs) -> None:
        raise err

    return work


def test_report_turns_errors_interrupts_and_failed_writes_into_one_line(capsys):
    assert errors.report("prog", lambda: 0) == 0
    assert errors.report("prog", _raise(CXRError("bad value"))) == 2
    assert capsys.readouterr().err == "prog: error: bad value\n"
    assert errors.report("prog", _raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "prog: interrupted; rerun the same command to continue\n"
    assert errors.report("prog", _raise(PermissionError(13, "Permission denied", "/runs/x/metrics.json"))) == 2
    assert capsys.readouterr().err == "prog: error: /runs/x/metrics.json: Permission denied\n"


def test_every_command_line_reports_through_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "run", _raise(KeyboardInterrupt()))
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == ("cxrlib train: interrupted; rerun it with --resume to continue from the last "
                                       "finished epoch\n")
    assert runs.main(["--set", "lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("cxrlib.runs: error: parameter lr ")
    assert transport.main([str(tmp_path / "nope"), str(tmp_path / "copy")]) == 2
    assert capsys.readouterr().err == f"cxrlib.transport: error: {tmp_path / 'nope'}: not a folder\n"
    assert bundle.main(["pack", str(tmp_path / "nope"), str(tmp_path / "b"), "--scratch"]) == 2
    assert capsys.readouterr().err.startswith(f"cxrlib.bundle pack: error: {tmp_path / 'nope'}")


# --- one usage per command, one flag name per concept ---------------------------------------------------------


def test_a_subcommands_argparse_error_shows_that_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", "--checkpoint", "m.pt", "--out", "o", "--rows", "some"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: cxrlib evaluate ")
    assert err.strip().splitlines()[-1].startswith("cxrlib evaluate: error: argument --rows: invalid choice: 'some'")


def test_data_and_pretrain_take_the_dir_spellings_of_train_and_the_matrix():
    parser = cli.build_parser()
    for flags in (["--coronahack", "C", "--extra-covid", "E"], ["--coronahack-dir", "C", "--extra-covid-dir", "E"]):
        for command in ("data", "train", "evaluate"):
            extra = ["--checkpoint", "m", "--out", "o"] if command == "evaluate" else []
            args = parser.parse_args([command, *flags, *extra])
            assert (args.coronahack_dir, args.extra_covid_dir) == ("C", "E"), command
    for flag in ("--chestxray14", "--chestxray14-dir"):
        assert parser.parse_args(["pretrain", flag, "X"]).chestxray14 == "X"
