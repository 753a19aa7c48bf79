"""VPT: Visual Prompt Tuning, shallow and deep (Jia et al., ECCV 2022; METHODS.md §5).

p learnable prompt tokens enter the token sequence right after the prefix tokens (the class token, plus register
tokens where a model has them) and before the patch tokens, after the positional embedding, so prompts carry no
position. The frozen blocks then run on N + p tokens; timm's own attention (fused or not) runs unchanged.

- Shallow: one prompt set P_0 (p×D), inserted once; the blocks carry the prompt outputs forward.
- Deep: before each block after the first, the p prompt positions of the hidden state are replaced by that
  block's own prompt set, so the previous block's prompt outputs are discarded (L sets in total).

Nothing in the ViT is re-implemented or patched; three submodules are wrapped (the original kept as `base`):

- `norm_pre` → `VptInsert`. It is the last stage of timm's `forward_features` before the blocks
  (`patch_embed → _pos_embed → patch_drop → norm_pre → blocks → norm`) and an `nn.Identity` in standard ViTs, so
  there the result is exactly the paper's `Z_0 = [CLS, P_0, patches]`. Where `norm_pre` is a real LayerNorm
  (CLIP-style `pre_norm=True` models), the prompts are inserted *after* it: P_0 then lives in the space of the
  block inputs, the same space as the deep prompts P_1..P_{L-1}, and the frozen pre-norm does not rescale it.
  Inserting after `patch_drop` also keeps prompts out of timm's patch dropout.
- `blocks[i]`, i ≥ 1 → `VptDeepBlock` (deep only): splices the block's prompts into the prompt positions, then
  calls the block with whatever else it was given.
- `norm` → `VptStrip`, only for models that pool over tokens instead of taking the class token. With token pooling
  (`global_pool == "token"`, ViT-B/16's default) timm's head reads `x[:, 0]`, so prompts reach the logits only
  through attention into the class token, exactly as in the official code, which normalises all N + p tokens and
  keeps the class token. Average/max/attention pooling would read the prompt outputs as if they were patches, so
  for those models the prompt positions are dropped before the final norm and `forward_features` returns the
  backbone's own token layout; prompts again reach the head only through attention. (LayerNorm is per token, so
  dropping before the norm equals dropping after it, at less work.)

Init: every prompt set is Uniform(-v, v) with v = sqrt(6 / (in_chans·patch_h·patch_w + D)), Xavier-uniform with
the patch projection's fan-in (v = 0.0625 for ViT-B/16). Not mergeable (prompts are extra tokens; attention cost
grows with (N + p)²) and not the identity at init.

`forward_intermediates` is not supported: timm slices prefix tokens off and reshapes the rest to the patch grid,
which the extra prompt tokens break. The official code's habit of keeping the frozen backbone in eval mode while
training is the runner's business (backbone drop path / dropout are `BackboneSpec` fields), not the tuner's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners import VptConfig
from petlbench.tuners.base import Tuner, vit_blocks


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
    proj = getattr(embed, "proj", None)
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


class Vpt(Tuner[VptConfig]):
    """Prompt tokens after the prefix tokens; deep VPT gives every block its own prompt set."""

    config_cls = VptConfig

    def attach(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        blocks = vit_blocks(model, self.name)
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
        args = (cfg.prompt_len, dim, num_prefix, cfg.dropout, bound, factory)

        model.norm_pre = VptInsert(norm_pre, *args)
        if cfg.deep:
            for i in range(1, len(blocks)):
                blocks[i] = VptDeepBlock(blocks[i], *args)
        if pool != "token":  # avg / max / avgmax / attention pooling would read the prompt outputs
            model.norm = VptStrip(norm, cfg.prompt_len, num_prefix)
        return model
