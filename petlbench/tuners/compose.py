"""Compose: several tuners combined, e.g. LoRA + VPT + BitFit (docs/methods.md, "Compositions").

    tuner: compose
    params:
      parts:
        - {tuner: lora, params: {rank: 8}}
        - {tuner: vpt, params: {prompt_len: 10}}
        - {tuner: bitfit}

Torch-free to validate. Each part is validated by its own tuner model, so a part's knob typo gets that tuner's
one-line error, and its params are written out in full (every knob, defaults included) so the run_id covers them.
The parts are then checked against each other from what each tuner declares (`Tuner.replaces`, `wraps`,
`trains_backbone`, `side_network`); a combination that cannot work is refused in one line:

- two parts that replace the same module (LoRA and FacT both wrap `blocks.*.attn.qkv` to change it), or that wrap
  the same one;
- a side network (SQT, VQT, DTL, LST: reads the frozen backbone's activations) with a part that changes the
  backbone it reads, or two side networks (each feeds the classifier features of its own: two heads);
- a tuner that does not declare what it changes (peft picks its modules from its config when it attaches; plugin
  tuners that set no `replaces`), compose itself, a tuner named twice, a single part, or parts of which none adds
  parameters.

Attach order: the part whose deepest module is deepest goes first (`blocks.attn.qkv` before `blocks.mlp` before
`blocks`), replacements before black-box wraps at the same depth. So a wrapper always finds the module it
replaces or wraps where the backbone had it (LoRA wraps qkv before VPT wraps the block around it), and a part that
only reads a width looks through the wrappers already there. The order does not depend on how the parts are
listed; the method label (`lora+vpt-deep+bitfit`) keeps the listed order.

The two common knobs belong to the composition, since they act on the whole model: `backbone_mode` and
`head_init` default to the first part's defaults, and a part may not set them. The headline knob is the first
part's that has one, named `<tuner>.<knob>` (`lora.rank`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from petlbench.spec.base import StrictModel
from petlbench.tuners.base import (
    BackboneMode,
    HeadInit,
    Tuner,
    backbone_mode_field,
    head_init_field,
    knob_error,
    unknown_knob_message,
    unknown_tuner_message,
)

if TYPE_CHECKING:
    from torch import nn

COMMON_KNOBS: Final = ("backbone_mode", "head_init")
DEFAULT_PARTS: Final[tuple[dict[str, Any], ...]] = (
    {"tuner": "lora", "params": {"rank": 8}},
    {"tuner": "vpt", "params": {"prompt_len": 10}},
    {"tuner": "bitfit"},
)


_LOOKUP: list[Callable[[], Mapping[str, type[Tuner]]]] = []


def use_registry(lookup: Callable[[], Mapping[str, type[Tuner]]]) -> None:
    """Set where parts are looked up: the registry (`petlbench.tuners`) calls this with `available_tuners` once it
    is built; it imports this module, so this module cannot import it."""
    _LOOKUP[:] = [lookup]


def _registry() -> Mapping[str, type[Tuner]]:
    if not _LOOKUP:
        raise RuntimeError("petlbench.tuners.compose: import petlbench.tuners first (it provides the registry)")
    return _LOOKUP[0]()


def part_class(name: str) -> type[Tuner] | None:
    """The registered tuner class a part names, or None."""
    return _registry().get(name)


class Part(StrictModel):
    """One tuner of a composition: its registry name and its knobs (validated by that tuner's model)."""

    tuner: str = Field(description="a registered tuner (petlbench tuners)")
    params: dict[str, Any] = Field(default_factory=dict, description="that tuner's knobs, as under `params`")

    @model_validator(mode="before")
    @classmethod
    def _validate_with_the_parts_own_model(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key not in cls.model_fields:
                raise knob_error(cls.__name__, (str(key),), "unknown key; valid keys: params, tuner", data)
        name, params = data.get("tuner"), data.get("params", {})
        if not isinstance(name, str) or not isinstance(params, dict):
            return data  # the fields' own validation names the problem
        registry = _registry()
        tuner_cls = registry.get(name)
        if tuner_cls is None:
            raise knob_error(cls.__name__, ("tuner",), unknown_tuner_message(name, registry), data)
        common = [k for k in params if k in COMMON_KNOBS]
        if common:
            message = f"set {common[0]} on compose itself (params.{common[0]}): it applies to the whole model"
            raise knob_error(cls.__name__, ("params", common[0]), message, params)
        try:
            part = tuner_cls.model_validate(params)
        except ValidationError as exc:
            raise _relocated(exc, tuner_cls, params, cls.__name__) from None
        return {**data, "params": part.model_dump(mode="json", exclude=set(COMMON_KNOBS))}

    def tuner_class(self) -> type[Tuner]:
        found = part_class(self.tuner)
        if found is None:  # validated at construction; a plugin that disappeared since
            raise ValueError(f"tuner {self.tuner!r} is not registered")
        return found

    def build(self) -> Tuner:
        return self.tuner_class().model_validate(self.params)

    def __str__(self) -> str:
        """'lora(rank=4)': the knobs that differ from the tuner's defaults."""
        defaults = self.tuner_class()().model_dump(mode="json")
        changed = [f"{k}={v}" for k, v in self.params.items() if defaults.get(k) != v]
        return f"{self.tuner}({', '.join(changed)})" if changed else self.tuner


def _relocated(exc: ValidationError, tuner_cls: type[Tuner], params: dict[str, Any], title: str) -> ValidationError:
    """A part's validation errors, at `params.<knob>` below the part, with the single-tuner wording."""
    errors: list[InitErrorDetails] = []
    for err in exc.errors():
        loc = ("params", *err["loc"])
        if err["type"] == "extra_forbidden":
            text = unknown_knob_message(tuner_cls, str(err["loc"][-1]), exclude=COMMON_KNOBS)
            given: Any = params
        else:
            text, given = err["msg"], err.get("input")
        message = PydanticCustomError("part_knob", text.replace("{", "{{").replace("}", "}}"))
        errors.append(InitErrorDetails(type=message, loc=loc, input=given))
    return ValidationError.from_exception_data(title, errors)


def _default_parts() -> tuple[Part, ...]:
    return tuple(Part.model_validate(p) for p in DEFAULT_PARTS)


def _depth(role: str) -> int:
    return role.count(".")


def attach_order(classes: Sequence[type[Tuner]]) -> list[int]:
    """Indices of the parts in attach order: deepest module first, a replacement before a wrap of equal depth."""

    def key(index: int) -> tuple[int, int, int]:
        cls = classes[index]
        replaced = [_depth(r) for r in cls.replaces or ()]
        wrapped = [_depth(r) for r in cls.wraps]
        deepest = max([*replaced, *wrapped], default=-1)
        kind = 0 if replaced and max(replaced) == deepest else 1
        return (-deepest, kind, index)

    return sorted(range(len(classes)), key=key)


def conflicts(classes: Sequence[type[Tuner]]) -> str | None:
    """Why these tuners cannot be composed, as one line naming the parts, or None."""
    names = [c.name for c in classes]
    if len(classes) < 2:
        alone = f"; for one, use tuner: {names[0]}" if names else ""
        return f"a composition needs at least two parts, got {len(classes)}{alone}"

    def who(i: int) -> str:
        return f"parts[{i}] ({names[i]})"

    for i, cls in enumerate(classes):
        if cls.name in names[:i]:
            return f"{who(i)}: already parts[{names.index(cls.name)}]; a tuner can be one part only"
        if cls.name == "compose":
            return f"{who(i)}: a composition cannot be a part; list its parts here instead"
        if cls.replaces is None:
            note = getattr(cls, "compose_note", None) or "it does not declare the modules it changes (Tuner.replaces)"
            return f"{who(i)}: {cls.name} cannot be a compose part: {note}; run it alone"
    sides = [i for i, c in enumerate(classes) if c.side_network]
    if len(sides) > 1:
        return (
            f"{who(sides[0])} and {who(sides[1])} are both side networks that feed the classifier features of "
            "their own (two heads); keep one of them"
        )
    for side in sides:
        for i, cls in enumerate(classes):
            if i == side:
                continue
            if cls.replaces:
                what = f"replaces {_shown(cls.replaces[0])}"
            elif cls.wraps:
                what = f"wraps {_shown(cls.wraps[0])}"
            elif cls.trains_backbone:
                what = "trains backbone parameters"
            else:
                continue
            return (
                f"{who(side)} is a side network that reads the frozen backbone, and {who(i)} changes that "
                f"backbone ({what}); keep one of them"
            )
    for kind in ("replaces", "wraps"):
        owner: dict[str, int] = {}
        for i, cls in enumerate(classes):
            roles = cls.wraps if kind == "wraps" else cls.replaces or ()
            for role in roles:
                if role in owner:
                    verb = "replace" if kind == "replaces" else "wrap"
                    return f"{who(owner[role])} and {who(i)} both {verb} {_shown(role)}; keep one of them"
                owner[role] = i
    order = attach_order(classes)
    for at, first in enumerate(order):  # a part that attaches first must not hide a module a later part needs
        for later in order[at + 1 :]:
            for outer in (*(classes[first].replaces or ()), *classes[first].wraps):
                for inner in (*(classes[later].replaces or ()), *classes[later].wraps):
                    if inner.startswith(outer + "."):
                        return (
                            f"{who(later)} cannot reach {_shown(inner)} inside the {_shown(outer)} that {who(first)} "
                            "changes, which attaches first (it also changes a deeper module); keep one of them"
                        )
    if not any(c.adds_parameters for c in classes):
        return f"no part adds parameters ({', '.join(names)}); a composition needs one that does"
    return None


def _shown(role: str) -> str:
    """'blocks.attn.qkv' → 'blocks.*.attn.qkv' (every block's), other roles as they are."""
    return "blocks.*" + role.removeprefix("blocks") if role.startswith("blocks") else role


class Compose(Tuner):
    """Several tuners on one backbone; the parts' knobs, parameters and dropouts add up."""

    name = "compose"
    brief = "several tuners combined"
    summary = (
        "Compose: several tuners combined (parts: [{tuner, params}, ...]), e.g. LoRA + VPT + BitFit; parts "
        "that change the same module, or a side network with a part that changes its backbone, are refused."
    )

    parts: tuple[Part, ...] = Field(
        default_factory=_default_parts,
        description="the tuners to combine, each {tuner: name, params: {knobs}}; backbone_mode and head_init "
        "belong to the composition and default to the first part's",
    )

    backbone_mode: BackboneMode = backbone_mode_field("train", "the first part's default (set here, not in a part)")
    head_init: HeadInit = head_init_field("timm", "the first part's default (set here, not in a part)")

    _backbone_ids: frozenset[int] = PrivateAttr(default_factory=frozenset)
    _built: tuple[Tuner, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _common_knobs_default_to_the_first_parts(cls, data: Any) -> Any:
        if not isinstance(data, dict) or all(k in data for k in COMMON_KNOBS):
            return data
        parts = data.get("parts", DEFAULT_PARTS)
        first = parts[0] if isinstance(parts, list | tuple) and parts else None
        name = first.tuner if isinstance(first, Part) else first.get("tuner") if isinstance(first, dict) else None
        first_cls = part_class(name) if isinstance(name, str) else None
        if first_cls is None:
            return data  # the part's own validation reports it
        return {**{k: first_cls.model_fields[k].default for k in COMMON_KNOBS}, **data}

    @model_validator(mode="after")
    def _parts_fit_together(self) -> Compose:
        problem = conflicts([p.tuner_class() for p in self.parts])
        if problem is not None:
            raise knob_error(type(self).__name__, ("parts",), problem, {"parts": [p.tuner for p in self.parts]})
        return self

    def part_tuners(self) -> list[Tuner]:
        """The parts as tuners, in the listed order."""
        return [p.build() for p in self.parts]

    def method(self) -> str:
        return "+".join(t.method() for t in self.part_tuners())

    def knob_name(self) -> str | None:
        for tuner in self.part_tuners():
            name = tuner.knob_name()
            if name is not None:
                return f"{tuner.name}.{name}"
        return None

    def knob_value(self) -> float | None:
        for tuner in self.part_tuners():
            if tuner.knob_name() is not None:
                return tuner.knob_value()
        return None

    def dropout_rates(self) -> tuple[float, ...]:
        return tuple(rate for tuner in self.part_tuners() for rate in tuner.dropout_rates())

    def validate_on(self, model: nn.Module) -> None:
        for tuner in self._built or self.part_tuners():
            tuner.validate_on(model)

    def attach(self, model: nn.Module) -> nn.Module:
        tuners = self.part_tuners()
        self._backbone_ids = frozenset(id(p) for p in model.parameters())
        self._built = tuple(tuners)
        root = model
        for index in attach_order([type(t) for t in tuners]):
            attached = tuners[index].attach(model)
            if attached is not model:  # a side network's new root (validation allows one, with nothing else)
                root = attached
        return root

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Every part's choice of existing parameters (the heads, BitFit's biases, ...), each once. A part that
        looks for parameters by structure (BitFit: every `bias`) may find another part's new ones; those train
        already and are left out here."""
        chosen: dict[int, nn.Parameter] = {}
        for tuner in self._built or self.part_tuners():
            for param in tuner.trainable_backbone_parameters(model):
                if not self._backbone_ids or id(param) in self._backbone_ids:
                    chosen.setdefault(id(param), param)
        return list(chosen.values())
