"""The GPU kit's first step: measure on a real GPU what the CUDA estimate assumes (scripts/gpu_probe.py runs this).

    python scripts/gpu_probe.py [--device cuda|cpu] [--out DIR] [--batch N] [--precisions fp32,bf16-mixed]

1. **cuBLAS workspaces**: the allocator's active bytes around the first forward (main thread) and the first
   backward (autograd's device thread) of a Linear, against `petlbench.estimate.workspaces`.
2. **Attention kernels**: which fused kernel SDPA runs for ViT-B/16 shapes (batch, 12 heads, 197 tokens, head dim
   64) in bf16 and fp32, and the backward's transient scratch (peak over the op, less its outputs).
3. **Allocator replay**: one LoRA and one SQT run of the worker's protocol (weights, inference forwards, warm-up,
   peak reset, measured steps) on ViT-B/16 at the given batch, each in a fresh process, under
   `torch.cuda.memory._record_memory_history`. The recorded allocations and frees are replayed through the allocator
   model (petlbench/estimate/allocator.py), which must reproduce the measured `max_memory_allocated` and
   `max_memory_reserved` and the segment sizes; beside it, the estimator's own prediction of the run and the memory
   outside the allocator (`context`: total − free − reserved, from cudaMemGetInfo).

`--device cpu` is a dry run on a tiny ViT (no GPU): the same code paths, with the tensor tracker's log standing in
for the allocator's history, so a test can run it. Outputs: `probe.json` and `probe.md` in `--out` (default: $OUT
when set, else results/reference/<gpu>/probe). Exit code 1 when the replay does not reproduce a measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.estimate.allocator import CachingAllocator, parse_alloc_conf
from petlbench.estimate.gpus import CUSTOM, Target, device_env, match_preset, target_for
from petlbench.estimate.workspaces import attention_backward_scratch, cublas_workspace_bytes, cublaslt_extra_bytes
from petlbench.fmt import fmt_bytes
from petlbench.measure.tracker import ALLOC, FREE, TensorTracker, attention_kernel
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec

VIT_B: dict[str, Any] = {"model": "vit_base_patch16_224", "weights": "random", "fused_attn": True}
TINY: dict[str, Any] = {"model": "test_vit", "img_size": 32, "kwargs": {"patch_size": 8, "depth": 2}}


# -- 1. cuBLAS workspaces ---------------------------------------------------------------------------------------


def _active(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_stats(device).get("active_bytes.all.current", 0))


def probe_cublas(device: torch.device) -> dict[str, Any]:
    """Bytes that appear in the allocator at the first forward and the first backward of a Linear and stay."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    env = dict(os.environ)
    predicted = cublas_workspace_bytes(capability, env) + cublaslt_extra_bytes(capability, env)
    layer = nn.Linear(256, 256).to(device)
    x = torch.randn(32, 256, device=device)
    before = _active(device)
    with torch.no_grad():
        y = layer(x)
    del y
    after_forward = _active(device)
    x.requires_grad_(True)
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    after_backward = _active(device)
    forward = None if before is None or after_forward is None else after_forward - before
    backward = None if after_forward is None or after_backward is None else after_backward - after_forward
    reported = getattr(torch.backends.cuda, "cublas_workspace_size", None)
    return {
        "capability": list(capability),
        "predicted_per_handle": predicted,
        "forward_bytes": forward,
        "backward_bytes": backward,
        "torch_reports": int(reported()) if callable(reported) and device.type == "cuda" else None,
    }


# -- 2. attention kernels ---------------------------------------------------------------------------------------


def probe_attention(device: torch.device, batch: int) -> list[dict[str, Any]]:
    """The SDPA kernel that runs for ViT-B/16 shapes in bf16 and fp32, and its backward scratch."""
    cuda = device.type == "cuda"
    shape = (batch, 12, 197, 64) if cuda else (2, 2, 17, 16)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        tracker = TensorTracker()
        with tracker:
            o = F.scaled_dot_product_attention(q, k, v)
        kernel = attention_kernel(tracker._ops)
        grad = torch.ones_like(o)
        before = torch.cuda.memory_allocated(device) if cuda else None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        backward = TensorTracker()
        with backward:
            o.backward(grad)
        scratch = None
        if cuda and before is not None:
            torch.cuda.synchronize(device)
            outputs = 3 * q.numel() * q.element_size()
            scratch = torch.cuda.max_memory_allocated(device) - before - outputs
        backward_ops = sorted(op for op in backward._ops if op.endswith("_backward"))
        short = (kernel or "").split("+")[0]
        predicted = attention_backward_scratch(short, shape)
        out.append(
            {
                "dtype": str(dtype).replace("torch.", ""),
                "shape": list(shape),
                "kernel": kernel,
                "backward_ops": backward_ops,
                "scratch_bytes": scratch,
                "predicted_scratch_bytes": sum(predicted) if predicted else None,
            }
        )
        del q, k, v, o, grad
    return out


# -- 3. a run's allocator history, replayed ---------------------------------------------------------------------


def probe_spec(tuner: dict[str, Any], precision: str, batch: int, cuda: bool) -> RunSpec:
    suite = parse_suite(
        {
            "name": "probe",
            "device": "cuda" if cuda else "cpu",
            "backbone": {**(VIT_B if cuda else TINY), "drop_rate": 0.0, "drop_path_rate": 0.0},
            "data": {"name": "synthetic", "num_classes": 100},
            "batch_size": batch,
            "precision": precision,
            "optimizer": {"name": "adamw", "foreach": False},
            "measure": {"warmup_steps": 3, "steps": 3},
            "tuners": [tuner],
        }
    )
    return expand(suite, "cuda" if cuda else "cpu")[0]


@contextmanager
def _history(cuda: bool) -> Iterator[TensorTracker | None]:
    """Record every allocation: the CUDA allocator's history, or (dry run) the tensor tracker's log."""
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=4_000_000)
        try:
            yield None
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    else:
        tracker = TensorTracker()
        with tracker:
            yield tracker


def _trace(cuda: bool, tracker: TensorTracker | None) -> list[dict[str, Any]]:
    """The recorded history as allocator trace entries: {action, addr, size}."""
    if cuda:
        snapshot = torch.cuda.memory._snapshot()
        device = torch.cuda.current_device()
        return [dict(e) for e in snapshot["device_traces"][device]]
    assert tracker is not None
    entries = []
    for kind, key, _category, nbytes in tracker._events:
        if kind == ALLOC:
            entries.append({"action": "alloc", "addr": key, "size": nbytes})
        elif kind == FREE:
            entries.append({"action": "free_completed", "addr": key, "size": nbytes})
    return entries


def replay_trace(entries: Sequence[dict[str, Any]], reset_at: int, alloc_conf: str) -> dict[str, Any]:
    """Replay recorded allocations and frees through the allocator model; peaks since entry `reset_at`.

    New segments take the addresses the recorded segments got (the `segment_alloc` entries logged just before the
    allocation that needed them), so ties between equal free blocks break as they did; `segment_mismatches` counts
    the allocations where the model and the recording disagreed on whether a new segment was needed."""
    pending: list[int] = []
    missing = [0]

    def address(_size: int) -> int | None:
        if pending:
            return pending.pop(0)
        missing[0] += 1
        return None

    model = CachingAllocator(parse_alloc_conf(alloc_conf), segment_address=address)
    live: dict[int, Any] = {}
    unknown_frees = extra = 0
    for i, entry in enumerate(entries):
        if i == reset_at:
            model.reset_peak()
        action = entry.get("action")
        if action == "segment_alloc":
            pending.append(int(entry["addr"]))
        elif action == "alloc":
            live[int(entry["addr"])] = model.malloc(int(entry["size"]))
            extra += len(pending)  # recorded segments the model did not need
            pending.clear()
        elif action == "free_completed":
            block = live.pop(int(entry["addr"]), None)
            if block is None:
                unknown_frees += 1
            else:
                model.free(block)
    if reset_at >= len(entries):
        model.reset_peak()
    return {
        "peak_allocated": model.stats.peak_allocated,
        "peak_reserved": model.stats.peak_reserved,
        "segments": sorted(sum(size for size, _ in segment) for segment in model.segments()),
        "segment_mismatches": extra + missing[0],
        "unknown_frees": unknown_frees,
    }


def _target(device: torch.device) -> Target:
    """The card this is, as the estimator would name it (its real capability, its measured memory)."""
    if device.type != "cuda":
        return target_for(None, 80 * 1024**3, "0")
    props = torch.cuda.get_device_properties(device)
    found = match_preset(props.name, props.total_memory)
    target = target_for(found, None if found is not None else props.total_memory, "0")
    return target.model_copy(update={"capability": (props.major, props.minor), "memory_bytes": props.total_memory})


def probe_step(tuner: dict[str, Any], precision: str, batch: int, device: torch.device) -> dict[str, Any]:
    """The worker's protocol for one run, its allocator history replayed, and the estimator's prediction."""
    from petlbench.data.loaders import num_classes
    from petlbench.estimate.engine import estimate_memory
    from petlbench.measure.step import TrainStep, autocast, make_optimizer
    from petlbench.run.model import build_model, model_img_size

    cuda = device.type == "cuda"
    spec = probe_spec(tuner, precision, batch, cuda)
    start = time.perf_counter()
    measured: dict[str, Any] = {}
    with _history(cuda) as tracker:
        tuned = build_model(spec, num_classes(spec.data, spec.data_root), device)
        size = model_img_size(tuned.backbone, spec.backbone.img_size)
        x = torch.randn(batch, 3, size, size).to(device)
        y = torch.randint(100, (batch,)).to(device)
        model = tuned.module
        model.eval()
        for i in range(2):  # warm-up forward, then the measured one
            if cuda and i == 1:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode(), autocast(spec.precision, device.type):
                model(x)
        if cuda:
            measured["peak_infer_allocated"] = torch.cuda.max_memory_allocated(device)
        model.train()
        optimizer = make_optimizer(tuned.trainable_parameters(), spec.optimizer)
        step = TrainStep(model, optimizer, spec.precision, device.type)
        for _ in range(spec.measure.warmup_steps):
            step(x, y)
        reset_at = len(_trace(cuda, tracker))
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(spec.measure.steps):
            step(x, y)
        if cuda:
            torch.cuda.synchronize(device)
            free, total = torch.cuda.mem_get_info(device)
            reserved = torch.cuda.memory_reserved(device)
            measured.update(
                peak_allocated=torch.cuda.max_memory_allocated(device),
                peak_reserved=torch.cuda.max_memory_reserved(device),
                context=total - free - reserved,
                total=total,
            )
        entries = _trace(cuda, tracker)
    segments = sorted(int(e["size"]) for e in entries if e.get("action") == "segment_alloc")
    measured["segments"] = segments if cuda else None
    replayed = replay_trace(entries, reset_at, device_env()[0])
    del step, optimizer, model, tuned, x, y
    predicted = estimate_memory(spec.model_copy(update={"device": "cuda"}), _target(device))
    return {
        "tuner": tuner["tuner"],
        "precision": precision,
        "batch": batch,
        "entries": len(entries),
        "seconds": round(time.perf_counter() - start, 1),
        "measured": measured,
        "replayed": replayed,
        "reproduced": None
        if not cuda
        else (
            replayed["peak_allocated"] == measured["peak_allocated"]
            and replayed["peak_reserved"] == measured["peak_reserved"]
        ),
        "estimate": {
            "peak_allocated": predicted.peak_allocated_bytes,
            "peak_reserved": predicted.peak_reserved_bytes,
            "peak_infer": predicted.peak_infer_bytes,
            "workspace": predicted.workspace_bytes,
            "context": predicted.context_bytes,
            "gpu": predicted.gpu_preset,
            "approximate": predicted.estimate_approximate,
        },
    }


# -- the report -------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device.type}
    env["alloc_conf"] = device_env()[0] or None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found = match_preset(props.name, props.total_memory)
        env.update(
            gpu=props.name,
            capability=[props.major, props.minor],
            total_memory=props.total_memory,
            preset=found.key if found is not None else CUSTOM,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def default_out(device: torch.device) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "probe"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("results") / "reference" / slug / "probe"


def _b(value: Any) -> str:
    return "-" if value is None else fmt_bytes(value)


def markdown(report: dict[str, Any]) -> str:
    env, blas = report["environment"], report["cublas"]
    lines = ["# GPU probe", "", "```", json.dumps(env), "```", "", "## cuBLAS workspaces", ""]
    lines += [
        f"predicted per handle {_b(blas['predicted_per_handle'])} (capability {blas['capability']}); measured: "
        f"first forward {_b(blas['forward_bytes'])}, first backward {_b(blas['backward_bytes'])}; "
        f"torch reports {_b(blas['torch_reports'])}",
        "",
        "## Attention kernels",
        "",
        "| dtype | shape | kernel | backward ops | scratch measured | scratch predicted |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in report["attention"]:
        lines.append(
            f"| {a['dtype']} | {a['shape']} | {a['kernel']} | {', '.join(a['backward_ops'])} | "
            f"{_b(a['scratch_bytes'])} | {_b(a['predicted_scratch_bytes'])} |"
        )
    lines += ["", "## Allocator replay of a run's history", ""]
    lines += [
        "| run | entries | allocated measured | replayed | estimated | reserved measured | replayed | estimated | "
        "segments differing | context measured | estimated | reproduced |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | | | | | | |")
            continue
        m, p, e = r["measured"], r["replayed"], r["estimate"]
        lines.append(
            f"| {r['tuner']} {r['precision']} bs={r['batch']} | {r['entries']} | {_b(m.get('peak_allocated'))} | "
            f"{_b(p['peak_allocated'])} | {_b(e['peak_allocated'])} | {_b(m.get('peak_reserved'))} | "
            f"{_b(p['peak_reserved'])} | {_b(e['peak_reserved'])} | {p['segment_mismatches']} | "
            f"{_b(m.get('context'))} | {_b(e['context'])} | "
            f"{r['reproduced']} |"
        )
    return "\n".join([*lines, ""])


def _child(args: argparse.Namespace, device: torch.device) -> int:
    tuner, precision = args.child.split(":")
    result = probe_step({"tuner": tuner}, precision, args.batch, device)
    Path(args.out, f"run-{tuner}-{precision}.json").write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=None, help="batch of the replayed runs (64; dry run: 4)")
    parser.add_argument("--precisions", default=None, help="comma list (fp32,bf16-mixed; dry run: fp32)")
    parser.add_argument("--tuners", default="lora,sqt", help="comma list of the runs to replay (lora,sqt)")
    parser.add_argument("--in-process", action="store_true", help="replay the runs in this process (tests)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    args.batch = args.batch or (64 if args.device == "cuda" else 4)
    out = Path(args.out) if args.out else default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.child:
        return _child(args, device)
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(device), "cublas": probe_cublas(device)}
    report["attention"] = probe_attention(device, args.batch)
    precisions = (args.precisions or ("fp32,bf16-mixed" if args.device == "cuda" else "fp32")).split(",")
    report["runs"] = []
    for tuner in args.tuners.split(","):
        for precision in precisions:
            name = f"{tuner}:{precision}"
            if args.in_process:
                report["runs"].append(probe_step({"tuner": tuner}, precision, args.batch, device))
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "--child", name]
            command += ["--device", args.device, "--batch", str(args.batch), "--out", str(out)]
            done = subprocess.run(command, capture_output=True, text=True)  # a fresh allocator per run
            path = out / f"run-{tuner}-{precision}.json"
            if done.returncode != 0 or not path.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                report["runs"].append({"name": name, "error": tail[0]})
            else:
                report["runs"].append(json.loads(path.read_text()))
                path.unlink()
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "probe.md").write_text(text)
    print(text)
    print(f"probe: {report['seconds']} s → {out}/probe.json, probe.md")
    failed = [r for r in report["runs"] if "error" in r or r.get("reproduced") is False]
    for r in failed:
        print(f"error: {r.get('name', r.get('tuner'))}: {r.get('error', 'the replay does not reproduce the peaks')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
