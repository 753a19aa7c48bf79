"""CUDA's autocast policy for the pinned torch (2.14), as data (torch-free).

Transcribed from the torch wheel's own header `include/ATen/autocast_mode.h` (the `AT_FORALL_LOWER_PRECISION_FP`,
`AT_FORALL_FP32`, `AT_FORALL_FP32_SET_OPT_DTYPE`, `AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE` and `AT_FORALL_PROMOTE`
lists) and `aten/src/ATen/autocast_mode.cpp`, which registers those lists for CUDA and adds two convolutions and
one banned op. tests/test_cuda_trace.py parses the installed header and checks these sets against it, so a torch
upgrade that moves an op fails there. Names are dispatcher names without `aten::` (`op` or `op.overload`).

Policies (`CastPolicy` in the header):
- lower: cast floating inputs to the autocast dtype (fp32 leaves that require grad are cached per autocast region);
- fp32: cast floating inputs to fp32;
- fp32_set_opt_dtype: if the first input is floating, run with `dtype=float32` unless a dtype was given;
- fp32_append_dtype: call the overload that takes a dtype, with fp32 (or the input's dtype if it is not floating);
- promote: cast floating inputs to the widest floating type among them;
- banned: raise (binary_cross_entropy is unsafe to autocast).
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

Policy: TypeAlias = Literal["lower", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned"]

LOWER: Final = frozenset(
    {
        "_convolution.deprecated",
        "_convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_tbc",
        "conv_transpose1d",
        "conv_transpose2d.input",
        "conv_transpose3d.input",
        "convolution",
        "prelu",
        "addmm",
        "addmv",
        "addr",
        "matmul",
        "einsum",
        "mm",
        "mv",
        "linalg_vecdot",
        "linear",
        "addbmm",
        "baddbmm",
        "bmm",
        "chain_matmul",
        "linalg_multi_dot",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
        "_scaled_dot_product_flash_attention",
        "scaled_dot_product_attention",
    }
)
# registered in autocast_mode.cpp beside the header's list
LOWER_CPP: Final = frozenset({"cudnn_convolution", "cudnn_convolution_transpose"})

FP32: Final = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow.Tensor_Scalar",
        "pow.Tensor_Tensor",
        "pow.Scalar",
        "softplus",
        "layer_norm",
        "native_layer_norm",
        "rms_norm",
        "group_norm",
        "frobenius_norm.dim",
        "nuclear_norm",
        "nuclear_norm.dim",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "nll_loss2d",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "cdist",
        "renorm",
        "logsumexp",
        "upsample_nearest1d",
        "_upsample_nearest_exact1d",
        "upsample_nearest2d",
        "_upsample_nearest_exact2d",
        "upsample_nearest3d",
        "_upsample_nearest_exact3d",
        "upsample_linear1d",
        "upsample_bilinear2d",
        "_upsample_bilinear2d_aa",
        "upsample_trilinear3d",
        "upsample_bicubic2d",
        "_upsample_bicubic2d_aa",
    }
)

FP32_SET_OPT_DTYPE: Final = frozenset(
    {
        "prod",
        "prod.dim_int",
        "softmax.int",
        "log_softmax.int",
        "cumprod",
        "cumsum",
        "linalg_vector_norm",
        "linalg_matrix_norm",
        "linalg_matrix_norm.str_ord",
        "sum",
        "sum.dim_IntList",
    }
)

# registered overload → the overload it redispatches to, with the dtype appended
FP32_APPEND_DTYPE: Final = {
    "norm.Scalar": "norm.ScalarOpt_dtype",
    "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
}

PROMOTE: Final = frozenset(
    {
        "addcdiv",
        "addcmul",
        "atan2",
        "bilinear",
        "cross",
        "dot",
        "vdot",
        "grid_sampler",
        "index_put",
        "tensordot",
        "scatter_add",
    }
)

BANNED: Final = frozenset({"binary_cross_entropy"})

# Ops that CPU autocast also runs in lower precision, with the same cached cast: the estimator keeps CPU's own
# kernels for these (and with them autocast's weight cache) instead of emulating them (docs/estimation.md).
SHARED_WITH_CPU: Final = frozenset(
    {
        "_convolution.deprecated",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_tbc",
        "conv_transpose1d",
        "conv_transpose2d.input",
        "conv_transpose3d.input",
        "prelu",
        "addmm",
        "matmul",
        "mm",
        "linalg_vecdot",
        "linear",
        "addbmm",
        "baddbmm",
        "bmm",
        "scaled_dot_product_attention",
    }
)


def cuda_policy() -> dict[str, Policy]:
    """Every op CUDA autocast handles, with its policy."""
    table: dict[str, Policy] = {}
    for names, policy in (
        (LOWER | LOWER_CPP, "lower"),
        (FP32, "fp32"),
        (FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"),
        (frozenset(FP32_APPEND_DTYPE), "fp32_append_dtype"),
        (PROMOTE, "promote"),
        (BANNED, "banned"),
    ):
        for name in names:
            table[name] = policy  # type: ignore[assignment]
    return table
