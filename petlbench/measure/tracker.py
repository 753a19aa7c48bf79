"""Tensor-level memory accounting: the exact, deterministic peak of live tensor bytes, by category.

A `TorchDispatchMode` sees every tensor an aten op returns. Each new storage is counted once (views share it)
under the category of the phase that allocated it, and uncounted when Python frees it. At every new peak the
per-category totals are copied (four integers), so the breakdown at the peak always sums to the peak.

Categories:
- weights: parameters and buffers (registered up front);
- gradients: `.grad` tensors (retagged when autograd accumulates them);
- optimizer: optimizer state plus anything allocated inside `optimizer.step()` (e.g. foreach temporaries);
- activations: everything else allocated in forward/backward: saved tensors, temporaries, the input batch,
  autocast's cached low-precision weight copies.

MEASURE-NOTES.md §3: this gives the same bytes as MemTracker and the profiler's memory timeline, for real and
fake tensors. It does not see storage `resize_` or tensors made under `no_dispatch`; neither occurs in a
ViT training step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

Category: TypeAlias = Literal["weights", "gradients", "optimizer", "activations"]
CATEGORIES: Final[tuple[Category, ...]] = ("weights", "gradients", "optimizer", "activations")

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


class _Cell:
    __slots__ = ("category", "nbytes")

    def __init__(self, category: Category, nbytes: int) -> None:
        self.category = category
        self.nbytes = nbytes


class TensorTracker(TorchDispatchMode):
    """Live-storage byte counter. Use as a context manager; set `.category` to the current phase."""

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.round_to = round_to  # 512 mimics the CUDA caching allocator's block rounding
        self.category: Category = "activations"
        self.live: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_by_category: dict[str, int] = dict(self.live)
        self._cells: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._ops: set[str] = set()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _round(self, nbytes: int) -> int:
        r = self.round_to
        return (nbytes + r - 1) // r * r if r > 1 else nbytes

    def _add(self, tensor: torch.Tensor, category: Category) -> None:
        storage = tensor.untyped_storage()
        if storage in self._cells:
            return
        cell = _Cell(category, self._round(storage.nbytes()))
        self._cells[storage] = cell
        self.live[category] += cell.nbytes
        self.total += cell.nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_category = dict(self.live)
        weakref.finalize(storage, self._free, cell)

    def _free(self, cell: _Cell) -> None:
        self.live[cell.category] -= cell.nbytes
        self.total -= cell.nbytes

    def register(self, tensors: Iterable[torch.Tensor | None], category: Category) -> None:
        """Count tensors that exist before tracking starts (weights, optimizer state, inputs)."""
        for tensor in tensors:
            if tensor is not None:
                self._add(tensor, category)
        self.reset_peak()

    def retag(self, tensor: torch.Tensor, category: Category) -> None:
        """Move a live tensor's bytes to another category (e.g. a backward output that became `.grad`)."""
        cell = self._cells.get(tensor.untyped_storage())
        if cell is None:
            self._add(tensor, category)
            return
        if cell.category != category:
            self.live[cell.category] -= cell.nbytes
            self.live[category] += cell.nbytes
            cell.category = category

    def reset_peak(self) -> None:
        self.peak = self.total
        self.peak_by_category = dict(self.live)

    def result(self) -> TrackedPeak:
        return TrackedPeak(self.peak, dict(self.peak_by_category), attention_kernel(self._ops))

    # -- dispatch --------------------------------------------------------------------------------------------

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if "attention" in name or name.startswith("_softmax"):
            self._ops.add(name.split(".")[0])
        tree_map_only(torch.Tensor, lambda t: self._add(t, self.category), out)
        return out


def attention_kernel(ops: Iterable[str]) -> str | None:
    """Name of the attention kernel(s) that ran in the forward pass, from the aten op names seen."""
    ops = {op for op in ops if not op.endswith("_backward")}
    kernels = sorted({short for op in ops for prefix, short in _ATTENTION_OPS if op == prefix})
    if kernels:
        return "+".join(kernels)
    return "math" if any(op.startswith("_softmax") for op in ops) else None
