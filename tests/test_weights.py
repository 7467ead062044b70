"""The `weights` parameter is parsed once (cxrlib.weights.Weights): scheme, argument, file, family and words."""

from pathlib import Path

import pytest

from cxrlib.config import RunConfig
from cxrlib.errors import CXRError
from cxrlib.weights import Weights


@pytest.mark.parametrize("spec, family, label, folder", [
    ("none", "random", "random init", "none"),
    ("imagenet", "imagenet", "ImageNet", "imagenet"),
    ("file:runs/pre/s0/model.pt", "chest_xray", "chest X-ray (file: s0)", "file-s0"),
    ("chexnet:/w/m-chexnet.pth.tar", "chest_xray", "chest X-ray (chexnet: m-chexnet.pth)", "chexnet-m-chexnet.pth"),
    ("torchxrayvision:densenet121-res224-all@/w/x.pth", "chest_xray", "chest X-ray (torchxrayvision: densenet121-res224-all)",
     "torchxrayvision-densenet121-res224-all"),
])
def test_each_scheme_reads_the_same_everywhere(spec, family, label, folder):
    w = Weights.parse(spec)
    assert (w.family, w.label, w.folder_part) == (family, label, folder)
    assert RunConfig(weights=spec).run_name() == f"multiclass-ce-resnet50-{folder}-s0"


def test_paths_and_names():
    assert Weights.parse("file:/a/model.pt").path == Path("/a/model.pt")
    assert Weights.parse("torchxrayvision:all").path is None and Weights.parse("torchxrayvision:all").name == "all"
    assert Weights.parse("torchxrayvision:all@/w/x.pth").path == Path("/w/x.pth")
    assert Weights.parse("imagenet").path is None


@pytest.mark.parametrize("spec, message", [("bogus", "use one of none, imagenet"), ("file:", "after the colon"),
                                           ("imagenet:x", "takes nothing"), ("chexnet: ", "after the colon")])
def test_a_bad_spec_is_named(spec, message):
    with pytest.raises(CXRError, match=message):
        Weights.parse(spec)
