"""Test-only tuners that fail on purpose, loaded through PETLBENCH_PLUGINS=tests.plugins.fault_tuners.

They prove that one run's crash, OOM or hang becomes that run's row while the sweep goes on.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from petlbench.tuners import TunerConfig
from petlbench.tuners.base import Tuner


class CrashConfig(TunerConfig):
    name = "test_crash"
    summary = "test only: the worker process dies without writing a result"


class Crash(Tuner[CrashConfig]):
    config_cls = CrashConfig

    def attach(self, model: nn.Module) -> nn.Module:
        print("about to die", flush=True)
        os._exit(17)


class OomConfig(TunerConfig):
    name = "test_oom"
    summary = "test only: raises torch.cuda.OutOfMemoryError"


class Oom(Tuner[OomConfig]):
    config_cls = OomConfig

    def attach(self, model: nn.Module) -> nn.Module:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")


class HangConfig(TunerConfig):
    name = "test_hang"
    summary = "test only: never finishes"


class Hang(Tuner[HangConfig]):
    config_cls = HangConfig

    def attach(self, model: nn.Module) -> nn.Module:
        time.sleep(3600)
        return model


TUNERS = [Crash, Oom, Hang]
