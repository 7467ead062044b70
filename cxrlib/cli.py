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
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
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
    from .pretrain import PretrainConfig
    from .config import PRETRAIN_PROFILES

    p = sub.add_parser(
        "pretrain", help="train a 14-finding ChestX-ray14 model (CheXNet-style) to fine-tune from with --weights file:",
        description="Same command in one process or under torchrun (e.g. torchrun --nproc_per_node 8 -m cxrlib "
                    "pretrain ...): DistributedDataParallel, rank 0 writes. --batch-size is per process. "
                    "Unset flags take --profile's value, else PretrainConfig's default.",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    p.add_argument("--profile", default="custom", choices=[*PRETRAIN_PROFILES, "custom"],
                   help="pretraining defaults under the flags given (config.PRETRAIN_PROFILES)")
    _add_dataclass_flags(p, PretrainConfig, {"chestxray14": ["--chestxray14"]})
    p.add_argument("--out", default="",
                   help="run folder (default runs/pretrain/chestxray14-<backbone>-<weights>-s<seed>)")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue an interrupted run from its checkpoint-last.pt")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain
    from .config import PRETRAIN_PROFILES, with_profile

    names = PretrainConfig.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in names or k == "profile"}
    cfg = PretrainConfig(**{k: v for k, v in with_profile(PRETRAIN_PROFILES, given).items() if k != "profile"})
    pretrain(cfg, args.out or None, resume=args.resume)
    return 0


# --- train / evaluate / predict ------------------------------------------------------------------
# `train` has one flag per RunConfig field, generated from the dataclass: CLI flags, papermill
# parameters and run-matrix entries are the same names with the same defaults and validation.
TRAIN_ALIASES = {"coronahack_dir": ["--coronahack"], "extra_covid_dir": ["--extra-covid"], "run_dir": ["--out"]}


def _field_help(cls) -> dict[str, str]:
    """The `# ...` comment after each dataclass field in its source: the flag's help, written once."""
    import inspect
    import re

    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, aliases: dict[str, list[str]]) -> None:
    """One flag per dataclass field, help from the field's comment; unset flags stay absent (SUPPRESS), so the
    profile's defaults, then the dataclass's, apply to them."""
    import dataclasses
    import typing

    types, helps = typing.get_type_hints(cls), _field_help(cls)
    for f in dataclasses.fields(cls):
        flags = [*aliases.get(f.name, []), f"--{f.name.replace('_', '-')}"]
        flags = list(dict.fromkeys(flags))
        text = f"{helps.get(f.name, '')} (default: {f.default!r})".lstrip()
        kind = types[f.name]
        if kind is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif kind in (int, float, str):
            p.add_argument(*flags, dest=f.name, type=kind, metavar=f.name.upper(), help=text)
        else:  # alpha: "0.25,0.5,0.25", parsed and checked by RunConfig
            p.add_argument(*flags, dest=f.name, metavar="A,B,...", help=text)


def add_train_parser(sub) -> None:
    from .config import RunConfig

    p = sub.add_parser(
        "train", help="fine-tune and evaluate one configuration into a run folder",
        description="Writes DIR/model.pt, metrics.json, predictions.csv, history.csv, params.json and status. "
                    "No data option: the synthetic default. A complete run folder is never retrained. "
                    "Unset flags take --profile's value (config.PROFILES), else RunConfig's default. "
                    "The same command runs under torchrun (DistributedDataParallel; --batch-size per process).",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    _add_dataclass_flags(p, RunConfig, TRAIN_ALIASES)
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue an interrupted run from its checkpoint-last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal or in a notebook)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from .config import RunConfig
    from .rundir import read_status
    from .train import default_run_dir, run

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}
    cfg = RunConfig.from_parameters(values)
    target = default_run_dir(cfg)
    existed = read_status(target) == "complete"
    run_dir = run(cfg, target, resume=args.resume, progress=args.progress)
    if os.environ.get("RANK", "0") != "0":
        return 0
    m = json.loads((run_dir / "metrics.json").read_text())
    base = m["majority_baseline"]
    print(f"run folder: {run_dir}" + (" (already complete: nothing retrained)" if existed else ""))
    print(f"test: macro-F1 {_fmt(m['macro_f1'])}, accuracy {_fmt(m['accuracy'])}, ROC AUC {_fmt(m['roc_auc'])}, "
          f"COVID sensitivity {_fmt(m.get('covid_sensitivity'))} (n={m['n']}); majority-class baseline "
          f"({base['class']}): macro-F1 {_fmt(base['macro_f1'])}, accuracy {_fmt(base['accuracy'])}")
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']:.0f} s training on {m['device']}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a trained model.pt on any data set (external validation: --manifest)",
        description="Writes OUT/metrics.json and OUT/predictions.csv. Images the model trained or validated on "
                    "are left out (by pixel hash), so another hospital's manifest is scored entirely (external "
                    "validation) and the training data gives back the run's own test split.",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="a run folder's model.pt")
    p.add_argument("--manifest", default="", help="CSV with path,label[,patient_id,source,view] (e.g. another hospital)")
    p.add_argument("--coronahack", "--coronahack-dir", dest="coronahack_dir", default="", help="CoronaHack folder")
    p.add_argument("--extra-covid", "--extra-covid-dir", dest="extra_covid_dir", default="", help="ieee8023 folder")
    p.add_argument("--rows", default="auto", choices=["auto", "all", "test"],
                   help="auto: every image the model did not train or validate on (default); all; "
                        "test: re-split as in training and score its test split")
    p.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    if not (args.manifest or args.coronahack_dir or args.extra_covid_dir):
        raise CXRError("evaluate: give --manifest CSV or --coronahack DIR [--extra-covid DIR]")
    source = {"manifest": args.manifest, "coronahack_dir": args.coronahack_dir, "extra_covid_dir": args.extra_covid_dir}
    m = evaluate(args.checkpoint, source, args.out, rows=args.rows, batch_size=args.batch_size,
                 device=args.device, n_boot=args.n_boot)
    print(f"{args.out}: n={m['n']} macro-F1 {_fmt(m['macro_f1'])}, accuracy {_fmt(m['accuracy'])}, "
          f"ROC AUC {_fmt(m['roc_auc'])}, COVID sensitivity {_fmt(m.get('covid_sensitivity'))}")
    return 0


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="class probabilities of images (JPEG, PNG, DICOM) with a trained model.pt")
    p.add_argument("--checkpoint", required=True, help="a run folder's model.pt")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from .evaluate import predict

    table = predict(args.checkpoint, args.images, batch_size=args.batch_size, device=args.device)
    print(table.to_json(orient="records", indent=2) if args.json else table.to_string(index=False, float_format="%.4f"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CXRError as err:
        print(f"cxrlib {args.command}: error: {err}", file=sys.stderr)
        return 2
