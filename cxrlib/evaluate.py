"""Evaluation and prediction with a saved model: a run folder's model.pt scored on any data the data layer
reads (`evaluate`, e.g. another hospital's images), or on single image files (`predict`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from . import data, distributed, images, metrics, models, preprocess
from .atomic import write_csv
from .config import INFERENCE_DEFAULTS, check_checkpoint, classes as task_classes
from .errors import CXRError
from .infer import describe_device, predict_dataset
from .rundir import METRICS, PREDICTIONS, check_evaluation_folder, read_status


def load_model(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """A run's model.pt: (model in eval mode, metadata with task, classes, image_size, input_spec, ...).

    A model that cannot score is refused, named: one of a failed run (its status beside it), one with a non-finite
    weight (a diverged run gave NaN probabilities and a class all the same), and a pretraining model (14 findings,
    no COVID-19 class)."""
    checkpoint = check_checkpoint(checkpoint)
    status = read_status(checkpoint.parent) if (checkpoint.parent / "status").is_file() else ""
    if status.startswith("failed"):
        raise CXRError(f"{checkpoint} is the model of a failed run ({checkpoint.parent / 'status'}: {status}); "
                       "it scores nothing: rerun the run")
    model, meta = models.load_checkpoint(checkpoint)
    if meta.get("task") == "chestxray14":
        raise CXRError(f"{checkpoint} is a ChestX-ray14 pretraining model (14 findings, no COVID-19 class): fine-tune "
                       f"it first (python -m cxrlib train --weights file:{checkpoint}) and use that run's model.pt")
    broken = next((name for name, t in model.state_dict().items()
                   if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken:
        raise CXRError(f"{checkpoint}: weight {broken} is not finite (NaN or inf): the run diverged and the model "
                       "scores nothing; retrain it (e.g. with a lower lr)")
    missing = [k for k in ("task", "classes", "image_size", "input_spec") if k not in meta]
    if missing:
        raise CXRError(f"{checkpoint} lacks {', '.join(missing)}: use the model.pt of a cxrlib run folder")
    if list(meta["classes"]) != list(task_classes(meta["task"])):
        raise CXRError(f"{checkpoint}: classes {meta['classes']} differ from task {meta['task']}'s "
                       f"{list(task_classes(meta['task']))}; the checkpoint is from another cxrlib version")
    return model, meta


def evaluate(checkpoint: str | Path, data_source: pd.DataFrame | Mapping[str, str], out_dir: str | Path, *,
             rows: str = "auto", batch_size: int = INFERENCE_DEFAULTS["evaluate"]["batch_size"], device: str = "auto",
             n_boot: int = INFERENCE_DEFAULTS["evaluate"]["n_boot"],
             progress: bool | None = None, strict: bool = False) -> dict[str, Any]:
    """Score a saved model on any data the data layer reads; writes out_dir/metrics.json and predictions.csv.

    `data_source` is a table (all its rows are scored), load_table's arguments ({"coronahack_dir",
    "extra_covid_dir", "manifest", "extra_negatives"}) or {"external": folder or CSV in any layout
    (`data.load_external`)}. rows="auto" scores every image the model did
    not see in training or validation (model.pt lists their pixel hashes): all of another hospital's
    manifest (external validation), exactly the run's test split on its own data, and only the unseen
    part of data that overlaps it. rows="all" scores everything; rows="test" re-splits with the
    run's split parameters. The validation threshold stored in model.pt is applied unchanged
    (`at_threshold`). Images the data layer could not use are not scored and never dropped silently: the
    returned dict and metrics.json list them under "skipped" (`skipped_images`); `strict` makes them an error.
    `out_dir` is new, empty or an earlier evaluation's, never a run folder (rundir.check_evaluation_folder).
    """
    check_evaluation_folder(out_dir)
    model, meta = load_model(checkpoint)
    cfg = meta.get("config", {})
    note, report = "", data.ReadReport()
    if isinstance(data_source, pd.DataFrame):
        table, chosen = data_source, "given"
    else:
        args = {k: str(v or "") for k, v in data_source.items()}
        table, report = (data.load_external(args["external"]) if args.get("external") else
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
    dataset = images.CXRDataset(table, meta["task"], preprocess.make_cache(meta["image_size"], cfg.get("preprocess", "none")),
                                images.make_transform(meta["input_spec"], train=False))
    dropped_line(report, dataset.skipped, strict)
    dev = distributed.resolve_device(device)
    probs, _, _ = predict_dataset(model, dataset, batch_size=batch_size, device=dev, progress=progress)
    classes = list(meta["classes"])
    pred = metrics.predictions_table(dataset.table, probs, classes, dataset.labels)
    threshold = meta.get("threshold")
    results = {**metrics.compute_metrics(pred, classes, n_boot=n_boot, seed=cfg.get("seed", 0), threshold=threshold),
               "skipped": skipped_images(report, dataset.skipped)}
    if not distributed.current().is_main:  # under torchrun every rank scored a shard; rank 0 writes
        return results
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pred, out_dir / PREDICTIONS)
    extra = {"checkpoint": str(Path(checkpoint).resolve()), "rows": chosen, "rows_note": note,
             "threshold_from_validation": threshold,
             "data_fingerprint": data.data_fingerprint(dataset.table), "training_params": cfg,
             **metrics.provenance(describe_device(dev, distributed.current()))}
    metrics.save_metrics(results, out_dir / METRICS, extra)
    return results


def skipped_images(report: data.ReadReport, unreadable: Sequence[tuple[str, str]] = ()) -> dict[str, list]:
    """What was not scored, in the categories `python -m cxrlib data` reports: rows whose image is missing,
    images that cannot be read (or rows that cannot be used) as "path: why", duplicates as [removed, kept]."""
    unusable = [*report.skipped, *(f"{p}: {why}" for p, why in unreadable)]
    return {"missing": list(report.missing), "unreadable": [_skip_entry(item) for item in unusable],
            "duplicates": [list(pair) for pair in report.duplicates]}


def skipped_line(skipped: Mapping[str, list], show: int = 3, lead: str = "not scored") -> str:
    """`skipped_images` in one line, the first `show` names of each kind: "" when nothing was skipped."""
    def name(item) -> str:
        return item[0] if isinstance(item, list) else str(item).partition(": ")[0]

    parts = [f"{len(items)} {kind} ({', '.join(map(name, items[:show]))}{', ...' if len(items) > show else ''})"
             for kind, items in skipped.items() if items]
    return f"{lead}: " + "; ".join(parts) if parts else ""


def dropped_line(report: data.ReadReport, unreadable: Sequence[tuple[str, str]] = (), strict: bool = False) -> str:
    """The rows and images the data could not give (missing, unreadable or unusable; duplicates are merged, not
    lost) in one line, "" when none; with `strict` they are a CXRError instead."""
    lost = {kind: items for kind, items in skipped_images(report, unreadable).items() if kind != "duplicates"}
    line = skipped_line(lost, lead="not used")
    if line and strict:
        raise CXRError(f"{line}; --strict: every listed image must be usable (fix those rows or leave out --strict)")
    return line


def _skip_entry(item: str) -> str:
    """An unreadable image's "path: why" with the path once, where PIL names its in-memory buffer
    ("cannot identify image file <_io.BytesIO object at 0x...>") naming the file instead."""
    path, _, why = item.partition(": ")
    return f"{path}: " + re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", path, why.removeprefix(f"{path}: "))


def predict(checkpoint: str | Path, image_paths: Sequence[str | Path], *,
            batch_size: int = INFERENCE_DEFAULTS["predict"]["batch_size"],
            device: str = "auto") -> pd.DataFrame:
    """Class probabilities per image (JPEG, PNG or DICOM), preprocessed exactly as in training.

    Returns one row per readable path: path, pred, p_<class>..., flag; each file that cannot be read is left out and
    named in `attrs["skipped"]` ("path: why"). No readable file at all raises CXRError naming them. `flag` says
    why an image is far from any chest X-ray, as far as cheap checks tell (`unlike_xray`); "" for the others.
    """
    if not image_paths:
        raise CXRError("predict: give at least one image path")
    model, meta = load_model(checkpoint)
    transform = images.make_transform(meta["input_spec"], train=False)
    size = meta["image_size"]
    method = meta.get("config", {}).get("preprocess", "none")
    read, pixels, flags, skipped = [], [], [], []
    for path in map(str, image_paths):
        try:
            img = images.decode_image(path)
            pixels.append(transform(preprocess.preprocess_image(img, size, method)))
        except CXRError as err:
            skipped.append(_skip_entry(f"{path}: {err}"))
            continue
        read.append(path)
        flags.append(unlike_xray(img, size))
    if not read:
        raise CXRError(f"no image could be read: {'; '.join(skipped[:3])}" + (" ..." if len(skipped) > 3 else ""))
    batch = torch.stack(pixels)
    labels = torch.zeros(len(batch), dtype=torch.long)
    probs, _, _ = predict_dataset(model, TensorDataset(batch, labels), batch_size=batch_size,
                                  device=distributed.resolve_device(device))
    if not np.isfinite(probs).all():
        first = read[int(np.flatnonzero(~np.isfinite(probs).all(axis=1))[0])]
        raise CXRError(f"{checkpoint} gives non-finite probabilities (e.g. for {first}): the model scores nothing; "
                       "retrain it")
    classes = list(meta["classes"])
    out = pd.DataFrame({"path": read, "pred": np.array(classes, dtype=object)[probs.argmax(axis=1)]})
    for k, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, k]
    out["flag"] = flags
    out.attrs["skipped"] = skipped
    return out


def unlike_xray(img: np.ndarray, size: int) -> str:
    """Why a decoded image is far from any radiograph a model trained on, by checks that cost next to nothing; ""
    when none fires: tiny (upscaled more than twice to the model's size), constant, or noise-like (neighbouring
    pixels of a radiograph correlate above 0.9; independent noise near 0)."""
    height, width = img.shape
    if min(height, width) < size / 2:
        return f"tiny ({width}x{height} px; the model reads {size}x{size})"
    if img.std() < 1:
        return "constant (one grey level)"
    step = max(1, max(height, width) // 512)  # every step-th pixel: cheap on a 4000 px scan, and noise stays noise
    pixels = img[::step, ::step].astype(np.float64)
    neighbours = np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1]
    if neighbours < 0.5:
        return f"noise-like (neighbouring pixels correlate {neighbours:.2f}; radiographs above 0.9)"
    return ""
