"""The configuration probe: build every distinct model of a suite once, on the meta device, in one child.

Some configuration errors only show when a model is built: a timm model that does not exist or is no ViT, a
`backbone.kwargs` key the model does not take, `depth: -1`, an image size the patch size does not divide, a tuner
knob the backbone cannot carry (LoRA rank above the width), a peft config peft refuses, a checkpoint file that is
no checkpoint. Found by a worker they cost a whole sweep of failed rows; found here they are one line each before
any run starts.

How it works (the parent stays torch-free):
- `probe_suite(suite, runs)` (parent) collects the distinct backbones (weights set aside), the distinct models
  (one RunSpec per model configuration: backbone, tuner, knobs, checkpointing) and the local checkpoint files, and
  has one child build them: a child forked from the sweep's fork server when there is one (no second torch
  import), else `python -m petlbench.run.probe`. It raises one ConfigError with a line per problem, naming the
  suite file and the field (`suites/x.yaml: backbone.kwargs.depth: ...`, `suites/x.yaml: tuners[1].grid.r: ...`).
- The child (`probe`) builds each backbone under `torch.device("meta")` (shapes only, no memory, seconds for
  ViT-B), checks that it has blocks and that the patch size divides the image size, then builds each model with
  `build_model` (the builder every run uses), calls the tuner's `validate_on(model)` hook, and runs one forward
  pass on meta. A `KnobError` names the knob, which the child places where the user wrote it (grid, task_params,
  params). Checkpoints are parsed (a state dict, or an original ViT .npz) but not matched against the model.
- Extra validation for a tuner plugs in through `Tuner.validate_on(model)` (default: nothing): raise a
  TunerError/KnobError there and the probe reports it against the tuner's entry.
- An operation the meta device cannot run (NotImplementedError, "meta" in the message) is not a configuration
  error: that combination is left to the worker.
It runs as part of the pre-flight (petlbench/run/preflight.py), so `--no-preflight` skips it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from petlbench.data.specs import task_key
from petlbench.errors import ConfigError, KnobError, PetlbenchError
from petlbench.executors.forkclient import PROBE, ForkServers, call_child
from petlbench.fmt import first_line
from petlbench.spec.models import BackboneSpec, RunSpec, Suite, as_list

if TYPE_CHECKING:
    from torch import nn

PROBE_TIMEOUT_S: Final = 300.0
_MARK: Final = "petlbench-probe: "  # result lines on the child's stdout (anything else there is library noise)
_PROBE_CLASSES: Final = 10  # the head size does not change whether a configuration builds


class ProbeFailed(PetlbenchError):
    """The probe child itself failed (not a problem of the suite)."""


def probe_request(suite: Suite, runs: Sequence[RunSpec]) -> dict[str, Any]:
    """What the child builds: distinct backbones, one RunSpec per distinct model, checkpoint files."""
    declared = as_list(suite.backbone)
    many = isinstance(suite.backbone, list)
    backbones: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    models: list[dict[str, Any]] = []
    seen: set[str] = set()
    weights: dict[str, str] = {}
    entries: dict[tuple[int, str], set[str]] = {}
    for run in runs:
        position = next((i for i, b in enumerate(declared) if b == run.backbone), 0)
        where = f"backbone[{position}]" if many else "backbone"
        spec = run.backbone.model_copy(update={"weights": "random"})
        key = spec.model_dump_json()
        if key not in index:
            index[key] = len(backbones)
            backbones.append({"where": where, "spec": spec.model_dump(mode="json")})
        entry = _entry_of(suite, run, entries)
        # one build per model: batch, precision, seed and the rest do not change whether it builds
        model = run.model_copy(update={"backbone": spec, "batch_size": 2, "precision": "fp32", "seed": 0})
        model_key = json.dumps([index[key], entry, model.tuner, model.tuner_params, model.grad_checkpointing])
        if model_key not in seen:
            seen.add(model_key)
            tuner_entry = suite.tuners[entry]
            models.append(
                {
                    "backbone": index[key],
                    "where": f"tuners[{entry}]",
                    "task": task_key(run.data),
                    "grid": sorted(tuner_entry.grid),
                    "task_params": sorted(tuner_entry.task_params.get(task_key(run.data), {})),
                    "params": sorted(tuner_entry.params),
                    "spec": model.model_dump(mode="json"),
                }
            )
        if run.backbone.weights not in ("random", "hub"):
            weights.setdefault(run.backbone.weights, f"{where}.weights")
    return {
        "backbones": backbones,
        "models": models,
        "weights": [{"where": w, "path": p} for p, w in weights.items()],
    }


def _entry_of(suite: Suite, run: RunSpec, cache: dict[tuple[int, str], set[str]]) -> int:
    """The index of the `tuners` entry a run came from: the only entry of its tuner, or the one whose params, task
    params and a grid point validate to the run's knobs (two entries may use one tuner)."""
    same = [i for i, e in enumerate(suite.tuners) if e.tuner == run.tuner]
    if len(same) <= 1:
        return same[0] if same else 0
    from petlbench.tuners import available_tuners

    task = task_key(run.data)
    wanted = json.dumps(run.tuner_params, sort_keys=True)
    for index in same:
        if (index, task) not in cache:
            entry = suite.tuners[index]
            cls = available_tuners()[entry.tuner]
            params = {**entry.params, **entry.task_params.get(task, {})}
            keys = list(entry.grid)
            knobs = set()
            for values in itertools.product(*(entry.grid[k] for k in keys)):
                with contextlib.suppress(ValueError):  # expand refused invalid points already
                    config = cls.model_validate({**params, **dict(zip(keys, values, strict=True))})
                    knobs.add(json.dumps(config.model_dump(mode="json"), sort_keys=True))
            cache[index, task] = knobs
        if wanted in cache[index, task]:
            return index
    return same[0]


def probe_suite(
    suite: Suite, runs: Sequence[RunSpec], servers: ForkServers | None = None, timeout_s: float = PROBE_TIMEOUT_S
) -> None:
    """Build the suite's models on the meta device in one child; raise ConfigError naming each problem."""
    if not runs:
        return
    problems = run_probe(probe_request(suite, runs), servers, timeout_s)
    if problems:
        raise ConfigError("\n".join(f"{suite.source}: {line}" for line in problems))


def run_probe(
    request: dict[str, Any], servers: ForkServers | None = None, timeout_s: float = PROBE_TIMEOUT_S
) -> list[str]:
    """Send `request` to a probe child (forked from `servers` when given); its problem lines
    ('backbone.kwargs.depth: ...')."""
    hint = "skip it with --no-preflight (the workers then report these errors)"
    try:
        output = call_child(PROBE, json.dumps(request), servers, timeout_s)
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"pre-flight: the configuration probe took over {timeout_s:.0f} s; {hint}") from None
    lines = [line.removeprefix(_MARK) for line in output.stdout.splitlines() if line.startswith(_MARK)]
    if output.code != 0 or not lines or lines[-1] != "done":
        why = first_line(output.log.strip().splitlines()[-1] if output.log.strip() else f"exit {output.code}")
        raise ProbeFailed(f"pre-flight: the configuration probe failed ({why}); {hint}")
    return lines[:-1]


# ---------------------------------------------------------------------------------------------------------------
# The child (imports torch)


def _relabel(message: str, where: str) -> str:
    """'backbone.kwargs.x: ...' from the backbone builder, as the suite names that backbone ('backbone[1]...')."""
    return where + message.removeprefix("backbone") if message.startswith("backbone") else f"{where}: {message}"


def _not_probeable(exc: BaseException) -> bool:
    """The meta device cannot run this op: not the configuration's fault; the worker will tell."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()


def _check_depth(spec: BackboneSpec, where: str) -> str | None:
    depth = spec.kwargs.get("depth")
    if isinstance(depth, int) and not isinstance(depth, bool) and depth < 1:
        return f"{where}.kwargs.depth: {depth} gives a ViT without blocks; use depth >= 1"
    return None


def _check_backbone(model: nn.Module, spec: BackboneSpec, where: str) -> str | None:
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) == 0:
        return f"{where}.model: {spec.model!r} built without blocks; check backbone.kwargs"
    embed = getattr(model, "patch_embed", None)
    patch, size = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)
    if isinstance(patch, tuple) and isinstance(size, tuple) and any(s % p for s, p in zip(size, patch, strict=True)):
        field = "img_size" if spec.img_size is not None else "kwargs.patch_size"
        return (
            f"{where}.{field}: image size {size[0]} is not a multiple of the patch size {patch[0]}; choose an img_size "
            f"that {patch[0]} divides (e.g. {size[0] - size[0] % patch[0] or patch[0]})"
        )
    return None


def _check_weights(path: str, where: str) -> str | None:
    """The file parses as a checkpoint: a state dict (.safetensors, .pth/.pt/.bin) or an original ViT .npz."""
    from pathlib import Path

    file = Path(path).expanduser()
    if file.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(file) as archive:
                if not list(archive.keys()):
                    return f"{where}: {file}: an empty .npz; give an original ViT .npz checkpoint"
        except Exception as exc:
            why = first_line(exc, 120).split(". ")[0]
            return f"{where}: {file}: not a .npz checkpoint ({type(exc).__name__}: {why}); give an original ViT .npz"
        return None
    from petlbench.backbone import _read_state_dict

    try:
        state = _read_state_dict(file)
    except ConfigError as exc:
        why = str(exc).removeprefix(f"backbone.weights: {file}: ")
        why = why.removeprefix("cannot read checkpoint (").split(". ")[0].rstrip(")")
        return f"{where}: {file}: not a checkpoint ({first_line(why, 120)}); give a .safetensors, .pth or .npz file"
    if not state:
        return f"{where}: {file}: an empty state dict; give a checkpoint with weights"
    return None


def _forward(module: nn.Module, model: nn.Module) -> None:
    import torch

    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (224, 224)
    channels = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 3)
    with torch.no_grad():
        module(torch.empty(2, channels, *size, device="meta"))


def probe(request: dict[str, Any]) -> list[str]:
    """Build everything in `request` on the meta device; one line per problem (the child's work)."""
    import torch

    from petlbench.backbone import build_backbone

    problems: list[str] = []
    models: dict[int, nn.Module] = {}
    for i, item in enumerate(request["backbones"]):
        where, spec = item["where"], BackboneSpec.model_validate(item["spec"])
        problem = _check_depth(spec, where)
        if problem:
            problems.append(problem)
            continue
        try:
            with torch.device("meta"):
                model = build_backbone(spec, _PROBE_CLASSES)
            problem = _check_backbone(model, spec, where)
        except ConfigError as exc:
            problem = _relabel(str(exc), where)
        except Exception as exc:
            if _not_probeable(exc):
                continue
            problem = f"{where}: cannot build {spec.model!r} with these settings: {type(exc).__name__}: "
            problem += f"{first_line(exc, 160)}; check {where}.kwargs and {where}.img_size"
        if problem:
            problems.append(problem)
        else:
            models[i] = model
    for item in request["models"]:
        if item["backbone"] not in models:
            continue
        problem = _probe_model(item, request["backbones"][item["backbone"]]["spec"]["model"])
        if problem:
            problems.append(problem)
    for item in request["weights"]:
        problem = _check_weights(item["path"], item["where"])
        if problem:
            problems.append(problem)
    return list(dict.fromkeys(problems))


def _probe_model(item: dict[str, Any], model_name: str) -> str | None:
    """Build one model on meta as a run would; its problem line, or None."""
    import torch

    from petlbench.run.model import build_model

    spec = RunSpec.model_validate(item["spec"])
    where = item["where"]
    try:
        with torch.device("meta"):
            tuned = build_model(spec, _PROBE_CLASSES)
            tuned.tuner.validate_on(tuned.module)
            _forward(tuned.module, tuned.backbone)
    except KnobError as exc:
        return f"{_knob_location(item, exc.field)}: {exc.detail}"
    except NotImplementedError:  # the meta device cannot build it (peft's weight-initialised methods): the worker will
        return None
    except ConfigError as exc:
        return f"{where}: {exc}"
    except Exception as exc:
        if not _not_probeable(exc):
            return (
                f"{where}: {spec.tuner} cannot be applied to {model_name} with these knobs: "
                f"{type(exc).__name__}: {first_line(exc, 160)}"
            )
    return None


def _knob_location(item: dict[str, Any], field: str | None) -> str:
    """Where the user wrote the knob `field` (a path below params): the entry's grid, its task_params, or params;
    None is the entry's `tuner` itself."""
    where = item["where"]
    if field is None:
        return f"{where}.tuner"
    name = field.rpartition(".")[2]
    if name in item["grid"]:
        return f"{where}.grid.{name}"
    if name in item["task_params"]:
        return f"{where}.task_params.{item['task']}.{name}"
    if name in item["params"] and field != name:  # a nested field given at the top (peft: `r` beside peft_type)
        return f"{where}.params.{name}"
    return f"{where}.params.{field}"


def answer(request_text: str) -> str:
    """The child's whole output for a request: one marked line per problem, then a marked 'done'."""
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print keep the answer clean
        problems = probe(json.loads(request_text))
    return "".join(_MARK + line.replace("\n", " ") + "\n" for line in problems) + _MARK + "done\n"


def main() -> int:
    sys.stdout.write(answer(sys.stdin.read()))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    from petlbench.executors.process import die_with_parent

    die_with_parent()
    sys.exit(main())
