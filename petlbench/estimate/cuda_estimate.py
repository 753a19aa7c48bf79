"""A CUDA estimate's device side (torch-free): the replay plan for a run on a card, the row's CUDA columns, the
FITS rule and the largest-batch search. The estimator (petlbench/estimate/engine.py) calls these with its traces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from petlbench.columns import FitSearch, Metrics
from petlbench.errors import ConfigError
from petlbench.estimate.allocator import AllocatorConfig, AllocConfError, parse_alloc_conf
from petlbench.estimate.autobatch import linear_seed, search_max_batch
from petlbench.estimate.cuda_replay import DevicePlan, DeviceReplay
from petlbench.estimate.gpus import Target, required_bytes
from petlbench.estimate.workspaces import cublas_workspace_bytes, cublaslt_extra_bytes
from petlbench.spec.models import RunSpec

FIT_SEARCH_MAX: Final = 1 << 16  # the largest batch the fit table searches (an upper bound, "+" when it fits)


def allocator_config(target: Target) -> AllocatorConfig:
    try:
        return parse_alloc_conf(target.alloc_conf)
    except AllocConfError as exc:
        raise ConfigError(f"{exc}; fix or unset the variable") from None


def device_plan(spec: RunSpec, target: Target, load_order: tuple[int, ...] | None) -> DevicePlan:
    """How the worker would run `spec` on the target card: its allocator settings, workspaces and protocol."""
    return DevicePlan(
        config=allocator_config(target),
        limit=None,  # peaks as an unconstrained card would report them: a row does not depend on the card's size
        device_total=target.memory_bytes,
        cublas_bytes=cublas_workspace_bytes(target.capability, target.cublas_env),
        cublaslt_bytes=cublaslt_extra_bytes(target.capability, target.cublas_env),
        warmup_steps=spec.measure.warmup_steps,
        steps=spec.measure.steps,
        cpu_scalar_state=not spec.optimizer.fused,
        load_order=load_order,
    )


def record_device(metrics: Metrics, replay: DeviceReplay, target: Target, plan: DevicePlan) -> list[str]:
    """Fill a CUDA estimate's device columns from its replay; what is approximate about them (for the note)."""
    metrics.peak_allocated_bytes = replay.peak_allocated
    metrics.peak_reserved_bytes = replay.peak_reserved
    if replay.peak_infer_allocated is not None:
        metrics.peak_infer_bytes = replay.peak_infer_allocated
    metrics.workspace_bytes = replay.workspace_bytes
    metrics.infer_workspace_bytes = replay.infer_workspace_bytes if replay.peak_infer_allocated is not None else None
    metrics.attn_scratch_bytes = replay.attn_scratch_bytes
    metrics.gpu_preset = target.gpu
    metrics.context_bytes = target.context_bytes
    metrics.headroom_bytes = target.headroom_bytes if target.memory_bytes is not None else None
    metrics.alloc_conf = plan.config.describe()
    approximate = []
    if replay.scratch_approximate:
        approximate.append("attention-backward scratch of memory-efficient/cuDNN kernels")
    if plan.config.not_modelled:
        approximate.append("allocator options not modelled: " + ", ".join(plan.config.not_modelled))
    return approximate


def fits_card(reserved: int | None, target: Target) -> bool | None:
    """FITS: reserved + context + headroom ≤ the card's memory (and within a per-process memory fraction)."""
    needed = required_bytes(reserved, target)
    if needed is None or target.memory_bytes is None:
        return None
    fraction = allocator_config(target).per_process_memory_fraction
    return needed <= target.memory_bytes and (reserved or 0) <= fraction * target.memory_bytes


def search_fit(
    needs_at: Callable[[int], tuple[int | None, int | None, int | None]],
    memory: int,
    label: str,
    known: Iterable[int] = (),
    lo: int = 1,
    hi: int = FIT_SEARCH_MAX,
    multiple_of: int = 1,
) -> FitSearch:
    """The largest batch in [lo, hi] whose needs fit `memory`. `needs_at(batch)` gives (bytes judged against the
    memory, reserved, allocated); `known` are batches already estimated: the two largest seed the search on the
    line through them, so it probes only a few more."""
    at: dict[int, tuple[int | None, int | None, int | None]] = {}

    def probe(batch: int) -> tuple[int | None, int | None, int | None]:
        if batch not in at:
            at[batch] = needs_at(batch)
        return at[batch]

    def fits(batch: int) -> bool:
        needed = probe(batch)[0]
        return needed is not None and needed <= memory

    points = sorted({b for b in known if lo <= b <= hi and b >= 2})
    seed: int | None = None
    if len(points) >= 2:
        # secant steps on the line through the last two probes: the needs grow almost linearly with the batch,
        # so two steps land within a batch or two of the answer and the gallop below confirms it
        (b1, b2), seed = points[-2:], None
        for _ in range(3):
            n1, n2 = probe(b1)[0], probe(b2)[0]
            if n1 is None or n2 is None:
                break
            guess = min(max(linear_seed(b1, n1, b2, n2, memory), lo), hi)
            if guess in (b1, b2) or guess == seed:
                seed = guess
                break
            seed, b1, b2 = guess, b2, guess
    result = search_max_batch(fits, lo=lo, hi=hi, multiple_of=multiple_of, seed=seed)
    needed, reserved, allocated = probe(result.best) if result.best is not None else (None, None, None)
    return FitSearch(
        gpu=label,
        memory_bytes=memory,
        max_batch=result.best,
        first_over=result.first_over,
        reserved_bytes=reserved,
        allocated_bytes=allocated,
        required_bytes=needed,
    )
