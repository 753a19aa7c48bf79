"""A tracked step as a replayable timeline, and the same step at another batch size without running it.

`RecordingTracker` is the tensor tracker (same counting) that also logs every event: a new storage (its category,
bytes and shape), a free, a retag, a peak reset. `replay` recomputes the tracker's peak and breakdown from the log,
for any allocation rounding (1 B on CPU, 512 B for the CUDA estimate).

`at_batch` turns two timelines of the same step at batch sizes B1 ≠ B2 into the timeline at any B, when every
event matches one to one and every storage is affine in B (bytes = c0 + c1·B, and at most one dimension of its
shape changes with B, so no B² term can hide between two points). A ViT step has the same ops at every batch
size ≥ 2 and the batch is the leading dimension of every activation, so this holds; when it does not, `at_batch`
returns None and the estimator traces that batch size itself. Batch 1 is never replayed (nor an anchor): size-1
dimensions make some tensors contiguous that are not at B ≥ 2, so the op sequence itself differs there.

The estimator traces a configuration at two batch sizes and replays every other one (and every probe of a
batch-size search) in milliseconds; tests/test_estimate_many.py checks replayed against traced bytes, and
tests/test_estimate.py traced bytes against real CPU runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import torch
from torch.utils._pytree import tree_map_only

from petlbench.measure.tracker import CATEGORIES, Category, TensorTracker, TrackedPeak, attention_kernel

ALLOC: Final = 0
FREE: Final = 1
RETAG: Final = 2
RESET: Final = 3


@dataclass(frozen=True)
class Timeline:
    """Events of one tracked region: (kind, key, category, nbytes); `shapes[key]` is the shape of storage `key`'s
    first tensor. Keys number storages in allocation order."""

    events: tuple[tuple[int, int, Category, int], ...]
    shapes: tuple[tuple[int, ...], ...]
    ops: frozenset[str]


class RecordingTracker(TensorTracker):
    """A TensorTracker that logs its events instead of counting them (`replay` counts); `timeline()` closes the log.

    Same rules as TensorTracker (one entry per storage, by the category of the phase that allocated it, retags,
    peak resets on `register`), with a leaner hot path: storages are keyed by id with a weakref callback, and op
    outputs are walked without pytree. tests/test_estimate.py checks the replayed bytes against real CPU runs.
    """

    def __init__(self) -> None:
        super().__init__(round_to=1)
        self._events: list[tuple[int, int, Category, int]] = []
        self._shapes: list[tuple[int, ...]] = []
        self._by_id: dict[int, tuple[int, Category, int, weakref.ref[torch.UntypedStorage]]] = {}
        self._names: dict[Any, str] = {}
        self._open = True

    def _add(self, tensor: torch.Tensor, category: Category) -> None:
        storage = tensor.untyped_storage()
        sid = id(storage)
        if sid in self._by_id:
            return
        key, nbytes = len(self._shapes), storage.nbytes()
        self._by_id[sid] = (key, category, nbytes, weakref.ref(storage, partial(self._freed, sid)))
        if self._open:
            self._events.append((ALLOC, key, category, nbytes))
            self._shapes.append(tuple(int(d) for d in tensor.shape))

    def _freed(self, sid: int, _ref: object) -> None:
        key, category, nbytes, _ = self._by_id.pop(sid)
        if self._open:
            self._events.append((FREE, key, category, nbytes))

    def retag(self, tensor: torch.Tensor, category: Category) -> None:
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

    def reset_peak(self) -> None:
        if self._open and hasattr(self, "_events"):
            self._events.append((RESET, -1, "activations", 0))

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = func.__name__ if hasattr(func, "__name__") else str(func)
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
        return out

    def result(self) -> TrackedPeak:
        """The counted peak: replay of the log so far (unrounded)."""
        return replay(Timeline(tuple(self._events), tuple(self._shapes), frozenset(self._ops)))

    def timeline(self) -> Timeline:
        """The events so far; later frees (tensors that outlive the region) are not logged."""
        self._open = False
        return Timeline(_canonical(self._events), tuple(self._shapes), frozenset(self._ops))


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
        else:
            peak = total
            peak_by_category = dict(live)
    return TrackedPeak(peak, peak_by_category, attention_kernel(timeline.ops))


def at_batch(a: Timeline, batch_a: int, b: Timeline, batch_b: int, batch: int) -> Timeline | None:
    """The timeline at `batch`, from the same step traced at `batch_a` and `batch_b`; None if not affine in B."""
    if batch_a == batch_b or len(a.events) != len(b.events) or len(a.shapes) != len(b.shapes) or a.ops != b.ops:
        return None
    span = batch_b - batch_a
    for shape_a, shape_b in zip(a.shapes, b.shapes, strict=True):
        if len(shape_a) != len(shape_b):
            return None
        varying = [(da, db) for da, db in zip(shape_a, shape_b, strict=True) if da != db]
        if len(varying) > 1 or any((db - da) % span for da, db in varying):
            return None
    events: list[tuple[int, int, Category, int]] = []
    for ea, eb in zip(a.events, b.events, strict=True):
        kind, key, category, nbytes_a = ea
        if (kind, key, category) != eb[:3]:
            return None
        if kind == ALLOC:
            delta = eb[3] - nbytes_a
            if delta % span:
                return None
            size = nbytes_a + delta // span * (batch - batch_a)
            if size < 0:
                return None
            events.append((kind, key, category, size))
        else:
            events.append(ea)
    shapes = tuple(
        tuple(da + (db - da) // span * (batch - batch_a) for da, db in zip(sa, sb, strict=True))
        for sa, sb in zip(a.shapes, b.shapes, strict=True)
    )
    return Timeline(tuple(events), shapes, a.ops)
