"""Build the timm ViT a run measures: random init, a timm hub tag, or a local checkpoint file.

The attention kernel is a controlled variable: timm reads its fused-attention flag when a module is built, so
it is set here, before `create_model`, and verified on the built model.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.data.hub import HUB_FILES, HUB_HINT, hub_reachable
from petlbench.errors import ConfigError
from petlbench.fmt import describe_exception, first_line
from petlbench.spec.models import BackboneSpec


def prepare_hub_access(spec: BackboneSpec) -> None:
    """Go offline before timm/huggingface_hub are imported when the hub cannot be reached.

    huggingface_hub retries for about a minute without a network; offline mode makes it answer from the local
    cache at once (or fail at once), so a hub tag on an air-gapped machine fails in seconds with our hint.
    The hub library copies the variable into `constants.HF_HUB_OFFLINE` when it is imported (timm imports it), so
    if that already happened the constant is set too.
    """
    if spec.weights == "hub" and "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            setattr(hub_constants, "HF_HUB_OFFLINE", True)  # noqa: B010 (a module typed as ModuleType)


def build_backbone(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """The timm model on CPU with a fresh `num_classes` head, weights loaded as `spec.weights` says."""
    import timm
    from timm.layers.config import set_fused_attn

    set_fused_attn(spec.fused_attn)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    kwargs.update(num_classes=num_classes, drop_path_rate=spec.drop_path_rate, drop_rate=spec.drop_rate)

    if spec.model.split(".")[0] not in timm.list_models():
        raise ConfigError(
            f"backbone.model: unknown timm model {spec.model!r}; see `timm.list_models('vit_*')` for names"
        )

    try:
        if spec.weights == "random":
            model = timm.create_model(spec.model, pretrained=False, **kwargs)
        elif spec.weights == "hub":
            model = _from_hub(spec, kwargs)
        else:
            model = timm.create_model(spec.model, pretrained=False, **kwargs)
            load_checkpoint(model, Path(spec.weights))
    except TypeError as exc:  # an argument the model's constructor does not take
        raise _constructor_error(spec, exc) from None

    if not isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
        raise ConfigError(f"backbone.model: {spec.model!r} is not a ViT with `blocks`; choose a timm vit_* model")
    _check_fused_attn(model, spec.fused_attn)
    return model


# BackboneSpec fields petlbench passes to every timm model; a model that rejects one is not a timm ViT
_SPEC_ARGS = {"img_size": "img_size", "drop_path_rate": "drop_path_rate", "drop_rate": "drop_rate"}


def _constructor_error(spec: BackboneSpec, exc: TypeError) -> ConfigError:
    """Name what the model did not accept: a `backbone.kwargs` key, or a ViT argument (then it is no ViT)."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    key = match.group(1) if match else None
    if key is not None and key in spec.kwargs:
        return ConfigError(
            f"backbone.kwargs.{key}: {spec.model!r} does not take {key!r}; remove it (timm said: {first_line(exc)})"
        )
    if key in _SPEC_ARGS:
        return ConfigError(
            f"backbone.model: {spec.model!r} does not take {key} (not a timm ViT); choose a timm vit_* model"
        )
    return ConfigError(f"backbone.model: cannot build {spec.model!r}: {describe_exception(exc)}")


def _from_hub(spec: BackboneSpec, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    _check_hub_cache(spec)
    try:
        return timm.create_model(spec.model, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "no network and not in the local Hugging Face cache" if offline else first_line(exc)
        raise ConfigError(
            f"backbone.weights: cannot get pretrained weights for {spec.model!r} ({why}); {HUB_HINT}"
        ) from None


def _check_hub_cache(spec: BackboneSpec) -> None:
    """Offline, fail before the model is built (seconds for ViT-B) when the hub cache lacks the weights."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.model)
    if cfg is None:
        raise ConfigError(f"backbone.weights: hub: timm has no pretrained weights for {spec.model!r}; {HUB_HINT}")
    if not cfg.hf_hub_id:
        return  # a plain URL (torch hub cache); timm reports that case itself
    from huggingface_hub import try_to_load_from_cache

    repo = cfg.hf_hub_id.split("@")[0]
    if not any(isinstance(try_to_load_from_cache(repo, name), str) for name in HUB_FILES):
        raise ConfigError(
            f"backbone.weights: hub: {spec.model!r} ({repo}) is not in the local Hugging Face cache and the hub "
            f"is unreachable (offline); {HUB_HINT}"
        )


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights a run used: recorded on every row."""

    source: str  # random | hub | file
    ref: str | None  # the hub repo (timm/<model>.<tag>) or the checkpoint's absolute path
    sha256: str | None  # first 16 hex digits of the checkpoint file's sha256 (hub: the cached file)


def weights_identity(spec: BackboneSpec, model: nn.Module | None = None) -> WeightsIdentity:
    """The identity of `spec.weights`: a hub tag's repo (and its cached file's hash), or a local file's hash."""
    if spec.weights == "random":
        return WeightsIdentity("random", None, None)
    if spec.weights == "hub":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        repo = str(cfg.get("hf_hub_id") or cfg.get("url") or spec.model).split("@")[0] or None
        cached = _cached_hub_file(repo) if cfg.get("hf_hub_id") else None
        return WeightsIdentity("hub", repo, file_sha256(cached) if cached else None)
    path = Path(spec.weights).expanduser().absolute()
    return WeightsIdentity("file", str(path), file_sha256(path) if path.is_file() else None)


def _cached_hub_file(repo: str | None) -> Path | None:
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for name in HUB_FILES:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


def file_sha256(path: Path, digits: int = 16) -> str:
    """Short sha256 of a file, read in 1 MiB chunks (a ViT-B checkpoint takes about a second)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:digits]


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint (.safetensors, .pth/.pt/.bin with weights_only, or an original ViT .npz).

    Classifier weights whose shape differs from the new head are dropped (the head is re-initialised).
    """
    if not path.is_file():
        raise ConfigError(f"backbone.weights: {path}: no such checkpoint file; give a .safetensors, .pth or .npz path")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        loader = getattr(model, "load_pretrained", None)
        if loader is None:
            raise ConfigError(f"backbone.weights: {path}: .npz checkpoints need a timm VisionTransformer")
        try:
            loader(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"backbone.weights: {path}: not an original ViT .npz for {type(model).__name__} "
                f"({describe_exception(exc, 200)}); check backbone.model"
            ) from None
        return
    state = _read_state_dict(path)
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)  # type: ignore[arg-type]  # any timm ViT
    own = model.state_dict()
    head = {k for k in state if k in own and state[k].shape != own[k].shape and k.startswith("head")}
    for key in head:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ConfigError(
            f"backbone.weights: {path} does not match {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {list(unexpected)[:3]}; check backbone.model"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"backbone.weights: {path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"backbone.weights: {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_fused_attn(model: nn.Module, wanted: bool) -> None:
    flags = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    if flags and flags != {wanted}:
        raise ConfigError(
            f"backbone.fused_attn: asked for {wanted} but the built model has {sorted(flags)} "
            "(timm's exportable mode or a torch without scaled_dot_product_attention disables it)"
        )
