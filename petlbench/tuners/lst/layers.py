"""LST on a timm ViT: structural pruning of the backbone into the side blocks, the ladders, the gates, the readout.

Port choices (the official T5 code and the reasons: docs/methods.md, "LST"):

- **Side block = timm's own `Block`** at width d = D/r with the backbone's head count (head width hd/r, as T5's
  `d_kv // r`), MLP width h/r, the backbone's LayerNorm eps, activation, qkv/proj biases and LayerScale, and
  the backbone's `fused_attn` flag. No dropout or drop path inside the side network.
- **Pruning** follows the official data-free variant (`pruning_without_residual`, version 2, importance = the
  weights themselves; the paper's runs used Fisher information, which needs task data the tuner does not have
  at attach time). One pass in the backbone's order, each step keeping the 1/r of rows with the largest L1 norm
  of the (already column-pruned) weight, the kept indices in ascending order:
  patch-embedding rows (the T5 token embedding's analogue) pick the hidden dims; per block, `norm1` takes
  them; q, k and v drop those input columns and keep the rows of largest L1 of the elementwise product
  W_q ⊙ W_k ⊙ W_v (one index set for all three, not head-aware, as in v2); `proj` drops the unkept input
  columns and its rows pick new hidden dims (its bias and `ls1` follow); `norm2` takes those; `fc1` drops
  columns, keeps rows by L1; `fc2` drops columns, its rows pick the hidden dims for the next block. The final
  norm takes the last block's choice. Biases are selected with their rows (T5 has none). The residual stream
  is therefore not kept on one consistent index set across a block, exactly as in the official "without
  residual" pruning; it is only an initialisation. Side block i gets backbone block i's pruned weights.
- **Ladders tap block outputs**: the side stream starts as `down_emb(tokens)` (the embedding after
  `_pos_embed`/`norm_pre`, the T5 `inputs_embeds` analogue), and side block i first mixes in `down_i` of
  backbone block i's output. Downsamples and the upsample are Linear layers initialised N(0, 0.01²) with zero
  bias (T5's `_init_weights` rule for plain Linears); gates start at α = 0 (g = 0.5).
- **Layer dropping**: blocks outside `side_layers` get no side block, no ladder and no gate, and the side stream
  passes them unchanged (official: `side_block[i] is None`); backbone blocks after the last side layer do not
  run at all (nothing reads them).
- **Readout**: the side final norm (pruned copy of the backbone's `norm`) on every side token, then the
  backbone's own pooling (class token, or mean of the patch tokens), then the upsample to D, `fc_norm`,
  `head_drop` and the classifier. The official code upsamples every token before its LM head; pooling first
  is exactly the same for class-token and mean pooling (both commute with a linear map) and avoids a
  D-wide token tensor. Other pooling kinds are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
from timm.layers.layer_scale import LayerScale
from timm.models.vision_transformer import Block
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import single_head, vit_blocks

StateDict = dict[str, torch.Tensor]


def keep_rows(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` rows of `importance` with the largest L1 norm over all other dims.

    Torch-Pruning's L1Strategy drops the `n - keep` smallest; ties go to the lower index (stable sort).
    """
    n = importance.shape[0]
    scores = importance.reshape(n, -1).abs().sum(dim=1)
    order = torch.argsort(scores, stable=True)
    return order[n - keep :].sort().values


def _layer_scale(module: nn.Module, rows: torch.Tensor) -> StateDict:
    return {"gamma": module.gamma[rows]} if isinstance(module, LayerScale) else {}


def _prefixed(prefix: str, state: StateDict) -> StateDict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _norm(norm: nn.Module, rows: torch.Tensor) -> StateDict:
    norm_any: Any = norm
    state = {"weight": norm_any.weight[rows]}
    if getattr(norm, "bias", None) is not None:
        state["bias"] = norm_any.bias[rows]
    return state


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> StateDict:
    state = {"weight": weight[rows]}
    if bias is not None:
        state["bias"] = bias[rows]
    return state


def prune_vit(backbone: nn.Module, reduction: int) -> tuple[list[StateDict], StateDict]:
    """The official v2 pruning chain over the whole ViT: one side-block state dict per block, and the final norm's.

    Works on meta tensors too (only the shapes are then meaningful).
    """
    vit: Any = backbone
    dim = int(vit.embed_dim)
    states: list[StateDict] = []
    with torch.no_grad():
        rows = keep_rows(vit.patch_embed.proj.weight, dim // reduction)  # hidden dims entering block 0
        for blk in cast(Sequence[Any], vit.blocks):
            attn, mlp = blk.attn, blk.mlp
            state: StateDict = _prefixed("norm1", _norm(blk.norm1, rows))
            a = attn.qkv.out_features // 3
            w = attn.qkv.weight[:, rows]  # input columns follow the hidden dims kept so far
            wq, wk, wv = w[:a], w[a : 2 * a], w[2 * a :]
            inner = keep_rows(wq * wk * wv, a // reduction)
            state["attn.qkv.weight"] = torch.cat([wq[inner], wk[inner], wv[inner]])
            if attn.qkv.bias is not None:
                b = attn.qkv.bias
                state["attn.qkv.bias"] = torch.cat([b[:a][inner], b[a : 2 * a][inner], b[2 * a :][inner]])
            wo = attn.proj.weight[:, inner]
            rows = keep_rows(wo, dim // reduction)
            state |= _prefixed("attn.proj", _linear(wo, attn.proj.bias, rows))
            state |= _prefixed("ls1", _layer_scale(blk.ls1, rows))
            state |= _prefixed("norm2", _norm(blk.norm2, rows))
            w1 = mlp.fc1.weight[:, rows]
            hidden = keep_rows(w1, mlp.fc1.out_features // reduction)
            state |= _prefixed("mlp.fc1", _linear(w1, mlp.fc1.bias, hidden))
            w2 = mlp.fc2.weight[:, hidden]
            rows = keep_rows(w2, dim // reduction)
            state |= _prefixed("mlp.fc2", _linear(w2, mlp.fc2.bias, rows))
            state |= _prefixed("ls2", _layer_scale(blk.ls2, rows))
            states.append(state)
        final = _norm(vit.norm, rows) if _has_affine_norm(vit.norm) else {}
    return states, final


def _has_affine_norm(module: object) -> bool:
    return isinstance(module, nn.LayerNorm) and module.weight is not None


def _check_backbone(vit: Any, blocks: Sequence[Any], reduction: int) -> None:
    """TunerError unless the backbone is a standard timm ViT whose widths the reduction factor divides."""
    dim = int(vit.embed_dim)
    if not isinstance(getattr(getattr(vit, "patch_embed", None), "proj", None), nn.Conv2d):
        raise TunerError("lst: backbone has no patch_embed.proj convolution; expected a timm ViT")
    if getattr(vit, "attn_pool", None) is not None or getattr(vit, "global_pool", None) not in ("token", "avg"):
        raise TunerError(
            f"lst: backbone pooling {getattr(vit, 'global_pool', None)!r} is not supported; LST reads the side "
            "stream out with class-token ('token') or mean ('avg') pooling"
        )
    for i, blk in enumerate(blocks):
        attn: Any = getattr(blk, "attn", None)
        plain = (
            all(isinstance(getattr(attn, name, None), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
            and getattr(attn, "gate", None) is None
        )
        if (
            not isinstance(blk, Block)
            or type(blk).forward is not Block.forward
            or not plain
            or not all(_has_affine_norm(getattr(blk, n, None)) for n in ("norm1", "norm2"))
            or not isinstance(getattr(attn, "qkv", None), nn.Linear)
            or attn.qkv.out_features != 3 * dim
            or not all(isinstance(getattr(blk.mlp, n, None), nn.Linear) for n in ("fc1", "fc2"))
        ):
            raise TunerError(
                f"lst: blocks[{i}] is not a plain timm Block (LayerNorms, fused qkv of width 3·{dim}, no q/k norm "
                "or gate, fc1/fc2 MLP); LST prunes that layout only"
            )
        mlp: Any = blk.mlp
        hidden, head_dim = int(mlp.fc1.out_features), int(attn.head_dim)
        for what, width in (("embedding width", dim), ("head width", head_dim), ("MLP width", hidden)):
            if width % reduction:
                raise TunerError(
                    f"lst: tuner.reduction {reduction} does not divide the {what} {width} of blocks[{i}]; "
                    f"choose a divisor of {width}"
                )


def side_block(blk: Any, reduction: int, factory: dict[str, Any]) -> Block:
    """A fresh timm Block r times narrower than `blk`, with its head count, biases, norms, activation, LayerScale."""
    dim = blk.norm1.weight.shape[0] // reduction
    hidden = blk.mlp.fc1.out_features // reduction
    side = Block(
        dim=dim,
        num_heads=blk.attn.num_heads,
        mlp_ratio=hidden / dim,
        qkv_bias=blk.attn.qkv.bias is not None,
        proj_bias=blk.attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,
        norm_layer=cast(type[nn.Module], partial(nn.LayerNorm, eps=blk.norm1.eps)),
        **factory,
    )
    side_mlp: Any = side.mlp
    side_mlp.act = copy.deepcopy(blk.mlp.act)
    cast(Any, side.attn).fused_attn = blk.attn.fused_attn
    if side_mlp.fc1.out_features != hidden:
        raise TunerError(f"lst: side MLP width {side_mlp.fc1.out_features} != {hidden}; unsupported MLP ratio")
    return side


def _ladder(dim_in: int, dim_out: int, bias: bool, factory: dict[str, Any]) -> nn.Linear:
    """A ladder/upsample Linear with T5's init for plain Linears: N(0, 0.01²), zero bias."""
    linear = nn.Linear(dim_in, dim_out, bias=bias, **factory)
    nn.init.normal_(linear.weight, mean=0.0, std=0.01)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class LstModel(nn.Module):
    """The frozen timm ViT (`backbone`) plus LST's ladders, gates and side network."""

    def __init__(
        self,
        backbone: nn.Module,
        reduction: int,
        side_layers: Sequence[int] | None,
        gate_alpha: float,
        gate_temperature: float,
        prune: bool,
        ladder_bias: bool,
    ) -> None:
        super().__init__()
        vit: Any = backbone
        blocks = cast(Sequence[Any], vit_blocks(backbone, "lst"))
        depth, dim = len(blocks), int(vit.embed_dim)
        layers = tuple(range(depth)) if side_layers is None else tuple(side_layers)
        if layers[-1] >= depth:
            raise TunerError(
                f"lst: tuner.side_layers {list(layers)} names block {layers[-1]}, but the ViT has {depth} blocks "
                f"(0..{depth - 1})"
            )
        _check_backbone(vit, blocks, reduction)
        classifier = single_head(backbone, "lst")
        if not isinstance(classifier, nn.Module):
            raise TunerError("lst: backbone has no classifier module")
        ref = next(backbone.parameters())
        factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}
        width = dim // reduction

        self.backbone = backbone
        self.layers = layers
        self.gate_temperature = gate_temperature
        self.first_downsample = _ladder(dim, width, ladder_bias, factory)
        self.downsamples = nn.ModuleDict({str(i): _ladder(dim, width, ladder_bias, factory) for i in layers})
        self.side_blocks = nn.ModuleDict({str(i): side_block(blocks[i], reduction, factory) for i in layers})
        self.gates = nn.Parameter(torch.full((len(layers),), gate_alpha, **factory))
        eps = vit.norm.eps if _has_affine_norm(vit.norm) else 1e-6
        self.side_norm = nn.LayerNorm(width, eps=eps, **factory)
        self.upsample = _ladder(width, dim, ladder_bias, factory)
        if prune:
            self._load_pruned(reduction)

    def _load_pruned(self, reduction: int) -> None:
        states, final = prune_vit(self.backbone, reduction)
        for key, block in self.side_blocks.items():
            state = states[int(key)]
            expected = set(block.state_dict())
            if set(state) != expected:
                raise TunerError(
                    f"lst: blocks[{key}] prunes to {sorted(set(state) ^ expected)[:3]} that the side block lacks"
                )
            block.load_state_dict(state)
        if final:
            self.side_norm.load_state_dict(final)

    def gate(self, position: int) -> torch.Tensor:
        """g = sigmoid(α / T) of the `position`-th side layer."""
        return torch.sigmoid(self.gates[position] / self.gate_temperature)

    def side_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen ViT (no autograd) and the side network over its ladders; the side tokens after the final norm."""
        m: Any = self.backbone
        blocks = cast(Sequence[nn.Module], m.blocks)
        with torch.no_grad():
            t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        s = self.first_downsample(t)
        done = 0  # backbone blocks run so far
        for position, i in enumerate(self.layers):
            with torch.no_grad():
                for blk in blocks[done : i + 1]:
                    t = blk(t)
            done = i + 1
            g = self.gate(position)
            s = g * s + (1 - g) * self.downsamples[str(i)](t)
            s = self.side_blocks[str(i)](s)
        out: torch.Tensor = self.side_norm(s)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.backbone
        f = self.upsample(m.pool(self.side_stream(x)))
        logits: torch.Tensor = m.get_classifier()(m.head_drop(m.fc_norm(f)))
        return logits
