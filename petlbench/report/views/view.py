"""What a report view is, and what it is given: the report's context and, for a group view, one group's points.

A view is a part of the report: the overview at the top, a figure with its table per group (Pareto fronts, memory
vs batch size, ...), or a table at the end (VTAB-1k, failed runs). It declares where it goes (`place`), whether
`--plot` selects it (`selectable`, `part_of`), the file-name prefixes of its figures (`figures`: a new report
removes old figures by them) and, for a group view, which groups and rows it needs (`groups`, `needs`); the report
skips it, with a note, for a group that lacks them. `render` returns its blocks and the figures it wrote.

Importing this module (the CLI does, for `--plot`'s choices) imports neither pandas nor matplotlib.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, TypeAlias

from petlbench.report.document import Block, Image
from petlbench.report.frame import Group
from petlbench.system import safeio

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from petlbench.report.style import PaperFormat

log = logging.getLogger(__name__)

# head: before the groups, once; group: once per group; tail: after the groups, once
Place: TypeAlias = Literal["head", "group", "tail"]
# which groups a group view describes: estimates only (what fits), measurements only, or both
Groups: TypeAlias = Literal["any", "predicted", "measured"]
# on_progress(done, total, label): before each step (label: the step about to run), and once at the end
Progress: TypeAlias = Callable[[int, int, str], None]


@dataclass
class Rendered:
    """What a view wrote: its blocks in order, the PNGs it saved (each has an SVG beside it), and counts the caller
    may report (the VTAB view: `vtab_methods`)."""

    blocks: list[Block] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def image(self, png: Path, alt: str) -> None:
        """A saved figure, shown here."""
        self.figures.append(png)
        self.blocks.append(Image(png.stem, alt))


@dataclass(frozen=True)
class Section:
    """One group as a group view sees it: its number in the report, its rows and its points (seeds averaged)."""

    number: int
    group: Group
    pts: pd.DataFrame


@dataclass
class ReportContext:
    """Everything a view may read, and the one place it writes notes and figures to.

    `batch_size` is the user's `--batch-size` (None: each view chooses); `paper` the paper format (None: screen
    sizes); `figure_prefixes` every registered view's figure prefixes (`save` refuses any other file name).
    """

    paths: Sequence[Path]
    rows: pd.DataFrame
    groups: list[Group]
    split_by: list[str]
    out: Path
    figure_prefixes: tuple[str, ...]
    batch_size: int | None = None
    paper: PaperFormat | None = None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Something the reader should know that the document does not say (a skipped figure); the CLI prints it."""
        self.notes.append(text)

    @functools.cached_property
    def statuses(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.rows["status"].value_counts().sort_index().items()}

    @functools.cached_property
    def timelines(self) -> dict[str, Path]:
        """run_id → the timeline stored beside the row, for the rows that have one."""
        from petlbench.report.explain import timelines_for

        return timelines_for(self.paths, self.rows)

    def save(self, fig: Figure, stem: str) -> Path:
        """PNG + SVG; in paper format also a PDF with TrueType fonts (survive printing and editing). Returns the PNG."""
        from petlbench.report.style import PAPER_RC, paper_active

        if not stem.startswith(tuple(f"{prefix}-" for prefix in self.figure_prefixes)):
            # a programming error: old figures of this name would never be removed
            raise TypeError(f"figure {stem!r}: its prefix is no view's `figures` (petlbench/report/views/)")
        png = self.out / f"{stem}.png"
        paper = paper_active()
        # each file under a temp name, renamed when whole: an interrupt never leaves a cut figure under its name
        with safeio.atomic_writer(png) as handle:
            fig.savefig(handle, format="png", dpi=300 if paper else 110)
        with safeio.atomic_writer(self.out / f"{stem}.svg") as handle:
            fig.savefig(handle, format="svg", metadata={"Date": None})
        if paper:
            import matplotlib

            with matplotlib.rc_context(PAPER_RC), safeio.atomic_writer(self.out / f"{stem}.pdf") as handle:
                fig.savefig(handle, format="pdf", metadata={"CreationDate": None})  # fonts are embedded at save time
        log.info("wrote %s (+ .svg%s)", png, " + .pdf" if paper else "")
        return png


class View(ABC):
    """A part of the report. Subclass `GroupView` or `DocumentView`, and add the class to `VIEWS`."""

    name: ClassVar[str]  # the registry key, and the `--plot` value when selectable
    title: ClassVar[str]  # how a note names it: '<group>: no <title> (<reason>)'
    place: ClassVar[Place]
    selectable: ClassVar[bool] = True  # a `--plot` choice; False: in every report
    part_of: ClassVar[str | None] = None  # also drawn when this view is selected (the fit view with memory-batch)
    figures: ClassVar[tuple[str, ...]] = ()  # file-name prefixes of its figures: '<prefix>-...-<group slug>'

    def check(self, ctx: ReportContext) -> None:  # noqa: B027 (a hook: most views accept every option)
        """Refuse, with a ConfigError, an option this view cannot honour for any row; before anything is drawn."""


class GroupView(View):
    """A view drawn once per group that has an ok run."""

    place: ClassVar[Place] = "group"
    groups: ClassVar[Groups] = "any"
    # column → what the note calls it: some ok row of the group must have a value in it ('a breakdown')
    needs: ClassVar[Mapping[str, str]] = {}

    def covers(self, group: Group) -> bool:
        """Whether this view describes such a group at all (if not, it is left out without a note)."""
        if self.groups == "any":
            return True
        return group.predicted == (self.groups == "predicted")

    def lacking(self, ctx: ReportContext, section: Section) -> str | None:
        """Why this group cannot be drawn ('no ok run has a breakdown'), or None."""
        ok = section.group.rows[section.group.rows["status"] == "ok"]
        for column, what in self.needs.items():
            if column not in ok or not ok[column].notna().any():
                return f"no ok run has {what}"
        return None

    def placeholder(self, section: Section, reason: str) -> list[Block]:
        """What the document says in the view's place when it is skipped (default: nothing; the note suffices)."""
        return []

    @abstractmethod
    def render(self, ctx: ReportContext, section: Section) -> Rendered: ...


class DocumentView(View):
    """A view drawn once, before (`head`) or after (`tail`) the groups."""

    place: ClassVar[Place] = "tail"
    selectable: ClassVar[bool] = False

    def applies(self, ctx: ReportContext) -> bool:
        """Whether the report has anything for this view (the VTAB tables: VTAB-1k rows); if not, left out."""
        return True

    @abstractmethod
    def render(self, ctx: ReportContext) -> Rendered: ...
