"""The configuration probe: build every distinct backbone + tuner of a suite once, on the meta device, in one child.

Some configuration errors only show when a model is built: a timm model that does not exist or is no ViT, a
`backbone.kwargs` key the model does not take, `depth: -1`, an image size the patch size does not divide, a tuner
knob the backbone cannot carry (LoRA rank above the width), a checkpoint file that is no checkpoint. Found by a
worker they cost a whole sweep of failed rows; found here they are one line each before any run starts.

How it works (the parent stays torch-free):
- `probe_suite(suite, runs)` (parent) collects the distinct backbones (weights set aside), the distinct
  (backbone, tuner, knobs) combinations and the local checkpoint files, sends them as JSON to one child,
  `python -m petlbench.spec.probe`, and raises one ConfigError with a line per problem, naming the suite file
  and the field (`suites/x.yaml: backbone.kwargs.depth: ...`, `suites/x.yaml: tuners[1]: ...`).
- The child (`main`) builds each backbone under `torch.device("meta")` (shapes only, no memory, seconds for
  ViT-B), checks that it has blocks and that the patch size divides the image size, then for each tuner builds
  `build_tuned_model` on a copy, calls the tuner's `validate_on(model)` hook, and runs one forward pass on meta.
  Checkpoints are parsed (a state dict, or an original ViT .npz) but not matched against the model.
- Extra validation for a tuner plugs in through `Tuner.validate_on(model)` (default: nothing): raise a
  TunerError/ConfigError there and the probe reports it against the tuner's entry.
- An operation the meta device cannot run (NotImplementedError, "meta" in the message) is not a configuration
  error: that combination is left to the worker.
It runs as part of the pre-flight (`petlbench/data/preflight.py`), so `--no-preflight` skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from petlbench.errors import ConfigError, PetlbenchError
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
    """What the child builds: distinct backbones, (backbone, tuner entry, knobs) combinations, checkpoint files."""
    declared = as_list(suite.backbone)
    many = isinstance(suite.backbone, list)
    backbones: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    tuners: list[dict[str, Any]] = []
    seen: set[str] = set()
    weights: dict[str, str] = {}
    for run in runs:
        position = next((i for i, b in enumerate(declared) if b == run.backbone), 0)
        where = f"backbone[{position}]" if many else "backbone"
        spec = run.backbone.model_copy(update={"weights": "random"}).model_dump(mode="json")
        key = json.dumps(spec, sort_keys=True)
        if key not in index:
            index[key] = len(backbones)
            backbones.append({"where": where, "spec": spec})
        entry = next((i for i, e in enumerate(suite.tuners) if e.tuner == run.tuner), 0)
        combo = {"backbone": index[key], "where": f"tuners[{entry}]", "tuner": run.tuner, "params": run.tuner_params}
        combo_key = json.dumps(combo, sort_keys=True)
        if combo_key not in seen:
            seen.add(combo_key)
            tuners.append(combo)
        if run.backbone.weights not in ("random", "hub"):
            weights.setdefault(run.backbone.weights, f"{where}.weights")
    return {
        "backbones": backbones,
        "tuners": tuners,
        "weights": [{"where": w, "path": p} for p, w in weights.items()],
    }


def probe_suite(suite: Suite, runs: Sequence[RunSpec], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Build the suite's configurations on the meta device in one child; raise ConfigError naming each problem."""
    if not runs:
        return
    problems = run_probe(probe_request(suite, runs), timeout_s)
    if problems:
        raise ConfigError("\n".join(f"{suite.source}: {line}" for line in problems))


def run_probe(request: dict[str, Any], timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Send `request` to a probe child; its problem lines ('backbone.kwargs.depth: ...')."""
    command = [sys.executable, "-m", "petlbench.spec.probe"]
    hint = "skip it with --no-preflight (the workers then report these errors)"
    try:
        done = subprocess.run(
            command,
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"pre-flight: the configuration probe took over {timeout_s:.0f} s; {hint}") from None
    lines = [line.removeprefix(_MARK) for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines or lines[-1] != "done":
        why = first_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
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
    import copy

    import torch

    from petlbench.backbone import build_backbone
    from petlbench.tuners import make_tuner
    from petlbench.tuners.base import build_tuned_model

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
    for item in request["tuners"]:
        base = models.get(item["backbone"])
        if base is None:
            continue
        where, name = item["where"], item["tuner"]
        try:
            tuner = make_tuner(name, item["params"])
            with torch.device("meta"):
                tuned = build_tuned_model(copy.deepcopy(base), tuner)
                tuner.validate_on(tuned.module)
                _forward(tuned.module, tuned.backbone)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
        except Exception as exc:
            if not _not_probeable(exc):
                problems.append(
                    f"{where}: {name} cannot be applied to {request['backbones'][item['backbone']]['spec']['model']}"
                    f" with these knobs: {type(exc).__name__}: {first_line(exc, 160)}"
                )
    for item in request["weights"]:
        problem = _check_weights(item["path"], item["where"])
        if problem:
            problems.append(problem)
    return list(dict.fromkeys(problems))


def main() -> int:
    request = json.loads(sys.stdin.read())
    for line in probe(request):
        print(_MARK + line.replace("\n", " "), flush=True)
    print(_MARK + "done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
