"""The run matrix through papermill, and the book's executed chapters.

`python -m cxrlib.runs --profile quick` executes notebooks/03_finetune.ipynb once per configuration
(task x loss x init) into the run folder; `--book` then executes the other chapters into
book/generated/, reading the run folder only (nothing is retrained to render the book).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, profile_config
from .errors import CXRError
from .results import load_runs, read_status

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GENERATED = ROOT / "book" / "generated"
FINETUNE = "03_finetune"
CHAPTERS = ("01_data_analysis", "02_chexnet_transfer", "04_error_analysis", "05_results")
TASKS = ("binary", "multiclass")
LOSSES = ("ce", "focal")


@dataclass
class RunStatus:
    name: str
    run_dir: Path
    status: str  # complete | failed: <reason> | missing

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def pretrain_dir(run_root: Path, backbone: str = "resnet50") -> Path:
    """Where the run matrix keeps its ChestX-ray14-pretrained backbone (the paper's "CheXNet" init)."""
    return Path(run_root) / f"pretrain-chestxray14-{backbone}"


def available_inits(run_root: Path, backbone: str = "resnet50", chestxray14: bool = True) -> list[str]:
    """Initialisations the matrix can use here: random, ImageNet when cached, chest X-ray when pretrained."""
    from .models import imagenet_available

    inits = ["none"]
    if imagenet_available(backbone):
        inits.append("imagenet")
    if chestxray14:
        checkpoint = pretrain_dir(run_root, backbone) / "model.pt"
        if read_status(checkpoint.parent) == "complete":
            inits.append(f"file:{checkpoint}")
    return inits


def ensure_pretrained(run_root: Path, profile: str, chestxray14_dir: str = "", backbone: str = "resnet50") -> RunStatus:
    """Pretrain the chest-X-ray init once: ChestX-ray14 (synthetic in the quick profile), from ImageNet when cached."""
    from .chestxray14 import PretrainConfig, pretrain
    from .models import imagenet_available

    out = pretrain_dir(run_root, backbone)
    if read_status(out) != "complete":
        settings = {"quick": dict(image_size=64, epochs=2, batch_size=32, lr=1e-3)}.get(profile, {})
        weights = "imagenet" if imagenet_available(backbone) else "none"
        cfg = PretrainConfig(chestxray14=chestxray14_dir, backbone=backbone, weights=weights, **settings)
        try:
            pretrain(cfg, out, progress=False)
        except Exception as err:  # kept as the folder's status; the matrix goes on without this init
            print(f"pretraining failed ({out / 'status'}): {err}", file=sys.stderr)
    return RunStatus(out.name, out, read_status(out))


def matrix(profile: str, run_root: Path, data: dict[str, str], inits: list[str],
           tasks=TASKS, losses=LOSSES, **overrides) -> list[RunConfig]:
    """One RunConfig per task x loss x init, with run_dir inside run_root."""
    configs = []
    for task in tasks:
        for loss in losses:
            for weights in inits:
                cfg = profile_config(profile, task=task, loss=loss, weights=weights, **data, **overrides)
                cfg.run_dir = str(Path(run_root) / cfg.run_name())
                configs.append(cfg)
    return configs


def execute_notebook(name: str, output: Path, parameters: dict) -> None:
    """Run one chapter with papermill, from the notebooks folder so relative paths behave as in Jupyter."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(output), parameters=parameters,
        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False, log_output=False,
    )


def notebook_parameters(cfg: RunConfig) -> dict:
    """The fields of `cfg` that 03_finetune declares; the notebook takes the others from cfg.profile's defaults,
    so a config that changes an undeclared field would be run wrongly: refuse it."""
    import papermill

    declared = set(papermill.inspect_notebook(str(NOTEBOOKS / f"{FINETUNE}.ipynb")))
    values = cfg.to_dict()
    implied = RunConfig.from_parameters({k: v for k, v in values.items() if k in declared}).to_dict()
    differ = sorted(k for k in values if values[k] != implied[k] and k not in declared)
    if differ:
        raise CXRError(f"{FINETUNE} does not declare parameter(s) {', '.join(differ)}: add them to its parameters cell")
    return {k: v for k, v in values.items() if k in declared}


def execute_run(cfg: RunConfig) -> RunStatus:
    """Train and evaluate one configuration through the 03_finetune notebook; failures are kept."""
    run_dir = Path(cfg.run_dir)
    if read_status(run_dir) == "complete":
        return RunStatus(run_dir.name, run_dir, "complete")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")  # what was asked for, so a run that fails early is still listed
    try:
        execute_notebook(FINETUNE, run_dir / "notebook.ipynb", notebook_parameters(cfg))
    except Exception as err:  # papermill re-raises the notebook's error; keep it as the run's status
        reason = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        if read_status(run_dir) in ("missing", "complete"):
            (run_dir / "status").write_text(reason + "\n")
    return RunStatus(run_dir.name, run_dir, read_status(run_dir))


def featured_run(run_root: Path) -> Path | None:
    """The run chapter 3 shows: 3-class, focal loss, preferring the chest-X-ray init as in the paper."""
    runs = load_runs(run_root)
    if runs.empty:
        return None
    done = runs[runs.status == "complete"]
    for prefer in (lambda r: r.weights.str.startswith("file:"), lambda r: r.weights == "imagenet", lambda r: r.weights == "none"):
        pick = done[(done.task == "multiclass") & (done.loss == "focal") & prefer(done)]
        if not pick.empty:
            return Path(pick.iloc[0].run_dir)
    return Path(done.iloc[0].run_dir) if not done.empty else None


def build_book_notebooks(run_root: Path, data: dict[str, str], profile: str) -> None:
    """Execute the chapters into book/generated/ from the run folder; chapter 3 is the featured run."""
    featured = featured_run(run_root)
    if featured is None:
        raise CXRError(f"no complete run in {run_root}: run `python -m cxrlib.runs --profile {profile}` first")
    GENERATED.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(featured / "notebook.ipynb", GENERATED / f"{FINETUNE}.ipynb")
    parameters = {**data, "run_root": str(run_root), "run_dir": str(featured), "profile": profile}
    for name in CHAPTERS:
        print(f"executing {name} ...", flush=True)
        execute_notebook(name, GENERATED / f"{name}.ipynb", parameters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrlib.runs", description=__doc__)
    parser.add_argument("--profile", default="quick", choices=["quick", "paper"])
    parser.add_argument("--run-root", default="")
    parser.add_argument("--coronahack-dir", default="")
    parser.add_argument("--extra-covid-dir", default="")
    parser.add_argument("--chestxray14-dir", default="", help="real ChestX-ray14 for the chest-X-ray init")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--inits", default="", help="comma-separated weight specs (default: all available)")
    parser.add_argument("--book", action="store_true", help="execute the book chapters from the run folder")
    args = parser.parse_args(argv)
    run_root = Path(args.run_root or ROOT / "runs" / args.profile).resolve()
    data = {"coronahack_dir": args.coronahack_dir, "extra_covid_dir": args.extra_covid_dir}
    try:
        if args.book:
            build_book_notebooks(run_root, data, args.profile)
            return 0
        if not args.inits:
            ensure_pretrained(run_root, args.profile, args.chestxray14_dir)
        inits = args.inits.split(",") if args.inits else available_inits(run_root)
        configs = matrix(args.profile, run_root, data, inits, args.tasks.split(","), args.losses.split(","))
        failed = 0
        for cfg in configs:
            result = execute_run(cfg)
            failed += not result.complete
            print(f"{result.status:>10}  {result.name}", flush=True)
        print(f"{len(configs) - failed} complete, {failed} failed, in {run_root}")
        return 1 if failed else 0
    except CXRError as err:
        print(f"cxrlib.runs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
