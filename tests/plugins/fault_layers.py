"""The torch side of the fault plugins: a stage that misbehaves only on the real tensors of a run.

The pre-flight probe builds every tuner on the meta device, and the estimator traces it on fake tensors; neither
is the run these faults stand for, so both see an ordinary stage.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor


class FaultyStage(nn.Module):
    """Wraps a backbone stage (`base`) and, on a real tensor, crashes, runs out of memory or hangs first."""

    def __init__(self, base: nn.Module, fault: str) -> None:
        super().__init__()
        self.base = base
        self.fault = fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_meta or isinstance(x, FakeTensor)):
            if self.fault == "crash":
                print("about to die", flush=True)
                os._exit(17)
            if self.fault == "oom":
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)"
                )
            if self.fault == "memory_error":
                raise MemoryError()
            if self.fault == "hang":
                time.sleep(3600)
        out: torch.Tensor = self.base(x)
        return out


def add_fault(model: nn.Module, fault: str) -> nn.Module:
    model.norm_pre = FaultyStage(model.norm_pre, fault)  # an Identity in timm ViTs: nothing else reads it
    return model
