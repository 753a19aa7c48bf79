"""The torch side of the peft bridge: peft's config validated field by field, the targets checked against the model,
the method injected with peft's own API, and merge/unmerge over peft's tuner layers.

Every problem is a `PeftFieldError` naming the config field (or `peft_type`), so the pre-flight probe
(petlbench/run/probe.py) can point at the suite line, and a worker fails with the same message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final
from unittest import mock

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from petlbench.errors import KnobError, TunerError

if TYPE_CHECKING:
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

INSTALL_HINT: Final = 'pip install "petlbench[peft]"'

# Config fields petlbench sets or owns; a suite giving them would change what the harness measures.
RESERVED: Final = {
    "peft_type": "give peft_type beside config, not inside it",
    "task_type": "task types wrap transformers models; the timm ViT is injected directly, remove it",
    "inference_mode": "freezes the adapter; petlbench trains it, remove it",
    "modules_to_save": "the classifier head always trains (as for every tuner); remove it",
    "base_model_name_or_path": "set by peft from the model; remove it",
    "revision": "only used when loading a hub model; remove it",
}

# Methods peft defines that do not apply to a ViT trained by petlbench's step, and why.
NOT_APPLICABLE: Final = {
    "ADALORA": "AdaLoRA needs its rank allocator called after every optimizer step (update_and_allocate) and its "
    "orthogonality loss added to the loss, which a plain training step does not do",
    "XLORA": "X-LoRA mixes pretrained LoRA adapters of a transformers model",
    "POLY": "Poly routes between adapters by task ids passed to forward",
    "ADAPTION_PROMPT": "adaption prompts are written for LLaMA-style attention modules of transformers models",
    "SHADOW": "peft injects Shadow only through a transformers model (create_and_replace refuses it)",
    "TRAINABLE_TOKENS": "trainable tokens extend a token-embedding table; a ViT embeds patches, not token ids",
}


class PeftMissing(KnobError):
    """peft cannot be imported (the fault of the entry's `tuner: peft`, not of a knob)."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, detail)


class PeftNeedsWeights(TunerError, NotImplementedError):
    """The method initialises its adapters from the backbone's weight values, which a meta model does not have
    (not a configuration error: the pre-flight probe leaves it to the worker)."""


class PeftFieldError(KnobError):
    """A peft config problem: `config_field` is a config field, 'peft_type', or None (the config as a whole)."""

    def __init__(self, config_field: str | None, detail: str) -> None:
        field = "peft_type" if config_field == "peft_type" else f"config.{config_field}" if config_field else "config"
        super().__init__(field, detail, prefix="peft: ")
        self.config_field = config_field


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise PeftMissing(f"peft: the Hugging Face peft library cannot be imported ({exc}); {INSTALL_HINT}") from None
    return peft


def injectable_methods() -> list[str]:
    """peft methods that inject into the layers of a custom nn.Module, less those that do not apply here."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(
        t.value
        for t in PEFT_TYPE_TO_TUNER_MAPPING
        if t.value not in NOT_APPLICABLE and not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[t], peft.PromptLearningConfig)
    )


def _named_field(text: str, fields: list[str]) -> str | None:
    """The config field a peft message names first ('`feedforward_modules` should be a subset of ...')."""
    found = [(m.start(), f) for f in fields if (m := re.search(rf"(?<![\w.]){re.escape(f)}(?!\w)", text))]
    return min(found)[1] if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _close(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(annotation: Any) -> str:
    """`list[str] | str | None`, `'none' | 'all'`: a field's type as a user reads it."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _check_type(config_cls: type, field: str, value: object) -> None:
    """The value against the field's annotation in peft's config dataclass, strictly (no '8' for an int)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):  # an annotation that does not resolve: peft's own checks still run
        return
    annotation = hints.get(field)
    if annotation is None:
        return
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        one = len(errors) == 1
        expected = errors[0]["msg"].lower().removeprefix("input ") if one else f"should be {_type_name(annotation)}"
        raise PeftFieldError(field, f"{expected} ({config_cls.__name__}), got {value!r}") from None
    except Exception:  # pydantic cannot build a validator for some annotations; peft's own checks cover those
        return


def peft_config(peft_type: str, config: Mapping[str, Any]) -> PeftConfig:
    """peft's config object for the method, every field checked: known to the class, of its declared type, and
    accepted by the class itself (its __post_init__ checks)."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    known = {t.value: t for t in peft.PeftType}
    if peft_type not in known:
        valid = injectable_methods()
        raise PeftFieldError(
            "peft_type", f"unknown peft method {peft_type!r}{_close(peft_type, valid)} valid: {', '.join(valid)}"
        )
    kind = known[peft_type]
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    if kind not in PEFT_TYPE_TO_TUNER_MAPPING or issubclass(config_cls, peft.PromptLearningConfig):
        raise PeftFieldError(
            "peft_type",
            f"{peft_type} is a prompt-learning method for transformers models; peft cannot inject it into a timm "
            f"ViT (use petlbench's vpt tuner for prompts); valid: {', '.join(injectable_methods())}",
        )
    if peft_type in NOT_APPLICABLE:
        raise PeftFieldError("peft_type", f"{NOT_APPLICABLE[peft_type]}; choose another method")
    fields = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for key, value in config.items():
        if key in RESERVED:
            raise PeftFieldError(key, RESERVED[key])
        if key not in fields:
            settable = [f for f in fields if f not in RESERVED]
            raise PeftFieldError(key, f"unknown field of peft's {config_cls.__name__}{_close(key, settable)}")
        _check_type(config_cls, key, value)
    if peft_type == "BOFT" and config.get("boft_n_butterfly_factor", 1) != 1:
        raise PeftFieldError(
            "boft_n_butterfly_factor",
            "peft uses more than one butterfly factor only with its CUDA extension, which petlbench keeps off so "
            "every device trains the same parameters; set 1",
        )
    try:
        made: PeftConfig = config_cls(**config)
    except (ValueError, TypeError, KeyError) as exc:
        text = _first_line(exc)
        raise PeftFieldError(_named_field(text, fields), f"{config_cls.__name__}: {text}") from None
    return made


def _matches(target: str, name: str) -> bool:
    """peft's rule for a list entry: the module's name is the entry or ends in '.' + entry."""
    return name == target or name.endswith(f".{target}")


def check_targets(model: nn.Module, field: str, targets: object) -> None:
    """Every listed target (or the regex, for a string) names a module of `model`, as peft will look it up, and
    none is the classifier head, which trains in full already (an adapter on it would shadow that)."""
    if targets is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":  # peft's shorthand for every Linear
            matched = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        else:
            matched = [name for name in names if re.fullmatch(targets, name)]
        if not matched:
            raise PeftFieldError(field, f"the pattern {targets!r} matches no module name of {type(model).__name__}")
    elif isinstance(targets, list | tuple | set | frozenset):
        matched = []
        for target in targets:
            if not isinstance(target, str):
                continue
            found = [name for name in names if _matches(target, name)]
            if not found:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
                raise PeftFieldError(
                    field,
                    f"{target!r} matches no module of {type(model).__name__} (peft matches names ending in "
                    f"'.{target}'); its module names end in: {', '.join(leaves)}",
                )
            matched += found
    else:
        return
    get_classifier = getattr(model, "get_classifier", None)
    heads = get_classifier() if callable(get_classifier) else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    on_head = [name for name, m in model.named_modules() if name in matched and any(m is h for h in heads)]
    if on_head:
        raise PeftFieldError(
            field,
            f"matches the classifier head {on_head[0]!r}, which trains in full already; target the blocks' layers "
            "instead (e.g. [qkv, attn.proj, fc1, fc2])",
        )


@contextlib.contextmanager
def _boft_cuda_extension_off() -> Iterator[None]:
    """peft's BOFT compiles a CUDA extension the first time a layer is built where it can (ninja + CUDA), and uses
    it when it compiled. Keeping it off makes a CPU estimate and a GPU run of the same spec run the same code, and
    keeps a compiler out of a measured run."""
    import peft.tuners.boft.layer as boft_layer

    with mock.patch.object(boft_layer, "_FBD_CUDA", False):
        yield


@contextlib.contextmanager
def _index_constants_on_cpu() -> Iterator[None]:
    """BOFT builds its permutation matrices by Python indexing (`.item()`), which a meta tensor cannot answer. On a
    meta model those two helpers alone run on the CPU (index lists and 0/1 matrices the size of a layer's input,
    never a knob); the matrices are then copied into the layer's meta buffer, so nothing real stays behind."""
    import peft.tuners.boft.layer as boft_layer

    layer = boft_layer.BOFTLayer

    def on_cpu(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with torch.device("cpu"):
                return method(*args, **kwargs)

        return wrapped

    with (
        mock.patch.object(layer, "perm2mat", on_cpu(layer.perm2mat)),
        mock.patch.object(layer, "block_butterfly_perm", on_cpu(layer.block_butterfly_perm)),
    ):
        yield


# What a peft method may add to a model, in elements (parameters and buffers): this many times the backbone's own,
# or MIN_ADAPTER_LIMIT, whichever is larger. Beyond it a knob is a typo (r: 1000000), not a method to benchmark.
ADAPTER_LIMIT_FACTOR: Final = 10
MIN_ADAPTER_LIMIT: Final = 1 << 26


def _elements(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def attach_peft(
    model: nn.Module, peft_type: str, config: Mapping[str, Any], size_field: str | None = None
) -> nn.Module:
    """Inject the peft method into `model`; return the module to train (the model, or the PeftModel holding it).

    On a meta model (the pre-flight probe, the estimator) everything is built on the meta device: no real memory,
    whatever the knobs say. A method that adds more than ADAPTER_LIMIT_FACTOR × the backbone's elements is refused
    as a PeftFieldError naming `size_field` (the method's rank-like field) when the config sets it.
    """
    made = peft_config(peft_type, config)
    check_targets(model, "target_modules", getattr(made, "target_modules", None))
    check_targets(model, "feedforward_modules", getattr(made, "feedforward_modules", None))
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    meta = any(p.is_meta for p in model.parameters())
    before = _elements(model)
    try:
        with (
            _boft_cuda_extension_off(),
            torch.device("meta") if meta else contextlib.nullcontext(),
            _index_constants_on_cpu() if meta else contextlib.nullcontext(),
        ):
            if PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType(peft_type)].uses_shared_state:
                root: nn.Module = peft.get_peft_model(model, made)  # the shared state lives on the PeftModel
            else:
                root = peft.inject_adapter_in_model(made, model)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as exc:
        text = _first_line(exc)
        if meta and isinstance(exc, NotImplementedError | RuntimeError) and "meta" in text.lower():
            raise PeftNeedsWeights(
                f"peft: {peft_type} initialises its adapters from the backbone's weight values (SVD, masks), which "
                f"a model on the meta device has none of, so it cannot be estimated; run it instead ({text[:100]})"
            ) from None
        if isinstance(exc, RuntimeError):
            raise
        field = _named_field(text, [f.name for f in dataclasses.fields(made)])
        raise PeftFieldError(field or ("target_modules" if "target" in text.lower() else None), text) from None
    _check_size(config, size_field, _elements(root) - before, before)
    return root


def _check_size(config: Mapping[str, Any], size_field: str | None, added: int, backbone: int) -> None:
    limit = max(ADAPTER_LIMIT_FACTOR * backbone, MIN_ADAPTER_LIMIT)
    if added <= limit:
        return
    field = size_field if size_field is not None and size_field in config else None
    given = f"{config[field]!r} adds" if field is not None else "these knobs add"
    raise PeftFieldError(
        field,
        f"{given} {added:,} elements to a backbone of {backbone:,}, more than the {limit:,} a peft method may add "
        f"({ADAPTER_LIMIT_FACTOR}× the backbone); choose a smaller {field or 'size'}",
    )


def peft_layers(root: nn.Module) -> list[BaseTunerLayer]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in root.modules() if isinstance(m, BaseTunerLayer)]


def merge_peft(root: nn.Module, peft_type: str) -> None:
    """Fold every peft layer's increment into its base layer (peft's own merge)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = peft_layers(root)
    if not layers:
        raise TunerError("peft: no peft layers to merge")
    for layer in layers:
        if type(layer).merge is BaseTunerLayer.merge:  # peft's base class raises NotImplementedError
            raise TunerError(f"peft: {peft_type} layers ({type(layer).__name__}) cannot merge")
    for layer in layers:
        layer.merge()


def unmerge_peft(root: nn.Module) -> None:
    for layer in peft_layers(root):
        layer.unmerge()
