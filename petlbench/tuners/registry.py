"""The tuner implementations (torch side). One name per tuner; `petlbench.tuners` holds their configs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from petlbench.errors import ConfigError
from petlbench.tuners import TunerConfig, plugin_modules, tuner_configs, unknown_tuner_message
from petlbench.tuners.base import Tuner
from petlbench.tuners.fact import Fact
from petlbench.tuners.full import Full
from petlbench.tuners.linear import Linear
from petlbench.tuners.lora import Lora
from petlbench.tuners.sqt import Sqt
from petlbench.tuners.vpt import Vpt

AnyTuner = type[Tuner[Any]]


def _build(tuners: Iterable[AnyTuner]) -> Mapping[str, AnyTuner]:
    registry: dict[str, AnyTuner] = {}
    for tuner in tuners:
        name = tuner.config_cls.name
        if name in registry:
            raise ConfigError(f"tuner name {name!r} is registered twice")
        registry[name] = tuner
    return MappingProxyType(registry)


TUNERS: Final = _build([Full, Linear, Lora, Vpt, Fact, Sqt])


def tuner_classes() -> Mapping[str, AnyTuner]:
    """Built-in tuners plus those of PETLBENCH_PLUGINS modules."""
    plugins = plugin_modules()
    if not plugins:
        return TUNERS
    return _build([*TUNERS.values(), *(t for m in plugins for t in m.TUNERS)])


def make_tuner(name: str, params: Mapping[str, Any]) -> Tuner[TunerConfig]:
    """Instantiate a tuner from its registry name and (already validated) knobs."""
    classes = tuner_classes()
    cls = classes.get(name)
    if cls is None:
        raise ConfigError(f"tuner: {unknown_tuner_message(name, classes)}")
    config_cls = tuner_configs()[name]
    return cls(config_cls.model_validate(dict(params)))
