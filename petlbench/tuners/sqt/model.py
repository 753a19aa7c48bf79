"""SQT / SynQT's layers: the query synthesis modules, the query-only use of the frozen blocks, and the head.

Design choices:

- **K/V capture.** A forward hook on `blocks[i].attn.qkv`, installed only for the duration of the token pass,
  copies the k and v thirds of the fused qkv output into two `[B, heads, N, head_dim]` tensors (one copy each;
  `k_norm` applied as timm does). Copying rather than slicing matters: a view would pin the whole qkv output
  (q third included, 3 token tensors per layer instead of 2). Recomputing k, v from `norm1(x)` gives the same
  peak but redoes LayerNorm and 2/3 of the qkv GEMM per block. The contiguous head-major layout lets both
  attention kernels read K/V without copies (a `[B, N, heads, hd]` view would make the explicit path's
  batched matmul copy K and save the copy).
- **Last block.** Its token-path output is never used, so only `norm1` and the k/v rows of its qkv run.
- **Query-path attention** reuses block i's `qkv` weight rows by slicing (`F.linear` on `weight[:d]`), never
  copies weights, and uses `F.scaled_dot_product_attention` exactly when `attn.fused_attn` is true (the
  explicit softmax otherwise), like timm, so SQT runs under the same kernel as every other tuner. The QSM's
  single-head self-attention follows the same flag.
- **Drop path and dropout of the frozen blocks** act on both paths exactly as the blocks' own modes say: in
  train mode (the official code, `backbone_mode='train'`) the token path and the queries' pass through each
  block are stochastic; with `backbone_mode='eval'` both are deterministic, while SQT's own dropouts and the
  head's token drop path still train.
- **LN_head** is a fresh trainable `nn.LayerNorm(D)` (PyTorch's eps 1e-5, as the official code) whose weight
  and bias start as copies of the backbone's final norm (`norm`, else `fc_norm`; weight 1 and bias 0 if it has
  neither); the backbone's own final norm, pooling and `fc_norm` are not used. The backbone's `head_drop` (its
  `drop_rate`) is applied before the classifier, as in timm's `forward_head`. No pre-logits layer: the official
  runs had none (timm 0.4.12's in21k ViT-B/16 is built without one).
- **Two heads** (distilled DeiT): both read SQT's feature and their logits are averaged, as timm's distilled
  model does outside distillation training.
- **Unused official parameters are not created.** The official module also holds 12 `pre_norm` LayerNorms
  and a 37-vector `out_combine.weight` (18,469 parameters for ViT-B) that its forward never reads. They would
  get no gradient and cost AdamW state, so they are left out (the counts: docs/methods.md).
- **Backbone grad checkpointing** has nothing to act on: the token path keeps no activations, and the blocks
  are called one by one (the backbone's `grad_checkpointing` flag is not consulted).
- New LayerNorms use PyTorch's default eps (1e-5) and all new Linears PyTorch's default init, as the official
  code; queries are Uniform(-1, 1).

What this keeps alive, measured, and the parameter formula: docs/methods.md, "SQT".
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import classifier_heads, vit_blocks

KV = tuple[torch.Tensor, torch.Tensor]
_Factory = dict[str, Any]  # device= and dtype= of the backbone, for every new tensor


class SqtKnobs(Protocol):
    """What the layers read of SQT's knobs (`petlbench.tuners.sqt.Sqt`)."""

    @property
    def num_queries(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def attn_rank(self) -> int: ...
    @property
    def attn_scale(self) -> float: ...
    @property
    def ffn_scale(self) -> float: ...
    @property
    def feat_scale(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def head_drop_path(self) -> float: ...


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Adapter(nn.Module):
    """`u + MLP(u)` with `MLP(u) = drop(fc2(drop(GELU(fc1 u))))`: the identity term is part of the adapter."""

    def __init__(self, dim: int, hidden: int, dropout: float, factory: _Factory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = nn.GELU()
        self.drop1 = _dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, **factory)
        self.drop2 = _dropout(dropout)

    def mlp(self, u: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop2(self.fc2(self.drop1(self.act(self.fc1(u)))))
        return out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.mlp(u)


def _layer_norm(dim: int, factory: _Factory) -> nn.LayerNorm:
    return nn.LayerNorm(dim, **factory)


def _scalar(value: float, factory: _Factory) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), value, **factory))


class QueryAttention(nn.Module):
    """Single-head self-attention among the n queries; q/k/v/o maps are narrow adapters (identity included)."""

    def __init__(self, dim: int, rank: int, dropout: float, fused_attn: bool, factory: _Factory) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.fused_attn = fused_attn
        self.norm_q = _layer_norm(dim, factory)
        self.norm_kv = _layer_norm(dim, factory)
        self.q = Adapter(dim, rank, 0.0, factory)
        self.k = Adapter(dim, rank, 0.0, factory)
        self.v = Adapter(dim, rank, 0.0, factory)
        self.o = Adapter(dim, rank, 0.0, factory)
        self.attn_drop = nn.Dropout(dropout)
        self.out_drop = _dropout(dropout)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm_q(a))
        kv = self.norm_kv(a)
        k, v = self.k(kv), self.v(kv)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        else:
            x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        out: torch.Tensor = self.out_drop(self.o(x))
        return out


class QuerySynthesis(nn.Module):
    """QSM_i: projection adapter, then a pre-norm block (query self-attention, adapter FFN) with learnable scales."""

    def __init__(self, dim: int, cfg: SqtKnobs, fused_attn: bool, factory: _Factory) -> None:
        super().__init__()
        self.proj = Adapter(dim, cfg.rank, cfg.dropout, factory)
        self.norm_a = _layer_norm(dim, factory)
        self.attn = QueryAttention(dim, cfg.attn_rank, cfg.dropout, fused_attn, factory)
        self.attn_scale = _scalar(cfg.attn_scale, factory)
        self.norm_b = _layer_norm(dim, factory)
        self.ffn = Adapter(dim, cfg.rank, cfg.dropout, factory)
        self.ffn_scale = _scalar(cfg.ffn_scale, factory)
        self.out_drop = _dropout(cfg.dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.proj(z)
        z = z + self.attn(self.norm_a(z)) * self.attn_scale
        z = z + self.ffn(self.norm_b(z)) * self.ffn_scale
        out: torch.Tensor = self.out_drop(z)
        return out


def drop_tokens(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole tokens of `x` (B x T x D) independently per sample and token; survivors are scaled by 1/(1-p)."""
    if p == 0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty(x.shape[0], x.shape[1], 1).bernoulli_(keep).div_(keep)
    return x * mask


class InstanceAwareHead(nn.Module):
    """Refine every head token with a shared adapter, weight them by the first token, average, normalise."""

    def __init__(self, dim: int, num_tokens: int, cfg: SqtKnobs, final_norm: nn.Module, factory: _Factory) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.drop_path = cfg.head_drop_path
        self.norm = _layer_norm(dim, factory)  # LN_o
        self.adapter = Adapter(dim, cfg.rank, cfg.dropout, factory)
        self.weight_gen = nn.Linear(dim, num_tokens - 1, **factory)
        self.weight_act = nn.GELU()
        self.weight_drop = _dropout(cfg.dropout)
        self.final_norm = final_norm  # LN_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} head tokens, got {tokens.shape[1]}")
        t = tokens + self.adapter(self.norm(tokens))
        first, rest = t[:, 0], drop_tokens(t[:, 1:], self.drop_path, self.training)
        w = torch.tanh(self.weight_drop(self.weight_act(self.weight_gen(first))))  # omega = [1, w]
        mixed = (first + (w.unsqueeze(-1) * rest).sum(dim=1)) / self.num_tokens  # weighted mean
        out: torch.Tensor = self.final_norm(mixed)
        return out


# -- the frozen block, used query-only and for K/V --------------------------------------------------------------


class TimmAttention(Protocol):
    """What SQT uses of timm's `Attention` (fused qkv Linear with rows [q | k | v], per-head q/k norms)."""

    num_heads: int
    head_dim: int
    scale: float
    fused_attn: bool
    training: bool
    qkv: nn.Linear
    q_norm: nn.Module
    k_norm: nn.Module
    attn_drop: nn.Dropout
    proj: nn.Module
    proj_drop: nn.Module


class TimmBlock(Protocol):
    """What SQT uses of timm's pre-norm `Block`: x + dp1(ls1(attn(norm1 x))), then x + dp2(ls2(mlp(norm2 x)))."""

    training: bool
    attn: TimmAttention
    norm1: nn.Module
    ls1: nn.Module
    drop_path1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    drop_path2: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _attn_dim(attn: TimmAttention) -> int:
    return int(attn.num_heads * attn.head_dim)


def _head_view(attn: TimmAttention, x: torch.Tensor) -> torch.Tensor:
    """`[B, N, heads·hd]` (possibly a slice of the fused qkv output) viewed as `[B, heads, N, hd]`."""
    b, n, _ = x.shape
    return x.reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)


class KvCapture:
    """While active (a context manager around one block call), copies K and V out of its fused qkv output.

    A forward hook on `attn.qkv` takes the k and v thirds (`k_norm` applied, as timm does) and copies each into
    its own contiguous `[B, heads, N, hd]` tensor: a view would pin the whole qkv output, q third included.
    """

    def __init__(self, attn: TimmAttention, tuner: str = "sqt") -> None:
        self.attn = attn
        self.tuner = tuner
        self.kv: KV | None = None

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        d = _attn_dim(self.attn)
        k = self.attn.k_norm(_head_view(self.attn, out[..., d : 2 * d]))
        v = _head_view(self.attn, out[..., 2 * d :])
        self.kv = (k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format))

    def __enter__(self) -> KvCapture:
        self._handle = self.attn.qkv.register_forward_hook(self._hook)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._handle.remove()

    def result(self) -> KV:
        if self.kv is None:
            raise TunerError(f"{self.tuner}: a block did not call its attn.qkv; expected timm's Block/Attention")
        return self.kv


def last_block_kv(block: TimmBlock, x: torch.Tensor) -> KV:
    """K, V of `block` for input tokens `x`, computing only `norm1` and the k/v rows of its qkv."""
    attn = block.attn
    d = _attn_dim(attn)
    u = block.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    k = F.linear(u, w[d : 2 * d], None if b is None else b[d : 2 * d])
    k = attn.k_norm(_head_view(attn, k)).contiguous()
    v = F.linear(u, w[2 * d :], None if b is None else b[2 * d :])
    return k, _head_view(attn, v).contiguous()


def knowledge_extraction(
    block: TimmBlock, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KEM: frozen `block` applied to queries `h` (B x n x D) that attend only to the frozen `k`, `v`.

    Returns (H, F_att, F_ffn): the block output for the queries, its attention branch and its FFN branch
    (each after LayerScale and drop path), all B x n x D.
    """
    attn = block.attn
    b, n, _ = h.shape
    d = _attn_dim(attn)
    u = block.norm1(h)
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(u, w[:d], None if bias is None else bias[:d])
    q = attn.q_norm(q.reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2))
    if attn.fused_attn:
        p = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=float(attn.scale))
    else:
        x = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(b, n, d)
    x = attn.norm(x) if hasattr(attn, "norm") else x
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(u).sigmoid()
    x = attn.proj_drop(attn.proj(x))
    f_att: torch.Tensor = block.drop_path1(block.ls1(x))
    g = h + f_att
    f_ffn: torch.Tensor = block.drop_path2(block.ls2(block.mlp(block.norm2(g))))
    return g + f_ffn, f_att, f_ffn


def head_tokens(
    hs: Sequence[torch.Tensor], f_att: Sequence[torch.Tensor], f_ffn: Sequence[torch.Tensor]
) -> torch.Tensor:
    """`[H_L, H_1..H_L, F_att,1..L, F_ffn,1..L]` stacked to B x (3L+1) x D (H_L appears twice, first as anchor)."""
    return torch.stack([hs[-1], *hs, *f_att, *f_ffn], dim=1)


# -- the tuned model ---------------------------------------------------------------------------------------------


class SqtModel(nn.Module):
    """The timm ViT (`backbone`, frozen token path) plus SQT's trainable query path and head."""

    def __init__(self, backbone: nn.Module, cfg: SqtKnobs) -> None:
        super().__init__()
        vit: Any = backbone  # timm's VisionTransformer (untyped)
        blocks = cast(Sequence[TimmBlock], vit_blocks(backbone, "sqt"))
        for i, blk in enumerate(blocks):
            check_timm_block(i, blk, "sqt")
        dim = int(vit.embed_dim)
        depth = len(blocks)
        ref = next(backbone.parameters())
        factory: _Factory = {"device": ref.device, "dtype": ref.dtype}
        fused = bool(blocks[0].attn.fused_attn)

        self.backbone = backbone
        self.queries = nn.Parameter(torch.empty(depth, cfg.num_queries, dim, **factory))
        nn.init.uniform_(self.queries, -1.0, 1.0)
        self.feat_scale = _scalar(cfg.feat_scale, factory)
        self.qsm = nn.ModuleList(QuerySynthesis(dim, cfg, fused, factory) for _ in range(depth))
        self.instance_head = InstanceAwareHead(dim, 3 * depth + 1, cfg, _head_norm(backbone, dim, factory), factory)
        for head in classifier_heads(backbone, "sqt"):
            in_features = getattr(head, "in_features", None)
            if in_features is not None and in_features != dim:
                raise TunerError(f"sqt: classifier expects {in_features} features, SQT's head gives {dim}")
        self.train(backbone.training)

    @property
    def blocks(self) -> Sequence[TimmBlock]:
        return cast(Sequence[TimmBlock], self.backbone.blocks)

    def token_path(self, x: torch.Tensor) -> list[KV]:
        """Run the frozen ViT over the image tokens without autograd; K_i, V_i of every block's input."""
        m: Any = self.backbone
        blocks = list(self.blocks)
        kvs: list[KV] = []
        with torch.no_grad():
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for blk in blocks[:-1]:
                with KvCapture(blk.attn) as capture:
                    x = blk(x)
                kvs.append(capture.result())
            kvs.append(last_block_kv(blocks[-1], x))  # the last block's own output is never used
        return kvs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier input (LN_head's output), B x D."""
        kvs = self.token_path(x)
        batch = x.shape[0]
        hs: list[torch.Tensor] = []
        f_atts: list[torch.Tensor] = []
        f_ffns: list[torch.Tensor] = []
        for i, (blk, qsm, (k, v)) in enumerate(zip(self.blocks, self.qsm, kvs, strict=True)):
            z = self.queries[i].unsqueeze(0).expand(batch, -1, -1)
            if hs:
                z = z + self.feat_scale * hs[-1].unsqueeze(1)
            h, f_att, f_ffn = knowledge_extraction(blk, qsm(z), k, v)
            hs.append(h.mean(dim=1))
            f_atts.append(f_att.mean(dim=1))
            f_ffns.append(f_ffn.mean(dim=1))
        f: torch.Tensor = self.instance_head(head_tokens(hs, f_atts, f_ffns))
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        head_drop = getattr(self.backbone, "head_drop", None)
        if isinstance(head_drop, nn.Module):
            f = head_drop(f)
        heads = classifier_heads(self.backbone, "sqt")
        logits: torch.Tensor = heads[0](f)
        if len(heads) > 1:  # distilled DeiT: the mean of both heads' logits, as its own forward_head
            logits = torch.stack([logits, *(h(f) for h in heads[1:])]).mean(dim=0)
        return logits


_ATTENTION_FIELDS = (
    "num_heads",
    "head_dim",
    "scale",
    "fused_attn",
    "q_norm",
    "k_norm",
    "attn_drop",
    "proj",
    "proj_drop",
)


def check_timm_block(index: int, blk: object, tuner: str) -> None:
    """TunerError unless `blk` is timm's pre-norm Block (its own forward) around a fused-qkv Attention: what the
    query-only use of a frozen block (SQT, VQT) reads."""
    attn = getattr(blk, "attn", None)
    missing = [f for f in _ATTENTION_FIELDS if not hasattr(attn, f)]
    if (
        not isinstance(blk, Block)
        or type(blk).forward is not Block.forward
        or not isinstance(getattr(attn, "qkv", None), nn.Linear)
        or missing
    ):
        raise TunerError(
            f"{tuner}: blocks[{index}] is {type(blk).__name__} with attn {type(attn).__name__}; "
            f"{tuner} needs timm's pre-norm Block with a fused-qkv Attention"
        )


def _head_norm(backbone: nn.Module, dim: int, factory: _Factory) -> nn.LayerNorm:
    """LN_head: a fresh `nn.LayerNorm(dim)` (eps 1e-5) starting from the backbone's final-norm weight and bias.

    The official code makes a default LayerNorm and points its weight and bias at the backbone norm's (`.set_`),
    so it keeps PyTorch's eps 1e-5 while timm's norm has 1e-6; a copy of the backbone's module would differ.
    """
    head_norm = _layer_norm(dim, factory)
    for name in ("norm", "fc_norm"):
        weight = getattr(getattr(backbone, name, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape == (dim,):
            bias = getattr(getattr(backbone, name), "bias", None)
            with torch.no_grad():
                head_norm.weight.copy_(weight)
                if isinstance(bias, torch.Tensor) and bias.shape == (dim,):
                    head_norm.bias.copy_(bias)
            break
    return head_norm
