"""Models: every weights format loads its backbone exactly (never random), the head is new and reported,
bad files fail with a CXRError that says what to do, and freezing sets the right requires_grad flags.

Weight files in each format are made here from random torchvision models (nothing is downloaded).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cxrlib import CXRError
from cxrlib.models import (
    XRV_FILES,
    backbone_and_head,
    build_model,
    count_parameters,
    gradcam_target_layer,
    imagenet_available,
    load_checkpoint,
    load_state_dict_file,
    train_mode,
    transfer_check,
)

HEADS = {"resnet50": "fc.", "densenet121": "classifier."}
OLD_DENSE = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")


def random_state(backbone: str, num_classes: int, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A torchvision state_dict with every tensor random (so a match proves it was loaded, not initialised)."""
    torch.manual_seed(123)
    model = getattr(torchvision.models, backbone)(num_classes=num_classes)
    if in_channels == 1:
        conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if backbone == "resnet50":
            model.conv1 = conv
        else:
            model.features.conv0 = conv
    return {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def assert_backbone_from(model: nn.Module, report, state: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor equals the file's; the head is new and reported as such."""
    head = HEADS[model.backbone_name]
    model_state = model.state_dict()
    not_loaded = [k for k in model_state if k not in report.loaded and not k.startswith(head)]
    assert all(k.endswith("num_batches_tracked") for k in not_loaded), not_loaded  # absent from old files
    for key in report.loaded:
        assert torch.equal(model_state[key], state[key]), key
    assert report.reinitialised == [head + "weight", head + "bias"]


def chexnet_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """arnoweng/CheXNet's model.pth.tar layout: DataParallel(DenseNet121 wrapper), old norm.1 names,
    a Sequential(Linear, Sigmoid) classifier and no num_batches_tracked (PyTorch 0.3)."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = OLD_DENSE.sub(r"\1.\2.", key).replace("classifier.", "classifier.0.")
        renamed["module.densenet121." + key] = value
    return {"epoch": 7, "state_dict": renamed}


@pytest.fixture(scope="module")
def densenet14() -> dict[str, torch.Tensor]:
    return random_state("densenet121", 14)


@pytest.fixture(scope="module")
def chexnet_file(tmp_path_factory, densenet14) -> Path:
    path = tmp_path_factory.mktemp("chexnet") / "model.pth.tar"
    torch.save(chexnet_checkpoint(densenet14), path, _use_new_zipfile_serialization=False)  # pre-1.6 format
    return path


@pytest.fixture
def homes(tmp_path, monkeypatch) -> Path:
    """Empty torch and torchxrayvision caches; downloads fail at once, as offline."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        from urllib.error import URLError

        raise URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path


@pytest.mark.parametrize("backbone,features", [("resnet50", 2048), ("densenet121", 1024)])
def test_random_init_forward_and_helpers(backbone, features):
    model, report = build_model(backbone, "none", num_classes=3)
    assert (model.backbone_name, model.input_spec) == (backbone, "imagenet")
    assert report.loaded == [] and set(report.reinitialised) == set(model.state_dict())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        extractor, head = backbone_and_head(model)
        pooled = extractor(x)
    assert logits.shape == (2, 3) and pooled.shape == (2, features)
    assert torch.allclose(head(pooled), logits, atol=1e-5)
    expected = model.layer4[-1] if backbone == "resnet50" else model.features.norm5
    assert gradcam_target_layer(model) is expected
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121"])
def test_gradcam_runs_on_the_target_layer(backbone):
    from pytorch_grad_cam import GradCAM

    model, _ = build_model(backbone, "none", num_classes=2)
    cam = GradCAM(model=model.eval(), target_layers=[gradcam_target_layer(model)])
    heatmap = cam(input_tensor=torch.randn(1, 3, 32, 32), targets=None)
    assert heatmap.shape == (1, 32, 32)


def test_fourteen_class_head_for_pretraining():
    model, _ = build_model("resnet50", "none", num_classes=14)
    assert model.fc.out_features == 14


def test_imagenet_offline_names_the_expected_file(homes):
    assert not imagenet_available("resnet50")
    with pytest.raises(CXRError) as err:
        build_model("resnet50", "imagenet", num_classes=3)
    expected = homes / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in str(err.value) and "TORCH_HOME" in str(err.value)
    assert "offline (test)" in str(err.value)  # the download was tried through torch.hub, never the network


def test_imagenet_loads_from_torch_cache(homes):
    """torchvision's DenseNet file uses the old norm.1 names too; it must load from the cache, not the net."""
    state = random_state("densenet121", 1000)
    old_names = {OLD_DENSE.sub(r"\1.\2.", k): v for k, v in state.items()}
    cache = homes / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(old_names, cache / "densenet121-a639ec97.pth")
    assert imagenet_available("densenet121") and not imagenet_available("resnet50")
    model, report = build_model("densenet121", "imagenet", num_classes=2)
    assert_backbone_from(model, report, state)
    assert model.classifier.out_features == 2 and "densenet121-a639ec97.pth" in report.source


def test_chexnet_checkpoint_maps_to_torchvision(chexnet_file, densenet14):
    model, report = build_model("densenet121", f"chexnet:{chexnet_file}", num_classes=3)
    assert_backbone_from(model, report, densenet14)
    assert model.input_spec == "imagenet"
    assert any("14 outputs" in note for note in report.notes)
    assert any("num_batches_tracked" in note for note in report.notes)


def test_chexnet_densenet_into_resnet50_is_architecture_mismatch(chexnet_file):
    with pytest.raises(CXRError, match="architecture mismatch.*densenet121.*backbone=resnet50"):
        build_model("resnet50", f"chexnet:{chexnet_file}", num_classes=3)


def test_resnet50_checkpoint_with_wrapper_prefixes(tmp_path):
    state = random_state("resnet50", 14)
    path = tmp_path / "resnet_chexnet.pth.tar"
    torch.save({"state_dict": {"module.resnet50." + k: v for k, v in state.items()}}, path)
    model, report = build_model("resnet50", f"chexnet:{path}", num_classes=2)
    assert_backbone_from(model, report, state)


def test_missing_and_unexpected_keys_are_errors(tmp_path, densenet14):
    checkpoint = chexnet_checkpoint(densenet14)
    missing = "module.densenet121.features.denseblock2.denselayer3.conv.2.weight"
    del checkpoint["state_dict"][missing]
    torch.save(checkpoint, tmp_path / "missing.pth.tar")
    with pytest.raises(CXRError, match=r"1 backbone key\(s\) missing.*denseblock2\.denselayer3\.conv2\.weight"):
        build_model("densenet121", f"chexnet:{tmp_path / 'missing.pth.tar'}", num_classes=3)

    checkpoint = chexnet_checkpoint(densenet14)
    checkpoint["state_dict"]["module.densenet121.features.extra.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "extra.pth.tar")
    with pytest.raises(CXRError, match="does not have: features.extra.weight"):
        build_model("densenet121", f"chexnet:{tmp_path / 'extra.pth.tar'}", num_classes=3)


def test_xrv_densenet_from_torchxrayvision_cache(homes):
    state = random_state("densenet121", 18, in_channels=1)
    cache = homes / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    torch.save({**state, "op_threshs": torch.rand(18)}, cache / XRV_FILES["densenet121-res224-all"])
    model, report = build_model("densenet121", "torchxrayvision:densenet121-res224-all", num_classes=3)
    assert model.input_spec == "xrv" and model.features.conv0.in_channels == 1
    assert_backbone_from(model, report, state)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_xrv_resnet50_at_path(tmp_path):
    """torchxrayvision's ResNet wraps torchvision's under `model.`; its conv1 takes 1 channel."""
    state = random_state("resnet50", 18, in_channels=1)
    path = tmp_path / XRV_FILES["resnet50-res512-all"]
    torch.save({"model." + k: v for k, v in state.items()}, path)
    model, report = build_model("resnet50", f"torchxrayvision:resnet50-res512-all@{path}", num_classes=2)
    assert model.input_spec == "xrv" and model.conv1.in_channels == 1
    assert_backbone_from(model, report, state)


def test_xrv_pickled_whole_model(tmp_path):
    """torchxrayvision's DenseNet files are pickled modules: their state_dict is taken."""
    module = torchvision.models.densenet121(num_classes=18)
    module.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    path = tmp_path / "xrv.pt"
    torch.save(module, path)
    model, report = build_model("densenet121", f"torchxrayvision:densenet121-res224-nih@{path}", num_classes=3)
    assert_backbone_from(model, report, module.state_dict())


def test_xrv_pickle_needing_a_missing_module_says_what_to_install(tmp_path, monkeypatch):
    fake = types.ModuleType("fake_torchxrayvision")

    class DenseNet(nn.Module):
        pass

    DenseNet.__module__, DenseNet.__qualname__ = fake.__name__, "DenseNet"
    fake.DenseNet = DenseNet
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    torch.save(DenseNet(), tmp_path / "xrv.pt")
    monkeypatch.delitem(sys.modules, fake.__name__)
    with pytest.raises(CXRError, match="needs the module 'fake_torchxrayvision'.*install"):
        load_state_dict_file(tmp_path / "xrv.pt", allow_pickle=True)


def test_xrv_errors(homes):
    with pytest.raises(CXRError) as err:
        build_model("densenet121", "torchxrayvision:densenet121-res224-nih", num_classes=3)
    expected = homes / ".torchxrayvision" / "models_data" / XRV_FILES["densenet121-res224-nih"]
    assert str(expected) in str(err.value) and "@PATH" in str(err.value)
    with pytest.raises(CXRError, match="unknown name"):
        build_model("densenet121", "torchxrayvision:densenet999", num_classes=3)
    with pytest.raises(CXRError, match="is a resnet50 model, but backbone=densenet121"):
        build_model("densenet121", "torchxrayvision:resnet50-res512-all", num_classes=3)


def test_cxrlib_checkpoint_round_trip(tmp_path):
    """A ChestX-ray14-pretrained model (14 outputs) saved by cxrlib seeds a 3-class model; load_checkpoint
    restores the whole trained model, head included."""
    pretrained, _ = build_model("densenet121", "none", num_classes=14)
    path = tmp_path / "chestxray14.pt"
    torch.save({"state_dict": pretrained.state_dict(), "backbone": "densenet121", "num_classes": 14,
                "classes": [f"finding{i}" for i in range(14)], "input_spec": pretrained.input_spec}, path)  # as loop.fit

    model, report = build_model("densenet121", f"file:{path}", num_classes=3)
    assert_backbone_from(model, report, pretrained.state_dict())
    assert model.classifier.out_features == 3

    restored, meta = load_checkpoint(path)
    assert meta["classes"][0] == "finding0" and meta["input_spec"] == "imagenet"
    pretrained.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), pretrained(x))


def test_transfer_check_shows_loaded_not_random(tmp_path, chexnet_file):
    model, _ = build_model("densenet121", f"chexnet:{chexnet_file}", num_classes=3)
    check = transfer_check(model, f"chexnet:{chexnet_file}")
    assert len(check) > 300 and (check.max_abs_diff_to_file == 0).all()
    assert (check.mean_abs_diff_to_random_init > 0).all()
    model.features.conv0.weight.data.normal_()  # a layer that was not transferred shows up
    check = transfer_check(model, f"chexnet:{chexnet_file}").set_index("tensor")
    assert check.loc["features.conv0.weight", "max_abs_diff_to_file"] > 0


def test_bare_state_dict_file_and_xrv_input_inferred(tmp_path):
    state = random_state("densenet121", 18, in_channels=1)
    torch.save(state, tmp_path / "bare.pt")
    model, report = build_model("densenet121", f"file:{tmp_path / 'bare.pt'}", num_classes=2)
    assert model.input_spec == "xrv"
    assert_backbone_from(model, report, state)


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(CXRError, match="backbone='vgg16'"):
        build_model("vgg16", "none", num_classes=3)
    with pytest.raises(CXRError, match="num_classes=1"):
        build_model("resnet50", "none", num_classes=1)
    with pytest.raises(CXRError, match="weights='timm'"):
        build_model("resnet50", "timm", num_classes=3)
    with pytest.raises(CXRError, match="after the colon"):
        build_model("resnet50", "chexnet:", num_classes=3)
    with pytest.raises(CXRError, match="nowhere.pth does not exist"):
        build_model("resnet50", f"file:{tmp_path / 'nowhere.pth'}", num_classes=3)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CXRError, match="junk.pth is not a plain weights file"):
        build_model("resnet50", f"file:{tmp_path / 'junk.pth'}", num_classes=3)
    torch.save(torchvision.models.resnet50(), tmp_path / "pickled.pth")
    with pytest.raises(CXRError, match="not a plain weights file.*torchvision.models.resnet.ResNet"):
        build_model("resnet50", f"file:{tmp_path / 'pickled.pth'}", num_classes=3)


FROZEN = {
    ("resnet50", "stage2"): (["conv1.", "bn1.", "layer1.", "layer2."], ["layer3.", "layer4.", "fc."]),
    ("densenet121", "stage2"): (
        ["features.conv0.", "features.norm0.", "features.denseblock2.", "features.transition2."],
        ["features.denseblock3.", "features.transition3.", "features.norm5.", "classifier."],
    ),
    ("densenet121", "stage4"): (["features.denseblock4.", "features.norm5."], ["classifier."]),
}


@pytest.mark.parametrize("backbone,freeze", list(FROZEN))
def test_freeze_stages(backbone, freeze):
    model, report = build_model(backbone, "none", num_classes=3, freeze=freeze)
    frozen_prefixes, trainable_prefixes = FROZEN[backbone, freeze]
    for name, param in model.named_parameters():
        if name.startswith(tuple(frozen_prefixes)):
            assert not param.requires_grad, name
        if name.startswith(tuple(trainable_prefixes)):
            assert param.requires_grad, name
    assert report.trainable == [n for n, p in model.named_parameters() if p.requires_grad]
    bn = model.bn1 if backbone == "resnet50" else model.features.norm0
    train_mode(model)
    assert model.training and not bn.training  # frozen BatchNorm keeps its statistics


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121"])
def test_freeze_backbone_trains_only_the_head(backbone):
    model, report = build_model(backbone, "none", num_classes=2, freeze="backbone")
    head = HEADS[backbone]
    assert report.trainable == [head + "weight", head + "bias"]
    total, trainable = count_parameters(model)
    assert trainable == sum(p.numel() for p in getattr(model, head[:-1]).parameters()) < total
    with pytest.raises(CXRError, match="freeze='stage9'"):
        build_model(backbone, "none", num_classes=2, freeze="stage9")
