"""A deterministic model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp), torch-free.

It answers what `torch.cuda.max_memory_allocated()` and `max_memory_reserved()` report for a sequence of
allocations and frees, without a GPU. The rules, as in the pinned torch's allocator:

- every request is rounded up to a multiple of 512 B (or to a power-of-two division, `roundup_power2_divisions`);
- requests of at most 1 MiB are served from the small pool, larger ones from the large pool;
- a request first takes the smallest cached free block of its pool that is large enough (ties: lowest address);
  in the large pool, a request below `max_split_size` never takes a block of `max_split_size` or more, and a request
  of `max_split_size` or more only takes one less than `max_non_split_rounding` larger than itself;
- without a fitting block, a new segment is reserved: 2 MiB for the small pool, `large_segment_size` (20 MiB) for
  large requests under 10 MiB, else the request rounded up to 2 MiB;
- a block larger than the request is split when the remainder is at least 512 B (small pool) or more than 1 MiB
  (large pool, requests under `max_split_size` only); an unsplit remainder stays part of the allocated block;
- a freed block merges with free neighbours of its segment; segments are never returned, except when a new segment
  does not fit the memory `limit`: then (only with `max_split_size`) enough oversize cached blocks are released,
  then every cached segment that is entirely free, and the reservation is retried once before out-of-memory;
- `allocated` adds whole block sizes (what `allocated_bytes.all` counts), `reserved` adds segment sizes;
  `reset_peak()` sets both peaks to the current values, as `torch.cuda.reset_peak_memory_stats()` does.

With `expandable_segments:True` each pool is one segment that grows by pages (2 MiB small, `large_segment_size`
large) and blocks split whenever 512 B remain. Not modelled: streams other than one, CUDA graphs' private pools,
`garbage_collection_threshold` (it acts only under a per-process memory fraction), the `cudaMallocAsync` backend,
and, for expandable segments, the unmapping of free pages at out-of-memory (an over-limit growth fails at once).
Segment addresses increase in the order segments are reserved (the driver's real addresses are not knowable);
they only break ties between free blocks of equal size.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MiB: Final = 1024 * 1024
K_MIN_BLOCK: Final = 512
K_SMALL_SIZE: Final = 1 * MiB
K_SMALL_BUFFER: Final = 2 * MiB
K_MIN_LARGE_ALLOC: Final = 10 * MiB
K_ROUND_LARGE: Final = 2 * MiB
K_LARGE_BUFFER: Final = 20 * MiB
_INTERVALS: Final = 16  # roundup_power2_divisions: one entry per power of two from 1 MiB up to 64 GiB
_UNLIMITED: Final = 2**63 - 1
_VIRTUAL: Final = 2**48  # address space of an expandable segment (larger than any GPU)

# PYTORCH_CUDA_ALLOC_CONF keys the pinned torch accepts, and what this model does with them
MODELLED_KEYS: Final = frozenset(
    {
        "max_split_size_mb",
        "max_non_split_rounding_mb",
        "roundup_power2_divisions",
        "expandable_segments",
        "large_segment_size_mb",
        "per_process_memory_fraction",
    }
)
NOT_MODELLED_KEYS: Final = frozenset({"garbage_collection_threshold", "backend"})
NO_EFFECT_KEYS: Final = frozenset(  # host (pinned) memory, locking and CUDA-graph options: no device-memory effect
    {
        "release_lock_on_cudamalloc",
        "release_lock_on_hipmalloc",
        "pinned_use_cuda_host_register",
        "pinned_use_hip_host_register",
        "pinned_num_register_threads",
        "pinned_use_background_threads",
        "pinned_reserve_segment_size_mb",
        "pinned_free_catch_all",
        "pinned_max_round_threshold",
        "pinned_max_cached_size",
        "graph_capture_record_stream_reuse",
        "throw_on_cudamalloc_oom",
    }
)


class AllocConfError(ValueError):
    """A PYTORCH_CUDA_ALLOC_CONF value the pinned torch would refuse (the message names the key)."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator settings that change memory accounting; `setting` is the text they were parsed from."""

    max_split_size: int = _UNLIMITED
    max_non_split_rounding: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * _INTERVALS
    expandable_segments: bool = False
    large_segment_size: int = K_LARGE_BUFFER
    per_process_memory_fraction: float = 1.0
    setting: str = ""
    not_modelled: tuple[str, ...] = ()  # keys given whose effect this model leaves out

    def describe(self) -> str:
        """One line for a result row: the setting as given, or the default."""
        return self.setting or "default"


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Parse a PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF value the way the pinned torch's tokenizer does
    (`key:value` pairs split by commas, lists in brackets, whitespace ignored). Raises AllocConfError."""
    if text is None or not text.strip():
        return AllocatorConfig()
    tokens = _tokenize(text)
    values: dict[str, object] = {}
    not_modelled: list[str] = []
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if i + 2 >= len(tokens) or tokens[i + 1] != ":":
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: expected `key:value` at {key!r}")
        if tokens[i + 2] == "[":
            if "]" not in tokens[i + 2 :]:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: unclosed '['")
            end = tokens.index("]", i + 2)
            value: object = [t for t in tokens[i + 3 : end] if t != ","]
            i = end + 1
        else:
            value = tokens[i + 2]
            i += 3
        if i < len(tokens):
            if tokens[i] != ",":
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: expected ',' after {key}")
            i += 1
        if key in MODELLED_KEYS:
            values[key] = value
        elif key in NOT_MODELLED_KEYS:
            not_modelled.append(f"{key}:{value}")
        elif key not in NO_EFFECT_KEYS:
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: unrecognized option {key!r}")
    return _config_from(values, text.strip(), tuple(not_modelled))


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    buffer = ""
    for ch in text:
        if ch in ",:[]":
            if buffer:
                tokens.append(buffer)
                buffer = ""
            tokens.append(ch)
        elif not ch.isspace():
            buffer += ch
    if buffer:
        tokens.append(buffer)
    return tokens


def _int(key: str, value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} expects an integer, got {value!r}") from None


def _bool(key: str, value: object) -> bool:
    if value not in ("True", "False", "true", "false"):
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} expects True or False, got {value!r}")
    return value in ("True", "true")


def _config_from(values: dict[str, object], setting: str, not_modelled: tuple[str, ...]) -> AllocatorConfig:
    kwargs: dict[str, object] = {}
    for key in ("max_split_size_mb", "max_non_split_rounding_mb"):
        if key in values:
            mb = _int(key, values[key])
            if mb < K_LARGE_BUFFER // MiB:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} must be at least {K_LARGE_BUFFER // MiB}")
            kwargs["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding"] = mb * MiB
    if "large_segment_size_mb" in values:
        mb = _int("large_segment_size_mb", values["large_segment_size_mb"])
        if mb <= 0:
            raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: large_segment_size_mb must be positive")
        kwargs["large_segment_size"] = mb * MiB
    if "expandable_segments" in values:
        kwargs["expandable_segments"] = _bool("expandable_segments", values["expandable_segments"])
    if "per_process_memory_fraction" in values:
        try:
            fraction = float(str(values["per_process_memory_fraction"]))
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction <= 1.0:
            raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: per_process_memory_fraction must be in (0, 1]")
        kwargs["per_process_memory_fraction"] = fraction
    if "roundup_power2_divisions" in values:
        kwargs["roundup_power2_divisions"] = _divisions(values["roundup_power2_divisions"])
    split = kwargs.get("max_split_size")
    if isinstance(split, int) and split < int(str(kwargs.get("large_segment_size", K_LARGE_BUFFER))):
        raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: max_split_size_mb must be at least large_segment_size_mb")
    return AllocatorConfig(setting=setting, not_modelled=not_modelled, **kwargs)  # type: ignore[arg-type]


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _divisions(value: object) -> tuple[int, ...]:
    """`roundup_power2_divisions:4` (every interval) or `[64:8,256:4,>:1]` (size in MB : divisions)."""
    key = "roundup_power2_divisions"
    if not isinstance(value, list):
        n = _int(key, value)
        if not _power_of_two(n):
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} must be a power of two, got {n}")
        return (n,) * _INTERVALS
    table = [0] * _INTERVALS
    tokens = [t for t in value if t != ":"]
    if len(tokens) % 2:
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: expected size:divisions pairs")
    first, last = True, -1
    for size_text, div_text in zip(tokens[::2], tokens[1::2], strict=True):
        divisions = _int(key, div_text)
        if divisions and not _power_of_two(divisions):
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: divisions must be powers of two or 0")
        if size_text == ">":  # every interval above the last one named
            table[last + 1 :] = [divisions] * (_INTERVALS - last - 1)
            continue
        size_mb = _int(key, size_text)
        if not _power_of_two(size_mb):
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: interval sizes must be powers of two (MB)")
        index = min(size_mb.bit_length() - 1, _INTERVALS - 1)
        if first:
            table[:index] = [divisions] * index
            first = False
        table[index] = divisions
        last = index
    return tuple(table)


def round_size(nbytes: int, config: AllocatorConfig | None = None) -> int:
    """The block size a request of `nbytes` asks for (the allocator's `round_size`)."""
    if nbytes < K_MIN_BLOCK:
        return K_MIN_BLOCK
    if config is not None:
        divisions = config.roundup_power2_divisions[min(max(nbytes.bit_length() - 1 - 20, 0), _INTERVALS - 1)]
        if divisions > 1 and nbytes > K_MIN_BLOCK * divisions:
            return _roundup_power2_division(nbytes, divisions)
    return (nbytes + K_MIN_BLOCK - 1) // K_MIN_BLOCK * K_MIN_BLOCK


def _roundup_power2_division(size: int, divisions: int) -> int:
    if _power_of_two(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def segment_size(size: int, config: AllocatorConfig | None = None) -> int:
    """The segment reserved for a rounded request that no cached block serves (`get_allocation_size`)."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return config.large_segment_size if config is not None else K_LARGE_BUFFER
    return (size + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE


class OutOfMemory(Exception):
    """A new segment did not fit the limit, even after releasing cached segments (torch's OutOfMemoryError)."""

    def __init__(self, nbytes: int, reserved: int, limit: int) -> None:
        super().__init__(f"out of memory: {nbytes:,} B requested with {reserved:,} B reserved of {limit:,} B")
        self.nbytes, self.reserved, self.limit = nbytes, reserved, limit


class Block:
    """A range of one segment: allocated to a tensor, cached free, or (expandable segments) not mapped yet."""

    __slots__ = ("addr", "allocated", "mapped", "next", "prev", "requested", "size", "small")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.mapped = True
        self.prev: Block | None = None
        self.next: Block | None = None
        self.requested = 0


@dataclass
class AllocatorStats:
    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    segments: int = 0
    alloc_retries: int = 0
    segments_released: int = 0


class CachingAllocator:
    """One device's caching allocator on one stream. `malloc` returns the allocated Block, `free` takes it back.

    `limit`: bytes the allocator may reserve (the device's memory less what lives outside the allocator); None for
    unlimited. A per-process memory fraction in the config caps it further (as a fraction of `device_total`).
    `segment_address(size)`: where a new segment starts (a replay of a recorded history passes the real addresses,
    so ties between equal free blocks break as they did); None, or a None answer: after the previous segment.
    """

    def __init__(
        self,
        config: AllocatorConfig | None = None,
        limit: int | None = None,
        device_total: int | None = None,
        segment_address: Callable[[int], int | None] | None = None,
    ) -> None:
        self.config = config if config is not None else AllocatorConfig()
        cap = _UNLIMITED if limit is None else limit
        if self.config.per_process_memory_fraction < 1.0 and device_total is not None:
            cap = min(cap, int(self.config.per_process_memory_fraction * device_total))
        self.limit = cap
        self.stats = AllocatorStats()
        # free blocks per pool, sorted by (size, address): index 0 large, 1 small
        self._free: tuple[list[tuple[int, int, Block]], list[tuple[int, int, Block]]] = ([], [])
        self._next_addr = 0
        self._tails: list[Block | None] = [None, None]  # expandable segments: the unmapped tail of each pool
        self._heads: dict[int, Block] = {}  # segment base address → its first block
        # the config's hot fields, read once
        self._max_split = self.config.max_split_size
        self._non_split = self.config.max_non_split_rounding
        self._expandable = self.config.expandable_segments
        self._rounds = any(d > 1 for d in self.config.roundup_power2_divisions)
        self._simple_large = self._max_split == _UNLIMITED  # no oversize rule to check in the large pool
        self._segment_address = segment_address

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def allocated(self) -> int:
        return self.stats.allocated

    @property
    def reserved(self) -> int:
        return self.stats.reserved

    def reset_peak(self) -> None:
        """`torch.cuda.reset_peak_memory_stats()`: the peaks restart from the current values."""
        self.stats.peak_allocated = self.stats.allocated
        self.stats.peak_reserved = self.stats.reserved

    def malloc(self, nbytes: int) -> Block:
        """Allocate `nbytes` (raises OutOfMemory when a needed segment does not fit the limit)."""
        if nbytes < K_MIN_BLOCK:
            size = K_MIN_BLOCK
        elif self._rounds:
            size = round_size(nbytes, self.config)
        else:
            size = (nbytes + 511) & ~511
        small = size <= K_SMALL_SIZE
        # the smallest cached block that fits (the common case inlined; _take_free has the whole rule)
        free = self._free[small]
        i = bisect_left(free, (size, -1))
        block: Block | None
        if i < len(free) and (small or self._simple_large) and not self._expandable:
            block = free.pop(i)[2]
        else:
            block = self._take_free(size, small) if i < len(free) else None
        if block is None:
            block = self._new_block(size, small)
        # split off what the request does not need
        remaining = block.size - size
        if small or self._expandable:
            split = remaining >= K_MIN_BLOCK
        else:
            split = size < self._max_split and remaining > K_SMALL_SIZE
        if split:
            rest = Block(block.addr + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            insort(self._free[small], (remaining, rest.addr, rest))
        block.allocated = True
        block.requested = nbytes
        stats = self.stats
        stats.allocated += block.size
        stats.requested += nbytes
        if stats.allocated > stats.peak_allocated:
            stats.peak_allocated = stats.allocated
        return block

    def free(self, block: Block) -> None:
        """Return a block to its pool's cache, merged with its free neighbours."""
        stats = self.stats
        stats.allocated -= block.size
        stats.requested -= block.requested
        block.allocated = False
        free = self._free[block.small]
        prev = block.prev
        if prev is not None and not prev.allocated and prev.mapped:
            del free[bisect_left(free, (prev.size, prev.addr))]
            block.addr = prev.addr
            block.size += prev.size
            block.prev = prev.prev
            if prev.prev is not None:
                prev.prev.next = block
            else:
                self._heads[block.addr] = block
        nxt = block.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            del free[bisect_left(free, (nxt.size, nxt.addr))]
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        insort(free, (block.size, block.addr, block))

    def empty_cache(self) -> None:
        """`torch.cuda.empty_cache()`: release every cached segment that is entirely free."""
        self._release_cached()

    def state(self) -> tuple[int, int, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """What decides every later allocation besides the live blocks: reserved, allocated and the free lists."""
        large, small = self._free
        return (
            self.stats.reserved,
            self.stats.allocated,
            tuple((s, a) for s, a, _ in large),
            tuple((s, a) for s, a, _ in small),
        )

    def segments(self) -> list[list[tuple[int, bool]]]:
        """Every segment as its mapped blocks' (size, allocated), in address order (for tests and reports)."""
        return [[(b.size, b.allocated) for b in _chain(self._heads[a]) if b.mapped] for a in sorted(self._heads)]

    # -- internals ---------------------------------------------------------------------------------------------

    def _take_free(self, size: int, small: bool) -> Block | None:
        free = self._free[small]
        i = bisect_left(free, (size, -1))
        if i == len(free):
            return None
        found = free[i][2]
        if self._expandable:
            # a free block next to the unmapped tail counts as able to grow: any other fitting block goes first
            nxt = found.next
            if nxt is not None and not nxt.mapped and i + 1 < len(free):
                i += 1
                found = free[i][2]
        if not small:
            if size < self._max_split and found.size >= self._max_split:
                return None
            if size >= self._max_split and found.size >= size + self._non_split:
                return None
        del free[i]
        return found

    def _new_block(self, size: int, small: bool) -> Block:
        if self._expandable:
            return self._grow(size, small)
        alloc = segment_size(size, self.config)
        stats = self.stats
        if stats.reserved + alloc > self.limit and not (
            self._release_available(size, small) and stats.reserved + alloc <= self.limit
        ):
            stats.alloc_retries += 1  # release every cached segment and retry, as before torch reports OOM
            self._release_cached()
            if stats.reserved + alloc > self.limit:
                raise OutOfMemory(size, stats.reserved, self.limit)
        addr = self._segment_address(alloc) if self._segment_address is not None else None
        if addr is None:
            addr = self._next_addr
            self._next_addr += (alloc + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE
        block = Block(addr, alloc, small)
        self._heads[block.addr] = block
        stats.reserved += alloc
        stats.segments += 1
        if stats.reserved > stats.peak_reserved:
            stats.peak_reserved = stats.reserved
        return block

    def _grow(self, size: int, small: bool) -> Block:
        """Expandable segments: map pages at the end of the pool's one segment until a block of `size` fits."""
        page = K_SMALL_BUFFER if small else self.config.large_segment_size
        tail = self._tails[small]
        if tail is None:
            tail = Block(self._next_addr, _VIRTUAL, small)
            tail.mapped = False
            self._next_addr += _VIRTUAL
            self._tails[small] = tail
            self._heads[tail.addr] = tail
            self.stats.segments += 1
        candidate = tail.prev
        have = candidate.size if candidate is not None and not candidate.allocated else 0
        need = -(-(size - have) // page) * page
        stats = self.stats
        if stats.reserved + need > self.limit:
            raise OutOfMemory(size, stats.reserved, self.limit)
        mapped = Block(tail.addr, need, small)
        tail.addr += need
        tail.size -= need
        mapped.prev, mapped.next = tail.prev, tail
        if tail.prev is not None:
            tail.prev.next = mapped
        else:
            self._heads[mapped.addr] = mapped
        tail.prev = mapped
        stats.reserved += need
        if stats.reserved > stats.peak_reserved:
            stats.peak_reserved = stats.reserved
        if have:
            assert candidate is not None
            free = self._free[small]
            del free[bisect_left(free, (candidate.size, candidate.addr))]
            candidate.size += need
            candidate.next = tail
            tail.prev = candidate
            return candidate
        return mapped

    def _release_available(self, size: int, small: bool) -> bool:
        """Free oversize cached segments (only with max_split_size): one large enough, else the largest first."""
        if self._max_split == _UNLIMITED:
            return False
        free = self._free[small]
        key = max(size, self._max_split)
        i = bisect_left(free, (key, -1))
        if i < len(free):
            if free[i][2].prev is None and free[i][2].next is None:
                self._release_segment(free, i)
                return True
            return False
        released = 0
        i = len(free) - 1
        while released < key and i >= 0 and free[i][0] >= self._max_split:
            block = free[i][2]
            if block.prev is None and block.next is None:
                released += block.size
                self._release_segment(free, i)
            i -= 1
        return released >= key

    def _release_cached(self) -> None:
        for free in self._free:
            for i in range(len(free) - 1, -1, -1):
                block = free[i][2]
                if block.prev is None and block.next is None:
                    self._release_segment(free, i)

    def _release_segment(self, free: list[tuple[int, int, Block]], i: int) -> None:
        block = free.pop(i)[2]
        del self._heads[block.addr]
        self.stats.reserved -= block.size
        self.stats.segments -= 1
        self.stats.segments_released += 1


def _chain(head: Block) -> list[Block]:
    out = []
    block: Block | None = head
    while block is not None:
        out.append(block)
        block = block.next
    return out
