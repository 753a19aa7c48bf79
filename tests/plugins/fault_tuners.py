"""Test-only tuners that fail on purpose, loaded through PETLBENCH_PLUGINS=tests.plugins.fault_tuners.

They prove that one run's crash, OOM or hang becomes that run's row while the sweep goes on. The fault happens in
the run's first forward on real tensors (`fault_layers.py`), not when the pre-flight probe builds the model on
the meta device. Like every tuner module, this one imports no torch until a tuner is attached (a test checks that
validation stays torch-free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class _Fault(Tuner):
    adds_parameters = False  # only a wrapper without parameters: the head trains
    fault: ClassVar[str]

    def attach(self, model: nn.Module) -> nn.Module:
        from tests.plugins.fault_layers import add_fault

        return add_fault(model, self.fault)


class Crash(_Fault):
    name = "test_crash"
    summary = "test only: the worker process dies without writing a result"
    fault = "crash"


class Oom(_Fault):
    name = "test_oom"
    summary = "test only: raises torch.cuda.OutOfMemoryError"
    fault = "oom"


class Hang(_Fault):
    name = "test_hang"
    summary = "test only: never finishes"
    fault = "hang"


class BareMemoryError(_Fault):
    name = "test_memory_error"
    summary = "test only: raises a MemoryError without a message (what an allocator failure looks like)"
    fault = "memory_error"


TUNERS = [Crash, Oom, Hang, BareMemoryError]
