"""Tensor-level memory accounting: the exact, deterministic peak of live tensor bytes, by category, and its log.

A `TorchDispatchMode` sees every tensor an aten op returns. Each new storage is counted once (views share it)
under the category of the phase that allocated it, and uncounted when Python frees it. At every new peak the
per-category totals are copied (four integers), so the breakdown at the peak always sums to the peak. Every
event (a new storage with its category, bytes and shape; a free; a retag; a peak reset; a phase; an op the CUDA
replay keys on) is also logged, so the region can be replayed (`replay`, at any allocation rounding; the CUDA
allocator model), drawn as a timeline, or extrapolated to another batch size (`petlbench.measure.timeline.at_batch`).

Categories:
- weights: parameters and buffers (registered up front);
- gradients: `.grad` tensors (retagged when autograd accumulates them);
- optimizer: optimizer state plus anything allocated inside `optimizer.step()` (e.g. foreach temporaries);
- activations: everything else allocated in forward/backward: saved tensors, temporaries, the input batch,
  autocast's cached low-precision weight copies.

This gives the same bytes as MemTracker and the profiler's memory timeline, for real and fake tensors
(docs/measurement.md). It does not see storage `resize_` or tensors made under `no_dispatch`; neither occurs
in a ViT training step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, TypeAlias

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

Category: TypeAlias = Literal["weights", "gradients", "optimizer", "activations"]
CATEGORIES: Final[tuple[Category, ...]] = ("weights", "gradients", "optimizer", "activations")

# event kinds of a Timeline
ALLOC: Final = 0
FREE: Final = 1
RETAG: Final = 2
RESET: Final = 3
PHASE: Final = 4  # key = index into PHASES: the step entered that phase here
OP: Final = 5  # an op the CUDA replay keys on: nbytes = index into MARKED_OPS, key = its first output's storage
PHASES: Final = ("forward", "backward", "optimizer")
# Ops whose CUDA run allocates memory the trace does not see (petlbench/estimate/cuda_replay.py): the first
# matrix product after each phase marker (a thread's cuBLAS workspace), and the fused attention backwards (their
# scratch). Logged after the op's outputs.
MARKED_OPS: Final = (
    "blas",
    "_scaled_dot_product_flash_attention_backward",
    "_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
    "_cudnn_attention_backward",
)
# (composite ops such as linear reach the tracker undecomposed under inference_mode)
_BLAS_OPS: Final = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "addmv", "mv", "dot", "vdot", "_scaled_mm"}
    | {"linear", "matmul", "einsum", "bilinear"}
)
_OP_CODES: Final = {name: code for code, name in enumerate(MARKED_OPS) if code} | dict.fromkeys(_BLAS_OPS, 0)

# aten attention ops → short kernel names for the `attn_kernel` column
_ATTENTION_OPS: Final = (
    ("_scaled_dot_product_flash_attention_for_cpu", "cpu_flash"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused"),
)


@dataclass(frozen=True)
class TrackedPeak:
    """The peak of one tracked region and what was live at that moment."""

    peak_bytes: int
    by_category: dict[str, int]
    attn_kernel: str | None


@dataclass(frozen=True)
class Timeline:
    """Events of one tracked region: (kind, key, category, nbytes); `shapes[key]` is the shape of storage `key`'s
    first tensor. Keys number storages in allocation order."""

    events: tuple[tuple[int, int, Category, int], ...]
    shapes: tuple[tuple[int, ...], ...]
    ops: frozenset[str]
    # `owners[key]` indexes `modules`: the module path running (forward or backward) when storage `key` was
    # allocated; "" = none (registered tensors, the loss, the optimizer). Empty when no owner was recorded.
    owners: tuple[int, ...] = ()
    modules: tuple[str, ...] = ()
    calls: int = 0  # aten ops dispatched in the region (the CPU time model charges each a fixed cost)


class TensorTracker(TorchDispatchMode):
    """Live-storage byte counter and event log. Use as a context manager; set `.category` to the current phase.

    `round_to` rounds every storage up for the live counts (512 mimics the CUDA caching allocator's blocks); the
    log keeps exact sizes, so `replay` can apply any rounding later. Storages are keyed by id with a weakref
    callback (cheaper than a weak dictionary on the hot path). `timeline()` closes the log: later frees (tensors
    that outlive the region) still update the counts but are not logged.
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.round_to = round_to
        self.category: Category = "activations"
        self.live: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_by_category: dict[str, int] = dict(self.live)
        self._events: list[tuple[int, int, Category, int]] = []
        self._shapes: list[tuple[int, ...]] = []
        # id(storage) → (key, category, exact bytes, weak reference that frees the entry)
        self._by_id: dict[int, tuple[int, Category, int, weakref.ref[torch.UntypedStorage]]] = {}
        self._names: dict[Any, tuple[str, int]] = {}  # op → (name, MARKED_OPS code or -1)
        self._ops: set[str] = set()
        self._calls = 0
        self._blas_marked = False  # a BLAS marker was logged since the last phase marker
        self._open = True
        # attribution: `owner()` names the module running now (set by petlbench.measure.memory); None: not recorded
        self.owner: Callable[[], str] | None = None
        self._owners: list[int] = []
        self._module_index: dict[str, int] = {"": 0}

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _round(self, nbytes: int) -> int:
        r = self.round_to
        return (nbytes + r - 1) // r * r if r > 1 else nbytes

    def _add(self, tensor: torch.Tensor, category: Category) -> None:
        storage = tensor.untyped_storage()
        sid = id(storage)
        if sid in self._by_id:
            return
        key, nbytes = len(self._shapes), storage.nbytes()
        self._by_id[sid] = (key, category, nbytes, weakref.ref(storage, partial(self._freed, sid)))
        self._shapes.append(tuple(int(d) for d in tensor.shape))
        owner = self.owner
        if owner is not None:
            self._owners.append(self._module_index.setdefault(owner(), len(self._module_index)))
        if self._open:
            self._events.append((ALLOC, key, category, nbytes))
        size = self._round(nbytes)
        self.live[category] += size
        self.total += size
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_category = dict(self.live)

    def _freed(self, sid: int, _ref: object) -> None:
        key, category, nbytes, _ = self._by_id.pop(sid)
        if self._open:
            self._events.append((FREE, key, category, nbytes))
        size = self._round(nbytes)
        self.live[category] -= size
        self.total -= size

    def register(self, tensors: Iterable[torch.Tensor | None], category: Category) -> None:
        """Count tensors that exist before tracking starts (weights, optimizer state, inputs)."""
        for tensor in tensors:
            if tensor is not None:
                self._add(tensor, category)
        self.reset_peak()

    def retag(self, tensor: torch.Tensor, category: Category) -> None:
        """Move a live tensor's bytes to another category (e.g. a backward output that became `.grad`)."""
        sid = id(tensor.untyped_storage())
        entry = self._by_id.get(sid)
        if entry is None:
            self._add(tensor, category)
            return
        key, old, nbytes, ref = entry
        if old != category:
            self._by_id[sid] = (key, category, nbytes, ref)
            if self._open:
                self._events.append((RETAG, key, category, nbytes))
            size = self._round(nbytes)
            self.live[old] -= size
            self.live[category] += size

    def reset_peak(self) -> None:
        self.peak = self.total
        self.peak_by_category = dict(self.live)
        if self._open:
            self._events.append((RESET, -1, "activations", 0))

    def mark(self, phase: str) -> None:
        """Log that the step enters `phase` (one of PHASES); the live counts do not change."""
        if self._open:
            self._events.append((PHASE, PHASES.index(phase), "activations", 0))
        self._blas_marked = False

    def result(self) -> TrackedPeak:
        return TrackedPeak(self.peak, dict(self.peak_by_category), attention_kernel(self._ops))

    def timeline(self) -> Timeline:
        """The events so far, closing the log."""
        self._open = False
        owners = tuple(self._owners) if len(self._owners) == len(self._shapes) else ()
        modules = tuple(self._module_index) if owners else ()
        events = _canonical(self._events)
        return Timeline(events, tuple(self._shapes), frozenset(self._ops), owners, modules, self._calls)

    # -- dispatch --------------------------------------------------------------------------------------------

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self._calls += 1
        entry = self._names.get(func)
        if entry is None:
            name = func.__name__ if hasattr(func, "__name__") else str(func)
            entry = self._names[func] = (name, _OP_CODES.get(name.split(".")[0], -1))
            if "attention" in name or name.startswith("_softmax"):
                self._ops.add(name.split(".")[0])
        category = self.category
        if isinstance(out, torch.Tensor):
            self._add(out, category)
        elif isinstance(out, tuple | list):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._add(item, category)
                elif isinstance(item, tuple | list):
                    tree_map_only(torch.Tensor, lambda t: self._add(t, category), item)
        code = entry[1]
        if code >= 0 and self._open and (code or not self._blas_marked):
            self._mark_op(code, out)
        return out

    def _mark_op(self, code: int, out: Any) -> None:
        """Log an OP marker; its key is the storage of the op's first tensor output (-1 for none)."""
        self._blas_marked |= code == 0
        first = out if isinstance(out, torch.Tensor) else None
        if first is None and isinstance(out, tuple | list):
            first = next((t for t in out if isinstance(t, torch.Tensor)), None)
        entry = self._by_id.get(id(first.untyped_storage())) if code and first is not None else None
        self._events.append((OP, entry[0] if entry is not None else -1, "activations", code))


def attention_kernel(ops: Iterable[str]) -> str | None:
    """Name of the attention kernel(s) that ran in the forward pass, from the aten op names seen."""
    ops = {op for op in ops if not op.endswith("_backward")}
    kernels = sorted({short for op in ops for prefix, short in _ATTENTION_OPS if op == prefix})
    if kernels:
        return "+".join(kernels)
    return "math" if any(op.startswith("_softmax") for op in ops) else None


def _canonical(events: list[tuple[int, int, Category, int]]) -> tuple[tuple[int, int, Category, int], ...]:
    """Frees that follow each other are sorted by key.

    Their order cannot change a peak (peaks are taken at allocations), but it is not always deterministic: leaving
    autocast clears its cache of low-precision weight copies, a hash map, so the same copies are freed in a
    different order from one trace to the next. Sorted, two traces of the same step match event for event.
    """
    out: list[tuple[int, int, Category, int]] = []
    run: list[tuple[int, int, Category, int]] = []
    for event in events:
        if event[0] == FREE:
            run.append(event)
            continue
        if run:
            out.extend(sorted(run, key=lambda e: e[1]))
            run = []
        out.append(event)
    out.extend(sorted(run, key=lambda e: e[1]))
    return tuple(out)


def replay(timeline: Timeline, round_to: int = 1) -> TrackedPeak:
    """The tracker's peak and breakdown for this timeline, every storage rounded up to a multiple of `round_to`."""
    live: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    total = peak = 0
    peak_by_category = dict(live)
    sizes: dict[int, int] = {}
    categories: dict[int, str] = {}
    for kind, key, category, nbytes in timeline.events:
        if kind == ALLOC:
            size = (nbytes + round_to - 1) // round_to * round_to if round_to > 1 else nbytes
            sizes[key], categories[key] = size, category
            live[category] += size
            total += size
            if total > peak:
                peak = total
                peak_by_category = dict(live)
        elif kind == FREE:
            size = sizes.pop(key)
            live[categories.pop(key)] -= size
            total -= size
        elif kind == RETAG:
            live[categories[key]] -= sizes[key]
            live[category] += sizes[key]
            categories[key] = category
        elif kind == RESET:
            peak = total
            peak_by_category = dict(live)
    return TrackedPeak(peak, peak_by_category, attention_kernel(timeline.ops))
