"""Packaging metadata: one version, SPDX license with its file, typed package, true lower bounds."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import flax
from flax import nnx
import jax

import groupopt

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _version(s: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", s)[:3])


def test_one_version_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "groupopt.__version__"}
    assert importlib.metadata.version("groupopt") == groupopt.__version__  # the installed metadata agrees


def test_license_and_typed():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # SPDX replaces them
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "groupopt" / "py.typed").exists()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["groupopt"] == ["py.typed"]


def test_lower_bounds_are_the_tested_ones():
    """The floors checked in a fresh venv (jax 0.10.1: sharding and torch-equal float32 numbers; flax 0.12.2);
    the installed versions satisfy them."""
    bounds = dict(re.match(r"([\w-]+)>=([\d.]+)", d).groups() for d in PYPROJECT["project"]["dependencies"])
    assert bounds == {"jax": "0.10.1", "flax": "0.12.2", "optax": "0.2.5", "numpy": "2.0", "orbax-checkpoint": "0.11.17"}
    assert _version(jax.__version__) >= _version(bounds["jax"]) and _version(flax.__version__) >= _version(bounds["flax"])
    assert hasattr(nnx.Variable, "get_value") and hasattr(nnx.Variable, "set_value")
    assert "mkdocstrings[python]" in " ".join(PYPROJECT["project"]["optional-dependencies"]["docs"])
