"""Each chapter's paired .py (what people edit) and .ipynb (what the book executes) hold the same cells."""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))


def cells(path: Path) -> list[tuple[str, str, list[str]]]:
    """(type, source, tags) of every cell as jupytext reads the file: tags too, since they say which cells are
    parameters and which outputs nbval compares; outputs and other metadata left out."""
    return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in jupytext.read(path).cells]


def test_every_chapter_is_paired():
    assert CHAPTERS and CHAPTERS == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_py_and_ipynb_hold_the_same_code(chapter):
    py, ipynb = cells(NOTEBOOKS / f"{chapter}.py"), cells(NOTEBOOKS / f"{chapter}.ipynb")
    differ = [i for i, (a, b) in enumerate(zip(py, ipynb)) if a != b]
    assert len(py) == len(ipynb) and not differ, (
        f"{chapter}.py and .ipynb differ (cell counts {len(py)} vs {len(ipynb)}, first differing cell "
        f"{differ[:1]}): run `jupytext --sync notebooks/{chapter}.py`"
    )


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_parameters_cxrlib_reads_are_those_papermill_injects(chapter):
    """book.chapter_names is the one reader of a chapter's parameters cell (the chapters' checks and the run
    matrix's papermill calls both use it): it must see the names papermill sees."""
    import papermill

    from cxrlib.book import chapter_names

    assert set(chapter_names(chapter)[0]) == set(papermill.inspect_notebook(str(NOTEBOOKS / f"{chapter}.ipynb")))


NBVAL_TAGS = {"parameters", "nbval-check-output", "nbval-ignore-output"}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_code_cell_says_whether_nbval_compares_it(chapter):
    """`pytest --nbval` as typed (strict) compares every code cell not tagged nbval-ignore-output. Only what is the
    same on every x86 CPU may be compared: the parameters (no output) and the cells written for it
    (nbval-check-output); the rest trains or plots, in bf16 where the CPU has it, so it is tagged ignore and strict
    and --nbval-lax check the same cells."""
    untagged = [i for i, (kind, source, tags) in enumerate(cells(NOTEBOOKS / f"{chapter}.py"))
                if kind == "code" and not NBVAL_TAGS & set(tags)]
    assert not untagged, f"{chapter}.py: code cells {untagged} carry none of {sorted(NBVAL_TAGS)}"
