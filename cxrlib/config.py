"""Run parameters: one dataclass shared by the CLI flags, papermill parameters and the run matrix."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text
from .errors import CXRError
from .weights import Weights

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
    # preprocess.PREPROCESSORS, applied by preprocess.make_cache; *_marker = the controls of lungs_removed and lungs_only
    "preprocess": ("none", "clahe", "lung_crop", "lungs_removed", "lungs_removed_marker", "lungs_only",
                   "lungs_only_marker", "lungs_only_clahe"),
    "cohort": ("all", "adults"),  # data.in_cohort: adults = no paediatric image (needs extra_negatives)
    "rows": ("auto", "all", "test"),  # `evaluate`: which rows of the data to score (evaluate.evaluate)
}
PREPROCESS = CHOICES["preprocess"]
ADULT_AGE = 18  # years: an image of a younger patient is a child's, whatever the collection says


def check_choice(name: str, value: Any) -> Any:
    """`value` if CHOICES[name] allows it, else a CXRError that lists what does."""
    if value not in CHOICES[name]:
        raise CXRError(f"parameter {name}={value!r}: choose one of {', '.join(CHOICES[name])}")
    return value


# The least value of each numeric field a config may have (True: that value itself is refused too).
LOWEST: dict[str, tuple[float, bool]] = {
    "image_size": (1, False), "epochs": (1, False), "batch_size": (1, False), "lr": (0, True),
    "weight_decay": (0, False), "gamma": (0, False), "patience": (0, False), "seed": (0, False),
    "num_workers": (0, False),
}
FRACTIONS = ("val_frac", "test_frac")  # shares of the patients: each in (0, 1), together below 1
DEVICE_SPECS = "auto | cpu | cuda | cuda:N"
# Path parameters (of RunConfig, PretrainConfig and the commands' flags of the same names) and what each must be.
PATH_KINDS = {"coronahack_dir": "folder", "extra_covid_dir": "folder", "manifest": "file",
              "extra_negatives": "folder or file", "chestxray14": "folder", "chestxray14_dir": "folder"}


def too_low(value: float, low: float, strict: bool = False) -> str:
    """"" when `value` is at least `low` (above it when `strict`), else what it must be; NaN is always too low."""
    if float(value) > low or (float(value) == low and not strict):
        return ""
    return f"{'greater than' if strict else 'at least'} {low}, got {value}"


def check_device(device: str) -> str:
    """`device` if it is one of DEVICE_SPECS (whether that GPU is here is distributed.resolve_device's question)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise CXRError(f"parameter device={device!r}: use one of {DEVICE_SPECS}")
    return device


BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}  # text as a bool


def typed_value(kind: Any, value: Any) -> Any:
    """`value` as a field of type `kind` (bool, int, float or str) takes it: a value of that type as it is, text
    converted ("32" -> 32, "no" -> False: --set and papermill's -r give text); ValueError when it is neither.
    Other kinds (alpha's list or its text) are the dataclass's to check."""
    if kind not in (bool, int, float, str):
        return value
    if isinstance(value, str) and kind is not str:
        if kind is not bool:
            return kind(value)
        if value.lower() in BOOLEANS:
            return BOOLEANS[value.lower()]
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):  # True is no int here
        return value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{value!r} is not of type {type_name(kind)}")


def type_name(kind: Any) -> str:
    """A field's type as an error message names it: "int", "bool (1, true, yes, 0, false, no)"."""
    return f"bool ({', '.join(BOOLEANS)})" if kind is bool else getattr(kind, "__name__", str(kind))


def check_fields(obj: Any, lowest: dict[str, tuple[float, bool]] = LOWEST) -> None:
    """Every field of a config dataclass that CHOICES, `lowest` or FRACTIONS constrain, and its weights and device
    specs, checked (RunConfig and PretrainConfig alike): a bad value fails before anything is read (whether a
    path is there is `check_paths`'s question)."""
    for name in CHOICES:
        if hasattr(obj, name):
            check_choice(name, getattr(obj, name))
    for name, (low, strict) in lowest.items():
        if hasattr(obj, name) and (why := too_low(getattr(obj, name), low, strict)):
            raise CXRError(f"parameter {name} must be {why}")
    fractions = {name: getattr(obj, name) for name in FRACTIONS if hasattr(obj, name)}
    for name, value in fractions.items():
        if not 0 < value < 1:
            raise CXRError(f"parameter {name} must be between 0 and 1 (a share of the patients), got {value}")
    if sum(fractions.values()) >= 1:
        raise CXRError(f"parameters {' + '.join(fractions)} must be below 1 (the rest trains), got "
                       f"{' + '.join(map(str, fractions.values()))}")
    Weights.parse(obj.weights)
    check_device(obj.device)


def check_exists(label: str, path: str, kind: str) -> None:
    """A `kind` ("folder", "file" or "folder or file") is at `path`, else a CXRError naming `label` and `path`."""
    found = Path(path).expanduser()
    if not (found.is_dir() if kind == "folder" else found.is_file() if kind == "file" else found.exists()):
        raise CXRError(f"{label}: no such {kind}: {path}")


def check_paths(obj: Any) -> None:
    """Every path a config (or a command's flags) names is there: its data folders and manifests (PATH_KINDS),
    external sets and weights file. Called before any data is read or any folder made, so a typo costs
    nothing; not in __post_init__, because a config may describe a run made on another machine."""
    for name, kind in PATH_KINDS.items():
        if getattr(obj, name, ""):
            check_exists(f"parameter {name}", getattr(obj, name), kind)
    for name, where in external_sets(getattr(obj, "external", "")).items():
        check_exists(f"parameter external {name}", where, "folder or file")
    weights = Weights.parse(getattr(obj, "weights", "none"))
    if weights.path:
        check_exists(f"parameter weights={obj.weights!r}", str(weights.path), "file")


def check_checkpoint(path: str | Path) -> Path:
    """`path` if it is a file PyTorch wrote (a zip archive with a data.pkl, as every model.pt), checked before
    torch is imported; else a CXRError that says what to give."""
    import zipfile

    file = Path(path).expanduser()
    hint = "give a run folder's model.pt (python -m cxrlib train)"
    if not file.is_file():
        raise CXRError(f"checkpoint {path} {'is a folder' if file.is_dir() else 'does not exist'}: {hint}")
    try:
        with zipfile.ZipFile(file) as archive:
            pickled = any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        pickled = False
    if not pickled:
        raise CXRError(f"checkpoint {path} is not a cxrlib checkpoint (not a file torch.save wrote): {hint}")
    return file


def field_default(cls: Any, name: str) -> Any:
    """The default of one dataclass field: the CLI's defaults are read here, never restated."""
    return cls.__dataclass_fields__[name].default


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


def hold_out_terms(spec: str) -> list[list[tuple[str, str]]]:
    """The `hold_out` parameter as terms of (column, value) pairs: "country=Italy;collection=ieee8023&covid=no"
    holds out every patient with an image from Italy, and every patient with a non-COVID ieee8023 image.
    `;` separates terms (any may match), `&` joins conditions of one term (all must match)."""
    terms = []
    for term in filter(None, (t.strip() for t in spec.split(";"))):
        pairs = [(part.partition("=")[0].strip(), part.partition("=")[2].strip().lower()) for part in term.split("&")]
        if not all(column and value for column, value in pairs):
            raise CXRError(f"parameter hold_out={spec!r}: term {term!r} is not COLUMN=VALUE[&COLUMN=VALUE], "
                           "e.g. country=Italy")
        terms.append(pairs)
    return terms


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


def encode_labels(labels: Iterable[str], task: str) -> np.ndarray:
    """Class indices (into `classes(task)`) of 3-class `labels`: the one label encoding."""
    names = classes(task)
    return np.array([names.index(task_label(label, task)) for label in labels], dtype=np.int64)


@dataclass
class RunConfig:
    """Every parameter of one run. Field names are the CLI flags and the notebooks' parameters."""

    coronahack_dir: str = ""  # Kaggle CoronaHack folder; no data folder or manifest at all -> the synthetic default
    extra_covid_dir: str = ""  # ieee8023 covid-chestxray-dataset folder (metadata.csv + images/)
    manifest: str = ""  # CSV with path,label[,patient_id,split,source,view]: any other collection
    extra_negatives: str = ""  # ChestX-ray14-layout folder or manifest CSV of non-COVID images (e.g. NIH adults) to train and test on
    external: str = ""  # NAME=DIR_OR_CSV[,NAME=...]: sets scored at the end of the run, unseen images only
    hold_out: str = ""  # COLUMN=VALUE[&COLUMN=VALUE][;...] (e.g. country=Italy): those patients go to test only
    cohort: str = "all"  # all, or adults: the paediatric CoronaHack images (and NIH children) left out everywhere
    preprocess: str = "none"  # applied to every image in training and evaluation
    task: str = "multiclass"  # binary: COVID vs not; multiclass: covid, pneumonia, normal
    loss: str = "ce"  # cross-entropy, inverse-frequency weighted cross-entropy, or focal loss
    gamma: float = 2.0  # focal loss focusing parameter
    alpha: list[float] | None = None  # per-class focal alpha, in class order
    backbone: str = "resnet50"  # the network (densenet121 is CheXNet's)
    weights: str = "none"  # none | imagenet | chexnet:PATH | torchxrayvision:NAME[@PATH] | file:PATH
    image_size: int = 224  # pixels per side the images are resized to
    epochs: int = 10  # most epochs (early stopping may end sooner)
    batch_size: int = 32  # images per step, per process under torchrun
    freeze: str = "none"  # layers not trained: backbone, or stageN (the stem and stages 1..N)
    optimizer: str = "adamw"  # AdamW, or SGD with momentum
    lr: float = 1e-4  # learning rate
    weight_decay: float = 1e-4  # the optimiser's weight decay
    scheduler: str = "cosine"  # learning-rate schedule over the epochs
    weighted_sampler: bool = True  # draw training images with class-balanced probabilities
    augment: bool = True  # light random affine and contrast changes in training (images.AUGMENT; no flips)
    patience: int = 5  # early stopping on validation macro-F1; 0 disables
    split: str = "patient"  # patient: a seeded patient-disjoint re-split; published: CoronaHack's own
    val_frac: float = 0.15  # share of patients in validation (split=patient)
    test_frac: float = 0.15  # share of patients in test (split=patient)
    seed: int = 0  # split, initialisation and sampling seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # mixed precision; auto: bf16 on GPUs and on CPUs with AMX/AVX512-BF16, fp16 on older GPUs, else fp32
    num_workers: int = 0  # data-loader worker processes
    run_dir: str = ""  # the run folder; empty: runs/<profile>/<data tag>/<run name>
    profile: str = "custom"  # the defaults under the parameters actually set (custom: none)
    extra_covid_train: bool = True  # False: the ieee8023-only COVID-19 images leave training only (same val and test)

    def __post_init__(self) -> None:
        check_fields(self)
        external_sets(self.external)
        hold_out_terms(self.hold_out)
        if self.cohort == "adults" and not self.extra_negatives:
            raise CXRError("parameter cohort=adults: without the paediatric images only COVID-19 is left; give "
                           "extra_negatives (adult non-COVID images, e.g. the NIH ChestX-ray14 subset)")
        if isinstance(self.alpha, str):  # papermill / CLI give "0.25,0.5,0.25"
            self.alpha = [float(a) for a in self.alpha.split(",")] if self.alpha.strip() else None
        if self.alpha is not None and len(self.alpha) != len(classes(self.task)):
            raise CXRError(
                f"parameter alpha has {len(self.alpha)} values; task {self.task} has "
                f"{len(classes(self.task))} classes {classes(self.task)}"
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return classes(self.task)

    def run_name(self) -> str:
        """Folder name from the parameters that define a run in the matrix."""
        data = "negs" if self.extra_negatives else ""  # the generalisation arms (chapter 06) get their own folders
        arms = [self.cohort if self.cohort != "all" else data,
                f"holdout-{re.sub(r'[^A-Za-z0-9.]+', '_', self.hold_out)}" if self.hold_out else "",
                self.preprocess if self.preprocess != "none" else "",
                "" if self.weighted_sampler else "unweighted"]
        return "-".join([self.task, self.loss, self.backbone, Weights.parse(self.weights).folder_part,
                         *filter(None, arms), f"s{self.seed}"]) + (
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
        write_text(path, json.dumps(self.to_dict(), indent=2))


@dataclass
class PretrainConfig:
    """Every parameter of a ChestX-ray14 pretraining run (the `pretrain` command's flags); its defaults are the
    paper-scale set-up, with the fine-tuning values where they are the same. Here, beside RunConfig, so the CLI
    reads it without importing torch."""

    chestxray14: str = ""  # the NIH folder; empty -> a synthetic ChestX-ray14 (synthetic.ensure_chestxray14)
    backbone: str = RunConfig.backbone  # the network (densenet121 is CheXNet's)
    weights: str = "imagenet"  # none | imagenet | ... (models.build_model)
    image_size: int = RunConfig.image_size  # pixels per side the images are resized to
    epochs: int = 5  # most epochs (early stopping may end sooner)
    batch_size: int = RunConfig.batch_size  # images per step, per process under torchrun
    optimizer: str = RunConfig.optimizer  # AdamW, or SGD with momentum
    lr: float = RunConfig.lr  # learning rate
    weight_decay: float = 1e-5  # the optimiser's weight decay
    scheduler: str = RunConfig.scheduler  # learning-rate schedule over the epochs
    patience: int = 3  # epochs without a better validation mean AUROC; 0 disables early stopping
    class_weighted: bool = False  # BCE pos_weight = negatives / positives per finding (CheXNet's weighting)
    augment: bool = RunConfig.augment  # light random affine and contrast changes in training (images.AUGMENT; no flips)
    val_frac: float = 0.1  # of the train_val_list.txt patients
    seed: int = 0  # split, initialisation and sampling seed
    device: str = RunConfig.device  # auto | cpu | cuda | cuda:N
    amp: str = RunConfig.amp  # GPU: bf16 (fp16 + GradScaler where bf16 is missing); CPU: fp32
    num_workers: int = -1  # -1: 0 on CPU, else min(8, CPU cores per local process)

    def __post_init__(self) -> None:
        check_fields(self, {**LOWEST, "num_workers": (-1, False)})  # -1: chosen per machine

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Profiles: `quick` runs on CPU in minutes on the synthetic default; `paper` is the paper's set-up. A profile
# holds only what differs from the dataclass's field defaults, so each default is written once.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(image_size=64, epochs=2, lr=1e-3, patience=0),
    "paper": dict(epochs=30),  # RunConfig's defaults are the paper's image size, batch size and learning rate
}
# ChestX-ray14 pretraining (PretrainConfig) under the same profile names: quick as for fine-tuning; paper is
# PretrainConfig's own defaults.
PRETRAIN_PROFILES: dict[str, dict[str, Any]] = {"quick": dict(PROFILES["quick"]), "paper": dict()}
# The run matrix: seeds per configuration (seeds 0..N-1).
MATRIX_PROFILES: dict[str, dict[str, Any]] = {"quick": dict(seeds=1), "paper": dict(seeds=3)}
PROFILE_CHOICES = (*PROFILES, "custom")  # `profile`: custom = no profile defaults, only the dataclass's
# `evaluate` and `predict` from a saved model (the CLI's defaults; evaluate.evaluate / evaluate.predict take the same).
INFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {"evaluate": dict(batch_size=64, n_boot=1000),
                                                 "predict": dict(batch_size=32)}


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


def data_sources(coronahack_dir: str = "", extra_covid_dir: str = "", manifest: str = "") -> dict[str, str]:
    """The COVID-task data given, by source name. Empty: none given, so the run reads cxrlib's synthetic
    data (data.load_table) and says so (data_record); this is the one place that decides it."""
    return {k: str(v) for k, v in (("coronahack", coronahack_dir), ("ieee8023", extra_covid_dir),
                                   ("manifest", manifest)) if v}


def data_record(fingerprint: str, n_images: int, coronahack_dir: str = "", extra_covid_dir: str = "",
                manifest: str = "") -> dict[str, Any]:
    """What a run's numbers come from, as params.json keeps it: the banners and the run root's data tag
    are made from this record, never from the parameters a notebook happens to have now."""
    sources = data_sources(coronahack_dir, extra_covid_dir, manifest)
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
