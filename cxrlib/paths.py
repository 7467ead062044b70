"""Where things are in the repository (cxrlib is installed editable, `pip install -e .`, so the package sits in it):
the one definition the library's modules share."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
NOTEBOOKS = ROOT / "notebooks"  # the chapters' sources (paired .py and .ipynb)
GENERATED = ROOT / "book" / "generated"  # executed or rendered chapters, read by the book build
