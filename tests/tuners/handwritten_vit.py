"""A ViT forward written out with torch.nn.functional, for checking tuners against their official computation.

It reads the backbone's parameter tensors from the original submodules (captured before a tuner wraps them) and
never calls a timm or petlbench module, so a test can insert a method's official operations where its official
code puts them (`taps` after named operations, `mlp_branch` for what is added to a block's residual stream after
attention) and compare forward and gradients with the tuned model on identical tensors. It covers timm's plain
pre-norm ViT with a class token and token pooling (test_vit, ViT-B/16): no register tokens, no layer scale, no
drop path, no dropout (tests run in eval mode or with every rate at 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tap = Callable[[int, torch.Tensor], torch.Tensor]  # (block index or -1, tensor) → tensor
MlpBranch = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (block, mid stream x', MLP output h) → added


@dataclass(frozen=True)
class BlockParts:
    norm1: nn.LayerNorm
    qkv: nn.Linear
    proj: nn.Linear
    num_heads: int
    norm2: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear


@dataclass(frozen=True)
class VitParts:
    """The original submodules of a timm ViT, captured before a tuner wraps any of them."""

    patch: nn.Conv2d
    cls_token: nn.Parameter
    pos_embed: nn.Parameter
    blocks: tuple[BlockParts, ...]
    norm: nn.LayerNorm
    head: nn.Linear


def capture(model: nn.Module) -> VitParts:
    """Keep references to the backbone's own modules (their parameters are what the tuned model uses too)."""
    assert model.global_pool == "token" and model.num_prefix_tokens == 1 and not model.no_embed_class
    blocks = tuple(
        BlockParts(b.norm1, b.attn.qkv, b.attn.proj, b.attn.num_heads, b.norm2, b.mlp.fc1, b.mlp.fc2)
        for b in model.blocks
    )
    return VitParts(model.patch_embed.proj, model.cls_token, model.pos_embed, blocks, model.norm, model.head)


def _identity(index: int, t: torch.Tensor) -> torch.Tensor:
    return t


def _plain_mlp(index: int, x_mid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over B×H×N×d, written out (the official codes' explicit path)."""
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1) @ v


def forward(
    parts: VitParts,
    images: torch.Tensor,
    taps: Mapping[str, Tap] | None = None,
    mlp_branch: MlpBranch = _plain_mlp,
) -> torch.Tensor:
    """Logits of the ViT; `taps[name]` runs on the output of: patch (the patch embedding tokens), norm1, qkv, proj,
    norm2, fc1, fc2 (per block) and norm (the final norm)."""
    taps = taps or {}

    def tap(name: str, index: int, t: torch.Tensor) -> torch.Tensor:
        return taps.get(name, _identity)(index, t)

    p = parts.patch
    tokens = F.conv2d(images, p.weight, p.bias, stride=p.stride).flatten(2).transpose(1, 2)  # B×N×D, row-major
    tokens = tap("patch", -1, tokens)
    x = torch.cat([parts.cls_token.expand(len(images), -1, -1), tokens], dim=1) + parts.pos_embed
    for i, b in enumerate(parts.blocks):
        batch, n, dim = x.shape
        y = tap("norm1", i, layer_norm(b.norm1, x))
        qkv = tap("qkv", i, F.linear(y, b.qkv.weight, b.qkv.bias))
        q, k, v = qkv.reshape(batch, n, 3, b.num_heads, dim // b.num_heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v).transpose(1, 2).reshape(batch, n, dim)
        x = x + tap("proj", i, F.linear(a, b.proj.weight, b.proj.bias))
        y = tap("norm2", i, layer_norm(b.norm2, x))
        hidden = F.gelu(tap("fc1", i, F.linear(y, b.fc1.weight, b.fc1.bias)))
        h = tap("fc2", i, F.linear(hidden, b.fc2.weight, b.fc2.bias))
        x = x + mlp_branch(i, x, h)
    x = tap("norm", -1, layer_norm(parts.norm, x))
    return F.linear(x[:, 0], parts.head.weight, parts.head.bias)


def randomize_(params: list[nn.Parameter], seed: int, std: float = 0.1) -> None:
    """Random values (e.g. for zero-initialised biases or up-projections), so every term is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * std)


def loss_of(logits: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """A scalar that weighs every logit differently (a random projection), so gradients are not symmetric."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(logits.dtype)
    return (logits * weights).sum()


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


def assert_forward_and_grads_match(
    tuned: torch.Tensor, reference: torch.Tensor, params: list[nn.Parameter], dtype: torch.dtype
) -> None:
    """Same logits, and the same gradient for every parameter in `params`, computed on each graph separately."""
    tol = tolerance(dtype)
    torch.testing.assert_close(tuned, reference, **tol)
    tuned_grads = torch.autograd.grad(loss_of(tuned), params)
    reference_grads = torch.autograd.grad(loss_of(reference), params)
    assert len(params) > 0
    for i, (got, want) in enumerate(zip(tuned_grads, reference_grads, strict=True)):
        assert want.abs().max() > 0, f"parameter {i}: the reference gradient is zero, the check would be empty"
        torch.testing.assert_close(got, want, **tol, msg=f"gradient of parameter {i} ({tuple(got.shape)})")
