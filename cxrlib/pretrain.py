"""ChestX-ray14 pretraining: the stage that makes "ResNet50 pretrained by CheXNet".

Wang et al. (2017) released 112,120 frontal radiographs of 30,805 patients, each with 14 findings
text-mined from its report. CheXNet (Rajpurkar et al. 2017) trained a DenseNet121 on them and reported
a mean AUROC of 0.841 over the 14 findings; reproduce-chexnet (Zech 2018) 0.7617 for pneumonia. Their
test splits are not the official test list used here, so the comparison is rough. The paper this book
replicates fine-tunes a ResNet50 "pretrained by CheXNet". `pretrain()` trains that backbone (ResNet50,
or CheXNet's DenseNet121) with 14 sigmoid outputs and writes a run folder whose model.pt loads for
fine-tuning with `weights="file:<folder>/model.pt"`: every backbone tensor is loaded, the 14-output
head is replaced by the 2- or 3-class one.

The images come from chestxray14.read_chestxray14 (the data layer); training reuses loop.fit (checkpoints,
resume, DistributedDataParallel under torchrun, AMP, channels_last) and the image cache (each PNG is
decoded once per image size, whatever the number of runs and processes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit

from . import data, distributed, images, metrics, models, synthetic
from .chestxray14 import FINDINGS, LISTS, read_chestxray14
from .config import PretrainConfig
from .errors import CXRError
from .evaluate import dropped_line
from .infer import amp_dtype, describe_device, predict_dataset
from .losses import bce_loss
from .loop import FitOptions, fit, main_first, seed_everything
from .rundir import BEST, LAST, METRICS, PARAMS, claimed, reuse, running

REFERENCES = {
    "chexnet_mean_auroc": 0.841,  # Rajpurkar et al. 2017, DenseNet121
    "reproduce_chexnet_pneumonia_auroc": 0.7617,  # Zech 2018 (github.com/jrzech/reproduce-chexnet), DenseNet121
}
OUTPUTS = (BEST, LAST, "history.csv", METRICS)  # what a fresh run clears


def split_chestxray14(table: pd.DataFrame, seed: int = 0, val_frac: float = 0.1) -> pd.DataFrame:
    """Add `split`: test = the official test list; val = a seeded `val_frac` of the other patients; train = the rest.

    Without official lists (published_split all ""), test is first carved out as a seeded quarter of the
    patients (about the official lists' share), recorded in `attrs["notes"]`.

    The official lists are patient-disjoint, and so is val from train; data.check_no_leakage checks it
    (by patient: NIH file names are unique, and hashing 45 GB of PNGs again would cost minutes).
    """
    if not 0 < val_frac < 1:
        raise CXRError(f"val_frac={val_frac}: must be in (0, 1)")
    out = table.reset_index(drop=True).copy()
    out["split"] = "test"
    out.attrs["notes"] = []
    if (out["published_split"] == "").all():
        everyone = np.arange(len(out))
        keep, _ = next(GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=seed)
                       .split(everyone, groups=out["patient_id"]))  # fmt: skip
        out.loc[keep, "published_split"] = "train"
        out.attrs["notes"].append("no official split lists: test = a seeded 25% of the patients")
    pool = np.flatnonzero(out["published_split"] == "train")
    if out.loc[pool, "patient_id"].nunique() < 2:
        raise CXRError("ChestX-ray14: fewer than 2 patients in train_val_list.txt; cannot carve out a validation set")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_frac, random_state=seed)
    train_idx, val_idx = next(splitter.split(pool, groups=out.loc[pool, "patient_id"]))
    out.loc[pool[train_idx], "split"] = "train"
    out.loc[pool[val_idx], "split"] = "val"
    for split in data.SPLITS:
        if not (out["split"] == split).any():
            raise CXRError(f"ChestX-ray14: the {split} split is empty; check {LISTS['train']}, {LISTS['test']}")
    data.check_no_leakage(out.assign(image_hash=out["image_id"]))
    return out


def finding_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Positive images per finding and split (split -> finding -> n), plus n_images and n_patients."""
    t = table if "split" in table.columns else table.assign(split="all")
    return {s: {"n_images": len(g), "n_patients": int(g["patient_id"].nunique()),
                **{f: int(g[f].sum()) for f in FINDINGS}} for s, g in t.groupby("split", sort=False)}  # fmt: skip


def default_out_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / "pretrain" / f"chestxray14-{cfg.backbone}-{cfg.weights.split(':')[0]}-s{cfg.seed}"


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             progress: bool | None = None, strict: bool = False) -> Path:
    """Train a 14-finding model on ChestX-ray14 and write its run folder; a complete folder is returned untouched.

    The folder follows the fine-tuning run's conventions: params.json, model.pt (best validation mean
    AUROC; a cxrlib checkpoint for weights="file:..."), checkpoint-last.pt while training, history.csv,
    metrics.json (per-finding and mean AUROC on val and on the official test list) and status
    (running | complete | failed: <reason>). `resume=True` continues an interrupted run. The folder is this
    process's while it trains, as a fine-tuning run's is (rundir.claimed). Images listed but missing or unreadable
    are printed (unless `progress` is False) and recorded; `strict` makes them an error. Every rank of a
    `torchrun` launch calls this; rank 0 alone writes.
    """
    out_dir = Path(out_dir or default_out_dir(cfg))
    if reuse(cfg, out_dir):
        return out_dir
    with claimed(cfg, out_dir, resume):
        if reuse(cfg, out_dir):  # completed by another process since the check above
            return out_dir
        with running(out_dir, cfg.device, resume=resume, outputs=OUTPUTS) as info:
            _pretrain(cfg, out_dir, resume, progress, info, strict)
    return out_dir


def finding_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """fit's validation scores: mean AUROC (monitored) and one AUROC per finding (NaN without both classes)."""
    result = metrics.multilabel_auroc(targets, probs, FINDINGS)
    per = {f"auroc_{f}": np.nan if v is None else float(v) for f, v in result["per_finding"].items()}
    return {"mean_auroc": np.nan if result["mean"] is None else float(result["mean"]), **per}


def _workers(cfg: PretrainConfig, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, (os.cpu_count() or 1) // local - 1))


def _pretrain(cfg: PretrainConfig, out_dir: Path, resume: bool, progress: bool | None,
              info: distributed.DistInfo, strict: bool) -> None:
    with main_first(info):  # rank 0 makes the synthetic set and fills the cache; the others then read it
        seed_everything(cfg.seed)
        if cfg.chestxray14 and not Path(cfg.chestxray14).is_dir():
            raise CXRError(f"chestxray14={cfg.chestxray14!r} is not a folder; leave it empty for the synthetic set")
        root = cfg.chestxray14 or str(synthetic.ensure_chestxray14())
        table, report = read_chestxray14(root)
        table = split_chestxray14(table, seed=cfg.seed, val_frac=cfg.val_frac)
        model, load_report = models.build_model(cfg.backbone, cfg.weights, len(FINDINGS))
        cache = images.ImageCache(cfg.image_size)
        eval_tf = images.make_transform(model.input_spec, train=False)
        sets = {s: images.CXRDataset(table[table["split"] == s], "", cache, eval_tf, targets=FINDINGS)
                for s in data.SPLITS}  # fmt: skip
    dropped = dropped_line(report, [item for ds in sets.values() for item in ds.skipped], strict)
    if dropped and info.is_main and progress is not False:
        print(dropped, flush=True)
    if cfg.augment:
        sets["train"].transform = images.make_transform(model.input_spec, train=True, augment=True)
    loss_fn = bce_loss(sets["train"].labels, cfg.class_weighted)
    device = distributed.resolve_device(cfg.device, info)
    opts = FitOptions(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, patience=cfg.patience,
                      monitor="mean_auroc", seed=cfg.seed, device=cfg.device, amp=cfg.amp,
                      channels_last=True, num_workers=_workers(cfg, device), progress=progress)  # fmt: skip
    prov = metrics.provenance(describe_device(device, info))
    used = pd.concat([ds.table for ds in sets.values()], ignore_index=True)
    if info.is_main:
        total, trainable = models.count_parameters(model)
        metrics.save_metrics({
            "config": cfg.to_dict(), "run_dir": str(out_dir),
            "data": {"root": str(Path(root).resolve()), "synthetic": not cfg.chestxray14,
                     "fingerprint": _fingerprint(used), "findings": finding_counts(used),
                     "missing": len(report.missing), "missing_files": report.missing[:100],
                     "skipped": report.skipped, "notes": report.notes,
                     "unreadable": {s: [f"{p}: {why}" for p, why in ds.skipped] for s, ds in sets.items()}},
            "model": {"weights_source": load_report.source, "loaded_tensors": len(load_report.loaded),
                      "reinitialised": load_report.reinitialised[:20], "notes": load_report.notes,
                      "input_spec": model.input_spec, "parameters": total, "trainable_parameters": trainable},
            "training": {"loss": "bce", "pos_weight": _tolist(loss_fn.pos_weight), "world_size": info.world_size,
                         "global_batch_size": cfg.batch_size * info.world_size, **dataclasses.asdict(opts),
                         "amp_dtype": str(amp_dtype(opts.amp, device))},
        }, out_dir / PARAMS, prov)  # fmt: skip

    meta = {"backbone": cfg.backbone, "num_classes": len(FINDINGS), "classes": list(FINDINGS),
            "input_spec": model.input_spec, "task": "chestxray14", "weights": cfg.weights,
            "image_size": cfg.image_size, "config": cfg.to_dict()}  # fmt: skip
    result = fit(model, sets["train"], sets["val"], loss_fn, opts, out_dir, score_fn=finding_scores,
                 output="sigmoid", model_meta=meta, resume=resume)  # fmt: skip
    model.load_state_dict(result.best_state)
    scored = {s: predict_dataset(model, sets[s], batch_size=opts.batch_size, device=device, amp=opts.amp,
                                 output="sigmoid", num_workers=opts.num_workers)[:2]
              for s in ("val", "test")}  # fmt: skip
    if not info.is_main:
        return
    auroc = {s: metrics.multilabel_auroc(targets, probs, FINDINGS) for s, (probs, targets) in scored.items()}
    metrics.save_metrics({
        "mean_auroc": auroc["test"]["mean"], "per_finding_auroc": auroc["test"]["per_finding"],
        "n_test": auroc["test"]["n"], "val": auroc["val"],
    }, out_dir / METRICS, {
        "references": REFERENCES, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early, "train_seconds": float(result.history["seconds"].sum()),
        "params": cfg.to_dict(), "data_fingerprint": _fingerprint(used), **prov,
    })  # fmt: skip
    (out_dir / LAST).unlink(missing_ok=True)  # complete: nothing left to resume
    print(f"pretrain: test mean AUROC {_fmt(auroc['test']['mean'])} over {len(FINDINGS)} findings "
          f"(best epoch {result.best_epoch}); fine-tune with weights=file:{out_dir / BEST}")  # fmt: skip


def _fingerprint(table: pd.DataFrame) -> str:
    return data.data_fingerprint(table.assign(label=table["finding_labels"]))


def _tolist(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [round(float(v), 4) for v in t]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
