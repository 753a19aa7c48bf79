"""One visual identity per method: colour and marker, the same in every figure and every report.

Matplotlib-free (the report's data side sorts by family with it). Known methods have a fixed entry (family hue,
a shade and a marker per method); a plugin method gets a colour and marker from a hash of its name, so it too
looks the same wherever it appears. Red is never a method colour: it means OOM / device memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class MethodStyle:
    """A method's visual identity: the same colour and marker in every figure of every report."""

    color: str
    marker: str
    family: str


# Family hue, method shade + marker. Fixed so the linear probe is grey in every report, whatever else ran.
METHOD_STYLES: Final = {
    "full": MethodStyle("#222222", "s", "baseline"),
    "linear": MethodStyle("#8c8c8c", "o", "baseline"),
    "bitfit": MethodStyle("#b8b000", "D", "baseline"),
    "lora": MethodStyle("#1f77b4", "o", "reparameterisation"),
    "fact-tt": MethodStyle("#6baed6", "^", "reparameterisation"),
    "fact-tk": MethodStyle("#08306b", "v", "reparameterisation"),
    "vpt-deep": MethodStyle("#ff7f0e", "D", "prompt"),
    "vpt-shallow": MethodStyle("#fdae6b", "d", "prompt"),
    "vqt": MethodStyle("#a63603", "P", "prompt"),
    "adapter": MethodStyle("#2ca02c", "s", "adapter"),
    "adaptformer": MethodStyle("#74c476", "p", "adapter"),
    "ssf": MethodStyle("#00441b", "h", "adapter"),
    "sqt": MethodStyle("#9467bd", "*", "side network"),
    "lst": MethodStyle("#c5b0d5", "<", "side network"),
    "dtl": MethodStyle("#54278f", ">", "side network"),
}
FAMILY_ORDER: Final = ("baseline", "reparameterisation", "prompt", "adapter", "side network", "peft", "other")
# Unknown (plugin) methods: a colour and marker picked by a hash of the name, stable across runs and machines.
_HASH_COLORS: Final = ("#e377c2", "#8c564b", "#17becf", "#7b4173", "#637939", "#8c6d31", "#393b79", "#ad494a")
_HASH_MARKERS: Final = ("o", "s", "^", "D", "v", "P", "h", "p", "<", ">")


def method_style(method: str) -> MethodStyle:
    """The colour and marker of `method` (e.g. 'vpt-deep'): a fixed table, else a hash of the name."""
    known = METHOD_STYLES.get(method)
    if known is not None:
        return known
    digest = int.from_bytes(hashlib.sha256(method.encode()).digest()[:4], "big")
    family = "peft" if method.startswith("peft-") else "other"
    colors = ("#e377c2", "#f7b6d2", "#c51b8a", "#7a0177") if family == "peft" else _HASH_COLORS
    return MethodStyle(colors[digest % len(colors)], _HASH_MARKERS[(digest // 7) % len(_HASH_MARKERS)], family)


def method_sort_key(method: str) -> tuple[int, int, str]:
    """Family first, then the table's order within the family, then the name: never alphabetical by accident."""
    style = method_style(method)
    table = list(METHOD_STYLES)
    return (FAMILY_ORDER.index(style.family), table.index(method) if method in table else len(table), method)
