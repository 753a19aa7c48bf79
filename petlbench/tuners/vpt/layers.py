"""VPT's layers: the prompt set, the wrappers that insert and replace prompts, and the final-norm strip."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import unwrapped, vit_blocks


class _Prompted(nn.Module):
    """One learnable prompt set (p×D) with its dropout; the shared half of the two prompt wrappers."""

    def __init__(
        self,
        base: nn.Module,
        prompt_len: int,
        dim: int,
        num_prefix: int,
        dropout: float,
        bound: float,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.base = base
        self.prompt_len = prompt_len
        self.num_prefix = num_prefix
        self.prompt = nn.Parameter(torch.empty(prompt_len, dim, **factory))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bound = bound
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.prompt, -self.bound, self.bound)

    def prompts(self, batch: int) -> torch.Tensor:
        """The prompts for a batch, B×p×D; dropout draws a separate mask per sample, as the official code does."""
        out: torch.Tensor = self.dropout(self.prompt.expand(batch, -1, -1))
        return out

    def extra_repr(self) -> str:
        return f"prompt_len={self.prompt_len}, num_prefix={self.num_prefix}"


class VptInsert(_Prompted):
    """Wraps the stage just before the blocks (timm's `norm_pre`) and inserts P_0 after the prefix tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base(x)
        k = self.num_prefix
        return torch.cat((x[:, :k], self.prompts(x.shape[0]).to(x.dtype), x[:, k:]), dim=1)


class VptDeepBlock(_Prompted):
    """Wraps one transformer block; replaces the prompt positions of its input with this layer's prompts."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        k, p = self.num_prefix, self.prompt_len
        x = torch.cat((x[:, :k], self.prompts(x.shape[0]).to(x.dtype), x[:, k + p :]), dim=1)
        out: torch.Tensor = self.base(x, *args, **kwargs)
        return out


class VptStrip(nn.Module):
    """Wraps the final norm and drops the prompt positions first, for models that pool over tokens."""

    def __init__(self, base: nn.Module, prompt_len: int, num_prefix: int) -> None:
        super().__init__()
        self.base = base
        self.prompt_len = prompt_len
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, p = self.num_prefix, self.prompt_len
        out: torch.Tensor = self.base(torch.cat((x[:, :k], x[:, k + p :]), dim=1))
        return out

    def extra_repr(self) -> str:
        return f"prompt_len={self.prompt_len}, num_prefix={self.num_prefix}"


def prompt_init_bound(model: nn.Module) -> float:
    """v = sqrt(6 / (in_chans·patch_h·patch_w + D)), read from the model's patch embedding and width."""
    fan_in, _ = _patch_projection(model)
    return math.sqrt(6.0 / (fan_in + _embed_dim(model)))


def _patch_projection(model: nn.Module) -> tuple[int, torch.Tensor]:
    """The patch embedding's fan-in (in_chans·patch_h·patch_w) and its projection weight (for device/dtype)."""
    embed = getattr(model, "patch_embed", None)
    proj = unwrapped(getattr(embed, "proj", None))  # SSF, in a composition, wraps the projection
    patch = getattr(embed, "patch_size", None)
    in_chans = getattr(proj, "in_channels", None)
    weight = getattr(proj, "weight", None)
    if not (isinstance(patch, tuple | list) and isinstance(in_chans, int) and isinstance(weight, torch.Tensor)):
        raise TunerError(
            f"vpt: backbone {type(model).__name__} has no patch_embed.patch_size / patch_embed.proj (conv) to "
            "size the prompt init from; expected a timm ViT"
        )
    return in_chans * math.prod(int(s) for s in patch), weight


def _embed_dim(model: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None)
    if not isinstance(dim, int):
        raise TunerError(f"vpt: backbone {type(model).__name__} has no integer `embed_dim`; expected a timm ViT")
    return dim


def _submodule(model: nn.Module, name: str) -> nn.Module:
    module = getattr(model, name, None)
    if not isinstance(module, nn.Module):
        raise TunerError(f"vpt: backbone {type(model).__name__} has no `{name}` module; expected a timm ViT")
    if isinstance(module, VptInsert | VptStrip):
        raise TunerError(f"vpt: backbone already has VPT attached (`{name}` is a {type(module).__name__})")
    return module


def attach_vpt(model: nn.Module, prompt_len: int, deep: bool, dropout: float) -> None:
    """Insert the prompts: wrap `norm_pre` (P_0), every block after the first (deep), and `norm` (token pooling)."""
    blocks = vit_blocks(model, "vpt")
    norm_pre, norm = _submodule(model, "norm_pre"), _submodule(model, "norm")
    num_prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(num_prefix, int):
        raise TunerError(f"vpt: backbone {type(model).__name__} has no `num_prefix_tokens`; expected a timm ViT")
    pool = getattr(model, "global_pool", None)
    if not isinstance(pool, str):
        raise TunerError(f"vpt: backbone {type(model).__name__} has no `global_pool`; expected a timm ViT")

    dim, bound = _embed_dim(model), prompt_init_bound(model)
    _, weight = _patch_projection(model)
    factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    args = (prompt_len, dim, num_prefix, dropout, bound, factory)

    model.norm_pre = VptInsert(norm_pre, *args)
    if deep:
        for i in range(1, len(blocks)):
            blocks[i] = VptDeepBlock(blocks[i], *args)
    if pool != "token":  # avg / max / avgmax / attention pooling would read the prompt outputs
        model.norm = VptStrip(norm, prompt_len, num_prefix)
