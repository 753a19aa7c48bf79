"""GPU presets, the FITS rule and headroom, the cuBLAS workspace sizes, and the estimator's CUDA rows on a tiny ViT:
a training estimate holds two cuBLAS workspaces (forward and autograd threads) and an inference one one."""

from __future__ import annotations

import pytest

from petlbench.errors import ConfigError
from petlbench.estimate.client import judged_bytes, targets_for
from petlbench.estimate.cuda_estimate import fits_card, search_fit
from petlbench.estimate.gpus import (
    CUSTOM,
    DEFAULT_PRESET,
    PRESETS,
    default_target,
    parse_headroom,
    preset,
    required_bytes,
    target_for,
)
from petlbench.estimate.workspaces import cublas_workspace_bytes, cublaslt_extra_bytes
from petlbench.results import Metrics

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

REQUIRED_PRESETS = ("h100-80gb", "h200", "a100-40gb", "a100-80gb", "l40s", "a10g", "l4", "rtx-4090", "rtx-3090", "t4")


def test_every_required_card_has_a_preset_with_a_capability_memory_and_context() -> None:
    for key in (*REQUIRED_PRESETS, "v100-16gb", "v100-32gb"):
        card = PRESETS[key]
        assert card.capability[0] in (7, 8, 9) and card.memory_bytes > 10 * GiB
        assert 256 * MiB <= card.context_bytes <= 2 * GiB
    assert PRESETS["h100-80gb"].memory_mib == 81559  # nvidia-smi on this project's H100 machine
    assert preset("H100").key == "h100-80gb" and preset(" rtx-4090 ").key == "rtx-4090"
    with pytest.raises(ConfigError, match=r"unknown GPU .h800.*known: h100-80gb"):
        preset("h800")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((9, 0), 32 * MiB),
        ((10, 0), 32 * MiB),
        ((12, 0), 32 * MiB),
        ((8, 0), 8 * MiB + 128 * KiB),
        ((7, 5), 8 * MiB + 128 * KiB),
    ],
)
def test_the_cublas_workspace_follows_the_pinned_torchs_rule(capability: tuple[int, int], expected: int) -> None:
    assert cublas_workspace_bytes(capability, {}) == expected


def test_cublas_workspace_config_overrides_and_cublaslt_shares_the_workspace_by_default() -> None:
    assert cublas_workspace_bytes((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == 32 * MiB
    assert cublas_workspace_bytes((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * KiB  # deterministic setting
    assert cublas_workspace_bytes((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}) == 8 * MiB + 128 * KiB
    assert (
        cublas_workspace_bytes((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "nonsense"}) == 32 * MiB
    )  # torch keeps its default
    assert cublaslt_extra_bytes((9, 0), {}) == 0  # unified with cuBLAS's
    assert cublaslt_extra_bytes((9, 0), {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}) == MiB
    separate = {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0", "CUBLASLT_WORKSPACE_SIZE": "4096"}
    assert cublaslt_extra_bytes((9, 0), separate) == 4 * MiB


def test_headroom_is_a_share_of_the_card_or_a_size_never_a_bare_number() -> None:
    assert parse_headroom("2%", 100 * GiB) == 2 * GiB
    assert parse_headroom("1.5GiB", 80 * GiB) == int(1.5 * GiB)
    assert parse_headroom("0", 80 * GiB) == 0
    for bad in ("512", "100%", "lots"):
        with pytest.raises(ConfigError, match="--headroom"):
            parse_headroom(bad, 80 * GiB)


def test_fits_means_reserved_plus_context_plus_headroom_within_the_card() -> None:
    card = target_for(preset("a100-40gb"), None, "1GiB")
    room = card.memory_bytes - card.context_bytes - 1 * GiB  # type: ignore[operator]
    assert card.allowance == room
    assert fits_card(room, card) is True and fits_card(room + 1, card) is False
    assert required_bytes(room, card) == card.memory_bytes
    # a row is judged by what it needs of the card, not by max_memory_allocated
    row = Metrics(peak_allocated_bytes=room - GiB, peak_reserved_bytes=room + 1, context_bytes=card.context_bytes)
    row.headroom_bytes = card.headroom_bytes
    assert judged_bytes(row) == card.memory_bytes + 1
    assert judged_bytes(Metrics(peak_allocated_bytes=5)) == 5  # CPU rows: the peak
    # a per-process memory fraction caps the allocator further
    capped = target_for(
        preset("a100-40gb"), None, "0", env={"PYTORCH_CUDA_ALLOC_CONF": "per_process_memory_fraction:0.5"}
    )
    assert fits_card(capped.memory_bytes // 2 + 1, capped) is False  # type: ignore[operator]


def test_targets_come_from_presets_or_sizes_and_refuse_both() -> None:
    cards = targets_for("cuda", "h100-80gb,t4", None, [])
    assert [t.gpu for t in cards] == ["h100-80gb", "t4"] and cards[1].capability == (7, 5)
    assert cards[0].headroom_bytes == pytest.approx(0.02 * cards[0].memory_bytes, abs=1)  # type: ignore[operator]
    custom = targets_for("cuda", None, "24GiB", [])
    assert custom[0].gpu == CUSTOM and custom[0].memory_bytes == 24 * GiB and custom[0].label == "24 GiB"
    assert targets_for("cuda", None, None, []) == []  # no card named, none visible: no verdict
    with pytest.raises(ConfigError, match="give one"):
        targets_for("cuda", "t4", "16GiB", [])
    with pytest.raises(ConfigError, match="--gpu"):
        targets_for("cpu", "t4", None, [])
    assert default_target().gpu == DEFAULT_PRESET and default_target().memory_bytes is None


def test_the_fit_search_finds_the_largest_batch_from_a_seed_on_the_known_points() -> None:
    probed: list[int] = []

    def needs(batch: int) -> tuple[int | None, int | None, int | None]:
        probed.append(batch)
        reserved = 100 * MiB + batch * 10 * MiB
        return reserved + 50 * MiB, reserved, reserved - MiB

    found = search_fit(needs, 1000 * MiB, "card", known=[16, 32])
    assert found.max_batch == 85 and found.first_over == 86  # 150 MiB + 85 x 10 MiB = 1000 MiB
    assert found.reserved_bytes == 950 * MiB and found.required_bytes == 1000 * MiB
    assert len(probed) <= 5  # the two known points, the seed and its neighbour
    assert search_fit(needs, 100 * MiB, "card").max_batch is None
    assert search_fit(needs, 10**15, "card", hi=4096).first_over is None


@pytest.mark.slow
def test_a_cuda_training_estimate_holds_two_workspaces_and_its_inference_one() -> None:
    from petlbench.estimate.engine import estimate_memory
    from tests.test_estimate_many import specs

    run = specs("cuda", batch_size=8, tuners=[{"tuner": "lora"}])[0]
    hopper = estimate_memory(run)  # the default card: an H100, 32 MiB per handle
    assert hopper.gpu_preset == DEFAULT_PRESET
    assert hopper.workspace_bytes == 2 * 32 * MiB and hopper.infer_workspace_bytes == 32 * MiB
    assert hopper.peak_allocated_bytes is not None and hopper.peak_infer_bytes is not None
    # the allocator's peak holds both workspaces beside what the trace counted (less AdamW's 0-dim `step` tensors,
    # which stay on the CPU: one 512-B block per trainable tensor in the trace)
    assert hopper.peak_allocated_bytes - 2 * 32 * MiB >= (hopper.mem_tracked_peak_bytes or 0) - 64 * 512
    assert hopper.peak_infer_bytes >= 32 * MiB
    assert (hopper.peak_reserved_bytes or 0) >= hopper.peak_allocated_bytes
    turing = estimate_memory(run, target_for(preset("t4"), None))
    assert turing.workspace_bytes == 2 * (8 * MiB + 128 * KiB) and turing.infer_workspace_bytes == 8 * MiB + 128 * KiB
    # the tracked breakdown is the trace's own; only the allocator's view depends on the card
    assert turing.mem_tracked_peak_bytes == hopper.mem_tracked_peak_bytes
    assert turing.context_bytes == PRESETS["t4"].context_bytes and turing.alloc_conf == "default"
