"""VPT: Visual Prompt Tuning, shallow and deep (Jia et al., ECCV 2022; docs/methods.md, "VPT").

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
which the extra prompt tokens break.

The official code keeps the frozen encoder in eval mode while the prompts train (its `PromptedTransformer.train`
switches encoder and embeddings to eval and only the prompt dropout to train); `backbone_mode='eval'`, the default,
does the same here: the backbone's drop path and dropout are off in training, the prompt dropout is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Vpt(Tuner):
    """Prompt tokens after the prefix tokens; deep VPT gives every block its own prompt set."""

    name = "vpt"
    knob = "prompt_len"
    brief = "learnable prompt tokens"
    summary = (
        "VPT: p learnable prompt tokens after the class token, without positional embedding; deep VPT replaces "
        "them with fresh prompts before every block, shallow VPT only inserts them once."
    )
    replaces = ()
    # VptInsert, VptDeepBlock and VptStrip (avg-pool models) call the module they hold unchanged
    wraps = ("norm_pre", "blocks", "norm")

    prompt_len: int = Field(50, gt=0, description="prompt tokens p per prompt set (sequence grows from N to N + p)")
    deep: bool = Field(True, description="deep VPT: one prompt set per block (L sets); False: shallow, one set")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the prompts (training mode only)")
    backbone_mode: BackboneMode = backbone_mode_field(
        "eval", "'eval', as VPT's PromptedTransformer.train() puts encoder and embeddings in eval, prompts in train"
    )
    head_init: HeadInit = head_init_field("vpt", "'vpt', VPT's own classifier init")

    def method(self) -> str:
        return "vpt-deep" if self.deep else "vpt-shallow"

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.vpt.layers import attach_vpt

        attach_vpt(model, self.prompt_len, self.deep, self.dropout)
        return model
