"""The Hugging Face hub, torch-free: is it reachable, and does the local cache hold a timm model's weights.

The parent's pre-flight uses this to stop a suite with an offline, uncached hub tag before any worker starts
(a worker needs seconds just to import torch and timm); the worker checks again with timm's own pretrained config.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

HUB_HOST: Final = "huggingface.co"
# the files timm's hub loader tries (safetensors first)
HUB_FILES: Final = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "open_clip_model.safetensors",
)
HUB_HINT: Final = (
    "download it where there is network (e.g. `hf download timm/<model>.<tag> model.safetensors`) and set "
    "backbone.weights: /path/to/model.safetensors (or .pth / the original ViT .npz)"
)


def hub_address() -> tuple[str, int]:
    """Host and port of the hub huggingface_hub talks to: $HF_ENDPOINT (a mirror) when set, else huggingface.co."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}")
    return endpoint.hostname or HUB_HOST, endpoint.port or (80 if endpoint.scheme == "http" else 443)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect within `timeout_s` (DNS failures are instant)."""
    try:
        with socket.create_connection(hub_address(), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set, or the hub does not answer."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return not hub_reachable()


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def timm_weights_cached(model: str) -> bool:
    """Whether the hub cache may hold `model`'s weights: `timm/<model>` for a tagged name, any `timm/<arch>.<tag>`
    for a bare one. timm hosts its ViT weights under `timm/`; a False is certain only for those."""
    cache = hub_cache_dir()
    if not cache.is_dir():
        return False
    arch, _, tag = model.partition(".")
    prefix = f"models--timm--{model}" if tag else f"models--timm--{arch}"
    repos = [r for r in cache.iterdir() if r.name == prefix or (not tag and r.name.startswith(prefix + "."))]
    return any((snapshot / name).is_file() for r in repos for snapshot in r.glob("snapshots/*") for name in HUB_FILES)
