"""Child-process entry: one RunSpec in, one RunResult out.

    python -m petlbench.run.worker SPEC.json RESULT.json

Each run gets a fresh interpreter, CUDA context and caching allocator. The protocol (docs/measurement.md):

1. build the tuned model (structural freezing), count parameters;
2. inference: one warm-up forward, then the peak of one forward and the timed forwards;
3. training: ≥ 2 warm-up steps (AdamW creates its state on step 1), then peaks reset and the timed steps;
4. one more step under the tensor tracker: the breakdown (and on CPU, the headline peak);
5. accuracy, when the suite trains: a fresh model with the same seed, trained and evaluated.

The result is written atomically; exit code 0 ok, 3 oom, 1 error (2: bad usage). A crash that writes nothing
is turned into an `error` row by the parent.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from petlbench.backbone import prepare_hub_access, weights_identity
from petlbench.columns import Metrics
from petlbench.data.loaders import FileSource, ImageSource, load_data, num_classes
from petlbench.data.specs import ImageFolderData, VtabData, task_key
from petlbench.errors import DeviceError, PetlbenchError
from petlbench.executors.process import RUNS_IN_FLIGHT_ENV, die_with_parent
from petlbench.fmt import describe_exception
from petlbench.measure.accuracy import train_and_evaluate
from petlbench.measure.env import collect_env
from petlbench.measure.memory import (
    CUDA_BLOCK,
    nvml_sampler,
    peak_rss,
    record_breakdown,
    reset_peak_rss,
    tracked_inference,
    tracked_train_step,
)
from petlbench.measure.speed import time_more, time_steps
from petlbench.measure.step import TrainStep, autocast, make_optimizer
from petlbench.measure.tracker import TensorTracker
from petlbench.results import RunResult, Status, now_iso
from petlbench.run.model import build_model, model_img_size
from petlbench.spec.models import RunSpec
from petlbench.why import WhyData, summarize_step

log = logging.getLogger("petlbench.run.worker")

# A worker ends ok, oom or error (timeouts and skips are decided by the parent, never here).
EXIT_CODES: dict[Status, int] = {"ok": 0, "oom": 3, "error": 1}


def torch_device(spec: RunSpec) -> torch.device:
    if spec.device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device cuda: torch.cuda.is_available() is False in the worker; use --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class Extras:
    """What a run produces besides its row: the tracked step's timeline/attribution, a CUDA memory snapshot."""

    snapshot_dir: Path | None = None  # where the worker may write a snapshot (its result file's folder)
    why: WhyData | None = None
    snapshot_file: str | None = None


@contextmanager
def cuda_snapshot(spec: RunSpec, device: torch.device, extras: Extras) -> Iterator[None]:
    """With `measure.snapshot` on CUDA: record the allocator's history over the block, dump it as a pickle."""
    if not spec.measure.snapshot or device.type != "cuda" or extras.snapshot_dir is None:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
        path = extras.snapshot_dir / f"{spec.run_id}.snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        extras.snapshot_file = str(path)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def measure(spec: RunSpec, device: torch.device, metrics: Metrics, extras: Extras | None = None) -> None:
    """Fill `metrics` following the protocol in the module docstring. Partial results stay if a step fails.

    `extras` receives the tracked step's timeline and peak attribution (and a snapshot, if asked for)."""
    extras = extras if extras is not None else Extras()
    metrics.data_task = task_key(spec.data)
    data: ImageSource | None = None
    if isinstance(spec.data, VtabData | ImageFolderData):  # index (and check) the files first: cheap, no decoding
        data = load_data(spec.data, spec.data_root)
        record_data(data, metrics)
    classes = data.num_classes if data is not None else num_classes(spec.data, spec.data_root)
    metrics.num_classes = classes
    tuned = build_model(spec, classes, device)
    identity = weights_identity(spec.backbone, tuned.backbone)
    metrics.weights_source, metrics.weights_ref, metrics.weights_sha256 = identity.source, identity.ref, identity.sha256
    model = tuned.module
    img_size = model_img_size(tuned.backbone, spec.backbone.img_size)
    metrics.params_total = tuned.params_total
    metrics.params_trainable = tuned.params_trainable
    metrics.params_added = tuned.params_added
    metrics.weights_frozen_bytes = tuned.weights_frozen_bytes
    metrics.weights_trainable_bytes = tuned.weights_trainable_bytes
    cuda = device.type == "cuda"
    metrics.memory_source = "cuda_allocator" if cuda else "cpu_tracker"

    generator = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.batch_size, 3, img_size, img_size, generator=generator).to(device)
    y = torch.randint(classes, (spec.batch_size,), generator=generator).to(device)

    if spec.measure.inference:
        _measure_inference(spec, model, x, device, metrics)

    model.train()
    optimizer = make_optimizer(tuned.trainable_parameters(), spec.optimizer)
    step = TrainStep(model, optimizer, spec.precision, device.type)
    for _ in range(spec.measure.warmup_steps):
        step(x, y)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with nvml_sampler(device.index or 0, spec.measure.nvml_interval_ms / 1000.0) as nvml:
            timing = time_steps(lambda: step(x, y), spec.measure.steps, device)
        metrics.peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
        metrics.peak_reserved_bytes = torch.cuda.max_memory_reserved(device)
        metrics.peak_driver_bytes, metrics.driver_memory_scope = nvml.peak, nvml.scope
    else:
        metrics.rss_baseline_bytes = reset_peak_rss()
        timing = time_steps(lambda: step(x, y), spec.measure.steps, device)
        metrics.peak_rss_bytes = peak_rss() if metrics.rss_baseline_bytes is not None else None
    protocol = spec.measure.timing
    timing = time_more(lambda: step(x, y), timing, protocol, device)  # after the peaks were read
    metrics.step_time_median_s = timing.median_s
    metrics.step_time_p90_s = timing.p90_s
    metrics.step_time_iqr_s = timing.iqr_s
    metrics.timed_steps = len(timing.times_s)
    metrics.timing_unstable = timing.dispersion > protocol.max_dispersion
    metrics.train_images_per_s = spec.batch_size / timing.median_s

    if spec.measure.breakdown or not cuda:
        recorder = TensorTracker(round_to=CUDA_BLOCK if cuda else 1)
        with cuda_snapshot(spec, device, extras):
            tracked = tracked_train_step(step, x, y, tracker=recorder)
        record_breakdown(metrics, tracked)
        timeline = recorder.timeline()
        extras.why = summarize_step(timeline.events, timeline.owners, timeline.modules, recorder.round_to)
        if not cuda:
            metrics.peak_allocated_bytes = tracked.peak_bytes  # CPU headline: exact and deterministic

    if spec.train is not None:
        del step, optimizer, model, tuned, x, y
        _release(device)
        if data is None:
            data = load_data(spec.data, spec.data_root)
            record_data(data, metrics)
        fresh = build_model(spec, classes, device)
        accuracy = train_and_evaluate(fresh.module, data, img_size, spec, device)
        metrics.acc_top1 = accuracy.final
        metrics.acc_top1_best = accuracy.best
        metrics.acc_best_epoch = accuracy.best_epoch
        metrics.epochs = accuracy.epochs
        metrics.train_time_s = accuracy.train_time_s
        metrics.num_train = accuracy.num_train
        metrics.num_test = accuracy.num_test


def record_data(data: ImageSource, metrics: Metrics) -> None:
    """The resolved dataset identity on the row: splits, sizes, folder, fingerprint."""
    metrics.num_train, metrics.num_test = data.size("train"), data.size("test")
    if isinstance(data, FileSource):
        index = data.index
        metrics.data_task = index.task
        metrics.data_train_split, metrics.data_test_split = index.train_split, index.test_split
        metrics.data_folder, metrics.data_fingerprint = str(index.folder), index.fingerprint
    else:
        metrics.data_train_split, metrics.data_test_split = "train", "test"


def _measure_inference(
    spec: RunSpec, model: torch.nn.Module, x: torch.Tensor, device: torch.device, metrics: Metrics
) -> None:
    """Inference peak (weights + one forward's working set) and images/s, before any optimizer state exists."""
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(spec.precision, device.type):
            model(x)

    forward()  # warm-up: kernels selected, lazy buffers made
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        torch.cuda.synchronize(device)
        metrics.peak_infer_bytes = torch.cuda.max_memory_allocated(device)
    else:
        metrics.peak_infer_bytes = tracked_inference(model, x, autocast(spec.precision, device.type)).peak_bytes
    timing = time_more(forward, time_steps(forward, spec.measure.steps, device), spec.measure.timing, device)
    metrics.infer_time_median_s = timing.median_s
    metrics.infer_images_per_s = spec.batch_size / timing.median_s


def runs_in_flight() -> int | None:
    value = os.environ.get(RUNS_IN_FLIGHT_ENV, "")
    return int(value) if value.isdigit() else None


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "CUDA out of memory" in text)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def execute(spec: RunSpec, snapshot_dir: Path | None = None) -> RunResult:
    """Run the protocol and classify the outcome; never raises for a failure of the run itself.

    `snapshot_dir`: where a CUDA memory snapshot may be written (`measure.snapshot`)."""
    metrics = Metrics(runs_in_flight=runs_in_flight(), load_avg_start=load_average())
    extras = Extras(snapshot_dir=snapshot_dir)
    env: dict[str, str | int | float | bool | None] = {}
    start = time.perf_counter()
    cpu_start = time.process_time()
    status: Status = "ok"
    error: str | None = None
    error_type: str | None = None
    try:
        if spec.device == "cpu" and spec.measure.cpu_threads is not None:
            torch.set_num_threads(spec.measure.cpu_threads)  # before any op; env records the value in effect
        device = torch_device(spec)
        env = collect_env(device)
        measure(spec, device, metrics, extras)
    except PetlbenchError as exc:
        status, error, error_type = "error", str(exc), type(exc).__name__
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        if _is_oom(exc):
            status, error = "oom", f"out of memory at batch size {spec.batch_size}: {describe_exception(exc)}"
        else:
            status, error = "error", describe_exception(exc)
            error += _where(exc)
            error_type = type(exc).__name__
        log.error("run %s failed:\n%s", spec.run_id, traceback.format_exc())
    metrics.cpu_time_s = time.process_time() - cpu_start
    metrics.load_avg_end = load_average()
    return RunResult(
        spec=spec,
        status=status,
        error=error,
        error_type=error_type,
        metrics=metrics,
        env=env,
        created_at=now_iso(),
        duration_s=time.perf_counter() - start,
        why=extras.why,
        snapshot_file=extras.snapshot_file,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m petlbench.run.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    return run_files(Path(args[0]), Path(args[1]))


def run_files(spec_path: Path, out_path: Path) -> int:
    """One run from a spec file to a result file (what the spawned and the forked worker both do)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    spec = RunSpec.model_validate_json(spec_path.read_text())
    prepare_hub_access(spec.backbone)
    log.info("run %s: %s", spec.run_id, spec.label())
    result = execute(spec, snapshot_dir=out_path.parent)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, out_path)
    log.info("run %s: %s%s", spec.run_id, result.status, f" ({result.error})" if result.error else "")
    return EXIT_CODES[result.status]


def flush_and_exit(code: int) -> NoReturn:
    """End the worker without the interpreter's shutdown (about 0.9 s of module and tensor teardown): the result
    file is already written and renamed, so only the log needs flushing first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    die_with_parent()  # a parent killed with -9 takes this run with it (docs/guarantees.md)
    try:
        exit_code = main()
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    flush_and_exit(exit_code)
