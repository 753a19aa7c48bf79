"""The caching-allocator model against hand-worked traces: rounding, pools, segment sizes, the split rules, best-fit
reuse, merging, reserved growth, peak resets, release-and-retry at a limit, and the PYTORCH_CUDA_ALLOC_CONF options.
Every expected number below is worked out from the rules in c10/cuda/CUDACachingAllocator.cpp, not read off the
model."""

from __future__ import annotations

import pytest

from petlbench.estimate.allocator import (
    AllocConfError,
    CachingAllocator,
    OutOfMemory,
    parse_alloc_conf,
    round_size,
    segment_size,
)

KiB = 1024
MiB = 1024 * KiB


def test_small_requests_round_to_512_bytes_and_share_a_2_mib_segment() -> None:
    a = CachingAllocator()
    a.malloc(1)
    a.malloc(1000)
    a.malloc(512)
    assert a.allocated == 512 + 1024 + 512
    assert a.reserved == 2 * MiB  # one small segment
    assert a.segments() == [[(512, True), (1024, True), (512, True), (2 * MiB - 2048, False)]]


def test_one_mib_is_the_largest_small_request() -> None:
    a = CachingAllocator()
    a.malloc(MiB)  # small pool: a 2 MiB segment, split (1 MiB remains)
    assert a.reserved == 2 * MiB and a.allocated == MiB
    a.malloc(MiB + 1)  # large pool: rounded to 1 MiB + 512, a 20 MiB segment, split (more than 1 MiB remains)
    assert a.reserved == 22 * MiB and a.allocated == 2 * MiB + 512
    assert [len(s) for s in a.segments()] == [2, 2]


@pytest.mark.parametrize(
    ("request_bytes", "segment"),
    [
        (MiB + 1, 20 * MiB),  # 1-10 MiB: a 20 MiB segment
        (10 * MiB - 512, 20 * MiB),
        (10 * MiB - 1, 10 * MiB),  # rounds up to 10 MiB first
        (10 * MiB, 10 * MiB),  # from 10 MiB: the request rounded up to 2 MiB
        (10 * MiB + 1, 12 * MiB),
        (33 * MiB, 34 * MiB),
    ],
)
def test_segment_sizes(request_bytes: int, segment: int) -> None:
    assert segment_size(round_size(request_bytes)) == segment
    a = CachingAllocator()
    a.malloc(request_bytes)
    assert a.reserved == segment


def test_a_large_block_splits_only_when_more_than_1_mib_would_remain() -> None:
    a = CachingAllocator()
    # 11 MiB → a 12 MiB segment; exactly 1 MiB would remain: not split, the whole block counts as allocated
    a.malloc(11 * MiB)
    assert a.allocated == 12 * MiB and a.segments() == [[(12 * MiB, True)]]
    # 11 MiB - 512 → a 12 MiB segment; 1 MiB + 512 would remain: split
    b = CachingAllocator()
    b.malloc(11 * MiB - 512)
    assert b.allocated == 11 * MiB - 512 and b.segments() == [[(11 * MiB - 512, True), (MiB + 512, False)]]


def test_a_small_block_splits_when_512_bytes_remain() -> None:
    s = CachingAllocator()
    first = s.malloc(MiB)
    s.malloc(MiB - 512)  # from the 1 MiB remainder: 512 B remain, split
    assert s.segments() == [[(MiB, True), (MiB - 512, True), (512, False)]]
    s.free(first)
    s.malloc(MiB - 256)  # rounds up to 1 MiB: takes the freed block exactly
    assert s.allocated == 2 * MiB - 512 and s.reserved == 2 * MiB


def test_best_fit_reuses_the_smallest_free_block_and_counts_its_unsplit_remainder() -> None:
    a = CachingAllocator()
    blocks = [a.malloc(n * MiB) for n in (3, 2, 4, 2)]  # one 20 MiB segment: 3, 2, 4, 2, then 9 free
    a.free(blocks[0])
    a.free(blocks[2])
    assert a.segments() == [[(3 * MiB, False), (2 * MiB, True), (4 * MiB, False), (2 * MiB, True), (9 * MiB, False)]]
    a.malloc(int(3.5 * MiB))  # smallest free block that fits: the 4 MiB one; 0.5 MiB remainder stays with it
    assert a.allocated == 2 * MiB + 2 * MiB + 4 * MiB
    a.malloc(int(2.5 * MiB))  # the 3 MiB block
    assert a.allocated == 2 * MiB + 2 * MiB + 4 * MiB + 3 * MiB
    assert a.reserved == 20 * MiB  # no new segment


def test_equal_free_blocks_go_lowest_address_first() -> None:
    a = CachingAllocator()
    first = a.malloc(15 * MiB)  # a 16 MiB segment, taken whole (1 MiB remainder: not split)
    second = a.malloc(15 * MiB)  # a second one
    a.free(first)
    a.free(second)  # two free 16 MiB blocks
    a.malloc(15 * MiB + MiB // 2)  # takes the first segment's
    assert a.segments() == [[(16 * MiB, True)], [(16 * MiB, False)]]


def test_given_segment_addresses_decide_the_ties() -> None:
    addresses = iter([900 * MiB, 100 * MiB])  # the second segment lies below the first
    a = CachingAllocator(segment_address=lambda size: next(addresses))
    first, second = a.malloc(15 * MiB), a.malloc(15 * MiB)
    a.free(first)
    a.free(second)
    a.malloc(15 * MiB + MiB // 2)  # equal free blocks: the lower address wins, the second segment
    assert a.segments() == [[(16 * MiB, True)], [(16 * MiB, False)]]  # in address order


def test_freed_neighbours_merge_back_into_one_block() -> None:
    a = CachingAllocator()
    x, y, z = a.malloc(4 * MiB), a.malloc(4 * MiB), a.malloc(4 * MiB)
    a.free(x)
    a.free(z)  # merges with the 8 MiB tail: 12 MiB
    assert a.segments() == [[(4 * MiB, False), (4 * MiB, True), (12 * MiB, False)]]
    a.free(y)  # merges with both neighbours: the whole segment is one free block again
    assert a.segments() == [[(20 * MiB, False)]]
    a.malloc(19 * MiB)  # and serves a request that needs it whole
    assert a.reserved == 20 * MiB


def test_reserved_grows_by_segments_and_peaks_reset_like_reset_peak_memory_stats() -> None:
    a = CachingAllocator()
    x = a.malloc(30 * MiB)
    a.free(x)
    assert (a.allocated, a.reserved) == (0, 30 * MiB)  # the segment stays cached
    assert (a.stats.peak_allocated, a.stats.peak_reserved) == (30 * MiB, 30 * MiB)
    a.reset_peak()
    assert (a.stats.peak_allocated, a.stats.peak_reserved) == (0, 30 * MiB)
    a.malloc(25 * MiB)  # reuses the cached segment (5 MiB remain: split): no growth
    assert (a.stats.peak_allocated, a.stats.peak_reserved) == (25 * MiB, 30 * MiB)
    a.malloc(10 * MiB)  # the 5 MiB remainder is too small: a new 10 MiB segment
    assert a.stats.peak_reserved == 40 * MiB


def test_at_the_limit_cached_segments_are_released_and_the_reservation_retried() -> None:
    a = CachingAllocator(limit=40 * MiB)
    cached = a.malloc(12 * MiB)
    a.free(cached)
    a.malloc(30 * MiB)  # 12 + 30 > 40: the free 12 MiB segment is released, then 30 MiB fits
    assert a.reserved == 30 * MiB and a.stats.alloc_retries == 1
    b = CachingAllocator(limit=40 * MiB)
    b.malloc(12 * MiB)  # live: nothing to release
    with pytest.raises(OutOfMemory):
        b.malloc(30 * MiB)


def test_max_split_size_keeps_oversize_blocks_whole_and_away_from_small_requests() -> None:
    a = CachingAllocator(parse_alloc_conf("max_split_size_mb:32"))
    big = a.malloc(40 * MiB)  # a 40 MiB segment; not split (the request is at least max_split_size)
    a.free(big)
    a.malloc(16 * MiB)  # below max_split_size: may not take the oversize cached block → its own segment
    assert a.reserved == 56 * MiB
    a.malloc(35 * MiB)  # at least max_split_size and within 20 MiB of the cached 40 MiB block: takes it whole
    assert a.reserved == 56 * MiB and a.allocated == 16 * MiB + 40 * MiB


def test_roundup_power2_divisions_round_requests_up_to_a_division() -> None:
    config = parse_alloc_conf("roundup_power2_divisions:4")
    assert round_size(int(1.2 * MiB), config) == int(1.25 * MiB)  # 1-2 MiB in four steps of 256 KiB
    assert round_size(5 * MiB, config) == 5 * MiB  # on a division already
    assert round_size(5 * MiB + 1, config) == 6 * MiB
    assert round_size(1000, config) == 1024  # small sizes keep 512-B rounding
    table = parse_alloc_conf("roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]").roundup_power2_divisions
    assert table[:6] == (8,) * 6 and table[6:12] == (8, 2, 4, 2, 4, 1) and set(table[12:]) == {1}


def test_expandable_segments_grow_one_segment_by_pages() -> None:
    plain = CachingAllocator()
    plain.malloc(3 * MiB)
    plain.malloc(30 * MiB)
    assert plain.reserved == 20 * MiB + 30 * MiB
    grown = CachingAllocator(parse_alloc_conf("expandable_segments:True"))
    grown.malloc(3 * MiB)  # maps one 20 MiB page
    assert grown.reserved == 20 * MiB
    grown.malloc(30 * MiB)  # extends the free 17 MiB tail by one more page: 40 MiB in all
    assert grown.reserved == 40 * MiB and grown.segments() == [[(3 * MiB, True), (30 * MiB, True), (7 * MiB, False)]]


def test_alloc_conf_is_parsed_like_torch_and_what_is_not_modelled_is_named() -> None:
    config = parse_alloc_conf(" max_split_size_mb:128, garbage_collection_threshold:0.6,expandable_segments:False ")
    assert config.max_split_size == 128 * MiB and config.expandable_segments is False
    assert config.not_modelled == ("garbage_collection_threshold:0.6",)
    assert parse_alloc_conf("release_lock_on_cudamalloc:True").describe() == "release_lock_on_cudamalloc:True"
    assert parse_alloc_conf(None).describe() == "default"
    for bad in ("max_split_size_mb:10", "foo:1", "max_split_size_mb", "roundup_power2_divisions:3", "x:[1"):
        with pytest.raises(AllocConfError):
            parse_alloc_conf(bad)
