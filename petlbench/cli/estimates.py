"""`petlbench estimate` and the options `run` shares with it (--skip-predicted-oom, --memory-limit).

The command parses, calls the core (petlbench/run/predict.py), renders (petlbench/cli/estimate_tables.py) and
maps errors to exit codes. Torch-free: every estimate runs in `python -m petlbench.estimate.engine` subprocesses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from petlbench.cli.console import err, fail, progress_bar
from petlbench.cli.estimate_tables import show_prediction
from petlbench.cli.options import checked_jobs
from petlbench.errors import PetlbenchError
from petlbench.estimate.gpus import DEFAULT_HEADROOM, PRESETS
from petlbench.run.predict import Prediction, PredictRequest, predict
from petlbench.run.sweep import builtin_quickstart

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


SuiteArg = Annotated[
    Path | None, typer.Argument(help="suite YAML to estimate; omit it for the built-in quickstart", show_default=False)
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cpu or cuda (auto = cuda); overrides the suite's `device`. cuda needs no GPU here: it predicts "
        "CUDA's max_memory_allocated and max_memory_reserved",
        show_default=False,
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="GPU presets to judge CUDA runs on (FITS/OOM: the first), e.g. h100-80gb,a100-40gb,rtx-4090; "
        f"also prints the largest batch that fits each. Known: {', '.join(PRESETS)}",
        show_default=False,
    ),
]
DeviceMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--device-memory",
        help="memory of a device without a preset, e.g. 80GiB; a comma list (24GiB,48GiB,80GiB) also prints the "
        "largest batch that fits each size (FITS/OOM: the first); default: the visible GPU's (CUDA), else none",
        show_default=False,
    ),
]
HeadroomOpt = Annotated[
    str,
    typer.Option(
        "--headroom",
        help="CUDA: memory kept free beyond reserved + context when judging FITS, as a share of the card (2%) "
        "or a size (1GiB)",
    ),
]
ResultsDirOpt = Annotated[Path, typer.Option("--results-dir", help="rows go to <results-dir>/<suite>.estimate/")]
JobsOpt = Annotated[
    int, typer.Option("--jobs", help="estimator processes (each about 0.8 GB RSS), at most one per CPU core")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="exit 1 if a run is predicted not to fit or cannot be estimated")
]


def estimate(
    suite: SuiteArg = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = None,
    device_memory: DeviceMemoryOpt = None,
    headroom: HeadroomOpt = DEFAULT_HEADROOM,
    results_dir: ResultsDirOpt = Path("results"),
    jobs: JobsOpt = DEFAULT_JOBS,
    strict: StrictOpt = False,
) -> None:
    """Predict every run's peak memory without running it: fake tensors, no GPU, no real memory.

    Prints the predicted peak per run (weights, gradients, optimizer state, activations, inference), and with
    --gpu or --device-memory FITS/OOM and the largest batch that fits each card; stores rows with
    memory_source=estimate under results/<suite>.estimate/, apart from measured rows. On CPU the estimate equals
    the measurement to the byte and ends with the plan's time on this CPU; CUDA runs are traced as CUDA runs them
    and replayed through a model of its caching allocator (uncalibrated until a GPU validation run). A
    `batch_size: auto` suite gets the largest batch predicted to fit, per configuration.

    Example: petlbench estimate suites/memory.yaml --gpu h100-80gb,a100-40gb,rtx-4090
    """
    try:
        jobs = checked_jobs(jobs, "estimator processes")
        where = suite or builtin_quickstart()
        request = PredictRequest(where, device, device_memory, results_dir, jobs, suite is None, gpu, headroom)
        with progress_bar("estimating") as progress:
            task = progress.add_task("starting (importing torch)", total=None)
            events = predict(request)
            while True:
                event = next(events)
                progress.update(task, completed=event.done, total=event.total, description=event.label)
    except StopIteration as stop:
        prediction: Prediction = stop.value
    except KeyboardInterrupt:
        err.print("interrupted: nothing was stored")
        raise typer.Exit(130) from None
    except PetlbenchError as exc:
        fail(exc)
    show_prediction(prediction)
    if strict and (prediction.failed or prediction.over):
        raise typer.Exit(1)
