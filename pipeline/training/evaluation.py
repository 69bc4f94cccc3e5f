"""Rank-zero evaluation on the whole test split: accuracy, loss, per-class accuracy, confusion."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import to_inputs


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # int64 [C, C], rows = true class, columns = prediction
    seconds: float
    examples: tuple[np.ndarray, np.ndarray, np.ndarray]  # misclassified images, predictions, labels

    def metrics(self) -> dict[str, float]:
        out = {"eval/accuracy": self.accuracy, "eval/loss": self.loss, "eval/seconds": self.seconds}
        out.update({f"eval/acc_{c}": a for c, a in enumerate(self.per_class_accuracy)})
        return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device, autocast, num_classes: int, max_examples: int = 32) -> EvalResult:
    """`model` is the unwrapped module: no collective runs, the other ranks are not involved."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    for lo in range(0, len(labels), batch_size):
        x = to_inputs(images[lo : lo + batch_size], device)
        y = labels[lo : lo + batch_size].to(device)
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        preds.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    true = labels.numpy()
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    per_class = (np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)).tolist()
    wrong = np.flatnonzero(pred != true)[:max_examples]
    return EvalResult(
        accuracy=float((pred == true).mean()),
        loss=float(loss_sum.item() / len(true)),
        per_class_accuracy=per_class,
        confusion=confusion.astype(np.int64),
        seconds=time.perf_counter() - start,
        examples=(images.numpy()[wrong], pred[wrong], true[wrong]),
    )


class Evaluator:
    """Rank-zero evaluation on a split held in memory; keeps the time each evaluation took."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, num_classes: int,
                 device: torch.device, autocast):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.device = device
        self.autocast = autocast
        self.seconds: list[float] = []
        self.last: EvalResult | None = None

    def __call__(self, model: torch.nn.Module) -> EvalResult:
        """`model` is the unwrapped module: no collective runs, the other ranks are not involved."""
        result = evaluate(model, self.images, self.labels, self.batch_size, self.device, self.autocast, self.num_classes)
        self.seconds.append(result.seconds)
        self.last = result
        return result

    @property
    def mean_seconds(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None
