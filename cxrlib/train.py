"""Training and evaluation: `run()` makes one run folder, `fit()` is the reusable epoch loop.

The run folder (see DESIGN.md) is the contract with the notebooks and the book:

    params.json      every parameter, data fingerprint, what the model loaded, versions, git commit, device
    model.pt         the best epoch by validation macro-F1 (models.load_checkpoint reads it)
    checkpoint-last.pt  everything needed to resume: model, optimiser, scheduler, scaler, RNG states
    history.csv      one row per epoch
    predictions.csv  the test split, one row per image (metrics.predictions_table)
    metrics.json     metrics.compute_metrics on test + validation-chosen threshold + majority baseline + provenance
    status           "complete", written last; "failed: <reason>" when an exception escapes

`fit()` knows nothing about COVID: it takes a model, two datasets, a loss and a score function, so
ChestX-ray14 pretraining (14 sigmoid outputs, BCE, mean AUROC) reuses the loop, the checkpoints,
resume and DistributedDataParallel. The same code runs in one process or under `torchrun`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from . import data, distributed, images, losses, metrics, models
from .config import CHOICES, RunConfig, classes as task_classes, data_record, external_sets
from .errors import CXRError
from .results import read_status

TARGET_SENSITIVITY = 0.95  # COVID sensitivity the validation-chosen operating point must reach
SPLITS = ("train", "val", "test")
LAST = "checkpoint-last.pt"
BEST = "model.pt"
# What a fresh (not resumed) run removes from an unfinished folder; never the papermill notebook.
OUTPUTS = (BEST, LAST, "history.csv", "predictions.csv", "metrics.json")
# Parameters that may differ between a complete run folder and a request for it (they do not change results).
# Data folders are not identity either: the data fingerprint is (the same data may sit elsewhere on another machine).
NOT_IDENTITY = ("run_dir", "device", "num_workers", "profile", "coronahack_dir", "extra_covid_dir", "manifest",
                "extra_negatives", "external")


# --- the run folder ------------------------------------------------------------------------------


def run(cfg: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        progress: bool | None = None) -> Path:
    """Train, evaluate and write the run folder of `cfg`; a complete folder is returned untouched.

    The book must never retrain what exists, so a folder whose status is "complete" is only checked
    (same parameters, same data fingerprint) and returned. `resume=True` continues from
    checkpoint-last.pt of an interrupted run and ends with the same numbers as an uninterrupted one.
    Under `torchrun` every rank calls this; rank 0 alone writes.
    """
    loaded = None if (run_dir or cfg.run_dir) else load_data(cfg)  # the default folder is named by the data
    run_dir = Path(run_dir or default_run_dir(cfg, loaded and loaded.record))
    return run_folder(cfg, run_dir, lambda info: _train_and_evaluate(cfg, run_dir, resume, progress, info, loaded),
                      resume=resume, data_record=lambda: (loaded or load_data(cfg)).record)


@dataclass
class LoadedData:
    """The table a run reads (before its split), the reader's report, and its `config.data_record`."""

    table: pd.DataFrame
    report: data.ReadReport
    record: dict[str, Any]


def load_data(cfg: RunConfig) -> LoadedData:
    """Read the run's data once: its fingerprint is part of the run's identity (folder reuse, data tag)."""
    table, report = data.load_table(cfg.coronahack_dir, cfg.extra_covid_dir, cfg.manifest,
                                    extra_negatives=cfg.extra_negatives)
    extra = data.extra_negative_rows(table)
    record = data_record(data.data_fingerprint(table[~extra]), int((~extra).sum()), cfg.coronahack_dir,
                         cfg.extra_covid_dir, cfg.manifest)
    if extra.any():  # a run parameter of the debiasing arm, not another data set: the data tag stays the base's
        record["extra_negatives"] = {"folder": Path(cfg.extra_negatives).name, "n_images": int(extra.sum()),
                                     "fingerprint": data.data_fingerprint(table[extra])}
    return LoadedData(table, report, record)


def default_run_dir(cfg: RunConfig, record: dict[str, Any] | None = None, root: str | Path = "runs") -> Path:
    """cfg.run_dir, else <root>/<profile>/<data tag>/<run name>: runs of other data never share a folder."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(root) / cfg.profile / (record or load_data(cfg).record)["tag"] / cfg.run_name()


def run_folder(cfg: Any, run_dir: str | Path, work: Callable[[distributed.DistInfo], None], *,
               resume: bool = False, outputs: Sequence[str] = OUTPUTS,
               data_record: Callable[[], dict] | None = None) -> Path:
    """The run-folder life cycle around `work(info)`, for fine-tuning and pretraining alike.

    Complete folder: check `cfg.to_dict()` (and the fingerprint of `data_record()`, when given: data are
    read only to check a complete folder) against its params.json and return it. Otherwise join
    the torchrun process group (if any), clear stale `outputs` unless resuming, write status
    "running", call `work`, then write "complete" last; an exception writes "failed: <reason>" and
    is re-raised. The process group is left again if this call created it.
    """
    run_dir = Path(run_dir)
    if read_status(run_dir) == "complete":
        check_reusable(cfg, run_dir, data_record() if data_record else None)
        return run_dir
    owns_group = not torch.distributed.is_initialized()
    info = distributed.setup(getattr(cfg, "device", "auto"))
    ok = False
    try:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume or not (run_dir / LAST).is_file():
                for name in outputs:
                    (run_dir / name).unlink(missing_ok=True)
            _write_text(run_dir / "status", "running\n")
        distributed.barrier()
        work(info)
        if info.is_main:
            _write_text(run_dir / "status", "complete\n")
        ok = True
    except BaseException as err:
        if info.is_main:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _write_text(run_dir / "status", f"failed: {type(err).__name__}{': ' + reason if reason else ''}\n")
        raise
    finally:
        if owns_group and torch.distributed.is_initialized():
            distributed.shutdown() if ok else torch.distributed.destroy_process_group()
    return run_dir


def check_reusable(cfg: Any, run_dir: Path, data_record: dict | None = None) -> None:
    """A complete folder made with other parameters or other data is an error, not a silent substitute."""
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    params = json.loads(params_file.read_text())
    saved, wanted = params.get("config", {}), cfg.to_dict()
    diff = [f"{k}: {saved.get(k)!r} there, {wanted[k]!r} asked" for k in wanted
            if k not in NOT_IDENTITY and k in saved and saved[k] != wanted[k]]
    if data_record is not None:
        had = params.get("data", {}).get("record", {})
        if had.get("fingerprint") != data_record["fingerprint"]:
            diff.append(f"data fingerprint: {had.get('fingerprint')!r} there, {data_record['fingerprint']!r} "
                        f"({data_record['tag']}) asked")
        negs = [(r.get("extra_negatives") or {}).get("fingerprint") for r in (had, data_record)]
        if negs[0] != negs[1]:
            diff.append(f"extra negatives fingerprint: {negs[0]!r} there, {negs[1]!r} asked")
    if diff:
        raise CXRError(f"{run_dir} is a complete run with other parameters ({'; '.join(diff)}); "
                       "choose another run_dir or delete that folder to retrain")


def _train_and_evaluate(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool | None,
                        info: distributed.DistInfo, loaded: LoadedData | None) -> None:
    classes = list(cfg.classes)
    with main_first(info):  # rank 0 makes the synthetic data and fills the image cache; the others then read it
        seed_everything(cfg.seed)
        loaded = loaded or load_data(cfg)
        report = loaded.report
        table = data.split_table(loaded.table, cfg.task, seed=cfg.seed, mode=cfg.split, val_frac=cfg.val_frac,
                                 test_frac=cfg.test_frac, hold_out=cfg.hold_out)
        if not cfg.extra_covid_train:  # after the split: the test split stays that of the run with them
            table = table[~(table["source"].eq("ieee8023") & table["split"].isin(["train", "val"]))]
        model, load_report = models.build_model(cfg.backbone, cfg.weights, len(classes), freeze=cfg.freeze)
        cache = images.make_cache(cfg.image_size, cfg.preprocess)
        eval_tf = images.make_transform(model.input_spec, train=False)
        sets = {s: images.CXRDataset(table[table["split"] == s], cfg.task, cache, eval_tf) for s in SPLITS}
    for s, ds in sets.items():
        if len(ds) == 0:
            raise CXRError(f"the {s} split is empty after reading the data; check the data folders and val/test_frac")

    train_labels = sets["train"].labels
    counts = np.bincount(train_labels, minlength=len(classes))
    loss_fn = losses.make_loss(cfg.loss, counts.tolist(), cfg.gamma, cfg.alpha)
    sampler = data.weighted_sampler(train_labels, len(classes), cfg.seed) if cfg.weighted_sampler else None
    opts = FitOptions.from_config(cfg, progress=progress)
    device = distributed.resolve_device(cfg.device, info)
    cached_features = cfg.freeze == "backbone"
    augment = cfg.augment and not cached_features
    if augment:
        sets["train"].transform = images.make_transform(model.input_spec, train=True, augment=True)

    fingerprint = data.data_fingerprint(table)
    prov = metrics.provenance(describe_device(device, info))
    if info.is_main:
        total, trainable = models.count_parameters(model)
        metrics.save_metrics({
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "data": {"fingerprint": fingerprint, "record": loaded.record, "summary": data.summarize(table, report),
                     "unreadable": {s: [f"{p}: {why}" for p, why in ds.skipped] for s, ds in sets.items()},
                     "train_class_counts": dict(zip(classes, counts.tolist())),
                     "held_out_images": table.loc[data.held_out(table, cfg.hold_out), "image_id"].tolist()},
            "model": {"weights_source": load_report.source, "init_quality": init_quality(cfg.weights),
                      "loaded_tensors": len(load_report.loaded),
                      "reinitialised": load_report.reinitialised[:20], "notes": load_report.notes,
                      "input_spec": model.input_spec, "parameters": total, "trainable_parameters": trainable},
            "training": {"augment": augment, "cached_backbone_features": cached_features,
                         "target_sensitivity": TARGET_SENSITIVITY, "world_size": info.world_size,
                         **dataclasses.asdict(opts), "amp_dtype": str(amp_dtype(opts.amp, device))},
        }, run_dir / "params.json", prov)

    if info.is_main and progress is not False:
        print(f"{run_dir}: {', '.join(f'{len(ds)} {s}' for s, ds in sets.items())} images, {cfg.image_size} px, "
              f"{cfg.backbone} from {load_report.source}, {describe_device(device, info)}"
              + (", training the head on cached backbone features" if cached_features else ""), flush=True)
    seen = table.loc[table["split"].isin(["train", "val"]), "image_hash"] if "image_hash" in table else []
    meta = {"backbone": cfg.backbone, "num_classes": len(classes), "classes": classes,
            "input_spec": model.input_spec, "task": cfg.task, "weights": cfg.weights,
            "image_size": cfg.image_size, "config": cfg.to_dict(),
            "seen_image_hashes": sorted(set(seen))}  # evaluate() leaves these images out
    history_extra = {"augment": augment, "cached_features": cached_features}
    if cached_features:  # train the head alone on pooled features computed once per image
        features, head = models.backbone_and_head(model)
        sets = {s: backbone_features(features, ds, batch_size=opts.eval_batch_size, device=device,
                                     amp=opts.amp, progress=opts.progress) for s, ds in sets.items()}
        trained = head
    else:
        trained = model
    result = fit(trained, sets["train"], sets["val"], loss_fn, opts, run_dir, sampler=sampler,
                 model_meta=meta, save_module=model, resume=resume, history_extra=history_extra)
    model.load_state_dict(result.best_state)

    scored = {s: predict_dataset(trained, sets[s], batch_size=opts.eval_batch_size, device=device, amp=opts.amp)[0]
              for s in ("val", "test")}
    if info.is_main:
        _save_results(cfg, run_dir, sets, scored, result, fingerprint, prov)
    distributed.barrier()  # model.pt holds the validation threshold now
    for name, where in external_sets(cfg.external).items():  # scored now: a bundle without weights keeps them
        evaluate(run_dir / BEST, {"external": where}, run_dir / "external" / name, device=str(device), progress=False)


def _save_results(cfg: RunConfig, run_dir: Path, sets: dict[str, Dataset], scored: dict[str, np.ndarray],
                  result: "FitResult", fingerprint: str, prov: dict[str, Any]) -> None:
    """predictions.csv, metrics.json and the threshold in model.pt, from the val and test scores (rank 0)."""
    classes = list(cfg.classes)
    labels = {s: ds.labels for s, ds in sets.items()}
    pred = {s: metrics.predictions_table(sets[s].table, scored[s], classes, labels[s]) for s in ("val", "test")}
    threshold, why = _choose_threshold(pred["val"])
    results = metrics.compute_metrics(pred["test"], classes, seed=cfg.seed, threshold=threshold)
    _write_csv(pred["test"], run_dir / "predictions.csv")
    extra = {
        "threshold_selection": {"target_sensitivity": TARGET_SENSITIVITY, "threshold": threshold,
                                "chosen_on": "val", "note": why},
        "majority_baseline": metrics.majority_baseline(labels["train"], labels["test"], classes),
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early, "train_seconds": float(result.history["seconds"].sum()),
        "params": cfg.to_dict(), "seed": cfg.seed, "data_fingerprint": fingerprint,
    }
    metrics.save_metrics(results, run_dir / "metrics.json", {**extra, **prov})
    checkpoint = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)
    checkpoint["threshold"] = threshold  # evaluate() applies the same operating point to other data
    save_atomic(checkpoint, run_dir / BEST)
    (run_dir / LAST).unlink(missing_ok=True)  # the run is complete: no more resuming


def init_quality(weights: str) -> dict[str, Any] | None:
    """How good a pretrained init is by its own measure, kept beside the fine-tuned results: a cxrlib
    pretraining folder's validation and test mean AUROC (and whether its data were synthetic), else the source."""
    kind, _, rest = weights.partition(":")
    if kind == "none":
        return None
    if kind == "imagenet":
        return {"source": "torchvision ImageNet-1k weights"}
    folder = Path(rest).parent
    if kind == "file" and (folder / "metrics.json").is_file():
        m = json.loads((folder / "metrics.json").read_text())
        pre = json.loads((folder / "params.json").read_text()) if (folder / "params.json").is_file() else {}
        return {"source": f"cxrlib ChestX-ray14 pretraining ({folder})",
                "synthetic_chestxray14": pre.get("data", {}).get("synthetic"),
                "val_mean_auroc": m.get("val", {}).get("mean"), "test_mean_auroc": m.get("mean_auroc")}
    return {"source": weights, "quality": "not measured here (published or user-supplied weights)"}


def _choose_threshold(pred_val: pd.DataFrame) -> tuple[float | None, str]:
    """The validation threshold on p_covid for TARGET_SENSITIVITY, or None with the reason."""
    if "p_covid" not in pred_val.columns:
        return None, "no covid class in this task"
    if not (pred_val["true"] == "covid").any():
        return None, "no covid image in the validation split"
    return metrics.threshold_for_sensitivity(pred_val, TARGET_SENSITIVITY), (
        f"highest threshold on p_covid with validation sensitivity >= {TARGET_SENSITIVITY}")


class main_first:
    """Context manager: rank 0 runs the block first, the other ranks after it (warm caches, no races)."""

    def __init__(self, info: distributed.DistInfo):
        self.info = info

    def __enter__(self):
        if not self.info.is_main:
            distributed.barrier()

    def __exit__(self, *exc):
        if self.info.is_main and exc[0] is None:
            distributed.barrier()
        return False


# --- the epoch loop ------------------------------------------------------------------------------


@dataclass
class FitOptions:
    """How `fit` trains. `monitor` is the key of score_fn's dict that picks the best epoch (higher is better)."""

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step (x0.1 every third of the epochs) | none
    patience: int = 5  # epochs without a better monitor before stopping; 0 disables
    monitor: str = "macro_f1"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off: see amp_dtype
    channels_last: bool = True
    num_workers: int = 0
    device_batches: bool = True  # gather and augment batches on the device (images.DeviceBatches) where possible
    eval_batch_size: int = 256  # validation and test forwards: no gradients, so larger batches
    progress: bool | None = None  # None: bars on a terminal or in a notebook, off in logs

    @classmethod
    def from_config(cls, cfg: RunConfig, **overrides: Any) -> "FitOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in cfg.to_dict().items() if k in names}, **overrides})


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_score: float
    best_state: dict[str, torch.Tensor]  # state_dict of save_module at the best epoch (CPU tensors)
    stopped_early: bool


def classification_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Validation scores of single-label classification: macro-F1 (classes without support left out) and accuracy."""
    pred = probs.argmax(axis=1)
    labels = list(range(probs.shape[1]))
    return {"macro_f1": float(f1_score(targets, pred, labels=labels, average="macro", zero_division=np.nan)),
            "accuracy": float(accuracy_score(targets, pred))}


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    loss_fn: nn.Module,
    opts: FitOptions,
    out_dir: str | Path | None = None,
    *,
    sampler: torch.utils.data.WeightedRandomSampler | None = None,
    score_fn: Callable[[np.ndarray, np.ndarray], Mapping[str, float]] = classification_scores,
    output: str = "softmax",
    model_meta: Mapping[str, Any] | None = None,
    save_module: nn.Module | None = None,
    resume: bool = False,
    history_extra: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train `model` on `train_set`, score each epoch on `val_set`, keep the best epoch; resumable, DDP-aware.

    Datasets yield (input, target, ...). `sampler` (e.g. data.weighted_sampler) replaces shuffling;
    under torchrun it becomes a WeightedShardSampler drawing the same weighted sample on every rank.
    `score_fn(targets, probs)` returns the validation scores (probs = softmax or sigmoid of the
    outputs, per `output`); `opts.monitor` names the one that selects the best epoch and drives early
    stopping. With `out_dir`, rank 0 writes history.csv, model.pt (`model_meta` + the state_dict of
    `save_module`, default `model`, at the best epoch) and checkpoint-last.pt after every epoch,
    atomically; `resume=True` continues from checkpoint-last.pt with its RNG states, so the result
    equals an uninterrupted run. Frozen modules (models.freeze_model) stay in eval mode.
    """
    info = distributed.current()
    device = distributed.resolve_device(opts.device, info)
    dtype = amp_dtype(opts.amp, device)
    out_dir = Path(out_dir) if out_dir is not None else None
    save_module = save_module if save_module is not None else model
    if out_dir is not None and info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    loss_fn.to(device)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CXRError("nothing to train: every parameter of the model is frozen")
    optimizer = make_optimizer(params, opts)
    scheduler = make_scheduler(optimizer, opts)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_sampler = _train_sampler(train_set, sampler, opts.seed, info)
    loader_rng = torch.Generator().manual_seed(opts.seed + info.rank)  # also the device path's augmentation draws
    # Drop the last batch only when it would hold one image: BatchNorm cannot train on a batch of one.
    drop_last = len(train_sampler) % opts.batch_size == 1 and len(train_sampler) > 1
    on_device = images.DeviceBatches.of(train_set, device) if opts.device_batches else None
    loader = None if on_device is not None else DataLoader(
        train_set, batch_size=opts.batch_size, sampler=train_sampler, drop_last=drop_last,
        num_workers=opts.num_workers, worker_init_fn=_seed_worker, generator=loader_rng,
        pin_memory=device.type == "cuda", persistent_workers=False)
    val_on_device = images.DeviceBatches.of(val_set, device) if opts.device_batches else None
    n_batches = len(train_sampler) // opts.batch_size if drop_last else -(-len(train_sampler) // opts.batch_size)
    net = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    state = {"epoch": 0, "best_score": -float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": [],
             "stopped": False}
    best_state = None
    last = out_dir / LAST if out_dir is not None else None
    if resume and last is not None and last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        if len(ckpt["rng"]) == info.world_size:
            _set_rng_state(ckpt["rng"][info.rank], train_sampler, loader_rng)
        if (out_dir / BEST).is_file():
            best_state = torch.load(out_dir / BEST, map_location="cpu", weights_only=True)["state_dict"]
    else:
        seed_everything(opts.seed + info.rank)

    show = info.is_main and progress_enabled(opts.progress)
    epochs = range(state["epoch"], opts.epochs) if not state["stopped"] else range(0)
    for epoch in tqdm(epochs, desc="epochs", disable=not show, initial=state["epoch"], total=opts.epochs):
        if hasattr(train_sampler, "set_epoch"):
            train_sampler.set_epoch(epoch)
        _train_mode(model)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, seen = torch.zeros((), device=device), 0
        batches = loader if loader is not None else _sampled_batches(on_device, train_sampler, opts.batch_size,
                                                                     drop_last, loader_rng)
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}", disable=not show, leave=False, total=n_batches):
            x, y = _to_device(batch[0], device, opts.channels_last), batch[1].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        if scheduler is not None:
            scheduler.step()
        totals = distributed.gather_objects((float(loss_sum), seen))
        train_loss = sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals))
        probs, targets, val_loss = predict_dataset(
            model, val_set if val_on_device is None else val_on_device, batch_size=opts.eval_batch_size,
            device=device, amp=opts.amp, output=output, loss_fn=loss_fn, channels_last=opts.channels_last,
            num_workers=opts.num_workers, device_batches=opts.device_batches)
        scores = dict(score_fn(targets, probs))
        if opts.monitor not in scores:
            raise CXRError(f"monitor={opts.monitor!r} is not among the validation scores {sorted(scores)}")
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in scores.items() if np.isscalar(v)},
               "lr": lr, "seconds": time.perf_counter() - start, **(history_extra or {})}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        score = scores[opts.monitor]
        if score is not None and np.isfinite(score) and score > state["best_score"]:
            state.update(best_score=float(score), best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in save_module.state_dict().items()}
            if out_dir is not None and info.is_main:
                save_atomic({**(model_meta or {}), "state_dict": best_state, "epoch": epoch + 1,
                             "val": {k: v for k, v in scores.items() if np.isscalar(v)}}, out_dir / BEST)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = opts.patience > 0 and state["bad_epochs"] >= opts.patience
        rng = distributed.gather_objects(_rng_state(train_sampler, loader_rng))
        if out_dir is not None and info.is_main:
            _write_csv(pd.DataFrame(state["history"]), out_dir / "history.csv")
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "scaler": scaler.state_dict(), "state": state, "rng": rng,
                         "options": dataclasses.asdict(opts)}, last)
        if info.is_main and opts.progress is not False:  # one line per epoch, also in logs without bars
            tqdm.write(f"epoch {epoch + 1}/{opts.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                       + ", ".join(f"val {k} {v:.4f}" for k, v in scores.items() if np.isscalar(v))
                       + f" ({row['seconds']:.0f} s)")
        distributed.barrier()
        if state["stopped"]:
            break
    if best_state is None:  # no epoch scored (NaN monitor throughout): keep the last weights
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in save_module.state_dict().items()}
    return FitResult(pd.DataFrame(state["history"]), state["best_epoch"], state["best_score"], best_state,
                     state["stopped"])


def make_optimizer(params: Sequence[nn.Parameter], opts: FitOptions) -> torch.optim.Optimizer:
    """AdamW or SGD, fused (one kernel for all parameters) where every parameter is a float tensor on a CPU
    or GPU: on one CPU thread that made a ResNet50 AdamW step 3x faster than the default for-each one."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=fused)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay, fused=fused)
    raise CXRError(f"parameter optimizer={opts.optimizer!r}: choose one of {', '.join(CHOICES['optimizer'])}")


def make_scheduler(optimizer: torch.optim.Optimizer, opts: FitOptions) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedules: cosine to 0 over all epochs, or x0.1 every third of them."""
    if opts.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, opts.epochs))
    if opts.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, opts.epochs // 3), gamma=0.1)
    if opts.scheduler == "none":
        return None
    raise CXRError(f"parameter scheduler={opts.scheduler!r}: choose one of {', '.join(CHOICES['scheduler'])}")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32. "auto": on a GPU bf16 where supported, else fp16 (fit then adds
    a GradScaler); on a CPU bf16 where it multiplies bf16 in hardware (cpu_has_fast_bf16), else fp32."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise CXRError(f"amp={amp!r}: choose auto, bf16, fp16 or off")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (bf16 autocast about 2x fp32 there); elsewhere bf16 is
    emulated and slower than fp32. torch's own probes where it has them, else /proc/cpuinfo's flags."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if getattr(torch.cpu, probe, lambda: False)():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def _sampled_batches(source: images.DeviceBatches, sampler: torch.utils.data.Sampler, batch_size: int,
                     drop_last: bool, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The DataLoader's batches (same sampler order, same chunks), gathered and augmented on the device."""
    order = torch.as_tensor(list(sampler), dtype=torch.long)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield source.batch(order[start:start + batch_size], generator)


def _train_sampler(dataset: Dataset, weighted: torch.utils.data.WeightedRandomSampler | None, seed: int,
                   info: distributed.DistInfo) -> torch.utils.data.Sampler:
    """Shuffling (DistributedSampler, also for one process: the same order whatever the world size) or weighted."""
    if weighted is None:
        return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    if not info.distributed:
        return weighted
    return distributed.WeightedShardSampler(weighted.weights, weighted.num_samples, info.rank, info.world_size, seed)


def _train_mode(model: nn.Module) -> None:
    """Train mode; frozen backbone parts stay in eval so their BatchNorm statistics stay those of the weights."""
    if getattr(model, "frozen_modules", None) is not None:
        models.train_mode(model)
    else:
        model.train()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


# --- inference -----------------------------------------------------------------------------------


def forward_all(module: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                amp: str = "off", channels_last: bool = True, num_workers: int = 0,
                progress: bool | None = False, desc: str = "",
                device_batches: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of `module` on every item of `dataset`, in dataset order, on every rank.

    `dataset` may be an images.DeviceBatches; other sets that have one are batched on the device
    too (no per-image transforms, no DataLoader) unless `device_batches=False`. Under torchrun each
    rank computes a shard (rank, rank + world_size, ...) and the shards are gathered.
    """
    info = distributed.current()
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    shard = distributed.ShardSampler(len(dataset), info.rank, info.world_size)
    source = dataset if isinstance(dataset, images.DeviceBatches) else (
        images.DeviceBatches.of(dataset, device) if device_batches else None)
    if source is not None:
        index = torch.as_tensor(shard.indices, dtype=torch.long)
        loader = (source.batch(index[i:i + batch_size]) for i in range(0, len(index), batch_size))
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
    was_training = module.training
    module.to(device).eval()
    outs, targets = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not (info.is_main and progress_enabled(progress)), leave=False,
                          total=-(-len(shard) // batch_size)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = module(_to_device(batch[0], device, channels_last))
            outs.append(out.float().cpu())
            targets.append(torch.as_tensor(batch[1]).cpu())
    module.train(was_training)
    empty = torch.empty(0)
    parts = distributed.gather_objects((shard.indices, torch.cat(outs) if outs else empty,
                                        torch.cat(targets) if targets else empty))
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    order = torch.as_tensor([i for p in parts for i in p[0]]).argsort()
    return (torch.cat([p[1] for p in parts if len(p[0])])[order],
            torch.cat([p[2] for p in parts if len(p[0])])[order])


def predict_dataset(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                    amp: str = "off", output: str = "softmax", loss_fn: nn.Module | None = None,
                    channels_last: bool = True, num_workers: int = 0, progress: bool | None = False,
                    device_batches: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities, targets, mean loss or NaN) of `model` on `dataset`, in dataset order (see forward_all)."""
    logits, targets = forward_all(model, dataset, batch_size=batch_size, device=device, amp=amp,
                                  channels_last=channels_last, num_workers=num_workers, progress=progress,
                                  desc="predict", device_batches=device_batches)
    loss = float("nan")
    if loss_fn is not None and len(logits):
        with torch.no_grad():
            loss = float(loss_fn(logits.to(device), targets.to(device)))
    probs = logits.softmax(dim=1) if output == "softmax" else logits.sigmoid()
    return probs.numpy(), targets.numpy(), loss


class FeatureDataset(TensorDataset):
    """Pooled backbone features of a CXRDataset with its labels and table: what the head trains on."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, table: pd.DataFrame):
        super().__init__(features, labels)
        self.table = table
        self.labels = labels.numpy()


def backbone_features(features: nn.Module, dataset: Dataset, *, batch_size: int = 64,
                      device: torch.device | str = "cpu", amp: str = "off",
                      progress: bool | None = False) -> FeatureDataset:
    """Run the (frozen) feature extractor once over `dataset` (its own, non-augmenting transform).

    Frozen-backbone training then needs only the head's forward and backward per epoch: the
    backbone forward is the bulk of the cost, and with fixed weights and no augmentation it
    would give the same features every epoch.
    """
    feats, labels = forward_all(features, dataset, batch_size=batch_size, device=device, amp=amp,
                                progress=progress, desc="backbone features")
    return FeatureDataset(feats, labels.long(), dataset.table)


# --- evaluation and prediction with a saved model ------------------------------------------------


def load_model(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """A run's model.pt: (model in eval mode, metadata with task, classes, image_size, input_spec, ...)."""
    model, meta = models.load_checkpoint(checkpoint)
    missing = [k for k in ("task", "classes", "image_size", "input_spec") if k not in meta]
    if missing:
        raise CXRError(f"{checkpoint} lacks {', '.join(missing)}: use the model.pt of a cxrlib run folder")
    if list(meta["classes"]) != list(task_classes(meta["task"])):
        raise CXRError(f"{checkpoint}: classes {meta['classes']} differ from task {meta['task']}'s "
                       f"{list(task_classes(meta['task']))}; the checkpoint is from another cxrlib version")
    return model, meta


def evaluate(checkpoint: str | Path, data_source: pd.DataFrame | Mapping[str, str], out_dir: str | Path, *,
             rows: str = "auto", batch_size: int = 64, device: str = "auto", n_boot: int = 1000,
             progress: bool | None = None) -> dict[str, Any]:
    """Score a saved model on any data the data layer reads; writes out_dir/metrics.json and predictions.csv.

    `data_source` is a table (all its rows are scored), load_table's arguments ({"coronahack_dir",
    "extra_covid_dir", "manifest", "extra_negatives"}) or {"external": folder or CSV in any layout
    (`data.load_external`)}. rows="auto" scores every image the model did
    not see in training or validation (model.pt lists their pixel hashes): all of another hospital's
    manifest (external validation), exactly the run's test split on its own data, and only the unseen
    part of data that overlaps it. rows="all" scores everything; rows="test" re-splits with the
    run's split parameters. The validation threshold stored in model.pt is applied unchanged
    (`at_threshold`).
    """
    model, meta = load_model(checkpoint)
    cfg = meta.get("config", {})
    note = ""
    if isinstance(data_source, pd.DataFrame):
        table, chosen = data_source, "given"
    else:
        args = {k: str(v or "") for k, v in data_source.items()}
        table, _ = (data.load_external(args["external"]) if args.get("external") else
                    data.load_table(args.get("coronahack_dir", ""), args.get("extra_covid_dir", ""),
                                    args.get("manifest", ""), extra_negatives=args.get("extra_negatives", "")))
        chosen = rows
        if rows == "auto":
            seen = set(meta.get("seen_image_hashes", []))
            unseen = ~table["image_hash"].isin(seen)
            note = (f"left out {int((~unseen).sum())} of {len(table)} images that trained or validated this model"
                    if seen else "model.pt lists no training images: every row scored")
            table = table[unseen]
        elif rows == "test":
            table = data.split_table(table, meta["task"], seed=cfg.get("seed", 0), mode=cfg.get("split", "patient"),
                                     val_frac=cfg.get("val_frac", 0.15), test_frac=cfg.get("test_frac", 0.15),
                                     hold_out=cfg.get("hold_out", ""))
            table = table[table["split"] == "test"]
        elif rows != "all":
            raise CXRError(f"rows={rows!r}: choose auto, all or test")
    if chosen != "test":
        table = table.assign(split="test")  # every scored row is this evaluation's test set
    if len(table) == 0:
        raise CXRError(f"no images to evaluate: {note or 'the data source has no rows'}")
    dataset = images.CXRDataset(table, meta["task"], images.make_cache(meta["image_size"], cfg.get("preprocess", "none")),
                                images.make_transform(meta["input_spec"], train=False))
    dev = distributed.resolve_device(device)
    probs, _, _ = predict_dataset(model, dataset, batch_size=batch_size, device=dev, progress=progress)
    classes = list(meta["classes"])
    pred = metrics.predictions_table(dataset.table, probs, classes, dataset.labels)
    threshold = meta.get("threshold")
    results = metrics.compute_metrics(pred, classes, n_boot=n_boot, seed=cfg.get("seed", 0), threshold=threshold)
    if not distributed.current().is_main:  # under torchrun every rank scored a shard; rank 0 writes
        return results
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(pred, out_dir / "predictions.csv")
    extra = {"checkpoint": str(Path(checkpoint).resolve()), "rows": chosen, "rows_note": note,
             "threshold_from_validation": threshold,
             "unreadable": [f"{p}: {why}" for p, why in dataset.skipped],
             "data_fingerprint": data.data_fingerprint(dataset.table), "training_params": cfg,
             **metrics.provenance(describe_device(dev, distributed.current()))}
    metrics.save_metrics(results, out_dir / "metrics.json", extra)
    return results


def predict(checkpoint: str | Path, image_paths: Sequence[str | Path], *, batch_size: int = 32,
            device: str = "auto") -> pd.DataFrame:
    """Class probabilities per image (JPEG, PNG or DICOM), preprocessed exactly as in training.

    Returns one row per path: path, pred, p_<class>... An unreadable file raises CXRError naming it.
    """
    model, meta = load_model(checkpoint)
    if not image_paths:
        raise CXRError("predict: give at least one image path")
    transform = images.make_transform(meta["input_spec"], train=False)
    size = meta["image_size"]
    preprocess = meta.get("config", {}).get("preprocess", "none")
    batch = torch.stack([transform(images.load_preprocessed(p, size, preprocess)) for p in image_paths])
    labels = torch.zeros(len(batch), dtype=torch.long)
    probs, _, _ = predict_dataset(model, TensorDataset(batch, labels), batch_size=batch_size,
                                  device=distributed.resolve_device(device))
    classes = list(meta["classes"])
    out = pd.DataFrame({"path": [str(p) for p in image_paths],
                        "pred": np.array(classes, dtype=object)[probs.argmax(axis=1)]})
    for k, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, k]
    return out


# --- small helpers -------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch seeds each from the loader's generator; NumPy and random follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _rng_state(sampler: torch.utils.data.Sampler, loader_rng: torch.Generator) -> dict[str, Any]:
    """This rank's random states as tensors and plain lists (checkpoints load with weights_only=True)."""
    np_state = np.random.get_state()
    gen = getattr(sampler, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(random.getstate()[1]), random.getstate()[0]],
        "sampler": gen.get_state() if gen is not None else None,
        "loader": loader_rng.get_state(),
    }


def _set_rng_state(rng: dict[str, Any], sampler: torch.utils.data.Sampler, loader_rng: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate((rng["python"][1], tuple(rng["python"][0]), None))
    gen = getattr(sampler, "generator", None)
    if gen is not None and rng["sampler"] is not None:
        gen.set_state(rng["sampler"])
    loader_rng.set_state(rng["loader"])


def progress_enabled(flag: bool | None) -> bool:
    """Progress bars: as asked, else on when stderr is a terminal or we run inside a Jupyter kernel."""
    if flag is not None:
        return flag
    try:
        from IPython import get_ipython

        if type(get_ipython()).__name__ == "ZMQInteractiveShell":
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


def describe_device(device: torch.device, info: distributed.DistInfo | None = None) -> str:
    """E.g. "cpu (2 threads)" or "cuda: NVIDIA H100 80GB HBM3 x 4 processes"."""
    info = info or distributed.current()
    if device.type == "cuda":
        text = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        text = f"cpu ({torch.get_num_threads()} threads)"
    return text + (f" x {info.world_size} processes" if info.distributed else "")


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    _write_text(path, frame.to_csv(index=False))
