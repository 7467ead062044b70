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


PREPROCESS = ("none", "clahe", "lung_crop")  # images.PREPROCESSORS, applied by images.make_cache


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
    if task not in CLASSES:
        raise CXRError(f"unknown task {task!r}: choose one of {', '.join(CLASSES)}")
    return CLASSES[task]


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
    preprocess: str = "none"  # none | clahe | lung_crop: applied to every image in training and evaluation
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
    num_workers: int = 0
    run_dir: str = ""
    profile: str = "custom"

    def __post_init__(self) -> None:
        classes(self.task)
        checks = {
            "loss": (self.loss, ("ce", "weighted_ce", "focal")),
            "backbone": (self.backbone, ("resnet50", "densenet121")),
            "optimizer": (self.optimizer, ("adamw", "sgd")),
            "scheduler": (self.scheduler, ("cosine", "step", "none")),
            "split": (self.split, ("patient", "published")),
            "preprocess": (self.preprocess, PREPROCESS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise CXRError(f"parameter {name}={value!r}: choose one of {', '.join(allowed)}")
        if self.freeze not in ("none", "backbone") and not (
            self.freeze.startswith("stage") and self.freeze[5:].isdigit()
        ):
            raise CXRError(f"parameter freeze={self.freeze!r}: use none, backbone or stageN (N=1..4)")
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
        return "-".join([self.task, self.loss, self.backbone, weights, *filter(None, arms), f"s{self.seed}"])

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
        """From a notebook's namespace (papermill parameters): every RunConfig field found there, over the
        defaults of its `profile`; other names are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in params.items() if k in known}
        return cls.from_dict({**PROFILES.get(given.get("profile", ""), {}), **given})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# Profiles: `quick` runs on CPU in minutes on the synthetic default; `paper` is the paper's set-up.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(image_size=64, epochs=2, batch_size=32, lr=1e-3, patience=0, profile="quick"),
    "paper": dict(image_size=224, epochs=30, batch_size=32, lr=1e-4, patience=5, profile="paper"),
}


def profile_config(profile: str, **overrides: Any) -> RunConfig:
    """A RunConfig from a named profile plus overrides."""
    if profile not in PROFILES:
        raise CXRError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return RunConfig.from_dict({**PROFILES[profile], **overrides})


def data_banner(coronahack_dir: str = "", extra_covid_dir: str = "", manifest: str = "") -> str:
    """The sentence every chapter shows first: which data its numbers come from."""
    if not (coronahack_dir or extra_covid_dir or manifest):
        return ("**Data: synthetic.** No data was configured, so this chapter ran on cxrlib's synthetic chest "
                "X-rays (CoronaHack and ieee8023 layouts). Its numbers show that the code works; they say "
                "nothing about COVID-19. Set `coronahack_dir` and `extra_covid_dir` to run it on the real data.")
    parts = [f"{name} `{path}`" for name, path in (("CoronaHack", coronahack_dir), ("ieee8023 COVID-19 collection",
             extra_covid_dir), ("manifest", manifest)) if path]
    return "**Data: " + ", ".join(parts) + ".** Research use only; not a diagnostic device."
