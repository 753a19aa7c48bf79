"""Reading suite files: safe YAML (unique keys), one validation of the whole suite, one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from petlbench.errors import ConfigError
from petlbench.spec.expand import expand
from petlbench.spec.messages import format_validation_error
from petlbench.spec.models import Suite


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (a silent last-one-wins is a typo magnet)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a one-line ConfigError naming the file (and line)."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file; check the path (suites live in suites/*.yaml)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of suite fields, got {type(data).__name__}")
    return data


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file (tuner knobs included). Raises ConfigError with one line per problem."""
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    suite = parse_suite(raw, source=str(path))
    # Validate every tuner and knob now, so `validate` and `run` fail before any work starts.
    expand(suite, device="cpu")
    return suite


def parse_suite(raw: Mapping[str, Any], source: str = "<suite>") -> Suite:
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, source, Suite))) from None
    suite._source = source
    if suite.auto_batch is not None and not suite.auto_batch_size:
        raise ConfigError(
            f"{source}: auto_batch: only used with batch_size: auto, got batch_size {suite.batch_size!r}; "
            "remove auto_batch or set batch_size: auto"
        )
    return suite
