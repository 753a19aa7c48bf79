"""The memory-planning side of the command line: `petlbench estimate`, `run --skip-predicted-oom`, `batch_size: auto`.

Kept beside app.py (which registers these) so the commands stay thin: each parses, calls the core
(petlbench/estimate/client.py, petlbench/estimate/autobatch.py), renders (petlbench/cli/estimate_tables.py)
and maps errors to exit codes. Torch-free: every estimate runs in `python -m petlbench.estimate.engine` subprocesses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from petlbench.cli.console import err, fail, out, progress_bar
from petlbench.cli.estimate_tables import (
    auto_batch_table,
    device_label,
    estimate_table,
    fit_table,
    max_batch_table,
    probe_line,
)
from petlbench.cli.tables import result_line, runs_table
from petlbench.errors import PetlbenchError
from petlbench.estimate.autobatch import AutoBatchOutcome, run_auto_batch, stored_probes
from petlbench.estimate.client import (
    Estimate,
    SearchRequest,
    estimate_device,
    estimate_result,
    fits,
    judged_bytes,
    memory_limit,
    run_estimates,
    split_predicted_oom,
    targets_for,
)
from petlbench.estimate.gpus import DEFAULT_HEADROOM, DEFAULT_PRESET, PRESETS, Target
from petlbench.executors import Executor
from petlbench.fmt import first_line, fmt_bytes, fmt_knob, fmt_seconds
from petlbench.measure.nvml import visible_gpus
from petlbench.results import RunResult, estimate_dir, suite_dir
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import RunSpec, Suite
from petlbench.sweep import record
from petlbench.tuners.hf_peft.preflight import check_peft

SKIP_OPTION: Any = typer.Option(
    "--skip-predicted-oom",
    help="estimate every run first (fake tensors, seconds) and record the runs predicted not to fit "
    "--memory-limit as `skipped` rows instead of running them",
)
LIMIT_OPTION: Any = typer.Option(
    "--memory-limit",
    help="memory a run must fit, for --skip-predicted-oom and batch_size: auto (e.g. 80GiB, 2GiB); "
    "default: the visible GPU's memory for CUDA runs; required for CPU runs",
    show_default=False,
)
DEFAULT_JOBS = max(1, min(2, os.cpu_count() or 1))


def _estimate_with_progress(
    specs: Sequence[RunSpec],
    console: Console,
    jobs: int,
    search: SearchRequest | None = None,
    targets: Sequence[Target] = (),
    fit_search: bool = False,
) -> dict[str, Estimate]:
    progress = progress_bar("estimating", console=console)
    with progress:
        task = progress.add_task("starting (importing torch)", total=len(specs))

        def advance(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, description=label)

        return run_estimates(
            specs, search=search, jobs=jobs, on_progress=advance, targets=targets, fit_search=fit_search
        )


def estimate(
    suite: Annotated[Path, typer.Argument(help="suite YAML to estimate", show_default=False)],
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu or cuda (auto = cuda); overrides the suite's `device`. cuda needs no GPU here: it predicts "
            "CUDA's max_memory_allocated",
            show_default=False,
        ),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="GPU presets to judge CUDA runs on (FITS/OOM: the first), e.g. h100-80gb,a100-40gb,rtx-4090; "
            f"also prints the largest batch that fits each. Known: {', '.join(PRESETS)}",
            show_default=False,
        ),
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(
            "--device-memory",
            help="memory of a device without a preset, e.g. 80GiB; a comma list (24GiB,48GiB,80GiB) also prints the "
            "largest batch that fits each size (FITS/OOM: the first); default: the visible GPU's (CUDA), else none",
            show_default=False,
        ),
    ] = None,
    headroom: Annotated[
        str,
        typer.Option(
            "--headroom",
            help="CUDA: memory kept free beyond reserved + context when judging FITS, as a share of the card (2%) "
            "or a size (1GiB)",
        ),
    ] = DEFAULT_HEADROOM,
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="rows go to <results-dir>/<suite>.estimate/")
    ] = Path("results"),
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="estimator processes (each about 0.8 GB RSS)")] = (
        DEFAULT_JOBS
    ),
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 1 if a run is predicted not to fit or cannot be estimated")
    ] = False,
) -> None:
    """Predict every run's peak memory without running it: fake tensors, no GPU, no real memory.

    Prints the predicted peak per run (weights, gradients, optimizer state, activations, inference) and FITS/OOM
    against --device-memory (or the visible GPU); stores rows with memory_source=estimate under
    results/<suite>.estimate/, apart from measured rows. On CPU the estimate equals the measurement to the byte;
    for CUDA it applies the CPU→CUDA deltas listed in the caption (uncalibrated until a GPU validation run).
    A `batch_size: auto` suite gets the largest batch predicted to fit, per configuration.

    Example: petlbench estimate suites/memory.yaml --device cuda --device-memory 24GiB,48GiB,80GiB
    """
    try:
        suite_obj = load_suite(suite)
        gpus = visible_gpus()
        resolved = estimate_device(device or suite_obj.device)
        runs = expand(suite_obj, resolved)
        check_peft(suite_obj)  # peft configs, checked by peft in a child process (only for `tuner: peft` suites)
        targets = targets_for(resolved, gpu, device_memory, gpus, headroom, required=suite_obj.auto_batch_size)
        limits = [t.memory_bytes for t in targets] or [None]
        limit = limits[0]
    except PetlbenchError as exc:
        fail(exc)
    assert runs
    folder = estimate_dir(results_dir, suite_obj.name)
    start = time.monotonic()
    search = None
    if suite_obj.auto_batch_size:
        assert limit is not None
        r = suite_obj.batch_range
        search = SearchRequest(limit_bytes=limit, min=r.min, max=r.max, multiple_of=r.multiple_of)
    try:
        estimates = _estimate_with_progress(runs, out, jobs, search, targets, fit_search=bool(targets))
    except KeyboardInterrupt:
        err.print("interrupted: nothing was stored")
        raise typer.Exit(130) from None
    elapsed = time.monotonic() - start
    stored: list[RunResult] = []
    for run in runs:
        found = estimates.get(run.run_id)
        if found is None:
            continue
        spec = run if found.max_batch is None else run.model_copy(update={"batch_size": found.max_batch})
        stored.append(estimate_result(spec, found, limit))
    record(results_dir, stored)
    where = device_label(resolved, targets)
    title = f"{suite_obj.name}: predicted peak memory ({where}), {len(runs)} runs"
    if search is not None:
        assert limit is not None
        title = f"{suite_obj.name}: largest batch predicted to fit ({where})"
        out.print(max_batch_table(runs, estimates, limit, title=title, cuda=resolved == "cuda"))
    else:
        out.print(estimate_table(runs, estimates, limit, title=title))
        if targets:
            out.print(fit_table(runs, estimates, targets, title=f"{suite_obj.name}: largest batch predicted to fit"))
    if resolved == "cuda":
        assumed = targets[0].name if targets else f"{PRESETS[DEFAULT_PRESET].name} (default; no memory to judge)"
        out.print(
            f"CUDA estimate for {assumed}: fake CPU tensors with the CPU→CUDA deltas, replayed through a model of "
            "PyTorch's caching allocator (whole blocks, segments, cuBLAS workspaces); FITS = reserved + context + "
            "headroom ≤ the card's memory. Uncalibrated until scripts/gpu-validate.sh runs on a GPU.",
            style="dim",
        )
    failed = [e for e in estimates.values() if e.metrics is None]
    over = [e for e in estimates.values() if e.metrics is not None and fits(judged_bytes(e.metrics), limit) is False]
    for e in failed:
        err.print(f"estimate failed for {e.run_id}: {first_line(e.error)}")
    what = "configurations searched" if search is not None else "runs estimated"
    summary = f"{len(runs)} {what.replace('s ', ' ', 1) if len(runs) == 1 else what} in {fmt_seconds(elapsed)}"
    if limit is not None and search is None:
        summary += f": {len(runs) - len(over) - len(failed)} fit {targets[0].label}, {len(over)} over"
    if failed:
        summary += f", {len(failed)} failed"
    measured = suite_dir(results_dir, suite_obj.name)
    out.print(f"{summary} → {folder}/ (memory_source=estimate; measured rows stay in {measured}/)")
    if strict and (failed or over):
        raise typer.Exit(1)


def skip_predicted_oom(
    specs: Sequence[RunSpec], limit_text: str | None, gpus: Sequence[str], console: Console
) -> tuple[list[RunSpec], list[RunResult]]:
    """Estimate `specs`; the runs left to start, and a `skipped` row (for the caller to store) per run predicted
    over the limit."""
    if not specs:
        return [], []
    limit = memory_limit(limit_text, specs[0].device, gpus, "--memory-limit", required=True)
    assert limit is not None
    estimates = _estimate_with_progress(specs, console, DEFAULT_JOBS)
    keep, skipped = split_predicted_oom(specs, estimates, limit)
    for result in skipped:
        console.print(result_line(result))
    failed = sum(1 for s in keep if estimates.get(s.run_id) is None or estimates[s.run_id].metrics is None)
    console.print(
        f"--skip-predicted-oom: {len(skipped)} of {len(specs)} runs predicted over {fmt_bytes(limit)} and skipped"
        + (f"; {failed} could not be estimated and will run" if failed else "")
    )
    return keep, skipped


def run_auto_batch_command(
    suite: Suite,
    templates: Sequence[RunSpec],
    results_dir: Path,
    force: bool,
    dry_run: bool,
    strict: bool,
    limit_text: str | None,
    executor: Executor,
    out: Console,
    err: Console,
) -> None:
    """`petlbench run` on a `batch_size: auto` suite: per configuration, the largest batch that fits (real runs)."""
    if not templates:
        return
    r = suite.batch_range
    limit = memory_limit(limit_text, templates[0].device, visible_gpus(), "--memory-limit", required=True)
    assert limit is not None
    where = suite_dir(results_dir, suite.name)
    out.print(
        f"[bold]{suite.name}[/bold]: batch_size auto in [{r.min}, {r.max}] (multiples of {r.multiple_of}) under "
        f"{fmt_bytes(limit)}, {len(templates)} configurations on {templates[0].device} → {where}/"
    )
    if dry_run:
        out.print(runs_table(templates, title="configurations to search (shown at auto_batch.min)"))
        return
    search = SearchRequest(limit_bytes=limit, min=r.min, max=r.max, multiple_of=r.multiple_of)
    outcomes: list[AutoBatchOutcome] = []
    try:
        estimates = _estimate_with_progress(templates, out, DEFAULT_JOBS, search)
        stored = {} if force else stored_probes(where)

        def on_result(result: RunResult, fit: bool | None, reused: bool) -> None:
            out.print(probe_line(result, fit, reused, limit))

        for outcome in run_auto_batch(
            templates,
            estimates,
            limit,
            executor,
            results_dir,
            stored,
            r.min,
            r.max,
            r.multiple_of,
            on_result,
        ):
            outcomes.append(outcome)
            best = outcome.search.best if outcome.search else None
            t = outcome.template
            knob = f" {fmt_knob(t.knob_name, t.knob)}" if t.knob_name else ""
            out.print(
                f"→ {t.method}{knob} {t.precision}: max feasible batch {best if best else 'none'}"
                f" (predicted {outcome.predicted})",
                style="bold",
            )
    except KeyboardInterrupt:
        if outcomes:
            out.print(auto_batch_table(outcomes, limit, title=f"{suite.name}: finished searches"))
        err.print(f"interrupted: finished probes are saved in {where}/; run the same command to resume")
        raise typer.Exit(130) from None
    out.print(auto_batch_table(outcomes, limit, title=f"{suite.name}: max feasible batch per configuration"))
    if strict and any(o.failure or o.search is None or o.search.best is None for o in outcomes):
        raise typer.Exit(1)
