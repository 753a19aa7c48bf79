"""The registry of report views: every part of `petlbench report`, in the order the report lays them out.

Adding a view: a module in this package holding a `GroupView` (drawn once per group) or `DocumentView` (once,
before or after the groups) subclass, and one entry in `VIEWS` below. `--plot`'s choices, the figure files a new
report removes and the layout all derive from `VIEWS`. Light to import: views import pandas and matplotlib inside
`render`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Final, cast

from petlbench.errors import ConfigError
from petlbench.report.views.breakdown import Breakdown
from petlbench.report.views.failures import Failures
from petlbench.report.views.fits import Fit
from petlbench.report.views.fronts import Pareto
from petlbench.report.views.memory_batch import MemoryBatch
from petlbench.report.views.overview import Overview
from petlbench.report.views.timelines import Timeline
from petlbench.report.views.view import (
    DocumentView,
    GroupView,
    Progress,
    Rendered,
    ReportContext,
    Section,
    View,
)
from petlbench.report.views.vtab_tables import Vtab

__all__ = [
    "ALL",
    "VIEWS",
    "DocumentView",
    "GroupView",
    "Progress",
    "Rendered",
    "ReportContext",
    "Section",
    "View",
    "figure_prefixes",
    "plot_choices",
    "plot_enum",
    "select",
]

ALL: Final = "all"


def build_registry(views: Iterable[type[View]]) -> Mapping[str, type[View]]:
    """name → view class, in layout order; refuses a bad or repeated name, a `part_of` that names no selectable view
    and a figure prefix two views share (each removes the other's figures)."""
    registry: dict[str, type[View]] = {}
    prefixes: dict[str, str] = {}
    for view in views:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", view.name) or view.name == ALL:
            raise TypeError(f"view name {view.name!r}: lower-case letters, digits and '-', not {ALL!r}")
        if view.name in registry:
            raise TypeError(f"view name {view.name!r} is registered twice")
        for prefix in view.figures:
            if prefix in prefixes:
                raise TypeError(f"figure prefix {prefix!r} of view {view.name!r} is view {prefixes[prefix]!r}'s too")
            prefixes[prefix] = view.name
        registry[view.name] = view
    for view in registry.values():
        if view.part_of is not None and not (view.part_of in registry and registry[view.part_of].selectable):
            raise TypeError(f"view {view.name!r}: part_of {view.part_of!r} is no selectable view")
    return MappingProxyType(registry)


VIEWS: Final = build_registry([Overview, Pareto, MemoryBatch, Fit, Breakdown, Timeline, Vtab, Failures])


def plot_choices() -> tuple[str, ...]:
    """`--plot`'s values: every selectable view, then 'all'."""
    return (*(name for name, view in VIEWS.items() if view.selectable), ALL)


def plot_enum() -> type[Enum]:
    """`--plot`'s values as an Enum, the type typer shows and checks choices with."""
    return cast("type[Enum]", Enum("Plot", [(name, name) for name in plot_choices()], type=str))


def figure_prefixes() -> tuple[str, ...]:
    """The file-name prefixes of every view's figures: what a new report removes from its folder first."""
    return tuple(prefix for view in VIEWS.values() for prefix in view.figures)


def select(plots: Collection[str]) -> list[View]:
    """The views a report with `--plot plots` draws, in layout order: those named (with the views that are
    `part_of` them), and every view that is not a `--plot` choice. ConfigError for an unknown name."""
    choices = plot_choices()
    wanted = set(choices) if ALL in plots else set(plots)
    unknown = sorted(wanted - set(choices))
    if unknown or not wanted:
        raise ConfigError(f"--plot: unknown {', '.join(unknown) or '(none)'}; valid: {', '.join(choices)}")
    return [
        view()
        for name, view in VIEWS.items()
        if not view.selectable or name in wanted or (view.part_of is not None and view.part_of in wanted)
    ]
