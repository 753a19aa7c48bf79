"""NOAH: a retrained subnet of Neural Prompt Search (Zhang et al., 2022; docs/methods.md, "NOAH").

NOAH searches, per task, a layout of three modules over the blocks: VPT prompts, LoRA on the fused qkv and an
adapter after the MLP, each block with its own prompt count, LoRA rank and adapter width (0: none); the searched
subnet is then retrained from the pretrained backbone. Its repository publishes the subnet of every VTAB-1k task
(`experiments/NOAH/subnet/VTAB/ViT-B_prompt_<task>.yaml`); the 19 ship here in `subnets.yaml` with their source,
and `subnet: <task>` picks one. `prompt_len`, `lora_rank` and `adapter_dim` are the per-block layout: filled in
from the subnet (so the row records it), or given directly with `subnet: null`.

What each block computes follows NOAH's `model/supernet_vision_transformer_timm.py` (its `Block.forward`):

    x ← [x without the previous block's p_{i-1} prompt tokens, drop(P_i)]       (P_i: p_i×D; appended at the end)
    x ← x + DropPath(Attn(LN1(x)))     with qkv(y) + B_i·A_i·drop(y): one pair for the fused qkv, no scale
    h ← DropPath(MLP(LN2(x)));   x ← x + h + W_up·drop(QuickGELU(W_down·h + b_down)) + b_up

and before block 0 NOAH appends an input prompt set (p_0 tokens plus a positional embedding of its own) that
block 0 removes again before anything reads it: those tensors get a zero gradient, but they exist, train and
count in the parameter number NOAH prints; `input_prompt: false` leaves them out (same function).

Init as NOAH's model ends up after its model-wide `init_weights`: LoRA A and B and the adapter weights truncated
normal (std 0.02), zero biases, so NOAH does not start at the backbone; prompts (and the input set's positional
embedding) Xavier-uniform over NOAH's (1, 100, D) supernet tensors, U(±√(6/(101·D))). Dropout 0.1 on prompts,
LoRA input and adapter (NOAH's argparse defaults, kept by its retrain script). Backbone in train mode and a
trunc-normal head (NOAH's `model.train()` and `reset_classifier`).
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import yaml
from pydantic import Field, model_validator

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field, knob_error

if TYPE_CHECKING:
    from torch import nn

SUBNETS_FILE: Final = Path(__file__).with_name("subnets.yaml")
LAYOUT: Final = ("prompt_len", "lora_rank", "adapter_dim")
Width = Annotated[int, Field(ge=0)]


@functools.cache
def subnet_data() -> dict[str, Any]:
    """The shipped subnets file: source, supernet widths and the per-task layouts."""
    data: dict[str, Any] = yaml.safe_load(SUBNETS_FILE.read_text())
    return data


def subnets() -> dict[str, dict[str, list[int]]]:
    """Task → {prompt_len, lora_rank, adapter_dim}: NOAH's published VTAB-1k subnets."""
    return {task: {k: entry[k] for k in LAYOUT} for task, entry in subnet_data()["subnets"].items()}


def supernet_prompt_dim() -> int:
    """The width NOAH allocates its prompt tensors at (its SUPERNET.VISUAL_PROMPT_DIM): it sets their init bound
    and the size of the input prompt set's positional embedding."""
    return int(subnet_data()["supernet"]["visual_prompt_dim"])


class Noah(Tuner):
    """A NOAH subnet: per-block VPT prompts, LoRA on qkv and an adapter after the MLP, with NOAH's init."""

    name = "noah"
    brief = "NOAH's searched subnet"
    summary = (
        "NOAH: a searched per-block mix of VPT prompts, LoRA (one pair on the fused qkv) and adapters, retrained; "
        "subnet: a VTAB-1k task's layout as NOAH's repository publishes it."
    )
    replaces = ("blocks", "blocks.attn.qkv")  # NoahBlock re-runs a timm Block; NoahLoraQkv changes qkv
    wraps = ("norm_pre", "norm")  # the input prompt set; dropping the prompts before an averaging head

    subnet: str | None = Field(
        "cifar",
        description="a VTAB-1k task whose NOAH subnet to use (its per-block layout fills prompt_len, lora_rank and "
        "adapter_dim); null: give the three lists",
    )
    prompt_len: tuple[Width, ...] | None = Field(None, description="prompt tokens per block (0: none)")
    lora_rank: tuple[Width, ...] | None = Field(None, description="LoRA rank per block (0: none)")
    adapter_dim: tuple[Width, ...] | None = Field(None, description="adapter width per block (0: none)")
    input_prompt: bool = Field(
        True,
        description="NOAH's input prompt set and its positional embedding (100×D), which block 0 replaces: zero "
        "gradient, but in NOAH's parameter count; false leaves them out",
    )
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the prompt tokens (NOAH: 0.1)")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA input (NOAH: 0.1)")
    adapter_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout in the adapter (NOAH: 0.1)")
    backbone_mode: BackboneMode = backbone_mode_field("train", "'train', as NOAH trains (model.train() each epoch)")
    head_init: HeadInit = head_init_field(
        "timm", "'timm', what NOAH's reset_classifier draws (truncated normal std 0.02, zero bias)"
    )

    @model_validator(mode="before")
    @classmethod
    def _layout_from_the_subnet(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        subnet = data.get("subnet", cls.model_fields["subnet"].default)
        if subnet is None:
            missing = [k for k in LAYOUT if data.get(k) is None]
            if missing:
                message = f"subnet is null: give {', '.join(missing)} (one entry per block), or a subnet"
                raise knob_error(cls.__name__, (missing[0],), message, data)
            return data
        known = subnets()
        if not isinstance(subnet, str) or subnet not in known:
            close = difflib.get_close_matches(str(subnet), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"no NOAH subnet {subnet!r}; {hint}valid: {', '.join(known)}, or null"
            raise knob_error(cls.__name__, ("subnet",), message, data)
        layout = known[subnet]
        for key in LAYOUT:
            given = data.get(key)
            if given is not None and list(given) != layout[key]:
                message = f"differs from subnet {subnet!r}: {layout[key]}; set subnet: null to give your own layout"
                raise knob_error(cls.__name__, (key,), message, data)
        return {**data, **layout}

    @model_validator(mode="after")
    def _one_layout(self) -> Noah:
        lengths = {len(getattr(self, k) or ()) for k in LAYOUT}
        if len(lengths) != 1:
            raise ValueError("prompt_len, lora_rank and adapter_dim need one entry per block each, the same number")
        if not any(any(getattr(self, k) or ()) for k in LAYOUT):
            raise ValueError("every prompt_len, lora_rank and adapter_dim is 0: nothing to train")
        return self

    def layout(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The per-block prompt counts, LoRA ranks and adapter widths (filled in by validation)."""
        return (self.prompt_len or (), self.lora_rank or (), self.adapter_dim or ())

    def dropout_rates(self) -> tuple[float, ...]:
        prompts, ranks, widths = self.layout()
        used = ((prompts, self.prompt_dropout), (ranks, self.lora_dropout), (widths, self.adapter_dropout))
        return tuple(rate for sizes, rate in used if any(sizes))

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.noah.layers import attach_noah

        prompts, ranks, widths = self.layout()
        attach_noah(
            model,
            prompts,
            ranks,
            widths,
            self.input_prompt,
            supernet_prompt_dim(),
            (self.prompt_dropout, self.lora_dropout, self.adapter_dropout),
        )
        return model
