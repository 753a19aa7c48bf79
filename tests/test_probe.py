"""The configuration probe: configurations only a built model can judge are refused by `validate` and `run`
before any worker, in one child process that builds on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.run.probe import probe_request, run_probe
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.tuners import available_tuners
from tests.conftest import TinyVitFactory

HEAD = "name: probe\ndevice: cpu\ndata: {name: synthetic, num_classes: 10}\n"
TINY = "model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 2}"


def test_probe_names_each_configuration_error(tmp_path: Path, tiny_vit: TinyVitFactory) -> None:
    good = tmp_path / "good.pth"
    torch.save(tiny_vit().state_dict(), good)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    suite = tmp_path / "bad.yaml"
    suite.write_text(
        HEAD + "backbone:\n"
        "  - {model: vit_nope_patch16}\n"  # 0: no such timm model
        "  - {model: resnet18}\n"  # 1: not a ViT
        "  - {model: test_vit, kwargs: {bogus: 1}}\n"  # 2: unknown kwarg
        "  - {model: test_vit, img_size: 30, kwargs: {patch_size: 8}}\n"  # 3: patch does not divide
        "  - {model: test_vit, kwargs: {depth: -1}}\n"  # 4
        f"  - {{{TINY}, weights: {tmp_path / 'junk.pth'}}}\n"  # 5: not a checkpoint
        f"  - {{{TINY}, weights: {tmp_path / 'junk.npz'}}}\n"  # 6: not an npz
        f"  - {{{TINY}, weights: {good}}}\n"  # 7: fine
        "tuners: [{tuner: linear}, {tuner: lora, params: {rank: 900}}]\n"
    )
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(suite), "--no-preflight"]).exit_code == 0  # the schema is fine
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    lines = [line.removeprefix(f"error: {suite}: ") for line in result.output.splitlines()]
    assert "Traceback" not in result.output and len(lines) == 8, result.output
    expected = [
        "backbone[0].model: unknown timm model 'vit_nope_patch16'",
        "backbone[1].model: 'resnet18' is not a ViT",
        "backbone[2].kwargs.bogus: 'test_vit' does not take 'bogus'; remove it",
        "backbone[3].img_size: image size 30 is not a multiple of the patch size 8",
        "backbone[4].kwargs.depth: -1 gives a ViT without blocks; use depth >= 1",
        "tuners[1]: lora: tuner.rank 900 exceeds the qkv width 64",
        f"backbone[5].weights: {tmp_path / 'junk.pth'}: not a checkpoint",
        f"backbone[6].weights: {tmp_path / 'junk.npz'}: not a .npz checkpoint",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert not any("backbone[7]" in line for line in lines)  # a real checkpoint still loads


def test_run_refuses_before_any_worker(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        HEAD + "backbone: {model: test_vit, img_size: 30, kwargs: {patch_size: 8}}\ntuners: [{tuner: linear}]\n"
    )
    results = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert result.exit_code == 2, result.output
    assert f"error: {suite}: backbone.img_size: image size 30 is not a multiple of the patch size 8" in result.output
    assert not results.exists()  # no worker ran, no row was written


@pytest.mark.slow
def test_every_registered_tuner_probes_clean_on_a_valid_backbone(tmp_path: Path) -> None:
    """No false alarm: each tuner at its default knobs, on the tiny ViT and on ViT-B/16 (meta: no memory)."""
    names = sorted(available_tuners())
    suite = tmp_path / "all.yaml"
    suite.write_text(
        HEAD + f"backbone: [{{{TINY}}}, {{model: vit_base_patch16_224}}]\n"
        "tuners: [" + ", ".join(f"{{tuner: {n}}}" for n in names) + "]\n"
    )
    loaded = load_suite(suite)
    request = probe_request(loaded, expand(loaded, "cpu"))
    assert len(request["backbones"]) == 2 and len(request["models"]) == 2 * len(names)
    assert run_probe(request) == []
