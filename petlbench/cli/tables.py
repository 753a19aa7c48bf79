"""Rich renderings shared by the CLI commands (tables only; no printing here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from petlbench.budget import CheckResult, format_value
from petlbench.data.specs import data_label
from petlbench.fmt import first_line, fmt_bytes, fmt_knob, fmt_pct, fmt_rate, fmt_seconds
from petlbench.results import RunResult
from petlbench.spec.models import RunSpec
from petlbench.tuners import Tuner, describe_tuner

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


def runs_table(runs: Sequence[RunSpec], statuses: Mapping[str, str] | None = None, title: str | None = None) -> Table:
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
    table = Table(title=title, caption=", ".join(shared) or None, header_style="bold")
    names = ("#", "run_id", "tuner", "knob", "batch", *varying, "stored")
    for column in names:
        table.add_column(column, justify="right" if column in ("#", "batch", "lr") else "left")
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
        parts.append(fmt_rate(m.train_images_per_s))
        if m.acc_top1 is not None:
            parts.append(f"acc {fmt_pct(m.acc_top1)}")
        line.append("  ".join(parts))
    else:
        line.append(first_line(result.error, 300), style="dim")
    line.append(f"  ({fmt_seconds(result.duration_s)})", style="dim")
    return line


def summary_table(results: Iterable[RunResult], title: str = "Summary") -> Table:
    """End-of-sweep table: one row per run with the headline numbers."""
    results = list(results)
    datasets = [data_label(r.spec.data) for r in results]
    show_data = len(set(datasets)) > 1
    table = Table(title=title, header_style="bold")
    if show_data:
        table.add_column("data")
    for column in (
        "tuner",
        "knob",
        "batch",
        "precision",
        "status",
        "trainable",
        "peak",
        "weights",
        "grads",
        "optim",
        "activ.",
        "img/s",
        "acc",
    ):
        table.add_column(column, justify="left" if column in ("tuner", "knob", "precision", "status") else "right")
    for r, dataset in zip(results, datasets, strict=True):
        m = r.metrics
        table.add_row(
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
            fmt_rate(m.train_images_per_s, ""),
            fmt_pct(m.acc_top1),
        )
    return table


def tuners_table(tuners: Mapping[str, type[Tuner]]) -> Table:
    """Every tuner, its knobs and defaults (`petlbench tuners`)."""
    table = Table(header_style="bold", show_lines=True)
    table.add_column("tuner", style="bold")
    table.add_column("what it does")
    table.add_column("knobs (default)")
    for name, cfg in tuners.items():
        knobs = Text()
        for row in describe_tuner(cfg):
            if len(knobs):
                knobs.append("\n")
            knobs.append(row["name"], style="bold" if row["headline"] else "")
            knobs.append(f" = {_show_default(row['default'])}")
            if row["description"]:
                knobs.append(f"  {row['description']}", style="dim")
        table.add_row(name, cfg.summary, knobs if len(knobs) else Text("(none)", style="dim"))
    return table


def _show_default(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def check_table(checks: Sequence[CheckResult], title: str | None = None) -> Group:
    """`petlbench check`: every checked (row, limit) with actual vs budget and PASS/FAIL, fitting 80 columns;
    checks without a value are marked [n] in the table and explained in numbered notes below it."""
    settings = sorted({c.setting for c in checks})
    one_setting = len(settings) == 1
    if one_setting and title:
        title += f" ({settings[0]})"
    table = Table(title=title, header_style="bold", box=None, pad_edge=False, padding=(0, 1))
    columns = ("", "run", *([] if one_setting else ["setting"]), "metric", "actual", "budget", "use", "entry")
    for column in columns:
        table.add_column(column, justify="right" if column in ("actual", "budget", "use") else "left", no_wrap=True)
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
