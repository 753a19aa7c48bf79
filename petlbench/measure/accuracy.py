"""The accuracy phase: train for the configured epochs, evaluate top-1 on the test split.

Two numbers come out: the final-epoch accuracy (what a practitioner gets), and the best over the periodic
evaluations, which selects on the test split — the protocol of the FacT/NOAH/SQT papers, stored in its own
column so it is never mistaken for a held-out number.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from petlbench.data.loaders import ImageSource
from petlbench.errors import DataError
from petlbench.measure.step import TrainStep, autocast, make_optimizer
from petlbench.spec.models import Precision, RunSpec, TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyResult:
    final: float
    best: float
    best_epoch: int
    epochs: int
    train_time_s: float
    num_train: int
    num_test: int


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, train: TrainSpec) -> float:
    """Per-iteration schedule: linear warm-up from 0, then cosine (or constant) down to `min_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if train.schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return train.min_lr + (base_lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: ImageSource, img_size: int, batch_size: int, precision: Precision, device: torch.device
) -> float:
    """Top-1 accuracy on the test split."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.batches("test", batch_size, img_size, shuffle=False, seed=0):
        with autocast(precision, device.type):
            logits = model(x.to(device, non_blocking=True))
        correct += int((logits.argmax(dim=-1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def train_and_evaluate(
    model: nn.Module, data: ImageSource, img_size: int, spec: RunSpec, device: torch.device
) -> AccuracyResult:
    """Train `model` (its trainable parameters) as `spec.train` says and evaluate it."""
    train = spec.train
    if train is None:
        raise ValueError("train_and_evaluate needs spec.train")
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), spec.optimizer)
    step = TrainStep(model, optimizer, spec.precision, device.type, train.label_smoothing)
    rounding = math.floor if train.drop_last else math.ceil
    steps_per_epoch = rounding(data.size("train") / spec.batch_size)
    if steps_per_epoch == 0:
        raise DataError(
            f"train.drop_last: {data.size('train')} training images make no full batch of {spec.batch_size}"
        )
    total_steps = train.epochs * steps_per_epoch
    warmup_steps = round(train.warmup_epochs * steps_per_epoch)
    eval_every = train.eval_every or train.epochs

    best, best_epoch, final = -1.0, 0, 0.0
    iteration = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(1, train.epochs + 1):
        seed = spec.seed * 100_003 + epoch
        for x, y in data.batches(
            "train", spec.batch_size, img_size, shuffle=True, seed=seed, drop_last=train.drop_last
        ):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(iteration, total_steps, warmup_steps, spec.optimizer.lr, train)
            loss = step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            iteration += 1
        if epoch % eval_every == 0 or epoch == train.epochs:
            eval_batch = train.eval_batch_size or spec.batch_size
            final = evaluate(model, data, img_size, eval_batch, spec.precision, device)
            if final > best:
                best, best_epoch = final, epoch
            log.info("epoch %d/%d loss %.4f test top-1 %.4f", epoch, train.epochs, float(loss), final)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return AccuracyResult(
        final=final,
        best=best,
        best_epoch=best_epoch,
        epochs=train.epochs,
        train_time_s=time.perf_counter() - start,
        num_train=data.size("train"),
        num_test=data.size("test"),
    )
