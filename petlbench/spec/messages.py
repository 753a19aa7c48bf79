"""Pydantic validation errors as the one-line messages users read: `file: tuners[2].grid.rank: ..., got -4`."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from petlbench.fmt import did_you_mean

# Union members that did not apply ('should be a list' when a mapping was given, and the reverse).
_MEMBER_NOISE = frozenset({"list_type", "model_type", "model_attributes_type"})


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per pydantic error: 'file: loc.path: message, got value'.

    Fields typed `X | list[X]` make pydantic report one error per union member; the 'should be a list' (or
    'should be a mapping') one is noise when the other member explains the problem, so it is dropped.
    """
    entries: list[tuple[str, str, str]] = []  # (loc, error type, line)
    for err in exc.errors():
        loc = _format_loc(err["loc"], model, prefix)
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(model, err["loc"][:-1])
            hint = f"{did_you_mean(str(err['loc'][-1]), valid) or ';'} valid keys: {', '.join(valid)}" if valid else ""
            entries.append((loc, kind, f"{source}: {loc}: unknown key{hint}"))
            continue
        if kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            field = f"{loc}.{ctx.get('discriminator', '').strip(chr(39))}"
            line = f"{source}: {field}: unknown value {ctx.get('tag')!r}; valid: {ctx.get('expected_tags')}"
            entries.append((loc, kind, line))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        show_got = kind != "missing" and not isinstance(got, dict | list)
        entries.append((loc, kind, f"{source}: {loc}: {msg}" + (f", got {shown(got)}" if show_got else "")))
    explained = [loc for loc, kind, _ in entries if kind not in _MEMBER_NOISE]
    lines = []
    for loc, kind, line in entries:
        deeper = (loc + ".", loc + "[")
        if kind in _MEMBER_NOISE and any(other == loc or other.startswith(deeper) for other in explained):
            continue
        if line not in lines:
            lines.append(line)
    return lines


def shown(value: Any, limit: int = 80) -> str:
    """A user's value in a message: its repr, cut to `limit` characters (a generated file can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text):,} chars)"


def _format_loc(loc: tuple[int | str, ...], model: type[BaseModel], prefix: str) -> str:
    out = prefix
    tags = _union_tags(model, loc)
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i in tags:
            continue  # pydantic puts the union member (model name, tag, 'list[...]') in the loc; users never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _union_tags(model: type[BaseModel], loc: tuple[int | str, ...]) -> set[int]:
    """Indices in `loc` that name a union member rather than a field."""
    skip: set[int] = set()
    current: Any = model
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        current = _strip_none(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return skip
            current = _strip_none(field.annotation)
            continue
        if len(_flatten_annotation(current)) > 1:  # a union: this part names the member pydantic tried
            member = _union_member(current, part)
            if member is None:  # errors raised by a model validator come without the member: `part` is a field
                member = _member_with_field(current, part)
                if member is not None:
                    current = _strip_none(member.model_fields[part].annotation)
                    continue
            skip.add(i)
            current = member
            continue
        return skip
    return skip


def _strip_none(annotation: Any) -> Any:
    """`X | None` → X: pydantic validates optional fields without naming a union member in the error loc."""
    members = [m for m in _flatten_annotation(annotation) if m is not type(None)]
    return members[0] if len(members) == 1 and len(_flatten_annotation(annotation)) == 2 else annotation


def _union_member(annotation: Any, part: str) -> Any:
    for arg in _flatten_annotation(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            tag = arg.model_fields.get("name")
            if arg.__name__ == part or (tag is not None and part in typing.get_args(tag.annotation)):
                return arg
        elif part.startswith("list[") and typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


def _member_with_field(annotation: Any, part: str) -> type[BaseModel] | None:
    for arg in _flatten_annotation(annotation):
        members = [arg, *typing.get_args(arg)] if typing.get_origin(arg) is list else [arg]
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel) and part in member.model_fields:
                return member
    return None


def _flatten_annotation(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flatten_annotation(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flatten_annotation(arg)]
    return [annotation]


def _valid_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model that `loc` points into (for 'unknown key' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _strip_none(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _strip_none(current.model_fields[part].annotation)
        else:
            member = _union_member(current, part)
            if member is None:
                return []
            current = member
    members = _flatten_annotation(current)
    members += [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    return sorted(models[0].model_fields) if models else []
