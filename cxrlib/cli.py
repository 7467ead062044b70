"""`python -m cxrlib data|pretrain|train|evaluate|predict|results`: thin wrappers over the library.

Parsing and validation import only `cxrlib.config` (no torch), so a bad argument fails at once; a command imports
its data or training code only after its arguments and its config are checked. Choices come from
`config.CHOICES`, defaults from the config dataclasses and profiles: nothing here restates them.
"""

from __future__ import annotations

import argparse
import sys

from .config import (CHOICES, INFERENCE_DEFAULTS, PRETRAIN_PROFILES, PROFILE_CHOICES, PROFILES, PretrainConfig,
                     RunConfig, check_checkpoint, check_device, check_exists, check_paths, field_default)
from .clihelp import HelpFormatter, at_least, examples  # noqa: F401 (runs and transport import them from here)
from .errors import RERUN, CXRError, report

RUN_DEFAULT = "runs/<profile>/<data tag>/<run name>, under the current directory"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")  # what `predict` scores in a folder it is given
# What Ctrl-C tells to do next: train and pretrain continue from their last epoch only with --resume.
INTERRUPTED = dict.fromkeys(("train", "pretrain"), "rerun it with --resume to continue from the last finished epoch")
STRICT = "fail when any listed image is missing or unreadable (default: leave it out, printed and recorded)"


def _device(text: str) -> str:
    """--device of evaluate and predict, checked as RunConfig checks its own."""
    try:
        return check_device(text)
    except CXRError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrlib", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog=examples("python -m cxrlib train --profile quick", "python -m cxrlib train --help"))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{data,pretrain,train,evaluate,predict,results,verify}")
    add_data_parser(sub)
    add_pretrain_parser(sub)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_results_parser(sub)
    add_verify_parser(sub)
    return parser


def command_parser(sub, name: str, help: str, description: str, epilog: str, **kwargs) -> argparse.ArgumentParser:
    """One command: its help line, a description, defaults shown, examples last."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter,
                          **kwargs)


# --- data ----------------------------------------------------------------------------------------
def add_data_parser(sub) -> None:
    p = command_parser(
        sub, "data", help="read, merge, dedup and split the data; print its summary",
        description="Reads the data as training would (the synthetic default when no folder is given), "
                    "de-duplicates and splits it, checks the split for patient leakage and prints the summary.",
        epilog=examples("python -m cxrlib data", "python -m cxrlib data --coronahack data/coronahack "
                        "--extra-covid data/covid-chestxray-dataset --json"))
    p.add_argument("--coronahack", "--coronahack-dir", dest="coronahack_dir", default="",
                   help="Kaggle CoronaHack folder (empty, with no other source: the synthetic default)")
    p.add_argument("--extra-covid", "--extra-covid-dir", dest="extra_covid_dir", default="",
                   help="ieee8023 covid-chestxray-dataset folder")
    p.add_argument("--manifest", default="", help="CSV with path,label[,patient_id,split,source,view]")
    p.add_argument("--task", default=field_default(RunConfig, "task"), choices=CHOICES["task"],
                   help="binary: COVID vs not; multiclass: covid, pneumonia, normal")
    p.add_argument("--seed", type=at_least(0), default=field_default(RunConfig, "seed"), help="split seed")
    p.add_argument("--split", default=field_default(RunConfig, "split"), choices=CHOICES["split"],
                   help="patient: a seeded patient-disjoint re-split; published: CoronaHack's own train/test")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    import json

    check_paths(args)
    from .data import format_summary, load_table, split_table, summarize

    table, read = load_table(args.coronahack_dir, args.extra_covid_dir, args.manifest)
    summary = summarize(split_table(table, args.task, seed=args.seed, mode=args.split), read)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# --- flags from a config dataclass ---------------------------------------------------------------
def _field_help(cls) -> dict[str, str]:
    """The `# ...` comment after each dataclass field in its source: the flag's help, written once."""
    import inspect
    import re

    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))


def _default_text(name: str, default, profiles: dict[str, dict]) -> str:
    """"default: 10; --profile quick: 2, paper: 30": the dataclass default, then each profile's that differs."""
    set_by = [f"{p}: {values[name]!r}" for p, values in profiles.items() if name in values]
    return f"default: {default!r}" + (f"; --profile {', '.join(set_by)}" if set_by else "")


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, profiles: dict[str, dict],
                         aliases: dict[str, list[str]]) -> None:
    """One flag per dataclass field, help from the field's comment, choices from CHOICES; unset flags stay absent
    (SUPPRESS), so the profile's defaults, then the dataclass's, apply to them."""
    import dataclasses
    import typing

    types, helps = typing.get_type_hints(cls), _field_help(cls)
    for f in dataclasses.fields(cls):
        flags = list(dict.fromkeys([*aliases.get(f.name, []), f"--{f.name.replace('_', '-')}"]))
        text = f"{helps.get(f.name, '')} ({_default_text(f.name, f.default, profiles)})".lstrip()
        choices = PROFILE_CHOICES if f.name == "profile" else CHOICES.get(f.name)
        kind = types[f.name]
        if kind is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif choices:
            p.add_argument(*flags, dest=f.name, choices=choices, help=text)
        elif kind in (int, float, str):
            p.add_argument(*flags, dest=f.name, type=kind, metavar=f.name.upper(), help=text)
        else:  # alpha: "0.25,0.5,0.25", parsed and checked by RunConfig
            p.add_argument(*flags, dest=f.name, metavar="A,B,...", help=text)


def _config(cls, profiles: dict[str, dict], args: argparse.Namespace):
    """The config of the flags given over --profile's values over the dataclass's defaults (validated here,
    before any training code is imported)."""
    from .config import with_profile

    given = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ or k == "profile"}
    values = with_profile(profiles, given)
    if "profile" not in cls.__dataclass_fields__:
        values.pop("profile", None)
    return cls(**values)


# --- pretrain ------------------------------------------------------------------------------------
def add_pretrain_parser(sub) -> None:
    p = command_parser(
        sub, "pretrain", help="train a 14-finding ChestX-ray14 model (CheXNet-style) to fine-tune from with "
                              "--weights file:",
        description="Same command in one process or under torchrun (DistributedDataParallel, rank 0 writes; "
                    "--batch-size is per process). Unset flags take --profile's value "
                    "(config.PRETRAIN_PROFILES), else PretrainConfig's default.",
        epilog=examples("python -m cxrlib pretrain --profile quick     # synthetic ChestX-ray14, CPU, minutes",
                        "torchrun --nproc_per_node 8 -m cxrlib pretrain --chestxray14 data/ChestX-ray14 "
                        "--backbone densenet121"),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--profile", choices=PROFILE_CHOICES,
                   help="pretraining defaults under the flags given (config.PRETRAIN_PROFILES; default: 'custom')")
    _add_dataclass_flags(p, PretrainConfig, PRETRAIN_PROFILES, {"chestxray14": ["--chestxray14", "--chestxray14-dir"]})
    p.add_argument("--out", default="", help="run folder (default: runs/pretrain/chestxray14-<backbone>-<weights>"
                                             "-s<seed> under the current directory)")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue an interrupted run from its checkpoint-last.pt")
    p.add_argument("--strict", action="store_true", default=False, help=STRICT)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(PretrainConfig, PRETRAIN_PROFILES, args)
    check_paths(cfg)
    from .pretrain import pretrain

    pretrain(cfg, args.out or None, resume=args.resume, strict=args.strict)
    return 0


# --- train / evaluate / predict ------------------------------------------------------------------
# `train` has one flag per RunConfig field, generated from the dataclass: CLI flags, papermill
# parameters and run-matrix entries are the same names with the same defaults and validation.
TRAIN_ALIASES = {"coronahack_dir": ["--coronahack"], "extra_covid_dir": ["--extra-covid"], "run_dir": ["--out"]}


def add_train_parser(sub) -> None:
    p = command_parser(
        sub, "train", help="fine-tune and evaluate one configuration into a run folder",
        description="Writes DIR/model.pt, metrics.json, predictions.csv, history.csv, params.json and status, "
                    f"in --out DIR (default: {RUN_DEFAULT}). No data option: the synthetic default. A complete "
                    "run folder is never retrained. Unset flags take --profile's value (config.PROFILES), else "
                    "RunConfig's default. The same command runs under torchrun (DistributedDataParallel; "
                    "--batch-size per process).",
        epilog=examples("python -m cxrlib train --profile quick --loss focal        # synthetic data, CPU, minutes",
                        "python -m cxrlib train --profile paper --weights imagenet --coronahack data/coronahack "
                        "--extra-covid data/covid-chestxray-dataset --out runs/mine"),
        argument_default=argparse.SUPPRESS,
    )
    _add_dataclass_flags(p, RunConfig, PROFILES, TRAIN_ALIASES)
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue an interrupted run from its checkpoint-last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal or in a notebook)")
    p.add_argument("--strict", action="store_true", default=False, help=STRICT)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import os

    cfg = RunConfig.from_parameters(vars(args))  # a bad value or path fails here, before torch is imported
    check_paths(cfg)
    from .distributed import resolve_device
    from .rundir import Run, read_status
    from .train import default_run_dir, load_data, run

    resolve_device(cfg.device)  # a GPU that is not here fails before the data are read
    loaded = None if cfg.run_dir else load_data(cfg)  # read once: it names the folder and trains the model
    target = default_run_dir(cfg, loaded and loaded.record)
    existed = read_status(target) == "complete"
    run_dir = run(cfg, target, resume=args.resume, progress=args.progress, loaded=loaded, strict=args.strict)
    if os.environ.get("RANK", "0") != "0":
        return 0
    m = Run(run_dir).metrics()
    base = m["majority_baseline"]
    print(f"run folder: {run_dir}" + (" (already complete: nothing retrained)" if existed else ""))
    print(f"test: macro-F1 {_fmt(m['macro_f1'])}, accuracy {_fmt(m['accuracy'])}, ROC AUC {_fmt(m['roc_auc'])}, "
          f"COVID sensitivity {_fmt(m.get('covid_sensitivity'))} (n={m['n']}); majority-class baseline "
          f"({base['class']}): macro-F1 {_fmt(base['macro_f1'])}, accuracy {_fmt(base['accuracy'])}")
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']:.0f} s training on {m['device']}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_inference_flags(p: argparse.ArgumentParser, command: str) -> None:
    """--checkpoint, --batch-size and --device, shared by evaluate and predict."""
    p.add_argument("--checkpoint", required=True, help="a run folder's model.pt")
    p.add_argument("--batch-size", type=at_least(1), default=INFERENCE_DEFAULTS[command]["batch_size"],
                   help="images per forward pass")
    p.add_argument("--device", type=_device, default=field_default(RunConfig, "device"),
                   help="auto | cpu | cuda | cuda:N")


def add_evaluate_parser(sub) -> None:
    p = command_parser(
        sub, "evaluate", help="score a trained model.pt on any data set (external validation: --manifest)",
        description="Writes OUT/metrics.json and OUT/predictions.csv. Images the model trained or validated on "
                    "are left out (by pixel hash), so another hospital's manifest is scored entirely (external "
                    "validation) and the training data gives back the run's own test split.",
        epilog=examples("python -m cxrlib evaluate --checkpoint runs/mine/model.pt --manifest other_hospital.csv "
                        "--out runs/mine-external",
                        "python -m cxrlib evaluate --checkpoint runs/mine/model.pt --coronahack data/coronahack "
                        "--rows test --out runs/mine-test"))
    _add_inference_flags(p, "evaluate")
    p.add_argument("--manifest", default="", help="CSV with path,label[,patient_id,source,view] (e.g. another "
                                                  "hospital)")
    p.add_argument("--coronahack", "--coronahack-dir", dest="coronahack_dir", default="", help="CoronaHack folder")
    p.add_argument("--extra-covid", "--extra-covid-dir", dest="extra_covid_dir", default="", help="ieee8023 folder")
    p.add_argument("--rows", default=CHOICES["rows"][0], choices=CHOICES["rows"],
                   help="auto: every image the model did not train or validate on; all; "
                        "test: re-split as in training and score its test split")
    p.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    p.add_argument("--n-boot", type=at_least(0), default=INFERENCE_DEFAULTS["evaluate"]["n_boot"],
                   help="bootstrap resamples for the CIs")
    p.add_argument("--strict", action="store_true", default=False, help=STRICT)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    if not (args.manifest or args.coronahack_dir or args.extra_covid_dir):
        raise CXRError("no data to score: give --manifest CSV or --coronahack DIR [--extra-covid DIR]")
    checkpoint = check_checkpoint(args.checkpoint)
    check_paths(args)
    from .evaluate import evaluate, skipped_line

    source = {"manifest": args.manifest, "coronahack_dir": args.coronahack_dir, "extra_covid_dir": args.extra_covid_dir}
    m = evaluate(checkpoint, source, args.out, rows=args.rows, batch_size=args.batch_size,
                 device=args.device, n_boot=args.n_boot, strict=args.strict)
    print(f"{args.out}: n={m['n']} macro-F1 {_fmt(m['macro_f1'])}, accuracy {_fmt(m['accuracy'])}, "
          f"ROC AUC {_fmt(m['roc_auc'])}, COVID sensitivity {_fmt(m.get('covid_sensitivity'))}")
    if line := skipped_line(m["skipped"]):
        print(f"{line} (all listed under \"skipped\" in {args.out}/metrics.json)")
    return 0


def add_predict_parser(sub) -> None:
    p = command_parser(
        sub, "predict", help="class probabilities of images (JPEG, PNG, DICOM) with a trained model.pt",
        description="Preprocesses each image exactly as in training and prints one row per image: path, "
                    "predicted class, p_<class>..., flag. A file that cannot be read is named on stderr and the others "
                    "are scored (exit code 2 only when none can be); an image unlike any chest X-ray (tiny, constant, "
                    "noise-like) is scored, flagged and warned of. A model of a failed or diverged run is refused. "
                    "Research use only; not a diagnostic device.",
        epilog=examples("python -m cxrlib predict --checkpoint runs/mine/model.pt image1.png image2.dcm",
                        "python -m cxrlib predict --checkpoint runs/mine/model.pt --json scans/   # each image in it"))
    _add_inference_flags(p, "predict")
    p.add_argument("images", nargs="+", help=f"image files, or folders: a folder stands for its "
                                             f"{', '.join(IMAGE_SUFFIXES)} files, sorted by name (not its subfolders)")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    checkpoint = check_checkpoint(args.checkpoint)
    files, absent = image_files(args.images)
    _say_skipped(absent)
    if not files:
        raise CXRError("no image to score: every path given is named above")
    from .evaluate import predict

    table = predict(checkpoint, files, batch_size=args.batch_size, device=args.device)
    _say_skipped(table.attrs["skipped"])
    for path, flag in zip(table["path"], table["flag"]):
        if flag:
            print(f"cxrlib predict: warning: {path}: {flag}; far from the chest X-rays the model learnt from, so its "
                  "scores there mean little (scored, flagged)", file=sys.stderr)
    print(table.to_json(orient="records", indent=2) if args.json else table.to_string(index=False, float_format="%.4f"))
    return 0


def image_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """The files `predict` scores, a folder standing for its IMAGE_SUFFIXES files (sorted), and "path: why" of
    each path that gives none: found before the model is loaded."""
    from pathlib import Path

    files, absent = [], []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            inside = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += inside
            if not inside:
                absent.append(f"{text}: a folder without {', '.join(IMAGE_SUFFIXES)} files")
        elif path.is_file():
            files.append(text)
        else:
            absent.append(f"{text}: no such file or folder")
    return files, absent


def _say_skipped(items: list[str]) -> None:
    """One stderr line per input left out, each naming the file and why."""
    for item in items:
        print(f"cxrlib predict: skipped {item}", file=sys.stderr)


# --- results --------------------------------------------------------------------------------------
def add_results_parser(sub) -> None:
    p = command_parser(
        sub, "results", help="what a run matrix found: its runs' test scores and the paper's claims, tested",
        description="Reads the run folders in RUN_ROOT (and its matrix.json) as the results chapter does, and "
                    "prints one row per run (its status and test macro-F1, ROC AUC and COVID-19 sensitivity), "
                    "then each of the paper's claims with its verdict. Nothing is trained; no notebook runs.",
        epilog=examples("python -m cxrlib results runs/quick/synthetic",
                        'python -m cxrlib results "$(python -m cxrlib.runs --where)" --json'))
    p.add_argument("run_root", metavar="RUN_ROOT",
                   help="the folder that holds the run folders (`python -m cxrlib.runs --where` prints it)")
    p.add_argument("--json", action="store_true", help="one JSON object (runs, claims) on stdout instead of text")
    p.set_defaults(func=_run_results)


def _run_results(args: argparse.Namespace) -> int:
    import json

    check_exists("RUN_ROOT", args.run_root, "folder")  # before pandas is imported
    from .results import RUN_SCORES, holm_sentence, matrix_results, narrow, run_table

    runs, claims = matrix_results(args.run_root)
    if args.json:
        table = run_table(runs, RUN_SCORES, words=False)
        print(json.dumps({"run_root": args.run_root, "runs": json.loads(table.to_json(orient="records")),
                          "claims": json.loads(claims.to_json(orient="records")), "holm": holm_sentence(claims)},
                         indent=2))
        return 0
    shown, same = narrow(run_table(runs, RUN_SCORES))
    print(shown.to_string(index=False, na_rep="–", float_format=_fmt), same, "", sep="\n")
    for claim in claims.to_dict("records"):
        print(f"{claim['claim']} [{claim['task']}]: {claim['verdict']}"
              + ("" if claim["result"] == "–" else f"; {claim['result']}"))
    print(holm_sentence(claims))
    return 0


# --- verify ---------------------------------------------------------------------------------------
def add_verify_parser(sub) -> None:
    p = command_parser(
        sub, "verify", help="recompute every number of a results bundle from its committed predictions",
        description="Recomputes each run's metrics.json from its predictions.csv, and claims.json and "
                    "generalisation.json (what the book's first page states) from the bundle's run folders, with "
                    "the bootstrap settings they recorded; prints one line per value that differs (exit 1), else "
                    "how many numbers agree (exit 0). Nothing is trained; no data or notebook is needed.",
        epilog=examples("python -m cxrlib verify results/real-cpu-3seeds"))
    p.add_argument("bundle", metavar="RESULTS_BUNDLE", help="a results bundle folder (it holds bundle.json)")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    check_exists("RESULTS_BUNDLE", args.bundle, "folder")
    from .verify import run

    return run(args.bundle)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(f"cxrlib {args.command}", lambda: args.func(args), INTERRUPTED.get(args.command, RERUN))
