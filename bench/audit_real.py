"""The shortcut audit on real data, run by hand; prints JSON.

    .venv/bin/python bench/audit_real.py [--data DIR | --coronahack DIR --extra-covid DIR] [--run RUN_DIR]

1. Probes on every image (cxrlib.audit.source_probe): do image statistics (and file sizes) tell the
   paediatric Guangzhou images from the adult ieee8023 ones, and do border/corner statistics alone
   predict COVID?
2. With a run folder trained on this data (--run, or the newest complete one under --runs-base):
   the same probes on its test split plus one on the model's pooled features, the model's test
   metrics intact / lungs removed / lungs only (template and intensity-refined masks), and the share of
   Grad-CAM mass inside the lung template.

Images are read from --data and cached in the image cache ($CXRLIB_CACHE or ~/.cache/cxrlib); nothing
is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlib import audit, data, explain, lungfields
from cxrlib.evaluate import load_model
from cxrlib.rundir import Run, read_status
from cxrlib.images import ImageCache, make_transform

ROOT = Path(__file__).resolve().parents[1]


def newest_run(base: Path) -> Path | None:
    """The newest complete run folder (status "complete", model.pt) under `base`, if any."""
    runs = [p.parent for p in base.glob("**/model.pt") if read_status(p.parent) == "complete"]
    return max(runs, key=lambda p: (p / "model.pt").stat().st_mtime) if runs else None


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records", double_precision=4))


def mean(values: np.ndarray) -> float | None:
    """Mean over the defined values; None (JSON null) when there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def model_audit(run: Path, table: pd.DataFrame, seed: int, n_cam: int) -> dict:
    model, meta = load_model(run / "model.pt")
    pred = Run(run).predictions()
    test = table[table["image_id"].isin(pred["image_id"])].reset_index(drop=True)
    cache = ImageCache(meta["image_size"])
    images, _ = cache.load(test["path"].tolist())
    t0 = time.time()
    features = audit.backbone_features(model, images)
    probes = audit.source_probe(test, images, features=features, sizes=audit.original_sizes(test["path"]), seed=seed)
    masked = audit.evaluate_masked(model, test, cache, task=meta["task"])
    refined = audit.evaluate_masked(model, test, cache, modes=("lungs_removed", "lungs_only"), task=meta["task"],
                                    refine=True)
    refined["f1_retained"] = refined["macro_f1"] / masked.loc["intact", "macro_f1"]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(test), size=min(n_cam, len(test)), replace=False))
    transform = make_transform(meta["input_spec"], train=False)
    cams = explain.grad_cam(model, torch.stack([transform(img) for img in images[pick]]))
    masks = lungfields.lung_masks(images[pick])
    share = explain.cam_lung_share(cams, masks)
    labels = test["label"].to_numpy()[pick]
    return {
        "run": str(run), "task": meta["task"], "image_size": meta["image_size"],
        "training_params": {k: meta.get("config", {}).get(k)
                            for k in ("backbone", "weights", "epochs", "loss", "freeze", "lr")},
        "n_test": len(test), "test_metrics_from_run": {k: Run(run).metrics().get(k)
                                                       for k in ("accuracy", "macro_f1", "covid_sensitivity")},
        "probes_test_split": records(probes),
        "masked_template": records(masked.reset_index()),
        "masked_refined": records(refined.reset_index()),
        "gradcam_lung_share": {
            "n_images": len(pick), "template_area_share": float(masks[0].mean()),
            "n_all_zero_cams": int(np.isnan(share).sum()),
            "mean": mean(share),
            "by_label": {lab: mean(share[labels == lab]) for lab in sorted(set(labels))},
        },
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CXR_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
                        help="folder holding coronahack/ and covid-chestxray-dataset/ ($CXR_SHARED_DATA, else "
                             "../shared/data)")
    parser.add_argument("--coronahack", default="", help="CoronaHack folder (empty: DATA/coronahack)")
    parser.add_argument("--extra-covid", default="", help="ieee8023 folder (empty: DATA/covid-chestxray-dataset)")
    parser.add_argument("--run", default="", help="run folder trained on this data (empty: the newest complete "
                                                  "one under --runs-base)")
    parser.add_argument("--runs-base", default="/tmp/real-runs", help="where to look for a run when --run is empty")
    parser.add_argument("--size", type=int, default=128, help="image size of the all-images probes")
    parser.add_argument("--seed", type=int, default=0, help="probe and Grad-CAM sample seed")
    parser.add_argument("--cam-images", type=int, default=200, help="test images for the Grad-CAM lung share")
    args = parser.parse_args(argv)
    root = Path(args.data)
    t0 = time.time()
    table, _ = data.load_table(args.coronahack or str(root / "coronahack"),
                               args.extra_covid or str(root / "covid-chestxray-dataset"))
    origin = audit.origin(table)
    images, skipped = ImageCache(args.size).load(table["path"].tolist())
    assert not skipped, skipped[:3]
    probes = audit.source_probe(table, images, sizes=audit.original_sizes(table["path"]), seed=args.seed)
    out = {
        "data": {"n_images": len(table), "n_patients": int(table["patient_id"].nunique()),
                 "origin_by_label": pd.crosstab(origin, table["label"]).to_dict(), "probe_image_size": args.size},
        "probes_all_images": records(probes),
        "seconds_probes": round(time.time() - t0, 1),
    }
    run = Path(args.run) if args.run else newest_run(Path(args.runs_base))
    out["model"] = model_audit(run, table, args.seed, args.cam_images) if run else "no run folder given or found"
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
