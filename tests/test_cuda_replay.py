"""The CUDA replay of a traced step: the worker's history before the measured steps, the cuBLAS workspaces (two in
training, one in inference), lazily created optimizer state, attention-backward scratch at its op marker. The
timelines here are built by hand (torch-free); tests/test_gpus.py runs a real tiny ViT through the estimator."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from petlbench.estimate.cuda_replay import (
    ALLOC,
    BACKWARD,
    FORWARD,
    FREE,
    MARKED_OPS,
    OP,
    OPTIMIZER,
    PHASE,
    RESET,
    DevicePlan,
    replay_run,
)

KiB = 1024
MiB = 1024 * KiB
WS = 32 * MiB  # one handle's cuBLAS workspace on sm90


@dataclass
class Trace:
    """A tracker timeline written by hand."""

    events: list[tuple[int, int, str, int]] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def register(self, category: str, *sizes: tuple[int, tuple[int, ...]]) -> list[int]:
        keys = [self.alloc(category, n, shape) for n, shape in sizes]
        self.events.append((RESET, -1, "activations", 0))
        return keys

    def alloc(self, category: str, nbytes: int, shape: tuple[int, ...] = (1,)) -> int:
        key = len(self.shapes)
        self.shapes.append(shape)
        self.events.append((ALLOC, key, category, nbytes))
        return key

    def free(self, key: int) -> None:
        self.events.append((FREE, key, "activations", 0))

    def phase(self, phase: int) -> None:
        self.events.append((PHASE, phase, "activations", 0))

    def op(self, name: str, key: int = -1) -> None:
        self.events.append((OP, key, "activations", MARKED_OPS.index(name)))


def training_step(activation: int = 20 * MiB, weight: int = 10 * MiB) -> Trace:
    """weights (one 10 MiB tensor, one small), AdamW state (a 0-dim step and a small buffer), the batch; a forward
    with a matrix product, a backward with one, an optimizer step with a temporary, zero_grad."""
    t = Trace()
    t.register("weights", (weight, (1,)), (2 * KiB, (1,)))
    t.register("optimizer", (4, ()), (2 * KiB, (1,)))
    t.register("activations", (MiB, (1,)), (512, (1,)))
    t.phase(FORWARD)
    t.op("blas")
    act = t.alloc("activations", activation)
    t.phase(BACKWARD)
    t.op("blas")
    grad = t.alloc("gradients", weight)
    t.free(act)
    t.phase(OPTIMIZER)
    temp = t.alloc("optimizer", weight)
    t.free(temp)
    t.free(grad)
    return t


def inference_forward(transient: int) -> Trace:
    t = Trace()
    t.register("weights", (10 * MiB, (1,)), (2 * KiB, (1,)))
    t.register("activations", (MiB, (1,)))
    t.phase(FORWARD)
    t.op("blas")
    out = t.alloc("activations", transient)
    t.free(out)
    return t


PERSISTENT = 10 * MiB + 2 * KiB + 2 * KiB + MiB + 512  # weights, the optimizer's small buffer, the batch


def test_a_training_step_holds_two_workspaces_and_an_inference_forward_one() -> None:
    result = replay_run(training_step(), inference_forward(MiB // 2), DevicePlan(cublas_bytes=WS))
    assert result.workspace_bytes == 2 * WS
    assert result.infer_workspace_bytes == WS
    # backward holds the activation and the gradient beside everything persistent and both workspaces
    assert result.peak_allocated == PERSISTENT + 2 * WS + 20 * MiB + 10 * MiB
    # inference: weights, the batch (x and y), the main thread's workspace and the forward's output (0.5 MiB)
    assert result.peak_infer_allocated == 10 * MiB + 2 * KiB + MiB + 512 + WS + MiB // 2
    # without cuBLAS workspaces the peak is 2 x 32 MiB lower
    assert replay_run(training_step(), None, DevicePlan()).peak_allocated == PERSISTENT + 30 * MiB


def test_zero_dimensional_optimizer_state_stays_on_the_cpu_unless_the_optimizer_is_fused() -> None:
    cpu = replay_run(training_step(), None, DevicePlan(cpu_scalar_state=True))
    fused = replay_run(training_step(), None, DevicePlan(cpu_scalar_state=False))
    assert fused.peak_allocated == (cpu.peak_allocated or 0) + 512  # AdamW's `step`: one 512-B block


def test_reserved_memory_remembers_what_the_inference_forward_reserved_before_the_peak_reset() -> None:
    plan = DevicePlan(cublas_bytes=WS)
    alone = replay_run(training_step(), None, plan)
    # inference made a 1 MiB activation: the small segment holding the batch has 1 MiB - 2.5 KiB left, so it took
    # a second 2 MiB small segment, which training never needs and the allocator keeps
    after_inference = replay_run(training_step(), inference_forward(MiB), plan)
    assert after_inference.peak_allocated == alone.peak_allocated  # allocated: the reset forgets it
    assert after_inference.peak_reserved is not None and alone.peak_reserved is not None
    assert after_inference.peak_reserved == alone.peak_reserved + 2 * MiB  # reserved: the segment is still there


def test_the_replay_stops_at_a_fixed_point_and_gives_the_steady_step_peak() -> None:
    long = replay_run(training_step(), None, DevicePlan(warmup_steps=8, steps=50))
    short = replay_run(training_step(), None, DevicePlan(warmup_steps=2, steps=1))
    assert long.steps_replayed < 8  # it stopped once a step left the allocator as it found it
    assert (long.peak_allocated, long.peak_reserved) == (short.peak_allocated, short.peak_reserved)


def test_attention_backward_scratch_is_allocated_at_its_op_and_freed_with_it() -> None:
    t = training_step()
    # a flash-attention backward of q: (batch 2, 3 heads, 197 tokens, head dim 64), after its outputs
    grad_q = t.alloc("activations", 2 * 3 * 197 * 64 * 2, (2, 3, 197, 64))
    t.op("_scaled_dot_product_flash_attention_backward", grad_q)
    t.free(grad_q)
    result = replay_run(t, None, DevicePlan())
    softmax_d = 2 * 3 * 256 * 4  # (B, H, tokens rounded up to 128) fp32
    dq_accum = 2 * 256 * 3 * 64 * 4  # (B, tokens rounded up to 128, H, head dim rounded up to 32) fp32
    assert result.attn_scratch_bytes == softmax_d + dq_accum
    assert result.scratch_approximate is False  # flash's sizes are the source's formulas
    t.op("_scaled_dot_product_efficient_attention_backward", grad_q)
    assert replay_run(t, None, DevicePlan()).scratch_approximate is True


def test_a_limit_below_the_need_is_out_of_memory_and_names_where() -> None:
    result = replay_run(training_step(), None, DevicePlan(cublas_bytes=WS, limit=50 * MiB))
    assert result.oom is not None and result.peak_allocated is None
    assert replay_run(training_step(), None, DevicePlan(cublas_bytes=WS, limit=10 * 1024 * MiB)).oom is None


@pytest.mark.parametrize("order", [None, (1, 0)])
def test_weights_load_in_the_order_given(order: tuple[int, ...] | None) -> None:
    result = replay_run(training_step(), None, DevicePlan(load_order=order))
    assert result.peak_allocated == PERSISTENT + 30 * MiB  # the order moves blocks, not bytes
