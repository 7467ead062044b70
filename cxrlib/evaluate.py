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
from .rundir import METRICS, PREDICTIONS


def load_model(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """A run's model.pt: (model in eval mode, metadata with task, classes, image_size, input_spec, ...)."""
    model, meta = models.load_checkpoint(check_checkpoint(checkpoint))
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
             progress: bool | None = None) -> dict[str, Any]:
    """Score a saved model on any data the data layer reads; writes out_dir/metrics.json and predictions.csv.

    `data_source` is a table (all its rows are scored), load_table's arguments ({"coronahack_dir",
    "extra_covid_dir", "manifest", "extra_negatives"}) or {"external": folder or CSV in any layout
    (`data.load_external`)}. rows="auto" scores every image the model did
    not see in training or validation (model.pt lists their pixel hashes): all of another hospital's
    manifest (external validation), exactly the run's test split on its own data, and only the unseen
    part of data that overlaps it. rows="all" scores everything; rows="test" re-splits with the
    run's split parameters. The validation threshold stored in model.pt is applied unchanged
    (`at_threshold`). Images the data layer could not use are not scored and never dropped silently: the
    returned dict and metrics.json list them under "skipped" (`skipped_images`).
    """
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


def skipped_line(skipped: Mapping[str, list], show: int = 3) -> str:
    """`skipped_images` in one line, the first `show` names of each kind: "" when nothing was skipped."""
    def name(item) -> str:
        return item[0] if isinstance(item, list) else str(item).partition(": ")[0]

    parts = [f"{len(items)} {kind} ({', '.join(map(name, items[:show]))}{', ...' if len(items) > show else ''})"
             for kind, items in skipped.items() if items]
    return "not scored: " + "; ".join(parts) if parts else ""


def _skip_entry(item: str) -> str:
    """An unreadable image's "path: why" with the path once, where PIL names its in-memory buffer
    ("cannot identify image file <_io.BytesIO object at 0x...>") naming the file instead."""
    path, _, why = item.partition(": ")
    return f"{path}: " + re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", path, why.removeprefix(f"{path}: "))


def predict(checkpoint: str | Path, image_paths: Sequence[str | Path], *,
            batch_size: int = INFERENCE_DEFAULTS["predict"]["batch_size"],
            device: str = "auto") -> pd.DataFrame:
    """Class probabilities per image (JPEG, PNG or DICOM), preprocessed exactly as in training.

    Returns one row per readable path: path, pred, p_<class>...; each file that cannot be read is left out and
    named in `attrs["skipped"]` ("path: why"). No readable file at all raises CXRError naming them.
    """
    if not image_paths:
        raise CXRError("predict: give at least one image path")
    model, meta = load_model(checkpoint)
    transform = images.make_transform(meta["input_spec"], train=False)
    size = meta["image_size"]
    method = meta.get("config", {}).get("preprocess", "none")
    read, pixels, skipped = [], [], []
    for path in map(str, image_paths):
        try:
            pixels.append(transform(preprocess.load_preprocessed(path, size, method)))
            read.append(path)
        except CXRError as err:
            skipped.append(_skip_entry(f"{path}: {err}"))
    if not read:
        raise CXRError(f"no image could be read: {'; '.join(skipped[:3])}" + (" ..." if len(skipped) > 3 else ""))
    batch = torch.stack(pixels)
    labels = torch.zeros(len(batch), dtype=torch.long)
    probs, _, _ = predict_dataset(model, TensorDataset(batch, labels), batch_size=batch_size,
                                  device=distributed.resolve_device(device))
    classes = list(meta["classes"])
    out = pd.DataFrame({"path": read, "pred": np.array(classes, dtype=object)[probs.argmax(axis=1)]})
    for k, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, k]
    out.attrs["skipped"] = skipped
    return out
