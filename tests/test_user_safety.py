"""Nothing a user has is overwritten or mixed; a model that produced NaN scores nothing; nothing is dropped
without a word; failures on the way say where (issue 30).

The races run two real processes. The first writer is stopped (SIGSTOP) while it holds its run folder, so the
second always meets it however slow the machine, then let go (SIGCONT): both must end as said.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib import atomic, cli, config, models, rundir, runs, synthetic
from cxrlib.chestxray14 import FINDINGS
from cxrlib.errors import CXRError
from cxrlib.loop import FitOptions, fit
from helpers import tiny_cnn, tiny_data, tiny_manifest  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(cli.__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return tiny_manifest(tmp_path_factory.mktemp("tiny"), per_class=6)


def tiny(csv: Path, *more: str) -> list[str]:
    """`train` flags of a 32 px, 1-epoch CPU run of `csv`."""
    return ["train", "--manifest", str(csv), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--lr", "1e-3", "--patience", "0", "--device", "cpu", *more]


def env(**changes: str | None) -> dict[str, str]:
    """This test's environment for a child process: cxrlib from this tree, one thread (the cores are shared)."""
    values = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **changes}
    return {k: v for k, v in values.items() if v is not None}


def start(*argv: str, module: str = "cxrlib") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())


def wait_for(done: Callable[[], bool], process: subprocess.Popen, timeout: float = 900) -> None:
    """Poll until `done()`, failing if `process` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line or line.startswith("Traceback")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _status(folder: Path) -> str:
    path = folder / "status"
    return path.read_text().strip() if path.is_file() else ""


# --- one process per run folder ---------------------------------------------------------------------------


def test_a_second_train_on_a_folder_in_use_fails_at_once_naming_the_first(manifest, tmp_path):
    """Two trains with one --out mixed their runs: params.json said focal, the rest came from the CE run."""
    out = tmp_path / "run"
    first = start(*tiny(manifest, "--loss", "ce", "--out", str(out)))
    try:
        wait_for(lambda: _status(out) == "running", first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, "-m", "cxrlib", *tiny(manifest, "--loss", "focal", "--out", str(out))],
                                capture_output=True, text=True, timeout=900, env=env())
    finally:
        first.send_signal(signal.SIGCONT)
    said = error_lines(second.stderr)
    assert second.returncode == 2 and len(said) == 1, second.stderr
    assert said[0].startswith(f"cxrlib train: error: {out} is in use by process {first.pid} (")
    assert "-m cxrlib train" in said[0] and said[0].endswith("wait for it to finish, or choose another folder")
    assert first.wait(timeout=900) == 0, first.communicate()
    assert json.loads((out / "params.json").read_text())["config"]["loss"] == "ce"
    assert rundir.read_status(out) == "complete" and rundir.damage(out) == ""
    assert not (out / rundir.LOCK).exists()  # the lock goes with its holder


def test_two_matrices_pretrain_one_folder_once(tmp_path):
    """Two identical `cxrlib.runs` both pretrained into one folder; one then read the other's temporary file as
    damage. The matrix's pretraining stage now waits for the lock and finds the folder complete."""
    nih = synthetic.make_chestxray14(tmp_path / "nih", n=60, seed=0)
    root, ready = tmp_path / "root", tmp_path / "second-ready"
    code = ("import sys; from pathlib import Path; import cxrlib.pretrain; from cxrlib import runs; "
            "Path(sys.argv[3]).touch() if len(sys.argv) > 3 else None; "
            "print(runs.ensure_pretrained(Path(sys.argv[1]), 'quick', sys.argv[2], image_size=32, epochs=1, "
            "batch_size=8, num_workers=0, device='cpu').status)")
    folder = runs.pretrain_dir(root, "resnet50", str(nih))
    first = subprocess.Popen([sys.executable, "-c", code, str(root), str(nih)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for(lambda: _status(folder) == "running", first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.Popen([sys.executable, "-c", code, str(root), str(nih), str(ready)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        wait_for(ready.exists, second)
        time.sleep(1)  # the second reaches the lock (its imports are done) while the first is stopped
    finally:
        first.send_signal(signal.SIGCONT)
    outputs = [p.communicate(timeout=900) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == ["complete", "complete"]
    assert sum(out.count("pretrain: test mean AUROC") for out, _ in outputs) == 1  # pretrained once
    sealed = json.loads((folder / rundir.MANIFEST).read_text())["files"]
    assert not [name for name in sealed if name.endswith(".tmp")] and rundir.damage(folder) == ""


def test_a_process_the_holder_started_works_for_it(tmp_path):
    """The matrix holds a run's folder while papermill's kernel, its child, trains into it: the child passes."""
    code = ("import sys; from cxrlib import rundir\n"
            "with rundir.locked(sys.argv[1], wait=False): print('in')")
    with rundir.locked(tmp_path / "run"):
        child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                               timeout=900, env=env())
        assert child.returncode == 0 and child.stdout == "in\n", child.stderr
        assert (tmp_path / "run" / rundir.LOCK).read_text().startswith(f"{os.getpid()} (")
    assert not (tmp_path / "run" / rundir.LOCK).exists()


def test_the_seal_holds_what_the_run_wrote_never_a_temporary_or_a_users_file(tmp_path):
    run = tmp_path / "run"
    (run / "external" / "nih").mkdir(parents=True)
    for name in ("params.json", "metrics.json", "predictions.csv", "history.csv", "model.pt",
                 "external/nih/metrics.json", "external/nih/predictions.csv"):
        (run / name).write_text("{}")
    (run / ".checkpoint-last.pt.5ff232ac.tmp").write_bytes(b"half")  # another process's write in flight
    (run / "notes.txt").write_text("mine")
    rundir.seal(run)
    rundir.write_status(run, "complete")
    assert set(json.loads((run / "manifest.json").read_text())["files"]) == {
        "params.json", "metrics.json", "predictions.csv", "history.csv", "model.pt", "external/nih/metrics.json",
        "external/nih/predictions.csv"}
    (run / ".checkpoint-last.pt.5ff232ac.tmp").unlink()
    (run / "notes.txt").write_text("mine, edited")
    assert rundir.read_status(run) == "complete" and rundir.damage(run) == ""


@pytest.mark.parametrize("files, named", [
    ({"notes.txt": "mine"}, "notes.txt"),
    ({"metrics.json": "{}", "model.pt": "weights"}, "metrics.json"),  # run names, but no run's status: a user's
    ({"status": "failed: CXRError: boom\n", "checkpoint-last.pt": "x", "drafts/plan.md": "mine"}, "drafts/"),
], ids=["notes", "run-names", "folder"])
def test_train_out_refuses_a_folder_of_someone_elses_files_and_changes_nothing(files, named, manifest, tmp_path,
                                                                              capsys):
    """`train --out` deleted or replaced a user's metrics.json, history.csv, model.pt, ... and sealed the rest."""
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    assert cli.main(tiny(manifest, "--out", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cxrlib train: error: {out} holds {named}, which is no run's: give the run a new folder "
                   "(nothing in that one is changed)"]
    assert snapshot(out) == before


def test_train_out_refuses_an_unfinished_run_of_other_parameters(manifest, tmp_path, capsys):
    """A resumable run of the same parameters is continued; one of other parameters is neither cleared nor mixed."""
    out = tmp_path / "run"
    out.mkdir()
    saved = config.RunConfig.from_parameters({"manifest": str(manifest), "image_size": 32, "loss": "ce"})
    (out / "params.json").write_text(json.dumps({"config": saved.to_dict()}))
    (out / "status").write_text("failed: KeyboardInterrupt\n")
    (out / "checkpoint-last.pt").write_bytes(b"resumable")
    (out / "history.csv").write_text("epoch\n1\n")
    before = snapshot(out)
    for more in ([], ["--resume"]):
        assert cli.main(tiny(manifest, "--loss", "focal", "--out", str(out), *more)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cxrlib train: error: {out} is an unfinished run with other "
                                                   "parameters (") and "loss: 'ce' there, 'focal' asked" in err[0]
        assert snapshot(out) == before


def test_an_error_found_before_training_leaves_no_folder(tmp_path, capsys):
    """The split found no COVID-19 image after the data load; a folder holding only `status` was left behind."""
    csv = tiny_manifest(tmp_path / "no-covid", per_class=4)
    table = pd.read_csv(csv)
    table[table["label"] != "covid"].to_csv(csv, index=False)
    out = tmp_path / "new" / "deeper" / "run"
    assert cli.main(tiny(csv, "--task", "binary", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 'covid' has no image" in err[0]
    assert not (tmp_path / "new").exists()


# --- a model that produced NaN scores nothing ---------------------------------------------------------------


class NaNFrom(torch.nn.Module):
    """Cross-entropy, NaN from its `first`-th call on (training calls it once per batch)."""

    def __init__(self, first: int):
        super().__init__()
        self.first, self.calls = first, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if self.calls >= self.first else loss


def test_training_stops_at_the_first_non_finite_loss_naming_epoch_and_batch(tmp_path):
    opts = FitOptions(epochs=3, batch_size=8, device="cpu", amp="off", progress=False, patience=0)
    with pytest.raises(CXRError, match=r"^non-finite training loss \(NaN or inf\) in epoch 1, batch 3 of 6: "):
        fit(tiny_cnn(), tiny_data(), tiny_data(), NaNFrom(3), opts, tmp_path)
    assert not (tmp_path / "history.csv").exists()  # not one epoch more on NaN


def test_train_with_a_huge_lr_fails_in_its_first_epoch_with_one_line(manifest, tmp_path, capsys):
    """`--lr 1e8` ran every epoch on NaN; its model.pt then gave a class with p = NaN."""
    out = tmp_path / "run"
    assert cli.main(tiny(manifest, "--lr", "1e8", "--epochs", "3", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"cxrlib train: error: non-finite training loss \(NaN or inf\) in epoch 1, "
                                      r"batch \d+ of \d+: training diverged and stopped; lower the learning rate "
                                      r"\(lr=1e\+08\)$", err[0]), err
    assert _status(out).startswith("failed: CXRError: non-finite training loss")
    assert not (out / "history.csv").exists()


def _smooth_png(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(synthetic.chest_image(rng, "normal", synthetic._patient(rng, "normal", adult=True))).resize(
        (size, size)).save(path)
    return path


def _refused(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_predict_and_evaluate_refuse_a_diverged_a_failed_and_a_pretraining_model(checkpoint, manifest, tmp_path,
                                                                                 capsys):
    image = _smooth_png(tmp_path / "x.png")
    state = torch.load(checkpoint, weights_only=True)
    nan = tmp_path / "diverged" / "model.pt"
    nan.parent.mkdir()
    state["state_dict"]["fc.weight"] = torch.full_like(state["state_dict"]["fc.weight"], float("nan"))
    torch.save(state, nan)
    for argv in (["predict", "--checkpoint", str(nan), str(image)],
                 ["evaluate", "--checkpoint", str(nan), "--manifest", str(manifest), "--out", str(tmp_path / "e")]):
        line = _refused(argv, capsys)
        assert f"{nan}: weight fc.weight is not finite (NaN or inf): the run diverged" in line
    assert not (tmp_path / "e").exists()

    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(checkpoint, failed / "model.pt")
    (failed / "status").write_text("failed: CXRError: non-finite training loss (NaN or inf) in epoch 2, batch 1\n")
    line = _refused(["predict", "--checkpoint", str(failed / "model.pt"), str(image)], capsys)
    assert f"{failed / 'model.pt'} is the model of a failed run ({failed / 'status'}: failed: CXRError:" in line

    pretrained, _ = models.build_model("resnet50", "none", len(FINDINGS))
    pre = tmp_path / "pretrain" / "model.pt"
    pre.parent.mkdir()
    torch.save({"backbone": "resnet50", "num_classes": len(FINDINGS), "classes": list(FINDINGS),
                "input_spec": pretrained.input_spec, "task": "chestxray14", "image_size": 32, "config": {},
                "state_dict": pretrained.state_dict()}, pre)
    line = _refused(["predict", "--checkpoint", str(pre), str(image)], capsys)
    assert f"{pre} is a ChestX-ray14 pretraining model (14 findings, no COVID-19 class): fine-tune it first" in line
    assert "task=" not in line


def test_predict_flags_images_unlike_any_chest_xray_and_still_scores_them(checkpoint, tmp_path, capsys):
    """A 1x1 image, a constant one and pure noise were scored without a word."""
    smooth = _smooth_png(tmp_path / "chest.png")
    odd = {"tiny.png": np.full((1, 1), 128, np.uint8), "flat.png": np.full((64, 64), 90, np.uint8),
           "noise.png": np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)}
    for name, pixels in odd.items():
        Image.fromarray(pixels).save(tmp_path / name)
    paths = [str(smooth), *(str(tmp_path / name) for name in odd)]
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--json", *paths]) == 0
    captured = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in json.loads(captured.out)}
    assert list(rows) == ["chest.png", "tiny.png", "flat.png", "noise.png"]  # every one scored
    assert rows["chest.png"]["flag"] == ""
    assert rows["tiny.png"]["flag"].startswith("tiny (1x1 px")
    assert rows["flat.png"]["flag"].startswith("constant")
    assert rows["noise.png"]["flag"].startswith("noise-like")
    warned = captured.err.strip().splitlines()
    assert len(warned) == 3 and all(line.startswith("cxrlib predict: warning: ") for line in warned)
    assert [Path(line.split(": ")[2]).name for line in warned] == ["tiny.png", "flat.png", "noise.png"]


# --- nothing dropped without a word ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gappy(manifest, tmp_path_factory) -> Path:
    """The tiny manifest with 3 rows whose image is not there and one row that is a folder."""
    folder = tmp_path_factory.mktemp("gappy")
    for p in manifest.parent.glob("*.png"):
        shutil.copy(p, folder)
    (folder / "scans").mkdir()
    extra = pd.DataFrame({"path": ["gone-0.png", "gone-1.png", "gone-2.png", "scans"], "label": ["covid"] * 4})
    pd.concat([pd.read_csv(manifest), extra]).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_train_prints_and_records_every_dropped_row_and_strict_refuses(gappy, tmp_path, capsys):
    """Half a manifest's paths wrong trained on the rest, exit 0, nothing on screen; a folder row went the same way."""
    out = tmp_path / "run"
    assert cli.main(tiny(gappy, "--out", str(out))) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("not used: ")]
    assert said == ["not used: 3 missing (gone-0.png, gone-1.png, gone-2.png); 1 unreadable (scans)"]
    recorded = json.loads((out / "params.json").read_text())["data"]["summary"]
    assert recorded["missing_files"] == ["gone-0.png", "gone-1.png", "gone-2.png"]
    assert recorded["skipped"] == ["scans: a folder, not an image file (row 23)"]

    strict = tmp_path / "strict"
    line = _refused(tiny(gappy, "--strict", "--out", str(strict)), capsys)
    assert line.startswith("cxrlib train: error: not used: 3 missing (gone-0.png, gone-1.png, gone-2.png); "
                           "1 unreadable (scans); --strict: ")
    assert not strict.exists()


def test_evaluate_strict_refuses_what_it_would_not_score(checkpoint, gappy, tmp_path, capsys):
    out = tmp_path / "external"
    line = _refused(["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(gappy), "--out", str(out),
                     "--strict", "--device", "cpu"], capsys)
    assert line.startswith("cxrlib evaluate: error: not used: 3 missing (gone-0.png, gone-1.png, gone-2.png)")
    assert not out.exists()


# --- evaluate never writes into a run or beside a user's files ----------------------------------------------


def test_evaluate_out_refuses_a_run_folder_and_a_users_folder_and_replaces_an_evaluation(checkpoint, manifest,
                                                                                        tmp_path, capsys):
    """`evaluate --out RUN` replaced the run's own test results; the run then read as damaged."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "model.pt")
    for name in ("params.json", "metrics.json"):
        (run / name).write_text('{"config": {}}')
    (run / "predictions.csv").write_text("image_id,true,pred\na,covid,covid\n")
    rundir.seal(run)
    rundir.write_status(run, "complete")
    before = snapshot(run)
    evaluate = ["evaluate", "--checkpoint", str(run / "model.pt"), "--manifest", str(manifest), "--n-boot", "0",
                "--device", "cpu", "--out"]
    line = _refused([*evaluate, str(run)], capsys)
    assert line.startswith(f"cxrlib evaluate: error: {run} is a run folder: evaluating into it would replace the "
                           "run's own test results")
    assert snapshot(run) == before and rundir.damage(run) == ""

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    line = _refused([*evaluate, str(mine)], capsys)
    assert line == f"cxrlib evaluate: error: {mine} holds notes.txt, which evaluate does not write: give a new or " \
                   "empty folder (nothing in that one is changed)"

    again = tmp_path / "again"
    for _ in range(2):  # a new folder, then that evaluation replaced
        assert cli.main([*evaluate, str(again)]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["metrics.json", "predictions.csv"]


# --- failures on the way ------------------------------------------------------------------------------------


def test_a_full_disk_names_the_file_and_the_status_says_failed(manifest, tmp_path, monkeypatch, capsys):
    """"[Errno 28] No space left on device" named no file, and `status` stayed "running" (no room to write it)."""
    out = tmp_path / "run"
    real = atomic._new_file

    def full(path: Path) -> Path:  # once training has begun, every new file is /dev/full
        tmp = real(path)
        if (out / "params.json").is_file():
            tmp.unlink()
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(atomic, "_new_file", full)
    line = _refused(tiny(manifest, "--out", str(out)), capsys)
    assert re.fullmatch(rf"cxrlib train: error: {re.escape(str(out))}/(model\.pt|history\.csv|checkpoint-last\.pt): "
                        "No space left on device", line), line
    assert _status(out).startswith("failed: OSError: [Errno 28] No space left on device: ")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_image_given_as_the_manifest_is_one_clear_line(tmp_path, capsys):
    png = _smooth_png(tmp_path / "scan.png")
    line = _refused(["data", "--manifest", str(png)], capsys)
    assert line == (f"cxrlib data: error: {png}: not a CSV file of text (it holds NUL bytes: an image? UTF-16 text? "
                    "save it as a UTF-8 CSV): check the --manifest path")
    out = tmp_path / "run"
    assert "not a CSV file of text" in _refused(tiny(png, "--out", str(out)), capsys)
    assert not out.exists()


def test_an_unwritable_home_names_the_variables_that_move_the_cache_and_the_data(manifest, tmp_path):
    """A read-only HOME failed without naming CXRLIB_CACHE or CXRLIB_DATA, which only the book documented. (HOME is
    a file here: as root, a read-only folder would still be written.)"""
    home = tmp_path / "home"
    home.write_text("")
    for argv, variable in (([], "CXRLIB_DATA"), (["--manifest", str(manifest)], "CXRLIB_CACHE")):
        done = subprocess.run([sys.executable, "-m", "cxrlib", "data", *argv], capture_output=True, text=True,
                              timeout=900, cwd=tmp_path, env=env(HOME=str(home), CXRLIB_CACHE=None, CXRLIB_DATA=None))
        said = error_lines(done.stderr)
        assert done.returncode == 2 and len(said) == 1 and f"set {variable} to a writable folder" in said[0], \
            done.stderr
        assert str(home) in said[0]


def test_make_prints_a_matrix_error_once_and_stops(tmp_path):
    """`make book PROFILE=bogus` printed the error twice (the matrix, then the chapters' step), between them "some
    runs failed: see their status files". `make notebooks` is the part of `make book` that runs both."""
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT).returncode != 0:
        pytest.skip("the virtual environment is not installed: make would install it first")
    done = subprocess.run(["make", "-s", "notebooks", "PROFILE=bogus", f"RUN_ROOT={tmp_path / 'runs'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env())
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert [line for line in output.splitlines() if "error:" in line] == [
        "python -m cxrlib.runs: error: argument --profile: invalid choice: 'bogus' (choose from 'quick', 'paper')"]
    assert "some runs failed" not in output
