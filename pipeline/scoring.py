"""Scoring a model on cases held in memory: logits in batches, accuracy, loss, per-class figures, the
confusion matrix and the most confident mistakes. Below both training (its rank-zero evaluation,
training/evaluation.py) and inference (evaluate.py, predict.py), which score alike through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inputs import InputScale


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    per_class_accuracy: list[float | None]  # None for a class with no case in the split: undefined, not 0
    confusion: np.ndarray  # int64 [C, C], rows = true class, columns = prediction
    seconds: float
    examples: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # the most confident mistakes: images, predictions,
    # labels (images only: a sequence has no picture)
    examples_confidence: np.ndarray  # the probability the model gave each of those predictions
    predictions: np.ndarray  # int64 [n], per sample, in the split's order
    confidence: np.ndarray  # float32 [n], the predicted class's probability

    @property
    def balanced_accuracy(self) -> float:
        """The mean of the per-class recalls, over the classes present in the split."""
        _, recall, _, support = _scores(self.confusion)
        return float(recall[support > 0].mean())

    @property
    def macro_f1(self) -> float:
        """The mean of the per-class F1 scores over the classes present in the split or predicted (the
        classes scikit-learn's f1_score(average="macro") counts)."""
        counted = (self.confusion.sum(axis=1) > 0) | (self.confusion.sum(axis=0) > 0)
        return float(_scores(self.confusion)[2][counted].mean())

    def metrics(self) -> dict[str, float]:
        out = {"eval/accuracy": self.accuracy, "eval/balanced_accuracy": self.balanced_accuracy,
               "eval/macro_f1": self.macro_f1, "eval/loss": self.loss, "eval/seconds": self.seconds}
        # A class the split has no case of has no accuracy: logged as 0.0 it would read as a failing class.
        out.update({f"eval/acc_{c}": a for c, a in enumerate(self.per_class_accuracy) if a is not None})
        return out

    def per_class_report(self, class_names: list[str]) -> list[dict[str, float | int | str]]:
        """Precision, recall, F1 and support per class, from the confusion matrix (0 where undefined)."""
        precision, recall, f1, support = _scores(self.confusion)
        return [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                for name, p, r, f, n in zip(class_names, precision, recall, f1, support, strict=True)]


def _scores(confusion: np.ndarray) -> tuple[np.ndarray, ...]:
    """(precision, recall, F1, support) per class; 0 where undefined."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return precision, recall, f1, support


@torch.no_grad()
def logits_in_batches(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                      autocast, inputs: InputScale, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits [n, C] on the CPU for cases x [n, T, F] (padded where `lengths` are given); the one
    forward pass of evaluation and prediction. Cases of varying length go in order of length, each batch
    cut to its longest (a case's logits do not depend on its batch-mates), and come back in their order."""
    was_training = model.training
    model.eval()
    order = torch.argsort(lengths, stable=True) if lengths is not None else None
    out = []
    for lo in range(0, len(x), batch_size):
        with autocast():
            if order is None:
                out.append(model(inputs(x[lo:lo + batch_size], device)).float().cpu())
                continue
            rows = order[lo:lo + batch_size]
            run = lengths[rows]
            batch = inputs(x[rows, :int(run.max())], device)
            out.append(model(batch, run.to(device)).float().cpu())
    model.train(was_training)
    logits = torch.cat(out)
    if order is not None:
        logits = torch.empty_like(logits).index_copy_(0, order, logits)
    return logits


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device, autocast, num_classes: int, *, inputs: InputScale, max_examples: int = 32,
             lengths: torch.Tensor | None = None) -> EvalResult:
    """`model` is the unwrapped module: no collective runs, the other ranks are not involved."""
    start = time.perf_counter()
    logits = logits_in_batches(model, images, batch_size, device, autocast, inputs, lengths)
    loss = F.cross_entropy(logits.double(), labels, reduction="sum").item() / len(labels)
    probs = torch.softmax(logits, dim=1)
    confidence, pred_t = probs.max(dim=1)
    pred, true = pred_t.numpy(), labels.numpy()
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    support = confusion.sum(axis=1)
    per_class = [float(hit / n) if n else None for hit, n in zip(np.diag(confusion), support, strict=True)]
    wrong = np.flatnonzero(pred != true)
    wrong = wrong[np.argsort(-confidence.numpy()[wrong], kind="stable")][:max_examples]
    return EvalResult(
        accuracy=float((pred == true).mean()),
        loss=loss,
        per_class_accuracy=per_class,
        confusion=confusion.astype(np.int64),
        seconds=time.perf_counter() - start,
        examples=(images.numpy()[wrong], pred[wrong], true[wrong]) if inputs.mean is None else None,
        examples_confidence=confidence.numpy()[wrong],
        predictions=pred.astype(np.int64),
        confidence=confidence.numpy(),
    )
