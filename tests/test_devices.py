"""Who runs where, without a GPU: the device pool with fake device lists, and the local executor's use of it."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from petlbench.errors import ConfigError
from petlbench.executors import RunFinished, RunStarted, local
from petlbench.executors.devices import DevicePool, gpu_env, resolve_jobs, thread_env, threads_per_run
from petlbench.executors.local import LocalExecutor
from petlbench.results import RunResult, failed_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from tests.conftest import TINY_BACKBONE

UUIDS = ["GPU-8f3c2a1e-0000-4d6b-9a7e-1c2d3e4f5a6b", "GPU-11111111-2222-3333-4444-555555555555"]


@pytest.mark.parametrize("devices", [["0", "1"], UUIDS, ["0"], ["MIG-0f1e2d3c-aaaa-bbbb-cccc-000000000001"]])
def test_pool_lends_each_device_once_lowest_first(devices: list[str]) -> None:
    pool = DevicePool(devices)
    taken = [pool.try_acquire() for _ in devices]
    assert taken == devices
    assert pool.try_acquire() is None  # all busy: a GPU is never given to a second run
    assert pool.busy == tuple(devices) and pool.free == ()
    pool.release(devices[-1])
    assert pool.try_acquire() == devices[-1]
    for device in devices:
        pool.release(device)
    assert pool.free == tuple(devices)


def test_pool_returns_the_lowest_free_device_after_out_of_order_releases() -> None:
    pool = DevicePool(["0", "1", "2"])
    for _ in range(3):
        pool.try_acquire()
    pool.release("2")
    pool.release("0")
    assert pool.free == ("0", "2")
    assert pool.try_acquire() == "0"


def test_lease_returns_the_device_when_the_run_fails() -> None:
    pool = DevicePool(["0"])
    with pytest.raises(RuntimeError), pool.lease() as device:
        assert device == "0" and pool.free == ()
        raise RuntimeError("worker crashed")
    assert pool.free == ("0",)


def test_pool_rejects_bad_device_lists_and_bad_releases() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DevicePool([])
    with pytest.raises(ValueError, match="listed twice: 1"):
        DevicePool(["0", "1", "1"])
    pool = DevicePool(["0", "1"])
    with pytest.raises(ValueError, match="not in this pool"):
        pool.release("7")
    with pytest.raises(ValueError, match="returned twice"):
        pool.release("0")  # never acquired


@pytest.mark.parametrize("devices", [["0", "1"], UUIDS, ["0"]])
def test_more_runs_than_devices_never_share_a_device(devices: list[str]) -> None:
    pool = DevicePool(devices)
    holders: dict[str, int] = {}
    lock = threading.Lock()
    clashes: list[str] = []
    used: list[str] = []

    def run(i: int) -> None:
        with pool.lease() as device:
            with lock:
                if device in holders:
                    clashes.append(f"run {i} got {device} while run {holders[device]} held it")
                holders[device] = i
                used.append(device)
            threading.Event().wait(0.002)  # hold it a moment, so the other threads contend
            with lock:
                del holders[device]

    with ThreadPoolExecutor(max_workers=4 * len(devices)) as threads:
        list(threads.map(run, range(12 * len(devices))))
    assert not clashes
    assert len(used) == 12 * len(devices) and set(used) <= set(devices)
    assert pool.free == tuple(devices)  # every device came back


def test_resolve_jobs() -> None:
    assert resolve_jobs("cpu", None, []) == 1
    assert resolve_jobs("cpu", 3, ["0"]) == 3
    assert resolve_jobs("cuda", None, ["0", "1"]) == 2  # default: one run per visible GPU
    assert resolve_jobs("cuda", None, UUIDS[:1]) == 1
    assert resolve_jobs("cuda", 1, ["0", "1"]) == 1
    with pytest.raises(ConfigError, match=r"--jobs: 3 parallel CUDA runs but only 2 GPU\(s\) visible \(0, 1\)"):
        resolve_jobs("cuda", 3, ["0", "1"])
    with pytest.raises(ConfigError, match="must be ≥ 1, got 0"):
        resolve_jobs("cpu", 0, [])


def test_thread_budget_splits_the_cores() -> None:
    assert threads_per_run(1, cores=16) == 16
    assert threads_per_run(4, cores=16) == 4
    assert threads_per_run(3, cores=16) == 5
    assert threads_per_run(4, cores=2) == 1  # never zero
    assert thread_env(4)["OMP_NUM_THREADS"] == "4"
    assert gpu_env(UUIDS[0]) == {"CUDA_VISIBLE_DEVICES": UUIDS[0]}


# --- the local executor with fake GPUs: `run_in_subprocess` replaced by a recorder, no worker started ---------


def specs(device: str, batch_sizes: list[int]) -> list[RunSpec]:
    suite = parse_suite(
        {
            "name": "fake",
            "device": device,
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_dump(),
            "batch_size": batch_sizes,
            "tuners": [{"tuner": "linear"}],
        }
    )
    return expand(suite, device)  # type: ignore[arg-type]


class FakeWorker:
    """Stands in for `run_in_subprocess`: records which GPU each run saw and whether any GPU was shared."""

    def __init__(self, fail: int | None = None) -> None:
        self.lock = threading.Lock()
        self.holders: dict[str, int] = {}
        self.clashes: list[str] = []
        self.seen: dict[int, str | None] = {}
        self.threads: dict[int, str | None] = {}
        self.fail = fail  # the batch size whose run raises

    def __call__(self, spec: RunSpec, results_dir: Path, env: Mapping[str, str] | None = None, **_: Any) -> RunResult:
        env = env or {}
        device = env.get("CUDA_VISIBLE_DEVICES")
        with self.lock:
            self.seen[spec.batch_size] = device
            self.threads[spec.batch_size] = env.get("OMP_NUM_THREADS")
            if device is not None:
                if device in self.holders:
                    self.clashes.append(f"bs {spec.batch_size} got {device}, held by bs {self.holders[device]}")
                self.holders[device] = spec.batch_size
        try:
            threading.Event().wait(0.002)  # hold the device a moment, so runs overlap
            if spec.batch_size == self.fail:
                raise RuntimeError("executor-side bug")
            return failed_result(spec, "skipped", f"fake run on {device}")
        finally:
            with self.lock:
                if device is not None:
                    del self.holders[device]


def test_local_executor_runs_each_cuda_run_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeWorker()
    monkeypatch.setattr(local, "run_in_subprocess", fake)
    runs = specs("cuda", [1, 2, 3, 4, 5, 6, 7])
    events = list(LocalExecutor(tmp_path, jobs=2, gpus=UUIDS).execute(runs))
    finished = [e.result for e in events if isinstance(e, RunFinished)]
    assert sorted(r.run_id for r in finished) == sorted(r.run_id for r in runs)  # one result per run
    assert sum(isinstance(e, RunStarted) for e in events) == len(runs)
    assert not fake.clashes
    assert set(fake.seen.values()) <= set(UUIDS)
    assert all(threads == str(threads_per_run(2)) for threads in fake.threads.values())


def test_two_gpus_run_two_runs_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    seen: list[str] = []

    def together(spec: RunSpec, results_dir: Path, env: Mapping[str, str] | None = None, **_: Any) -> RunResult:
        seen.append((env or {})["CUDA_VISIBLE_DEVICES"])
        barrier.wait(timeout=60)  # a sequential executor never gets past this
        return failed_result(spec, "skipped", "fake")

    monkeypatch.setattr(local, "run_in_subprocess", together)
    list(LocalExecutor(tmp_path, jobs=2, gpus=["0", "1"]).execute(specs("cuda", [1, 2])))
    assert sorted(seen) == ["0", "1"]


def test_a_failing_run_keeps_its_gpu_pool_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeWorker(fail=2)
    monkeypatch.setattr(local, "run_in_subprocess", fake)
    runs = specs("cuda", [1, 2, 3, 4])
    results = [
        e.result for e in LocalExecutor(tmp_path, jobs=1, gpus=["0"]).execute(runs) if isinstance(e, RunFinished)
    ]
    assert [r.spec.batch_size for r in results] == [1, 2, 3, 4]  # one job: in order, and the failure did not stop it
    failed = results[1]
    assert failed.status == "error" and "executor-side bug" in (failed.error or "")
    assert set(fake.seen.values()) == {"0"} and not fake.clashes


def test_cuda_runs_without_gpus_become_error_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local, "run_in_subprocess", FakeWorker())
    results = [e.result for e in LocalExecutor(tmp_path).execute(specs("cuda", [1])) if isinstance(e, RunFinished)]
    assert [r.status for r in results] == ["error"]


def test_cpu_runs_get_no_gpu_and_one_job_keeps_the_default_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeWorker()
    monkeypatch.setattr(local, "run_in_subprocess", fake)
    list(LocalExecutor(tmp_path, jobs=1, gpus=["0"]).execute(specs("cpu", [1, 2])))
    assert fake.seen == {1: None, 2: None}
    assert fake.threads == {1: None, 2: None}
