"""Browser check of the built book: every chapter renders in headless Chromium with its tables and
figures. Run by `make check-book` after `make book` (marker `book`); skipped when nothing is built."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=5000",
]
# page -> (min tables, min figures) that the chapter must show
CHAPTERS = {
    "book/intro.html": (1, 0),
    "book/generated/01_data_analysis.html": (3, 4),
    "book/generated/02_chexnet_transfer.html": (1, 1),
    "book/generated/03_finetune.html": (1, 3),
    "book/generated/04_error_analysis.html": (4, 2),
    "book/generated/05_results.html": (1, 1),
    "book/reproduce.html": (0, 0),
    "book/references.html": (0, 0),
}

pytestmark = pytest.mark.book


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `make check-book` installs Debian's chromium")
    return exe


def _render(page: Path, *extra: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("page,minimum", CHAPTERS.items(), ids=list(CHAPTERS))
def test_chapter_renders(page, minimum, tmp_path):
    path = HTML / page
    if not (HTML / "index.html").is_file():
        pytest.skip("the book is not built: run `make book` first")
    assert path.is_file(), f"{page} missing from the built book"
    dom = _render(path, "--dump-dom", tmp=tmp_path).stdout
    assert "</article>" in dom or "bd-article" in dom, f"{page}: no article in the rendered page"
    for error in ("Traceback (most recent call last)", "Error in cell", "ModuleNotFoundError"):
        assert error not in dom, f"{page} shows an error: {error}"
    tables, figures = minimum
    n_tables = dom.count("<table")
    n_figures = dom.count("<img")
    assert n_tables >= tables, f"{page}: {n_tables} tables rendered, expected >= {tables}"
    assert n_figures >= figures, f"{page}: {n_figures} figures rendered, expected >= {figures}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / (Path(page).stem + ".png")
    _render(path, f"--screenshot={shot}", "--window-size=1280,2400", tmp=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
