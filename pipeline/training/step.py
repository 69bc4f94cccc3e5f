"""One optimizer step and nothing else: forward under autocast, loss, backward, clip, update.

`train_step` makes no decisions about logging, evaluation, checkpoints or stopping; the loop
reads its `StepResult` and decides. The only rule it enforces itself is the one that cannot
wait for the loop: a non-finite gradient is never applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.model import to_inputs


@dataclass
class StepParts:
    """What a step touches; built once by the trainer (or a benchmark) and reused every step."""

    accelerator: Accelerator
    model: torch.nn.Module  # as returned by accelerator.prepare
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped here once per optimizer step, never prepared
    grad_clip: float | None = None
    label_smoothing: float = 0.0


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss of the batch, detached, on the device
    grad_norm: float  # total gradient norm before clipping (the same on every rank after the all-reduce)
    lr: float  # the learning rate this step's update used
    finite: bool  # False: the gradient was inf/nan and no update was applied (with fp16 the scaler skipped it)


def train_step(parts: StepParts, batch: tuple[torch.Tensor, ...]) -> StepResult:
    x, y = batch[0], batch[1]
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    inputs, targets = to_inputs(x, accelerator.device), y.to(accelerator.device, non_blocking=True)
    with accelerator.autocast():
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=parts.label_smoothing)
    accelerator.backward(loss)
    clip = parts.grad_clip if parts.grad_clip is not None else math.inf
    norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
    lr = optimizer.param_groups[0]["lr"]
    finite = math.isfinite(norm)
    scaler = accelerator.scaler
    if finite or scaler is not None:
        # With fp16 the scaler itself skips a non-finite step and lowers its scale; the schedule
        # still advances, as it does in every trainer that uses GradScaler.
        optimizer.step()
        parts.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss.detach(), grad_norm=norm, lr=lr, finite=finite)
