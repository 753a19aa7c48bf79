"""The `petlbench` command line: parse, call one core function, render with Rich, map errors to exit codes.

Exit codes: 0 ok, 1 findings (failed runs with --strict, budgets exceeded), 2 usage or configuration error,
130 interrupted. The parent process never imports torch; workers do.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from petlbench.cli import estimate as estimate_cmd
from petlbench.cli.console import err, error_line, fail, out, progress_bar
from petlbench.cli.tables import check_table, result_line, runs_table, summary_table, tuners_table
from petlbench.data.preflight import DataCheck, check_data_root, preflight
from petlbench.data.specs import DATA_ROOT_ENV, resolve_data_root
from petlbench.errors import BudgetExceeded, ConfigError, PetlbenchError, is_config_error
from petlbench.executors import ExecutorKind, RunFinished, RunStarted, make_executor
from petlbench.executors.devices import resolve_device
from petlbench.measure.nvml import visible_gpus
from petlbench.report import Plot
from petlbench.results import RunResult, stored_statuses, suite_dir, summarize
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import Device, RunSpec, Suite
from petlbench.sweep import execute, plan
from petlbench.tuners import available_tuners

app = typer.Typer(
    name="petlbench",
    help="What each PETL method for Vision Transformers costs in memory, speed and parameters, and what it buys "
    "in accuracy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


ResultsDir = Annotated[Path, typer.Option("--results-dir", help="where results/<suite>/*.parquet live")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu or cuda; overrides the suite's `device`", show_default=False)
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help=f"folder that relative dataset roots (e.g. `root: vtab-1k`) live in; default ${DATA_ROOT_ENV}, "
        "else the current directory",
        show_default=False,
    ),
]
PreflightOpt = Annotated[
    bool,
    typer.Option(
        "--preflight/--no-preflight",
        help="before any run: check dataset folders, list files, labels and that images exist (no decoding), "
        "local checkpoints, offline hub tags against the cache, and peft configs with peft (a child process)",
    ),
]


def builtin_quickstart() -> Path:
    """The quickstart suite shipped inside the package (so `petlbench run` works from any folder)."""
    return Path(str(importlib.resources.files("petlbench").joinpath("suites/quickstart.yaml")))


def _load(
    suite_path: Path | None,
    device: str | None,
    data_root: Path | None = None,
    checks: bool = True,
    local_gpus: bool = True,
) -> tuple[Suite, list[RunSpec], list[DataCheck]]:
    suite = load_suite(suite_path or builtin_quickstart())
    root = resolve_data_root(data_root)
    requested = device or suite.device
    if requested == "cuda" and not local_gpus:  # the GPUs are on the cluster, not necessarily on this machine
        resolved: Device = "cuda"
    else:
        resolved = resolve_device(requested, visible_gpus())
    runs = expand(suite, resolved, str(root) if root else None)
    if not checks:
        return suite, runs, []
    check_data_root(root, from_option=data_root is not None)
    return suite, runs, preflight(suite, runs, root)


def _running(labels: Sequence[str], shown: int = 2) -> str:
    """Progress text for the runs in flight: 'lora rank=4 bs=8 fp32', or '3 running: a · b · +1'."""
    if len(labels) <= 1:
        return labels[0] if labels else "waiting"
    more = [f"+{len(labels) - shown}"] if len(labels) > shown else []
    return f"{len(labels)} running: " + " · ".join([*labels[:shown], *more])


@app.command()
def run(
    suite: Annotated[
        Path | None, typer.Argument(help="suite YAML; omit it for the built-in CPU quickstart", show_default=False)
    ] = None,
    device: DeviceOpt = None,
    results_dir: ResultsDir = Path("results"),
    force: Annotated[bool, typer.Option("--force", help="re-run runs that already have a result")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the runs that would execute; run nothing")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any run ends oom, error or timeout")] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="runs at once; CPU: default 1, each run gets its share of the cores; CUDA: default and at most one "
            "run per visible GPU; ray: cap on runs in flight",
            show_default=False,
        ),
    ] = None,
    executor: Annotated[
        ExecutorKind,
        typer.Option(
            "--executor", help="local: subprocesses on this machine; ray: Ray tasks (pip install petlbench[ray])"
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="ray: a running cluster ('auto', or HOST:6379); omitted: a local Ray instance for this sweep",
            show_default=False,
        ),
    ] = None,
    data_root: DataRootOpt = None,
    preflight_checks: PreflightOpt = True,
    skip_predicted_oom: Annotated[bool, estimate_cmd.SKIP_OPTION] = False,
    memory_limit: Annotated[str | None, estimate_cmd.LIMIT_OPTION] = None,
) -> None:
    """Run a suite: each run in its own subprocess, one parquet row per run under results/<suite>/.

    With `batch_size: auto` each configuration's largest batch under the memory limit is searched instead.
    Exit code 2 when the suite, its data or a run's configuration is invalid (a bad image found by a worker
    included); the other runs still finish and are saved.

    Example: petlbench run suites/memory.yaml --device cuda --skip-predicted-oom
    """
    try:
        suite_obj, runs, _ = _load(suite, device, data_root, preflight_checks, local_gpus=executor == "local")
        runner = make_executor(executor, results_dir, runs[0].device if runs else "cpu", jobs, address)
        if suite_obj.auto_batch_size:
            estimate_cmd.run_auto_batch_command(
                suite_obj, runs, results_dir, force, dry_run, strict, memory_limit, runner, out, err
            )
            return
        if memory_limit is not None and not skip_predicted_oom:
            raise ConfigError("--memory-limit: only used with --skip-predicted-oom or a suite with batch_size: auto")
        todo = plan(runs, results_dir, force)
    except PetlbenchError as exc:
        fail(exc)
    where = suite_dir(results_dir, suite_obj.name)
    device_name = runs[0].device if runs else "-"
    out.print(
        f"[bold]{suite_obj.name}[/bold]: {len(runs)} runs on {device_name} → {where}/ "
        f"({len(todo.done)} done, {len(todo.todo)} to run"
        + (f", {len(todo.retry)} retried" if todo.retry else "")
        + ")"
        + ("" if str(runner) == "local" else f" · {runner}")
    )
    if dry_run:
        out.print(runs_table(todo.todo, title="runs to execute"))
        return
    if not todo.todo:
        out.print(f"nothing to run: all {len(runs)} runs already have results in {where}/ (use --force to re-run)")
        return

    results: list[RunResult] = []
    specs = todo.todo
    if skip_predicted_oom:
        try:
            specs, skipped = estimate_cmd.skip_predicted_oom(specs, memory_limit, visible_gpus(), results_dir, out)
        except PetlbenchError as exc:
            fail(exc)
        results.extend(skipped)
    interrupted = False
    progress = progress_bar(eta=True)
    with ExitStack() as stack:
        stack.enter_context(progress)
        task = progress.add_task("starting", total=len(specs))
        running: dict[str, str] = {}
        try:
            for event in execute(specs, runner, results_dir):
                if isinstance(event, RunStarted):
                    running[event.spec.run_id] = event.spec.label()
                elif isinstance(event, RunFinished):
                    running.pop(event.result.run_id, None)
                    results.append(event.result)
                    progress.console.print(result_line(event.result))
                    progress.advance(task)
                progress.update(task, description=_running(list(running.values())))
        except KeyboardInterrupt:
            interrupted = True
        except PetlbenchError as exc:
            progress.stop()
            fail(exc)

    if results:
        out.print(summary_table(results, title=f"{suite_obj.name}: {len(results)} runs"))
    counts = summarize(results)
    out.print("  ".join(f"{status}: {n}" for status, n in sorted(counts.items())) + f"  → {where}/")
    if interrupted:
        err.print(f"interrupted: {len(results)} finished runs are saved in {where}/; run the same command to resume")
        raise typer.Exit(130)
    if suite is None:  # the quickstart ends with its report, so a new user sees the figures too
        _quickstart_report(where, results_dir.parent / "reports" / suite_obj.name)
    _fail_on_config_errors(results, where)
    if strict and any(status != "ok" for status in counts):
        raise typer.Exit(1)


def _quickstart_report(results: Path, reports: Path) -> None:
    from petlbench.report import build_report

    try:
        summary = build_report([results], ["all"], reports, None)
    except PetlbenchError as exc:
        err.print(f"note: no report ({exc})")
        return
    out.print(f"report: {summary.markdown} and {len(summary.figures)} figures in {summary.out}/")


def _fail_on_config_errors(results: list[RunResult], where: Path) -> None:
    """Runs that failed on a configuration or data error (e.g. an image that does not decode) make the command
    exit 2, after every run has finished and been saved: one line per distinct error."""
    failed: dict[str, int] = {}
    for result in results:
        if result.status == "error" and is_config_error(result.error_type):
            line = (result.error or "").splitlines()[0] if result.error else str(result.error_type)
            failed[line] = failed.get(line, 0) + 1
    if not failed:
        return
    for line, count in failed.items():
        err.print(error_line(line + (f" ({count} runs)" if count > 1 else "")))
    err.print(f"{sum(failed.values())} runs failed on their configuration or data; the other results are in {where}/")
    raise typer.Exit(2)


@app.command()
def validate(
    suite: Annotated[Path, typer.Argument(help="suite YAML to check", show_default=False)],
    device: DeviceOpt = None,
    results_dir: ResultsDir = Path("results"),
    data_root: DataRootOpt = None,
    preflight_checks: PreflightOpt = True,
) -> None:
    """Expand and validate every run of a suite (tuner knobs included), check its data files, print the run
    table, run nothing. Without the data at hand, --no-preflight validates the suite alone.

    Example: petlbench validate suites/accuracy-vtab.yaml --data-root /data
    """
    try:
        suite_obj, runs, checks = _load(suite, device, data_root, preflight_checks)
        statuses = stored_statuses(suite_dir(results_dir, suite_obj.name))
    except PetlbenchError as exc:
        fail(exc)
    out.print(runs_table(runs, statuses, title=f"{suite_obj.name}: {len(runs)} runs"))
    for check in checks:
        out.print(check.describe())
    data_note = "" if preflight_checks else " (pre-flight skipped: data files and weights not checked)"
    out.print(f"{suite}: valid, {len(runs)} runs{data_note}")


app.command()(estimate_cmd.estimate)


@app.command()
def tuners() -> None:
    """List every tuner with its knobs and their defaults (the headline knob in bold).

    Example: petlbench tuners
    """
    try:
        configs = available_tuners()
    except PetlbenchError as exc:
        fail(exc)
    out.print(tuners_table(configs))


ResultsArg = Annotated[
    list[Path] | None,
    typer.Argument(help="results folders or parquet files [default: results/]", show_default=False),
]


@app.command()
def report(
    results: ResultsArg = None,
    plot: Annotated[
        list[Plot] | None,
        typer.Option("--plot", help="which figures; repeat for several [default: all]", show_default=False),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the figures, report.md and report.html")] = Path(
        "reports"
    ),
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="batch of the breakdown bars [default: largest batch every method ran ok]"),
    ] = None,
) -> None:
    """Pareto fronts, memory vs batch size and memory breakdown figures, with report.md and report.html.

    Example: petlbench report results/memory --plot pareto --out reports/
    """
    from petlbench.report import build_report

    paths = results or [Path("results")]
    try:
        summary = build_report(paths, [p.value for p in plot or [Plot.all]], out_dir, batch_size)
    except PetlbenchError as exc:
        fail(exc)
    counts = ", ".join(f"{n} {status}" for status, n in summary.statuses.items())
    out.print(f"{summary.rows} rows ({counts}) in {len(summary.groups)} group(s)")
    if summary.split_by:
        out.print(f"split by {', '.join(summary.split_by)}: no figure mixes groups")
    for note in summary.notes:
        err.print(f"note: {note}")
    out.print(f"{len(summary.figures)} figures (.png + .svg) → {summary.out}/")
    if summary.vtab_methods:
        out.print(f"VTAB-1k tables: {summary.vtab_methods} methods × 19 tasks, group and flat means (in the report)")
    out.print(f"report → {summary.markdown}  {summary.html}")


@app.command()
def check(
    results: ResultsArg = None,
    budgets: Annotated[Path, typer.Option("--budgets", help="budgets YAML to check against")] = Path(
        "suites/budgets.yaml"
    ),
    write_baseline: Annotated[
        Path | None,
        typer.Option(
            "--write-baseline",
            help="instead of checking, write budgets proposed from the results to this file (keeps its ratios)",
            show_default=False,
        ),
    ] = None,
    headroom: Annotated[float, typer.Option("--headroom", help="--write-baseline: factor on measured bytes")] = 1.05,
) -> None:
    """Check results against budgets: a table of every checked row, exit 1 if any is over budget.

    Example: petlbench check --budgets suites/budgets.yaml results/smoke
    """
    from petlbench.budget import check_files, write_baseline_file

    paths = results or [Path("results")]
    try:
        if write_baseline is not None:
            baseline, command = write_baseline_file(paths, write_baseline, headroom)
            out.print(
                f"wrote {write_baseline}: {baseline.budgets} budgets from {baseline.rows} ok rows"
                + (f", {baseline.ratios} ratios kept" if baseline.ratios else "")
                + (f" ({baseline.skipped} rows not ok: no budget)" if baseline.skipped else "")
            )
            out.print(f"review it by hand; regenerate with: {command}", soft_wrap=True)
            return
        outcome = check_files(paths, budgets)
    except PetlbenchError as exc:
        fail(exc)
    out.print(check_table(outcome.checks, title=f"{budgets}: {len(outcome.checks)} checks"))
    failed = outcome.failed
    out.print(
        f"{len(outcome.checks) - len(failed)} within budget, {len(failed)} over"
        + (f"; {len(outcome.uncovered)} rows no budget selects" if outcome.uncovered else "")
    )
    if failed:
        fail(BudgetExceeded(outcome.failure_message()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
