"""Human units for tables and plots (storage stays in bytes and seconds)."""

from __future__ import annotations

import math
import re


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_bytes(value: float | None) -> str:
    """1536 → '1.5 KiB'; binary units, as GPU memory is sold and reported."""
    if _missing(value):
        return "-"
    assert value is not None
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
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
    if _missing(value):
        return "-"
    assert value is not None
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 60 else f"{value / 60:.1f} min"


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
    "": 1,
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


def parse_bytes(text: str) -> int:
    """'80GiB' → 85899345920; '2 GB' → 2·10^9; '512M' → 512 MiB (K/M/G/T alone are binary); '1000' → bytes.

    Raises ValueError with the accepted forms for anything else.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"not a memory size: {text!r}; write e.g. 80GiB, 16GB, 512MiB or a byte count")
    value = float(match.group(1)) * _BYTE_UNITS[unit or ""]
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}")
    return int(value)
