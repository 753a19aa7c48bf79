"""Predicted memory before anything runs (parent side, torch-free): the estimator subprocess, limits, rows.

The parent never imports torch, so every estimate is made by one `python -m petlbench.estimate REQUEST OUT`
process for a whole list of runs (fake-tensor steps take a fraction of a second; imports take seconds). The
child reuses one fake model per model configuration across batch sizes and precisions.

Where estimate rows live: `results/<suite>.estimate/<run_id>.parquet`, with the same run_id as the measured run,
`suite` = `<suite>.estimate` and `memory_source = estimate`. A measured row and its estimate therefore never share
a file or a folder, and reading `results/` leaves estimate folders out unless one is named (results.result_files).
Rows of `run --skip-predicted-oom` are the exception by design: a skipped run is a result of the measured suite
(status `skipped`, retried on the next run), carrying the predicted peak with `memory_source = estimate`.

CUDA runs are estimated on fake CPU tensors with these CPU→CUDA deltas (MEASURE-NOTES.md §7), all uncalibrated
until a GPU run of scripts/gpu-validate.sh:

- every storage rounded up to 512 B (the caching allocator's block size), through the tracker's `round_to`;
- dropout masks as CUDA's fused kernel stores them (`native_dropout`: 1-byte bool mask, not a 4-byte float one);
- the optimizer implementation is whatever the spec pins (foreach / fused / single-tensor): the same code runs
  on fake tensors, so there is no foreach delta unless `foreach: true`, which is marked approximate;
- mixed precision runs under CPU autocast (CUDA's op lists differ) and fp16 without GradScaler (its inf check
  needs real values; it only adds scalars): marked approximate;
- attention dropout: CPU SDPA falls back to the math path (N×N saved), CUDA kernels do not: marked approximate;
- not added: the CUDA context (outside the allocator: NVML/driver only), cuBLAS/cuBLASLt workspaces (allocated
  through the caching allocator since torch 2.0, so visible in max_memory_allocated: tens of MiB on Hopper),
  and fragmentation (`max_memory_reserved` − `max_memory_allocated`). The validation kit reports these gaps.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict

from petlbench.errors import ConfigError
from petlbench.fmt import fmt_bytes, parse_bytes
from petlbench.gpus import gpu_memory_bytes
from petlbench.results import EnvValue, Metrics, RunResult, now_iso
from petlbench.suite import ESTIMATE_SUFFIX, Device, RunSpec

ESTIMATE_SOURCE: Final = "estimate"
MEASURED_SOURCES: Final = frozenset({"cuda_allocator", "cpu_tracker"})
# spec fields that do not change the built model, so one fake model serves every value of them
_PER_RUN_FIELDS: Final = {"suite", "timeout_s", "batch_size", "precision", "measure", "train", "device"}


class SearchRequest(BaseModel):
    """Search mode: for each spec, the largest batch predicted to fit `limit_bytes` (batch_size: auto)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit_bytes: int
    min: int = 1
    max: int = 4096
    multiple_of: int = 1


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    specs: list[RunSpec]
    search: SearchRequest | None = None


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


def fits(peak: int | None, limit: int | None) -> bool | None:
    """Whether a predicted peak fits; None when either is unknown."""
    if peak is None or limit is None:
        return None
    return peak <= limit


# ---------------------------------------------------------------------------------------------------------------
# CUDA deltas


def has_dropout(spec: RunSpec) -> bool:
    """Whether any dropout that F.dropout implements is on (backbone drop_rate, proj/pos dropout, tuner dropout)."""
    kwargs = spec.backbone.kwargs
    rates = [spec.backbone.drop_rate, spec.tuner_params.get("dropout")]
    rates += [kwargs.get(k) for k in ("proj_drop_rate", "pos_drop_rate")]
    return any(isinstance(p, int | float) and not isinstance(p, bool) and p > 0 for p in rates)


def estimate_caveats(spec: RunSpec) -> tuple[str | None, bool]:
    """(note, approximate) for a spec's estimate: the CPU→CUDA deltas applied and what is not modelled."""
    if spec.device != "cuda":
        return None, False
    applied = ["512-B rounding"]
    approx: list[str] = []
    kwargs = spec.backbone.kwargs
    if has_dropout(spec):
        applied.append("1-B dropout masks")
    attn_drop = kwargs.get("attn_drop_rate")
    if isinstance(attn_drop, int | float) and attn_drop > 0:
        approx.append("attention dropout (CPU SDPA falls back to math)")
    if spec.precision != "fp32":
        approx.append("CPU autocast op lists stand in for CUDA's")
    if spec.precision == "fp16-mixed":
        approx.append("no GradScaler")
    if spec.optimizer.foreach:
        approx.append("foreach temporaries from the CPU fallback")
    note = "cuda deltas: " + ", ".join(applied)
    if approx:
        note += "; approximate: " + ", ".join(approx)
    return note, bool(approx)


# ---------------------------------------------------------------------------------------------------------------
# Rows


def estimate_result(spec: RunSpec, estimate: Estimate, limit: int | None) -> RunResult:
    """The row `petlbench estimate` stores for a run: suite `<suite>.estimate`, same run_id, memory_source=estimate."""
    metrics = estimate.metrics.model_copy() if estimate.metrics is not None else Metrics(memory_source=ESTIMATE_SOURCE)
    metrics.memory_limit_bytes = limit
    return RunResult(
        spec=spec.model_copy(update={"suite": spec.suite + ESTIMATE_SUFFIX}),
        status="ok" if estimate.metrics is not None else "error",
        error=estimate.error,
        metrics=metrics,
        env=estimate.env,
        created_at=now_iso(),
        duration_s=estimate.seconds,
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


def _chunks(specs: Sequence[RunSpec], jobs: int) -> list[list[RunSpec]]:
    """Split specs into at most `jobs` lists, keeping each model configuration in one list (its model is reused).

    A process costs seconds of imports, so there is one per three configurations at most.
    """
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(model_key(spec), []).append(spec)
    chunks: list[list[RunSpec]] = [[] for _ in range(max(1, min(jobs, -(-len(groups) // 3))))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(chunks, key=len).extend(group)
    return [c for c in chunks if c]


def run_estimates(
    specs: Sequence[RunSpec],
    search: SearchRequest | None = None,
    jobs: int = 1,
    on_progress: Progress | None = None,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> dict[str, Estimate]:
    """Estimate every spec in `jobs` `python -m petlbench.estimate` processes; run_id → Estimate.

    A process that dies turns its specs into Estimates with an error (the log tail), never an exception.
    """
    if not specs:
        return {}
    chunks = _chunks(specs, jobs)
    total = len(specs)
    events: queue.Queue[str | None] = queue.Queue()
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="petlbench-estimate-") as tmp:
        procs: list[tuple[subprocess.Popen[str], Path, Path, list[RunSpec]]] = []
        try:
            for i, chunk in enumerate(chunks):
                request, out, log = Path(tmp) / f"request{i}.json", Path(tmp) / f"out{i}.json", Path(tmp) / f"log{i}"
                request.write_text(EstimateRequest(specs=chunk, search=search).model_dump_json())
                with log.open("w") as log_file:
                    proc = subprocess.Popen(
                        [python, "-m", "petlbench.estimate", str(request), str(out)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        text=True,
                        env=child_env,
                        start_new_session=True,
                    )
                procs.append((proc, out, log, chunk))
                threading.Thread(target=_pump, args=(proc, events), daemon=True).start()
            done, running = 0, len(procs)
            while running:
                line = events.get()
                if line is None:
                    running -= 1
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    label = str(json.loads(line)["label"])
                    done += 1
                    if on_progress:
                        on_progress(done, total, label)
            results: dict[str, Estimate] = {}
            for proc, out, log, chunk in procs:
                code = proc.wait()
                results.update(_read_output(out, log, code, chunk))
            return results
        finally:
            for proc, *_ in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _pump(proc: subprocess.Popen[str], events: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        events.put(line)
    events.put(None)


def _read_output(out: Path, log: Path, code: int, chunk: Sequence[RunSpec]) -> dict[str, Estimate]:
    if code == 0 and out.exists():
        response = EstimateResponse.model_validate_json(out.read_text())
        return {e.run_id: e for e in response.estimates}
    tail = "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-10:]) if log.exists() else ""
    error = f"estimator process exited with code {code} without a result\n{tail}".rstrip()
    return {spec.run_id: Estimate(run_id=spec.run_id, error=error) for spec in chunk}
