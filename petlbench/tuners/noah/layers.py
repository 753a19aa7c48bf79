"""NOAH's layers: its fused-qkv LoRA, the block that splices prompts and adds the adapter after the MLP, the input
prompt set, and the strip that keeps prompts away from an averaging head."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.adapter.layers import Bottleneck, noah_linear_init_
from petlbench.tuners.layers import MergeableLayer, block_linear, read_block_linear, require_timm_block, vit_blocks


def prompt_bound(supernet_dim: int, dim: int) -> float:
    """Xavier-uniform's bound for NOAH's (1, S, D) prompt tensors: fan_in S·D, fan_out D."""
    return math.sqrt(6.0 / (supernet_dim * dim + dim))


class NoahLoraQkv(MergeableLayer):
    """Wraps a fused qkv `nn.Linear` (kept as `base`): qkv(y) + B·A·drop(y), one pair for q, k and v, no scale."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float) -> None:
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        noah_linear_init_(self.lora_A)  # NOAH draws Kaiming / zero, then its model-wide init re-draws both
        noah_linear_init_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.merged:
            return out
        delta: torch.Tensor = self.lora_B(self.lora_A(self.dropout(x)))
        return out + delta  # a new tensor, as NOAH's q + q_delta, k + k_delta, v + v_delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype)
            self.merged = False


class _Prompts(nn.Module):
    """p learnable tokens (p×D), Uniform(±bound); dropout draws a mask per sample (the prompts are expanded)."""

    def __init__(self, count: int, dim: int, bound: float, dropout: float, like: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(count, dim, device=like.device, dtype=like.dtype))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bound = bound
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.prompt, -self.bound, self.bound)

    def tokens(self, batch: int, dtype: torch.dtype, extra: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.prompt.expand(batch, -1, -1)
        if extra is not None:
            tokens = tokens + extra
        out: torch.Tensor = self.dropout(tokens).to(dtype)
        return out


class NoahInputPrompts(nn.Module):
    """Wraps the stage before the blocks (`norm_pre`) and appends NOAH's input prompt set plus its positional
    embedding (S×D, the first p_0 rows used); block 0 removes them again."""

    def __init__(self, base: nn.Module, prompts: _Prompts, supernet_dim: int) -> None:
        super().__init__()
        self.base = base
        self.prompts = prompts
        dim = prompts.prompt.shape[1]
        like = prompts.prompt
        self.pos_embed = nn.Parameter(torch.empty(supernet_dim, dim, device=like.device, dtype=like.dtype))
        nn.init.uniform_(self.pos_embed, -prompts.bound, prompts.bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base(x)
        count = self.prompts.prompt.shape[0]
        return torch.cat((x, self.prompts.tokens(x.shape[0], x.dtype, self.pos_embed[:count])), dim=1)


class NoahBlock(nn.Module):
    """Wraps a timm `Block` (kept as `base`) and runs NOAH's `Block.forward`: replace the previous block's trailing
    prompts with this block's, attention (LoRA sits in `attn.qkv`), then the MLP with the adapter applied to its
    output after drop path."""

    def __init__(self, base: nn.Module, prompts: _Prompts | None, drop_last: int, adapter: Bottleneck | None) -> None:
        super().__init__()
        self.base = base
        self.prompts = prompts
        self.drop_last = drop_last
        self.adapter = adapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.prompts is not None:
            kept = x[:, : x.shape[1] - self.drop_last] if self.drop_last else x
            x = torch.cat((kept, self.prompts.tokens(x.shape[0], x.dtype)), dim=1)
        b: Any = self.base  # a timm Block (checked in attach_noah)
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h = b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        if self.adapter is not None:
            h = h + self.adapter(h)  # NOAH's AdapterSuper: identity + ln2(drop(QuickGELU(ln1(h))))
        out: torch.Tensor = x + h
        return out

    def extra_repr(self) -> str:
        count = 0 if self.prompts is None else self.prompts.prompt.shape[0]
        return f"prompts={count}, drop_last={self.drop_last}"


class NoahStrip(nn.Module):
    """Wraps the final norm and drops the trailing prompt tokens first, for models that pool over tokens."""

    def __init__(self, base: nn.Module, count: int) -> None:
        super().__init__()
        self.base = base
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x[:, : x.shape[1] - self.count])
        return out

    def extra_repr(self) -> str:
        return f"count={self.count}"


def trailing_prompts(prompts: tuple[int, ...], input_prompt: bool) -> list[int]:
    """Per block: how many trailing tokens it removes before appending its own (NOAH: the previous block's count,
    block 0 the input set's), and the tokens left after the last block, as the last entry."""
    present = prompts[0] if input_prompt else 0
    drops: list[int] = []
    for i, count in enumerate(prompts):
        last = prompts[i - 1] if i > 0 else present
        drops.append(last if count else 0)
        if count:  # a block without prompts keeps whatever the blocks before it appended
            present = present - last + count
    return [*drops, present]


def attach_noah(
    model: nn.Module,
    prompts: tuple[int, ...],
    ranks: tuple[int, ...],
    widths: tuple[int, ...],
    input_prompt: bool,
    supernet_dim: int,
    dropouts: tuple[float, float, float],
) -> None:
    """Wrap qkv (LoRA), every block (prompts, adapter), `norm_pre` (input prompts) and, for models that pool over
    tokens, `norm`. Everything is checked before anything is changed."""

    blocks = vit_blocks(model, "noah")
    if len(blocks) > len(prompts):
        raise TunerError(
            f"noah: the backbone has {len(blocks)} blocks, the layout {len(prompts)} entries; give prompt_len, "
            f"lora_rank and adapter_dim with one entry per block (subnet: null)"
        )
    dim = getattr(model, "embed_dim", None)
    pool = getattr(model, "global_pool", None)
    norm_pre, norm = getattr(model, "norm_pre", None), getattr(model, "norm", None)
    if not isinstance(dim, int) or not isinstance(pool, str):
        raise TunerError(
            f"noah: backbone {type(model).__name__} has no `embed_dim` / `global_pool`; expected a timm ViT"
        )
    if not isinstance(norm_pre, nn.Module) or not isinstance(norm, nn.Module):
        raise TunerError(f"noah: backbone {type(model).__name__} has no `norm_pre` / `norm`; expected a timm ViT")
    depth = len(blocks)
    prompts, ranks, widths = prompts[:depth], ranks[:depth], widths[:depth]  # a shallower model: the first blocks'
    for i, block in enumerate(blocks):
        if isinstance(block, NoahBlock):
            raise TunerError(f"noah: blocks[{i}] already has NOAH attached; attach it once")
        require_timm_block(block, i, "noah", "NOAH")
        qkv = block_linear(block, "attn.qkv", i, "noah") if ranks[i] else None
        if qkv is not None and ranks[i] > min(qkv.in_features, qkv.out_features):
            raise TunerError(f"noah: lora_rank {ranks[i]} of block {i} exceeds the qkv width {qkv.in_features}")
        if widths[i] > dim:
            raise TunerError(f"noah: adapter_dim {widths[i]} of block {i} exceeds the embedding width {dim}")

    like = read_block_linear(blocks[0], "mlp.fc2", 0, "noah").weight
    bound = prompt_bound(supernet_dim, dim)
    prompt_drop, lora_drop, adapter_drop = dropouts
    *drops, leftover = trailing_prompts(prompts, input_prompt)
    for i, block in enumerate(blocks):
        if ranks[i]:
            qkv = block_linear(block, "attn.qkv", i, "noah")
            block.get_submodule("attn").register_module("qkv", NoahLoraQkv(qkv, ranks[i], lora_drop))
        fc2 = read_block_linear(block, "mlp.fc2", i, "noah")
        adapter = Bottleneck(fc2.out_features, widths[i], adapter_drop, "noah", fc2.weight) if widths[i] else None
        own = _Prompts(prompts[i], dim, bound, prompt_drop, like) if prompts[i] else None
        blocks[i] = NoahBlock(block, own, drops[i], adapter)
    if input_prompt and prompts[0]:
        model.norm_pre = NoahInputPrompts(norm_pre, _Prompts(prompts[0], dim, bound, prompt_drop, like), supernet_dim)
    if pool != "token" and leftover:  # avg / max / attention pooling would read the prompt outputs
        model.norm = NoahStrip(norm, leftover)
