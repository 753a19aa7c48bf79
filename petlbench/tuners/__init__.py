"""The tuner registry: every tuner petlbench knows, by the name suites use. Torch-free to import.

Adding a tuner: one module (or a small package, when it needs layers of its own) holding a `Tuner` subclass,
and one entry in `TUNERS` below. The contract tests pick it up from here.

Tuners can also come from outside the package: set `PETLBENCH_PLUGINS=pkg.module[,other.module]`; each module
exposes `TUNERS: list[type[Tuner]]`, built the same way (torch imported only inside `attach`), so validating a
suite that uses them still imports no torch. The parent and every worker import them.
"""

from __future__ import annotations

import importlib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any, Final, Literal

from petlbench.errors import ConfigError
from petlbench.fmt import describe_exception
from petlbench.tuners.adapter import Adapter
from petlbench.tuners.adaptformer import Adaptformer
from petlbench.tuners.base import Tuner, unknown_tuner_message
from petlbench.tuners.bitfit import Bitfit
from petlbench.tuners.compose import Compose, use_registry
from petlbench.tuners.dtl import Dtl
from petlbench.tuners.fact import Fact
from petlbench.tuners.full import Full
from petlbench.tuners.hf_peft import Peft
from petlbench.tuners.linear import Linear
from petlbench.tuners.lora import Lora
from petlbench.tuners.lst import Lst
from petlbench.tuners.noah import Noah
from petlbench.tuners.sqt import Sqt
from petlbench.tuners.ssf import Ssf
from petlbench.tuners.vpt import Vpt
from petlbench.tuners.vqt import Vqt

__all__ = ["TUNERS", "Tuner", "available_tuners", "describe_tuner", "make_tuner", "unknown_tuner_message"]

PLUGINS_ENV: Final = "PETLBENCH_PLUGINS"


def _build_registry(tuners: Iterable[type[Tuner]]) -> Mapping[str, type[Tuner]]:
    registry: dict[str, type[Tuner]] = {}
    for tuner in tuners:
        if not (isinstance(tuner, type) and issubclass(tuner, Tuner)):
            raise ConfigError(f"{PLUGINS_ENV}: {tuner!r} is not a petlbench Tuner class")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", tuner.name):
            raise ConfigError(f"tuner name {tuner.name!r} must be lower-case letters, digits and '_'")
        if tuner.name in registry:
            raise ConfigError(f"tuner name {tuner.name!r} is registered twice")
        registry[tuner.name] = tuner
    return MappingProxyType(registry)


TUNERS: Final = _build_registry(
    [Full, Linear, Lora, Vpt, Fact, Sqt, Bitfit, Adapter, Adaptformer, Ssf, Vqt, Dtl, Lst, Noah, Peft, Compose]
)


def _import_plugin(name: str) -> ModuleType:
    """Import one module named in PETLBENCH_PLUGINS; whatever goes wrong (an exception, a syntax error, a relative
    name, sys.exit) is one ConfigError line naming the variable and the module."""
    fix = f"fix the module, or remove it from {PLUGINS_ENV}"
    if name.startswith("."):
        raise ConfigError(f"{PLUGINS_ENV}: {name!r} is a relative module name; give the full dotted path")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):  # the plugin itself
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {name!r} ({exc}); fix the module path") from None
        raise ConfigError(f"{PLUGINS_ENV}: importing {name!r} failed: {describe_exception(exc)}; {fix}") from None
    except SyntaxError as exc:
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        raise ConfigError(f"{PLUGINS_ENV}: {name!r} has a syntax error{where}: {exc.msg}; {fix}") from None
    except SystemExit as exc:
        raise ConfigError(f"{PLUGINS_ENV}: importing {name!r} called sys.exit({exc.code!r}); {fix}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin's import may raise anything
        raise ConfigError(f"{PLUGINS_ENV}: importing {name!r} failed: {describe_exception(exc)}; {fix}") from None


def plugin_modules() -> list[ModuleType]:
    """Modules named in PETLBENCH_PLUGINS, imported. Each must expose a `TUNERS` list of Tuner classes."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    modules = []
    for name in names:
        module = _import_plugin(name)
        if not isinstance(getattr(module, "TUNERS", None), list | tuple):
            raise ConfigError(f"{PLUGINS_ENV}: module {name!r} has no TUNERS list of Tuner classes")
        modules.append(module)
    return modules


def available_tuners() -> Mapping[str, type[Tuner]]:
    """Every available tuner: the built-in ones plus those from PETLBENCH_PLUGINS. A plugin tuner may not take a
    name another tuner has (a built-in, or one of another plugin module)."""
    plugins = plugin_modules()
    if not plugins:
        return TUNERS
    owner: dict[str, str] = dict.fromkeys(TUNERS, "petlbench (a built-in tuner)")
    for module in plugins:
        for tuner in module.TUNERS:
            name = getattr(tuner, "name", None)
            if isinstance(name, str) and name in owner:
                raise ConfigError(
                    f"{PLUGINS_ENV}: module {module.__name__!r} registers tuner {name!r}, a name {owner[name]} "
                    "already has; rename the plugin's tuner"
                )
            if isinstance(name, str):
                owner[name] = f"module {module.__name__!r}"
    return _build_registry([*TUNERS.values(), *(t for m in plugins for t in m.TUNERS)])


def make_tuner(name: str, params: Mapping[str, Any]) -> Tuner:
    """A tuner from its registry name and knobs (validated here again: the worker gets them as JSON)."""
    tuners = available_tuners()
    cls = tuners.get(name)
    if cls is None:
        raise ConfigError(f"tuner: {unknown_tuner_message(name, tuners)}")
    return cls.model_validate(dict(params))


use_registry(available_tuners)  # compose validates its parts against the registry; it cannot import it back


def describe_tuner(cls: type[Tuner]) -> list[dict[str, Any]]:
    """One dict per knob (name, type, default, description) for `petlbench tuners`; the common ones last."""
    rows = []
    fields = sorted(cls.model_fields.items(), key=lambda item: item[0] in Tuner.model_fields)
    for field_name, info in fields:
        type_name = _type_name(info.annotation)
        rows.append(
            {
                "name": field_name,
                "type": type_name,
                "default": info.get_default(call_default_factory=True),
                "description": info.description or "",
                "headline": field_name == cls.knob,
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    """'int', 'float | None', 'train | eval' (a Literal's values), 'tuple of q | k | v'."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        return f"{origin.__name__} of {_type_name(items[0])}" if items else origin.__name__
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
