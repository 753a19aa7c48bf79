"""What a CUDA worker's allocator reports, replayed from the estimator's trace of one training step (torch-free).

A CUDA run's `max_memory_reserved` depends on everything the process allocated before the measured steps, because
the caching allocator keeps every segment it reserved. `replay_run` therefore replays the worker's protocol
(petlbench/worker.py) through the allocator model (petlbench/estimate/allocator.py):

1. the weights, tensor by tensor in the order `module.to(device)` moves them, then the batch (x, then y);
2. with `measure.inference`: two inference forwards (warm-up, then the measured one after a peak reset: the
   inference peak);
3. the warm-up training steps: step 1 creates the optimizer state when the optimizer phase begins (AdamW/SGD make
   it lazily in their first `step()`), later steps are the traced step as it is;
4. a peak reset (`torch.cuda.reset_peak_memory_stats`), then the measured steps. The allocator is deterministic and
   every step frees what it allocated, so once a step leaves the allocator as it found it, every later step repeats
   it exactly: the replay stops there.

Around the trace, what it never sees (petlbench/estimate/workspaces.py): a cuBLAS workspace at the first matrix
product of each thread (forward and optimizer on the main thread, backward on autograd's device thread), kept for
the life of the process, and the attention kernels' backward scratch, allocated and freed inside their op. Both
key on the op markers the tracker logs (petlbench/measure/tracker.py, `OP` events). Optimizer state of zero
dimensions (AdamW's `step`) stays on the CPU unless the optimizer is fused or capturable, so it is left out.

The event kinds are the tracker's (kept here so this module needs no torch; tests/test_cuda_replay.py checks them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from petlbench.estimate.allocator import AllocatorConfig, Block, CachingAllocator, OutOfMemory
from petlbench.estimate.workspaces import APPROXIMATE_SCRATCH, ATTENTION_BACKWARD_OPS, attention_backward_scratch

# event kinds and phases, as in petlbench.measure.tracker
ALLOC: Final = 0
FREE: Final = 1
RETAG: Final = 2
RESET: Final = 3
PHASE: Final = 4
OP: Final = 5
FORWARD, BACKWARD, OPTIMIZER = 0, 1, 2
# OP markers: the event's nbytes field is an index into MARKED_OPS; its key a storage key (or -1)
BLAS: Final = "blas"  # the first matrix product after a phase marker
MARKED_OPS: Final = (BLAS, *ATTENTION_BACKWARD_OPS)


class TimelineLike(Protocol):
    """What the replay reads of a tracker Timeline."""

    @property
    def events(self) -> Sequence[tuple[int, int, str, int]]: ...

    @property
    def shapes(self) -> Sequence[tuple[int, ...]]: ...


@dataclass(frozen=True)
class DevicePlan:
    """The device and the protocol a CUDA run is replayed under."""

    config: AllocatorConfig = field(default_factory=AllocatorConfig)
    limit: int | None = None  # bytes the allocator may reserve; None: unlimited
    device_total: int | None = None  # for a per-process memory fraction
    cublas_bytes: int = 0  # one handle's cuBLAS workspace
    cublaslt_bytes: int = 0  # one handle's own cuBLASLt workspace (0 when unified with cuBLAS's)
    warmup_steps: int = 2
    steps: int = 5
    cpu_scalar_state: bool = True  # 0-dim optimizer state lives on the CPU (not fused, not capturable)
    load_order: tuple[int, ...] | None = None  # registered weights (by position) in the order `.to()` moves them


@dataclass
class DeviceReplay:
    """What the worker would read off the allocator (None where the replay ran out of memory before)."""

    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_infer_allocated: int | None = None
    workspace_bytes: int = 0  # cuBLAS/cuBLASLt workspaces held at the end of the training steps
    infer_workspace_bytes: int = 0  # the same, during the inference forwards
    attn_scratch_bytes: int = 0  # the largest attention-backward scratch of one op
    scratch_approximate: bool = False  # a scratch size is an approximation (memory-efficient, cuDNN)
    alloc_retries: int = 0  # reservations that needed the cache released first
    oom: str | None = None  # where the limit was exceeded ("load", "inference", "warm-up step 1", "step 2", ...)
    steps_replayed: int = 0
    unknown_ops: list[str] = field(default_factory=list)


@dataclass
class _Compiled:
    """A timeline split for replay: registered tensors by category, and the step as (kind, key, value) triples."""

    weights: list[tuple[int, int]]  # (key, bytes), registration order
    optimizer: list[tuple[int, int, tuple[int, ...]]]  # (key, bytes, shape)
    activations: list[tuple[int, int]]  # (key, bytes): the batch
    gradients: list[tuple[int, int]]
    body: list[tuple[int, int, int]]  # ALLOC (key, bytes) / FREE (key) / PHASE (phase) / OP (kind code, bytes)
    scratch: dict[int, list[int]]  # OP body index → scratch sizes
    scratch_approximate: bool
    keys: int  # storage keys run from 0 to keys - 1 (live blocks sit in a list indexed by key)
    allocs: list[int]  # the keys the body allocates (what may still be live when it ends)


_WORKSPACE: Final = -1  # body entry kinds beside ALLOC/FREE/PHASE
_SCRATCH: Final = -2


def compile_timeline(timeline: TimelineLike) -> _Compiled:
    """Split a tracker timeline once; every replay of it then walks a short list of triples."""
    events = timeline.events
    # registered tensors end at the first phase marker (or, in a trace without one, after the last peak reset)
    start = next((i for i, e in enumerate(events) if e[0] == PHASE), None)
    if start is None:
        start = max((i + 1 for i, e in enumerate(events) if e[0] == RESET), default=0)
    weights: list[tuple[int, int]] = []
    optimizer: list[tuple[int, int, tuple[int, ...]]] = []
    activations: list[tuple[int, int]] = []
    gradients: list[tuple[int, int]] = []
    for kind, key, category, nbytes in events[:start]:
        if kind != ALLOC:
            continue
        if category == "weights":
            weights.append((key, nbytes))
        elif category == "optimizer":
            optimizer.append((key, nbytes, timeline.shapes[key] if key < len(timeline.shapes) else ()))
        elif category == "gradients":
            gradients.append((key, nbytes))
        else:
            activations.append((key, nbytes))
    body: list[tuple[int, int, int]] = []
    scratch: dict[int, list[int]] = {}
    approximate = False
    for kind, key, _category, nbytes in events[start:]:
        if kind == ALLOC:
            body.append((ALLOC, key, nbytes))
        elif kind == FREE:
            body.append((FREE, key, 0))
        elif kind == PHASE:
            body.append((PHASE, key, 0))
        elif kind == OP and 0 <= nbytes < len(MARKED_OPS):
            name = MARKED_OPS[nbytes]
            if name == BLAS:
                body.append((_WORKSPACE, 0, 0))
                continue
            kernel = ATTENTION_BACKWARD_OPS[name]
            shape = timeline.shapes[key] if 0 <= key < len(timeline.shapes) else ()
            sizes = attention_backward_scratch(kernel, shape)
            if sizes:
                scratch[len(body)] = sizes
                body.append((_SCRATCH, 0, 0))
                approximate |= kernel in APPROXIMATE_SCRATCH
    keys = max((e[1] for e in events if e[0] == ALLOC), default=-1) + 1
    allocs = [key for kind, key, _ in body if kind == ALLOC]
    return _Compiled(weights, optimizer, activations, gradients, body, scratch, approximate, keys, allocs)


class _Run:
    """The allocator and the live blocks of one replayed process."""

    def __init__(self, plan: DevicePlan) -> None:
        self.plan = plan
        self.alloc = CachingAllocator(plan.config, plan.limit, plan.device_total)
        self.threads: dict[int, list[Block]] = {}  # thread (0 main, 1 autograd) → its workspace blocks
        self.max_scratch = 0

    def workspace(self, thread: int) -> None:
        if thread in self.threads:
            return
        blocks = []
        for nbytes in (self.plan.cublas_bytes, self.plan.cublaslt_bytes):
            if nbytes > 0:
                blocks.append(self.alloc.malloc(nbytes))
        self.threads[thread] = blocks

    def workspace_bytes(self) -> int:
        return sum(b.size for blocks in self.threads.values() for b in blocks)

    def step(
        self,
        compiled: _Compiled,
        slots: list[Block | None],
        create_state: list[tuple[int, int]] | None = None,
    ) -> None:
        """Replay one traced region (`slots[key]`: the live block of storage `key`); free what it left allocated
        (tensors that die right after it)."""
        alloc = self.alloc
        malloc, free = alloc.malloc, alloc.free
        phase = FORWARD
        scratch = compiled.scratch
        for i, (kind, key, value) in enumerate(compiled.body):
            if kind == ALLOC:
                slots[key] = malloc(value)
            elif kind == FREE:
                block = slots[key]
                if block is not None:
                    slots[key] = None
                    free(block)
            elif kind == PHASE:
                phase = key
                if key == OPTIMIZER and create_state is not None:
                    for state_key, nbytes in create_state:
                        slots[state_key] = malloc(nbytes)
            elif kind == _WORKSPACE:
                self.workspace(1 if phase == BACKWARD else 0)
            else:  # _SCRATCH
                blocks = [malloc(n) for n in scratch[i]]
                self.max_scratch = max(self.max_scratch, sum(b.size for b in blocks))
                for block in reversed(blocks):
                    free(block)
        for key in compiled.allocs:
            block = slots[key]
            if block is not None:
                slots[key] = None
                free(block)


def replay_run(train: TimelineLike, infer: TimelineLike | None, plan: DevicePlan) -> DeviceReplay:
    """The peaks a CUDA worker would measure for this traced step under `plan` (module docstring)."""
    return replay_compiled(compile_timeline(train), compile_timeline(infer) if infer is not None else None, plan)


def replay_compiled(train: _Compiled, infer: _Compiled | None, plan: DevicePlan) -> DeviceReplay:
    run = _Run(plan)
    alloc = run.alloc
    result = DeviceReplay(scratch_approximate=train.scratch_approximate)
    where = "load"
    try:
        slots: list[Block | None] = [None] * train.keys
        weights = train.weights
        order = plan.load_order if plan.load_order is not None and len(plan.load_order) == len(weights) else None
        for i in order if order is not None else range(len(weights)):
            key, nbytes = weights[i]
            slots[key] = alloc.malloc(nbytes)
        for key, nbytes in train.activations:  # the batch, moved after the model
            slots[key] = alloc.malloc(nbytes)
        for key, nbytes in train.gradients:  # gradients kept between steps (zero_grad without set_to_none)
            slots[key] = alloc.malloc(nbytes)

        if infer is not None:
            where = "inference"
            shared = _map_registered(infer, train, slots)
            run.step(infer, shared)
            alloc.reset_peak()
            run.step(infer, shared)
            result.peak_infer_allocated = alloc.stats.peak_allocated
            result.infer_workspace_bytes = run.workspace_bytes()

        state = [(key, nbytes) for key, nbytes, shape in train.optimizer if not (plan.cpu_scalar_state and shape == ())]
        where = "warm-up step 1"
        run.step(train, slots, create_state=state)
        result.steps_replayed = 1
        before = alloc.state()
        # Once a step leaves the allocator as it found it, every later step repeats it: its peaks (counted from
        # a reset at its start) are the measured steps' peaks, and the rest need not be replayed.
        steady = False
        for n in range(2, plan.warmup_steps + 1):
            where = f"warm-up step {n}"
            alloc.reset_peak()
            run.step(train, slots)
            result.steps_replayed += 1
            after = alloc.state()
            steady, before = after == before, after
            if steady:
                break
        if not steady:
            alloc.reset_peak()
            for n in range(1, plan.steps + 1):
                where = f"measured step {n}"
                run.step(train, slots)
                result.steps_replayed += 1
                after = alloc.state()
                if after == before:
                    break
                before = after
        result.peak_allocated = alloc.stats.peak_allocated
        result.peak_reserved = alloc.stats.peak_reserved
    except OutOfMemory:
        result.oom = where
    result.workspace_bytes = run.workspace_bytes()
    result.attn_scratch_bytes = run.max_scratch
    result.alloc_retries = alloc.stats.alloc_retries
    return result


def _map_registered(infer: _Compiled, train: _Compiled, slots: list[Block | None]) -> list[Block | None]:
    """The inference trace's registered tensors (weights, then the batch) are the training trace's, by position."""
    shared: list[Block | None] = [None] * infer.keys
    for (key, _), (train_key, _) in zip(infer.weights, train.weights, strict=False):
        shared[key] = slots[train_key]
    for (key, _), (train_key, _) in zip(infer.activations, train.activations, strict=False):
        shared[key] = slots[train_key]
    return shared
