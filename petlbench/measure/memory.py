"""Memory views of a run: the tracked breakdown step, CUDA allocator peaks, NVML driver usage, CPU peak RSS.

Every peak here is reset right before the region it describes; none is a process-lifetime maximum.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.module_tracker import ModuleTracker

from petlbench.columns import Metrics
from petlbench.measure.nvml import NvmlSampler
from petlbench.measure.step import TrainStep
from petlbench.measure.tracker import TensorTracker, TrackedPeak

GLOBAL_MODULE = "Global"  # ModuleTracker's name for "no module running"

log = logging.getLogger(__name__)

CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to a multiple of 512 bytes


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _round_to(x: torch.Tensor, round_to: int | None) -> int:
    return round_to if round_to is not None else CUDA_BLOCK if x.device.type == "cuda" else 1


class _ModuleTracker(ModuleTracker):
    """torch's ModuleTracker, blind to `nn.Identity`: it makes no tensor, and as its input and output are the same
    tensor, its backward enter and exit hooks race (it would linger as the innermost module in backward)."""

    def _fw_pre_hook(self, mod: nn.Module, input: object) -> None:
        if not isinstance(mod, nn.Identity):
            super()._fw_pre_hook(mod, input)

    def _fw_post_hook(self, mod: nn.Module, input: object, output: object) -> None:
        if not isinstance(mod, nn.Identity):
            super()._fw_post_hook(mod, input, output)


def current_module(modules: ModuleTracker) -> str:
    """The innermost module running now, as a path below the root model (`blocks.7.mlp.fc1`); "" for none.

    ModuleTracker keeps a set of `RootType.path` names; nested modules' names extend their parents', so the
    innermost is the deepest. In backward, a module is entered when its outputs' gradients are ready and left
    when its inputs' are, so a backward temporary belongs to the module whose backward produces it.
    """
    parents = modules.parents
    if len(parents) <= 1:
        return ""
    deepest = max((p for p in parents if p != GLOBAL_MODULE), key=lambda p: (p.count("."), p))
    _root, _, path = deepest.partition(".")
    return path or "(top level)"


def tracked_train_step(
    step: TrainStep,
    x: torch.Tensor,
    y: torch.Tensor,
    round_to: int | None = None,
    tracker: TensorTracker | None = None,
    attribute: bool = True,
) -> TrackedPeak:
    """Run one training step under the tensor tracker; the peak and its breakdown by category.

    `round_to` defaults to the device's allocation granularity (512 B on CUDA, 1 B on CPU); the estimator passes
    512 to predict a CUDA run from fake CPU tensors, or its own (recording) `tracker`. The tracker's log marks the
    phases (forward, backward, optimizer); with `attribute`, every storage also records the module that was
    running when it was allocated (torch's ModuleTracker: global module hooks and gradient hooks, which allocate
    nothing, so the peak is the same with or without).
    """
    model, optimizer = step.model, step.optimizer
    tracker = tracker if tracker is not None else TensorTracker(round_to=_round_to(x, round_to))
    modules = _ModuleTracker() if attribute else None
    if modules is not None:
        tracker.owner = lambda: current_module(modules)
    tracker.register(model.parameters(), "weights")
    tracker.register(model.buffers(), "weights")
    tracker.register((p.grad for p in model.parameters()), "gradients")
    tracker.register(optimizer_state_tensors(optimizer), "optimizer")
    tracker.register([x, y], "activations")
    hooks = [
        p.register_post_accumulate_grad_hook(lambda param: tracker.retag(param.grad, "gradients"))
        for p in model.parameters()
        if p.requires_grad
    ]
    step.on_backward = lambda: tracker.mark("backward")
    try:
        with tracker, modules if modules is not None else nullcontext():
            tracker.category = "activations"
            tracker.mark("forward")
            step.forward_backward(x, y)
            tracker.category = "optimizer"
            tracker.mark("optimizer")
            step.optimizer_step()
    finally:
        step.on_backward = None
        tracker.owner = None
        for hook in hooks:
            hook.remove()
    return tracker.result()


def record_breakdown(metrics: Metrics, tracked: TrackedPeak) -> None:
    """Store a tracked training step's peak, what was live at it by category, and the attention kernel seen."""
    metrics.mem_tracked_peak_bytes = tracked.peak_bytes
    metrics.mem_weights_bytes = tracked.by_category["weights"]
    metrics.mem_grads_bytes = tracked.by_category["gradients"]
    metrics.mem_optimizer_bytes = tracked.by_category["optimizer"]
    metrics.mem_activations_bytes = tracked.by_category["activations"]
    metrics.attn_kernel = tracked.attn_kernel


def tracked_inference(
    model: nn.Module,
    x: torch.Tensor,
    precision_ctx: object,
    round_to: int | None = None,
    tracker: TensorTracker | None = None,
) -> TrackedPeak:
    """Peak live tensor bytes of one inference forward (no grad), weights included."""
    tracker = tracker if tracker is not None else TensorTracker(round_to=_round_to(x, round_to))
    tracker.register(model.parameters(), "weights")
    tracker.register(model.buffers(), "weights")
    tracker.register([x], "activations")
    with torch.inference_mode(), precision_ctx, tracker:  # type: ignore[attr-defined]
        tracker.mark("forward")  # where the registered tensors end (the CUDA replay starts the forward there)
        model(x)
    return tracker.result()


# -- CPU resident set size ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; the RSS at reset, or None if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_rss() -> int | None:
    """Peak RSS since the last `reset_peak_rss` (Linux VmHWM)."""
    return _status_kib("VmHWM")


# -- NVML ---------------------------------------------------------------------------------------------------


def nvml_sampler(device_index: int, interval_s: float) -> NvmlSampler:
    """An NVML sampler of torch's CUDA device `device_index` (matched by UUID: CUDA_VISIBLE_DEVICES reorders)."""
    return NvmlSampler(lambda lib: _nvml_handle(lib, device_index), interval_s)


def _nvml_handle(pynvml: object, device_index: int) -> object:
    """The NVML handle of torch's device `device_index`, matched by UUID (CUDA_VISIBLE_DEVICES reorders)."""
    props = torch.cuda.get_device_properties(device_index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")  # type: ignore[attr-defined]
        except Exception:
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if device_index < len(entries) and entries[device_index].isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entries[device_index]))  # type: ignore[attr-defined]
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)  # type: ignore[attr-defined]
