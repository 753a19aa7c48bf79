"""The `petlbench` command line: parse, call one core function, render with Rich, map errors to exit codes.

Exit codes: 0 ok, 1 findings (failed runs with --strict, budgets exceeded), 2 usage or configuration error (and
a results/report folder that cannot be written, or a suite another run holds), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). The parent process never imports torch; workers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from petlbench.cli import estimates as estimate_cmd
from petlbench.cli.console import err, error_line, fail, out, output_failure
from petlbench.cli.options import at_least, finite
from petlbench.cli.report_view import PlotChoice, show_report
from petlbench.cli.sweep_view import show_sweep
from petlbench.cli.tables import (
    check_table,
    compare_table,
    runs_table,
    tuner_detail,
    tuners_table,
)
from petlbench.data.specs import DATA_ROOT_ENV
from petlbench.errors import BudgetExceeded, ConfigError, PetlbenchError, WriteError
from petlbench.executors import ExecutorKind
from petlbench.executors.process import sigterm_as_interrupt
from petlbench.fmt import shown_path
from petlbench.results import stored_statuses, suite_dir
from petlbench.run.sweep import SweepRequest, builtin_quickstart, prepare
from petlbench.system import safeio
from petlbench.tuners import available_tuners, unknown_tuner_message

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
        "local checkpoints, offline hub tags against the cache, peft configs with peft, and build each backbone + "
        "tuner once on the meta device (docs/errors.md)",
    ),
]


JobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="runs at once; CPU: default 1, each run gets its share of the cores; CUDA: default and at most one run "
        "per visible GPU; ray: cap on runs in flight",
        show_default=False,
    ),
]
ExecutorOpt = Annotated[
    ExecutorKind,
    typer.Option("--executor", help="local: subprocesses on this machine; ray: Ray tasks (pip install petlbench[ray])"),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="ray: a running cluster ('auto', or HOST:6379); omitted: a local Ray instance for this sweep",
        show_default=False,
    ),
]


@app.command()
def run(
    ctx: typer.Context,
    suite: Annotated[
        Path | None, typer.Argument(help="suite YAML; omit it for the built-in CPU quickstart", show_default=False)
    ] = None,
    device: DeviceOpt = None,
    results_dir: ResultsDir = Path("results"),
    force: Annotated[bool, typer.Option("--force", help="re-run runs that already have a result")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the runs that would execute; run nothing")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any run ends oom, error or timeout")] = False,
    jobs: JobsOpt = None,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    data_root: DataRootOpt = None,
    preflight: PreflightOpt = True,
    skip_predicted_oom: Annotated[bool, estimate_cmd.SKIP_OPTION] = False,
    memory_limit: Annotated[str | None, estimate_cmd.LIMIT_OPTION] = None,
) -> None:
    """Run a suite: each run in its own subprocess, one parquet row per run under results/<suite>/.

    Without a suite: the built-in quickstart (a tiny ViT on scikit-learn's digits, every tuner, CPU, a few
    minutes), then its report under reports/quickstart/. With `batch_size: auto` each configuration's largest
    batch under the memory limit is searched instead. Exit code 2 when the suite, its data or a run's
    configuration is invalid; the other runs still finish and are saved. SIGTERM stops a sweep like Ctrl-C
    (workers killed, finished runs kept) and exits 143; Ctrl-C exits 130. A second run of the same suite into the
    same results folder refuses to start (exit 2).

    Example: petlbench run suites/memory.yaml --device cuda --skip-predicted-oom
    """
    ctx.with_resource(sigterm_as_interrupt())
    quickstart = suite is None
    request = SweepRequest(
        suite=suite or builtin_quickstart(),
        quickstart=quickstart,
        reports_dir=results_dir.parent / "reports" / "quickstart" if quickstart else None,
        device=device,
        results_dir=results_dir,
        force=force,
        dry_run=dry_run,
        strict=strict,
        jobs=jobs,
        executor=executor,
        address=address,
        data_root=data_root,
        preflight=preflight,
        skip_predicted_oom=skip_predicted_oom,
        memory_limit=memory_limit,
    )
    code = show_sweep(request)
    if code:
        raise typer.Exit(code)


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
        prepared = prepare(suite, device, data_root, preflight_checks, local_gpus=False)  # the GPU is run's
        suite_obj, runs, checks = prepared.suite, prepared.runs, prepared.checks
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
def tuners(
    name: Annotated[str | None, typer.Argument(help="one tuner, shown in full", show_default=False)] = None,
) -> None:
    """List every tuner on one line each (what it does, its headline knob); `petlbench tuners NAME` shows one tuner
    with every knob, its default and why.

    Example: petlbench tuners lora
    """
    try:
        configs = available_tuners()
        if name is not None and name not in configs:
            raise ConfigError(f"tuners: {unknown_tuner_message(name, configs)}")
    except PetlbenchError as exc:
        fail(exc)
    if name is None:
        out.print(tuners_table(configs))
    else:
        out.print(tuner_detail(configs[name]))


ResultsArg = Annotated[
    list[Path] | None,
    typer.Argument(help="results folders or parquet files [default: results/]", show_default=False),
]


@app.command()
def report(
    results: ResultsArg = None,
    plot: Annotated[
        list[PlotChoice] | None,
        typer.Option("--plot", help="which figures; repeat for several [default: all]", show_default=False),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the figures, report.md and report.html")] = Path(
        "reports"
    ),
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="batch of the breakdown bars [default: largest batch every method ran ok]"),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="png: PNG + SVG for screens; pdf: PDF + SVG + PNG sized for a paper, fonts embedded"
        ),
    ] = "png",
    width: Annotated[
        str, typer.Option("--width", help="--format pdf: double (7 in, two-column) or single (3.3 in, one-column)")
    ] = "double",
) -> None:
    """Pareto fronts, memory vs batch size and memory breakdown figures, with report.md and report.html.

    A results/<suite>.estimate/ folder is reported as predictions: 'Predicted' in every title, the device memory
    it was judged against drawn as a line, and the largest batch that fits per GPU memory size.

    Example: petlbench report results/memory --plot pareto --format pdf --out reports/
    """
    try:
        at_least("--batch-size", batch_size)
    except PetlbenchError as exc:
        fail(exc)
    plots = [str(p.value) for p in plot or []] or ["all"]
    show_report(results or [Path("results")], plots, out_dir, batch_size, fmt, width)


@app.command()
def explain(
    results: ResultsArg = None,
    run: Annotated[
        str | None, typer.Option("--run", help="run_id (or a unique prefix) of the run to explain", show_default=False)
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="select the run by method or variant (e.g. lora, 'lora rank=8')", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="with --method: the batch size", show_default=False)
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            "--vs",
            help="another run_id, or a method at the same batch size: the difference module by module",
            show_default=False,
        ),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="rows per module table")] = 8,
) -> None:
    """Why a run peaks where it does: the peak, when it happens in the step, its breakdown and the modules whose
    activations are live at it (from the timeline stored beside each row); --vs compares two runs.

    Example: petlbench explain results/quickstart --method fact --batch-size 32 --vs 'lora rank=8'
    """
    from petlbench.cli.explain_view import explanation_view
    from petlbench.report.explain import explain as explain_core

    paths = results or [Path("results")]
    try:
        at_least("--top", top)
        at_least("--batch-size", batch_size)
        result = explain_core(paths, run, method, batch_size, vs, top)
    except PetlbenchError as exc:
        fail(exc)
    out.print(explanation_view(result))


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
        finite("--headroom", headroom, minimum=1.0)
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


@app.command()
def compare(
    baseline: Annotated[Path, typer.Argument(help="results folder of the baseline (e.g. main)", show_default=False)],
    change: Annotated[Path, typer.Argument(help="results folder of the change", show_default=False)],
    max_increase: Annotated[
        float,
        typer.Option("--max-increase", help="exit 1 when a run's peak memory grows by more than this percentage"),
    ] = 1.0,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="also draw the changes per run into this figure (.png, .svg or .pdf)"),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="rows shown, largest memory change first")] = 40,
) -> None:
    """Compare two results folders run by run: the change in peak memory, throughput and accuracy, largest first.

    Runs are matched by run_id, else by their spec without the suite name. Exit 1 when a run's peak memory grew
    by more than --max-increase percent, or a run that was ok in the baseline is not ok in the change: a CI can
    gate a change on "no memory regression against main".

    Example: petlbench compare results-main/smoke results/smoke --max-increase 1 --out compare.png
    """
    from petlbench.report.compare import compare_rows, comparison_figure, describe
    from petlbench.report.rows import load_rows

    try:
        finite("--max-increase", max_increase, minimum=0.0)
        at_least("--top", top)
        comparison = compare_rows(load_rows([baseline]), load_rows([change]))
    except PetlbenchError as exc:
        fail(exc)
    out.print(compare_table(comparison, top, title=f"{change} vs {baseline}: {len(comparison.deltas)} runs in both"))
    for note in describe(comparison):
        out.print(note)
    if out_file is not None:
        fig = comparison_figure(comparison, str(baseline), str(change), top)
        kind = out_file.suffix.lstrip(".").lower()
        if kind not in ("png", "svg", "pdf"):
            fail(ConfigError(f"--out {shown_path(out_file)}: name a .png, .svg or .pdf file"))
        try:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            with safeio.atomic_writer(out_file) as handle:  # whole or not at all, never through a link
                fig.savefig(handle, format=kind, dpi=150)
        except OSError as exc:
            fail(
                WriteError(
                    f"{shown_path(out_file)}: cannot write the figure ({exc.strerror or exc}); choose another --out"
                )
            )
        out.print(f"figure → {out_file}")
    regressions = comparison.regressions(max_increase / 100)
    if regressions or comparison.broke:
        what = [f"{len(regressions)} runs over +{max_increase:g}% peak memory"] if regressions else []
        what += [f"{len(comparison.broke)} runs no longer ok"] if comparison.broke else []
        err.print(error_line("regression: " + ", ".join(what)))
        raise typer.Exit(1)
    out.print(f"no run's peak memory grew by more than {max_increase:g}%")


def _version(value: bool) -> None:
    if value:
        from petlbench import __version__

        out.print(f"petlbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """What each PETL method for Vision Transformers costs in memory, speed and parameters, and what it buys in
    accuracy."""


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        # stdout failed (a full disk, an I/O error) while the command went on: its output is lost, say so in the
        # exit code (a closed pipe is the reader's choice and keeps the command's own code)
        if output_failure() is not None and exc.code in (0, None):
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
