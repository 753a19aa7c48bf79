"""The Pareto frontier is a pure function: these pin its definition (ties, NaN, directions, degenerate inputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from petlbench.report.pareto import frontier_mask

NAN = math.nan


def front(x: list[float], y: list[float], **directions: bool) -> list[bool]:
    return [bool(v) for v in frontier_mask(x, y, **directions)]


def test_default_is_less_x_more_y() -> None:
    # memory (x, less is better) vs accuracy (y, more is better)
    assert front([1, 2, 3, 4], [0.5, 0.8, 0.7, 0.9]) == [True, True, False, True]


def test_single_point_is_the_front() -> None:
    assert front([5.0], [0.3]) == [True]


def test_empty_input() -> None:
    assert front([], []) == []


def test_one_point_dominating_all_others() -> None:
    assert front([1, 2, 3, 4], [0.9, 0.8, 0.9, 0.1]) == [True, False, False, False]


def test_exact_ties_are_all_kept() -> None:
    assert front([1, 1, 2], [0.5, 0.5, 0.4]) == [True, True, False]


def test_equal_x_keeps_only_the_better_y() -> None:
    assert front([1, 1], [0.5, 0.6]) == [False, True]


def test_equal_y_keeps_only_the_smaller_x() -> None:
    assert front([1, 2], [0.5, 0.5]) == [True, False]


def test_nan_is_never_on_the_front_and_dominates_nothing() -> None:
    # the NaN-accuracy point sits at the smallest memory; it must neither join nor knock out the others
    assert front([0.5, 1, 2], [NAN, 0.5, 0.7]) == [False, True, True]
    assert front([NAN, 1], [0.9, 0.5]) == [False, True]
    assert front([NAN], [NAN]) == [False]


def test_maximise_x_minimise_y() -> None:
    # throughput (x, more is better) vs trainable params (y, less is better)
    assert front([100, 200, 150], [10, 20, 30], maximize_x=True, maximize_y=False) == [True, True, False]


def test_minimise_both() -> None:
    assert front([1, 2, 3], [3, 1, 2], maximize_x=False, maximize_y=False) == [True, True, False]


def test_maximise_both() -> None:
    assert front([1, 2, 3], [3, 1, 2], maximize_x=True, maximize_y=True) == [True, False, True]


def test_accepts_arrays_and_returns_bools() -> None:
    mask = frontier_mask(np.array([2.0, 1.0]), np.array([1.0, 1.0]))
    assert mask.dtype == np.bool_
    assert mask.tolist() == [False, True]


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="same length"):
        frontier_mask([1, 2], [1])
