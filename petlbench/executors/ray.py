"""Ray executor (optional extra `petlbench[ray]`): each run is a Ray task, anywhere on a cluster.

The task is `local.run_on_node`: what the local executor does (the worker in a fresh subprocess with the run's
timeout, a crash or timeout turned into a row), returning the result and the worker's log, because the results
folder lives on the driver, which writes both. Every task requests `cpus_per_run` CPUs, and its worker gets that
many threads; a CUDA run also requests one GPU (Ray sets CUDA_VISIBLE_DEVICES for the task, the worker inherits it).
Ray does not retry a task: a lost node is an `error` row, retried by the next `petlbench run`.

Connecting: with no address, `ray.init()` starts a private local Ray instance for this sweep and stops it after;
`address="auto"` (or `ray://host:10001`, `host:6379`) joins a running cluster (`ray start --head` on one node,
`ray start --address HEAD:6379` on the others) and leaves it running. If Ray is already initialised in this
process (a notebook, a test), that connection is used as is. Every node needs petlbench installed; the driver's
PYTHONPATH and PETLBENCH_* variables (plugins) are passed to the tasks.

`ray` is imported only when this executor is used, so petlbench works without it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from petlbench.errors import ConfigError, DeviceError
from petlbench.executors.devices import thread_env
from petlbench.executors.events import RunEvent, RunFinished, RunStarted
from petlbench.executors.local import log_folder, log_path, run_on_node
from petlbench.executors.watchdog import Watchdog, start_watchdog
from petlbench.fmt import describe_exception, first_line
from petlbench.results import RunResult, failed_result
from petlbench.spec.models import RunSpec
from petlbench.system.safeio import write_text

log = logging.getLogger(__name__)

INSTALL_HINT: Final = 'pip install "petlbench[ray]"'
CANCEL_GRACE_S: Final = 30.0  # how long an interrupt waits for cancelled tasks to kill their workers
FORWARDED_PREFIXES: Final = ("PETLBENCH_",)
FORWARDED_NAMES: Final = ("PYTHONPATH",)


def import_ray() -> ModuleType:
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError(f"--executor ray: Ray is not installed; {INSTALL_HINT}") from None


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables every task needs: PYTHONPATH (where petlbench and plugins live), PETLBENCH_*."""
    environ = os.environ if environ is None else environ
    return {
        key: value for key, value in environ.items() if key in FORWARDED_NAMES or key.startswith(FORWARDED_PREFIXES)
    }


class RayExecutor:
    """Submits each spec as a Ray task and yields results as they finish; the driver writes them.

    Args:
        results_dir: where the driver writes the worker logs it receives (`results/<suite>/logs/`).
        address: None starts a local Ray instance for this sweep; 'auto' or an address joins a running cluster.
        env: extra environment for every worker.
        max_in_flight: at most this many runs submitted at once (None: all of them; Ray's resources decide).
        cpus_per_run: CPUs each task requests, and the worker's thread budget.
    """

    def __init__(
        self,
        results_dir: Path,
        address: str | None = None,
        env: Mapping[str, str] | None = None,
        max_in_flight: int | None = None,
        cpus_per_run: int = 1,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError(f"--jobs: must be ≥ 1, got {max_in_flight}")
        if cpus_per_run < 1:
            raise ConfigError(f"cpus_per_run: must be ≥ 1, got {cpus_per_run}")
        self._ray = import_ray()  # fail before anything runs when the extra is missing
        self.results_dir = results_dir
        self.address = address
        self.env = dict(env or {})
        self.max_in_flight = max_in_flight
        self.cpus_per_run = cpus_per_run
        self._watchdog: Watchdog | None = None

    def __str__(self) -> str:
        where = f"cluster at {self.address}" if self.address else "local instance"
        limit = f", at most {self.max_in_flight} runs at a time" if self.max_in_flight else ""
        return f"ray ({where}{limit})"

    def _connect(self) -> bool:
        """Initialise Ray unless it already is; True when this call did (and so must shut it down)."""
        ray = self._ray
        if ray.is_initialized():
            return False
        try:
            if self.address is None:
                log.info("starting a local Ray instance (pass --address auto to use a running cluster)")
                # Ray's daemons do not die with this process: a watchdog kills them if it is killed (-9)
                self._watchdog = start_watchdog()
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        except ConnectionError as exc:
            self._stop_watchdog()
            raise ConfigError(
                f"--address {self.address}: cannot reach a Ray cluster ({first_line(exc) or type(exc).__name__}); "
                "start one with `ray start --head`"
            ) from None
        except BaseException:
            self._stop_watchdog()
            raise
        return True

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _options(self, spec: RunSpec) -> dict[str, Any]:
        resources: dict[str, Any] = {"num_cpus": self.cpus_per_run}
        if spec.device == "cuda":
            resources["num_gpus"] = 1
        return {
            **resources,
            "max_retries": 0,  # one run, one row: a lost node is an error row, retried by the next `run`
            "runtime_env": {"env_vars": forwarded_env()},
            "name": f"petlbench:{spec.run_id}",
        }

    def _check_resources(self, specs: Sequence[RunSpec]) -> None:
        """A CUDA run on a cluster without GPUs would wait forever; say so instead."""
        if any(s.device == "cuda" for s in specs) and self._ray.cluster_resources().get("GPU", 0) < 1:
            raise DeviceError("device cuda: the Ray cluster has no GPU; use --device cpu or add a GPU node")

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        if not specs:
            return
        ray = self._ray
        started_here = self._connect()
        remote = ray.remote(run_on_node)
        env = {**self.env, **thread_env(self.cpus_per_run)}
        waiting = list(specs)
        pending: dict[Any, RunSpec] = {}  # ObjectRef → spec
        try:
            self._check_resources(specs)
            while waiting or pending:
                while waiting and (self.max_in_flight is None or len(pending) < self.max_in_flight):
                    spec = waiting.pop(0)
                    pending[remote.options(**self._options(spec)).remote(spec.model_dump_json(), env)] = spec
                    yield RunStarted(spec)  # submitted; Ray starts it when a slot is free
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    spec = pending.pop(ref)
                    yield RunFinished(self._collect(ref, spec))
        except BaseException:  # Ctrl-C, the caller stopped listening, or an error: stop every outstanding task
            self._cancel(pending)
            raise
        finally:
            if started_here:
                ray.shutdown()
            self._stop_watchdog()

    def _collect(self, ref: Any, spec: RunSpec) -> RunResult:
        try:
            result_json, log_text = self._ray.get(ref)
        except Exception as exc:  # the task itself failed: worker process or node died, runtime env failed, ...
            return failed_result(spec, "error", f"ray task failed: {describe_exception(exc)}")
        write_text(log_folder(self.results_dir, spec) / log_path(self.results_dir, spec).name, log_text)
        return RunResult.model_validate_json(result_json)

    def _cancel(self, pending: Mapping[Any, RunSpec]) -> None:
        """Cancel queued tasks and interrupt running ones (each kills its worker), then wait for them to end."""
        if not pending:
            return
        ray = self._ray
        refs = list(pending)
        for ref in refs:
            try:
                ray.cancel(ref, force=False)
            except Exception as exc:
                log.warning("could not cancel run %s: %s", pending[ref].run_id, exc)
        _, left = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        if left:
            log.warning(
                "%d cancelled runs did not stop within %g s: %s",
                len(left),
                CANCEL_GRACE_S,
                ", ".join(pending[r].run_id for r in left),
            )
