"""Test-only tuners that fail on purpose, loaded through PETLBENCH_PLUGINS=tests.plugins.fault_tuners.

They prove that one run's crash, OOM or hang becomes that run's row while the sweep goes on. Like every tuner
module, this one imports no torch until a tuner is attached (a test checks that validation stays torch-free).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Crash(Tuner):
    name = "test_crash"
    summary = "test only: the worker process dies without writing a result"

    def attach(self, model: nn.Module) -> nn.Module:
        print("about to die", flush=True)
        os._exit(17)


class Oom(Tuner):
    name = "test_oom"
    summary = "test only: raises torch.cuda.OutOfMemoryError"

    def attach(self, model: nn.Module) -> nn.Module:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")


class Hang(Tuner):
    name = "test_hang"
    summary = "test only: never finishes"

    def attach(self, model: nn.Module) -> nn.Module:
        time.sleep(3600)
        return model


class BareMemoryError(Tuner):
    name = "test_memory_error"
    summary = "test only: raises a MemoryError without a message (what an allocator failure looks like)"

    def attach(self, model: nn.Module) -> nn.Module:
        raise MemoryError()


TUNERS = [Crash, Oom, Hang, BareMemoryError]
