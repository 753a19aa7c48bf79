"""The base of every model parsed from a user's file: frozen, and strict about unknown keys (a typo fails).

Also strict about numbers, because a value that validates but cannot run fails every run of a sweep:
- `inf`/`nan` are refused in every float field (`allow_inf_nan=False`): JSON has no spelling for them, so the spec
  a worker receives would carry `null` and the worker would reject its own run;
- a boolean is refused where a number goes (`rank: true` is not rank 1), while `yes`/`true` stay valid for bool
  fields. Ints are still accepted for floats (`lr: 1`).
The checks live here so they cover every suite, budget and tuner model (tuners subclass StrictModel).
"""

from __future__ import annotations

import functools
import math
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        # A model-level check (a field validator on "*" is not allowed on union discriminators such as data.name);
        # the errors carry the field's loc, so messages name `tuners[0].params.rank` like any other error.
        if not isinstance(data, dict):
            return data
        errors: list[InitErrorDetails] = []
        numeric, numeric_items = _numeric_fields(cls)
        for name, value in data.items():
            if not isinstance(name, str) or name not in cls.model_fields:
                continue
            errors.extend(_non_finite((name,), value))
            if isinstance(value, bool) and name in numeric:
                errors.append(_bool_error((name,), value))
            elif isinstance(value, list | tuple) and name in numeric_items:
                errors.extend(_bool_error((name, i), v) for i, v in enumerate(value) if isinstance(v, bool))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


@functools.cache  # per model class: validation runs for every run of a sweep
def _numeric_fields(cls: type[BaseModel]) -> tuple[frozenset[str], frozenset[str]]:
    """Fields that take a number but no bool, and fields whose sequence items do."""
    fields = cls.model_fields.items()
    numeric = frozenset(name for name, f in fields if _numeric_only(f.annotation))
    items = frozenset(name for name, f in fields if _numeric_only(_item_type(f.annotation)))
    return numeric, items


def _non_finite(loc: tuple[str | int, ...], value: Any, depth: int = 0) -> list[InitErrorDetails]:
    """inf/nan anywhere in a field's value, free-form dicts (backbone.kwargs, tuner params) included."""
    if isinstance(value, float) and not math.isfinite(value):
        error = PydanticCustomError("finite_number", "must be a finite number (inf and nan cannot be run)")
        return [InitErrorDetails(type=error, loc=loc, input=value)]
    if depth > 8:
        return []
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _non_finite((*loc, str(k)), v, depth + 1)]
    if isinstance(value, list | tuple):
        return [e for i, v in enumerate(value) for e in _non_finite((*loc, i), v, depth + 1)]
    return []


def _bool_error(loc: tuple[str | int, ...], value: bool) -> InitErrorDetails:
    error = PydanticCustomError("bool_for_number", "must be a number, not a boolean (true/false)")
    return InitErrorDetails(type=error, loc=loc, input=value)


def _members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _numeric_only(annotation: Any) -> bool:
    """Whether a field takes numbers (int or float) and no bool, so a bool there is a mistake."""
    members = _members(annotation)
    return any(m in (int, float) for m in members) and bool not in members and Any not in members


def _item_type(annotation: Any) -> Any:
    """`int | list[int]` → int; `tuple[float, float]` → float: the element type of a field's sequence member."""
    items: list[Any] = []
    for member in _members(annotation):
        if typing.get_origin(member) in (list, tuple):
            items.extend(a for a in typing.get_args(member) if a is not Ellipsis)
    return typing.Union[tuple(items)] if items else None  # noqa: UP007 (a runtime-built union)
