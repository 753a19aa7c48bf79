"""Hand-built result rows for report and budget tests (no torch, no runs): the columns `RunResult.to_row` writes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pandas as pd

MiB = 1024**2
GiB = 1024**3
_ids = itertools.count()


def row(
    tuner: str,
    batch: int,
    *,
    knob: float | None = None,
    knob_name: str | None = None,
    status: str = "ok",
    peak: float | None = None,
    params: int = 1000,
    ips: float | None = 100.0,
    acc: float | None = None,
    precision: str = "fp32",
    device: str = "cuda",
    suite: str = "mem",
    error: str | None = None,
    gpu_memory: float | None = 80 * GiB,
    run_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row; memory categories are derived from `peak` so they add up."""
    if knob is not None and knob_name is None:
        knob_name = "rank"
    ok = status == "ok"
    peak = peak if ok else None
    weights = 0.3 * peak if peak else None
    record: dict[str, Any] = {
        "run_id": run_id or f"{suite}-{tuner}-{knob}-{batch}-{precision}-{device}-{next(_ids)}",
        "schema_version": 1,
        "suite": suite,
        "status": status,
        "error": error if error is not None else (None if ok else f"{status}: boom\nsecond line"),
        "created_at": "2026-01-01T00:00:00+00:00",
        "tuner": tuner,
        "knob_name": knob_name,
        "knob": knob,
        "device": device,
        "batch_size": batch,
        "precision": precision,
        "grad_checkpointing": False,
        "seed": 0,
        "dataset": "synthetic",
        "backbone.model": "vit_base_patch16_224",
        "backbone.img_size": 224,
        "backbone.kwargs": "{}",
        "backbone.fused_attn": True,
        "memory_source": "cuda_allocator" if device == "cuda" else "cpu_tracker",
        "params_trainable": params,
        "peak_allocated_bytes": peak,
        "mem_tracked_peak_bytes": peak,
        "mem_weights_bytes": weights,
        "mem_grads_bytes": 0.1 * peak if peak else None,
        "mem_optimizer_bytes": 0.2 * peak if peak else None,
        "mem_activations_bytes": 0.4 * peak if peak else None,
        "train_images_per_s": ips if ok else None,
        "acc_top1": acc if ok else None,
        "acc_top1_best": (acc + 0.01 if acc is not None else None) if ok else None,
        "attn_kernel": ("flash" if device == "cuda" else "cpu_flash") if ok else None,
        "env.gpu_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else None,
        "env.gpu_memory_bytes": gpu_memory if device == "cuda" else None,
        "env.torch": "2.14.1",
        "env.git_sha": "0123456789abcdef",
        "env.git_dirty": False,
    }
    record.update(extra)
    return record


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def write(rows: list[dict[str, Any]], folder: Path) -> Path:
    """One parquet file per row, like `results.write_result`."""
    folder.mkdir(parents=True, exist_ok=True)
    for record in rows:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        pd.DataFrame([clean]).to_parquet(folder / f"{record['run_id']}.parquet", index=False)
    return folder


def sweep() -> list[dict[str, Any]]:
    """A GPU-like sweep: 5 methods × 3 batches in fp32 (one OOM, one error, one NaN accuracy) + a bf16 slice."""
    rows = []
    for batch in (32, 64, 128):
        f = batch / 32
        rows.append(
            row("full", batch, peak=(12 + 9 * f) * GiB, params=85_800_000, ips=300 / f**0.1, acc=0.90)
            if batch < 128
            else row(
                "full",
                batch,
                status="oom",
                params=85_800_000,
                error="out of memory at batch size 128: CUDA out of memory",
            )
        )
        rows.append(row("linear", batch, peak=(0.4 + 1.5 * f) * GiB, params=77_000, ips=1400, acc=0.70))
        rows.append(row("lora", batch, knob=4, peak=(0.6 + 3 * f) * GiB, params=300_000, ips=900, acc=0.86))
        rows.append(
            row(
                "lora",
                batch,
                knob=8,
                peak=(0.62 + 3 * f) * GiB,
                params=600_000,
                ips=880,
                acc=0.88 if batch != 64 else math.nan,
            )
        )
        rows.append(
            row(
                "vpt",
                batch,
                knob=50,
                knob_name="prompt_len",
                peak=(0.7 + 4.2 * f) * GiB,
                params=500_000,
                ips=700,
                acc=0.85,
            )
        )
    rows.append(row("sqt", 64, knob=16, knob_name="num_queries", status="error", error="RuntimeError: shapes\nmore"))
    for batch in (32, 64):
        rows.append(
            row(
                "full",
                batch,
                precision="bf16-mixed",
                peak=(8 + 5 * batch / 32) * GiB,
                params=85_800_000,
                ips=600,
                acc=0.9,
            )
        )
        rows.append(
            row(
                "lora",
                batch,
                knob=8,
                precision="bf16-mixed",
                peak=(0.5 + 1.6 * batch / 32) * GiB,
                params=600_000,
                ips=1500,
                acc=0.87,
            )
        )
    return rows
