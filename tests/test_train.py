"""Training: run folder, resume equivalence, skip-when-complete, failures, frozen-feature cache, DDP on gloo."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cxrlib import distributed, loop, metrics, models, train
from cxrlib.evaluate import load_model
from cxrlib.infer import amp_dtype, cpu_has_fast_bf16
from cxrlib.rundir import LAST, read_status
from cxrlib.config import RunConfig
from cxrlib.errors import CXRError
from helpers import crash_after_checkpoint, tiny_cnn, tiny_config, tiny_data, tiny_manifest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return tiny_manifest(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _fast_metrics(monkeypatch):
    """Few bootstrap resamples: the CIs' correctness is tested in test_metrics, here only the plumbing."""
    monkeypatch.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))


def state_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def complete_run(manifest, tmp_path_factory) -> Path:
    """One uninterrupted 2-epoch run (shared by the resume and skip tests)."""
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))
        return train.run(tiny_config(manifest, tmp_path_factory.mktemp("runs") / "full"), progress=False)


def test_run_folder_contract(complete_run):
    names = {p.name for p in complete_run.iterdir()}
    assert {"params.json", "model.pt", "history.csv", "predictions.csv", "metrics.json", "status"} <= names
    assert "checkpoint-last.pt" not in names  # only while training
    assert read_status(complete_run) == "complete"
    history = pd.read_csv(complete_run / "history.csv")
    assert list(history.columns[:7]) == ["epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy",
                                         "lr", "seconds"]
    assert list(history.epoch) == [1, 2]
    pred = pd.read_csv(complete_run / "predictions.csv")
    assert set(pred.split) == {"test"}
    assert {"image_id", "patient_id", "source", "true", "pred", "p_covid", "p_pneumonia", "p_normal"} <= set(pred.columns)
    m = json.loads((complete_run / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion", "roc_auc", "ci", "majority_baseline",
                "threshold_selection", "params", "seed", "data_fingerprint", "packages", "git_commit", "device"):
        assert key in m, key
    assert set(m["per_class"]["covid"]) >= {"precision", "recall", "specificity", "f1", "support"}
    params = json.loads((complete_run / "params.json").read_text())
    assert params["config"]["image_size"] == 32 and params["data"]["fingerprint"] == m["data_fingerprint"]
    model, meta = load_model(complete_run / "model.pt")  # what evaluate/predict read
    assert meta["task"] == "multiclass" and meta["image_size"] == 32 and meta["input_spec"] == "imagenet"
    assert meta["epoch"] == m["best_epoch"] and "threshold" in meta
    chosen = m["threshold_selection"]  # bounded below (issue 32), the same operating point in model.pt
    assert chosen["threshold"] == max(chosen["unbounded_threshold"], chosen["bound"]) == meta["threshold"]
    assert chosen["at_bound"] == (chosen["unbounded_threshold"] < chosen["bound"]) and "held_out" not in m


def test_resume_matches_uninterrupted_run(complete_run, manifest, tmp_path, monkeypatch):
    """1 epoch, a crash right after its checkpoint, resume to 2 epochs == 2 epochs in one go."""
    cfg = tiny_config(manifest, tmp_path / "resumed")
    with crash_after_checkpoint(), pytest.raises(KeyboardInterrupt):
        train.run(cfg, progress=False)
    assert read_status(tmp_path / "resumed") == "failed: KeyboardInterrupt"
    assert torch.load(tmp_path / "resumed" / LAST, weights_only=True)["state"]["epoch"] == 1
    train.run(cfg, resume=True, progress=False)

    assert read_status(tmp_path / "resumed") == "complete"
    full, resumed = state_of(complete_run), state_of(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    drop = ["seconds"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns=drop),
                                  pd.read_csv(complete_run / "history.csv").drop(columns=drop), atol=1e-6)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (complete_run, tmp_path / "resumed"))
    for key in ("accuracy", "macro_f1", "roc_auc", "confusion", "best_epoch"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_complete_run_is_never_retrained(complete_run, manifest, monkeypatch):
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a complete run was retrained"))
    before = (complete_run / "model.pt").stat().st_mtime_ns
    assert train.run(tiny_config(manifest, complete_run)) == complete_run
    assert (complete_run / "model.pt").stat().st_mtime_ns == before
    with pytest.raises(CXRError, match="other parameters.*epochs"):  # not silently another run's results
        train.run(tiny_config(manifest, complete_run, epochs=3))


def test_default_folder_reads_the_data_once(manifest, tmp_path, monkeypatch):
    calls, real = [], train.load_data
    monkeypatch.setattr(train, "load_data", lambda cfg: calls.append(cfg) or real(cfg))
    cfg = tiny_config(manifest, "", epochs=1)
    out = train.run(cfg, root=tmp_path, progress=False)
    assert len(calls) == 1  # named by the data's tag and trained on the same table
    assert out == tmp_path / cfg.profile / real(cfg).record["tag"] / cfg.run_name() and read_status(out) == "complete"


def test_failed_run_writes_status_and_reraises(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["a.png"], "label": ["covid"]}).to_csv(bad, index=False)  # no image, one class
    (tmp_path / "run").mkdir()  # a folder that was there (the matrix makes it) keeps the failure in its status
    with pytest.raises(CXRError):
        train.run(tiny_config(bad, tmp_path / "run"))
    assert read_status(tmp_path / "run").startswith("failed: CXRError: ")
    with pytest.raises(CXRError):  # a folder this run made holds nothing yet: it goes (test_user_safety)
        train.run(tiny_config(bad, tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_frozen_backbone_trains_the_head_on_features_computed_once(manifest, tmp_path, monkeypatch):
    calls = {"batches": 0}
    real = models.backbone_and_head

    def counting(model):
        features, head = real(model)
        features.register_forward_hook(lambda *_: calls.__setitem__("batches", calls["batches"] + 1))
        return features, head

    monkeypatch.setattr(models, "backbone_and_head", counting)
    cfg = tiny_config(manifest, tmp_path / "frozen", freeze="backbone", epochs=3, lr=1e-2)
    run_dir = train.run(cfg, progress=False)

    params = json.loads((run_dir / "params.json").read_text())
    n = {s: sum(params["data"]["summary"]["counts"][s].values()) for s in ("train", "val", "test")}
    one_pass = sum(-(-n[s] // params["training"]["eval_batch_size"]) for s in n)
    assert calls["batches"] == one_pass  # once per image, not once per epoch
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 3 and not history.augment.any() and history.cached_features.all()
    assert params["training"]["augment"] is False and params["training"]["cached_backbone_features"] is True
    # model.pt holds the initial backbone (weights and BatchNorm statistics) and a trained head.
    torch.manual_seed(cfg.seed)  # run() seeds like this before building the model
    initial = models.build_model("resnet50", "none", 3)[0].state_dict()
    state = state_of(run_dir)
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_fit_options_and_sampler_choices():
    opts = loop.FitOptions.from_config(RunConfig(optimizer="sgd", scheduler="step", epochs=6, lr=0.1))
    model = nn.Linear(2, 2)
    optimizer = loop.make_optimizer(list(model.parameters()), opts)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    scheduler = loop.make_scheduler(optimizer, opts)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert amp_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_weighted_shard_sampler_shards_one_weighted_draw():
    weights = torch.tensor([1.0, 1.0, 8.0, 2.0])
    shards = [list(distributed.WeightedShardSampler(weights, 10, r, 2, seed=3)) for r in range(2)]
    whole = list(distributed.WeightedShardSampler(weights, 10, 0, 1, seed=3))
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == sorted(whole)  # together: exactly the one-process draw
    assert [i for pair in zip(*shards) for i in pair] == whole


# --- DistributedDataParallel on 2 gloo processes vs one process ----------------------------------
# Compared on a tiny CNN without BatchNorm: in DDP each process normalises with its own half batch's
# statistics, so a BatchNorm model legitimately differs from one process on the whole batch. Without
# BatchNorm, 2 processes x batch 4 with averaged gradients == 1 process x batch 8 on the same samples
# (DistributedSampler gives the same order for any world size), up to float summation order.


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _ddp_fit(out)


def _ddp_fit(out: str) -> None:
    """One process's part of the DDP fit, its rank and world size from the environment (torchrun's, or
    _ddp_worker's); rank 0 saves the weights to compare."""
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    world = int(os.environ["WORLD_SIZE"])
    assert info.world_size == world and info.rank == int(os.environ["RANK"])
    model = tiny_cnn()
    opts = loop.FitOptions(epochs=2, batch_size=8 // world, lr=0.05, optimizer="sgd", device="cpu",
                           amp="off", patience=0, progress=False)  # fp32: the comparison is to 1e-5
    result = loop.fit(model, tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts, out)
    if info.is_main:
        torch.save({"state": result.best_state, "last": model.state_dict()}, Path(out) / "ddp.pt")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_matches_one_process(ddp_dir: Path, tmp_path: Path) -> None:
    """The DDP fit saved in `ddp_dir` equals one process's fit on batch 8, weights and history, to 1e-5."""
    ddp = torch.load(ddp_dir / "ddp.pt", weights_only=True)
    single = tiny_cnn()
    opts = loop.FitOptions(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", device="cpu", amp="off", patience=0,
                           progress=False)
    loop.fit(single, tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts, tmp_path / "single")

    for key, value in single.state_dict().items():
        torch.testing.assert_close(ddp["last"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    h_ddp, h_one = (pd.read_csv(d / "history.csv") for d in (ddp_dir, tmp_path / "single"))
    cols = ["train_loss", "val_loss", "val_macro_f1", "val_accuracy"]
    pd.testing.assert_frame_equal(h_ddp[cols], h_one[cols], atol=1e-5)
    written = {p.name for p in ddp_dir.iterdir()}
    assert LAST in written and not [n for n in written if n.endswith(".tmp")]  # atomic.write_atomic's .{name}.*.tmp


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    _assert_matches_one_process(tmp_path / "ddp", tmp_path)


NODE = """import json, os, sys
sys.path.insert(0, {tests!r})
from test_train import _ddp_fit
where = {{k: os.environ[k] for k in ("GROUP_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE")}}
open(os.path.join({out!r}, "node" + os.environ["GROUP_RANK"] + ".json"), "w").write(json.dumps(where))
_ddp_fit({ddp!r})
"""


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_nodes_match_one_process(tmp_path):
    """Reproducing's several-machines command, with two "nodes" on this machine: torchrun --nnodes 2 with node
    ranks 0 and 1, one CPU (gloo) process each, meeting at a local c10d rendezvous; the fit equals one process's.
    Node 0 hosts the rendezvous store (is_host: on one machine both would match the endpoint's address)."""
    script = tmp_path / "node.py"
    script.write_text(NODE.format(tests=str(Path(__file__).parent), out=str(tmp_path), ddp=str(tmp_path / "ddp")))
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "cxr-two-nodes", "--rdzv_conf", f"is_host={int(rank == 0)}", str(script)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outs)
    where = [json.loads((tmp_path / f"node{rank}.json").read_text()) for rank in (0, 1)]
    assert [(w["LOCAL_RANK"], w["WORLD_SIZE"]) for w in where] == [("0", "2")] * 2  # one process on each node
    assert sorted(w["RANK"] for w in where) == ["0", "1"]
    _assert_matches_one_process(tmp_path / "ddp", tmp_path)


# --- GPU paths (skipped without CUDA; CI has none) -------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_run_uses_bf16_autocast_and_channels_last(manifest, tmp_path):
    run_dir = train.run(tiny_config(manifest, tmp_path / "gpu", device="cuda", image_size=64), progress=False)
    params = json.loads((run_dir / "params.json").read_text())
    expected = "torch.bfloat16" if torch.cuda.is_bf16_supported() else "torch.float16"
    assert params["training"]["amp_dtype"] == expected and params["training"]["channels_last"]
    assert params["device"].startswith("cuda: ")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1 and np.isfinite(pd.read_csv(run_dir / "history.csv").train_loss).all()


@cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_cuda_fit_each_precision_learns_and_resumes(amp, tmp_path, monkeypatch):
    opts = loop.FitOptions(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", device="cuda", amp=amp, patience=0,
                           progress=False)
    model = tiny_cnn()
    full = loop.fit(model, tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts, tmp_path / "full")
    assert full.history.train_loss.iloc[-1] < full.history.train_loss.iloc[0]
    scaler = torch.load(tmp_path / "full" / LAST, weights_only=True)["scaler"]
    assert bool(scaler) == (amp == "fp16")  # GradScaler only for fp16
    # Crash after epoch 1's checkpoint, resume: the same weights up to GPU non-determinism.
    with crash_after_checkpoint(), pytest.raises(KeyboardInterrupt):
        loop.fit(tiny_cnn(), tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts, tmp_path / "part")
    resumed_model = tiny_cnn()
    resumed = loop.fit(resumed_model, tiny_data(), tiny_data(), nn.CrossEntropyLoss(), opts, tmp_path / "part",
                       resume=True)
    assert resumed.history.epoch.tolist() == [1, 2]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key)
