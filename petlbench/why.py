"""The "why" of a run's peak: live bytes over one training step, and which modules produced what is live at the peak.

Torch-free (numpy only): the worker and the estimator summarise the tracker's event log
(petlbench.measure.tracker) with `summarize_step`; `petlbench report` and `petlbench explain` read the stored
summaries back with `load_why`.

- **Timeline**: live bytes by category after every event of the tracked step, from the `forward` phase marker
  on, downsampled to at most `points` samples. Each bucket of events keeps its largest total, so the stored
  series' maximum is the tracked peak to the byte; phase boundaries and the peak event are always kept. The x
  axis is the event index (allocations and frees in program order), not wall-clock time.
- **Attribution**: every storage live at the peak, grouped by (module, category). The module is the innermost
  one running when the storage was allocated: in forward the module whose forward made it, in backward the
  module whose backward was running (its gradient temporaries and the gradients of its inputs). Storages no
  module made (weights, optimizer state and the batch, registered before the step; the loss; optimizer-step
  temporaries) have module "". The entries sum to the peak exactly.

Stored as `results/<suite>/timelines/<run_id>.npz` (a few tens of kB) next to the run's row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import numpy as np

CATEGORIES: Final = ("weights", "gradients", "optimizer", "activations")
PHASE_NAMES: Final = ("forward", "backward", "optimizer")
TIMELINE_DIR: Final = "timelines"
SNAPSHOT_DIR: Final = "snapshots"
NO_MODULE: Final = ""
DEFAULT_POINTS: Final = 2000
# event kinds, as in petlbench.measure.tracker (kept here so readers need no torch)
_ALLOC, _FREE, _RETAG, _RESET, _PHASE = 0, 1, 2, 3, 4

# sublayers of a ViT block, in heat-strip order, with the group each belongs to
SUBLAYERS: Final = ("qkv", "attn", "proj", "fc1", "act", "fc2", "norm", "other")
SUBLAYER_GROUP: Final = {
    "qkv": "attention",
    "attn": "attention",
    "proj": "attention",
    "fc1": "MLP",
    "act": "MLP",
    "fc2": "MLP",
    "norm": "norm",
    "other": "other",
}
_BLOCK = re.compile(r"^(?:.*\.)?blocks\.(\d+)(?:\.(.*))?$")


class WhyEntry(BaseModel):
    """Bytes live at the peak that one module produced, in one category."""

    model_config = ConfigDict(extra="forbid")

    module: str  # "" = no module
    category: str
    bytes: int
    tensors: int


class WhyData(BaseModel):
    """One run's tracked step, summarised: the downsampled timeline and the attribution at its peak."""

    model_config = ConfigDict(extra="forbid")

    round_to: int
    events: int  # events in the step (the x axis runs 0 … events-1)
    x: list[int]  # sampled event indices
    live: dict[str, list[int]]  # category → live bytes at each sampled event
    phases: list[tuple[str, int]]  # (phase, event index where it starts)
    peak_bytes: int
    peak_event: int
    entries: list[WhyEntry]  # every (module, category) live at the peak, largest first

    @property
    def peak_phase(self) -> str:
        phase = self.phases[0][0] if self.phases else "forward"
        for name, start in self.phases:
            if start <= self.peak_event:
                phase = name
        return phase

    @property
    def peak_fraction(self) -> float:
        """Where the peak falls in the step, 0 (start of forward) … 1 (end of the optimizer step)."""
        return self.peak_event / max(self.events - 1, 1)

    def totals(self) -> list[int]:
        return [sum(values) for values in zip(*(self.live[c] for c in CATEGORIES), strict=True)]


def summarize_step(
    events: Sequence[tuple[int, int, str, int]],
    owners: Sequence[int],
    modules: Sequence[str],
    round_to: int = 1,
    points: int = DEFAULT_POINTS,
) -> WhyData:
    """The timeline and peak attribution of a tracker log (see the module docstring)."""
    import numpy as np

    def size_of(nbytes: int) -> int:
        return (nbytes + round_to - 1) // round_to * round_to if round_to > 1 else nbytes

    start = next((i for i, e in enumerate(events) if e[0] == _PHASE and e[1] == 0), 0)
    column = {c: i for i, c in enumerate(CATEGORIES)}
    live = [0, 0, 0, 0]
    sizes: dict[int, tuple[int, int]] = {}  # key → (rounded bytes, category column)
    for kind, key, category, nbytes in events[:start]:  # what is live when the step starts
        _apply(kind, key, column[category], nbytes, sizes, live, size_of)
    step = events[start:]
    n = len(step)
    series = np.zeros((4, n), dtype=np.int64)
    phases: list[tuple[str, int]] = []
    for i, (kind, key, category, nbytes) in enumerate(step):
        if kind == _PHASE:
            phases.append((PHASE_NAMES[key], i))
        _apply(kind, key, column[category], nbytes, sizes, live, size_of)
        series[:, i] = live
    total = series.sum(axis=0)
    peak_event = int(np.argmax(total)) if n else 0
    peak = int(total[peak_event]) if n else sum(live)

    keep = {0, n - 1, peak_event, *(i for _, i in phases)} if n else set()
    bucket = max(1, -(-n // points))
    for lo in range(0, n, bucket):
        keep.add(lo + int(np.argmax(total[lo : lo + bucket])))
    x = sorted(k for k in keep if 0 <= k < n)

    entries = _attribute(events[: start + peak_event + 1], owners, modules, size_of)
    return WhyData(
        round_to=round_to,
        events=n,
        x=x,
        live={c: [int(v) for v in series[column[c], x]] for c in CATEGORIES},
        phases=phases,
        peak_bytes=peak,
        peak_event=peak_event,
        entries=entries,
    )


def _apply(
    kind: int,
    key: int,
    col: int,
    nbytes: int,
    sizes: dict[int, tuple[int, int]],
    live: list[int],
    size_of: object,
) -> None:
    if kind == _ALLOC:
        size = size_of(nbytes)  # type: ignore[operator]
        sizes[key] = (size, col)
        live[col] += size
    elif kind == _FREE:
        size, old = sizes.pop(key)
        live[old] -= size
    elif kind == _RETAG:
        size, old = sizes[key]
        live[old] -= size
        live[col] += size
        sizes[key] = (size, col)


def _attribute(
    events: Sequence[tuple[int, int, str, int]], owners: Sequence[int], modules: Sequence[str], size_of: object
) -> list[WhyEntry]:
    """Every storage live after the last of `events`, grouped by (owner module, category), largest first."""
    live: dict[int, tuple[int, str]] = {}
    for kind, key, category, nbytes in events:
        if kind == _ALLOC:
            live[key] = (size_of(nbytes), category)  # type: ignore[operator]
        elif kind == _FREE:
            live.pop(key, None)
        elif kind == _RETAG and key in live:
            live[key] = (live[key][0], category)
    groups: dict[tuple[str, str], list[int]] = {}
    for key, (size, category) in live.items():
        module = modules[owners[key]] if key < len(owners) else NO_MODULE
        acc = groups.setdefault((module, category), [0, 0])
        acc[0] += size
        acc[1] += 1
    entries = [WhyEntry(module=m, category=c, bytes=b, tensors=t) for (m, c), (b, t) in groups.items()]
    return sorted(entries, key=lambda e: (-e.bytes, e.module, e.category))


# ---------------------------------------------------------------------------------------------------------------
# Grouping


def sublayer(module: str) -> tuple[int, str] | None:
    """(block index, sublayer) of a module path inside a ViT block (`blocks.7.mlp.fc1.base` → (7, "fc1")); None
    outside the blocks. Tuner modules inside a sublayer count as that sublayer (a LoRA wrapper of `attn.qkv` is
    qkv); anything else in a block (layer scale, drop path, adapters) is "other"."""
    match = _BLOCK.match(module)
    if match is None:
        return None
    block, parts = int(match.group(1)), (match.group(2) or "").split(".")
    # a tuner's block wrapper may put the timm block one level down (`blocks.7.base.attn`)
    at = next((i for i, p in enumerate(parts) if p in ("attn", "mlp") or p.startswith("norm")), None)
    if at is None:
        return block, "other"
    head, sub = parts[at], parts[at + 1] if at + 1 < len(parts) else ""
    if head == "attn":
        return block, sub if sub in ("qkv", "proj") else "attn"
    if head == "mlp":
        return block, sub if sub in ("fc1", "act", "fc2") else "other"
    return block, "norm"


def pattern(module: str) -> str:
    """The module path with its block index starred: `blocks.7.mlp.fc1` → `blocks.*.mlp.fc1`."""
    return re.sub(r"(^|\.)blocks\.\d+(?=\.|$)", r"\1blocks.*", module)


_SUBLAYER_PATH: Final = {
    "qkv": "attn.qkv",
    "attn": "attn",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "act": "mlp.act",
    "fc2": "mlp.fc2",
    "other": "other",
}


def sublayer_pattern(module: str) -> str:
    """`pattern`, with a tuner's wrappers folded into the timm sublayer they wrap, so two methods line up:
    `blocks.7.mlp.fc1.base` and `blocks.3.mlp.fc1` → `blocks.*.mlp.fc1`; `blocks.2.base.norm2` → `blocks.*.norm2`.
    """
    match = _BLOCK.match(module)
    where = sublayer(module)
    if match is None or where is None:
        return pattern(module)
    prefix = module[: match.start(1)] + "*"
    name = where[1]
    if name == "norm":
        norm = next(p for p in (match.group(2) or "").split(".") if p.startswith("norm"))
        return f"{prefix}.{norm}"
    return f"{prefix}.{_SUBLAYER_PATH[name]}"


# what a sublayer's output is to the next one: a frozen layer's saved input shows under its producer
_INPUT_OF: Final = {"norm1": "attn.qkv", "mlp.act": "mlp.fc2", "norm2": "mlp.fc1"}


def module_label(module: str) -> str:
    """The module path, with the layer it feeds when that is what keeps it (`blocks.*.mlp.act (fc2 input)`)."""
    if not module:
        return "(no module: weights, optimizer state, batch, loss)"
    for tail, consumer in _INPUT_OF.items():
        if module.endswith("." + tail):
            return f"{module} (= {consumer.rpartition('.')[2]} input)"
    return module


def parents(module: str, depth: int) -> str:
    """The module path cut to `depth` levels below its block (`blocks.7.mlp.fc1`, 1 → `blocks.7.mlp`)."""
    match = _BLOCK.match(module)
    if match is None:
        return module
    head = module[: match.start(2)] if match.group(2) else module
    rest = (match.group(2) or "").split(".")
    return (head + ".".join(rest[:depth])).rstrip(".") if depth else head.rstrip(".")


@dataclass(frozen=True)
class Grouped:
    name: str
    bytes: int
    by_category: dict[str, int]


def group_entries(entries: Iterable[WhyEntry], key: object, categories: Iterable[str] | None = None) -> list[Grouped]:
    """Entries summed by `key(module)` (e.g. `pattern`, `lambda m: parents(m, 1)`), largest first."""
    wanted = set(categories) if categories is not None else None
    groups: dict[str, dict[str, int]] = {}
    for entry in entries:
        if wanted is not None and entry.category not in wanted:
            continue
        name = key(entry.module)  # type: ignore[operator]
        by = groups.setdefault(name, {})
        by[entry.category] = by.get(entry.category, 0) + entry.bytes
    out = [Grouped(n, sum(by.values()), by) for n, by in groups.items()]
    return sorted(out, key=lambda g: (-g.bytes, g.name))


def heat_strip(entries: Iterable[WhyEntry], categories: Iterable[str] = ("activations",)) -> np.ndarray:
    """Bytes live at the peak per block × sublayer (`SUBLAYERS` order): shape [blocks, len(SUBLAYERS)]."""
    import numpy as np

    wanted = set(categories)
    cells: dict[tuple[int, str], int] = {}
    for entry in entries:
        where = sublayer(entry.module)
        if where is None or entry.category not in wanted:
            continue
        cells[where] = cells.get(where, 0) + entry.bytes
    blocks = 1 + max((b for b, _ in cells), default=-1)
    strip = np.zeros((blocks, len(SUBLAYERS)), dtype=np.int64)
    for (block, name), value in cells.items():
        strip[block, SUBLAYERS.index(name)] = value
    return strip


# ---------------------------------------------------------------------------------------------------------------
# Files


def why_path(suite_folder: Path, run_id: str) -> Path:
    return suite_folder / TIMELINE_DIR / f"{run_id}.npz"


def save_why(path: Path, why: WhyData) -> Path:
    """Write one run's summary atomically (compressed npz: arrays plus a few scalars; no pickles), never through a
    symlink (petlbench.system.safeio)."""
    import numpy as np

    from petlbench.system.safeio import atomic_writer, subfolder

    subfolder(path.parent.parent, path.parent.name)
    with atomic_writer(path) as handle:
        np.savez_compressed(
            handle,
            meta=np.array([why.round_to, why.events, why.peak_bytes, why.peak_event], dtype=np.int64),
            x=np.array(why.x, dtype=np.int64),
            live=np.array([why.live[c] for c in CATEGORIES], dtype=np.int64).reshape(len(CATEGORIES), len(why.x)),
            phase_names=np.array([p for p, _ in why.phases], dtype=str),
            phase_events=np.array([i for _, i in why.phases], dtype=np.int64),
            entry_module=np.array([e.module for e in why.entries], dtype=str),
            entry_category=np.array([e.category for e in why.entries], dtype=str),
            entry_bytes=np.array([e.bytes for e in why.entries], dtype=np.int64),
            entry_tensors=np.array([e.tensors for e in why.entries], dtype=np.int64),
        )
    return path


# A stored timeline is a few tens of kB; these bound what a damaged or hostile file can make a reader do.
MAX_WHY_FILE_BYTES: Final = 64 * 1024**2  # the .npz on disk
MAX_WHY_ARRAY_BYTES: Final = 256 * 1024**2  # all its arrays, decompressed (a zip bomb stops here, unread)
# key → (dtype kind: i integer, U text; number of dimensions)
_WHY_ARRAYS: Final = {
    "meta": ("i", 1),
    "x": ("i", 1),
    "live": ("i", 2),
    "phase_names": ("U", 1),
    "phase_events": ("i", 1),
    "entry_module": ("U", 1),
    "entry_category": ("U", 1),
    "entry_bytes": ("i", 1),
    "entry_tensors": ("i", 1),
}


class WhyFileError(ValueError):
    """A timeline file that is not one petlbench wrote (the message says what is wrong with it)."""


def _why_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a timeline file, each checked before it is read: a regular file of bounded size, a zip of the
    expected .npy members, no object (pickled) arrays, declared shapes that match the bytes stored, and at most
    MAX_WHY_ARRAY_BYTES decompressed."""
    import io
    import stat
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise WhyFileError("not a regular file")
    if info.st_size > MAX_WHY_FILE_BYTES:
        raise WhyFileError(f"{info.st_size:,} bytes, more than a timeline's {MAX_WHY_FILE_BYTES:,}")
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        members = {m.filename: m for m in archive.infolist()}
        total = sum(m.file_size for m in members.values())
        if total > MAX_WHY_ARRAY_BYTES:
            raise WhyFileError(f"inflates to {total:,} bytes, more than a timeline's {MAX_WHY_ARRAY_BYTES:,}")
        for key, (kind, ndim) in _WHY_ARRAYS.items():
            member = members.get(f"{key}.npy")
            if member is None:
                raise WhyFileError(f"no {key!r} array")
            # zipfile stops at the declared size, so a member never inflates past what was summed above
            data = archive.read(member)
            stream = io.BytesIO(data)
            version = npy.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = npy.read_array_header_2_0(stream)
            else:
                raise WhyFileError(f"array {key!r} in .npy format {version}, which petlbench does not write")
            if dtype.hasobject or dtype.kind != kind or len(shape) != ndim:
                raise WhyFileError(f"array {key!r} holds {dtype}{list(shape)}, not what petlbench writes")
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data) - stream.tell():
                raise WhyFileError(f"array {key!r} is cut short or padded")
            stream.seek(0)
            arrays[key] = npy.read_array(stream, allow_pickle=False)
    return arrays


def load_why(path: Path) -> WhyData:
    """A stored timeline; a ResultsError (one line, naming the file) for anything petlbench did not write: not a
    file, too large, truncated, random bytes, a missing or mistyped array, lengths that disagree, a pickle."""
    from petlbench.errors import ResultsError
    from petlbench.fmt import describe_exception, shown_path

    try:
        data = _why_arrays(path)
        meta, x, live = data["meta"], data["x"], data["live"]
        phases, entries = len(data["phase_names"]), len(data["entry_module"])
        if meta.shape != (4,):
            raise WhyFileError(f"meta holds {meta.shape[0]} values, not 4")
        if live.shape != (len(CATEGORIES), len(x)):
            raise WhyFileError(f"live is {list(live.shape)}, not {len(CATEGORIES)} categories × {len(x)} samples")
        if len(data["phase_events"]) != phases:
            raise WhyFileError("phase names and phase events differ in length")
        if any(len(data[k]) != entries for k in ("entry_category", "entry_bytes", "entry_tensors")):
            raise WhyFileError("the attribution arrays differ in length")
        round_to, events, peak, peak_event = (int(v) for v in meta)
        return WhyData(
            round_to=round_to,
            events=events,
            x=[int(v) for v in x],
            live={c: [int(v) for v in live[i]] for i, c in enumerate(CATEGORIES)},
            phases=[(str(p), int(i)) for p, i in zip(data["phase_names"], data["phase_events"], strict=True)],
            peak_bytes=peak,
            peak_event=peak_event,
            entries=[
                WhyEntry(module=str(m), category=str(c), bytes=int(b), tensors=int(t))
                for m, c, b, t in zip(
                    data["entry_module"],
                    data["entry_category"],
                    data["entry_bytes"],
                    data["entry_tensors"],
                    strict=True,
                )
            ],
        )
    except Exception as exc:  # zipfile, numpy and pydantic raise many unrelated types for a damaged file
        why = str(exc) if isinstance(exc, WhyFileError) else describe_exception(exc, 120)
        raise ResultsError(
            f"{shown_path(path)}: unreadable timeline ({why}); delete it (the run's row stays) or rerun the run "
            "with --force to record it again"
        ) from None


def find_timelines(paths: Iterable[Path]) -> dict[str, Path]:
    """run_id → stored timeline file under the given results files/folders (estimate folders only when named,
    as `petlbench.results.result_files` reads rows)."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.is_file():
            candidate = why_path(path.parent, path.stem)
            if candidate.exists():
                found[path.stem] = candidate
        elif path.is_dir():
            for file in sorted(path.rglob(f"{TIMELINE_DIR}/*.npz")):
                parts = file.relative_to(path).parts[:-2]
                if file.name.startswith(".") or any(p.endswith(".estimate") for p in parts):
                    continue
                found[file.stem] = file
    return found
