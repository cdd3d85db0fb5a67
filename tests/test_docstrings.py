"""Every example in prunekit's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import prunekit

PACKAGE = Path(prunekit.__file__).parent
MODULES = sorted(".".join(("prunekit", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if ">>> " in p.read_text())


def test_examples_are_found():
    assert {"prunekit.graphs.update", "prunekit.typedmap", "prunekit.sparse.topkast"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run with -s to see)"
