"""Human units for tables and plots (storage stays in bytes and seconds), and the one parser of memory sizes."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any


def missing(value: Any) -> bool:
    """None or NaN: 'not measured'."""
    return value is None or (isinstance(value, float) and math.isnan(value))


_missing = missing


def first_line(text: Any, limit: int = 160) -> str:
    """The first non-empty line of a message or exception, at most `limit` characters ('' for nothing).

    Safe for message-less exceptions (`MemoryError()`), None and NaN cells.
    """
    if missing(text):
        return ""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'num_queries'?" for the closest choice to a typo, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def shown_path(path: Any) -> str:
    """A path in a message, on one line: bytes the filesystem encoding could not decode shown as UTF-8 where they
    are ('é' under LC_ALL=C), else as '\\xe9'; control characters escaped (a newline as '\\n')."""
    text = str(path)
    if text.isprintable():
        return text
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """'RuntimeError: first line of its message' (just the class name when it has no message)."""
    message = first_line(exc, limit)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def fmt_bytes(value: float | None, digits: int = 1) -> str:
    """1536 → '1.5 KiB'; binary units, as GPU memory is sold and reported."""
    if _missing(value):
        return "-"
    assert value is not None
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.{digits}f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_params(value: float | None) -> str:
    """85875556 → '85.88M'."""
    if _missing(value):
        return "-"
    assert value is not None
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def fmt_rate(value: float | None, unit: str = "img/s") -> str:
    if _missing(value):
        return "-"
    assert value is not None
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def fmt_seconds(value: float | None) -> str:
    """The one duration format: '553 ms', '4.21 s', '54.3 s', '2 min 12 s', '1 h 05 min' (three significant digits
    below a minute, whole units above)."""
    if _missing(value):
        return "-"
    assert value is not None
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 59.95:
        return f"{value:.3g} s"
    whole = round(value)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(value / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


UNSTABLE_NOTE = "~: timing unstable (step times spread over 10% of their median): not a speed to compare"


def noisy(text: str, unstable: Any) -> str:
    """A throughput or step time marked '~' when its timing was flagged unstable (`timing_unstable`)."""
    return f"~{text}" if text != "-" and not missing(unstable) and bool(unstable) else text


def fmt_pct(value: float | None) -> str:
    if _missing(value):
        return "-"
    assert value is not None
    return f"{100 * value:.1f}%"


def fmt_knob(name: str | None, value: float | None) -> str:
    if name is None or _missing(value):
        return "-"
    assert value is not None
    shown = str(int(value)) if float(value).is_integer() else f"{value:g}"
    return f"{name}={shown}"


_BYTE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
BYTES_HINT = "write it with a unit: 80GiB, 24GB, 512MiB or 512M (K/M/G/T alone are binary), 1000B"
_BYTES_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def parse_bytes(value: Any) -> int:
    """A memory size as bytes, the same forms everywhere (budgets, --memory-limit, --device-memory):
    '80GiB' → 85899345920; '2 GB' → 2·10^9; '512M' → 512 MiB; '1.5GiB'; '1000B'. A string needs a unit ('80' is
    refused: bytes or GiB?); a number (a YAML int in a `*_bytes` budget field) is bytes.

    Fractions are rounded up. Raises ValueError (with the accepted forms) for anything else, including sizes
    ≤ 0, booleans and non-finite numbers.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}; {BYTES_HINT}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"not a memory size: {value!r}; {BYTES_HINT}")
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _BYTES_RE.fullmatch(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
        if not unit:  # '80' could mean bytes or GiB: never guessed
            raise ValueError(f"memory size {value!r} has no unit; {BYTES_HINT}")
    else:
        raise ValueError(f"not a memory size: {value!r}; {BYTES_HINT}")
    if unit and unit not in _BYTE_UNITS:
        raise ValueError(f"not a memory size: {value!r} (unknown unit {unit!r}); {BYTES_HINT}")
    size = math.ceil(number * (_BYTE_UNITS[unit] if unit else 1))
    if size <= 0:
        raise ValueError(f"memory size must be > 0, got {value!r}")
    return size
