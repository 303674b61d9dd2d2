"""The source tree's shape: no import cycle (function-level imports counted), no function over 100 lines."""

from __future__ import annotations

from helpers import load_script


def _checker():  # type: ignore[no-untyped-def]
    return load_script("check_structure")


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
