"""ChestX-ray14 (NIH): the reader, and the pretraining stage that makes "ResNet50 pretrained by CheXNet".

Wang et al. (2017) released 112,120 frontal radiographs of 30,805 patients, each with 14 findings
text-mined from its report. CheXNet (Rajpurkar et al. 2017) trained a DenseNet121 on them and reported
a mean AUROC of 0.841 over the 14 findings; reproduce-chexnet (Zech 2018) 0.7617 for pneumonia. Their
test splits are not the official test list used here, so the comparison is rough. The paper this book
replicates fine-tunes a ResNet50 "pretrained by CheXNet". `pretrain()` trains that backbone (ResNet50,
or CheXNet's DenseNet121) with 14 sigmoid outputs and writes a run folder whose model.pt loads for
fine-tuning with `weights="file:<folder>/model.pt"`: every backbone tensor is loaded, the 14-output
head is replaced by the 2- or 3-class one.

Training reuses train.fit (checkpoints, resume, DistributedDataParallel under torchrun, AMP,
channels_last) and the image cache (each PNG is decoded once per image size, whatever the number of
runs and processes).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch import nn

from . import data, distributed, images, metrics, models, synthetic
from .infer import amp_dtype, describe_device, predict_dataset
from .loop import FitOptions, fit, main_first, seed_everything
from .rundir import BEST, LAST, run_folder
from .config import check_choice
from .errors import CXRError

# The 14 findings in the official order (NIH's README, CheXNet's table, torchvision-style heads).
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
SOURCE = "chestxray14"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the newer one wins when both are there
LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}  # published_split -> official list file
IMAGE_GLOBS = ("images*/images/*.png", "images/*.png")  # Kaggle's images_001..012/images/, or one folder
COLUMNS = ["path", "image_id", "patient_id", "source", "published_split", "view", "sex", "age",
           "follow_up", "finding_labels", *FINDINGS]  # fmt: skip
MAX_AGE = 120  # the 2017 CSV has a few impossible ages (up to 414): read as unknown
DOWNLOAD = ("https://nihcc.app.box.com/v/ChestXray-NIHCC (or Kaggle's nih-chest-xrays/data): "
            "Data_Entry_2017*.csv, train_val_list.txt, test_list.txt and the images_0xx archives")  # fmt: skip
# Published results the book compares with (test-set mean AUROC over the 14 findings; pneumonia AUROC).
REFERENCES = {
    "chexnet_mean_auroc": 0.841,  # Rajpurkar et al. 2017, DenseNet121
    "reproduce_chexnet_pneumonia_auroc": 0.7617,  # Zech 2018 (github.com/jrzech/reproduce-chexnet), DenseNet121
}
SPLITS = ("train", "val", "test")
OUTPUTS = (BEST, LAST, "history.csv", "metrics.json")  # what a fresh run clears


# --- the reader ----------------------------------------------------------------------------------


def read_chestxray14(root: str | Path) -> tuple[pd.DataFrame, data.ReadReport]:
    """The NIH download as a table: one row per image that has metadata, an image and an official list.

    Columns: `COLUMNS` (path, image_id "chestxray14/<file>", patient_id "nih:<Patient ID>", source,
    published_split "train" (train_val_list.txt), "test" (test_list.txt) or "" when the folder has no
    official lists (noted in `report.notes`), view, sex, age, follow_up,
    finding_labels as written, then one 0/1 column per finding in FINDINGS order; "No Finding" is all 0).
    Rows that cannot be used are reported, never dropped silently: no image file -> `report.missing`;
    an unknown finding label, an image in neither or both list files, a repeated image name ->
    `report.skipped` with the reason.
    """
    root = Path(root)
    found = [root / name for name in CSV_NAMES if (root / name).is_file()]
    if not found:
        raise CXRError(f"{root}: no {' or '.join(CSV_NAMES)}; download ChestX-ray14 from {DOWNLOAD}")
    csv_path, report = found[0], data.ReadReport()
    if len(found) > 1:
        report.notes.append(f"read {csv_path.name}; {found[1].name} is also there and was not used")
    meta = data._read_csv(csv_path, ["Image Index", "Finding Labels", "Patient ID"], hint=DOWNLOAD)
    sex_column = next((c for c in ("Patient Gender", "Patient Sex") if c in meta.columns), None)

    listed = _official_lists(root, csv_path, report)
    files: dict[str, Path] = {}
    for pattern in IMAGE_GLOBS:
        for path in sorted(root.glob(pattern)):
            if path.name in files:
                report.notes.append(f"{path.name} is in two image folders; using {files[path.name]}")
            else:
                files[path.name] = path

    rows, seen, bad_ages = [], set(), 0
    for line, rec in enumerate(meta.to_dict("records"), start=2):  # line 1 is the header
        name, labels = rec["Image Index"], [t.strip() for t in rec["Finding Labels"].split("|")]
        unknown = [t for t in labels if t not in FINDINGS and t != NO_FINDING]
        why = ""
        if not name or not rec["Patient ID"]:
            why = f"{csv_path.name} line {line}: empty Image Index or Patient ID"
        elif name in seen:
            why = f"{name}: a second metadata row (line {line}); the first was kept"
        elif unknown or (NO_FINDING in labels and len(labels) > 1):
            why = (f"{name}: unknown finding label(s) {unknown} in 'Finding Labels' (line {line}); expected "
                   f"'{NO_FINDING}' or names from {', '.join(FINDINGS)}" if unknown else
                   f"{name}: '{NO_FINDING}' together with findings ({rec['Finding Labels']}, line {line})")  # fmt: skip
        elif listed and (name in listed["train"]) == (name in listed["test"]):
            where = "both" if name in listed["train"] else "neither"
            why = f"{name}: listed in {where} of {LISTS['train']} and {LISTS['test']}"
        if why:
            report.skipped.append(why)
            continue
        seen.add(name)
        if name not in files:
            report.missing.append(name)
            continue
        age = _age(rec.get("Patient Age", ""))
        bad_ages += age > MAX_AGE
        pid = rec["Patient ID"]
        rows.append({
            "path": str(files[name].resolve()), "image_id": f"{SOURCE}/{name}",
            "patient_id": f"nih:{int(pid)}" if pid.isdigit() else f"nih:{pid}", "source": SOURCE,
            "published_split": "" if not listed else "train" if name in listed["train"] else "test",
            "view": rec.get("View Position", ""), "sex": rec.get(sex_column, "") if sex_column else "",
            "age": age if age <= MAX_AGE else np.nan, "follow_up": rec.get("Follow-up #", ""),
            "finding_labels": rec["Finding Labels"], **{f: int(f in labels) for f in FINDINGS},
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["age"] = table["age"].astype(float)
    if bad_ages:
        report.notes.append(f"{bad_ages} row(s) with an age above {MAX_AGE} (a known error of the 2017 CSV): "
                            "age unknown")
    if report.missing:
        report.notes.append(f"{len(report.missing)} metadata row(s) have no image file under {root} "
                            f"({', '.join(IMAGE_GLOBS)}): an archive not downloaded or not extracted?")  # fmt: skip
    unused = len(set(files) - set(meta["Image Index"]))
    if unused:
        report.notes.append(f"{unused} PNG file(s) in the image folders have no metadata row: not used")
    if table.empty:
        raise CXRError(f"{root}: no usable image ({len(report.missing)} without a file, {len(report.skipped)} skipped)")
    return table, report


def _official_lists(root: Path, csv_path: Path, report: data.ReadReport) -> dict[str, set[str]]:
    """The official train/test lists, or {} (noted) when neither file is there: subsets such as the
    910-image NIH sample ship without them. One list without the other is an incomplete download."""
    paths = {split: root / name for split, name in LISTS.items()}
    present = [p for p in paths.values() if p.is_file()]
    if not present:
        report.notes.append(f"{root}: no official split lists ({', '.join(LISTS.values())}); published_split "
                            "is empty and any split is a seeded patient-disjoint one")  # fmt: skip
        return {}
    if len(present) < len(paths):
        lost = next(p for p in paths.values() if not p.is_file())
        raise CXRError(f"{lost} not found: the official split ships as two lists; put {lost.name} next to "
                       f"{csv_path.name} (from {DOWNLOAD}) or remove both lists")  # fmt: skip
    return {split: set(path.read_text().split()) for split, path in paths.items()}


def _age(text: str) -> float:
    """'58', or '058Y' as in NIH's first release -> 58.0; '' -> NaN."""
    match = re.match(r"\s*(\d+)", str(text))
    return float(match.group(1)) if match else float("nan")


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
    for split in SPLITS:
        if not (out["split"] == split).any():
            raise CXRError(f"ChestX-ray14: the {split} split is empty; check {LISTS['train']}, {LISTS['test']}")
    data.check_no_leakage(out.assign(image_hash=out["image_id"]))
    return out


def finding_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Positive images per finding and split (split -> finding -> n), plus n_images and n_patients."""
    t = table if "split" in table.columns else table.assign(split="all")
    return {s: {"n_images": len(g), "n_patients": int(g["patient_id"].nunique()),
                **{f: int(g[f].sum()) for f in FINDINGS}} for s, g in t.groupby("split", sort=False)}  # fmt: skip


# --- pretraining ---------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """Every parameter of a pretraining run (the `pretrain` command's flags). batch_size is per process."""

    chestxray14: str = ""  # the NIH folder; empty -> a synthetic ChestX-ray14 (synthetic.ensure_chestxray14)
    backbone: str = "resnet50"  # resnet50 | densenet121 (CheXNet's)
    weights: str = "imagenet"  # none | imagenet | ... (models.build_model)
    image_size: int = 224
    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    patience: int = 3  # epochs without a better validation mean AUROC; 0 disables early stopping
    class_weighted: bool = False  # BCE pos_weight = negatives / positives per finding (CheXNet's weighting)
    augment: bool = True
    val_frac: float = 0.1  # of the train_val_list.txt patients
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # GPU: bf16 (fp16 + GradScaler where bf16 is missing); CPU: fp32
    num_workers: int = -1  # -1: 0 on CPU, else min(8, CPU cores per local process)

    def __post_init__(self) -> None:
        check_choice("backbone", self.backbone)
        for name in ("image_size", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CXRError(f"parameter {name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_out_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / "pretrain" / f"chestxray14-{cfg.backbone}-{cfg.weights.split(':')[0]}-s{cfg.seed}"


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             progress: bool | None = None) -> Path:
    """Train a 14-finding model on ChestX-ray14 and write its run folder; a complete folder is returned untouched.

    The folder follows the fine-tuning run's conventions: params.json, model.pt (best validation mean
    AUROC; a cxrlib checkpoint for weights="file:..."), checkpoint-last.pt while training, history.csv,
    metrics.json (per-finding and mean AUROC on val and on the official test list) and status
    (running | complete | failed: <reason>). `resume=True` continues an interrupted run. Every rank of a
    `torchrun` launch calls this; rank 0 alone writes.
    """
    out_dir = Path(out_dir or default_out_dir(cfg))
    return run_folder(cfg, out_dir, lambda info: _pretrain(cfg, out_dir, resume, progress, info),
                      resume=resume, outputs=OUTPUTS)


def finding_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """fit's validation scores: mean AUROC (monitored) and one AUROC per finding (NaN without both classes)."""
    result = metrics.multilabel_auroc(targets, probs, FINDINGS)
    per = {f"auroc_{f}": np.nan if v is None else float(v) for f, v in result["per_finding"].items()}
    return {"mean_auroc": np.nan if result["mean"] is None else float(result["mean"]), **per}


def bce_loss(train_targets: np.ndarray, class_weighted: bool) -> nn.BCEWithLogitsLoss:
    """BCE on 14 logits; class-weighted: pos_weight = negatives / positives per finding (1 where no positive).

    CheXNet weighted positives by |N|/(|P|+|N|) and negatives by |P|/(|P|+|N|); pos_weight = |N|/|P| gives
    the same ratio (the per-finding scale differs, which Adam largely absorbs).
    """
    if not class_weighted:
        return nn.BCEWithLogitsLoss()
    pos = train_targets.sum(axis=0)
    neg = len(train_targets) - pos
    weight = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(weight, dtype=torch.float32))


def _workers(cfg: PretrainConfig, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, (os.cpu_count() or 1) // local - 1))


def _pretrain(cfg: PretrainConfig, out_dir: Path, resume: bool, progress: bool | None,
              info: distributed.DistInfo) -> None:
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
                for s in SPLITS}  # fmt: skip
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
        }, out_dir / "params.json", prov)  # fmt: skip

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
    }, out_dir / "metrics.json", {
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
