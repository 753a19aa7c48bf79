"""Predict a run's memory without allocating it: the worker's training step, on fake CPU tensors.

docs/measurement.md: build on the meta device (outside the fake mode: timm's drop-path schedule calls `.item()`),
enter `FakeTensorMode(allow_non_fake_inputs=True)`, materialise with `to_empty(device="cpu")`, and run the same
warm-up and tracked step as the worker. Fake tensors carry shapes, dtypes and storages but no data, so the
tracker sees exactly the bytes a real CPU run allocates, for any batch size, with no real memory. Fake *CUDA*
tensors cannot run backward without a GPU and push SDPA onto the math path, so CUDA runs are traced on fake CPU
tensors too, with CUDA's autocast policy and kernels emulated at dispatch level (petlbench/estimate/cuda.py).

Many runs, one process (`python -m petlbench.estimate.engine`, serving JSON requests on stdin, is what the CLI
starts): runs that build the same model (same backbone, tuner, knobs, optimizer, seed, checkpointing) share one
fake model and optimizer. It is warmed up once (AdamW creates its state on the first step; every later step has the same
allocation pattern), then each run is one tracked step (plus one tracked inference forward) at its batch size and
precision. The tracker counts only the tensors it is shown (weights, gradients, optimizer state, the batch) and
those allocated inside the step, exactly as in the worker, so a reused model gives the same bytes as a fresh one
(tests/test_estimate.py checks both against real CPU runs).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from petlbench.columns import FitSearch, Metrics
from petlbench.data.loaders import num_classes
from petlbench.errors import PetlbenchError
from petlbench.estimate.attention import CudaTarget, kernel_label
from petlbench.estimate.autobatch import linear_seed, search_max_batch
from petlbench.estimate.client import (
    ESTIMATE_SOURCE,
    MESSAGE_PREFIX,
    Estimate,
    EstimateRequest,
    EstimateResponse,
    SearchRequest,
    estimate_caveats,
    model_key,
)
from petlbench.estimate.cuda import LOWER_PRECISION, CudaEmulation, CudaTrainStep, FakeGradScaler
from petlbench.estimate.cuda_estimate import device_plan, fits_card, record_device, search_fit
from petlbench.estimate.cuda_replay import DeviceReplay, compile_timeline, replay_compiled
from petlbench.estimate.gpus import Target, default_target, required_bytes
from petlbench.fmt import describe_exception, fmt_bytes
from petlbench.measure.memory import CUDA_BLOCK, record_breakdown, tracked_inference, tracked_train_step
from petlbench.measure.step import TrainStep, autocast, make_optimizer
from petlbench.measure.timeline import at_batch
from petlbench.measure.tracker import TensorTracker, Timeline, replay
from petlbench.results import EnvValue
from petlbench.run.model import build_model, model_img_size
from petlbench.spec.models import RunSpec
from petlbench.why import WhyData, summarize_step

log = logging.getLogger("petlbench.estimate")


def estimate_memory(spec: RunSpec, target: Target | None = None) -> Metrics:
    """Predicted peak bytes and their breakdown for one run, as a run of the same spec would measure them.

    For a CPU spec this is what the worker's tensor tracker measures, to the byte; for a CUDA spec, the trace with
    the CPU→CUDA deltas applied (petlbench/estimate/client.py), replayed through the caching-allocator model on
    `target` (default: the default GPU preset).
    """
    return Estimator().estimate(spec, target)


def _load_order(model: nn.Module) -> tuple[int, ...] | None:
    """The registered weights (parameters, then buffers, by position, as the tracker registers them) in the order
    `module.to(device)` moves them: every module's children first, then its own parameters and buffers."""
    registered = [*model.parameters(), *model.buffers()]
    position = {id(t): i for i, t in enumerate(registered)}
    order: list[int] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and id(tensor) in position and id(tensor) not in seen:
                seen.add(id(tensor))
                order.append(position[id(tensor)])

    visit(model)
    storages = {id(t.untyped_storage()) for t in registered}
    return tuple(order) if len(order) == len(registered) == len(storages) else None


class _ScalarDraws(TorchFunctionMode):
    """One-element random draws become constants, so the Python branch they feed can be read from fake tensors.

    Layers that decide in Python whether to run (peft's LoHa/LoKr module dropout: `torch.rand(1) > p`) or which
    block to pick (peft's BOFT block dropout: `torch.randint(0, N, (1,)).item()`) need the draw's value, which a
    fake tensor does not have. A constant (`torch.tensor`, below FakeTensorMode's constant limit) has one: `rand`
    draws 1 - 2⁻²⁴, so `rand > p` holds for every p < 1 (the module runs: always so at p = 0, and the larger peak
    otherwise); `randint` draws its lower bound. Larger draws (masks, noise) stay fake: they only need a shape.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.rand or func is torch.randint:
            sized = [a for a in args if isinstance(a, tuple | list | torch.Size)]
            ints = [a for a in args if isinstance(a, int)]
            shape = tuple(sized[0]) if sized else tuple(kwargs.get("size") or (() if func is torch.randint else ints))
            if shape and all(n == 1 for n in shape):
                if func is torch.randint:
                    value: float = kwargs.get("low", ints[0] if len(ints) == 2 else 0)
                    dtype = kwargs.get("dtype") or torch.int64
                else:
                    value, dtype = 1.0 - 2.0**-24, kwargs.get("dtype") or torch.get_default_dtype()
                return torch.tensor(value, dtype=dtype, device=kwargs.get("device")).reshape(shape)
        return func(*args, **kwargs)


def _autocast(spec: RunSpec, cuda: CudaEmulation | None) -> AbstractContextManager[object]:
    """The inference forward's mixed precision: the worker's own helper for CPU specs (fp16 on CPU fails there
    too), CUDA's autocast policy in the run's dtype for CUDA specs."""
    if cuda is None:
        return autocast(spec.precision, "cpu")
    return cuda.autocast(LOWER_PRECISION.get(spec.precision))


class _FakeModel:
    """One model configuration materialised as fake CPU tensors, with its optimizer; reused across runs.

    Each (precision, device) is traced at up to two batch sizes; other batch sizes are replayed from those two
    (measure/timeline.py) when the step is affine in the batch, else traced too. Batch 1 is always traced and
    never an anchor: size-1 dimensions change strides and contiguity, so some copies disappear (full fine-tuning
    of a ViT allocates 4 KiB less at batch 1 than the line through batch 4 and 12 says).
    """

    def __init__(self, spec: RunSpec) -> None:
        classes = num_classes(spec.data, spec.data_root)  # real tensors: some datasets are read to count classes
        with torch.device("meta"):
            self.tuned = build_model(spec, classes)
        self.img_size = model_img_size(self.tuned.backbone, spec.backbone.img_size)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            self.model = self.tuned.module.to_empty(device="cpu")
            self.optimizer = make_optimizer(self.tuned.trainable_parameters(), spec.optimizer)
        self.warm = False
        # (precision, device, inference, CUDA target) → batch size → (training timeline, inference timeline or None)
        self.traces: dict[tuple[str, str, bool, CudaTarget | None], dict[int, tuple[Timeline, Timeline | None]]] = {}
        self.flops: dict[tuple[str, str], dict[int, int]] = {}  # (precision, device) → batch → training-step FLOPs
        self.scaler: FakeGradScaler | None = None  # fp16-mixed CUDA runs: GradScaler's state, made once like AdamW's
        self.load_order = _load_order(self.model)
        self.replays: dict[str, DeviceReplay] = {}  # CUDA replays by (run protocol, batch, card) key

    def _trace(self, spec: RunSpec, target: CudaTarget | None) -> tuple[Timeline, Timeline | None]:
        """Run the tracked inference forward and training step at the spec's batch size; their timelines. A CUDA
        spec runs as CUDA would on `target` (its autocast policy and kernels, petlbench/estimate/cuda.py)."""
        infer: Timeline | None = None
        cuda = CudaEmulation(target) if target is not None else None
        with self.mode, _ScalarDraws(), cuda if cuda is not None else nullcontext():
            x = torch.empty(spec.batch_size, 3, self.img_size, self.img_size)
            y = torch.zeros(spec.batch_size, dtype=torch.int64)
            if spec.measure.inference:
                self.model.eval()
                recorder = TensorTracker()
                tracked_inference(self.model, x, _autocast(spec, cuda), tracker=recorder)
                infer = recorder.timeline()
            self.model.train()
            if not self.warm:
                self._create_optimizer_state()
            recorder = TensorTracker()
            if cuda is None:
                step = TrainStep(self.model, self.optimizer, spec.precision, "cpu")  # the worker's step
            else:
                scaler = self._scaler(spec)
                step = CudaTrainStep(self.model, self.optimizer, spec.precision, cuda, scaler)
                if scaler is not None:
                    recorder.register(scaler.state_tensors(), "optimizer")
            with FlopCounterMode(display=False) as counter:  # counts shapes only: no tensor, no byte
                tracked_train_step(step, x, y, tracker=recorder)
            train = recorder.timeline()
        self.flops.setdefault((spec.precision, spec.device), {})[spec.batch_size] = int(counter.get_total_flops())
        return train, infer

    def _scaler(self, spec: RunSpec) -> FakeGradScaler | None:
        """The fp16 loss scaler, its scale and growth tracker made before the tracked step as the worker's warm-up
        makes them (inside the fake mode)."""
        if spec.precision != "fp16-mixed":
            return None
        if self.scaler is None:
            self.scaler = FakeGradScaler()
            self.scaler.scale(torch.zeros(()))
        return self.scaler

    def step_flops(self, spec: RunSpec) -> int | None:
        """FLOPs of one training step at the spec's batch: counted where traced, else on the line through two
        traced batches (matmul FLOPs are linear in the batch)."""
        counted = self.flops.get((spec.precision, spec.device), {})
        if spec.batch_size in counted:
            return counted[spec.batch_size]
        anchors = sorted(counted)
        if len(anchors) < 2:
            return None
        lo, hi = anchors[0], anchors[-1]
        return counted[lo] + (counted[hi] - counted[lo]) * (spec.batch_size - lo) // (hi - lo)

    def _create_optimizer_state(self) -> None:
        """What the worker's warm-up steps leave behind: the optimizer's state (AdamW/SGD create it lazily in their
        first `step()`), no gradients. A step on zero gradients creates the same state without a forward/backward;
        every later step allocates alike (docs/measurement.md: step 2 = step 3)."""
        for param in self.tuned.trainable_parameters():
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.warm = True

    def _timelines(self, spec: RunSpec, target: CudaTarget | None) -> tuple[Timeline, Timeline | None]:
        key = (spec.precision, spec.device, spec.measure.inference, target)
        traced = self.traces.setdefault(key, {})
        batch = spec.batch_size
        if batch in traced:
            return traced[batch]
        anchors = sorted(b for b in traced if b >= 2)
        if batch >= 2 and len(anchors) >= 2:
            lo, hi = anchors[0], anchors[-1]
            train = at_batch(traced[lo][0], lo, traced[hi][0], hi, batch)
            infer_lo, infer_hi = traced[lo][1], traced[hi][1]
            infer = at_batch(infer_lo, lo, infer_hi, hi, batch) if infer_lo and infer_hi else None
            if train is not None and (infer is not None or not spec.measure.inference):
                return train, infer
            log.info("%s: the step is not affine in the batch size; tracing batch %d", spec.label(), batch)
        traced[batch] = self._trace(spec, target)
        return traced[batch]

    def device_replay(self, spec: RunSpec, target: Target) -> DeviceReplay:
        """The run's CUDA allocator replay on the target card (cached: the search probes a batch more than once)."""
        plan = device_plan(spec, target, self.load_order)
        key = json.dumps(
            [spec.precision, spec.measure.inference, spec.batch_size, plan.warmup_steps, plan.steps,
             plan.cpu_scalar_state, plan.cublas_bytes, plan.cublaslt_bytes, plan.config.setting]
        )  # fmt: skip
        found = self.replays.get(key)
        if found is None:
            train, infer = self._timelines(spec, target.cuda)
            found = replay_compiled(compile_timeline(train), compile_timeline(infer) if infer else None, plan)
            self.replays[key] = found
        return found

    def estimate(self, spec: RunSpec, target: Target | None = None) -> Metrics:
        """The run's predicted memory; a CUDA spec as it would run on `target` (default: the default preset)."""
        card = (target if target is not None else default_target()) if spec.device == "cuda" else None
        cuda = card.cuda if card is not None else None
        tuned = self.tuned
        metrics = Metrics(
            memory_source=ESTIMATE_SOURCE,
            params_total=tuned.params_total,
            params_trainable=tuned.params_trainable,
            params_added=tuned.params_added,
            weights_frozen_bytes=tuned.weights_frozen_bytes,
            weights_trainable_bytes=tuned.weights_trainable_bytes,
        )
        metrics.estimate_note, metrics.estimate_approximate = estimate_caveats(spec)
        round_to = CUDA_BLOCK if spec.device == "cuda" else 1
        train, infer = self._timelines(spec, cuda)
        if infer is not None:
            metrics.peak_infer_bytes = replay(infer, round_to).peak_bytes
        tracked = replay(train, round_to)
        metrics.peak_allocated_bytes = tracked.peak_bytes
        record_breakdown(metrics, tracked)
        if cuda is not None:
            metrics.attn_kernel = kernel_label(tracked.attn_kernel, cuda)
        metrics.step_flops = self.step_flops(spec)
        metrics.step_ops = train.calls
        if card is not None:  # the allocator's view: whole blocks, workspaces, reserved segments
            plan = device_plan(spec, card, self.load_order)
            approximate = record_device(metrics, self.device_replay(spec, card), card, plan)
            if approximate:
                metrics.estimate_approximate = True
                joiner = ", " if "approximate:" in (metrics.estimate_note or "") else "; approximate: "
                metrics.estimate_note = f"{metrics.estimate_note}{joiner}{', '.join(approximate)}"
        return metrics

    def why(self, spec: RunSpec, target: Target | None = None) -> WhyData:
        """The timeline and peak attribution of the run's (traced or replayed) training step."""
        card = (target if target is not None else default_target()) if spec.device == "cuda" else None
        train, _ = self._timelines(spec, card.cuda if card is not None else None)
        return summarize_step(train.events, train.owners, train.modules, CUDA_BLOCK if spec.device == "cuda" else 1)


class Estimator:
    """Estimates runs one after another, reusing the fake model of the previous run when it builds the same one.

    Only the latest model is kept, so feed runs grouped by model configuration (`estimate_many` does).
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._model: _FakeModel | None = None

    def _fake_model(self, spec: RunSpec) -> _FakeModel:
        key = model_key(spec)
        if self._model is None or key != self._key:
            self._model = None  # fake tensors hold no memory: no gc.collect() needed (it costs 0.3 s)
            self._model, self._key = _FakeModel(spec), key
        return self._model

    def estimate(self, spec: RunSpec, target: Target | None = None) -> Metrics:
        try:
            return self._fake_model(spec).estimate(spec, target)
        except BaseException:
            self._model = self._key = None  # a failed step can leave the model half-updated
            raise

    def estimate_why(self, spec: RunSpec, target: Target | None = None) -> tuple[Metrics, WhyData]:
        """The estimate and the step's timeline/attribution (what `petlbench estimate` stores beside the row)."""
        metrics = self.estimate(spec, target)
        assert self._model is not None
        return metrics, self._model.why(spec, target)

    def search(self, spec: RunSpec, request: SearchRequest, target: Target | None = None) -> Estimate:
        """The largest batch predicted to fit `request.limit_bytes` for this spec's configuration: a CUDA run on a
        card fits when its reserved memory + context + headroom does (petlbench/estimate/gpus.py), any other when
        its peak does."""
        peaks: dict[int, Metrics] = {}
        card = target if spec.device == "cuda" and target is not None and target.memory_bytes is not None else None
        # the inference forwards leave segments the training steps reuse: CUDA replays keep them
        probe_spec = (
            spec
            if card is not None
            else spec.model_copy(update={"measure": spec.measure.model_copy(update={"inference": False})})
        )

        def needs(batch: int) -> int:
            if batch not in peaks:
                peaks[batch] = self.estimate(probe_spec.model_copy(update={"batch_size": batch}), target)
            m = peaks[batch]
            if card is not None:
                return (m.peak_reserved_bytes or 0) + card.context_bytes + card.headroom_bytes
            return m.peak_allocated_bytes or 0

        def fits(batch: int) -> bool:
            if card is not None:
                needs(batch)
                return bool(fits_card(peaks[batch].peak_reserved_bytes, card))
            return needs(batch) <= request.limit_bytes

        g = request.multiple_of
        b1 = max(request.min, g)
        b2 = min(request.max // g * g, b1 + 8 * g)
        seed = linear_seed(b1, needs(b1), b2, needs(b2), request.limit_bytes)
        result = search_max_batch(fits, lo=request.min, hi=request.max, multiple_of=g, seed=seed)
        best = why = None
        if result.best is not None:  # the full estimate (inference peak too) at the answer
            best, why = self.estimate_why(spec.model_copy(update={"batch_size": result.best}), target)
        searched = FitSearch(  # stored on the row, so the report shows this answer and no other size
            gpu=card.label if card is not None else fmt_bytes(request.limit_bytes).replace(".0 ", " "),
            memory_bytes=request.limit_bytes,
            max_batch=result.best,
            first_over=result.first_over,
            reserved_bytes=best.peak_reserved_bytes if best is not None else None,
            allocated_bytes=best.peak_allocated_bytes if best is not None else None,
            required_bytes=needs(result.best) if result.best is not None else None,
        )
        return Estimate(
            run_id=spec.run_id,
            metrics=best,
            why=why,
            max_batch=result.best,
            first_over=result.first_over,
            probes=sorted((b, needs(b)) for b in peaks),
            fits=[searched],
        )

    def fit_search(self, spec: RunSpec, targets: Sequence[Target], known: Sequence[int]) -> list[FitSearch]:
        """Per target with a memory, the largest batch of this spec's configuration that fits it: a CUDA run by
        its reserved memory + context + headroom, a CPU run by its peak."""
        out = []
        for target in targets:
            if target.memory_bytes is None:
                continue

            def needs(batch: int, target: Target = target) -> tuple[int | None, int | None, int | None]:
                m = self.estimate(spec.model_copy(update={"batch_size": batch}), target)
                if spec.device != "cuda":
                    return m.peak_allocated_bytes, None, m.peak_allocated_bytes
                needed = required_bytes(m.peak_reserved_bytes, target)
                if needed is not None and fits_card(m.peak_reserved_bytes, target) is False:
                    needed = max(needed, (target.memory_bytes or 0) + 1)  # over a per-process memory fraction
                return needed, m.peak_reserved_bytes, m.peak_allocated_bytes

            out.append(search_fit(needs, target.memory_bytes, target.label, known))
        return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PetlbenchError):
        return str(exc)
    return describe_exception(exc)


def _configuration(spec: RunSpec) -> str:
    """Specs with the same key differ only in their batch size (one line of the fit table)."""
    return json.dumps(spec.model_dump(mode="json", exclude={"batch_size", "suite", "timeout_s"}), sort_keys=True)


def estimate_many(
    specs: Sequence[RunSpec],
    search: SearchRequest | None = None,
    targets: Sequence[Target] = (),
    fit_search: bool = False,
) -> Iterator[tuple[int, Estimate]]:
    """(index into `specs`, estimate) for every spec, processed grouped by model configuration for reuse.

    CUDA rows assume `targets[0]` (default: the default GPU preset); with `fit_search`, every configuration's
    estimates also carry, per target card, the largest batch that fits it."""
    order = sorted(range(len(specs)), key=lambda i: model_key(specs[i]))  # stable: suite order within a group
    estimator = Estimator()
    target = targets[0] if targets else None
    batches: dict[str, list[int]] = {}
    for spec in specs:
        batches.setdefault(_configuration(spec), []).append(spec.batch_size)
    searched: dict[str, list[FitSearch]] = {}
    for i in order:
        spec = specs[i]
        start = time.perf_counter()
        try:
            if search is not None:
                estimate = estimator.search(spec, search, target)
            else:
                metrics, why = estimator.estimate_why(spec, target)
                estimate = Estimate(run_id=spec.run_id, metrics=metrics, why=why)
            if fit_search and search is None:
                key = _configuration(spec)
                if key not in searched:
                    searched[key] = estimator.fit_search(spec, targets, batches[key])
                estimate.fits = searched[key]
        except Exception as exc:
            log.error("estimate of %s (%s) failed:\n%s", spec.run_id, spec.label(), traceback.format_exc())
            estimate = Estimate(run_id=spec.run_id, error=_describe(exc))
        estimate.seconds = time.perf_counter() - start
        yield i, estimate


def _emit(message: dict[str, Any]) -> None:
    print(MESSAGE_PREFIX + json.dumps(message), flush=True)


def _answer(request: EstimateRequest, env: dict[str, EnvValue]) -> EstimateResponse:
    results: list[Estimate | None] = [None] * len(request.specs)
    for i, estimate in estimate_many(request.specs, request.search, request.targets, request.fit_search):
        estimate.env = env
        results[i] = estimate
        _emit({"label": request.specs[i].label()})  # the parent's progress bar
    return EstimateResponse(estimates=[e for e in results if e is not None])


def matmul_rate(size: int = 256, trials: int = 5, repeats: int = 4) -> float:
    """One core's fp32 matmul rate in FLOP/s, the best of a few short trials timed in CPU time (about 50 ms in all,
    so neither a moment of contention nor other processes halve it): what a CPU plan's time is predicted from
    (petlbench/estimate/guard.py)."""
    with _one_thread():
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: kernels chosen
        best = float("inf")
        for _ in range(trials):
            start = time.process_time()
            for _ in range(repeats):
                a @ b
            best = min(best, time.process_time() - start)
    return 2.0 * size**3 * repeats / max(best, 1e-9)


def op_seconds(trials: int = 5, repeats: int = 400) -> float:
    """One core's CPU time per small aten op (the dispatch and bookkeeping every op pays, which dominates the steps
    of a tiny model), the best of a few trials."""
    with _one_thread():
        x = torch.randn(16, 16)
        best = float("inf")
        for _ in range(trials):
            start = time.process_time()
            for _ in range(repeats):
                torch.add(x, x)
            best = min(best, time.process_time() - start)
    return best / repeats


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Serve requests: one JSON EstimateRequest per stdin line, each answered on stdout (what the CLI starts)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m petlbench.estimate.engine  (serves JSON requests on stdin)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from petlbench.measure.env import collect_env

    env = collect_env(torch.device("cpu"))
    env["matmul_flops_per_s"] = matmul_rate()
    env["op_seconds"] = op_seconds()
    for line in sys.stdin:
        if line.strip():
            response = _answer(EstimateRequest.model_validate_json(line), env)
            _emit({"response": response.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    from petlbench.executors.process import die_with_parent

    die_with_parent()  # a CLI killed with -9 takes its estimator processes with it
    sys.exit(main())
