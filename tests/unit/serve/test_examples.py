"""The example scripts at least compile (the PyRIT one runs in the integration tier)."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["pyrit_target.py"])
def test_example_compiles(name):
    py_compile.compile(str(Path(__file__).parents[3] / "examples" / name), doraise=True)
