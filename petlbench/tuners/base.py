"""The tuner interface and the one function that builds a tuned model. Torch-free to import.

A tuner *is* its validated knobs: a frozen pydantic model (so the parent process validates suites without
importing torch) whose `attach` imports the torch side only when it runs. Tuners that need layers of their own
keep them in a `layers.py` beside their config (`tuners/lora/`); tuners that need none are one file (`bitfit.py`).

Rules for implementers:
- Wrap, never rebind: replace a submodule with a wrapper that holds the original (`blocks[i].attn.qkv =
  LoraQkv(base=...)`), or return a new root module that holds the backbone. No instance-level `forward`.
- Read dimensions from the model (`model.embed_dim`, `len(model.blocks)`, `qkv.in_features`); never 768/12.
- Every parameter a tuner creates trains; existing parameters train only if `trainable_backbone_parameters`
  returns them (the head by default). `requires_grad`, the optimizer, data and device belong to the caller.
- Custom attention honours `attn.fused_attn` so every tuner runs under the same kernel.
- Declare what the estimator and the tests need to know as class attributes: `adds_parameters`, `mergeable`,
  `identity_at_init`, and the dropout rates the tuner's own layers apply (`dropout_rates`).
- Declare what a composition (`tuner: compose`, petlbench/tuners/compose.py) needs to know: the module roles the
  tuner `replaces` (wraps to change what the module computes, relying on its original type: LoRA on
  `blocks.attn.qkv`) and `wraps` (calls unchanged, as a black box: VPT around `blocks`), whether it
  `trains_backbone` parameters beyond the head, and whether it is a `side_network` that reads the frozen
  backbone's activations. Roles are paths in a timm ViT, `blocks.*` standing for every block: `patch_embed.proj`,
  `norm_pre`, `blocks`, `blocks.norm1`, `blocks.attn.qkv`, `blocks.attn.proj`, `blocks.norm2`, `blocks.mlp`,
  `blocks.mlp.fc1`, `blocks.mlp.fc2`, `norm`. A tuner that leaves `replaces` None cannot be a part.

Two knobs every tuner has, because the official codes disagree on them and they change what is computed:
`backbone_mode` (does the frozen backbone's dropout / drop path act while training?) and `head_init` (how the new
classifier starts). Each tuner sets the defaults its official code implies (`backbone_mode_field`,
`head_init_field`); `build_tuned_model` applies both, so no tuner implements them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

from pydantic import Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from petlbench.errors import TunerError
from petlbench.fmt import did_you_mean
from petlbench.spec.base import StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn


BackboneMode: TypeAlias = Literal["train", "eval"]
HeadInit: TypeAlias = Literal["timm", "torch", "vpt", "adaptformer"]

# What petlbench did before the two knobs existed: a run with these values computes what it always did, so
# `RunSpec.run_id` leaves them out of the hash (`petlbench.spec.controls.LEGACY_TUNER_PARAMS`).
LEGACY_BACKBONE_MODE: BackboneMode = "train"
LEGACY_HEAD_INIT: HeadInit = "timm"


def unknown_tuner_message(name: str, known: Iterable[str]) -> str:
    """'unknown tuner 'lroa'; did you mean 'lora'? valid: full, linear, lora'."""
    known = sorted(known)
    return f"unknown tuner {name!r}{did_you_mean(name, known) or ';'} valid: {', '.join(known)}"


def knob_error(title: str, loc: tuple[str | int, ...], message: str, given: Any) -> ValidationError:
    """A one-line validation error at a knob (`loc`), for a tuner's model validator to raise: the suite error then
    names `tuners[i].params.<knob>`. `given` is shown after the message unless it is a dict."""
    error = PydanticCustomError("knob", message.replace("{", "{{").replace("}", "}}"))
    return ValidationError.from_exception_data(title, [InitErrorDetails(type=error, loc=loc, input=given)])


def unknown_knob_message(cls: type[Tuner], key: str, exclude: Iterable[str] = ()) -> str:
    """'unknown knob for tuner 'lora'; did you mean 'rank'? valid: rank, alpha, ...' (one line)."""
    skip = set(exclude)
    valid = [name for name in cls.model_fields if name not in skip]
    hint = did_you_mean(key, valid) or ";"
    return f"unknown knob for tuner {cls.name!r}{hint} valid: {', '.join(valid) or '(none)'}"


def backbone_mode_field(default: BackboneMode, why: str) -> Any:
    """The `backbone_mode` knob with a tuner's default; `why` names the official code the default follows."""
    return Field(
        default,
        description="while training, 'eval' keeps the modules the backbone came with in eval mode (no dropout or "
        f"drop path in the frozen backbone; the tuner's own layers still train), 'train' leaves them in train mode. "
        f"Default: {why}",
    )


def head_init_field(default: HeadInit, why: str) -> Any:
    """The `head_init` knob with a tuner's default; `why` names the official code the default follows."""
    return Field(
        default,
        description="the new classifier's init: 'timm' as timm builds it (truncated normal std 0.02, zero bias; "
        "a checkpoint head of the same shape is kept), "
        "'torch' PyTorch's nn.Linear default (what the reset_classifier of timm 0.4.12 and 0.9.12 gives), 'vpt' "
        "VPT's (Kaiming-normal fan-out, bias -log(99)), 'adaptformer' AdaptFormer's (nn.Linear's default, then "
        f"the weight re-drawn truncated normal std 0.01). Default: {why}",
    )


class Tuner(StrictModel):
    """A parameter-efficient (or full) tuning method applied to a timm VisionTransformer, with its knobs."""

    name: ClassVar[str]  # registry key, as suites write it
    knob: ClassVar[str | None] = None  # the headline knob shown in the unified `knob` column
    summary: ClassVar[str] = ""  # what it computes, in a sentence or two (`petlbench tuners NAME`)
    brief: ClassVar[str] = ""  # a few words for the one-line list (`petlbench tuners`)
    adds_parameters: ClassVar[bool] = True  # creates parameters of its own (full, linear, BitFit do not)
    mergeable: ClassVar[bool] = False  # can fold its increments into the backbone weights
    identity_at_init: ClassVar[bool] = False  # output equals the untouched backbone's at step 0
    extra: ClassVar[str | None] = None  # the optional install it needs (`pip install "petlbench[<extra>]"`)
    # composition (see the module docstring); None: undeclared, so the tuner cannot be a compose part
    replaces: ClassVar[tuple[str, ...] | None] = None
    wraps: ClassVar[tuple[str, ...]] = ()
    trains_backbone: ClassVar[bool] = False  # existing parameters beyond the head train (BitFit, full)
    side_network: ClassVar[bool] = False  # a network of its own reads the frozen backbone and feeds the head

    # common knobs; a subclass re-declares them to change the default (see `Lora`, `Vpt`)
    backbone_mode: BackboneMode = backbone_mode_field(LEGACY_BACKBONE_MODE, "train")
    head_init: HeadInit = head_init_field(LEGACY_HEAD_INIT, "timm")

    def method(self) -> str:
        """The method's name in tables and plots: the tuner, plus a variant that changes the method (vpt-deep)."""
        return self.name

    def knob_name(self) -> str | None:
        """Name of the headline knob: the class's `knob`, unless a tuner's knobs depend on a knob of its own (peft:
        the rank-like field of the chosen method's config)."""
        return self.knob

    def knob_value(self) -> float | None:
        """Value of the headline knob, or None for tuners without one (full, linear)."""
        if self.knob is None:
            return None
        return float(getattr(self, self.knob))

    def dropout_rates(self) -> tuple[float, ...]:
        """Dropout probabilities of the layers this tuner adds (the estimator maps CPU masks to CUDA's)."""
        return ()

    def validate_on(self, model: nn.Module) -> None:
        """Extra checks of these knobs against a built model, run by the pre-flight probe (petlbench/run/probe.py)
        after `build_tuned_model`, on the meta device (shapes, no data or memory): raise TunerError naming the
        knob and the fix. Default: none (what `attach` itself checks is already covered)."""

    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Insert or wrap modules in place; return the module to train (usually `model` itself)."""

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Existing backbone parameters that train besides the tuner's own: the classifier head(s) by default."""
        from petlbench.tuners.layers import classifier_heads

        return [p for head in classifier_heads(model, self.name) for p in head.parameters()]

    def merge(self, root: nn.Module) -> None:
        """Fold the tuner's increments into the backbone weights (mergeable tuners only)."""
        for layer in self._mergeable_layers(root):
            layer.merge()

    def unmerge(self, root: nn.Module) -> None:
        """Undo `merge`."""
        for layer in self._mergeable_layers(root):
            layer.unmerge()

    def _mergeable_layers(self, root: nn.Module) -> list[MergeableLayer]:
        from petlbench.tuners.layers import MergeableLayer

        if not self.mergeable:
            raise TunerError(f"{self.name} is not mergeable")
        return [m for m in root.modules() if isinstance(m, MergeableLayer)]


if TYPE_CHECKING:
    from petlbench.tuners.layers import MergeableLayer


@dataclass(frozen=True)
class TunedModel:
    """A backbone with a tuner attached, frozen structurally, with its parameter accounting."""

    module: nn.Module  # what to call and train
    backbone: nn.Module  # the timm model inside it
    tuner: Tuner
    params_total: int
    params_trainable: int
    params_added: int
    weights_frozen_bytes: int
    weights_trainable_bytes: int

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


def build_tuned_model(backbone: nn.Module, tuner: Tuner) -> TunedModel:
    """Attach `tuner` to `backbone`, freeze everything but the tuner's parameters (+ head), check invariants.

    Freezing is structural: parameters that did not exist before `attach` are the tuner's; nothing is chosen
    by name, so a backbone parameter whose name happens to contain 'lora' or 'head' cannot be caught. The same
    before/after split decides which modules `backbone_mode='eval'` keeps in eval mode. The head is initialised
    after `attach`, as every official code does (it resets the classifier once the method's layers exist).
    """
    from petlbench.tuners.layers import classifier_heads, init_heads, keep_in_eval_while_training

    original = list(backbone.parameters())
    original_ids = {id(p) for p in original}
    original_modules = list(backbone.modules())
    root = tuner.attach(backbone)
    params = list(root.parameters())
    param_ids = {id(p) for p in params}

    lost = [n for n, p in backbone.named_parameters() if id(p) not in param_ids]
    if len(lost) or not original_ids <= param_ids:
        raise TunerError(f"{tuner.name}: attach() dropped backbone parameters (e.g. {lost[:3]}); wrap, don't replace")
    patched = [name or "<root>" for name, m in root.named_modules() if "forward" in vars(m)]
    if patched:
        raise TunerError(f"{tuner.name}: modules with an instance-level forward (monkey-patched): {patched[:3]}")

    added = [p for p in params if id(p) not in original_ids]
    if tuner.adds_parameters != bool(added):
        says = "adds parameters" if tuner.adds_parameters else "adds no parameter"
        raise TunerError(f"{tuner.name}: declares that it {says}, but attach() created {len(added)}")
    extra = list(tuner.trainable_backbone_parameters(backbone))
    foreign = [p for p in extra if id(p) not in original_ids]
    if foreign:
        raise TunerError(f"{tuner.name}: trainable_backbone_parameters() returned parameters not in the backbone")
    trainable_ids = {id(p) for p in added} | {id(p) for p in extra}
    for p in params:
        p.requires_grad_(id(p) in trainable_ids)
    if not trainable_ids:
        raise TunerError(f"{tuner.name}: no trainable parameters")
    if tuner.head_init != "timm":  # 'timm' keeps the head the backbone was built with
        init_heads(classifier_heads(backbone, tuner.name), tuner.head_init, tuner.name)
    if tuner.backbone_mode == "eval":
        module_ids = {id(m) for m in root.modules()}
        keep_in_eval_while_training(root, [m for m in original_modules if m is not root and id(m) in module_ids])

    def nbytes(ps: Iterable[torch.Tensor]) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    return TunedModel(
        module=root,
        backbone=backbone,
        tuner=tuner,
        params_total=sum(p.numel() for p in params),
        params_trainable=sum(p.numel() for p in trainable),
        params_added=sum(p.numel() for p in added),
        weights_frozen_bytes=nbytes(frozen) + nbytes(root.buffers()),
        weights_trainable_bytes=nbytes(trainable),
    )
