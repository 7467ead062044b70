"""`python -m cxrlib data|train|evaluate|predict|pretrain`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import sys

from .errors import CXRError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each command registers its own parser block below: add_<command>_parser(sub).
    add_data_parser(sub)
    add_pretrain_parser(sub)
    return parser


# --- data ----------------------------------------------------------------------------------------
def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="read, merge, dedup and split the data; print its summary")
    p.add_argument("--coronahack", default="", help="Kaggle CoronaHack folder (empty: synthetic default)")
    p.add_argument("--extra-covid", default="", help="ieee8023 covid-chestxray-dataset folder")
    p.add_argument("--manifest", default="", help="CSV with path,label[,patient_id,split,source,view]")
    p.add_argument("--task", default="multiclass", help="binary | multiclass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="patient", choices=["patient", "published"])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    import json

    from .data import format_summary, load_table, split_table, summarize

    table, report = load_table(args.coronahack, args.extra_covid, args.manifest)
    summary = summarize(split_table(table, args.task, seed=args.seed, mode=args.split), report)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# --- pretrain ------------------------------------------------------------------------------------
def add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="train a 14-finding ChestX-ray14 model (CheXNet-style) to fine-tune from with --weights file:",
        description="Same command in one process or under torchrun (e.g. torchrun --nproc_per_node 8 -m cxrlib "
                    "pretrain ...): DistributedDataParallel, rank 0 writes. --batch-size is per process.",
    )  # fmt: skip
    p.add_argument("--chestxray14", default="", help="NIH ChestX-ray14 folder (empty: a synthetic one)")
    p.add_argument("--backbone", default="resnet50", help="resnet50 | densenet121")
    p.add_argument("--weights", default="imagenet", help="none | imagenet | chexnet:PATH | file:PATH")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="per process; the global batch is this x processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", default="adamw", help="adamw | sgd")
    p.add_argument("--scheduler", default="cosine", help="cosine | step | none")
    p.add_argument("--patience", type=int, default=3, help="early stopping on validation mean AUROC; 0 disables")
    p.add_argument("--class-weighted", action="store_true", help="BCE pos_weight = negatives/positives (CheXNet)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of train_val_list.txt patients for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off")
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers per process (-1: auto)")
    p.add_argument("--out", default="", help="run folder (default runs/pretrain/chestxray14-<backbone>-<weights>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint-last.pt")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .chestxray14 import PretrainConfig, pretrain

    names = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    pretrain(cfg, args.out or None, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CXRError as err:
        print(f"cxrlib {args.command}: error: {err}", file=sys.stderr)
        return 2
