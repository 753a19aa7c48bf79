"""The GPU kit's probe without a GPU: its dry run exercises every step on a tiny ViT, and its trace replay turns a
recorded allocator history (the entries `torch.cuda.memory._snapshot()` returns) back into the measured peaks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "scripts" / "gpu_probe.py")
assert _spec is not None and _spec.loader is not None
gpu_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_probe)
main, replay_trace = gpu_probe.main, gpu_probe.replay_trace

MiB = 1024 * 1024


def test_a_recorded_history_replays_to_its_peaks_from_the_reset_on() -> None:
    # allocate 3 MiB and 30 MiB, free both, reset the peaks, then a 25 MiB allocation: it reuses the cached
    # 30 MiB segment (split: 5 MiB remain), so from the reset on the peak allocated is 25 MiB and nothing new is
    # reserved: the 20 MiB and 30 MiB segments stay
    entries = [
        {"action": "segment_alloc", "addr": 0, "size": 20 * MiB},
        {"action": "alloc", "addr": 0, "size": 3 * MiB},
        {"action": "segment_alloc", "addr": 100 * MiB, "size": 30 * MiB},
        {"action": "alloc", "addr": 100 * MiB, "size": 30 * MiB},
        {"action": "free_requested", "addr": 0, "size": 3 * MiB},
        {"action": "free_completed", "addr": 0, "size": 3 * MiB},
        {"action": "free_completed", "addr": 100 * MiB, "size": 30 * MiB},
        {"action": "alloc", "addr": 100 * MiB, "size": 25 * MiB},
    ]
    replayed = replay_trace(entries, reset_at=7, alloc_conf="")
    assert replayed["peak_allocated"] == 25 * MiB
    assert replayed["peak_reserved"] == 50 * MiB
    assert replayed["segments"] == [20 * MiB, 30 * MiB] and replayed["unknown_frees"] == 0
    assert replayed["segment_mismatches"] == 0  # the model reserved exactly where the recording did
    whole = replay_trace(entries, reset_at=0, alloc_conf="")
    assert whole["peak_allocated"] == 33 * MiB


def test_segments_take_the_recorded_addresses_so_ties_break_as_they_did() -> None:
    # two 16 MiB segments reserved where the recording says (the second below the first), both freed, then reused
    high, low = 900 * MiB, 100 * MiB
    entries = [
        {"action": "segment_alloc", "addr": high, "size": 16 * MiB},
        {"action": "alloc", "addr": high, "size": 15 * MiB},
        {"action": "segment_alloc", "addr": low, "size": 16 * MiB},
        {"action": "alloc", "addr": low, "size": 15 * MiB},
        {"action": "free_completed", "addr": high, "size": 15 * MiB},
        {"action": "free_completed", "addr": low, "size": 15 * MiB},
        {"action": "alloc", "addr": low, "size": 15 * MiB + MiB // 2},
        {"action": "free_completed", "addr": low, "size": 15 * MiB + MiB // 2},
    ]
    replayed = replay_trace(entries, reset_at=0, alloc_conf="")
    assert replayed["segment_mismatches"] == 0 and replayed["unknown_frees"] == 0
    # a recording that reserved a segment the model does not need is counted
    extra = [*entries[:6], {"action": "segment_alloc", "addr": 2000 * MiB, "size": 16 * MiB}, *entries[6:]]
    assert replay_trace(extra, reset_at=0, alloc_conf="")["segment_mismatches"] == 1


def test_the_dry_run_exercises_every_step_and_writes_its_report(tmp_path: Path) -> None:
    code = main(["--device", "cpu", "--out", str(tmp_path), "--tuners", "lora", "--in-process"])
    assert code == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["cublas"]["predicted_per_handle"] == 32 * MiB and report["cublas"]["forward_bytes"] is None
    assert {a["dtype"] for a in report["attention"]} == {"bfloat16", "float32"}
    assert all(a["kernel"] == "cpu_flash" for a in report["attention"])
    (run,) = report["runs"]
    assert run["tuner"] == "lora" and run["entries"] > 100
    assert run["replayed"]["peak_allocated"] > 0 and run["estimate"]["workspace"] > 0
    text = (tmp_path / "probe.md").read_text()
    assert "## Allocator replay of a run's history" in text and "lora fp32 bs=4" in text
