"""The run matrix keeps failed runs and lists them; the results tables compare only like with like."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxrlib import models, results, runs, train
from cxrlib.config import profile_config
from cxrlib.errors import CXRError


def test_matrix_is_task_x_loss_x_init(tmp_path):
    configs = runs.matrix("quick", tmp_path, {"coronahack_dir": "", "extra_covid_dir": ""}, ["none", "imagenet"])
    assert len(configs) == 8
    assert len({c.run_dir for c in configs}) == 8
    assert all(c.image_size == 64 and c.profile == "quick" for c in configs)


def test_notebook_parameters_refuse_undeclared_changes(tmp_path):
    cfg = profile_config("quick", run_dir=str(tmp_path / "r"))
    assert runs.notebook_parameters(cfg)["loss"] == cfg.loss
    cfg.weight_decay = 0.5  # not a parameter of 03_finetune: the notebook would silently use the default
    with pytest.raises(Exception, match="weight_decay"):
        runs.notebook_parameters(cfg)


@pytest.mark.slow
def test_a_failed_run_is_kept_and_listed(tmp_path):
    cfg = profile_config("quick", weights=f"file:{tmp_path / 'absent' / 'model.pt'}")
    cfg.run_dir = str(tmp_path / cfg.run_name())
    result = runs.execute_run(cfg)
    assert result.status.startswith("failed:") and "absent" in result.status
    assert (tmp_path / cfg.run_name() / "notebook.ipynb").is_file()  # the executed notebook shows the error
    listed = results.load_runs(tmp_path)
    assert list(listed.status) == [result.status]
    assert results.paper_table(listed, cfg.task).status.iloc[0] == result.status


def test_a_complete_run_of_other_data_is_not_reused(tmp_path, one_thread):
    from helpers import tiny_config, tiny_manifest

    first = tiny_config(tiny_manifest(tmp_path / "a", per_class=6, seed=0), tmp_path / "run", epochs=1)
    out = train.run(first, progress=False)
    recorded = json.loads((out / "params.json").read_text())["data"]["record"]
    assert recorded == train.load_data(first).record and recorded["tag"].startswith("manifest-")
    other = dataclasses.replace(first, manifest=str(tiny_manifest(tmp_path / "b", per_class=6, seed=1)))
    with pytest.raises(CXRError, match="data fingerprint"):
        train.run(other, progress=False)  # same folder, other data: refused, never relabelled
    assert runs.execute_run(other, "inline", train.load_data(other).record).status.startswith("failed: not reused")
    first.run_dir = other.run_dir = ""
    assert train.default_run_dir(first) != train.default_run_dir(other)  # by default each data set has its folder


def test_matrix_axes_seeds_and_extra_covid(tmp_path):
    data = {"coronahack_dir": "C", "extra_covid_dir": "E"}
    configs = runs.matrix("paper", tmp_path, data, ["none"], ["binary"], ["ce"], extra_covid_train=(True, False))
    assert [(c.seed, c.extra_covid_train) for c in configs] == [(s, e) for s in range(3) for e in (True, False)]
    assert configs[1].run_name().endswith("-s0-noextra") and configs[0].run_name().endswith("-s0")
    assert len(runs.matrix("quick", tmp_path, data, ["none"], ["binary"], ["ce"], seeds=2)) == 2


# --- the initialisations (arms) -------------------------------------------------------------------------


def _args(**values) -> argparse.Namespace:
    return runs.build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in values.items()])


def test_real_data_without_a_chest_init_does_not_run_that_arm(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "ensure_pretrained", lambda *a, **k: pytest.fail("must not pretrain on synthetic"))
    arms = runs.resolve_arms(_args(arms="random,chest_xray", coronahack_dir="/c"), tmp_path, False, {})
    assert arms.run == {"random": "none"}
    why = arms.not_run["chest_xray"]
    assert "--chestxray14-dir" in why["command"] and "--coronahack-dir /c" in why["command"]
    assert "synthetic" in why["reason"]


def test_chest_arm_uses_the_given_init_or_the_synthetic_pretraining(tmp_path, monkeypatch):
    arms = runs.resolve_arms(_args(arms="chest_xray", coronahack_dir="/c", chest_init="chexnet:/w.pth"), tmp_path,
                             False, {})
    assert arms.run == {"chest_xray": "chexnet:/w.pth"} and "not measured" in arms.quality["chest_xray"]["quality"]
    pre = runs.pretrain_dir(tmp_path)
    pre.mkdir()
    (pre / "status").write_text("complete\n")
    (pre / "metrics.json").write_text(json.dumps({"mean_auroc": 0.61, "val": {"mean": 0.63}}))
    (pre / "params.json").write_text(json.dumps({"data": {"synthetic": True}}))
    monkeypatch.setattr(runs, "ensure_pretrained", lambda root, *a, **k: runs.RunStatus(pre.name, pre, "complete"))
    arms = runs.resolve_arms(_args(arms="chest_xray"), tmp_path, True, {})
    assert arms.run == {"chest_xray": f"file:{pre / 'model.pt'}"} and "synthetic" in pre.name
    assert arms.quality["chest_xray"]["val_mean_auroc"] == 0.63 and arms.quality["chest_xray"]["synthetic_chestxray14"]


@pytest.fixture
def fake_imagenet(tmp_path, monkeypatch):
    """An empty torch hub, and torchvision's ImageNet download sent to a local server of a tiny fake state_dict."""
    import torchvision.models._api as api

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    name = models.imagenet_file("resnet50").name
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"fc.bias": torch.arange(3.0)}, served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    original, urls = api.load_state_dict_from_url, []

    def redirected(url, *args, **kwargs):
        urls.append(f"http://127.0.0.1:{server.server_port}/{Path(url).name}")
        return original(urls[-1], *args, **{**kwargs, "check_hash": False})  # the fake file has another hash

    monkeypatch.setattr(api, "load_state_dict_from_url", redirected)
    yield server, urls
    server.shutdown()


def test_paper_profile_fetches_imagenet_through_torchvision(fake_imagenet):
    server, urls = fake_imagenet
    assert runs.imagenet_arm("quick", "resnet50")[0] is None  # quick never downloads
    assert not urls
    assert runs.imagenet_arm("paper", "resnet50") == ("imagenet", "")
    assert urls and models.imagenet_available("resnet50")
    assert torch.load(models.imagenet_file("resnet50"), weights_only=True)["fc.bias"].tolist() == [0.0, 1.0, 2.0]


def test_offline_imagenet_arm_is_skipped_saying_where_the_file_goes(fake_imagenet, tmp_path):
    server, _ = fake_imagenet
    server.shutdown()
    server.server_close()  # nothing listens: the download fails as offline
    weights, why = runs.imagenet_arm("paper", "resnet50")
    assert weights is None and str(models.imagenet_file("resnet50")) in why
    arms = runs.resolve_arms(_args(arms="random,imagenet", profile="paper"), tmp_path, True, {})
    assert "imagenet" not in arms.run and str(models.imagenet_file("resnet50")) in arms.not_run["imagenet"]["reason"]


# --- executor and concurrency -------------------------------------------------------------------------

RESULT_KEYS = ("accuracy", "macro_f1", "per_class", "confusion", "roc_auc", "ci", "best_epoch", "data_fingerprint")


@pytest.mark.slow
def test_concurrent_workers_give_the_numbers_of_one_by_one(tmp_path, one_thread):
    tiny = ["--profile", "quick", "--executor", "inline", "--arms", "random", "--tasks", "binary", "--losses", "ce",
            "--extra-covid-axis", "both", "--set", "image_size=32", "--set", "epochs=1", "--set", "device=cpu"]
    assert runs.main([*tiny, "--concurrent", "2", "--run-root", str(tmp_path / "two")]) == 0
    assert runs.main([*tiny, "--concurrent", "1", "--run-root", str(tmp_path / "one")]) == 0
    two, one = tmp_path / "two" / "synthetic", tmp_path / "one" / "synthetic"
    record = json.loads((two / "matrix.json").read_text())
    assert record["concurrent"] == 2 and record["wall_seconds"] > 0 and record["hardware"]
    names = [r["name"] for r in record["runs"]]
    assert names == ["binary-ce-resnet50-none-s0", "binary-ce-resnet50-none-s0-noextra"]
    assert all(r["status"] == "complete" and r["wall_seconds"] > 0 for r in record["runs"])
    for name in names:
        a, b = (json.loads((root / name / "metrics.json").read_text()) for root in (two, one))
        assert {k: a[k] for k in RESULT_KEYS} == {k: b[k] for k in RESULT_KEYS}, name
        assert not (two / name / "notebook.ipynb").exists()  # inline: the run folder minus the notebook
    with_extra, without = (pd.read_csv(two / n / "predictions.csv") for n in names)
    assert with_extra.image_id.tolist() == without.image_id.tolist()  # same test images: paired comparisons
    sources = [json.loads((two / n / "params.json").read_text())["data"]["summary"]["sources"] for n in names]
    assert sources[0]["train"].get("ieee8023", 0) > sources[1]["train"].get("ieee8023", 0)  # fewer trained on ...
    assert sources[0]["val"] == sources[1]["val"]  # ... and the same validation images (early stopping, threshold)


def test_ctrl_c_leaves_a_matrix_json_that_says_what_ran(tmp_path, monkeypatch, capsys):
    """matrix.json said "planned" for every run after a Ctrl-C: now the runs that completed, the one in flight
    and those never started, written before the one line that says to rerun."""
    from types import SimpleNamespace

    from cxrlib.config import data_record

    from cxrlib.readers import ReadReport

    loaded = SimpleNamespace(record=data_record("0" * 16, 3), table=pd.DataFrame({"path": []}), report=ReadReport())
    monkeypatch.setattr(train, "load_data", lambda cfg: loaded)  # no data read: the matrix's bookkeeping only
    calls = []

    def execute_run(cfg, *args):
        calls.append(cfg.run_name())
        if len(calls) == 2:
            assert "planned" in (tmp_path / "synthetic" / "matrix.json").read_text()
            raise KeyboardInterrupt
        return runs.RunStatus(cfg.run_name(), Path(cfg.run_dir), "complete", 1.0)

    monkeypatch.setattr(runs, "execute_run", execute_run)
    argv = ["--executor", "inline", "--arms", "random", "--tasks", "binary", "--losses", "ce,focal", "--seeds", "2",
            "--run-root", str(tmp_path)]
    assert runs.main(argv) == 130
    assert capsys.readouterr().err == "cxrlib.runs: interrupted; rerun the same command to continue\n"
    record = json.loads((tmp_path / "synthetic" / "matrix.json").read_text())
    assert [(r["name"], r["status"]) for r in record["runs"]] == [
        ("binary-ce-resnet50-none-s0", "complete"), ("binary-focal-resnet50-none-s0", "interrupted"),
        ("binary-ce-resnet50-none-s1", "not started"), ("binary-focal-resnet50-none-s1", "not started")]
    assert record["runs"][0]["wall_seconds"] == 1.0 and len(calls) == 2


def test_ctrl_c_with_concurrent_workers_settles_each_run(tmp_path, monkeypatch):
    """--concurrent > 1: Ctrl-C reaches the main process while it waits on a worker's future. The pool is a
    stand-in (spawned workers would not see a monkeypatch): one run finished, one in flight, the rest queued."""
    from concurrent.futures import Future

    from cxrlib import images

    class Waiting(Future):
        def result(self, timeout=None):  # what Ctrl-C does to the main process blocked here
            if not self.done():
                raise KeyboardInterrupt
            return super().result(timeout)

    class Pool:
        def __init__(self, workers, **options):
            self.futures: list[Future] = []
            pools.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, cfg, *args):
            future = Waiting()
            if len(self.futures) < 2:
                future.set_running_or_notify_cancel()
            if not self.futures:
                future.set_result(runs.RunStatus(cfg.run_name(), Path(cfg.run_dir), "complete", 1.0))
            self.futures.append(future)
            return future

    pools: list[Pool] = []
    monkeypatch.setattr(runs, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(images, "warm_cache", lambda paths, size: {})
    configs = runs.matrix("quick", tmp_path, {}, ["none"], ["binary"], ["ce", "focal"], seeds=2)
    with pytest.raises(runs.MatrixInterrupted) as stopped:
        runs.execute_all(configs, "inline", 2, {}, [])
    assert [(r.name, r.status) for r in stopped.value.results] == [
        ("binary-ce-resnet50-none-s0", "complete"), ("binary-focal-resnet50-none-s0", "interrupted"),
        ("binary-ce-resnet50-none-s1", "not started"), ("binary-focal-resnet50-none-s1", "not started")]
    assert [f.cancelled() for f in pools[0].futures] == [False, False, True, True]  # queued runs never start


def test_variants_follow_the_core_runs_of_each_seed(tmp_path):
    data = {"coronahack_dir": "C", "extra_covid_dir": "E"}
    variants = runs.parse_variants("negs,negs+clahe,holdout:country=italy,unweighted", extra_negatives="N")
    assert variants == [{"extra_negatives": "N"}, {"extra_negatives": "N", "preprocess": "clahe"},
                        {"hold_out": "country=italy"}, {"weighted_sampler": False}]
    configs = runs.matrix("paper", tmp_path, data, ["none"], ["binary"], ["ce", "focal"], seeds=2,
                          variants=variants, variant_losses=("focal",))
    names = [c.run_name() for c in configs]
    assert len(names) == len(set(names)) == 2 * (2 + 4)
    assert [c.seed for c in configs] == [0] * 6 + [1] * 6  # a time budget cuts whole seeds, variants included
    assert all(c.loss == "focal" and c.extra_covid_train for c in configs[2:6])
    assert names[3] == "binary-focal-resnet50-none-negs-clahe-s0"
    assert names[5] == "binary-focal-resnet50-none-unweighted-s0" and not configs[5].weighted_sampler
    with pytest.raises(CXRError, match="needs --extra-negatives"):
        runs.parse_variants("negs")
    with pytest.raises(CXRError, match="unknown part 'flip'"):
        runs.parse_variants("flip")


def test_every_chapter_is_executed_and_in_the_toc():
    names = sorted(p.stem for p in runs.NOTEBOOKS.glob("*.py"))
    assert sorted((*runs.CHAPTERS, runs.FINETUNE)) == names
    toc = (runs.ROOT / "_toc.yml").read_text()
    assert all(f"book/generated/{name}\n" in toc for name in names)


def test_execute_notebook_passes_only_declared_parameters_and_tidies(tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(a)")]
    monkeypatch.setattr(runs, "NOTEBOOKS", tmp_path)
    nbformat.write(nb, tmp_path / "chapter.ipynb")
    out = tmp_path / "out" / "chapter.ipynb"
    runs.execute_notebook("chapter", out, {"a": 2, "run_root": "/elsewhere"})
    done = nbformat.read(out, as_version=4)
    injected = [c for c in done.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "a = 2" in injected[0].source and "run_root" not in injected[0].source
    assert done.cells[-1].outputs[0]["text"] == "2\n"
    assert all("remove-cell" in c.metadata.tags for c in done.cells if "parameters" in c.metadata.get("tags", []))


def test_the_matrix_run_root_also_takes_the_data_sets_own_folder(tmp_path):
    from cxrlib.runs import data_root

    record = {"tag": "coronahack+ieee8023-a47664a7"}
    assert data_root(tmp_path, record) == tmp_path / record["tag"]
    assert data_root(tmp_path / record["tag"], record) == tmp_path / record["tag"]  # the chapters' run_root


# --- shards: one matrix over many machines (issue 31) --------------------------------------------------------


def test_shards_are_disjoint_cover_the_matrix_and_come_from_a_slurm_array(tmp_path):
    configs = runs.matrix("quick", tmp_path, {}, ["none", "imagenet"], seeds=2)  # 16 runs
    names = [c.run_name() for c in configs]
    shares = [[c.run_name() for c in runs.share(configs, (i, 3))] for i in range(3)]
    assert sorted(sum(shares, [])) == sorted(names) and [len(s) for s in shares] == [6, 5, 5]
    assert shares[1] == names[1::3]  # positions I, I + N, ...: not which runs are complete
    assert runs.share(configs, None) == configs
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}  # --array=5-7
    assert runs.parse_shard("slurm", slurm) == (2, 3) and runs.parse_shard("0/1") == (0, 1)
    assert runs.parse_shard("") is None


def _planned(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "matrix.json").write_text(json.dumps({"runs": [{"name": n, "status": "planned"} for n in names]}))


def test_settle_tells_complete_failed_running_interrupted_and_missing_apart(tmp_path, capsys):
    from cxrlib import rundir

    names = ["done", "broke", "busy", "killed", "started", "never"]
    _planned(tmp_path, names)
    for name, status in [("done", "complete"), ("broke", "failed: RuntimeError: x"), ("busy", "running"),
                         ("killed", "running")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "status").write_text(status + "\n")
        (tmp_path / name / "host").write_text(f"node-{name}\n")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")  # killed before training wrote a status
    (tmp_path / "killed" / ".lock").write_text("123 (python -m cxrlib.runs), since then\n")  # left by SIGKILL: not held
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom cxrlib.rundir import locked\n"
                               f"with locked({str(tmp_path / 'busy')!r}):\n    print('held', flush=True)\n"
                               "    sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(runs.ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        settled = rundir.settle(tmp_path)
    finally:
        holder.communicate("")
    assert [(r["run"], r["state"], r["host"]) for r in settled] == [
        ("done", "complete", "node-done"), ("broke", "failed", "node-broke"), ("busy", "running", "node-busy"),
        ("killed", "interrupted", "node-killed"), ("started", "interrupted", ""), ("never", "missing", "")]
    assert rundir.settle(tmp_path / "elsewhere") == []
    assert runs.gather(tmp_path) == 1  # `--gather`, now that "busy" has no process either
    said = capsys.readouterr().out.splitlines()
    assert said[1].split() == ["failed", "node-broke", "broke", "(failed:", "RuntimeError:", "x)"]
    assert said[-1].startswith("6 planned: 1 complete, 1 failed, 0 running, 3 interrupted, 1 missing (in ")
    with pytest.raises(CXRError, match="no run matrix planned there"):
        runs.gather(tmp_path / "elsewhere")


def test_pack_refuses_missing_runs_unless_partial_and_says_so(tmp_path):
    from cxrlib import bundle

    root = tmp_path / "runs"
    _planned(root, ["a", "b", "c"])
    for name, status in [("a", "complete"), ("b", "failed: boom")]:
        (root / name).mkdir()
        (root / name / "status").write_text(status + "\n")
        (root / name / "params.json").write_text(json.dumps({"config": {"task": "binary"}}))
    with pytest.raises(CXRError, match=r"1 planned run\(s\) have no result: c \(missing\).*--partial"):
        bundle.pack(root, tmp_path / "refused", scratch=True)
    assert not (tmp_path / "refused").exists()
    record = bundle.pack(root, tmp_path / "b", scratch=True, partial=True)
    assert record["missing"] == [{"run": "c", "state": "missing"}] == bundle.load(tmp_path / "b")["missing"]
    assert [r["run"] for r in record["runs"]] == ["a", "b"]
    (root / "c").mkdir()
    (root / "c" / "status").write_text("complete\n")
    assert bundle.pack(root, tmp_path / "whole", scratch=True)["missing"] == []


SHARD_MATRIX = ["--profile", "quick", "--executor", "inline", "--arms", "random", "--tasks", "binary", "--losses",
                "ce,focal", "--extra-covid-axis", "both", "--set", "image_size=32", "--set", "epochs=1", "--set",
                "device=cpu"]  # 4 runs: shard 0/3 takes the first and the last


@pytest.mark.slow
def test_three_shard_processes_fill_one_root_once_and_a_killed_shard_resumes(tmp_path, capsys):
    """3 shards started at once into one run root, as a Slurm job array on a shared filesystem: each trains its own
    share only; shard 0 is killed (SIGKILL) while training its first run, which `--gather` then calls interrupted and
    its second missing, and `bundle pack` refuses; the same command (with two workers) completes the matrix."""
    from cxrlib import bundle

    argv = [sys.executable, "-m", "cxrlib.runs", *SHARD_MATRIX, "--run-root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(runs.ROOT)}

    def start(index: int) -> subprocess.Popen:
        return subprocess.Popen([*argv, "--shard", f"{index}/3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)

    def trained(out: str) -> set[str]:
        return {line.split()[1] for line in out.splitlines() if line.strip().startswith("complete ")}

    root = tmp_path / "synthetic"
    first, second, third, last = ("binary-ce-resnet50-none-s0", "binary-focal-resnet50-none-s0",
                                  "binary-ce-resnet50-none-s0-noextra", "binary-focal-resnet50-none-s0-noextra")
    shards = [start(i) for i in range(3)]
    try:
        deadline = time.monotonic() + 240
        while not ((root / first / "status").is_file() and (root / first / "status").read_text() == "running\n"):
            assert time.monotonic() < deadline and shards[0].poll() is None, shards[0].communicate()[0][-3000:]
            time.sleep(0.1)
        os.killpg(shards[0].pid, signal.SIGKILL)
        outs = [p.communicate(timeout=300)[0] for p in shards]
    finally:
        for p in shards:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert shards[0].returncode == -signal.SIGKILL
    assert [p.returncode for p in shards[1:]] == [0, 0], outs
    assert trained(outs[1]) == {second} and trained(outs[2]) == {third}  # disjoint shares, each run once
    assert "1 run(s) of 4 (shard 1/3)" in outs[1]

    capsys.readouterr()
    assert runs.main([*SHARD_MATRIX, "--run-root", str(tmp_path), "--gather"]) == 1
    said = {line.split()[2]: line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]}  # state host run
    assert said == {first: "interrupted", second: "complete", third: "complete", last: "missing"}
    host = socket.gethostname()
    assert all((root / name / "host").read_text() == f"{host}\n" for name in (first, second, third))
    with pytest.raises(CXRError, match=r"2 planned run\(s\) have no result"):
        bundle.pack(root, tmp_path / "bundle", scratch=True)

    again = subprocess.run([*argv, "--shard", "0/3", "--concurrent", "2"], capture_output=True, text=True, env=env,
                           timeout=300)  # --shard composes with --concurrent: its two runs at once
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert trained(again.stdout) == {first, last}
    assert runs.main([*SHARD_MATRIX, "--run-root", str(tmp_path), "--gather"]) == 0
    assert "4 planned: 4 complete, 0 failed, 0 running, 0 interrupted, 0 missing" in capsys.readouterr().out
    record = json.loads((root / "matrix.json").read_text())
    assert {r["name"]: r["status"] for r in record["runs"]} == dict.fromkeys([first, second, third, last], "complete")
    assert {k: v["runs"] for k, v in record["shards"].items()} == {
        "0/3": sorted([first, last]), "1/3": [second], "2/3": [third]}
    assert all(len(pd.read_csv(root / name / "history.csv")) == 1 for name in record["shards"]["0/3"]["runs"])
    assert bundle.pack(root, tmp_path / "bundle", scratch=True)["missing"] == []
