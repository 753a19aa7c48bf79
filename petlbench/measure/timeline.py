"""The same tracked step at another batch size, without running it.

`at_batch` turns two timelines (petlbench.measure.tracker) of the same step at batch sizes B1 ≠ B2 into the
timeline at any B, when every event matches one to one and every storage is affine in B (bytes = c0 + c1·B, and
at most one dimension of its shape changes with B, so no B² term can hide between two points). A ViT step has
the same ops at every batch size ≥ 2 and the batch is the leading dimension of every activation, so this holds;
when it does not, `at_batch` returns None and the estimator traces that batch size itself. Batch 1 is never
replayed (nor an anchor): size-1 dimensions make some tensors contiguous that are not at B ≥ 2, so the op
sequence itself differs there.

The estimator traces a configuration at two batch sizes and replays every other one (and every probe of a
batch-size search) in milliseconds; tests/test_estimate_many.py checks replayed against traced bytes, and
tests/test_estimate.py traced bytes against real CPU runs.
"""

from __future__ import annotations

from petlbench.measure.tracker import ALLOC, Category, Timeline


def at_batch(a: Timeline, batch_a: int, b: Timeline, batch_b: int, batch: int) -> Timeline | None:
    """The timeline at `batch`, from the same step traced at `batch_a` and `batch_b`; None if not affine in B."""
    if batch_a == batch_b or len(a.events) != len(b.events) or len(a.shapes) != len(b.shapes) or a.ops != b.ops:
        return None
    if (a.owners, a.modules) != (b.owners, b.modules):
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
    return Timeline(tuple(events), shapes, a.ops, a.owners, a.modules, a.calls)
