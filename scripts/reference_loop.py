"""A plain training loop, timed the way timm's `benchmark.py` times one, to check the harness adds nothing.

    python scripts/reference_loop.py RESULTS_DIR SUITE OUT_DIR [--steps N]

For one measured row of the suite (LoRA at its largest batch in fp32 when there is one, else the first ok row) it
builds the run's model (backbone + tuner, exactly as the worker does), then runs warm-up steps and N timed steps
of forward, cross-entropy, backward, optimizer step, `zero_grad(set_to_none=True)` in a bare loop: no tracker, no
NVML thread, no petlbench step object. CUDA steps are timed with events around each step, CPU steps with
`perf_counter`. It writes OUT_DIR/train-step-reference.md: the bare loop's median step time, images/s and (CUDA)
`max_memory_allocated` after a peak reset, beside petlbench's own row for the same spec. The step times should
agree within noise, and on CUDA the peaks too (same allocator, same program). `scripts/gpu-validate.sh` runs it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from petlbench.data.loaders import num_classes
from petlbench.fmt import fmt_bytes, fmt_rate, fmt_seconds
from petlbench.measure.step import autocast, make_optimizer
from petlbench.results import load_results, suite_dir
from petlbench.run.model import build_model, model_img_size
from petlbench.run.worker import torch_device
from petlbench.spec.models import RunSpec


def reference_step_times(spec: RunSpec, steps: int) -> dict[str, Any]:
    """Median step time, images/s and (CUDA) peak allocated bytes of a bare training loop for `spec`."""
    device = torch_device(spec)
    tuned = build_model(spec, num_classes(spec.data, spec.data_root), device)
    model = tuned.module.train()
    optimizer = make_optimizer(tuned.trainable_parameters(), spec.optimizer)
    size = model_img_size(tuned.backbone, spec.backbone.img_size)
    x = torch.randn(spec.batch_size, 3, size, size, device=device)
    y = torch.randint(0, num_classes(spec.data, spec.data_root), (spec.batch_size,), device=device)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16-mixed" else None

    def step() -> None:
        with autocast(spec.precision, device.type):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(2, spec.measure.warmup_steps)):
        step()
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "run_id": spec.run_id,
        "steps": steps,
        "step_time_median_s": median,
        "train_images_per_s": spec.batch_size / median,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


def pick_row(rows: Sequence[Mapping[Any, Any]]) -> Mapping[Any, Any] | None:
    """LoRA at its largest batch in fp32 if measured ok, else the first ok row."""
    ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("spec_json"), str)]
    lora = [r for r in ok if r.get("tuner") == "lora" and r.get("precision") == "fp32"]
    pool = lora or ok
    return max(pool, key=lambda r: int(r["batch_size"])) if pool else None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    steps = 20
    if "--steps" in args:
        at = args.index("--steps")
        steps = int(args[at + 1])
        del args[at : at + 2]
    if len(args) != 3:
        print("usage: python scripts/reference_loop.py RESULTS_DIR SUITE OUT_DIR [--steps N]", file=sys.stderr)
        return 2
    results, suite, out = Path(args[0]), args[1], Path(args[2])
    row = pick_row(load_results([suite_dir(results, suite)]).to_dict("records"))
    if row is None:
        print(f"error: no ok row in {suite_dir(results, suite)} to compare with", file=sys.stderr)
        return 1
    spec = RunSpec.model_validate_json(row["spec_json"])
    bare = reference_step_times(spec, steps)
    lines = [
        f"# Bare training loop vs petlbench: {spec.label()} ({spec.device})",
        "",
        "| | step time (median) | images/s | peak allocated |",
        "| --- | --- | --- | --- |",
        f"| petlbench row {spec.run_id} | {fmt_seconds(row.get('step_time_median_s'))} | "
        f"{fmt_rate(row.get('train_images_per_s'))} | {fmt_bytes(row.get('peak_allocated_bytes'))} |",
        f"| bare loop, {steps} steps | {fmt_seconds(bare['step_time_median_s'])} | "
        f"{fmt_rate(bare['train_images_per_s'])} | {fmt_bytes(bare['peak_allocated_bytes'])} |",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train-step-reference.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
