"""FacT, Factor-Tuning (Jie & Deng, AAAI 2023), variants TT and TK (METHODS.md §2).

FacT views the weight increments of every block's linear maps as D×D slices: q, k, v (the thirds of timm's fused
qkv), o (proj), and the k = hidden/D slices of fc1 (output rows) and of fc2 (input columns). k is 4 for ViT-B and
is read from the model. Each slice's increment is `s·V·M·U`: U (r×D) and V (D×r) are shared by all slices of all
blocks, M is an r×r core.

- TT: every slice has its own free core (Kaiming-uniform), so a block trains (4 + 2k)·r² numbers.
- TK: the cores come from one r×r×r tensor C and a slice-factor matrix P (r × L·(4 + 2k)), both Xavier-uniform:
  `M_j = Σ_c C[:, :, c]·P[c, j]`. Block b uses the next 4 + 2k columns of P, in the order q, k, v, o, fc1, fc2.

Every wrapped Linear computes `base(x) + V_blocks(dropout(s·K · U_blocks(x)))`: x is cut into D-wide input chunks
(k for fc2, one otherwise), U maps each chunk to r numbers, the layer's core map K ((out chunks·r) × (in chunks·r))
mixes them, and V maps each r-wide output chunk to D outputs (3 for qkv, k for fc1, one otherwise). V is zero at
init, so the tuned model equals the backbone at step 0. The increment is added in place into the frozen Linear's
output (no concatenation with zero blocks); the scale is folded into the small core, so no full-width tensor is
made for it in forward or backward.

Merging folds `dW[o-th D rows, i-th D columns] = V·(s·K)[o-th r rows, i-th r columns]·U` into each weight
(§2.4); biases are untouched.

The TK fc1/fc2 cores follow the official code's reshape order, so official checkpoints map one to one: the k fc1
(or fc2) slice cores form an r×r×k tensor that is flattened row-major to r×(k·r), and its k column blocks of
width r are the per-chunk cores. Differences from the official code, none of which change the function: wrappers
around the four Linears instead of a rebound attention/MLP forward (timm's own fused or plain attention runs
unchanged), U·x computed once per layer instead of once per q/k/v, and one dropout over the concatenated q|k|v
codes (the same distribution as three independent masks).
"""

from __future__ import annotations

import math
from typing import Final, Literal

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners import FactConfig
from petlbench.tuners.base import MergeableLayer, Tuner, vit_blocks

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


def _linear(module: nn.Module, path: str, index: int) -> nn.Linear:
    """The nn.Linear at `blocks[index].<path>`, or a TunerError naming what is there instead."""
    found: object = module
    for part in path.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, nn.Linear):
        raise TunerError(
            f"fact: blocks[{index}].{path} is {type(found).__name__}, expected an nn.Linear (timm ViT block layout)"
        )
    return found


def _check_shape(layer: nn.Linear, where: str, in_features: int, out_features: int) -> None:
    if (layer.in_features, layer.out_features) != (in_features, out_features):
        raise TunerError(
            f"fact: {where} maps {layer.in_features}→{layer.out_features}, expected {in_features}→{out_features} "
            "for FacT's D-wide slices"
        )


class Fact(Tuner[FactConfig]):
    """FacT-TT / FacT-TK on every block's qkv, proj, fc1 and fc2."""

    config_cls = FactConfig
    mergeable = True
    identity_at_init = True

    def attach(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        blocks = vit_blocks(model, self.name)
        if hasattr(model, ATTACH_NAME):
            raise TunerError(f"fact: the model already has a `{ATTACH_NAME}` attribute; attach FacT once per model")

        # validate every block before touching the model, so a failure leaves it as it was
        first_qkv = _linear(blocks[0], "attn.qkv", 0)
        dim = getattr(model, "embed_dim", None)
        dim = dim if isinstance(dim, int) else first_qkv.in_features
        if cfg.rank > dim:
            raise TunerError(f"fact: tuner.rank {cfg.rank} exceeds the embedding width {dim}; choose rank ≤ {dim}")
        layout: list[tuple[nn.Module, int, int]] = []  # (block, k, first column of P)
        column = 0
        for i, block in enumerate(blocks):
            qkv, proj = _linear(block, "attn.qkv", i), _linear(block, "attn.proj", i)
            fc1, fc2 = _linear(block, "mlp.fc1", i), _linear(block, "mlp.fc2", i)
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
        factors = FactFactors(dim, cfg.rank, cfg.variant, column, weight.device, weight.dtype)
        model.add_module(ATTACH_NAME, factors)

        # (path, role, in chunks, out chunks, offset of its first column of P within the block)
        def plan(k: int) -> tuple[tuple[str, Role, int, int, int], ...]:
            return (
                ("attn.qkv", "qkv", 1, 3, 0),
                ("attn.proj", "proj", 1, 1, 3),
                ("mlp.fc1", "fc1", 1, k, 4),
                ("mlp.fc2", "fc2", k, 1, 4 + k),
            )

        for i, (block, k, col) in enumerate(layout):
            for path, role, in_chunks, out_chunks, offset in plan(k):
                parent_path, name = path.split(".")
                base = _linear(block, path, i)
                wrapper = FactLinear(base, factors, role, in_chunks, out_chunks, col + offset, cfg.scale, cfg.dropout)
                block.get_submodule(parent_path).register_module(name, wrapper)
        return model
