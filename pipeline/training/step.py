"""One optimizer step and nothing else: forward under autocast, loss, backward, clip, update.

`train_step` makes no decisions about logging, evaluation, checkpoints or stopping; the loop
reads its `StepResult` and decides. The only rule it enforces itself is the one that cannot
wait for the loop: a non-finite gradient is never applied.

Nothing in it waits for the device: the gradient norm and the finite flag stay device tensors
that the loop reads at log boundaries. The skip of a non-finite update happens on the device
too where the optimizer can do it (fp16's GradScaler; fused optimizers read `found_inf`);
only an unfused optimizer without a scaler needs the host to decide, one sync per step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.data.sequence_augment import SequenceAugment
from pipeline.inputs import IMAGES, InputScale
from pipeline.model_conv import update_running_statistics
from pipeline.training.exact_reduction import ExactReduction


@dataclass
class StepParts:
    """What a step touches; built once by the trainer (or a benchmark) and reused every step."""

    accelerator: Accelerator
    model: torch.nn.Module  # as returned by accelerator.prepare
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped here once per optimizer step, never prepared
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    inputs: InputScale = IMAGES  # stored values -> model inputs (images / 255, else standardised)
    class_weights: torch.Tensor | None = None  # on the device; None: every class alike
    augment: SequenceAugment | None = None  # of the standardised inputs, keyed on (seed, epoch, sample id)
    exact: ExactReduction | None = None  # train.exact_reduction: micro-batch gradients added in chunk order

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def skips_on_device(self) -> bool:
        """Whether a non-finite update can be withheld without asking the host."""
        return self.accelerator.scaler is not None or bool(_base(self.optimizer).defaults.get("fused"))


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro-batches, detached, on the device
    grad_norm: torch.Tensor  # total gradient norm before clipping, on the device (the same on every rank)
    finite: torch.Tensor  # bool on the device; False: inf/nan gradient, no update applied
    lr: float  # the learning rate this step's update used


def train_step(parts: StepParts, micro: list[tuple[torch.Tensor, ...]], seeds: list[int] | None = None,
               epoch: int = 0) -> StepResult:
    """One optimizer step over this rank's micro-batches (pipeline/data/order.py lays them out).

    Each micro-batch's loss is divided by their number before its backward pass, and the
    gradients of all but the last accumulate without an all-reduce (`no_sync`), so the update
    uses the mean gradient over the global batch, as one rank with all of it would; with
    `parts.exact` none is all-reduced and exact_reduction.py adds them in one fixed order. `seeds`,
    where dropout needs them, seed each micro-batch's draws by its place in the global batch; `epoch`
    keys the sequence augmentations."""
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    base = _base(optimizer)  # Accelerate's wrapper is used only for fp16's scaler: see below
    steps = len(micro)
    total = None
    kept: list[torch.Tensor] = []  # train.exact_reduction: each micro-batch's gradient, apart
    for i, batch in enumerate(micro):
        last = i == steps - 1 and parts.exact is None
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            loss = _loss(parts, batch, epoch)
            accelerator.backward(loss if steps == 1 or parts.exact is not None else loss / steps)
        if parts.exact is not None:
            kept.append(parts.exact.take(parts.params))
        total = loss.detach() if total is None else total + loss.detach()
    if parts.exact is not None:
        parts.exact.apply(parts.params, kept)
    update_running_statistics(model, accelerator.num_processes)  # model.conv_norm: batch
    clip = parts.grad_clip if parts.grad_clip is not None else math.inf
    norm = accelerator.clip_grad_norm_(model.parameters(), clip).detach()
    lr = optimizer.param_groups[0]["lr"]
    finite = torch.isfinite(norm)
    if accelerator.scaler is None and parts.skips_on_device:
        base.found_inf = (~finite).float()  # read by the fused kernel: skip, on the device
    if parts.skips_on_device or bool(finite):  # the host decides only for an unfused optimizer
        # With fp16 the scaler itself skips a non-finite step and lowers its scale. The schedule
        # advances on a skipped step, as in every trainer that uses GradScaler; without a scaler
        # the run stops at the next log boundary anyway.
        (optimizer if accelerator.scaler is not None else base).step()
        parts.scheduler.step()
    # Accelerate's optimizer wrapper adds nothing here without a scaler or gradient accumulation,
    # and costs ~0.1 ms a step (accelerate 1.15 looks up an optional package on disk in every
    # step() and inspects zero_grad's signature every call): 4% of a small model's CPU step.
    base.zero_grad(set_to_none=True)
    return StepResult(loss=total if steps == 1 else total / steps, grad_norm=norm, finite=finite, lr=lr)


def _loss(parts: StepParts, batch: tuple[torch.Tensor, ...], epoch: int) -> torch.Tensor:
    """One micro-batch's training loss: its inputs scaled (and augmented) on the device, forward under autocast."""
    device = parts.accelerator.device
    inputs = parts.inputs(batch[0], device)
    targets = batch[1].to(device, non_blocking=True)
    lengths = batch[3] if len(batch) > 3 else None
    if parts.augment is not None:
        inputs = parts.augment(inputs, lengths, batch[2], epoch)
    with parts.accelerator.autocast():
        logits = parts.model(inputs) if lengths is None else parts.model(inputs, lengths)
    return F.cross_entropy(logits.float(), targets, weight=parts.class_weights, label_smoothing=parts.label_smoothing)


def _base(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
