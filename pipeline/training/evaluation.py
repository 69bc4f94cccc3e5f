"""Rank-zero evaluation on a whole split: accuracy, loss, per-class accuracy, confusion."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.inputs import IMAGES, InputScale


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
                      autocast=contextlib.nullcontext, inputs: InputScale = IMAGES,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
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
             device: torch.device, autocast, num_classes: int, max_examples: int = 32,
             inputs: InputScale = IMAGES, lengths: torch.Tensor | None = None) -> EvalResult:
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


class Evaluator:
    """Rank-zero evaluation on a split held in memory; keeps the time each evaluation took."""

    def __init__(self, images: torch.Tensor, lengths: torch.Tensor | None, labels: torch.Tensor, batch_size: int,
                 num_classes: int, device: torch.device, autocast, inputs: InputScale = IMAGES):
        self.images, self.lengths, self.labels = images, lengths, labels
        self.inputs = inputs
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.device = device
        self.autocast = autocast
        self.seconds: list[float] = []  # per evaluation event
        self.last: EvalResult | None = None

    def __call__(self, model: torch.nn.Module) -> EvalResult:
        """One scoring of `model`, the unwrapped module: no collective runs, the other ranks are not involved."""
        return evaluate(model, self.images, self.labels, self.batch_size, self.device, self.autocast, self.num_classes,
                        inputs=self.inputs, lengths=self.lengths)

    def event(self, model: torch.nn.Module, average: torch.nn.Module | None = None) -> tuple[EvalResult, EvalResult | None]:
        """One evaluation of the run: the weights, and their average beside them when there is one. It counts
        once in `seconds` (both passes), and `last` is the score of the weights that will be saved."""
        raw = self(model)
        averaged = self(average) if average is not None else None
        self.seconds.append(raw.seconds + (averaged.seconds if averaged else 0.0))
        self.last = averaged or raw
        return raw, averaged

    @property
    def mean_seconds(self) -> float | None:
        """Of an evaluation event, every pass in it."""
        return sum(self.seconds) / len(self.seconds) if self.seconds else None


def eval_split(requested: str, splits: list[str], splitting: dict | None = None) -> tuple[str, str | None]:
    """The split to evaluate during training, and a warning, said before training, of what the data set lacks.

    Without val (a data set prepared before validation splits existed, or too small to hold one out) it is
    evaluated on test, with a warning that its figures are then tuned on the split they report; without
    test the run ends without a test score, said at the start rather than found at the end; with neither
    there is nothing to evaluate on, refused. `splitting`: the manifest's record of how splits were made,
    whose reason for a split not made is quoted."""

    def why(split: str) -> str:
        how = (splitting or {}).get(split)
        reason = getattr(how, "reason", None)
        return f" ({reason})" if reason else ""

    if "val" not in splits and "test" not in splits:
        raise ConfigError(f"the dataset has only the splits {', '.join(splits)}: no validation or test split to "
                          f"evaluate on{why('test')}. Prepare it again with more cases per class, or with a split "
                          "of the source's own")
    if requested in splits:
        return requested, None if "test" in splits else (
            f"this dataset has no test split{why('test')}, so the run ends without a test score (summary.json's "
            "test_accuracy is null); its figures are those of val")
    if requested == "val" and "test" in splits:
        return "test", ("this dataset was prepared without a validation split" + why("val") + ", so training "
                        "evaluates on test and every figure chosen by it is tuned on the data it reports; prepare it "
                        "again with --force (and --val-size, a fraction or a count of training cases) to hold one out")
    raise ConfigError(f"eval.split is {requested}, but the dataset has the splits {', '.join(splits)}")
