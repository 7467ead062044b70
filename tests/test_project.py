"""Project-level checks: the two dependency lists agree, notebooks are paired."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
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
