"""Predicted memory before anything runs (parent side, torch-free): the estimator subprocess, limits, rows.

The parent never imports torch, so estimates are made by `python -m petlbench.estimate.engine` processes (up to
`--jobs`, default 2), each serving one model configuration at a time over stdin/stdout and reusing one fake model
for all of its batch sizes and precisions (imports take seconds; a configuration takes seconds, a run milliseconds
once its configuration is traced).

Where estimate rows live: `results/<suite>.estimate/<run_id>.parquet`, with the same run_id as the measured run,
`suite` = `<suite>.estimate` and `memory_source = estimate`. A measured row and its estimate therefore never share
a file or a folder, and reading `results/` leaves estimate folders out unless one is named (results.result_files).
Rows of `run --skip-predicted-oom` are the exception by design: a skipped run is a result of the measured suite
(status `skipped`, retried on the next run), carrying the predicted peak with `memory_source = estimate`.

CUDA runs are traced on fake CPU tensors as a CUDA GPU runs them (petlbench/estimate/cuda.py) and the trace is
replayed through a model of the caching allocator on the target card (docs/estimation.md), uncalibrated until a GPU
run of scripts/gpu-validate.sh:

- CUDA's autocast policy (its op lists, not CPU's), its dropout and softmax kernels, the attention kernel CUDA's
  selector picks for the target GPU (an H100 unless told otherwise), and fp16's GradScaler;
- the traced step replayed through the caching-allocator model (petlbench/estimate/cuda_replay.py): whole blocks
  for `max_memory_allocated`, segments for `max_memory_reserved`, the worker's history before the measured steps,
  the cuBLAS workspaces (one per thread's handle) and the attention kernels' backward scratch;
- the optimizer implementation is whatever the spec pins (foreach / fused / single-tensor): the same code runs
  on fake tensors, so there is no foreach delta unless `foreach: true`, which is marked approximate;
- the card (petlbench/estimate/gpus.py): its compute capability sets the attention kernel and the workspace size;
  its memory, the CUDA context outside the allocator (an estimate per card) and a headroom decide FITS, from the
  reserved memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict

from petlbench.columns import FitSearch, Metrics
from petlbench.errors import ConfigError
from petlbench.estimate.gpus import CUSTOM, DEFAULT_HEADROOM, Target, preset, target_for
from petlbench.executors.process import clean_stale_temp, kill_group, start, temp_dir
from petlbench.fmt import fmt_bytes, parse_bytes
from petlbench.measure.nvml import gpu_memory_bytes
from petlbench.results import EnvValue, RunResult, now_iso
from petlbench.spec.base import StrictModel
from petlbench.spec.models import ESTIMATE_SUFFIX, Device, RunSpec
from petlbench.tuners import make_tuner
from petlbench.why import WhyData

ESTIMATE_SOURCE: Final = "estimate"
MEASURED_SOURCES: Final = frozenset({"cuda_allocator", "cpu_tracker"})
# spec fields that do not change the built model, so one fake model serves every value of them
_PER_RUN_FIELDS: Final = {"suite", "timeout_s", "batch_size", "precision", "measure", "train", "device"}


class SearchRequest(StrictModel):
    """Search mode: for each spec, the largest batch predicted to fit `limit_bytes` (batch_size: auto)."""

    limit_bytes: int
    min: int = 1
    max: int = 4096
    multiple_of: int = 1


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    specs: list[RunSpec]
    search: SearchRequest | None = None
    # CUDA: the cards to assume (rows use the first; default: petlbench.estimate.gpus.DEFAULT_PRESET) and whether
    # to search each configuration's largest batch that fits each of them
    targets: list[Target] = []
    fit_search: bool = False


class Estimate(BaseModel):
    """One spec's estimate (or why there is none)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    metrics: Metrics | None = None
    error: str | None = None
    seconds: float = 0.0
    # search mode: the largest batch predicted to fit, the smallest tried that did not, and every (batch, peak)
    max_batch: int | None = None
    first_over: int | None = None
    probes: list[tuple[int, int]] = []
    env: dict[str, EnvValue] = {}
    why: WhyData | None = None  # the step's timeline and peak attribution (stored beside the estimate row)
    fits: list[FitSearch] = []  # per card, the largest batch of this run's configuration that fits (fit search)


class EstimateResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimates: list[Estimate]


def model_key(spec: RunSpec) -> str:
    """Specs with the same key build the same model and optimizer (the estimator reuses one fake model for them)."""
    return json.dumps(spec.model_dump(mode="json", exclude=_PER_RUN_FIELDS), sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Devices and limits


def estimate_device(requested: str) -> Device:
    """The device whose runs to predict: `cpu` or `cuda`, and `auto` means cuda, with or without a GPU here.

    Unlike `run` (suite.resolve_device), cuda needs no GPU: predicting GPU runs before paying for a GPU is the point.
    """
    if requested in ("cuda", "auto"):
        return "cuda"
    if requested == "cpu":
        return "cpu"
    raise ConfigError(f"--device: expected auto, cpu or cuda, got {requested!r}")


def parse_limit(text: str, option: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def memory_limit(text: str | None, device: Device, gpus: Sequence[str], option: str, required: bool) -> int | None:
    """The limit runs are judged against: `text` if given, else the first visible GPU's memory for CUDA runs.

    CPU runs have no natural limit: with `required` a missing one is a one-line ConfigError.
    """
    if text is not None:
        return parse_limit(text, option)
    if device == "cuda" and gpus:
        total = gpu_memory_bytes(gpus[0])
        if total is not None:
            return total
        if required:
            raise ConfigError(f"{option}: could not read GPU {gpus[0]}'s memory through NVML; give it, e.g. 80GiB")
    if required:
        what = "CPU runs" if device == "cpu" else "CUDA runs without a visible GPU"
        raise ConfigError(f"{option}: required for {what} (there is no device memory to default to), e.g. 16GiB")
    return None


def targets_for(
    device: Device,
    gpu: str | None,
    device_memory: str | None,
    visible: Sequence[str],
    headroom: str = DEFAULT_HEADROOM,
    required: bool = False,
) -> list[Target]:
    """The cards (`--gpu`, comma list of presets) or memory sizes (`--device-memory`) an estimate is judged on;
    without either, the first visible GPU's memory for CUDA runs. [] when there is none (no verdict)."""
    if gpu and device_memory:
        raise ConfigError("--gpu and --device-memory: give one (--device-memory is for a GPU without a preset)")
    if gpu:
        if device != "cuda":
            raise ConfigError("--gpu: presets are CUDA cards; use --device cuda, or --device-memory for CPU runs")
        return [target_for(preset(name), None, headroom) for name in gpu.split(",") if name.strip()]
    texts = [t.strip() for t in device_memory.split(",")] if device_memory else [None]
    sizes = [memory_limit(t, device, visible, "--device-memory", required) for t in texts]
    if device == "cuda":
        return [target_for(None, size, headroom) for size in sizes if size is not None]
    return [Target(gpu=CUSTOM, name=fmt_bytes(size), capability=(0, 0), memory_bytes=size) for size in sizes if size]


def fits(peak: int | None, limit: int | None) -> bool | None:
    """Whether a predicted peak fits; None when either is unknown."""
    if peak is None or limit is None:
        return None
    return peak <= limit


def judged_bytes(metrics: Metrics | None) -> int | None:
    """What an estimate row is judged against the device memory with: for a CUDA estimate that assumed a card,
    reserved + context + headroom (petlbench/estimate/gpus.py); otherwise the peak (max_memory_allocated)."""
    if metrics is None:
        return None
    if metrics.context_bytes is not None and metrics.peak_reserved_bytes is not None:
        return metrics.peak_reserved_bytes + metrics.context_bytes + (metrics.headroom_bytes or 0)
    return metrics.peak_allocated_bytes


# ---------------------------------------------------------------------------------------------------------------
# CUDA deltas


def has_dropout(spec: RunSpec) -> bool:
    """Whether any dropout is on in training: the tuner's own layers', and the backbone's (drop_rate, proj/pos/
    attention dropout) unless the tuner keeps the backbone in eval mode (`backbone_mode='eval'`)."""
    tuner = make_tuner(spec.tuner, spec.tuner_params)
    rates: list[object] = list(tuner.dropout_rates())
    if tuner.backbone_mode == "train":
        kwargs = spec.backbone.kwargs
        rates += [
            spec.backbone.drop_rate,
            *(kwargs.get(k) for k in ("proj_drop_rate", "pos_drop_rate", "attn_drop_rate")),
        ]
    return any(isinstance(p, int | float) and not isinstance(p, bool) and p > 0 for p in rates)


def estimate_caveats(spec: RunSpec) -> tuple[str | None, bool]:
    """(note, approximate) for a spec's estimate: the CPU→CUDA deltas applied and what is not modelled."""
    if spec.device != "cuda":
        return None, False
    applied = ["caching-allocator model", "cuBLAS workspaces"]
    if has_dropout(spec):
        applied.append("1-B dropout masks")
    if spec.precision != "fp32":
        applied.append("CUDA autocast lists")
    if spec.precision == "fp16-mixed":
        applied.append("GradScaler")
    applied.append("the target GPU's SDPA kernel")
    approx: list[str] = []
    if spec.optimizer.foreach:
        approx.append("foreach temporaries from the CPU fallback")
    note = "cuda deltas: " + ", ".join(applied)
    if approx:
        note += "; approximate: " + ", ".join(approx)
    return note, bool(approx)


# ---------------------------------------------------------------------------------------------------------------
# Rows


def estimate_result(spec: RunSpec, estimate: Estimate) -> RunResult:
    """The row `petlbench estimate` stores for a run: suite `<suite>.estimate`, same run_id, memory_source=estimate.
    It carries no memory limit: whether it fits is judged when reading, against any size."""
    metrics = estimate.metrics.model_copy() if estimate.metrics is not None else Metrics(memory_source=ESTIMATE_SOURCE)
    if estimate.fits:
        metrics.fits_json = json.dumps([f.model_dump(mode="json") for f in estimate.fits])
    return RunResult(
        spec=spec.model_copy(update={"suite": spec.suite + ESTIMATE_SUFFIX}),
        status="ok" if estimate.metrics is not None else "error",
        error=estimate.error,
        metrics=metrics,
        env=estimate.env,
        created_at=now_iso(),
        duration_s=estimate.seconds,
        why=estimate.why,
    )


def skipped_result(spec: RunSpec, estimate: Estimate, limit: int) -> RunResult:
    """The measured suite's row for a run `--skip-predicted-oom` did not start: status skipped, the predicted peak."""
    assert estimate.metrics is not None and estimate.metrics.peak_allocated_bytes is not None
    metrics = estimate.metrics.model_copy()
    metrics.memory_limit_bytes = limit
    peak = metrics.peak_allocated_bytes
    return RunResult(
        spec=spec,
        status="skipped",
        error=(
            f"skipped: predicted peak {fmt_bytes(peak)} ({peak:,} B, estimate) > memory limit {fmt_bytes(limit)} "
            f"({limit:,} B); --skip-predicted-oom did not run it"
        ),
        metrics=metrics,
        env=estimate.env,
        created_at=now_iso(),
        duration_s=estimate.seconds,
    )


def split_predicted_oom(
    specs: Sequence[RunSpec], estimates: Mapping[str, Estimate], limit: int
) -> tuple[list[RunSpec], list[RunResult]]:
    """(runs to start, skipped rows): a run is skipped only when its estimate exists and is over the limit."""
    keep: list[RunSpec] = []
    skipped: list[RunResult] = []
    for spec in specs:
        estimate = estimates.get(spec.run_id)
        peak = estimate.metrics.peak_allocated_bytes if estimate and estimate.metrics else None
        if estimate is not None and fits(peak, limit) is False:
            skipped.append(skipped_result(spec, estimate, limit))
        else:
            keep.append(spec)
    return keep, skipped


# ---------------------------------------------------------------------------------------------------------------
# The estimator subprocess

Progress = Callable[[int, int, str], None]  # (done, total, label of the run just estimated)


@dataclass(frozen=True)
class Estimating:
    """Progress of a batch of estimates: `done` of `total`, `label` the run just estimated."""

    done: int
    total: int
    label: str


TEMP_PREFIX: Final = "petlbench-estimate-"  # + owner PID, see process.clean_stale_temp
MESSAGE_PREFIX: Final = "@petlbench-estimate "  # marks the child's protocol lines on its stdout


def groups_of(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """Specs grouped by model configuration (suite order): a group shares one fake model in the estimator."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(model_key(spec), []).append(spec)
    return list(groups.values())


def processes_for(groups: int, jobs: int) -> int:
    """A process costs seconds of imports, so one per three configurations at most."""
    return max(1, min(jobs, -(-groups // 3)))


def run_estimates(
    specs: Sequence[RunSpec],
    search: SearchRequest | None = None,
    jobs: int = 1,
    on_progress: Progress | None = None,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    targets: Sequence[Target] = (),
    fit_search: bool = False,
) -> dict[str, Estimate]:
    """Estimate every spec (`estimating`), calling `on_progress(done, total, label)` as they finish; run_id →
    Estimate."""
    events = estimating(specs, search, jobs, python, env, targets, fit_search)
    while True:
        try:
            done, total, label = next(events)
        except StopIteration as stop:
            answer: dict[str, Estimate] = stop.value
            return answer
        if on_progress is not None:
            on_progress(done, total, label)


def estimating(
    specs: Sequence[RunSpec],
    search: SearchRequest | None = None,
    jobs: int = 1,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    targets: Sequence[Target] = (),
    fit_search: bool = False,
) -> Generator[tuple[int, int, str], None, dict[str, Estimate]]:
    """Estimate every spec in up to `jobs` `python -m petlbench.estimate.engine` processes, yielding (done, total,
    label of the run just estimated) as they finish; returns run_id → Estimate. CUDA runs assume `targets[0]` (the
    default GPU preset without one); with `fit_search` each configuration also gets, per target, the largest batch
    that fits it.

    Each process serves requests on stdin, one model configuration at a time, and takes the next configuration when
    it is done (configurations differ tenfold in cost, so a static split leaves one process idle). A process that
    dies turns its configuration into Estimates with an error (its log tail), never an exception. Closing the
    generator (or an interrupt) kills the processes.
    """
    if not specs:
        return {}
    groups = groups_of(specs)
    work: queue.Queue[list[RunSpec]] = queue.Queue()
    for group in groups:
        work.put(group)
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    results: dict[str, Estimate] = {}
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    total, done = len(specs), 0
    clean_stale_temp(TEMP_PREFIX)  # left by a parent killed with -9
    tmp = temp_dir(TEMP_PREFIX)
    try:
        procs: list[subprocess.Popen[str]] = []
        try:
            for i in range(processes_for(len(groups), jobs)):
                log = tmp / f"log{i}"
                with log.open("w") as log_file:
                    proc = start(
                        [python, "-m", "petlbench.estimate.engine"],
                        child_env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        text=True,
                    )
                procs.append(proc)
                request = EstimateRequest(specs=[], search=search, targets=list(targets), fit_search=fit_search)
                threading.Thread(target=_serve, args=(proc, log, work, request, events), daemon=True).start()
            running = len(procs)
            last_error = "every estimator process exited"
            while running:
                kind, payload = events.get()
                if kind == "exit":
                    running -= 1
                elif kind == "result":
                    assert isinstance(payload, dict)
                    results.update(payload)
                    died = [e.error for e in payload.values() if e.error and e.error.startswith("estimator process")]
                    last_error = died[0] if died else last_error
                elif kind == "progress":
                    done += 1
                    yield done, total, str(payload)
            while not work.empty():  # every process died before taking these
                for spec in work.get():
                    results[spec.run_id] = Estimate(run_id=spec.run_id, error=last_error)
            return results
        finally:
            for proc in procs:
                kill_group(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(
    proc: subprocess.Popen[str],
    log: Path,
    work: queue.Queue[list[RunSpec]],
    template: EstimateRequest,
    events: queue.Queue[tuple[str, object]],
) -> None:
    """Feed one estimator process configurations until none is left (runs in a thread per process)."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        while True:
            try:
                group = work.get_nowait()
            except queue.Empty:
                break
            response: EstimateResponse | None = None
            try:
                proc.stdin.write(template.model_copy(update={"specs": group}).model_dump_json() + "\n")
                proc.stdin.flush()
                while response is None:
                    line = proc.stdout.readline()
                    if not line:
                        break
                    if not line.startswith(MESSAGE_PREFIX):
                        continue  # something else printed to stdout
                    message = json.loads(line[len(MESSAGE_PREFIX) :])
                    if "label" in message:
                        events.put(("progress", message["label"]))
                    elif "response" in message:
                        response = EstimateResponse.model_validate(message["response"])
            except (OSError, ValueError):
                response = None
            if response is None:
                code = proc.wait()
                events.put(("result", _died(log, code, group)))
                return
            events.put(("result", {e.run_id: e for e in response.estimates}))
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.wait()
    finally:
        events.put(("exit", None))


def _died(log: Path, code: int, group: Sequence[RunSpec]) -> dict[str, Estimate]:
    tail = "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-10:]) if log.exists() else ""
    error = f"estimator process exited with code {code} without a result\n{tail}".rstrip()
    return {spec.run_id: Estimate(run_id=spec.run_id, error=error) for spec in group}
