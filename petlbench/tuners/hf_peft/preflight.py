"""The parent's side of the peft pre-flight check: torch-free; the checking runs in a child process.

`import peft` imports torch and transformers, which the parent never does, so a suite's peft entries go as JSON to
`python -m petlbench.tuners.hf_peft.check`, which validates them with peft's config classes and injects them into
the backbone on the meta device. Each problem comes back as one line naming the suite field
(`tuners[1].params.config.r`, `tuners[1].grid.r`, `tuners[1].params.peft_type`). Suites without `tuner: peft`
start no child.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from petlbench.data.specs import task_key
from petlbench.errors import ConfigError
from petlbench.spec.models import Suite, TunerEntry, as_list
from petlbench.tuners.hf_peft import Peft

CHECK_MODULE: Final = "petlbench.tuners.hf_peft.check"
CHECK_TIMEOUT_S: Final = 600.0  # importing torch, timm and peft on a busy 2-core machine takes a while


@dataclass(frozen=True)
class _Item:
    entry: int  # position in suite.tuners
    task: str
    payload: dict[str, Any]


def _grid_points(grid: Mapping[str, list[Any]]) -> Iterator[dict[str, Any]]:
    for values in itertools.product(*grid.values()):
        yield dict(zip(grid, values, strict=True))


def _items(suite: Suite, data_root: str | None) -> list[_Item]:
    """One item per distinct (entry, backbone, knobs): what expansion makes of each peft entry, without the
    precision/batch/seed axes, which do not change what peft is given."""
    items: list[_Item] = []
    seen: set[str] = set()
    for position, entry in enumerate(suite.tuners):
        if entry.tuner != Peft.name:
            continue
        for data in suite.datasets():
            task = task_key(data)
            for point in _grid_points(entry.grid):
                params = {**entry.params, **entry.task_params.get(task, {}), **point}
                knobs = Peft.model_validate(params).model_dump(mode="json")  # expansion validated these already
                for backbone in as_list(suite.backbone):
                    payload = {
                        "params": knobs,
                        "backbone": backbone.model_dump(mode="json"),
                        "data": data.model_dump(mode="json"),
                        "data_root": data_root,
                    }
                    key = json.dumps([position, payload["backbone"], knobs], sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        items.append(_Item(position, task, payload))
    return items


def _location(entry: TunerEntry, task: str, field: str | None) -> str:
    """Where the user wrote `field` in the entry: grid, task_params, beside peft_type, or in params.config."""
    if field is None:
        return "params.config"
    if field == "tuner":
        return "tuner"
    if field in entry.grid:
        return f"grid.{field}"
    if field in entry.task_params.get(task, {}):
        return f"task_params.{task}.{field}"
    if field in entry.params and field != "config":
        return f"params.{field}"
    return f"params.config.{field}"


def check_peft(suite: Suite, data_root: str | None = None) -> None:
    """Validate every peft entry of the suite with peft itself; raise one ConfigError line per problem."""
    items = _items(suite, data_root)
    if not items:
        return
    request = json.dumps({"items": [item.payload for item in items]})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", CHECK_MODULE],
            input=request,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{suite.source}: tuners: the peft check did not finish in {CHECK_TIMEOUT_S:.0f} s") from None
    try:
        errors = json.loads(proc.stdout)["errors"]
    except (ValueError, KeyError, TypeError):
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ConfigError(f"{suite.source}: tuners: the peft check failed: {last}") from None
    lines: list[str] = []
    for error in errors:
        item = items[error["item"]]
        where = f"tuners[{item.entry}].{_location(suite.tuners[item.entry], item.task, error['field'])}"
        line = f"{suite.source}: {where}: {error['message']}"
        if line not in lines:
            lines.append(line)
    if lines:
        raise ConfigError("\n".join(lines))
