"""Rich renderings shared by the CLI commands (tables only; no printing here)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from petlbench.budget import CheckResult, format_value
from petlbench.data.specs import data_label
from petlbench.fmt import UNSTABLE_NOTE, first_line, fmt_bytes, fmt_knob, fmt_pct, fmt_rate, fmt_seconds, noisy
from petlbench.report.compare import Comparison
from petlbench.results import RunResult
from petlbench.spec.models import RunSpec
from petlbench.tuners import Tuner, describe_tuner


class Col:
    """A column of a `FitTable`: `drop` > 0 marks a column that may be left out when the terminal is narrow
    (highest first); `wrap` marks free text that may wrap (numbers, knobs and statuses never wrap nor get cut)."""

    def __init__(self, name: str, justify: str = "left", drop: int = 0, wrap: bool = False) -> None:
        self.name, self.justify, self.drop, self.wrap = name, justify, drop, wrap


_MANY_ROWS = 200  # a borderless table this long is written line by line, not through Rich's table renderer


class FitTable:
    """A table that fits the console it is printed on, never cutting a number: at full width a Rich table;
    narrower, the droppable columns go first (named in the caption); narrower still, one block per row
    ('column value' pairs packed into lines)."""

    def __init__(self, columns: Sequence[Col], title: str | None = None, caption: str | None = None, **style: Any):
        self.columns = list(columns)
        self.title, self.caption, self.style = title, caption, style
        self.rows: list[list[str | Text]] = []

    def add_row(self, *cells: str | Text) -> None:
        self.rows.append(list(cells))

    def _table(self, keep: Sequence[int], dropped: Sequence[str], widths: Sequence[int] | None = None) -> Table:
        caption = self.caption or ""
        if dropped:
            caption += ("; " if caption else "") + f"not shown at this width: {', '.join(dropped)}"
        table = Table(title=self.title, caption=caption or None, header_style="bold", **self.style)
        for n, i in enumerate(keep):
            col = self.columns[i]
            overflow = "fold" if col.wrap else "ellipsis"  # a cut number would show as '…' (tests look for it)
            width = widths[n] if widths is not None else None
            table.add_column(col.name, justify=col.justify, no_wrap=not col.wrap, overflow=overflow, width=width)  # type: ignore[arg-type]
        for row in self.rows:
            table.add_row(*(row[i] for i in keep))
        return table

    def _natural_widths(self, console: Console) -> list[int]:
        """Each column's width with every cell on one line, from the cells' text (Rich measures by rendering every
        cell, twice: seconds for a table of thousands of rows)."""

        def plain(cell: str | Text) -> str:
            if isinstance(cell, Text):
                return cell.plain
            return console.render_str(cell).plain if "[" in cell else cell

        widths = [cell_len(col.name) for col in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], *(cell_len(line) for line in plain(cell).split("\n")))
        return widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        keep = list(range(len(self.columns)))
        natural = self._natural_widths(console)
        table = self._table(keep, [], natural)
        if table._extra_width + sum(natural) + len(keep) * _padding_width(table) <= width:
            if len(self.rows) >= _MANY_ROWS and self.style.get("box", box.HEAVY_HEAD) is None:
                yield from self._lines(console, table, natural)  # thousands of rows: Rich takes ~1 ms a row
            else:
                yield table  # everything fits on one line per row: no measuring
            return
        order = sorted((i for i, c in enumerate(self.columns) if c.drop), key=lambda i: -self.columns[i].drop)
        dropped: list[str] = []
        wide = options.update_width(100_000)
        while True:
            table = self._table(keep, dropped)
            if _minimum_width(console, wide, table) <= width:
                yield table
                return
            if not order:
                break
            gone = order.pop(0)
            keep.remove(gone)
            dropped.append(self.columns[gone].name)
        yield from self._blocks(width)

    def _lines(self, console: Console, table: Table, widths: Sequence[int]) -> RenderResult:
        """The rows of a borderless table as the lines Rich would print (cells on one line, fixed widths)."""
        _, right, _, left = table.padding
        last = len(widths) - 1

        def line(cells: Sequence[str | Text], style: str = "") -> Text:
            out = Text()
            for n, (cell, col) in enumerate(zip(cells, self.columns, strict=True)):
                text = cell if isinstance(cell, Text) else console.render_str(cell)
                if style:
                    text.stylize(style)
                gap = " " * (widths[n] - text.cell_len)
                out.append(" " * (0 if n == 0 and not table.pad_edge else left))
                out.append_text(Text(gap) + text if col.justify == "right" else text + Text(gap))
                out.append(" " * (0 if n == last and not table.pad_edge else right))
            return out

        if self.title:
            yield Text(self.title, style="table.title")
        yield line([Text(col.name) for col in self.columns], "bold")
        for row in self.rows:
            yield line(row)
        if self.caption:
            yield Text(self.caption, style="table.caption")

    def _blocks(self, width: int) -> RenderResult:
        """List layout: the first cell bold, then 'name value' pairs, never split, packed into lines."""
        if self.title:
            yield Text(self.title, style="bold")
        for row in self.rows:
            yield Text.assemble((Text(row[0]) if isinstance(row[0], str) else row[0]), style="bold")
            line = Text("  ")
            for col, cell in zip(self.columns[1:], row[1:], strict=True):
                value = Text(cell) if isinstance(cell, str) else cell
                if not value.plain or value.plain == "-":
                    continue
                pair = Text.assemble((col.name or "", "dim"), " " if col.name else "", value)
                if len(line) > 2 and cell_len(line.plain) + 3 + cell_len(pair.plain) > width:
                    yield line
                    line = Text("  ")
                if len(line) > 2:
                    line.append(" · ", style="dim")
                line.append_text(pair)
            if len(line) > 2:
                yield line
        if self.caption:
            yield Text(self.caption, style="dim")


def _padding_width(table: Table) -> int:
    """Horizontal padding of an inner column (the edges lose theirs with pad_edge=False, which only overestimates)."""
    _, right, _, left = table.padding
    return left + right


def _minimum_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """The narrowest `table` can be without cutting: Rich's own minimum counts the longest word of a cell, but a
    no_wrap cell ('≤ 2.65 MiB', 'num_queries=16') needs its whole text."""
    total = table._extra_width
    for column in table.columns:
        measured = table._measure_column(console, options, column)
        total += measured.maximum if column.no_wrap else measured.minimum
    return total


STATUS_STYLE = {"ok": "green", "oom": "yellow", "error": "red", "timeout": "red", "skipped": "dim"}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def backbone_label(spec: RunSpec) -> str:
    size = f"@{spec.backbone.img_size}" if spec.backbone.img_size else ""
    extra = ",".join(f"{k}={v}" for k, v in spec.backbone.kwargs.items())
    return f"{spec.backbone.model}{size}" + (f" ({extra})" if extra else "")


# `validate` and `run --dry-run` draw at most this many runs: the first RUNS_HEAD and the last RUNS_TAIL, with a
# row that counts the ones left out (drawing 100,000 rows took over a minute and said nothing more).
RUNS_HEAD, RUNS_TAIL = 30, 10


def runs_table(
    runs: Sequence[RunSpec], statuses: Mapping[str, str] | None = None, title: str | None = None
) -> FitTable:
    """The expanded runs of a suite (for `validate` and `run --dry-run`), bounded to RUNS_HEAD + RUNS_TAIL rows.

    Settings shared by every run (backbone, data, device, ...) go in the caption, so the rows stay narrow.
    """
    total = len(runs)
    shown = (
        list(range(total)) if total <= RUNS_HEAD + RUNS_TAIL else [*range(RUNS_HEAD), *range(total - RUNS_TAIL, total)]
    )
    columns: dict[str, list[str]] = {
        "backbone": [backbone_label(r) for r in runs],
        "data": [data_label(r.data) for r in runs],
        "device": [r.device for r in runs],
        "precision": [r.precision for r in runs],
        "lr": [f"{r.optimizer.lr:g}" for r in runs],
        "seed": [str(r.seed) for r in runs],
        "train": [f"{r.train.epochs} ep" if r.train else "no" for r in runs],
    }
    varying = {k: v for k, v in columns.items() if len(set(v)) > 1}
    shared = [f"{k}: {v[0]}" for k, v in columns.items() if k not in varying and v]
    if len(shown) < total:
        shared.append(f"{total:,} runs, {total - len(shown):,} not shown")
    drops = {"#": 3, "run_id": 2, "stored": 1}
    names = ("#", "run_id", "tuner", "knob", "batch", *varying, "stored")
    table = FitTable(
        [Col(c, "right" if c in ("#", "batch", "lr") else "left", drops.get(c, 0)) for c in names],
        title=title,
        caption=", ".join(shared) or None,
    )
    for i in (j + 1 for j in shown):
        run = runs[i - 1]
        if i == total - RUNS_TAIL + 1 and len(shown) < total:
            table.add_row("…", f"{total - len(shown):,} more runs", *([""] * (len(names) - 2)))
        stored = (statuses or {}).get(run.run_id)
        table.add_row(
            str(i),
            run.run_id,
            run.method,
            fmt_knob(run.knob_name, run.knob),
            str(run.batch_size),
            *(values[i - 1] for values in varying.values()),
            status_text(stored) if stored else Text("-", style="dim"),
        )
    return table


def result_line(result: RunResult) -> Text:
    """One line per finished run, printed as the sweep goes."""
    spec, m = result.spec, result.metrics
    line = Text()
    line.append(f"{result.status:<7}", style=STATUS_STYLE.get(result.status, ""))
    line.append(f" {spec.label():<38} ")
    if result.status == "ok":
        parts = [f"peak {fmt_bytes(m.peak_allocated_bytes)}", f"step {fmt_seconds(m.step_time_median_s)}"]
        parts.append(noisy(fmt_rate(m.train_images_per_s), m.timing_unstable))
        if m.timing_unstable:
            parts.append("timing unstable")
        if m.acc_top1 is not None:
            parts.append(f"acc {fmt_pct(m.acc_top1)}")
        line.append("  ".join(parts))
    else:
        line.append(first_line(result.error, 300), style="dim")
    line.append(f"  ({fmt_seconds(result.duration_s)})", style="dim")
    return line


def summary_table(results: Iterable[RunResult], title: str = "Summary", now: Collection[str] = ()) -> FitTable:
    """End-of-sweep table: one row per run with the headline numbers; with `now` (the run_ids of this invocation,
    when it ran only some of the rows) those rows are marked `*`."""
    results = list(results)
    datasets = [data_label(r.spec.data) for r in results]
    show_data = len(set(datasets)) > 1
    mark = bool(now) and len(set(now)) < len(results)
    names = ["tuner", "knob", "batch", "precision", "status", "trainable", "peak", "weights", "grads", "optim"]
    names += ["activ.", "img/s", "acc"]
    # narrow terminal: the breakdown goes first (it is in the report), then precision and data
    drops = {"grads": 6, "optim": 5, "weights": 4, "activ.": 3, "precision": 2, "data": 1}
    cols = [Col("")] if mark else []
    cols += [Col("data", drop=1)] if show_data else []
    cols += [
        Col(c, "left" if c in ("tuner", "knob", "precision", "status") else "right", drops.get(c, 0)) for c in names
    ]
    table = FitTable(cols, title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for r, dataset in zip(results, datasets, strict=True):
        m = r.metrics
        table.add_row(
            *(["*" if r.run_id in now else ""] if mark else []),
            *([dataset] if show_data else []),
            r.spec.method,
            fmt_knob(r.spec.knob_name, r.spec.knob),
            str(r.spec.batch_size),
            r.spec.precision,
            status_text(r.status),
            f"{m.params_trainable:,}" if m.params_trainable is not None else "-",
            fmt_bytes(m.peak_allocated_bytes),
            fmt_bytes(m.mem_weights_bytes),
            fmt_bytes(m.mem_grads_bytes),
            fmt_bytes(m.mem_optimizer_bytes),
            fmt_bytes(m.mem_activations_bytes),
            noisy(fmt_rate(m.train_images_per_s, "").strip(), m.timing_unstable),
            fmt_pct(m.acc_top1),
        )
    if any(r.metrics.timing_unstable for r in results):
        table.caption = UNSTABLE_NOTE
    return table


def _show_default(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


COMMON_KNOBS_NOTE = (
    "Every tuner also takes backbone_mode (train: the frozen backbone's dropout and drop path act while training; "
    "eval: they do not) and head_init (timm: truncated normal 0.02; torch: nn.Linear's default; vpt, adaptformer: "
    "their codes'), "
    "with defaults from its official code (the last column)."
)


def tuners_table(tuners: Mapping[str, type[Tuner]]) -> Group:
    """`petlbench tuners`: one line per tuner (what it does, its headline knob, its backbone/head defaults), the
    shared knobs explained once below."""
    columns = [Col("tuner"), Col("what it does", wrap=True), Col("headline knob"), Col("mode/head")]
    table = FitTable(columns, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name, cfg in tuners.items():
        knobs = {row["name"]: row for row in describe_tuner(cfg)}
        headline = next((row for row in knobs.values() if row["headline"]), None)
        knob = f"{headline['name']}={_show_default(headline['default'])}" if headline else "-"
        defaults = f"{knobs['backbone_mode']['default']}/{knobs['head_init']['default']}"
        table.add_row(name, Text(cfg.brief or first_line(cfg.summary, 60)), Text(knob), defaults)
    return Group(table, _paragraph(COMMON_KNOBS_NOTE + " `petlbench tuners NAME` shows one tuner in full."))


class _Paragraph:
    """Text that wraps at the terminal's width (the consoles print single lines unwrapped: soft_wrap); on a terminal
    narrower than its longest word, one unwrapped line the terminal folds, so no word is cut."""

    def __init__(self, text: str, style: str) -> None:
        self.text, self.style = text, style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width < max((cell_len(word) for word in self.text.split()), default=0):
            yield Text(self.text, style=self.style)
            return
        grid = Table.grid()
        grid.add_column(overflow="fold")
        grid.add_row(Text(self.text, style=self.style))
        yield grid


def _paragraph(text: str, style: str = "dim") -> _Paragraph:
    return _Paragraph(text, style)


def tuner_detail(cfg: type[Tuner]) -> Group:
    """`petlbench tuners NAME`: what the tuner computes, then every knob with its type, default and meaning."""
    parts: list[Text | _Paragraph | FitTable] = [_paragraph(f"{cfg.name}: {cfg.summary}", style="")]
    if cfg.extra:
        parts.append(Text(f'needs: pip install "petlbench[{cfg.extra}]"', style="yellow"))
    table = FitTable(
        [Col("knob"), Col("default"), Col("meaning", wrap=True)], box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    for row in describe_tuner(cfg):
        name = Text(row["name"], style="bold" if row["headline"] else "")
        meaning = f"{row['type']}; {row['description']}".strip("; ")
        table.add_row(name, Text(_show_default(row["default"])), Text(meaning))
    parts.append(table)
    if cfg.knob:
        parts.append(Text(f"headline knob (the `knob` column of results): {cfg.knob}", style="dim"))
    return Group(*parts)


def check_table(checks: Sequence[CheckResult], title: str | None = None) -> Group:
    """`petlbench check`: every checked (row, limit) with actual vs budget and PASS/FAIL, fitting 80 columns;
    checks without a value are marked [n] in the table and explained in numbered notes below it."""
    settings = sorted({c.setting for c in checks})
    one_setting = len(settings) == 1
    if one_setting and title:
        title += f" ({settings[0]})"
    columns = ("", "run", *([] if one_setting else ["setting"]), "metric", "actual", "budget", "use", "entry")
    drops = {"entry": 3, "use": 2, "setting": 1}
    table = FitTable(
        [Col(c, "right" if c in ("actual", "budget", "use") else "left", drops.get(c, 0)) for c in columns],
        title=title,
        box=None,
        pad_edge=False,
        padding=(0, 1),
    )
    numbers: dict[str, int] = {}  # one numbered note per distinct explanation
    for c in checks:
        if c.note:
            numbers.setdefault(f"{c.row}: {c.note}", len(numbers) + 1)
    for c in checks:
        use = f"{100 * c.actual / c.limit:.0f}%" if c.actual is not None and c.limit else "-"
        sign = "≤" if c.op == "<=" else "≥"
        cells: list[Text | str] = [
            Text("PASS", style="green") if c.passed else Text("FAIL", style="bold red"),
            c.row,
            *([] if one_setting else [c.setting]),
            _metric_name(c),
            f"[{numbers[f'{c.row}: {c.note}']}]" if c.note else format_value(c.actual, c.kind),
            f"{sign} {format_value(c.limit, c.kind)}",
            use,
            c.where,
        ]
        table.add_row(*cells)
    notes = Text("\n".join(f"[{n}] {text}" for text, n in numbers.items()), style="red")
    return Group(table, notes) if numbers else Group(table)


_METRIC_NAMES = {
    "peak_allocated_bytes": "peak",
    "peak_reserved_bytes": "reserved",
    "peak_infer_bytes": "infer peak",
    "params_trainable": "params",
    "train_images_per_s": "img/s",
}


def _metric_name(check: CheckResult) -> str:
    """'peak', 'params', or 'peak ÷ full' for a ratio."""
    column = check.metric.removesuffix(" ratio")
    name = _METRIC_NAMES.get(column, column)
    return f"{name} ÷ {check.versus}" if check.kind == "ratio" else name


def _signed_pct(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(f"{100 * value:+.1f}%")


def compare_table(comparison: Comparison, top: int, title: str | None = None) -> FitTable:
    """`petlbench compare`: per run, peak memory before → after and the relative changes (red: worse)."""
    drops = {"peak before": 2, "Δ acc": 1}
    columns = [Col("run")]
    columns += [Col(c, "right", drops.get(c, 0)) for c in ("peak before", "peak after", "Δ peak", "Δ img/s", "Δ acc")]
    caption = "Δ img/s: ~ within the timing noise, 'unstable' a timing flagged unstable; neither is a change"
    table = FitTable(columns, title=title, caption=caption, box=None, pad_edge=False, padding=(0, 1))
    for delta in comparison.deltas[:top]:
        before, after = delta.values["peak_allocated_bytes"]
        peak, speed = (
            _signed_pct(delta.relative("peak_allocated_bytes")),
            _signed_pct(delta.relative("train_images_per_s")),
        )
        if (delta.relative("peak_allocated_bytes") or 0) > 0:
            peak.stylize("red")
        verdict = delta.speed_verdict()
        if verdict == "change":
            speed.stylize("red" if (delta.relative("train_images_per_s") or 0) < 0 else "green")
        elif verdict in ("noise", "unstable"):  # shown, never coloured: not a change
            speed = Text(f"~{speed.plain}" if verdict == "noise" else f"{speed.plain} unstable", style="dim")
        accuracy = delta.absolute("acc_top1")
        table.add_row(
            delta.label,
            fmt_bytes(before),
            fmt_bytes(after),
            peak,
            speed,
            Text("-", style="dim") if accuracy is None else Text(f"{100 * accuracy:+.2f} pt"),
        )
    return table
