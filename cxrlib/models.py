"""Backbones, pretrained weights and freezing.

`build_model(backbone, weights, num_classes)` returns a torchvision ResNet50 or DenseNet121 with a new
`num_classes` head and the backbone loaded from one `weights` spec:

  none                        random init
  imagenet                    torchvision's own weights and cache (TORCH_HOME)
  chexnet:PATH                a CheXNet checkpoint: arnoweng/CheXNet's DenseNet121 `model.pth.tar` layout
                              (or a ResNet50 one, with `module.`/`model.`/`resnet50.` prefixes)
  torchxrayvision:NAME[@PATH] a torchxrayvision model (1 channel, pixels scaled to [-1024, 1024])
  file:PATH                   a cxrlib run folder's model.pt (e.g. ChestX-ray14 pretraining)
                              or a bare state_dict

Loading is strict on the backbone, so no layer is ever silently left random: every backbone tensor must come
from the file with the right shape, and a file with keys the model does not have is refused too (a file of
another architecture or variant would otherwise half-load). Only the file's own head (`fc.*` / `classifier.*`)
is dropped; the new head is listed in `LoadReport.reinitialised`.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import pandas as pd
import torch
import torchvision
from torch import nn
from torchvision.models import DenseNet121_Weights, ResNet50_Weights

from .config import CHOICES, check_choice
from .errors import CXRError
from .weights import Weights

BACKBONES = CHOICES["backbone"]

HEAD = {"resnet50": "fc", "densenet121": "classifier"}
FIRST_CONV = {"resnet50": "conv1", "densenet121": "features.conv0"}
IMAGENET_WEIGHTS = {"resnet50": ResNet50_Weights.IMAGENET1K_V2, "densenet121": DenseNet121_Weights.IMAGENET1K_V1}

# Modules frozen by freeze="stageN": the stem (index 0) and stages 1..N. Stage 4 is the whole backbone.
STAGES = {
    "resnet50": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "densenet121": [
        ["features.conv0", "features.norm0"],
        ["features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"],
        ["features.denseblock3", "features.transition3"],
        ["features.denseblock4", "features.norm5"],
    ],
}

# torchxrayvision's weight names and the file names it stores them under (torchxrayvision/models.py).
XRV_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_XRV_DENSENET = "-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_FILES = {
    "densenet121-res224-all": "nih-pc-chex-mimic_ch-google-openi-kaggle" + _XRV_DENSENET,
    "densenet121-res224-nih": "nih" + _XRV_DENSENET,
    "densenet121-res224-pc": "pc" + _XRV_DENSENET,
    "densenet121-res224-chex": "chex" + _XRV_DENSENET,
    "densenet121-res224-rsna": "kaggle" + _XRV_DENSENET,
    "densenet121-res224-mimic_nb": "mimic_nb" + _XRV_DENSENET,
    "densenet121-res224-mimic_ch": "mimic_ch" + _XRV_DENSENET,
    "resnet50-res512-all": "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
}
XRV_EXTRA_KEYS = ("op_threshs",)  # torchxrayvision's operating-point buffer: not a weight

# Wrappers around the torchvision keys: DataParallel's `module.`, CheXNet's `densenet121.`,
# torchxrayvision ResNet's `model.`; and DenseNet's pre-2018 `norm.1` names for `norm1` (as torchvision renames).
_WRAPPER_PREFIX = re.compile(r"^(module\.)?(model\.|densenet121\.|resnet50\.)?")
_OLD_DENSE_NAME = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


@dataclass
class LoadReport:
    """What `build_model` did: where the weights came from, which tensors were loaded and which are new."""

    source: str
    loaded: list[str]  # state_dict keys copied from the weights file
    reinitialised: list[str]  # state_dict keys left at their random init (the new head; everything for `none`)
    trainable: list[str] = field(default_factory=list)  # parameter names with requires_grad after freezing
    notes: list[str] = field(default_factory=list)


def build_model(
    backbone: str, weights: str = "none", num_classes: int = 3, freeze: str = "none"
) -> tuple[nn.Module, LoadReport]:
    """A `backbone` with a new `num_classes` head, loaded from the `weights` spec, then frozen per `freeze`.

    The model carries `backbone_name`, `input_spec` ("imagenet" or "xrv": which images.make_transform to use)
    and `frozen_modules`.
    """
    check_choice("backbone", backbone)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise CXRError(f"parameter num_classes={num_classes!r}: need an integer of at least 2")
    if Weights.parse(weights).scheme == "none":
        model = _new_model(backbone, num_classes, "imagenet")
        report = LoadReport("none (random init)", loaded=[], reinitialised=list(model.state_dict()))
    else:
        state, source, input_spec = source_state(backbone, weights)
        model = _new_model(backbone, num_classes, input_spec)
        report = load_backbone(model, state, source)

    report.trainable = freeze_model(model, freeze)
    return model, report


def source_state(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors a `weights` spec provides, where they came from, and the input spec they expect."""
    spec = Weights.parse(weights)
    if spec.scheme == "imagenet":
        return (*_imagenet_state(backbone), "imagenet")
    if spec.scheme == "chexnet":
        return load_state_dict_file(spec.path)[0], f"chexnet: {spec.path}", "imagenet"
    if spec.scheme == "torchxrayvision":
        return (*_xrv_state(backbone, spec.argument), "xrv")
    if spec.scheme == "file":
        state, meta = load_state_dict_file(spec.path)
        return state, f"file: {spec.path}", meta.get("input_spec") or _guess_input_spec(state)
    raise CXRError(f"weights={weights!r}: {spec.scheme} provides no tensors")


def transfer_check(model: nn.Module, weights: str, seed: int = 0) -> pd.DataFrame:
    """Proof that transferred layers were loaded: per backbone tensor, its distance to the weights file
    (0 = copied) and to a fresh random initialisation of the same architecture (> 0 = not random)."""
    state, _, input_spec = source_state(model.backbone_name, weights)
    state, _ = normalise_keys(state)
    torch.manual_seed(seed)
    fresh = _new_model(model.backbone_name, _head(model).out_features, input_spec).state_dict()
    head = HEAD[model.backbone_name] + "."
    rows = []
    for key, value in model.state_dict().items():
        if key.startswith(head) or not value.is_floating_point() or key not in state:
            continue
        rows.append({"tensor": key, "numel": value.numel(),
                     "max_abs_diff_to_file": (value - state[key].to(value.dtype)).abs().max().item(),
                     "mean_abs_diff_to_random_init": (value - fresh[key]).abs().mean().item()})
    return pd.DataFrame(rows)


def _new_model(backbone: str, num_classes: int, input_spec: str) -> nn.Module:
    """A randomly initialised torchvision model; "xrv" inputs get a 1-channel first convolution."""
    model = getattr(torchvision.models, backbone)(weights=None, num_classes=num_classes)
    if input_spec == "xrv":
        conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if backbone == "resnet50":
            model.conv1 = conv
        else:
            model.features.conv0 = conv
    model.backbone_name = backbone
    model.input_spec = input_spec
    model.frozen_modules = []
    return model


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy every backbone tensor of `state` into `model`; the head stays new. Refuses partial loads."""
    backbone, head = model.backbone_name, HEAD[model.backbone_name] + "."
    state, notes = normalise_keys(state)
    file_arch = _architecture(state)
    if file_arch and file_arch != backbone:
        raise CXRError(
            f"{source}: architecture mismatch: the file holds a {file_arch} but backbone={backbone}; "
            f"use backbone={file_arch} or weights for {backbone}"
        )
    target = model.state_dict()
    backbone_keys = [k for k in target if not k.startswith(head)]
    # BatchNorm's num_batches_tracked counters are absent from files of PyTorch < 0.4.1 (e.g. CheXNet's).
    missing = [k for k in backbone_keys if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and not k.startswith(head)]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (model {tuple(target[k].shape)})"
        for k in backbone_keys
        if k in state and state[k].shape != target[k].shape
    ]
    problems = [
        (missing, "backbone key(s) missing from the file"),
        (unexpected, "key(s) in the file that the model does not have"),
        (wrong_shape, "tensor(s) of the wrong shape"),
    ]
    message = "; ".join(f"{len(keys)} {what}: {_first(keys)}" for keys, what in problems if keys)
    if message:
        raise CXRError(f"{source}: cannot load into {backbone} ({message}). Check the backbone and the file.")

    loaded = [k for k in backbone_keys if k in state]
    model.load_state_dict({k: state.get(k, v) if not k.startswith(head) else v for k, v in target.items()})
    file_head = [k for k in state if k.startswith(head)]
    if file_head:
        notes.append(f"dropped the file's head {_first(file_head)} ({state[file_head[0]].shape[0]} outputs)")
    if len(loaded) < len(backbone_keys):
        notes.append("the file has no BatchNorm num_batches_tracked counters (old PyTorch); they start at 0")
    reinitialised = [k for k in target if k.startswith(head)]
    return LoadReport(source, loaded=loaded, reinitialised=reinitialised, notes=notes)


def normalise_keys(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Torchvision key names for a state_dict saved from a wrapped or old model, plus notes on what changed."""
    notes = []
    renamed = {_OLD_DENSE_NAME.sub(r"\1\2.", _WRAPPER_PREFIX.sub("", k)): v for k, v in state.items()}
    if list(renamed) != list(state):
        notes.append("mapped key names to torchvision's (wrapper prefixes, old DenseNet norm.1 names)")
    for key in XRV_EXTRA_KEYS:
        if renamed.pop(key, None) is not None:
            notes.append(f"ignored torchxrayvision's {key} buffer")
    return renamed, notes


def _architecture(state: dict[str, torch.Tensor]) -> str | None:
    if any(k.startswith("features.denseblock") for k in state):
        return "densenet121"
    if any(k.startswith("layer4.") for k in state):
        return "resnet50"
    return None


def _guess_input_spec(state: dict[str, torch.Tensor]) -> str:
    """A bare state_dict with a 1-channel first convolution came from a torchxrayvision model."""
    state, _ = normalise_keys(state)
    for conv in FIRST_CONV.values():
        if conv + ".weight" in state and state[conv + ".weight"].shape[1] == 1:
            return "xrv"
    return "imagenet"


def _first(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def imagenet_file(backbone: str) -> Path:
    """Where torchvision caches the ImageNet weights of `backbone`: torch.hub.get_dir()/checkpoints/<url file name>."""
    url = IMAGENET_WEIGHTS[backbone].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_available(backbone: str) -> bool:
    """True when weights=imagenet loads without a download."""
    return imagenet_file(backbone).is_file()


def fetch_imagenet(backbone: str, progress: bool = True) -> Path:
    """The ImageNet weights file of `backbone`: from torchvision's cache, else downloaded into it through
    torchvision's weights API (with a progress bar). Offline: CXRError saying where to put the file."""
    if not imagenet_available(backbone):
        _imagenet_state(backbone, progress=progress)
    return imagenet_file(backbone)


def _imagenet_state(backbone: str, progress: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights, from its cache or downloaded into it; offline -> where to put the file."""
    weights, expected = IMAGENET_WEIGHTS[backbone], imagenet_file(backbone)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except (URLError, OSError) as err:
        raise CXRError(
            f"weights=imagenet: torchvision's {weights} is not in the cache and could not be downloaded ({err}). "
            f"Expected file: {expected} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it). "
            f"Download {weights.url} on a connected machine and copy it there under that exact name."
        ) from err
    return state, f"imagenet: {weights} ({expected})"


def _xrv_state(backbone: str, arg: str) -> tuple[dict[str, torch.Tensor], str]:
    """A torchxrayvision weight file: `NAME` from its cache (~/.torchxrayvision/models_data) or `NAME@PATH`."""
    name, _, path = arg.partition("@")
    if name not in XRV_FILES:
        raise CXRError(f"weights=torchxrayvision:{name}: unknown name; choose one of {', '.join(XRV_FILES)}")
    if not name.startswith(backbone):
        raise CXRError(f"weights=torchxrayvision:{name} is a {name.split('-')[0]} model, but backbone={backbone}")
    if path:
        file = Path(path).expanduser()
    else:
        file = Path("~/.torchxrayvision/models_data").expanduser() / XRV_FILES[name]
        if not file.is_file():
            raise CXRError(
                f"weights=torchxrayvision:{name}: expected {file}, torchxrayvision's cache, which does not have it. "
                f"Download {XRV_URL + XRV_FILES[name]} to that path, or give the file: torchxrayvision:{name}@PATH"
            )
    state, _ = load_state_dict_file(file, allow_pickle=True)
    return state, f"torchxrayvision: {name} ({file})"


def load_state_dict_file(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The state_dict and metadata of a weights file.

    Reads cxrlib's model.pt files (loop.fit writes them) and other {"state_dict": ...} checkpoints (CheXNet's),
    bare state_dicts, and, with `allow_pickle` (only for files you trust: unpickling runs code), whole pickled models such as
    torchxrayvision's DenseNets. Metadata is the checkpoint's other entries ({} for a bare state_dict).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CXRError(f"weights file {file} does not exist")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except ModuleNotFoundError as err:
        raise CXRError(
            f"{file} is a pickled model that needs the module {err.name!r} to read; install it "
            f"(for torchxrayvision files: pip install torchxrayvision) or save its state_dict to a file and use that"
        ) from err
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise CXRError(f"{file} is not a readable PyTorch weights file: {err}") from err
        reason = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(err)
        raise CXRError(
            f"{file} is not a plain weights file of tensors ({reason}). If you trust it, load it with "
            f"obj = torch.load(path, weights_only=False) and re-save only the tensors: "
            f"torch.save(obj.state_dict() for a model, or obj['state_dict'] for a checkpoint, new_path)"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:  # the last two: a text file
        raise CXRError(f"{file} is not a readable PyTorch weights file ({type(err).__name__}: {err})") from err
    if isinstance(obj, nn.Module):
        return obj.state_dict(), {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer")}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CXRError(f"{file} holds a {type(obj).__name__}, not a state_dict or a checkpoint with 'state_dict'")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """The trained model of a cxrlib model.pt (loop.fit writes it: state_dict, backbone, num_classes, classes,
    input_spec), head included (for evaluation and prediction)."""
    state, meta = load_state_dict_file(path)
    if meta.get("backbone") not in BACKBONES or "num_classes" not in meta:
        raise CXRError(f"{path} is not a cxrlib model.pt (no backbone/num_classes)")
    model = _new_model(meta["backbone"], meta["num_classes"], meta.get("input_spec", "imagenet"))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CXRError(f"{path} does not match its own metadata ({meta['backbone']}): {err}") from err
    model.eval()
    return model, meta


def freeze_model(model: nn.Module, freeze: str) -> list[str]:
    """Set requires_grad per `freeze` (none | backbone | stageN); returns the trainable parameter names.

    stageN freezes the stem and stages 1..N (ResNet50: conv1/bn1 and layer1..N; DenseNet121: conv0/norm0 and
    denseblock1..N with their transitions). The frozen module names are kept in `model.frozen_modules`.
    """
    check_choice("freeze", freeze)
    stages = STAGES[model.backbone_name]
    n = 0 if freeze == "none" else len(stages) if freeze == "backbone" else int(freeze[-1]) + 1
    model.frozen_modules = [name for stage in stages[:n] for name in stage]
    model.requires_grad_(True)
    for name in model.frozen_modules:
        model.get_submodule(name).requires_grad_(False)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), but frozen modules stay in eval so their BatchNorm statistics do not drift."""
    model.train()
    for name in model.frozen_modules:
        model.get_submodule(name).eval()
    return model


def _head(model: nn.Module) -> nn.Linear:
    return getattr(model, HEAD[model.backbone_name])


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(features, head) sharing the model's modules: head(features(x)) == model(x), features(x) is (N, D) pooled.

    Lets frozen-backbone training compute the features once and train only the head.
    """
    if model.backbone_name == "resnet50":
        features = nn.Sequential(*list(model.children())[:-1], nn.Flatten(1))  # all but fc
    else:  # torchvision DenseNet.forward: features -> relu -> global average pool -> classifier
        features = nn.Sequential(model.features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return features, _head(model)


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The layer pytorch-grad-cam recommends: ResNet's last bottleneck, DenseNet's final norm5 (features[-1])."""
    return model.layer4[-1] if model.backbone_name == "resnet50" else model.features[-1]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
