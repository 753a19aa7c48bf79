"""SSF's layer: a mergeable wrapper that scales and shifts the output channels of the layer it holds."""

from __future__ import annotations

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import MergeableLayer, block_linear, vit_blocks


class SsfLayer(MergeableLayer):
    """Wraps a layer (kept as `base`) and returns γ⊙base(x) + β over its output channels.

    `channel_dim` is -1 for token tensors (B×N×C) and 1 for the patch convolution's B×C×H×W output. Merging folds γ
    into the rows of `base.weight` and γ⊙b + β into `base.bias` where the layer has them (Linear, Conv2d, affine
    LayerNorm: each keeps its output channels on dim 0); whatever cannot be folded stays in the forward.
    """

    bias_before_merge: torch.Tensor | None  # a non-persistent buffer while merged

    def __init__(self, base: nn.Module, channels: int, channel_dim: int, init_std: float, like: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        self.shift = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        self.init_std = init_std
        self.merged = False
        # the exact pre-merge bias: (γ⊙b + β - β)/γ would lose digits wherever γ is small
        self.register_buffer("bias_before_merge", None, persistent=False)
        weight = self._weight()
        if weight is not None and weight.shape[0] != channels:
            raise TunerError(f"ssf: {type(base).__name__} weight has {weight.shape[0]} output channels, not {channels}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.scale, mean=1.0, std=self.init_std)
        nn.init.normal_(self.shift, mean=0.0, std=self.init_std)

    def _weight(self) -> nn.Parameter | None:
        weight = getattr(self.base, "weight", None)
        return weight if isinstance(weight, nn.Parameter) else None

    def _bias(self) -> nn.Parameter | None:
        bias = getattr(self.base, "bias", None)  # folded only together with the weight (γ must reach both)
        return bias if isinstance(bias, nn.Parameter) and self._weight() is not None else None

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1) if self.channel_dim == 1 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if not self.merged:
            return out * self._per_channel(self.scale) + self._per_channel(self.shift)
        if self._weight() is None:  # nothing folded (an Identity, a LayerNorm without affine)
            return out * self._per_channel(self.scale) + self._per_channel(self.shift)
        if self._bias() is None:  # γ folded into the weight, β has no bias to go to
            return out + self._per_channel(self.shift)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight, bias = self._weight(), self._bias()
        if weight is not None:
            if bool((self.scale == 0).any()):
                raise TunerError("ssf: a scale γ is exactly 0, so merging could not be undone; unmerged model kept")
            weight.mul_(self.scale.view(-1, *([1] * (weight.dim() - 1))))
        if bias is not None:
            self.bias_before_merge = bias.detach().clone()
            bias.mul_(self.scale).add_(self.shift)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._weight(), self._bias()
        if weight is not None:
            weight.div_(self.scale.view(-1, *([1] * (weight.dim() - 1))))
        if bias is not None and isinstance(self.bias_before_merge, torch.Tensor):
            bias.copy_(self.bias_before_merge)
            self.bias_before_merge = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[0]}, merged={self.merged}"


def _norm(module: object, where: str) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise TunerError(f"ssf: {where} is {type(module).__name__}, expected a LayerNorm over channels (timm ViT)")
    return module


def attach_ssf(model: nn.Module, init_std: float) -> None:
    """Wrap every SSF position of the official ViT; all are found and checked before any is replaced."""
    blocks = vit_blocks(model, "ssf")
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, SsfLayer):
        raise TunerError("ssf: the model already has SSF layers; attach SSF once")
    if not isinstance(patch_embed, nn.Module) or not isinstance(proj, nn.Conv2d):
        raise TunerError(f"ssf: patch_embed.proj is {type(proj).__name__}, expected the patch nn.Conv2d (timm ViT)")
    like = proj.weight

    # (owner, attribute, channels, channel dim)
    targets: list[tuple[nn.Module, str, int, int]] = [(patch_embed, "proj", proj.out_channels, 1)]
    embed_norm = getattr(patch_embed, "norm", None)
    if isinstance(embed_norm, nn.LayerNorm):  # official: a second SSF when the patch embedding has a norm
        targets.append((patch_embed, "norm", _norm(embed_norm, "patch_embed.norm").normalized_shape[0], -1))
    for i, block in enumerate(blocks):
        for path in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            parent, _, attr = path.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            if path.startswith("norm"):
                channels = _norm(getattr(block, path, None), f"blocks[{i}].{path}").normalized_shape[0]
            else:
                channels = block_linear(block, path, i, "ssf").out_features
            targets.append((owner, attr, channels, -1))
    final = getattr(model, "norm", None)
    if isinstance(final, nn.LayerNorm):
        targets.append((model, "norm", _norm(final, "norm").normalized_shape[0], -1))
    elif isinstance(final, nn.Identity):  # avg-pool models: official SSF still follows the (identity) final norm
        targets.append((model, "norm", int(getattr(model, "embed_dim", proj.out_channels)), -1))
    else:
        raise TunerError(f"ssf: the final norm is {type(final).__name__}, expected a LayerNorm or Identity (timm ViT)")

    for owner, attr, channels, channel_dim in targets:
        layer = owner.get_submodule(attr)
        owner.register_module(attr, SsfLayer(layer, channels, channel_dim, init_std, like))
