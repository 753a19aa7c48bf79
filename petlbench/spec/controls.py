"""The controlled variables: every RunSpec field by the role it plays, in one list.

Three readers depend on it, so they can never disagree:
- the run_id hashes every field except the `execution` ones (they change no number);
- a report never draws two rows in one figure, and a budget ratio never pairs two rows, unless they agree on every
  `condition` (device, precision, backbone, data, optimizer implementation, measurement protocol, ...), plus the
  conditions only a run can observe (the GPU, the attention kernel that ran);
- ratio pairs must also agree on the `axis` fields (batch size, seed), which a figure spreads over panels or averages.

`method` fields are what a figure compares; `recipe` fields are a method's own training hyperparameters (learning
rate, weight decay, epochs): part of the run, but two methods tuned differently still share a figure.
"""

from __future__ import annotations

import functools
import typing
from typing import Final, Literal, TypeAlias

from pydantic import BaseModel

from petlbench.tuners.base import LEGACY_BACKBONE_MODE, LEGACY_HEAD_INIT

Role: TypeAlias = Literal["execution", "method", "recipe", "axis", "condition"]

# Sections of RunSpec whose fields default to one role (a dotted field below overrides it).
_SECTION_ROLES: Final[dict[str, Role]] = {
    "backbone": "condition",
    "data": "condition",
    "optimizer": "condition",
    "measure": "condition",
    "train": "recipe",
}
_FIELD_ROLES: Final[dict[str, Role]] = {
    "suite": "execution",  # the results folder; rows of two suites are still kept apart (GROUP_COLUMNS)
    "timeout_s": "execution",
    "data_root": "execution",
    "data.num_workers": "execution",
    "tuner": "method",
    "tuner_params": "method",
    "method": "method",
    "knob_name": "method",
    "knob": "method",
    "batch_size": "axis",
    "seed": "axis",
    "device": "condition",
    "precision": "condition",
    "grad_checkpointing": "condition",
    # the optimizer's implementation (name, foreach, fused) changes the peak; its hyperparameters do not
    "optimizer.lr": "recipe",
    "optimizer.weight_decay": "recipe",
    "optimizer.betas": "recipe",
    "optimizer.momentum": "recipe",
}
# Conditions a run observes rather than sets: the GPU model, and the attention op that actually ran.
MEASURED_CONDITIONS: Final = ("env.gpu_name", "attn_kernel")
# Fields added after results existed: left out of the run_id while unset, so earlier run_ids stay valid.
UNSET_NOT_HASHED: Final = frozenset(
    {
        "measure.cpu_threads",
        "measure.min_time_s",
        "measure.max_steps",
        "measure.max_dispersion",
        "measure.snapshot",
        "train.batch_sizes",
    }
)


# Tuner knobs added after runs were stored, with the value that computes what runs did before they existed. At
# that value a knob is left out of the run_id, so it moves only the run_ids whose computation it changes.
LEGACY_TUNER_PARAMS: Final[dict[str, object]] = {"backbone_mode": LEGACY_BACKBONE_MODE, "head_init": LEGACY_HEAD_INIT}


def _models(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (unions, Annotated and Optional unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin is not None and origin is not list:
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def spec_fields(spec_cls: type[BaseModel]) -> list[str]:
    """Every RunSpec field as a result column name: top-level names and `section.field` for nested models."""
    out: list[str] = []
    for name, info in spec_cls.model_fields.items():
        if name not in _SECTION_ROLES:
            out.append(name)
            continue
        for model in _models(info.annotation):
            out.extend(f"{name}.{sub}" for sub in model.model_fields if f"{name}.{sub}" not in out)
    return out


def field_annotation(spec_cls: type[BaseModel], field: str) -> object:
    """The type annotation of a RunSpec field (`batch_size`) or of a section's field (`backbone.img_size`; the first
    member of a union section that has it)."""
    name, _, sub = field.partition(".")
    info = spec_cls.model_fields[name]
    if not sub:
        return info.annotation
    for model in _models(info.annotation):
        if sub in model.model_fields:
            return model.model_fields[sub].annotation
    raise KeyError(f"{field}: no such RunSpec field")


def role(field: str) -> Role:
    """The role of a RunSpec field (`batch_size`, `optimizer.foreach`, ...); KeyError for an unknown one."""
    if field in _FIELD_ROLES:
        return _FIELD_ROLES[field]
    section = field.partition(".")[0]
    if "." in field and section in _SECTION_ROLES:
        return _SECTION_ROLES[section]
    raise KeyError(f"{field}: not a RunSpec field with a role; classify it in petlbench/spec/controls.py")


@functools.cache  # a class's fields are fixed once it is built; run_id asks for every run of a sweep
def fields_with(spec_cls: type[BaseModel], wanted: Role) -> tuple[str, ...]:
    return tuple(f for f in spec_fields(spec_cls) if role(f) == wanted)


def group_columns(spec_cls: type[BaseModel]) -> tuple[str, ...]:
    """Rows differing in any of these never share a figure: the suite and every condition."""
    return ("suite", *fields_with(spec_cls, "condition"), *MEASURED_CONDITIONS)


def pair_columns(spec_cls: type[BaseModel]) -> tuple[str, ...]:
    """A budget ratio pairs rows equal in all of these: the group columns and the axes (batch size, seed)."""
    return (*group_columns(spec_cls), *fields_with(spec_cls, "axis"))


def run_id_exclusions(spec: BaseModel) -> dict[str, bool | set[str]]:
    """The `exclude=` argument of `model_dump` that leaves the execution-only (and unset late) fields out."""
    exclude: dict[str, bool | set[str]] = {}
    for field in fields_with(type(spec), "execution"):
        section, _, sub = field.partition(".")
        if sub:
            nested = exclude.setdefault(section, set())
            if isinstance(nested, set):
                nested.add(sub)
        else:
            exclude[section] = True
    params = getattr(spec, "tuner_params", {})
    legacy = {k for k, v in LEGACY_TUNER_PARAMS.items() if params.get(k, object()) == v}
    if legacy:
        exclude["tuner_params"] = legacy
    for field in UNSET_NOT_HASHED:
        section, _, sub = field.partition(".")
        holder = getattr(spec, section)
        if holder is not None and getattr(holder, sub) is None:
            nested = exclude.setdefault(section, set())
            if isinstance(nested, set):
                nested.add(sub)
    return exclude
