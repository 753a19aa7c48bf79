"""A CUDA training step traced on fake CPU tensors: CUDA's autocast policy and CUDA's kernels, at dispatch level.

The estimator traces every run on fake CPU tensors (petlbench/estimate/engine.py). For a CUDA run, `CudaEmulation`
makes that trace allocate what the same step allocates on a GPU, by registering Python kernels with the dispatcher
for the duration of the trace (`torch.library`, removed on exit):

- autocast: a kernel at the `AutocastCPU` key for every op that CPU or CUDA autocast handles, applying CUDA's
  policy (petlbench/estimate/cuda_policy.py) and redispatching below autocast, as autocast's own C++ wrappers do.
  The step runs under `torch.autocast("cpu", dtype)`, so the casts happen above autograd and autograd saves the
  cast tensors, exactly where CUDA autocast puts them. Ops both autocasts run in lower precision keep CPU's C++
  kernel and with it autocast's weight cache; CPU-only rules (`cat` and `stack` promote, losses in fp32) are
  replaced by CUDA's (none).
- CUDA's branches of composite ops (kernels at `CompositeImplicitAutograd`, the same place as the originals):
  `dropout` runs the fused `native_dropout` (a 1-byte mask, not a float noise tensor); `softmax`/`log_softmax` of
  fp16 to fp32 run one kernel that reads fp16 and writes fp32 (no fp32 copy of the input); and
  `scaled_dot_product_attention` calls the kernel CUDA's selector picks for the target GPU
  (petlbench/estimate/attention.py), whose fake implementation returns what that kernel keeps for backward.
- fp16: `FakeGradScaler` scales the loss, unscales the gradients and updates its scale as GradScaler does; only
  its check for infinite gradients, which reads values, is assumed to find none.

docs/estimation.md ("CUDA runs") says why this route and what stays approximate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.estimate import cuda_policy
from petlbench.estimate.attention import DEFAULT_TARGET, CudaTarget, DType, Kernel, SdpaCall, select
from petlbench.measure.step import TrainStep
from petlbench.spec.models import Precision

LOWER_PRECISION: Final = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_DTYPE_NAMES: Final[dict[torch.dtype, DType]] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
_AUTOCAST_KEY: Final = "AutocastCPU"
_NO_AUTOCAST: Final = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_COMPOSITE: Final = "CompositeImplicitAutograd"


def _op(name: str) -> torch._ops.OpOverload | None:
    """`aten::name` as an OpOverload (`softmax.int`, `linear`), or None if this torch has no such op."""
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return None
    op = getattr(packet, overload or "default", None)
    return op if isinstance(op, torch._ops.OpOverload) else None


def _eligible(value: object) -> bool:
    """autocast's `is_eligible`: a floating tensor on the device (here: CPU), not double."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
        and value.device.type == "cpu"
    )


def cpu_autocast_ops() -> set[str]:
    """The ops CPU autocast has kernels for in this torch (read from the dispatcher)."""
    names = torch._C._dispatch_get_registrations_for_dispatch_key(_AUTOCAST_KEY)
    return {name.removeprefix("aten::") for name in names if name.startswith("aten::")}


class CudaEmulation:
    """Context manager: while entered, CPU autocast and a few composite ops behave as on a CUDA GPU (`target`).

    `autocast(dtype)` is the forward's mixed-precision region (torch.autocast on CPU plus the weight-cast cache of
    the ops emulated here). `kernels` collects the attention kernels selected.
    """

    def __init__(self, target: CudaTarget = DEFAULT_TARGET) -> None:
        self.target = target
        self.kernels: set[Kernel] = set()
        # op → the CUDA policy its AutocastCPU kernel applies while entered ("none": passes the call through)
        self.policies: dict[str, str] = {}
        self._library: torch.library.Library | None = None
        # id(source) → (source, cast): lower-precision casts of fp32 leaves that require grad, per autocast region
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- lifetime ---------------------------------------------------------------------------------------------

    def __enter__(self) -> CudaEmulation:
        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
            self._register_autocast(library)
            library.impl("dropout", self._dropout, _COMPOSITE)
            library.impl("softmax.int", self._softmax(torch.ops.aten._softmax.default), _COMPOSITE)
            library.impl("log_softmax.int", self._softmax(torch.ops.aten._log_softmax.default), _COMPOSITE)
            library.impl("scaled_dot_product_attention", self._sdpa, _COMPOSITE)
        self._library = library
        return self

    def __exit__(self, *exc: object) -> None:
        if self._library is not None:
            self._library._destroy()  # the original kernels are back
            self._library = None
        self._cache = None

    @contextmanager
    def _cache_scope(self) -> Iterator[None]:
        outer = self._cache
        self._cache = {} if outer is None else outer
        try:
            yield
        finally:
            self._cache = outer  # leaving the outermost region drops the cached casts, as autocast does

    def autocast(self, dtype: torch.dtype | None) -> AbstractContextManager[object]:
        """The mixed-precision region of a forward: CUDA's policy in `dtype` (None: fp32, no autocast)."""
        if dtype is None:
            return nullcontext()
        return _Both(torch.autocast("cpu", dtype=dtype), self._cache_scope())

    # -- autocast ---------------------------------------------------------------------------------------------

    def _register_autocast(self, library: torch.library.Library) -> None:
        policy = cuda_policy.cuda_policy()
        self.policies = dict.fromkeys(cuda_policy.SHARED_WITH_CPU, "lower")  # CPU's own kernels stay
        for name in sorted((set(policy) | cpu_autocast_ops()) - cuda_policy.SHARED_WITH_CPU):
            op = _op(name)
            if op is None:
                continue
            if name in policy:
                library.impl(name, self._autocast_kernel(op, policy[name]), _AUTOCAST_KEY)
            else:  # CPU has a rule, CUDA none: fall through, autocast staying on for the ops inside
                library.impl(name, _fallthrough(op), _AUTOCAST_KEY, with_keyset=True)
            self.policies[name] = policy.get(name, "none")

    def _autocast_kernel(self, op: torch._ops.OpOverload, policy: str) -> Callable[..., Any]:
        cast, cast_kwargs = self._cast, self._cast_kwargs
        if policy in ("lower", "fp32"):
            fixed = None if policy == "lower" else torch.float32

            def to_type(*args: Any, **kwargs: Any) -> Any:
                dtype = fixed or torch.get_autocast_dtype("cpu")
                with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                    return op(*cast(dtype, args), **cast_kwargs(dtype, kwargs))

            return to_type
        if policy == "promote":

            def promote(*args: Any, **kwargs: Any) -> Any:
                dtype = _promote_type(torch.get_autocast_dtype("cpu"), [*args, *kwargs.values()])
                with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                    return op(*cast(dtype, args), **cast_kwargs(dtype, kwargs))

            return promote
        if policy == "fp32_set_opt_dtype":
            position = next(i for i, a in enumerate(op._schema.arguments) if a.name == "dtype")

            def set_opt_dtype(*args: Any, **kwargs: Any) -> Any:
                with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                    if args and _eligible(args[0]):
                        given = args[position] if len(args) > position else kwargs.get("dtype")
                        if given is None:
                            if len(args) > position:
                                args = (*args[:position], torch.float32, *args[position + 1 :])
                            else:
                                kwargs = {**kwargs, "dtype": torch.float32}
                    return op(*args, **kwargs)

            return set_opt_dtype
        if policy == "fp32_append_dtype":
            target = _op(cuda_policy.FP32_APPEND_DTYPE[op._schema.name.removeprefix("aten::") + "." + op._overloadname])
            assert target is not None

            positional = [a for a in op._schema.arguments if not a.kwarg_only]

            def append_dtype(*args: Any, **kwargs: Any) -> Any:
                first = args[0]
                dtype = torch.float32 if _eligible(first) else first.dtype
                # the registered overload's defaults, spelled out: the dtype overload has none (norm's p)
                args = (*args, *(a.default_value for a in positional[len(args) :] if a.name not in kwargs))
                with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
                    return target(*args, **kwargs, dtype=dtype)

            return append_dtype
        if policy == "banned":

            def banned(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError(
                    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast "
                    "(CUDA autocast refuses them); use binary_cross_entropy_with_logits"
                )

            return banned
        raise AssertionError(f"unknown autocast policy {policy!r}")

    def _cast(self, dtype: torch.dtype, values: Sequence[Any]) -> list[Any]:
        return [self._cast_value(dtype, v) for v in values]

    def _cast_kwargs(self, dtype: torch.dtype, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: self._cast_value(dtype, v) for k, v in kwargs.items()}

    def _cast_value(self, dtype: torch.dtype, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._cached_cast(dtype, value)
        if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self._cast_value(dtype, v) for v in value)
        return value

    def _cached_cast(self, dtype: torch.dtype, tensor: torch.Tensor) -> torch.Tensor:
        """autocast's `cached_cast`: eligible tensors of another dtype are cast; lower-precision casts of fp32 leaves
        that require grad are cached for the autocast region (the same weight cast once per forward)."""
        if not _eligible(tensor) or tensor.dtype == dtype:
            return tensor
        cache = self._cache
        if (
            cache is not None
            and dtype == torch.get_autocast_dtype("cpu")
            and tensor.dtype == torch.float32
            and tensor.requires_grad
            and tensor.is_leaf
            and not tensor._is_view()
            and torch.is_autocast_cache_enabled()
        ):
            hit = cache.get(id(tensor))
            if hit is not None and hit[0] is tensor:
                return hit[1]
            cast = tensor.to(dtype)
            cache[id(tensor)] = (tensor, cast)
            return cast
        return tensor.to(dtype)

    # -- CUDA's branches of composite ops ----------------------------------------------------------------------

    @staticmethod
    def _dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        """`at::native::dropout` on a CUDA tensor: the fused kernel whenever it applies."""
        if train and 0.0 < p < 1.0 and input.numel() > 0:
            fused: torch.Tensor = torch.ops.aten.native_dropout.default(input, p, train)[0]
            return fused
        if p == 0.0 or not train or input.numel() == 0:
            return input
        return input * torch.zeros((), dtype=input.dtype, device=input.device)  # p == 1

    @staticmethod
    def _softmax(kernel: torch._ops.OpOverload) -> Callable[..., torch.Tensor]:
        """`softmax`/`log_softmax` on a CUDA tensor: fp16 in, fp32 out is one kernel (`half_to_float`); otherwise
        the input is converted to `dtype` first."""

        def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            if input.dtype == torch.float16 and dtype == torch.float32:
                widened: torch.Tensor = kernel(input, dim, True)
                return widened
            converted = input.to(dtype) if dtype is not None else input
            out: torch.Tensor = kernel(converted, dim, False)
            return out

        return softmax

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """`scaled_dot_product_attention` on a CUDA tensor: the kernel `select_sdp_backend` picks for the target."""
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        call = SdpaCall(
            dtype=_DTYPE_NAMES.get(query.dtype, "fp64"),
            head_dim=query.shape[-1],
            value_head_dim=value.shape[-1],
            batch=query.shape[0],
            heads=query.shape[1] if query.dim() == 4 else 1,
            key_heads=key.shape[1] if key.dim() == 4 else 1,
            seq_len_q=query.shape[-2],
            seq_len_k=key.shape[-2],
            dims=min(query.dim(), key.dim(), value.dim()),
            dropout_p=dropout_p,
            has_mask=attn_mask is not None,
            is_causal=is_causal,
            requires_grad=needs_grad,
            last_dim_contiguous=all(t.stride(-1) == 1 for t in (query, key, value)),
            storage_offsets=(int(query.storage_offset()), int(key.storage_offset()), int(value.storage_offset())),
        )
        kernel = select(self.target, call)
        self.kernels.add(kernel)
        mask = _float_mask(attn_mask, query.dtype)
        out: torch.Tensor
        if kernel == "cudnn":
            out = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
                query, key, value, mask, needs_grad, dropout_p, is_causal, False, scale=scale
            )[0]
        elif kernel == "flash":
            head_dim = query.shape[-1]
            pad = -head_dim % 8  # the composite pads the head dim to a multiple of 8 for flash
            q, k, v = (F.pad(t, (0, pad)) if pad else t for t in (query, key, value))
            out = torch.ops.aten._scaled_dot_product_flash_attention.default(
                q, k, v, dropout_p, is_causal, False, scale=scale if scale is not None else head_dim**-0.5
            )[0]
            if pad:
                out = out[..., :head_dim]
        elif kernel == "efficient":
            if mask is not None:
                mask = _efficient_mask(mask, query, key)
            out = torch.ops.aten._scaled_dot_product_efficient_attention.default(
                query, key, value, mask, needs_grad, dropout_p, is_causal, scale=scale
            )[0]
        else:
            out = torch.ops.aten._scaled_dot_product_attention_math.default(
                query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
            )[0]
        return out


def _fallthrough(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """A kernel that passes the call on to the next dispatch key without touching autocast's state (what a key
    without a kernel does): a composite op then sees autocast on in the ops it calls."""

    def kernel(keyset: torch._C.DispatchKeySet, *args: Any, **kwargs: Any) -> Any:
        return op.redispatch(keyset.remove(torch._C.DispatchKey.AutocastCPU), *args, **kwargs)

    return kernel


class _Both(AbstractContextManager[object]):
    """Two context managers entered in order and left in reverse."""

    def __init__(self, first: AbstractContextManager[Any], second: AbstractContextManager[Any]) -> None:
        self.first, self.second = first, second

    def __enter__(self) -> object:
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


def _promote_type(lower: torch.dtype, values: Sequence[Any]) -> torch.dtype:
    """autocast's `promote_type`: the widest floating type among the eligible inputs, starting from `lower`."""
    current = lower
    for value in values:
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if not _eligible(item):
                continue
            if current == torch.float32 or item.dtype == torch.float32:
                current = torch.float32
            elif current != item.dtype:
                raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
    return current


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask as the additive float mask the kernels take (0 where True, -inf where False)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), float("-inf"))


def _efficient_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The memory-efficient kernel's bias: last dim padded to a multiple of 16, expanded to (B, H, Nq, Nk)."""
    size = mask.shape[-1]
    pad = -size % 16
    if pad:
        mask = F.pad(mask, (0, pad))[..., :size]
    shape = (query.shape[0], query.shape[1], query.shape[-2], key.shape[-2])
    return mask.expand(shape)


class FakeGradScaler(torch.amp.GradScaler):
    """torch's GradScaler, on fake tensors: it scales the loss, unscales the gradients in place and updates its scale
    with the same ops; only the check for infinite gradients before the optimizer step, which reads a value, is
    assumed to find none (the step runs, as in every step that does not overflow)."""

    def __init__(self) -> None:
        super().__init__("cpu")

    def _maybe_opt_step(
        self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> float | None:
        result: float | None = optimizer.step(*args, **kwargs)
        return result

    def state_tensors(self) -> list[torch.Tensor]:
        """The scale and growth tracker (created by the first `scale()`; alive for the whole run)."""
        return [t for t in (self._scale, self._growth_tracker) if t is not None]


class CudaTrainStep(TrainStep):
    """The worker's training step as a CUDA GPU runs it, traced on fake CPU tensors under `emulation`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        emulation: CudaEmulation,
        scaler: FakeGradScaler | None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, optimizer, "fp32", "cpu", label_smoothing)
        self.precision = precision
        self.emulation = emulation
        self.scaler = scaler if precision == "fp16-mixed" else None

    def autocast_region(self) -> AbstractContextManager[object]:
        """CUDA's autocast rules, emulated on the fake CPU tensors."""
        return self.emulation.autocast(LOWER_PRECISION.get(self.precision))
