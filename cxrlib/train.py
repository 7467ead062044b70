"""Fine-tuning: `run()` trains one configuration on the COVID task and writes its run folder.

The folder's files and life cycle are rundir's; the epoch loop is loop.fit; scoring is infer's; metrics.json
and predictions.csv come from metrics. Here: reading the run's data once (its fingerprint is part of the
run's identity), building the model, loss and datasets from the RunConfig, and choosing the COVID
operating point on validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import data, distributed, images, losses, metrics, models, preprocess
from .atomic import save_torch, write_csv
from .config import RunConfig, check_paths, data_record, external_sets
from .errors import CXRError
from .evaluate import dropped_line, evaluate
from .infer import amp_dtype, backbone_features, describe_device, predict_dataset
from .loop import FitOptions, FitResult, fit, main_first, seed_everything
from .rundir import BEST, LAST, METRICS, PARAMS, PREDICTIONS, claimed, open_run, reuse, running
from .weights import Weights

TARGET_SENSITIVITY = 0.95  # COVID sensitivity the validation-chosen operating point must reach


def run(cfg: RunConfig, run_dir: str | Path | None = None, *, root: str | Path = "runs", resume: bool = False,
        progress: bool | None = None, loaded: LoadedData | None = None, strict: bool = False) -> Path:
    """Train, evaluate and write the run folder of `cfg`; a complete folder is returned untouched.

    The book must never retrain what exists, so a folder whose status is "complete" is only checked
    (same parameters, same data fingerprint) and returned. `resume=True` continues from
    checkpoint-last.pt of an interrupted run and ends with the same numbers as an uninterrupted one.
    The folder is this process's while it trains (rundir.claimed: another writer fails at once, a folder
    holding anything but this run is refused, an error before training leaves no folder). Images the data
    could not give are printed (unless `progress` is False) and recorded; `strict` makes them an error.
    Under `torchrun` every rank calls this; rank 0 alone writes. Without `run_dir` (or cfg.run_dir) the
    folder is `default_run_dir(cfg, root=root)`, and the data are read once for its name and the training;
    `loaded` (load_data(cfg), when the caller has read it already) saves that read.
    """
    if loaded is None and not (run_dir or cfg.run_dir):
        loaded = load_data(cfg)  # the default folder is named by the data
    run_dir = Path(run_dir or default_run_dir(cfg, loaded and loaded.record, root))

    def record() -> dict[str, Any]:  # the data are read only to check a folder that holds a run
        return (loaded or load_data(cfg)).record

    if reuse(cfg, run_dir, record):
        return run_dir
    check_paths(cfg)  # a missing weights file or GPU fails before the folder is made
    distributed.resolve_device(cfg.device)
    with claimed(cfg, run_dir, resume, record):
        if reuse(cfg, run_dir, record):  # completed by another process since the check above
            return run_dir
        with running(run_dir, cfg.device, resume=resume) as info:
            _train_and_evaluate(cfg, run_dir, resume, progress, info, loaded, strict)
    return run_dir


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


def _train_and_evaluate(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool | None,
                        info: distributed.DistInfo, loaded: LoadedData | None, strict: bool) -> None:
    classes = list(cfg.classes)
    with main_first(info):  # rank 0 makes the synthetic data and fills the image cache; the others then read it
        seed_everything(cfg.seed)
        loaded = loaded or load_data(cfg)
        report = loaded.report
        table = data.split_table(loaded.table, cfg.task, seed=cfg.seed, mode=cfg.split, val_frac=cfg.val_frac,
                                 test_frac=cfg.test_frac, hold_out=cfg.hold_out)
        if not cfg.extra_covid_train:  # after the split: validation and test stay those of the run with them
            table = table[data.without_extra_covid(table)]
        table = table[data.in_cohort(table, cfg.cohort)]  # after the split too: the other images keep their side
        model, load_report = models.build_model(cfg.backbone, cfg.weights, len(classes), freeze=cfg.freeze)
        cache = preprocess.make_cache(cfg.image_size, cfg.preprocess)
        eval_tf = images.make_transform(model.input_spec, train=False)
        sets = {s: images.CXRDataset(table[table["split"] == s], cfg.task, cache, eval_tf) for s in data.SPLITS}
    for s, ds in sets.items():
        if len(ds) == 0:
            raise CXRError(f"the {s} split is empty after reading the data; check the data folders and val/test_frac")
    dropped = dropped_line(report, [item for ds in sets.values() for item in ds.skipped], strict)
    if dropped and info.is_main and progress is not False:
        print(dropped, flush=True)

    train_labels = sets["train"].labels
    counts = np.bincount(train_labels, minlength=len(classes))
    weights = data.class_weights(train_labels, len(classes)) if cfg.loss == "weighted_ce" else None
    loss_fn = losses.make_loss(cfg.loss, weights, cfg.gamma, cfg.alpha)
    sampler = data.weighted_sampler(train_labels, len(classes), cfg.seed) if cfg.weighted_sampler else None
    opts = FitOptions.from_config(cfg, progress=progress)
    device = distributed.resolve_device(cfg.device, info)
    cached_features = cfg.freeze == "backbone"
    augment = cfg.augment and not cached_features
    if augment:
        sets["train"].transform = images.make_transform(model.input_spec, train=True, augment=True)

    fingerprint = data.data_fingerprint(table)
    held_out = table.loc[data.held_out(table, cfg.hold_out), "image_id"].tolist()  # scored apart from own test
    prov = metrics.provenance(describe_device(device, info))
    if info.is_main:
        total, trainable = models.count_parameters(model)
        metrics.save_metrics({
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "data": {"fingerprint": fingerprint, "record": loaded.record, "summary": data.summarize(table, report),
                     "unreadable": {s: [f"{p}: {why}" for p, why in ds.skipped] for s, ds in sets.items()},
                     "train_class_counts": dict(zip(classes, counts.tolist())),
                     "held_out_images": held_out},
            "model": {"weights_source": load_report.source, "init_quality": init_quality(cfg.weights),
                      "loaded_tensors": len(load_report.loaded),
                      "reinitialised": load_report.reinitialised[:20], "notes": load_report.notes,
                      "input_spec": model.input_spec, "parameters": total, "trainable_parameters": trainable},
            "training": {"augment": augment, "cached_backbone_features": cached_features,
                         "target_sensitivity": TARGET_SENSITIVITY, "world_size": info.world_size,
                         **dataclasses.asdict(opts), "amp_dtype": str(amp_dtype(opts.amp, device))},
        }, run_dir / PARAMS, prov)

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

    # Scored in fp32 whatever the training precision: the recorded predictions are then the computation that
    # `evaluate` repeats on model.pt (bf16 autocast on a CPU with AVX512-BF16 moved p_covid by 2e-4).
    scored = {s: predict_dataset(trained, sets[s], batch_size=opts.eval_batch_size, device=device, amp="off")[0]
              for s in ("val", "test")}
    if info.is_main:
        _save_results(cfg, run_dir, sets, scored, result, fingerprint, prov, held_out)
    distributed.barrier()  # model.pt holds the validation threshold now
    for name, where in external_sets(cfg.external).items():  # scored now: a bundle without weights keeps them
        evaluate(run_dir / BEST, {"external": where}, run_dir / "external" / name, device=str(device), progress=False)


def _save_results(cfg: RunConfig, run_dir: Path, sets: dict[str, Dataset], scored: dict[str, np.ndarray],
                  result: FitResult, fingerprint: str, prov: dict[str, Any], held_out: list[str]) -> None:
    """predictions.csv, metrics.json and the threshold in model.pt, from the val and test scores (rank 0); the
    held-out images' scores go to metrics.json's `held_out`, never into its own-test numbers."""
    classes = list(cfg.classes)
    labels = {s: ds.labels for s, ds in sets.items()}
    pred = {s: metrics.predictions_table(sets[s].table, scored[s], classes, labels[s]) for s in ("val", "test")}
    unbounded, why = _choose_threshold(pred["val"])
    chosen = metrics.bounded_threshold(unbounded) if unbounded is not None else {"threshold": None}
    threshold = chosen["threshold"]
    results = metrics.compute_metrics(pred["test"], classes, seed=cfg.seed, threshold=threshold, held_out=held_out)
    write_csv(pred["test"], run_dir / PREDICTIONS)
    extra = {
        "threshold_selection": {"target_sensitivity": TARGET_SENSITIVITY, **chosen, "chosen_on": "val", "note": why},
        "majority_baseline": metrics.majority_baseline(labels["train"], labels["test"], classes),
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early, "train_seconds": float(result.history["seconds"].sum()),
        "params": cfg.to_dict(), "seed": cfg.seed, "data_fingerprint": fingerprint,
    }
    metrics.save_metrics(results, run_dir / METRICS, {**extra, **prov})
    checkpoint = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)
    checkpoint["threshold"] = threshold  # evaluate() applies the same operating point to other data
    save_torch(checkpoint, run_dir / BEST)
    (run_dir / LAST).unlink(missing_ok=True)  # the run is complete: no more resuming


def init_quality(weights: str) -> dict[str, Any] | None:
    """How good a pretrained init is by its own measure, kept beside the fine-tuned results: a cxrlib
    pretraining folder's validation and test mean AUROC (and whether its data were synthetic), else the source."""
    spec = Weights.parse(weights)
    if spec.scheme == "none":
        return None
    if spec.scheme == "imagenet":
        return {"source": "torchvision ImageNet-1k weights"}
    pretraining = open_run(spec.path.parent) if spec.scheme == "file" else None
    m = pretraining.metrics(missing_ok=True) if pretraining else {}
    if m:
        folder, pre = pretraining.dir, pretraining.record
        return {"source": f"cxrlib ChestX-ray14 pretraining ({folder})",
                "synthetic_chestxray14": pre.get("data", {}).get("synthetic"),
                "val_mean_auroc": m.get("val", {}).get("mean"), "test_mean_auroc": m.get("mean_auroc")}
    return {"source": weights, "quality": "not measured here (published or user-supplied weights)"}


def _choose_threshold(pred_val: pd.DataFrame) -> tuple[float | None, str]:
    """The validation threshold on p_covid for TARGET_SENSITIVITY (before metrics.bounded_threshold), or None with
    the reason."""
    if "p_covid" not in pred_val.columns:
        return None, "no covid class in this task"
    if not (pred_val["true"] == "covid").any():
        return None, "no covid image in the validation split"
    return metrics.threshold_for_sensitivity(pred_val, TARGET_SENSITIVITY), (
        f"highest threshold on p_covid with validation sensitivity >= {TARGET_SENSITIVITY}, raised to "
        f"{metrics.MIN_THRESHOLD} where lower")
