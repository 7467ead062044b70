"""Dry runs of the one-GPU scripts, end to end on CPU at tiny sizes, so they cannot rot between GPU loans.

`bench/paper_bundle.sh` (the paper profile's matrix) and `bench/remedies_bundle.sh` (chapter 6's remedy arms and
chapter 4's lungs-removed pair) each run on synthetic data in the publishers' layouts, carried as the GPU machine
gets them (`python -m cxrlib.transport`), with the quick profile at 32 px, 1 epoch, 1 seed; each must exit 0 with no
traceback in its log and leave a bundle tarball whose bundle.json names every run complete, the transport copy's
settings, the matrix's wall time and aggregate images/s. `bench/slurm_matrix.sh` (the matrix as a Slurm job array)
is run as one array task with a stand-in python: the command it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cxrlib import bundle, lungs_removed, remedies, synthetic
from cxrlib.paths import ROOT

BENCH = ROOT / "bench"
MAX_SIDE = 64  # of the transport copy
HOLD_OUT = "country=italy;collection=ieee8023&covid=no"  # the scripts' (and the Makefile's) REMEDY_HOLD_OUT


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic CoronaHack, ieee8023 and NIH ChestX-ray14 folders in their publishers' layouts (about 70 images
    once duplicates are dropped, and 24 NIH images), through `python -m cxrlib.transport` as they travel to a GPU."""
    src = tmp_path_factory.mktemp("publishers")
    ieee = synthetic.make_ieee8023(src / "covid-chestxray-dataset", n=20)
    synthetic.make_coronahack(src / "coronahack", n=20, covid_source=ieee)
    synthetic.make_chestxray14(src / "nih-chestxray14-subset", n=24)
    dst = tmp_path_factory.mktemp("transport") / "data"
    subprocess.run([sys.executable, "-m", "cxrlib.transport", str(src), str(dst), "--max-side", str(MAX_SIDE)],
                   check=True, capture_output=True, cwd=ROOT)
    return dst


def run_bash(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`bash ARGS...` in its own process group, all of which is killed when it runs past `timeout` (the scripts
    start python processes of their own)."""
    with subprocess.Popen(["bash", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"bash {' '.join(args)} ran past {timeout} s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def dry_run(script: str, data: Path, tmp: Path, **env: str) -> tuple[Path, str, dict, list[str]]:
    """Run `script` at tiny sizes on CPU with everything under `tmp`: OUT, its log, bundle.json, the tarball's names."""
    out = tmp / "out"
    env = {**os.environ, "PYTHON": sys.executable, "RUN_ROOT": str(tmp / "runs"), "CXRLIB_CACHE": str(tmp / "cache"),
           "TORCH_HOME": str(tmp / "torch"),  # no ImageNet file: that arm is "not run", whatever this machine caches
           "PROFILE": "quick", "SEEDS": "1", "SETTINGS": "--set image_size=32 --set epochs=1", "CONCURRENT": "1",
           **env}
    # a time budget that only a hung run meets: on a busy CPU a few seconds of work can take minutes
    done = run_bash([str(BENCH / script), str(out), str(data), "1800"], cwd=tmp, env=env, timeout=2400)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert done.returncode == 0, f"{script} exited {done.returncode}: {done.stderr[-2000:]}\n--- log ---\n{log[-8000:]}"
    assert "Traceback" not in log and "FAILED" not in log, log[-8000:]
    with tarfile.open(out / "bundle.tar.gz") as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile("bundle/bundle.json"))
        tar.extractall(tmp / "extracted", filter="data")
    return out, log, record, names


def check_bundle(record: dict, names: list[str], runs: set[str]) -> None:
    """Every run named and complete with its files and no weights; transport copy, wall time and throughput recorded."""
    assert {r["run"]: r["status"] for r in record["runs"]} == dict.fromkeys(runs, "complete")
    for run in runs:
        assert {f"bundle/runs/{run}/{f}" for f in ("params.json", "metrics.json", "predictions.csv")} <= set(names)
    assert not [n for n in names if n.endswith(".pt")]
    [data] = record["data"]
    assert data["transport_copy"]["max_side"] == MAX_SIDE and data["transport_copy"]["reencoded"] > 0
    assert record["wall_seconds"] > 0 and record["aggregate_train_images_per_second"] > 0
    assert [h.split()[0] for h in record["hardware"]] == ["cpu"]


@pytest.mark.slow
def test_paper_bundle_dry_run(data, tmp_path):
    out, log, record, names = dry_run("paper_bundle.sh", data, tmp_path,
                                      BENCH_ARGS="--quick --image-size 32 --n-train 8 --n-val 4 --skip-loader",
                                      BENCH_TIMEOUT="1200")  # the GPU's 120 s can run out on a busy CPU
    runs = {f"{task}-{loss}-resnet50-none-s0{extra}" for task in ("binary", "multiclass") for loss in ("ce", "focal")
            for extra in ("", "-noextra")}
    runs |= {f"{task}-ce-resnet50-none-unweighted-s0" for task in ("binary", "multiclass")}
    check_bundle(record, names, runs)
    assert {n["arm"] for n in record["not_run"]} == {"imagenet", "chest_xray"}
    assert "bundle/bench/speed_cpu.json" in names
    speed = json.loads((tmp_path / "extracted" / "bundle" / "bench" / "speed_cpu.json").read_text())
    assert not [k for k, fig in speed["figures"].items() if fig.get("error")]
    # the featured run's weights (chapters 03/04), as fp16 chunks beside the bundle
    assert (out / "w" / "featured.txt").read_text().strip() == "multiclass-focal-resnet50-none-s0"
    parts = sorted((out / "w").glob("weights.part*"))
    assert parts and f"{len(parts)} weight chunk(s)" in log
    assert bundle.join_weights(parts, tmp_path / "featured.pt").stat().st_size > 0  # loads back as a checkpoint


@pytest.mark.slow
def test_remedies_bundle_dry_run(data, tmp_path):
    _, _, record, names = dry_run("remedies_bundle.sh", data, tmp_path, BENCH_ONLY="")
    held = "holdout-" + "country_italy_collection_ieee8023_covid_no"
    arms = ["", "lungs_only", "adults|", "adults|lungs_only", "adults|lungs_only_clahe", "lungs_only_marker",
            "lungs_removed", "lungs_removed_marker"]
    runs = set()
    for arm in arms:
        cohort, _, preprocess = arm.rpartition("|")
        runs.add("-".join(filter(None, ["binary-ce-resnet50-none", cohort, held, preprocess, "s0"])))
    check_bundle(record, names, runs)
    root = tmp_path / "extracted" / "bundle" / "runs"
    configs = [json.loads((root / run / "params.json").read_text())["config"] for run in runs]
    assert {c["hold_out"] for c in configs} == {HOLD_OUT} and {c["image_size"] for c in configs} == {32}
    # what chapters 6 and 4 read from these run folders
    assert set(remedies.load_arms(root)["label"]) == {*remedies.REMEDIES.values(), remedies.CONTROL_NAME}
    assert set(lungs_removed.find_arms(root)["arm"]) == set(lungs_removed.ARMS.values())


def test_a_failed_step_fails_the_script(tmp_path):
    """A step that fails (here `false`) is logged and makes the script exit 1 after the others; missing data, 2."""
    data = tmp_path / "data"
    for folder in ("coronahack", "covid-chestxray-dataset", "nih-chestxray14-subset"):
        (data / folder).mkdir(parents=True)
    script = (f'source "{BENCH / "bundle_steps.sh"}"; bundle_begin "$1" "$2" 10 "$1/runs"; '
              'step "a failing step" false || failed "a failing step" $?; step "a good step" true || failed x $?; '
              'bundle_end')
    python = tmp_path / "python"  # a stand-in: bundle_begin only asks it for torch's version and the device
    python.write_text("#!/bin/sh\necho 2.0 cpu\n")
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    done = run_bash(["-c", script, "test", str(tmp_path / "out"), str(data)], env=env, timeout=300)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert done.returncode == 1 and "FAILED: a failing step (exit 1)" in log and "== a good step" in log
    assert "failed step(s): a failing step" in done.stderr
    missing = run_bash([str(BENCH / "paper_bundle.sh"), str(tmp_path / "out2"), str(tmp_path)], env=env, timeout=60)
    assert missing.returncode == 2 and "no " in missing.stderr and not (tmp_path / "out2").exists()


def test_the_slurm_array_script_runs_its_task_s_share(tmp_path):
    """bench/slurm_matrix.sh as a job array task runs it (Slurm's variables set by hand, python a stand-in that
    prints its command): its shard of the matrix of DATA into RUN_ROOT, from the submit folder; without DATA or
    RUN_ROOT it stops saying so. `make slurm` submits SHARDS tasks of make runs's matrix and prints the --gather
    command."""
    script = BENCH / "slurm_matrix.sh"
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command  # sbatch reads them up to the first command only
    assert "#SBATCH --gres=gpu:1" in lines
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "cwd=$(pwd)"\necho "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "DATA": "/shared/data", "RUN_ROOT": "/shared/runs", "SEEDS": "5",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
           "MATRIX_FLAGS": "--set epochs=10"}
    done = run_bash([str(script)], env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("task 2 of 3 on ") and f"cwd={ROOT}\n" in done.stdout
    assert done.stdout.splitlines()[-1] == (
        "-m cxrlib.runs --profile paper --run-root /shared/runs --coronahack-dir /shared/data/coronahack "
        "--extra-covid-dir /shared/data/covid-chestxray-dataset --executor inline --concurrent 1 --seeds 5 "
        "--set epochs=10 --shard slurm")
    for unset in ("DATA", "RUN_ROOT"):
        stopped = run_bash([str(script)], env={k: v for k, v in env.items() if k != unset}, timeout=60)
        assert stopped.returncode != 0 and f"give {unset}" in stopped.stderr and "cwd=" not in stopped.stdout
    made = subprocess.run(["make", "-n", "slurm", "DATA=/d", "SHARDS=3", "RUN_ROOT=/r", "PROFILE=paper"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert "sbatch --array=0-$((3 - 1)) bench/slurm_matrix.sh" in made.stdout, made.stdout + made.stderr
    assert 'MATRIX_FLAGS="--variants lungs_removed,lungs_removed_marker --variant-losses ce"' in made.stdout
    assert "-m cxrlib.runs --gather --profile paper --run-root /r --coronahack-dir /d/coronahack" in made.stdout
