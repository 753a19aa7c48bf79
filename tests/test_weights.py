"""Weights sources: a local original-ViT .npz, the identity recorded on every row, and offline hub tags."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from petlbench.backbone import build_backbone, file_sha256, prepare_hub_access, weights_identity
from petlbench.cli.app import app
from petlbench.errors import ConfigError
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import BackboneSpec
from tests.conftest import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]


def save_original_vit_npz(model: nn.Module, path: Path) -> None:
    """Write a timm ViT in the layout of Google's original ViT .npz files (`ViT-B_16.npz`): the inverse of the
    transposes timm's `_load_weights` applies, so loading it back must reproduce the model exactly."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads  # type: ignore[index,union-attr]
    dim = sd["cls_token"].shape[-1]
    w: dict[str, np.ndarray] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW → HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):  # type: ignore[arg-type]
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[mha + f"{name}/kernel"] = qkv_w[rows].T.reshape(dim, heads, dim // heads)
            w[mha + f"{name}/bias"] = qkv_b[rows].reshape(heads, dim // heads)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_original_vit_npz_reproduces_logits(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_backbone(TINY_BACKBONE, 10).eval()
    path = tmp_path / "ViT-tiny.npz"
    save_original_vit_npz(source, path)
    torch.manual_seed(4)  # a different random init, overwritten by the checkpoint
    loaded = build_backbone(TINY_BACKBONE.model_copy(update={"weights": str(path)}), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # another class count keeps the backbone and re-initialises the head (as a 21k checkpoint on a VTAB task)
    torch.manual_seed(4)
    other = build_backbone(TINY_BACKBONE.model_copy(update={"weights": str(path)}), 7).eval()
    with torch.no_grad():
        assert torch.equal(other.forward_features(x), source.forward_features(x))  # type: ignore[operator]


def test_an_npz_of_another_model_is_a_one_line_config_error(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, **{"embedding/kernel": np.zeros((8, 8, 3, 64), dtype=np.float32)})
    with pytest.raises(ConfigError) as info:
        build_backbone(TINY_BACKBONE.model_copy(update={"weights": str(path)}), 10)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"backbone.weights: {path}: not an original ViT .npz")


def test_rows_record_which_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(build_backbone(TINY_BACKBONE, 10).state_dict(), path)
    suite = {
        "name": "w",
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 10},
        "backbone": {**TINY_BACKBONE.model_dump(), "weights": str(path)},
        "batch_size": 4,
        "measure": {"warmup_steps": 2, "steps": 1, "breakdown": False, "inference": False},
        "tuners": [{"tuner": "linear"}],
    }
    result = execute(expand(parse_suite(suite), "cpu")[0])
    assert result.status == "ok", result.error
    m = result.metrics
    assert (m.weights_source, m.weights_ref, m.weights_sha256) == ("file", str(path), file_sha256(path))
    assert len(m.weights_sha256 or "") == 16
    assert m.data_task == "synthetic" and m.num_classes == 10
    assert weights_identity(TINY_BACKBONE).source == "random"


def test_offline_hub_tag_fails_fast_with_the_local_file_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the tag fails before the model is built, in well under 5 s, naming how to pass a file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = BackboneSpec(model="vit_base_patch16_224.augreg2_in21k_ft_in1k", weights="hub")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build_backbone(spec, 10)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 5.0, elapsed
    assert "\n" not in message
    assert "not in the local Hugging Face cache" in message
    assert "set backbone.weights: /path/to/model.safetensors" in message


@pytest.mark.slow
def test_offline_hub_tag_fails_fast_in_a_fresh_worker(tmp_path: Path) -> None:
    """The whole worker path with no network: reachability probe, offline mode, the check; one error row.

    The time limit covers our code after the interpreter has imported torch and timm (which alone can take
    longer than 5 s on a loaded 2-core machine), as logged by the worker.
    """
    suite = {
        "name": "hub",
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 10},
        "backbone": {"model": "vit_base_patch16_224.augreg2_in21k_ft_in1k", "weights": "hub"},
        "batch_size": 2,
        "tuners": [{"tuner": "linear"}],
    }
    spec = expand(parse_suite(suite), "cpu")[0]
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    # no network, whatever this machine has: the hub is a closed local port, the cache an empty folder
    env |= {"PYTHONPATH": str(ROOT), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "petlbench.run.worker", str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    from petlbench.results import RunResult

    result = RunResult.model_validate_json((tmp_path / "out.json").read_text())
    assert proc.returncode == 1 and result.status == "error" and result.error_type == "ConfigError"
    assert result.error is not None and "set backbone.weights: /path/to/model.safetensors" in result.error
    # not a speed target: hub downloads retry with back-off for minutes; failing at once takes seconds even on a
    # loaded machine (8 s seen with three other test workers on two cores)
    assert result.duration_s is not None and result.duration_s < 60.0, (result.duration_s, proc.stderr[-2000:])


def test_prepare_hub_access_goes_offline_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.setattr("petlbench.backbone.hub_reachable", lambda timeout_s=2.0: False)
    start = time.perf_counter()
    prepare_hub_access(BackboneSpec(weights="hub"))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and time.perf_counter() - start < 1.0


def hub_suite(path: Path, model: str) -> Path:
    suite = {
        "name": "hub",
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 10},
        "backbone": {"model": model, "weights": "hub"},
        "tuners": [{"tuner": "linear"}],
    }
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


@pytest.mark.parametrize("offline", ["env", "unreachable"])
def test_offline_hub_tag_stops_the_suite_before_any_run(
    tmp_path: Path, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch, offline: str
) -> None:
    """The parent's pre-flight (torch-free) fails an uncached hub tag without network in well under 5 s."""
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("petlbench.data.hub.hub_reachable", lambda timeout_s=2.0: False)
    suite = hub_suite(tmp_path / "hub.yaml", "vit_base_patch16_224.augreg2_in21k_ft_in1k")
    for command in (["validate", str(suite)], ["run", str(suite), "--results-dir", str(tmp_path / "results")]):
        start = time.perf_counter()
        result = CliRunner().invoke(app, command)
        elapsed = time.perf_counter() - start
        assert result.exit_code == 2, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: {suite}: backbone.weights: hub: 'vit_base_patch16_224.augreg2_in21k_ft_in1k'")
        assert "set backbone.weights: /path/to/model.safetensors" in line
        assert elapsed < 5.0, elapsed
    assert not (tmp_path / "results").exists()


def test_a_cached_hub_tag_passes_the_preflight(
    tmp_path: Path, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = empty_hub_cache / "models--timm--vit_base_patch16_224.augreg2_in21k_ft_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").touch()
    for model in ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_base_patch16_224"):  # tagged, default tag
        result = CliRunner().invoke(app, ["validate", str(hub_suite(tmp_path / "hub.yaml", model))])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["validate", str(hub_suite(tmp_path / "hub.yaml", "vit_small_patch16_224"))])
    assert result.exit_code == 2 and "'vit_small_patch16_224' is not in the local Hugging Face cache" in result.output


def test_the_hub_probe_follows_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from petlbench.data.hub import hub_address

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org:8443")
    assert hub_address() == ("hf-mirror.example.org", 8443)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1")
    assert hub_address() == ("127.0.0.1", 80)
