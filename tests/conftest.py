"""Shared fixtures. Tests that read the real data skip cleanly when ../shared/data is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cxrlib cache and synthetic-data folders."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("CXRLIB_CACHE", str(base / "cxrlib-cache"))
    monkeypatch.setenv("CXRLIB_DATA", str(base / "cxrlib-data"))


@pytest.fixture
def real_data() -> Path:
    """../shared/data (CoronaHack + ieee8023), or a clean skip."""
    root = SHARED_DATA.resolve()
    if not (root / "coronahack" / "Chest_xray_Corona_Metadata.csv").is_file():
        pytest.skip(f"real data not present at {root}")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot to OpenMP waits when another process
    shares the cores (a parallel region waits for its slowest, descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A model.pt as loop.fit writes it (metadata + state_dict), untrained: the tests that take it need its format
    only."""
    from cxrlib import config, models

    model, _ = models.build_model("resnet50", "none", 3)
    path = tmp_path_factory.mktemp("run") / "model.pt"
    torch.save({"backbone": "resnet50", "num_classes": 3, "classes": list(config.classes("multiclass")),
                "input_spec": model.input_spec, "task": "multiclass", "image_size": 32, "config": {},
                "state_dict": model.state_dict()}, path)
    return path
