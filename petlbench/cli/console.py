"""Where the command line writes: one stdout and one stderr console, one-line errors, one progress bar."""

from __future__ import annotations

import datetime
import os
from typing import Final, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from petlbench.errors import PetlbenchError


def _console(stderr: bool = False) -> Console:
    """Rich console; soft_wrap keeps every message on one line, and logs/pipes get room for the tables."""
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


out = _console()
err = _console(stderr=True)


def error_line(line: str) -> Text:
    return Text.assemble(("error: ", "bold red"), line)


# Problems printed by one failing command; the rest are counted (a generated file can have hundreds).
MAX_PROBLEM_LINES: Final = 10


def problem_lines(message: str, limit: int = MAX_PROBLEM_LINES) -> list[str]:
    """One line per problem, at most `limit`, then '... N more problems'."""
    lines = message.splitlines() or [message]
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... {len(lines) - limit} more problems (fix these and run again to see them)"]


def fail(exc: PetlbenchError) -> NoReturn:
    """Print the error, one line per problem (at most MAX_PROBLEM_LINES), and exit with its code (2:
    configuration, 1: findings)."""
    out.file.flush()  # what was printed before the error comes before it in a combined log
    for line in problem_lines(str(exc)):
        err.print(error_line(line))
    raise typer.Exit(exc.exit_code)


class SeededEta(ProgressColumn):
    """Time left: from the runs finished so far, and before the first one from `seed_s` per run (a task field:
    the mean duration of the runs already stored, or a rough constant), so the first run does not show -:--:--."""

    def render(self, task: Task) -> Text:
        left = task.remaining
        if left is None or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        elapsed = task.elapsed or 0.0
        per_run = elapsed / task.completed if task.completed else float(task.fields.get("seed_s") or 0.0)
        parallel = max(1, int(task.fields.get("parallel") or 1))
        if not per_run:
            return Text("-:--:--", style="progress.remaining")
        seconds = max(0.0, left * per_run / (1 if task.completed else parallel) - (0 if task.completed else elapsed))
        guess = "~" if not task.completed else ""
        return Text(guess + str(datetime.timedelta(seconds=int(seconds))), style="progress.remaining")


def progress_bar(label: str | None = None, eta: bool = False, console: Console | None = None) -> Progress:
    """The one progress bar of every long command: spinner, n/total, bar, the current task's text, elapsed (+ eta)."""
    columns: list[ProgressColumn | str] = [SpinnerColumn()]
    if label:
        columns.append(TextColumn(label))
    columns += [MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("eta"), SeededEta()]
    return Progress(*columns, console=console or out, transient=True)
