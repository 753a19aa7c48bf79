"""FacT's layers: the shared factors and the wrapper that adds a factorised increment to a frozen Linear."""

from __future__ import annotations

import math
from typing import Final, Literal

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import MergeableLayer, block_linear, vit_blocks, wrap_block_linears

Variant = Literal["tt", "tk"]
Role = Literal["qkv", "proj", "fc1", "fc2"]
ATTACH_NAME: Final = "fact"  # where the shared factors live on the model: `model.fact`


class FactFactors(nn.Module):
    """The factors every block shares: U = `u.weight` (r×D), V = `v.weight` (D×r) and, for TK, C and P.

    Registered once on the model (as `model.fact`), so they are counted and optimised once; the wrappers keep an
    unregistered reference.
    """

    def __init__(
        self, dim: int, rank: int, variant: Variant, columns: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.dim = dim
        self.rank = rank
        self.variant: Variant = variant
        self.u = nn.Linear(dim, rank, bias=False, device=device, dtype=dtype)
        self.v = nn.Linear(rank, dim, bias=False, device=device, dtype=dtype)
        self.core: nn.Parameter | None
        self.slice_factors: nn.Parameter | None
        if variant == "tk":
            self.core = nn.Parameter(torch.empty(rank, rank, rank, device=device, dtype=dtype))
            self.slice_factors = nn.Parameter(torch.empty(rank, columns, device=device, dtype=dtype))
        else:
            self.register_parameter("core", None)
            self.register_parameter("slice_factors", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.u.reset_parameters()  # PyTorch's default Linear init (Kaiming-uniform, a=√5)
        nn.init.zeros_(self.v.weight)
        if self.core is not None and self.slice_factors is not None:
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.slice_factors)

    def slice_cores(self, start: int, count: int) -> torch.Tensor:
        """TK: the r×r×count cores of P's columns start..start+count-1, `T[:, :, j] = Σ_c C[:, :, c]·P[c, start+j]`."""
        if self.core is None or self.slice_factors is None:
            raise TunerError("fact: slice cores exist only for variant 'tk'")
        return torch.einsum("abc,cj->abj", self.core, self.slice_factors[:, start : start + count])

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, dim={self.dim}, rank={self.rank}"


class FactLinear(MergeableLayer):
    """Wraps a frozen `nn.Linear` (kept as `base`) and adds FacT's increment to its output.

    `in_chunks`/`out_chunks` say how many D-wide slices the input/output has: qkv 1/3, proj 1/1, fc1 1/k, fc2 k/1.
    TT layers own their core map `core` ((out_chunks·r) × (in_chunks·r)): for qkv the rows are [S_q; S_k; S_v],
    for fc1 S_fc1 (k·r × r), for fc2 S_fc2 (r × k·r). TK layers own no parameter and build the map from the shared
    C and P, starting at column `column` of P.
    """

    factors: FactFactors  # shared, deliberately not registered here (see FactFactors)

    def __init__(
        self,
        base: nn.Linear,
        factors: FactFactors,
        role: Role,
        in_chunks: int,
        out_chunks: int,
        column: int,
        scale: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "factors", factors)  # bypass nn.Module registration: counted once, on the model
        self.role: Role = role
        self.in_chunks = in_chunks
        self.out_chunks = out_chunks
        self.column = column
        self.scale = scale
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        r = factors.rank
        self.core: nn.Parameter | None
        if factors.variant == "tt":
            weight = base.weight
            self.core = nn.Parameter(
                torch.empty(out_chunks * r, in_chunks * r, device=weight.device, dtype=weight.dtype)
            )
        else:
            self.register_parameter("core", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.core is not None:
            # what nn.Linear(in_chunks·r, out_chunks·r) does: the official per-slice Linears have the same fan-in
            nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))

    def core_map(self) -> torch.Tensor:
        """K, (out_chunks·r) × (in_chunks·r): maps the concatenated U-codes of the input chunks to the V-codes."""
        if self.core is not None:
            return self.core
        f, r = self.factors, self.factors.rank
        if self.role in ("qkv", "proj"):
            # one slice per output chunk; the code is u·M_j (official), i.e. K's j-th block of rows is M_jᵀ
            t = f.slice_cores(self.column, self.out_chunks)
            return t.permute(2, 1, 0).reshape(self.out_chunks * r, r)
        chunks = self.out_chunks if self.role == "fc1" else self.in_chunks
        g = f.slice_cores(self.column, chunks).reshape(r, chunks * r)  # official row-major flatten: G1 / G2
        return g.t() if self.role == "fc1" else g  # fc1: z = u·G1; fc2: z = G2·[u_0; …; u_{k-1}]

    def delta_weight(self) -> torch.Tensor:
        """The increment of `base.weight` (same shape): block (o, i) is V·(s·K)[o-th r rows, i-th r columns]·U."""
        f, r = self.factors, self.factors.rank
        blocks = (self.core_map() * self.scale).reshape(self.out_chunks, r, self.in_chunks, r)
        delta = torch.einsum("pa,oaib,bq->opiq", f.v.weight, blocks, f.u.weight)
        return delta.reshape(self.out_chunks * f.dim, self.in_chunks * f.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.merged:
            return out
        f = self.factors
        # U-codes of the D-wide input chunks, concatenated: (..., in_chunks·r)
        code = f.u(x.unflatten(-1, (self.in_chunks, f.dim))).flatten(-2) if self.in_chunks > 1 else f.u(x)
        # s is folded into the tiny core, so nothing full-width is allocated to scale the output or its gradient
        mixed = self.dropout(F.linear(code, self.core_map() * self.scale))
        # V maps each r-wide output code to its D-wide output chunk; added in place into the frozen output
        delta = f.v(mixed.unflatten(-1, (self.out_chunks, f.rank))).flatten(-2) if self.out_chunks > 1 else f.v(mixed)
        return out.add_(delta)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        text = f"role={self.role!r}, in_chunks={self.in_chunks}, out_chunks={self.out_chunks}, scale={self.scale}"
        return text + (f", first_column={self.column}" if self.core is None else "")


def _check_shape(layer: nn.Linear, where: str, in_features: int, out_features: int) -> None:
    if (layer.in_features, layer.out_features) != (in_features, out_features):
        raise TunerError(
            f"fact: {where} maps {layer.in_features}→{layer.out_features}, expected {in_features}→{out_features} "
            "for FacT's D-wide slices"
        )


def attach_fact(model: nn.Module, variant: Variant, rank: int, scale: float, dropout: float) -> None:
    """Register the shared factors on `model` and wrap every block's qkv, proj, fc1 and fc2."""
    blocks = vit_blocks(model, "fact")
    if hasattr(model, ATTACH_NAME):
        raise TunerError(f"fact: the model already has a `{ATTACH_NAME}` attribute; attach FacT once per model")

    # validate every block before touching the model, so a failure leaves it as it was
    first_qkv = block_linear(blocks[0], "attn.qkv", 0, "fact")
    dim = getattr(model, "embed_dim", None)
    dim = dim if isinstance(dim, int) else first_qkv.in_features
    if rank > dim:
        raise TunerError(f"fact: tuner.rank {rank} exceeds the embedding width {dim}; choose rank ≤ {dim}")
    layout: list[tuple[nn.Module, int, int]] = []  # (block, k, first column of P)
    column = 0
    for i, block in enumerate(blocks):
        qkv, proj = block_linear(block, "attn.qkv", i, "fact"), block_linear(block, "attn.proj", i, "fact")
        fc1, fc2 = block_linear(block, "mlp.fc1", i, "fact"), block_linear(block, "mlp.fc2", i, "fact")
        _check_shape(qkv, f"blocks[{i}].attn.qkv", dim, 3 * dim)
        _check_shape(proj, f"blocks[{i}].attn.proj", dim, dim)
        if fc1.out_features % dim:
            raise TunerError(
                f"fact: blocks[{i}].mlp.fc1 has {fc1.out_features} outputs, not a multiple of the embedding "
                f"width {dim}; FacT cuts the MLP into {dim}-wide slices"
            )
        k = fc1.out_features // dim
        _check_shape(fc1, f"blocks[{i}].mlp.fc1", dim, k * dim)
        _check_shape(fc2, f"blocks[{i}].mlp.fc2", k * dim, dim)
        layout.append((block, k, column))
        column += 4 + 2 * k

    weight = first_qkv.weight
    factors = FactFactors(dim, rank, variant, column, weight.device, weight.dtype)
    model.add_module(ATTACH_NAME, factors)

    # (path, role, in chunks, out chunks, offset of its first column of P within the block)
    def plan(k: int) -> tuple[tuple[str, Role, int, int, int], ...]:
        return (
            ("attn.qkv", "qkv", 1, 3, 0),
            ("attn.proj", "proj", 1, 1, 3),
            ("mlp.fc1", "fc1", 1, k, 4),
            ("mlp.fc2", "fc2", k, 1, 4 + k),
        )

    def wrap(index: int, path: str, base: nn.Linear) -> nn.Module:
        _, k, col = layout[index]
        roles = {p: (role, i_chunks, o_chunks, off) for p, role, i_chunks, o_chunks, off in plan(k)}
        role, in_chunks, out_chunks, offset = roles[path]
        return FactLinear(base, factors, role, in_chunks, out_chunks, col + offset, scale, dropout)

    wrap_block_linears(model, [path for path, *_ in plan(1)], wrap, "fact")
