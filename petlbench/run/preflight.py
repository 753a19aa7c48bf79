"""Pre-flight: the cheap checks of a suite's files, in the (torch-free) parent, before any run starts.

For every distinct file-based dataset of a suite: the folders, the list files, empty splits, labels against the
task's class count, and that every listed image exists (no decoding). For local checkpoints: that the file exists.
For hub tags without network: that the Hugging Face cache holds the weights. Then every distinct model is built
once on the meta device in one child process (petlbench/run/probe.py): unknown or non-ViT models, unknown timm
kwargs, impossible shapes and knobs, peft configs peft refuses, and checkpoint files that do not parse.
A problem is one `DataError`/`ConfigError` line naming the suite field and the file (and line), so `petlbench
validate` and `petlbench run` exit with code 2 before spending any time. An image that exists but does not decode
can only be found by a worker; `petlbench run` then exits 2 too, after the other runs have finished and been saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from petlbench.data.files import FileIndex, index_data
from petlbench.data.hub import HUB_HINT, hub_address, hub_cache_dir, hub_offline, timm_weights_cached
from petlbench.data.specs import DATA_ROOT_ENV, ImageFolderData, VtabData, data_label
from petlbench.errors import ConfigError, DataError
from petlbench.executors.forkclient import ForkServers
from petlbench.run.probe import probe_suite
from petlbench.spec.models import RunSpec, Suite


@dataclass(frozen=True)
class DataCheck:
    """One checked dataset of a suite (for `validate` to print)."""

    where: str  # data[2]
    label: str  # vtab1k/dtd
    index: FileIndex

    def describe(self) -> str:
        i = self.index
        return (
            f"{self.where} {self.label}: {len(i.train)} train ({i.train_split}), {len(i.test)} test ({i.test_split}), "
            f"{i.num_classes} classes, {i.folder} [{i.fingerprint}]"
        )


def check_data_root(data_root: Path | None, from_option: bool) -> None:
    """A given data root must be a folder (the option or the environment variable, named as the user gave it)."""
    if data_root is not None and not data_root.is_dir():
        name = "--data-root" if from_option else f"${DATA_ROOT_ENV}"
        raise ConfigError(f"{name} {data_root}: no such folder")


def preflight(
    suite: Suite, runs: Sequence[RunSpec], data_root: Path | None, servers: ForkServers | None = None
) -> list[DataCheck]:
    """Check every file-based dataset, local checkpoint and offline hub tag the runs use, then build every model on
    the meta device (the probe, forked from `servers` when given); raise on the first problem."""
    checks: list[DataCheck] = []
    for position, data in enumerate(suite.datasets()):
        if not isinstance(data, VtabData | ImageFolderData):
            continue
        where = f"data[{position}]" if isinstance(suite.data, list) else "data"
        label = data_label(data)
        try:
            index = index_data(data, data_root)
        except DataError as exc:
            raise DataError(f"{suite.source}: {where} ({label}): {exc}") from None
        checks.append(DataCheck(where, label, index))
    seen: set[str] = set()
    for run in runs:
        weights = run.backbone.weights
        if weights in ("random", "hub") or weights in seen:
            continue
        seen.add(weights)
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{suite.source}: backbone.weights: {path.absolute()}: no such checkpoint file; "
                "give a .safetensors, .pth or original ViT .npz path, 'hub' or 'random'"
            )
    hub_models = sorted({run.backbone.model for run in runs if run.backbone.weights == "hub"})
    _check_hub(suite, hub_models)
    # Last, as the slowest check: every distinct model built once on the meta device (peft configs included), in
    # one child.
    probe_suite(suite, runs, servers)
    return checks


def _check_hub(suite: Suite, hub_models: list[str]) -> None:
    if hub_models and hub_offline():
        for model in hub_models:
            if not timm_weights_cached(model):
                raise ConfigError(
                    f"{suite.source}: backbone.weights: hub: {model!r} is not in the local Hugging Face cache "
                    f"({hub_cache_dir()}) and {hub_address()[0]} is unreachable; {HUB_HINT}"
                )
