"""The source tree's shape: no import cycle (function-level imports counted), no function over 100 lines."""

from __future__ import annotations

import importlib.util

from helpers import REPO


def _checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_structure", REPO / "scripts" / "check_structure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_in_src() -> None:
    check = _checker()
    graph = check.import_graph()
    assert "coreunits._core.incremental" in graph["coreunits._core.evaluation"]  # function-level imports seen
    assert check.find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    check = _checker()
    assert check.find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_100_lines() -> None:
    assert _checker().long_functions() == []
