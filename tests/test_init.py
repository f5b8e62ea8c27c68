"""The curated top level (`hf_r2/__init__.py`): its three lists of public names (the lazy-import table, `__all__`
and the TYPE_CHECKING re-exports) agree, and every public name resolves to the object its module defines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import hf_r2

INIT = Path(hf_r2.__file__)


def _type_checking_imports(source: str) -> dict[str, str]:
    """`{name: ".module"}` of the `from .module import name as name` lines under `if TYPE_CHECKING:`."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1, ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"re-export as `{alias.name} as {alias.name}`"
                    found[alias.name] = "." + stmt.module
    return found


def test_all_is_the_lazy_table():
    assert hf_r2.__all__ == list(hf_r2._LAZY)
    assert len(set(hf_r2.__all__)) == len(hf_r2.__all__)


def test_type_checking_block_matches_the_lazy_table():
    assert _type_checking_imports(INIT.read_text(encoding="utf-8")) == hf_r2._LAZY


def test_the_checker_reads_a_type_checking_block():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import R2Config as R2Config\n"
    assert _type_checking_imports(source) == {"R2Config": ".config"}


@pytest.mark.parametrize("name", hf_r2.__all__)
def test_every_public_name_resolves_to_its_module_object(name):
    module = importlib.import_module(hf_r2._LAZY[name], "hf_r2")
    assert getattr(hf_r2, name) is getattr(module, name)
    assert name in dir(hf_r2)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_r2.nope  # noqa: B018
