"""What the wheel promises besides code: the package's type hints (PEP 561), and the type check make test runs."""

import sys
from pathlib import Path

import pytest

import tsm_lightning

ROOT = Path(tsm_lightning.__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # tomli: Python 3.10


def test_the_wheel_ships_py_typed():
    assert (ROOT / "tsm_lightning" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["tsm_lightning"]


def test_make_test_type_checks_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "mypy" in config["tool"]
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/mypy tsm_lightning" in recipe
