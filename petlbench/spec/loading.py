"""Reading suite files: safe YAML (unique keys), one validation of the whole suite, one-line errors."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from petlbench.errors import ConfigError
from petlbench.spec.expand import expand
from petlbench.spec.messages import format_validation_error
from petlbench.spec.models import Suite

# Limits on what a suite or budgets file may be (docs/errors.md): far above any real file, low enough that a
# generated or hostile one fails in a second with one line instead of a RecursionError or a hang.
MAX_FILE_BYTES: Final = 10 * 1024**2
MAX_DEPTH: Final = 50  # nested mappings/sequences
MAX_VALUES: Final = 100_000  # scalars and collections after aliases are expanded (a YAML alias bomb expands 10^9)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (a silent last-one-wins is a typo magnet) and nesting deeper
    than MAX_DEPTH (PyYAML composes recursively: a 500-deep file would end in a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels; flatten the file", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # `? [a, b]: 1` (a set would raise a bare TypeError)
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, "found unhashable key; keys must be plain words", mark)
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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: {size:,} bytes, larger than the {MAX_FILE_BYTES // 1024**2} MB a suite or budgets file may "
                "be; split it into several files"
            )
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    try:
        data = yaml.load(text.removeprefix("\ufeff"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:
            problem += "; indent with spaces, not tabs"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(
            f"{path}: cannot parse YAML: character {char} at position {exc.position} is not allowed in "
            "YAML text; remove it (binary data, or a file that is not text)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: empty file; write the suite's fields (name, data, tuners, ...)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields, got a {_yaml_kind(data)}")
    values = _count_values(data, MAX_VALUES)
    if values > MAX_VALUES:
        raise ConfigError(
            f"{path}: more than {MAX_VALUES:,} values once YAML aliases are expanded; write the values out or "
            "use fewer aliases"
        )
    return data


def _yaml_kind(data: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(data), type(data).__name__
    )


def _count_values(data: object, cap: int) -> int:
    """Values in `data` counted as a validator walks them (an alias counts each time it is used), stopping past
    `cap` (so an alias bomb costs `cap` steps, not 10^9)."""
    count, stack = 0, [data]
    while stack and count <= cap:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_suite(path: str | Path, expand_check: bool = True) -> Suite:
    """Parse and validate a suite file (tuner knobs included). Raises ConfigError with one line per problem.

    `expand_check=False` is for callers that expand the suite themselves right after (the knobs are validated
    there), so a large suite is not expanded twice.
    """
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    suite = parse_suite(raw, source=str(path))
    if expand_check:  # validate every tuner and knob now, so `validate` and `run` fail before any work starts
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
