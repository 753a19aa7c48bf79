"""One training step, shared by the memory, speed, breakdown and accuracy phases (so they measure the same thing)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.errors import ConfigError
from petlbench.spec.models import OptimizerSpec, Precision


def make_optimizer(params: Iterable[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW or SGD with the implementation (foreach / fused / single-tensor) pinned by the spec."""
    params = list(params)
    if spec.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=spec.lr,
            betas=spec.betas,
            weight_decay=spec.weight_decay,
            foreach=spec.foreach,
            fused=spec.fused,
        )
    return torch.optim.SGD(
        params,
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        foreach=spec.foreach,
        fused=spec.fused,
    )


def autocast(precision: Precision, device_type: str) -> AbstractContextManager[object]:
    """The mixed-precision context for a precision name (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16-mixed" and device_type != "cuda":
        raise ConfigError("precision: fp16-mixed needs device cuda; use bf16-mixed on CPU")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


class TrainStep:
    """forward → cross-entropy → backward → optimizer step → zero_grad(set_to_none=True).

    Split in two halves so the memory tracker can tell optimizer allocations from activations.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        device_type: str,
        label_smoothing: float = 0.0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision: Precision = precision
        self.device_type = device_type
        self.label_smoothing = label_smoothing
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16-mixed" else None
        # called between the loss and `backward()`: the tracker marks the forward/backward boundary there
        self.on_backward: Callable[[], None] | None = None

    def backward_starts(self) -> None:
        if self.on_backward is not None:
            self.on_backward()

    def autocast_region(self) -> AbstractContextManager[object]:
        """Where the forward and the loss run: the device's autocast for the step's precision."""
        return autocast(self.precision, self.device_type)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast_region():
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.backward_starts()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # set_to_none: gradients do not survive into the next forward (otherwise +P bytes at every peak)
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(x, y)
        self.optimizer_step()
        return loss
