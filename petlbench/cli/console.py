"""Where the command line writes: one stdout and one stderr console, one-line errors, one progress bar."""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import IO, Final, NoReturn, TextIO, cast

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
from petlbench.fmt import shown_path


class Stream:
    """sys.stdout (or sys.stderr) as the consoles write to it, looked up at each write (a test runner swaps it).

    A write that fails ends the output, never the command: a reader that closed the pipe (`petlbench run | head
    -1`: EPIPE) or a full disk (`> /dev/full`: ENOSPC) stops what is printed, and a sweep goes on storing every
    run (docs/guarantees.md). The descriptor is pointed at /dev/null then, so the interpreter's last flush is
    quiet. Text the stream's encoding cannot carry (a path with undecodable bytes) is written escaped.
    """

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr
        self._failed_on: object = None  # the stream that failed (another one, swapped in later, is written to)
        self._error: OSError | None = None

    @property
    def _stream(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    @property
    def failed(self) -> OSError | None:
        """Why the current stream stopped taking output (None: it did not)."""
        return self._error if self._failed_on is self._stream else None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:
                    encoding = getattr(self._stream, "encoding", None) or "utf-8"
                    self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self._failed_on, self._error = self._stream, exc
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stream without a descriptor (tests)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        if not self.stderr:
            reason = exc.strerror or type(exc).__name__
            if exc.errno == errno.EPIPE:
                line = f"note: stdout was closed ({reason}); output stops here, the command goes on"
            else:
                line = f"error: cannot write to stdout ({reason}); output stops here, the command goes on"
            err.print(line, markup=False)

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def output_failure() -> OSError | None:
    """Why stdout stopped taking output (None: it did not); not for a closed pipe, which is the reader's choice."""
    failed = _stdout.failed
    return failed if failed is not None and failed.errno != errno.EPIPE else None


def _console(stream: Stream) -> Console:
    """Rich console; soft_wrap keeps every message on one line, and logs/pipes get room for the tables."""
    file = cast("IO[str]", stream)  # the file protocol Rich uses: write, flush, isatty, fileno, encoding
    probe = Console(file=file)
    width = None if probe.is_terminal or os.environ.get("COLUMNS") else 160
    return Console(file=file, highlight=False, soft_wrap=True, width=width)


_stdout = Stream()
out = _console(_stdout)
err = _console(Stream(stderr=True))


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


def _arguments() -> list[object]:
    """The values of the running command's parameters (empty outside a command). Typer carries its own copy of
    click, whose context stack is the one that knows them."""
    for name in ("typer._click.globals", "click.globals"):
        with contextlib.suppress(ImportError, AttributeError):
            context = importlib.import_module(name).get_current_context(silent=True)
            if context is not None:
                values: list[object] = []
                for value in context.params.values():
                    values.extend(value if isinstance(value, list | tuple) else [value])
                return values
    return []


def _one_line_paths(message: str) -> str:
    """The message with every path the command was given that holds a newline (or another control character, or
    bytes the filesystem encoding cannot decode) shown escaped, so such a path never splits a problem in two."""
    for value in _arguments():
        text = str(value) if isinstance(value, str | Path) else ""
        if text and not text.isprintable():
            message = message.replace(text, shown_path(text))
    return message


def fail(exc: PetlbenchError) -> NoReturn:
    """Print the error, one line per problem (at most MAX_PROBLEM_LINES), and exit with its code (2:
    configuration, 1: findings)."""
    out.file.flush()  # what was printed before the error comes before it in a combined log
    for line in problem_lines(_one_line_paths(str(exc))):
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
