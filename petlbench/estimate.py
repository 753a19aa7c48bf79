"""Predict a run's memory without allocating it: the worker's training step, on fake CPU tensors.

MEASURE-NOTES.md §2: build on the meta device (outside the fake mode: timm's drop-path schedule calls `.item()`),
enter `FakeTensorMode(allow_non_fake_inputs=True)`, materialise with `to_empty(device="cpu")`, and run the same
warm-up and tracked step as the worker. Fake tensors carry shapes, dtypes and storages but no data, so the
tracker sees exactly the bytes a real CPU run allocates — ViT-L at batch 512 estimates in well under a second per
step on a laptop. Fake *CUDA* tensors cannot run backward without a GPU and push SDPA onto the math path, so CUDA
runs are estimated on fake CPU tensors too.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from petlbench.data import num_classes
from petlbench.measure.memory import tracked_inference, tracked_train_step
from petlbench.results import Metrics
from petlbench.step import TrainStep, autocast, make_optimizer
from petlbench.suite import RunSpec
from petlbench.worker import build_model, model_img_size


def estimate_memory(spec: RunSpec) -> Metrics:
    """Predicted peak bytes and their breakdown for one run, as a CPU run of the same spec would measure them."""
    classes = num_classes(spec.data, spec.data_root)
    with torch.device("meta"):
        tuned = build_model(spec, classes)
    img_size = model_img_size(tuned.backbone, spec.backbone.img_size)
    metrics = Metrics(
        memory_source="estimate",
        params_total=tuned.params_total,
        params_trainable=tuned.params_trainable,
        params_added=tuned.params_added,
        weights_frozen_bytes=tuned.weights_frozen_bytes,
        weights_trainable_bytes=tuned.weights_trainable_bytes,
    )
    # the precision's device type: autocast op lists differ between CPU and CUDA; CPU is what runs here
    device_type = "cpu"
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = tuned.module.to_empty(device="cpu")
        x = torch.empty(spec.batch_size, 3, img_size, img_size)
        y = torch.zeros(spec.batch_size, dtype=torch.int64)
        if spec.measure.inference:
            model.eval()
            metrics.peak_infer_bytes = tracked_inference(model, x, autocast(spec.precision, device_type)).peak_bytes
        model.train()
        optimizer = make_optimizer(tuned.trainable_parameters(), spec.optimizer)
        step = TrainStep(model, optimizer, spec.precision, device_type)
        for _ in range(spec.measure.warmup_steps):
            step(x, y)
        tracked = tracked_train_step(step, x, y)
    metrics.peak_allocated_bytes = tracked.peak_bytes
    metrics.mem_tracked_peak_bytes = tracked.peak_bytes
    metrics.mem_weights_bytes = tracked.by_category["weights"]
    metrics.mem_grads_bytes = tracked.by_category["gradients"]
    metrics.mem_optimizer_bytes = tracked.by_category["optimizer"]
    metrics.mem_activations_bytes = tracked.by_category["activations"]
    metrics.attn_kernel = tracked.attn_kernel
    return metrics
