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


def test_the_public_names_are_listed_once_for_run_time_and_once_for_static_tools():
    # __all__ is derived from the lazy table; the TYPE_CHECKING imports (what static tools see) must name the same
    # things from the same modules, and each name must load.
    import ast

    tree = ast.parse((ROOT / "tsm_lightning" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    static = {alias.name: node.module for node in block.body for alias in node.names}
    assert static == tsm_lightning._LAZY
    assert set(tsm_lightning.__all__) == {"__version__", *tsm_lightning._LAZY}
    for name, module in tsm_lightning._LAZY.items():
        value = getattr(tsm_lightning, name)
        assert value is getattr(__import__(module, fromlist=[name]), name), name
