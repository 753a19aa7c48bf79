"""A bridge to Hugging Face peft: any peft method that injects into a model's layers, applied to the timm ViT with
peft's own API for custom models (docs/methods.md, "peft").

The knobs are peft's: `peft_type` (a `PeftType` name: LORA, LOHA, LOKR, IA3, VERA, BOFT, ...) and `config`, the
fields of that method's config class (LoraConfig, LoHaConfig, ...), recorded in full on every row. Fields may
also be given beside `peft_type` (a suite's `grid: {r: [4, 8]}` lands there), and are moved into `config`.

This module is torch-free, so it checks only the shape of the knobs. peft itself imports torch (and
transformers), so peft's config classes and the backbone's module names are checked when the pre-flight probe builds
each configuration on the meta device before any run starts (petlbench/run/probe.py), and again in the worker by
`attach`.

Methods whose layers keep no shared state are injected in place with `peft.inject_adapter_in_model` (the ViT stays
the root module); those that share state across layers (VeRA's random projections, VB-LoRA's vector bank) are
wrapped with `peft.get_peft_model`, whose PeftModel holds that state and the ViT. No transformers model is involved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from pydantic import Field, JsonValue, field_validator, model_validator

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn

# Without target_modules peft looks the targets up by a transformers model type, which a timm ViT has none of.
DEFAULT_TARGETS: Final = ("qkv",)

# The rank-like field of each method (the headline knob) and peft's default for it, which a config that leaves the
# field out gets written in (the same run); tests/tuners/test_hf_peft.py checks the defaults against peft's.
RANK_FIELDS: Final[dict[str, tuple[str, int]]] = {
    "LORA": ("r", 8),
    "LOHA": ("r", 8),
    "LOKR": ("r", 8),
    "VERA": ("r", 256),
    "HRA": ("r", 8),
    "BOFT": ("boft_block_size", 4),
    "OFT": ("oft_block_size", 32),
    "RANDLORA": ("r", 32),
    "VBLORA": ("r", 4),
    "MISS": ("r", 64),
    "SHIRA": ("r", 32),
    "DELORA": ("r", 8),
    "FOURIERFT": ("n_frequency", 1000),
    "C3A": ("block_size", 256),
}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Peft(Tuner):
    """A peft method (`peft_type`) with its config, injected into the ViT by peft."""

    name = "peft"
    extra = "peft"
    brief = "any Hugging Face peft method"
    # why it cannot be a compose part (it leaves Tuner.replaces undeclared)
    compose_note: ClassVar[str] = "peft picks the modules it changes from its config only when it attaches"
    summary = (
        "Hugging Face peft: a peft method (LORA, LOHA, LOKR, IA3, VERA, BOFT, ...) with that method's own config, "
        "injected into the ViT by peft; default: LoRA r=8 on the fused qkv."
    )
    # The default (LoRA) merges and is the identity at init; merge() refuses a method whose peft layers cannot merge.
    mergeable = True
    identity_at_init = True

    peft_type: str = Field("LORA", description="peft method name (peft.PeftType): LORA, LOHA, LOKR, IA3, VERA, ...")
    config: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="fields of that method's peft config (LoraConfig, ...); target_modules defaults to [qkv], the "
        "rank-like field (r, boft_block_size, ...) to peft's default",
    )

    @model_validator(mode="before")
    @classmethod
    def _config_fields_beside_config(cls, data: Any) -> Any:
        """Fields given beside `peft_type` (a grid over a config field puts them there) go into `config`."""
        if not isinstance(data, dict):
            return data
        own = {k: v for k, v in data.items() if k in cls.model_fields}
        loose = {k: v for k, v in data.items() if k not in cls.model_fields}
        config = own.get("config", {})
        if not isinstance(config, dict):
            return data  # the field's own validation names it
        both = sorted(str(k) for k in loose.keys() & config.keys())
        if both:
            raise ValueError(f"{', '.join(both)}: set both in config and beside it (params or grid); keep one")
        merged = {**config, **loose}
        merged.setdefault("target_modules", list(DEFAULT_TARGETS))
        # The rank-like field is written out with peft's default, so every row says what it ran.
        peft_type = own.get("peft_type", "LORA")
        rank = RANK_FIELDS.get(peft_type.strip().upper()) if isinstance(peft_type, str) else None
        if rank is not None:
            merged.setdefault(rank[0], rank[1])
        return {**own, "config": merged}

    @field_validator("peft_type")
    @classmethod
    def _peft_type_name(cls, value: str) -> str:
        name = value.strip().upper()
        if not name.replace("_", "").isalnum() or not name[:1].isalpha():
            raise ValueError("must be a peft method name such as LORA, LOHA, LOKR, IA3, VERA, BOFT")
        return name

    def method(self) -> str:
        label = f"peft-{self.peft_type.lower().replace('_', '-')}"
        if self.peft_type == "LORA" and self.config.get("use_dora") is True:
            label += "-dora"
        return label

    def knob_name(self) -> str | None:
        found = RANK_FIELDS.get(self.peft_type)
        return found[0] if found else None

    def knob_value(self) -> float | None:
        found = RANK_FIELDS.get(self.peft_type)
        if found is None:
            return None
        field, default = found
        return _number(self.config.get(field, default))  # an ill-typed value is the pre-flight check's to report

    def dropout_rates(self) -> tuple[float, ...]:
        """The config's dropout fields (lora_dropout, rank_dropout, module_dropout, ...); peft defaults them to 0."""
        rates = (_number(value) for key, value in self.config.items() if "dropout" in key)
        return tuple(rate for rate in rates if rate is not None)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.hf_peft.layers import attach_peft

        return attach_peft(model, self.peft_type, self.config, self.knob_name())

    def merge(self, root: nn.Module) -> None:
        from petlbench.tuners.hf_peft.layers import merge_peft

        merge_peft(root, self.peft_type)

    def unmerge(self, root: nn.Module) -> None:
        from petlbench.tuners.hf_peft.layers import unmerge_peft

        unmerge_peft(root)
