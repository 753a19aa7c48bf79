"""Tuner configurations and their registry.

This module is torch-free on purpose: the parent process (CLI, suite validation, executors, reports) validates
every tuner's knobs without importing torch. Each tuner's implementation lives in `petlbench/tuners/<name>.py`
and is registered in `petlbench/tuners/registry.py` (torch side); a meta-test keeps the two registries equal.

Adding a tuner: its config class here (knobs, defaults, bounds) + one name in `_BUILTIN`, its implementation
file, and one name in `registry.TUNERS`.

Tuners can also come from outside the package: set `PETLBENCH_PLUGINS=pkg.module[,other.module]`; each module
exposes `TUNERS: list[type[Tuner]]` and is imported by the parent and by every worker.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from petlbench.errors import ConfigError

PLUGINS_ENV: Final = "PETLBENCH_PLUGINS"


class TunerConfig(BaseModel):
    """Base of every tuner's knobs. Frozen and strict about unknown keys, so a typo fails at load time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    knob: ClassVar[str | None] = None  # the headline knob shown in the unified `knob` column
    summary: ClassVar[str] = ""

    def method(self) -> str:
        """The method's name in tables and plots: the tuner, plus a variant that changes the method (vpt-deep)."""
        return self.name

    def knob_value(self) -> float | None:
        """Value of the headline knob, or None for tuners without one (full, linear)."""
        if self.knob is None:
            return None
        value = getattr(self, self.knob)
        return float(value)


class FullConfig(TunerConfig):
    name = "full"
    summary = "Full fine-tuning: every backbone parameter and the new head train."


class LinearConfig(TunerConfig):
    name = "linear"
    summary = "Linear probe: frozen backbone, only the new classifier head trains."


class LoraConfig(TunerConfig):
    name = "lora"
    knob = "rank"
    summary = "LoRA: low-rank deltas (alpha/r)·B·A on the q and v rows of each block's fused qkv; B starts at zero."

    rank: int = Field(8, gt=0, description="rank r of each A (r×in) / B (out×r) pair")
    alpha: float | None = Field(
        None, gt=0, description="scale numerator; the delta is (alpha/rank)·BA; None means alpha = rank"
    )
    targets: tuple[Literal["q", "k", "v"], ...] = Field(("q", "v"), description="which of q, k, v get a delta")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input path")

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one of q, k, v")
        if len(set(value)) != len(value):
            raise ValueError(f"repeated entries in {list(value)}")
        return tuple(t for t in ("q", "k", "v") if t in value)


class VptConfig(TunerConfig):
    name = "vpt"
    knob = "prompt_len"
    summary = (
        "VPT: p learnable prompt tokens after the class token, without positional embedding; deep VPT replaces "
        "them with fresh prompts before every block, shallow VPT only inserts them once."
    )

    prompt_len: int = Field(50, gt=0, description="prompt tokens p per prompt set (sequence grows from N to N + p)")
    deep: bool = Field(True, description="deep VPT: one prompt set per block (L sets); False: shallow, one set")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the prompts (training mode only)")

    def method(self) -> str:
        return "vpt-deep" if self.deep else "vpt-shallow"


class FactConfig(TunerConfig):
    name = "fact"
    knob = "rank"
    summary = (
        "FacT: each block's qkv/proj/fc1/fc2 increment is s·V·core·U with U, V shared by all blocks; TT gives every "
        "D×D slice its own r×r core, TK builds the cores from one r×r×r tensor and slice factors P; V starts at 0."
    )

    variant: Literal["tt", "tk"] = Field(
        "tt", description="'tt' (tensor-train: a free core per weight slice) or 'tk' (Tucker: shared C and P)"
    )
    rank: int = Field(8, gt=0, description="rank r of the shared factors U (r×D) and V (D×r) and of every core")
    scale: float = Field(1.0, gt=0, description="global scale s of every increment (the official configs use 0.01-100)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on each core's output (the r-dim code before V)")

    def method(self) -> str:
        return f"fact-{self.variant}"


class SqtConfig(TunerConfig):
    name = "sqt"
    knob = "num_queries"
    summary = (
        "SQT/SynQT: learned per-layer queries read the frozen backbone's keys/values; only the query path "
        "and an instance-aware head train."
    )

    num_queries: int = Field(4, gt=0, description="query tokens per layer n (the paper uses 1, 4 or 16)")
    rank: int = Field(48, gt=0, description="bottleneck of the projection, FFN and head adapters")
    attn_rank: int = Field(8, gt=0, description="bottleneck of the q/k/v/o adapters of the query self-attention")
    attn_scale: float = Field(0.1, description="initial value of each layer's learnable attention-branch scale")
    ffn_scale: float = Field(0.1, description="initial value of each layer's learnable FFN-branch scale")
    feat_scale: float = Field(0.1, description="initial value of the shared scale on the previous layer's query")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout in the rank adapters, query attention and head weight generator"
    )
    head_drop_path: float = Field(0.3, ge=0.0, lt=1.0, description="per-token drop path on head tokens 2..3L+1")
    token_drop_path: bool = Field(
        True,
        description="keep the backbone's drop path active on the frozen token path in training (official code); "
        "false runs the token path without it",
    )
    pre_logits: str | None = Field(
        None,
        min_length=1,
        description="original ViT .npz whose pre_logits/kernel,bias become a frozen tanh layer before the "
        "classifier (timm-0.4.12 in21k models); None: no pre-logits",
    )


_BUILTIN: Final[tuple[type[TunerConfig], ...]] = (
    FullConfig,
    LinearConfig,
    LoraConfig,
    VptConfig,
    FactConfig,
    SqtConfig,
)


def _build_registry(configs: Iterable[type[TunerConfig]]) -> Mapping[str, type[TunerConfig]]:
    registry: dict[str, type[TunerConfig]] = {}
    for cfg in configs:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", cfg.name):
            raise ConfigError(f"tuner name {cfg.name!r} must be lower-case letters, digits and '_'")
        if cfg.name in registry:
            raise ConfigError(f"tuner name {cfg.name!r} is registered twice")
        registry[cfg.name] = cfg
    return MappingProxyType(registry)


TUNER_CONFIGS: Final = _build_registry(_BUILTIN)


def plugin_modules() -> list[ModuleType]:
    """Modules named in PETLBENCH_PLUGINS, imported. Each must expose a `TUNERS` list of Tuner classes."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    modules = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {name!r} ({exc}); fix the module path") from exc
        if not isinstance(getattr(module, "TUNERS", None), list | tuple):
            raise ConfigError(f"{PLUGINS_ENV}: module {name!r} has no TUNERS list of Tuner classes")
        modules.append(module)
    return modules


def tuner_configs() -> Mapping[str, type[TunerConfig]]:
    """Every available tuner config: the built-in ones plus those from PETLBENCH_PLUGINS."""
    plugins = plugin_modules()
    if not plugins:
        return TUNER_CONFIGS
    extra: list[type[TunerConfig]] = [t.config_cls for m in plugins for t in m.TUNERS]
    return _build_registry([*_BUILTIN, *extra])


def unknown_tuner_message(name: str, known: Iterable[str]) -> str:
    """'unknown tuner 'lroa'; did you mean 'lora'? valid: full, linear, lora'."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown tuner {name!r}{hint} valid: {', '.join(known)}"


def describe_config(cfg: type[TunerConfig]) -> list[dict[str, Any]]:
    """One dict per knob (name, type, default, description) for `petlbench tuners`."""
    rows = []
    for field_name, info in cfg.model_fields.items():
        annotation = info.annotation
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        rows.append(
            {
                "name": field_name,
                "type": type_name,
                "default": info.get_default(call_default_factory=True),
                "description": info.description or "",
                "headline": field_name == cfg.knob,
            }
        )
    return rows
