"""CUDA runs traced on fake CPU tensors (petlbench/estimate/cuda.py): CUDA's autocast policy, op by op as the
installed torch's header lists it; CUDA's dropout, softmax and attention kernels, keeping what CUDA keeps; the
attention kernel CUDA's selector picks (petlbench/estimate/attention.py); GradScaler for fp16."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from petlbench.backbone import build_backbone
from petlbench.estimate import cuda_policy
from petlbench.estimate.attention import CudaTarget, SdpaCall, select, select_kernel
from petlbench.estimate.client import estimate_result
from petlbench.estimate.cuda import CudaEmulation, CudaTrainStep, FakeGradScaler
from petlbench.estimate.engine import estimate_many, estimate_memory
from petlbench.measure.step import make_optimizer
from petlbench.report.published import compare, markdown_table, mean_abs_deviation
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.spec.models import OptimizerSpec
from petlbench.tuners import make_tuner
from tests.conftest import TINY_BACKBONE

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
# AutocastCUDA kernels registered outside autocast_mode.cpp, whose policy the header does not give: the estimator
# leaves them alone, so a ViT step must not call them.
UNMODELLED = {"_cudnn_rnn", "linalg_matrix_sqrth"}
HEADER_LISTS = {
    "AT_FORALL_LOWER_PRECISION_FP": "lower",
    "AT_FORALL_FP32": "fp32",
    "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype",
    "AT_FORALL_PROMOTE": "promote",
}


def _macro_body(text: str, macro: str) -> str:
    """The lines of `#define MACRO(_) \\ ...` up to the first line without a continuation."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"#define {macro}(_)"))
    body = []
    for line in lines[start:]:
        body.append(line)
        if not line.rstrip().endswith("\\"):
            break
    return "\n".join(body)


def header_policy() -> dict[str, str]:
    """op (or op.overload) → CUDA autocast policy, parsed from the installed torch's autocast_mode.h."""
    text = HEADER.read_text()
    policy: dict[str, str] = {}
    for macro, name in HEADER_LISTS.items():
        for op, overload in re.findall(r"_\(\s*(\w+)\s*(?:,\s*(\w+)\s*)?\)", _macro_body(text, macro)):
            policy[f"{op}.{overload}" if overload else op] = name
    redispatch = _macro_body(text, "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE")
    for entry in redispatch.split("_(ADD_NS(")[1:]:
        registered = re.search(r'"([\w.]+)"', entry)
        last_word = re.findall(r"(\w+)\)", entry)
        assert registered is not None and last_word
        policy[registered.group(1)] = last_word[-1]
    return policy


def test_the_policy_table_is_the_installed_headers_and_cudas_registrations() -> None:
    header = header_policy()
    assert header["softmax.int"] == "fp32_set_opt_dtype" and header["layer_norm"] == "fp32"  # the parse works
    assert header["norm.Scalar"] == "fp32_append_dtype" and header["linear"] == "lower"
    ours = cuda_policy.cuda_policy()
    from_cpp = cuda_policy.LOWER_CPP | cuda_policy.BANNED
    assert {name: p for name, p in ours.items() if name not in from_cpp} == header
    # every op CUDA autocast has a kernel for is in the table, except the ones registered elsewhere
    registered = {  # aten's own (torchvision registers its ops too once it is imported)
        n.removeprefix("aten::")
        for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")
        if n.startswith("aten::")
    }
    assert set(ours) <= registered
    assert registered - set(ours) == UNMODELLED


@contextmanager
def fake() -> Iterator[FakeTensorMode]:
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def fake_model(tuner: str = "full", fused: bool = True, depth: int = 2, **params: Any) -> nn.Module:
    """A tiny ViT with a tuner attached, built on meta (outside the fake mode: timm's drop-path schedule reads
    values) and materialised in the caller's fake mode."""
    spec = TINY_BACKBONE.model_copy(update={"fused_attn": fused, "kwargs": {**TINY_BACKBONE.kwargs, "depth": depth}})
    with unset_fake_temporarily(), torch.device("meta"):
        model = make_tuner(tuner, params).attach(build_backbone(spec, 10))
    return model.to_empty(device="cpu")


def step(model: nn.Module, cuda: CudaEmulation, dtype: torch.dtype | None, batch: int = 2) -> None:
    x, y = torch.empty(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.int64)
    with cuda.autocast(dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()


def profiled_ops(run: Callable[[], None]) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.name.removeprefix("aten::") for e in prof.events() if e.name.startswith("aten::")}


# (tuner, fused attention, knobs); the two full fine-tuning steps also run in fp16, the others in bf16
STEPS = [
    ("full", True, {}),
    ("full", False, {}),
    ("lora", True, {"dropout": 0.1}),
    ("fact", True, {"variant": "tk"}),
    ("vpt", False, {"dropout": 0.1}),
    ("ssf", True, {}),
    ("adaptformer", True, {}),
    ("dtl", True, {"fusion_size": 3, "start": 0}),
    ("sqt", True, {"dropout": 0.1}),
    ("vqt", True, {}),
    ("lst", True, {}),
    ("adapter", True, {}),
    ("bitfit", True, {}),
    ("linear", True, {}),
]


def test_every_op_a_vit_step_calls_gets_cudas_policy() -> None:
    """Profile training steps of every tuner (fused and explicit attention, bf16 and fp16) under the emulation; for
    every op called, each overload's emulated policy equals the header's (none where it lists none)."""
    header = header_policy()
    called: set[str] = set()
    with fake():
        for tuner, fused, params in STEPS:
            model = fake_model(tuner, fused, depth=1, **params)
            for dtype in (torch.bfloat16, torch.float16) if tuner == "full" else (torch.bfloat16,):
                with CudaEmulation() as cuda:
                    called |= profiled_ops(lambda m=model, c=cuda, d=dtype: step(m, c, d))
                    policies = dict(cuda.policies)
                    emulated = [n for n, p in policies.items() if p != "none" and n not in cuda_policy.SHARED_WITH_CPU]
                    assert all(
                        torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{n}", "AutocastCPU") for n in emulated
                    )
    assert {"linear", "layer_norm", "softmax", "cat", "nll_loss", "scaled_dot_product_attention", "einsum"} <= called
    names = set(header) | set(policies) | UNMODELLED
    checked = 0
    for op in sorted(called):
        for name in sorted(n for n in names if n.split(".")[0] == op):
            assert name not in UNMODELLED, f"a ViT step calls {name}, whose CUDA policy is not modelled"
            assert policies.get(name, "none") == header.get(name, "none"), name
            checked += 1
    assert checked >= 10


def test_cpu_kernels_kept_for_shared_ops_cast_to_lower_precision() -> None:
    """The ops whose CPU autocast kernel the emulation keeps do run in the autocast dtype on CPU (as on CUDA)."""
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    image, weight = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3)
    calls = {
        "linear": lambda: F.linear(a, b.t()),
        "matmul": lambda: a @ b,
        "mm": lambda: torch.mm(a, b),
        "bmm": lambda: torch.bmm(a[None], b[None]),
        "addmm": lambda: torch.addmm(torch.randn(4), a, b),
        "baddbmm": lambda: torch.baddbmm(torch.randn(1, 4, 4), a[None], b[None]),
        "addbmm": lambda: torch.addbmm(torch.randn(4, 4), a[None], b[None]),
        "conv2d": lambda: F.conv2d(image, weight),
        "conv1d": lambda: F.conv1d(image[:, :, 0], weight[:, :, 0]),
        "prelu": lambda: F.prelu(a, torch.randn(1)),
        "linalg_vecdot": lambda: torch.linalg.vecdot(a, a),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(a[None], a[None], a[None]),
    }
    assert set(calls) <= cuda_policy.SHARED_WITH_CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, call in calls.items():
            assert call().dtype == torch.bfloat16, name


class OpLog(TorchDispatchMode):
    """Records (op name, input dtypes, output dtypes) of every aten op below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype], list[torch.dtype]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        ins = [a.dtype for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        outs = [o.dtype for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.calls.append((func.__name__.split(".")[0], ins, outs))
        return out

    def count(self, name: str) -> int:
        return sum(1 for op, _, _ in self.calls if op == name)


def test_cuda_autocast_casts_as_cuda_does_and_cpu_autocast_returns_after() -> None:
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    with fake():
        x, w, b = torch.empty(2, 5, 8), torch.empty(8), torch.empty(8)
        low = torch.empty(2, 5, 8, dtype=bf16)
        with CudaEmulation() as cuda, cuda.autocast(bf16):
            assert F.layer_norm(low, (8,), w, b).dtype == f32  # CUDA: fp32 (CPU autocast has no rule)
            assert low.softmax(-1).dtype == f32  # fp32 via the dtype argument
            assert low.sum().dtype == f32 and low.sum(dtype=bf16).dtype == bf16  # a given dtype is respected
            assert torch.ops.aten.norm.Scalar(low).dtype == f32  # redispatched with an fp32 dtype appended
            assert torch.addcmul(low, x, low).dtype == f32  # promoted to the widest
            assert F.linear(x, torch.empty(3, 8)).dtype == bf16
            with OpLog() as log:
                assert torch.cat([x, low], dim=1).dtype == f32  # no promote rule on CUDA: cat promotes by itself
                F.cross_entropy(torch.empty(2, 4, dtype=bf16), torch.zeros(2, dtype=torch.int64))
            assert log.count("_to_copy") == 1  # only nll_loss's fp32 cast; CPU autocast also copies for cat
            assert next(ins for op, ins, _ in log.calls if op == "nll_loss_forward")[0] == f32
            with pytest.raises(RuntimeError, match="unsafe to autocast"):
                F.binary_cross_entropy(torch.empty(4, dtype=bf16), torch.empty(4, dtype=bf16))
        with CudaEmulation() as cuda, cuda.autocast(f16), OpLog() as log:
            half = torch.empty(2, 5, 5, dtype=f16)
            assert half.softmax(-1).dtype == f32
        assert log.count("_to_copy") == 0 and log.count("_softmax") == 1  # fp16 in, fp32 out: one kernel
        # left: CPU autocast's own rules again
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::softmax.int", "AutocastCPU")
        with torch.autocast("cpu", dtype=bf16):
            assert F.layer_norm(low, (8,), w, b).dtype == bf16
            with OpLog() as log:
                torch.cat([x, low], dim=1)
            assert log.count("_to_copy") == 1


def test_weight_casts_are_cached_per_region_for_trainable_leaves_only() -> None:
    with fake():
        trainable = nn.Parameter(torch.empty(4, 4))
        frozen = nn.Parameter(torch.empty(4, 4), requires_grad=False)
        x = torch.empty(3, 4)
        with CudaEmulation() as cuda:
            with cuda.autocast(torch.bfloat16), OpLog() as log:  # einsum: an op CPU autocast has no rule for
                for _ in range(3):
                    torch.einsum("ij,jk->ik", x, trainable)
                    torch.einsum("ij,jk->ik", x, frozen)
            casts = [ins[0] for op, ins, outs in log.calls if op == "_to_copy" and outs == [torch.bfloat16]]
            assert len(casts) == 1 + 3 + 6  # the trainable weight once, the frozen weight and x every time
            with cuda.autocast(torch.bfloat16), OpLog() as log:  # a new region casts again
                torch.einsum("ij,jk->ik", x, trainable)
            assert log.count("_to_copy") == 2


def saved(run: Callable[[], torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd saves for backward while `run` executes."""
    kept: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


def test_dropout_is_cudas_fused_kernel() -> None:
    with fake():
        x = torch.empty(4, 8, requires_grad=True)
        with CudaEmulation():
            assert (x.shape, torch.bool) in [(torch.Size(s), d) for s, d in saved(lambda: F.dropout(x, 0.1))]
            assert saved(lambda: F.dropout(x, 0.0)) == [] and saved(lambda: F.dropout(x, 0.1, training=False)) == []
        plain = saved(lambda: F.dropout(x, 0.1))  # CPU: a float noise tensor
        assert all(dtype != torch.bool for _, dtype in plain) and ((4, 8), torch.float32) in plain


def attention_saves(target: CudaTarget, dtype: torch.dtype | None, fused: bool = True) -> set[tuple[Any, ...]]:
    """What one block of the tiny ViT (2 heads, 17 tokens, batch 2) saves, traced for `target`."""
    with fake():
        model = fake_model(fused=fused, depth=1)
        x = torch.empty(2, 3, 32, 32)
        with CudaEmulation(target) as cuda, cuda.autocast(dtype):
            return set(saved(lambda: model(x)))


def test_each_attention_kernel_keeps_what_it_keeps_on_cuda() -> None:
    batch, heads, tokens = 2, 2, 17
    h100, a100, t4 = CudaTarget((9, 0)), CudaTarget((8, 0)), CudaTarget((7, 5))
    probs = (batch, heads, tokens, tokens)
    cudnn = attention_saves(h100, torch.bfloat16)
    assert ((batch, heads, tokens, 1), torch.float32) in cudnn and all(s != probs for s, _ in cudnn)
    efficient = attention_saves(h100, None)  # fp32: memory-efficient, logsumexp padded to a multiple of 32
    assert ((batch, heads, 32), torch.float32) in efficient and all(s != probs for s, _ in efficient)
    flash = attention_saves(a100, torch.bfloat16)
    assert ((batch, heads, tokens), torch.float32) in flash
    assert (probs, torch.float32) in attention_saves(t4, torch.bfloat16)  # no fused bf16 kernel before sm80: math
    # explicit attention: CUDA's softmax runs in fp32 and the next matmul casts its output back, so both are kept
    explicit = attention_saves(h100, torch.bfloat16, fused=False)
    assert (probs, torch.float32) in explicit and ((batch * heads, tokens, tokens), torch.bfloat16) in explicit
    with fake():  # CPU autocast has no softmax rule: the probabilities stay bf16, no fp32 copy
        model, x = fake_model(fused=False, depth=1), torch.empty(2, 3, 32, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (probs, torch.float32) not in saved(lambda: model(x))


def test_the_selector_follows_sdp_utils() -> None:
    """Expectations read off sdp_utils.cpp (priority order, per-kernel checks) for a ViT-B head (64)."""
    assert select_kernel((9, 0), "bf16", 64) == "cudnn"  # cuDNN > 9.15 on sm90: cuDNN first
    assert select_kernel((9, 0), "fp16", 64) == "cudnn"
    assert select_kernel((10, 0), "bf16", 64) == "cudnn"
    assert select_kernel((9, 0), "fp32", 64) == "efficient"  # cuDNN and flash take fp16/bf16 only
    assert select_kernel((8, 0), "bf16", 64) == "flash"  # default order: flash first
    assert select_kernel((8, 9), "fp16", 64) == "flash"
    assert select_kernel((8, 0), "fp32", 64) == "efficient"
    assert select_kernel((12, 0), "bf16", 64) == "flash"  # cuDNN preferred on 9.x/10.x only
    assert select_kernel((7, 5), "fp16", 64) == "efficient"  # T4: no flash, no cuDNN attention before sm80
    assert select_kernel((7, 5), "bf16", 64) == "math"  # and no bf16 memory-efficient kernel
    assert select_kernel((7, 0), "fp32", 64) == "efficient"
    assert select_kernel((9, 0), "bf16", 64, cudnn_version=91000) == "flash"  # old cuDNN: not preferred
    # cuDNN's dropout resolution is 1/16: timm's attn_drop 0.1 goes to flash, 0.125 stays on cuDNN
    assert select_kernel((9, 0), "bf16", 64, dropout_p=0.1) == "flash"
    assert select_kernel((9, 0), "bf16", 64, dropout_p=0.125) == "cudnn"
    h100 = CudaTarget((9, 0))
    assert select(h100, SdpaCall("bf16", 36)) == "flash"  # cuDNN wants head dims in multiples of 8
    assert select(h100, SdpaCall("fp64", 64)) == "math"
    assert select(h100, SdpaCall("bf16", 64, has_mask=True)) == "cudnn"
    assert select(CudaTarget((8, 0)), SdpaCall("bf16", 64, has_mask=True)) == "efficient"  # flash takes no mask
    assert select(h100, SdpaCall("fp32", 64, storage_offsets=(0, 66, 132))) == "math"  # misaligned on sm80+
    assert select(CudaTarget((8, 6)), SdpaCall("bf16", 200)) == "efficient"  # flash: no backward for d in (192, 224]
    assert select(h100, SdpaCall("bf16", 64, dims=3)) == "math"


def test_fp16_steps_run_gradscaler() -> None:
    with fake():
        model = fake_model("lora")
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], OptimizerSpec())
        scaler = FakeGradScaler()
        with CudaEmulation() as cuda:
            train = CudaTrainStep(model, optimizer, "fp16-mixed", cuda, scaler)
            with OpLog() as log:
                train(torch.empty(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
        assert len(scaler.state_tensors()) == 2 and optimizer.state  # the step ran (no overflow assumed)
        assert log.count("_amp_foreach_non_finite_check_and_unscale_") == 1 and log.count("_amp_update_scale_") == 1
        assert CudaTrainStep(model, optimizer, "bf16-mixed", cuda, scaler).scaler is None


def cuda_spec(precision: str, fused: bool = True, tuner: str = "full") -> Any:
    suite = parse_suite(
        {
            "name": "cuda-trace",
            "device": "cuda",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_copy(update={"fused_attn": fused}).model_dump(),
            "batch_size": 4,
            "precision": precision,
            "measure": {"warmup_steps": 2, "steps": 1},
            "tuners": [{"tuner": tuner}],
        }
    )
    (spec,) = expand(suite, "cuda")
    return spec


def test_cuda_rows_name_the_kernel_as_predicted() -> None:
    assert estimate_memory(cuda_spec("bf16-mixed")).attn_kernel == "cudnn (predicted, sm90)"
    assert estimate_memory(cuda_spec("fp32")).attn_kernel == "efficient (predicted, sm90)"
    fp16 = estimate_memory(cuda_spec("fp16-mixed", fused=False))
    assert fp16.attn_kernel == "math (predicted, sm90)" and fp16.estimate_approximate is False
    assert fp16.estimate_note is not None and "GradScaler" in fp16.estimate_note
    cpu = estimate_memory(cuda_spec("bf16-mixed").model_copy(update={"device": "cpu"}))
    assert cpu.attn_kernel == "cpu_flash"  # CPU estimates stay CPU's (tests/test_estimate.py: to the byte)


@pytest.mark.slow
def test_the_dtl_figure_is_reproduced_with_nothing_fitted_to_it() -> None:
    """suites/papers/dtl-figure.yaml estimated for CUDA (trace and allocator model): mean |published / predicted − 1|
    ≤ 0.10 over the ten methods other than LST (whose ViT port is not the figure's), with nothing fitted to the
    figure."""
    suite = load_suite(Path(__file__).resolve().parents[1] / "suites" / "papers" / "dtl-figure.yaml")
    assert suite.published is not None
    specs = expand(suite, "cuda")
    rows = [estimate_result(specs[i], estimate).to_row() for i, estimate in estimate_many(specs)]
    comparisons = compare(suite.published, rows)
    assert all(c.predicted_bytes is not None for c in comparisons)
    deviation = mean_abs_deviation(comparisons, exclude=["lst"])
    assert deviation is not None and deviation <= 0.10, markdown_table(suite.published, comparisons)
