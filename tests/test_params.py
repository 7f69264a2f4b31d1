"""tfcbir.params and tfcbir.registry: checks of one value, and names looked up in a registry."""

from __future__ import annotations

import pytest

from tfcbir import UserError
from tfcbir.params import Param, check_value
from tfcbir.registry import Registry


def test_numbers_must_be_finite_also_inside_lists():
    scale = Param(float, 1.0, min=0)
    assert check_value(3, scale, "s") == 3.0
    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"^s: {value} is not a finite number; give a number"):
            check_value(value, scale, "s")
    mean = Param(list, [0.5, 0.5], item=float, length=2)
    assert check_value([0.25, 1], mean, "m") == [0.25, 1]
    with pytest.raises(UserError, match=r"^m\[1\]: nan is not a finite number; give a list of 2"):
        check_value([0.5, float("nan")], mean, "m")


def test_registry_names_that_are_not_strings_are_unknown_names():
    registry = Registry("thing")
    registry.register("alpha", "math:sqrt")
    assert "alpha" in registry and ["alpha"] not in registry and {"alpha": 1} not in registry
    assert registry.get("alpha").builder(16.0) == 4.0
    for name, shown in ((["alpha"], "['alpha']"), ({"alpha": 1}, "{'alpha': 1}"), (3, "3")):
        with pytest.raises(UserError) as caught:
            registry.get(name, "x.name")
        assert str(caught.value) == f"x.name: {shown} is not one of alpha"
