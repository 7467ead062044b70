"""The run folder's record of itself: a complete run is whole, a damaged one is named and rerun, two matrices
on one folder train it once."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from cxrlib import results, rundir, runs
from cxrlib.config import RunConfig
from cxrlib.errors import CXRError


def _complete(run, seal: bool = True):
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.json").write_text(json.dumps({"config": {"task": "binary", "loss": "ce", "weights": "none",
                                                            "seed": 0}}))
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.8, "macro": {"precision": 0.8,
                                                  "recall": 0.8}, "per_class": {}, "classes": ["non_covid", "covid"]}))
    (run / "predictions.csv").write_text("image_id,true,pred\na,covid,covid\n")
    (run / "history.csv").write_text("epoch\n1\n")
    (run / "model.pt").write_bytes(b"w" * 5000)
    if seal:
        rundir.seal(run)
    rundir.write_status(run, "complete")
    return run


def test_a_sealed_run_is_whole_and_each_damage_is_named(tmp_path):
    run = _complete(tmp_path / "run")
    assert rundir.read_status(run) == "complete" and rundir.damage(run) == ""
    manifest = json.loads((run / "manifest.json").read_text())["files"]
    assert set(manifest) == {"params.json", "metrics.json", "predictions.csv", "history.csv", "model.pt"}

    (run / "metrics.json").write_text('{"accuracy": 0.9')  # truncated
    assert rundir.read_status(run).startswith("damaged: metrics.json: 16 bytes")
    _complete(run)
    (run / "predictions.csv").unlink()
    assert rundir.read_status(run) == "damaged: predictions.csv: missing"
    _complete(run)
    (run / "model.pt").write_bytes(b"w" * 1000)  # cut to 1,000 bytes
    assert rundir.read_status(run) == "damaged: model.pt: 1000 bytes, 5000 when the run completed"
    _complete(run)
    (run / "model.pt").write_bytes(b"x" * 5000)  # same size, other bytes: only the hash sees it
    assert rundir.read_status(run) == "complete"
    assert rundir.damage(run) == "model.pt: contents changed since the run completed"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_run_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    """Every run file was 0600 (tempfile's mode): others on a shared machine could not read a run folder."""
    from cxrlib import atomic

    old = os.umask(umask)
    try:
        atomic.write_text(tmp_path / "params.json", "{}")
        atomic.write_text(tmp_path / "params.json", "{}")  # replacing a file too
        rundir.write_status(tmp_path, "complete")
    finally:
        os.umask(old)
    assert [oct(stat.S_IMODE((tmp_path / n).stat().st_mode)) for n in ("params.json", "status")] == [oct(mode)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.json", "status"]  # no temporary file left


def test_a_run_of_the_earlier_layout_still_reads(tmp_path):
    run = _complete(tmp_path / "old", seal=False)
    assert not (run / "manifest.json").exists() and rundir.read_status(run) == "complete"
    (run / "metrics.json").write_text("{")
    assert rundir.read_status(run).startswith("damaged: metrics.json: not valid JSON")


def test_readers_report_a_damaged_run_by_name_instead_of_crashing(tmp_path):
    _complete(tmp_path / "good")
    _complete(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.json").write_text("{")
    table = results.load_runs(tmp_path).set_index("run")
    assert table.loc["good", "status"] == "complete" and table.loc["good", "accuracy"] == 0.9
    assert table.loc["bad", "status"].startswith("damaged: metrics.json")
    with pytest.raises(CXRError, match=r"bad/metrics.json: not valid JSON"):
        rundir.read_json(tmp_path / "bad" / "metrics.json")


def test_the_matrix_reruns_a_damaged_run_and_two_matrices_train_a_folder_once(tmp_path, monkeypatch):
    trained = []

    def fake_run(cfg, run_dir, progress=None):  # stands in for train.run: slow enough for the second to wait
        trained.append(run_dir.name)
        time.sleep(0.3)
        _complete(run_dir)

    monkeypatch.setattr("cxrlib.train.run", fake_run)
    cfg = RunConfig(task="binary", weights="none", run_dir=str(tmp_path / "binary-ce-resnet50-none-s0"))
    workers = [threading.Thread(target=runs.execute_run, args=(cfg, "inline")) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert trained == ["binary-ce-resnet50-none-s0"]  # the second waited on the lock, then found it complete
    (tmp_path / "binary-ce-resnet50-none-s0" / "predictions.csv").unlink()
    assert runs.execute_run(cfg, "inline").status == "complete" and len(trained) == 2  # damaged: trained again


def test_find_runs_selects_by_recorded_parameters_not_folder_names(tmp_path):
    import json

    from cxrlib.config import RunConfig
    from cxrlib.rundir import Run, find_runs, run_root

    def write(name: str, status: str = "complete", **config) -> Path:
        run_dir = tmp_path / "deep" / name
        run_dir.mkdir(parents=True)
        cfg = RunConfig(**config).to_dict()
        cfg.pop("cohort")  # a field added later: a run of the earlier layout does not record it
        (run_dir / "params.json").write_text(json.dumps({"config": cfg, "data": {"held_out_images": ["x"]}}))
        (run_dir / "metrics.json").write_text("{}")
        (run_dir / "predictions.csv").write_text("image_id,true\na,covid\n")
        (run_dir / "status").write_text(status)
        return run_dir

    write("binary-focal-s0", task="multiclass", loss="ce")  # the folder name lies; the record does not
    write("b", task="binary", loss="focal", preprocess="lungs_only")
    write("c", status="failed: boom", task="binary")
    (tmp_path / "deep" / "pretrain").mkdir()
    (tmp_path / "deep" / "pretrain" / "params.json").write_text(json.dumps({"config": {"backbone": "resnet50"}}))
    assert [r.dir.name for r in find_runs(tmp_path, task="binary")] == ["b"]
    assert [r.dir.name for r in find_runs(tmp_path, loss="ce")] == ["binary-focal-s0"]
    assert [r.dir.name for r in find_runs(tmp_path, preprocess=lambda p: p != "none")] == ["b"]
    assert [r.dir.name for r in find_runs(tmp_path, cohort="all")] == ["b", "binary-focal-s0"]  # the default
    assert {r.dir.name for r in find_runs(tmp_path, status=None)} == {"b", "binary-focal-s0", "c"}
    run = Run(tmp_path / "deep" / "b")
    assert run.data["held_out_images"] == ["x"] and run.externals() == []
    (run.dir / "predictions.csv").write_text('image_id,true\n"a,b\n')
    with pytest.raises(CXRError, match="predictions.csv: not a readable predictions table"):
        run.predictions()
    (run.dir / "metrics.json").unlink()
    with pytest.raises(CXRError, match="metrics.json: missing"):
        run.metrics()
    assert run_root("quick", "synthetic", base=tmp_path) == tmp_path / "runs" / "quick" / "synthetic"


def test_the_committed_bundle_reads_through_the_run_store():
    """Run folders written by earlier code (the committed bundle's, some before manifests) read as whole runs."""
    from cxrlib.paths import ROOT
    from cxrlib.rundir import find_runs

    for record in sorted(ROOT.glob("results/*/bundle.json")):
        bundle = record.parent
        listed = json.loads(record.read_text())
        found = find_runs(bundle / "runs")
        assert len(found) == sum(r["status"] == "complete" for r in listed["runs"]), bundle
        for name, entries in (listed.get("also") or {}).items():
            assert len(find_runs(bundle / name)) == sum(r["status"] == "complete" for r in entries), name
        for run in found:
            assert run.metrics()["classes"] and len(run.predictions()) == run.metrics()["n"]
