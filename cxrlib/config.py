"""Run parameters: one dataclass shared by the CLI flags, papermill parameters and the run matrix."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CXRError

# Class names and order, defined once. Index 1 of the binary task is the positive (COVID) class.
CLASSES: dict[str, tuple[str, ...]] = {
    "binary": ("non_covid", "covid"),
    "multiclass": ("covid", "pneumonia", "normal"),
}
LABELS = ("covid", "pneumonia", "normal")  # the 3-class label every reader writes in `label`


# The one table of choices: RunConfig validation, the factories' error messages and argparse `choices=` read it.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": tuple(CLASSES),
    "loss": ("ce", "weighted_ce", "focal"),
    "backbone": ("resnet50", "densenet121"),
    "freeze": ("none", "backbone", "stage1", "stage2", "stage3", "stage4"),  # stageN: the stem and stages 1..N
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("cosine", "step", "none"),
    "split": ("patient", "published"),
    "amp": ("auto", "bf16", "fp16", "off"),
    # images.PREPROCESSORS, applied by images.make_cache; lungs_removed_marker = the lungs-removed positive control
    "preprocess": ("none", "clahe", "lung_crop", "lungs_removed", "lungs_removed_marker"),
}
PREPROCESS = CHOICES["preprocess"]


def check_choice(name: str, value: Any) -> Any:
    """`value` if CHOICES[name] allows it, else a CXRError that lists what does."""
    if value not in CHOICES[name]:
        raise CXRError(f"parameter {name}={value!r}: choose one of {', '.join(CHOICES[name])}")
    return value


def external_sets(spec: str) -> dict[str, str]:
    """The `external` parameter "name=path[,name=path]" as {name: path}; CXRError names a malformed part."""
    sets: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, path = (x.strip() for x in part.partition("="))
        if not name or not path or not name.replace("-", "").replace("_", "").isalnum() or name in sets:
            raise CXRError(f"parameter external={spec!r}: part {part!r} is not NAME=PATH with a new, "
                           "alphanumeric NAME")  # fmt: skip
        sets[name] = path
    return sets


def classes(task: str) -> tuple[str, ...]:
    """Class names of `task`, in output order."""
    return CLASSES[check_choice("task", task)]


def task_label(label: str, task: str) -> str:
    """Map a 3-class `label` to the class name of `task`."""
    if label not in LABELS:
        raise CXRError(f"unknown label {label!r}: expected one of {', '.join(LABELS)}")
    if task == "binary":
        return "covid" if label == "covid" else "non_covid"
    classes(task)
    return label


@dataclass
class RunConfig:
    """Every parameter of one run. Field names are the CLI flags and the notebooks' parameters."""

    coronahack_dir: str = ""  # empty -> the synthetic default
    extra_covid_dir: str = ""
    manifest: str = ""
    extra_negatives: str = ""  # ChestX-ray14-layout folder or manifest CSV of non-COVID images (e.g. NIH adults) to train and test on
    external: str = ""  # NAME=DIR_OR_CSV[,NAME=...]: sets scored at the end of the run, unseen images only
    hold_out: str = ""  # COLUMN=VALUE (e.g. country=Italy, site=sirm.org): those patients go to test only
    preprocess: str = "none"  # none | clahe | lung_crop | lungs_removed[_marker]: applied to every image in training and evaluation
    task: str = "multiclass"  # binary | multiclass
    loss: str = "ce"  # ce | weighted_ce | focal
    gamma: float = 2.0
    alpha: list[float] | None = None  # per-class focal alpha, in class order
    backbone: str = "resnet50"  # resnet50 | densenet121
    weights: str = "none"  # none | imagenet | chexnet:PATH | torchxrayvision:NAME[@PATH] | file:PATH
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    freeze: str = "none"  # none | backbone | stageN (freeze the stem and stages 1..N)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step | none
    weighted_sampler: bool = True
    augment: bool = True
    patience: int = 5  # early stopping on validation macro-F1; 0 disables
    split: str = "patient"  # patient (seeded, patient-disjoint re-split) | published
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16, fp16 on older GPUs, else fp32) | bf16 | fp16 | off
    num_workers: int = 0
    run_dir: str = ""
    profile: str = "custom"  # quick | paper | custom: the defaults under the parameters actually set
    extra_covid_train: bool = True  # False: ieee8023-only images leave train/val after the split (same test set)

    def __post_init__(self) -> None:
        for name in CHOICES:
            check_choice(name, getattr(self, name))
        external_sets(self.external)
        if self.hold_out and not all(self.hold_out.partition("=")[::2]):
            raise CXRError(f"parameter hold_out={self.hold_out!r}: use COLUMN=VALUE, e.g. country=Italy")
        if isinstance(self.alpha, str):  # papermill / CLI give "0.25,0.5,0.25"
            self.alpha = [float(a) for a in self.alpha.split(",")] if self.alpha.strip() else None
        if self.alpha is not None and len(self.alpha) != len(classes(self.task)):
            raise CXRError(
                f"parameter alpha has {len(self.alpha)} values; task {self.task} has "
                f"{len(classes(self.task))} classes {classes(self.task)}"
            )
        for name in ("image_size", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CXRError(f"parameter {name} must be at least 1, got {getattr(self, name)}")

    @property
    def synthetic(self) -> bool:
        """True when no real data is configured: the run uses cxrlib's synthetic chest X-rays."""
        return not (self.coronahack_dir or self.extra_covid_dir or self.manifest)

    @property
    def classes(self) -> tuple[str, ...]:
        return classes(self.task)

    def run_name(self) -> str:
        """Folder name from the parameters that define a run in the matrix."""
        weights = self.weights.split(":", 1)[0]
        if self.weights.startswith(("file:", "chexnet:")):
            path = Path(self.weights.split(":", 1)[1])  # a run folder's model.pt is named by its folder
            weights += "-" + (path.parent.name if path.stem == "model" else path.stem)
        elif self.weights.startswith("torchxrayvision:"):
            weights += "-" + self.weights.split(":", 1)[1].split("@")[0]
        arms = ["negs" if self.extra_negatives else "",  # the generalisation arms (chapter 06) get their own folders
                f"holdout-{re.sub(r'[^A-Za-z0-9.]+', '_', self.hold_out)}" if self.hold_out else "",
                self.preprocess if self.preprocess != "none" else ""]
        return "-".join([self.task, self.loss, self.backbone, weights, *filter(None, arms), f"s{self.seed}"]) + (
            "" if self.extra_covid_train else "-noextra")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CXRError(f"unknown run parameter(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "RunConfig":
        """From CLI flags or a notebook's namespace (papermill parameters): the defaults of `profile` first,
        then every RunConfig field that is set (None = not set); other names are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in params.items() if k in known}
        return cls.from_dict(with_profile(PROFILES, given))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# Profiles: `quick` runs on CPU in minutes on the synthetic default; `paper` is the paper's set-up.
# Each default lives here once: RunConfig's field defaults, then the profile's values over them.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(image_size=64, epochs=2, batch_size=32, lr=1e-3, patience=0),
    "paper": dict(image_size=224, epochs=30, batch_size=32, lr=1e-4, patience=5),
}
# ChestX-ray14 pretraining (chestxray14.PretrainConfig) under the same profile names.
PRETRAIN_PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(image_size=64, epochs=2, batch_size=32, lr=1e-3, patience=0),
    "paper": dict(),  # PretrainConfig's own defaults are the paper-scale set-up (224 px, 5 epochs)
}
# The run matrix: seeds per configuration (seeds 0..N-1).
MATRIX_PROFILES: dict[str, dict[str, Any]] = {"quick": dict(seeds=1), "paper": dict(seeds=3)}


def with_profile(profiles: dict[str, dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """The one precedence rule: the profile's defaults first, then the values actually set (None = not set).

    `given["profile"]` names the profile; "custom" (or none) means no profile defaults.
    """
    given = {k: v for k, v in given.items() if v is not None}
    profile = given.get("profile", "custom")
    if profile != "custom" and profile not in profiles:
        raise CXRError(f"unknown profile {profile!r}: choose one of {', '.join(profiles)} or custom")
    return {**profiles.get(profile, {}), **given}


def profile_config(profile: str, **overrides: Any) -> RunConfig:
    """A RunConfig from a named profile plus overrides."""
    return RunConfig.from_parameters({**overrides, "profile": profile})


SOURCE_NAMES = {"coronahack": "CoronaHack", "ieee8023": "ieee8023 COVID-19 collection", "manifest": "manifest"}
SYNTHETIC_TAG = "synthetic"


def data_record(fingerprint: str, n_images: int, coronahack_dir: str = "", extra_covid_dir: str = "",
                manifest: str = "") -> dict[str, Any]:
    """What a run's numbers come from, as params.json keeps it: the banners and the run root's data tag
    are made from this record, never from the parameters a notebook happens to have now."""
    sources = {k: v for k, v in (("coronahack", coronahack_dir), ("ieee8023", extra_covid_dir),
                                 ("manifest", manifest)) if v}
    tag = "+".join(sources) + f"-{fingerprint[:8]}" if sources else SYNTHETIC_TAG
    return {"synthetic": not sources, "sources": sources, "fingerprint": fingerprint, "n_images": int(n_images),
            "tag": tag}


def data_banner(record: dict[str, Any]) -> str:
    """The sentence every chapter shows first: which data its numbers come from (a `data_record`)."""
    if record["synthetic"]:
        return ("**Data: synthetic.** No data was configured, so this chapter ran on cxrlib's synthetic chest "
                "X-rays (CoronaHack and ieee8023 layouts). Its numbers show that the code works; they say "
                "nothing about COVID-19. Set `coronahack_dir` and `extra_covid_dir` to run it on the real data.")
    parts = ", ".join(f"{SOURCE_NAMES[k]} (folder `{Path(v).name}`)" for k, v in record["sources"].items())
    negs = record.get("extra_negatives")
    extra = (f" Runs marked *debiased* also trained on {negs['n_images']} extra non-COVID images (folder "
             f"`{negs['folder']}`, fingerprint `{negs['fingerprint']}`)." if negs else "")
    return (f"**Data: {parts}** ({record['n_images']} images after de-duplication, data fingerprint "
            f"`{record['fingerprint']}`).{extra} Research use only; not a diagnostic device.")


def banner_from_record(path: str | Path) -> str:
    """The banner of a run folder, or of a run root (all its runs must share one data record), from what the
    runs recorded in params.json: the data, then the profile, image size and epochs."""
    path = Path(path)
    folders = [path] if (path / "params.json").is_file() else sorted(p.parent for p in path.glob("*/params.json"))
    records = [json.loads((f / "params.json").read_text()) for f in folders]
    records = [r for r in records if "record" in r.get("data", {}) and "task" in r.get("config", {})]
    if not records:
        raise CXRError(f"no run folder with a data record in {path}: run `python -m cxrlib.runs` (or train) first")
    data = {r["data"]["record"]["fingerprint"]: r["data"]["record"]  # a debiased run's record names its extra data
            for r in sorted(records, key=lambda r: "extra_negatives" in r["data"]["record"])}
    if len(data) > 1:
        raise CXRError(f"{path} mixes runs of different data ({', '.join(d['tag'] for d in data.values())}); "
                       "give one data set's run root")
    settings = sorted({(r["config"]["profile"], r["config"]["image_size"], r["config"]["epochs"]) for r in records})
    runs_text = "; ".join(f"profile `{p}`, {size} px, {epochs} epoch(s)" for p, size, epochs in settings)
    return f"{data_banner(next(iter(data.values())))}\n\n*Recorded by {len(records)} run(s): {runs_text}.*"
