"""From step results to logged events: the window of steps between log lines, and one sink.

Every event goes through `MetricsSink`, which writes the same row to metrics.jsonl and to W&B
(under the same keys and the same global step) and updates the progress bar, so the three
cannot drift apart.

Train rows hold window figures, all over the steps since the previous row:
  train/loss         mean training loss, averaged over steps and ranks
  train/grad_norm    mean total gradient norm before clipping (steps with a finite norm)
  train/lr           learning rate used by the row's step
  train/samples_per_s  global samples per second, evaluation and checkpoint time excluded
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from pipeline.training.outputs import MetricsLog
from pipeline.training.step import StepResult


class StepWindow:
    """Sums the steps since the last log line; the loss stays on the device until `close`.

    `add` only keeps the step's device tensors; they are folded into the sums a batch of steps at
    a time. Folding every step cost eight tiny tensor operations, about 3% of a small model's step.
    """

    FOLD_EVERY = 256  # bounds the tensors held when log lines are far apart

    def __init__(self, device: torch.device, global_batch: int):
        self.global_batch = global_batch
        self.steps = 0
        self.pending: list[tuple[StepResult, int]] = []
        # Device tensors, read once per window: the step itself never waits for the device.
        self.loss = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.norm_count = torch.zeros((), device=device, dtype=torch.long)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.long)
        self.first_nonfinite = torch.full((), -1, device=device, dtype=torch.long)
        self.lr = math.nan
        self.start = time.perf_counter()
        self.total_seconds, self.total_samples = 0.0, 0  # this process's training time, for throughput after a resume

    def add(self, result: StepResult, step: int) -> None:
        self.pending.append((result, step))
        self.steps += 1
        self.lr = result.lr
        if len(self.pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        if not self.pending:
            return
        results = [r for r, _ in self.pending]
        finite = torch.stack([r.finite for r in results])
        self.loss += torch.stack([r.loss.float() for r in results]).sum()
        self.norm_sum += torch.where(finite, torch.stack([r.grad_norm.float() for r in results]), 0.0).sum()
        self.norm_count += finite.sum()
        bad = ~finite
        self.nonfinite += bad.sum()
        # Steps arrive one after another, so the first bad one is an offset from the first pending step.
        first_here = torch.where(bad.any(), bad.int().argmax() + self.pending[0][1], -1)  # argmax: the first True
        self.first_nonfinite.copy_(torch.where(self.first_nonfinite < 0, first_here, self.first_nonfinite))
        self.pending.clear()

    def take_nonfinite(self) -> tuple[int, int]:
        """(count, first step) of non-finite steps not taken yet; reads the device once."""
        self._fold()
        count, first = (int(v) for v in torch.stack([self.nonfinite, self.first_nonfinite]).tolist())
        self.nonfinite.zero_()
        self.first_nonfinite.fill_(-1)
        return count, first

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and checkpoints inside this block stay out of samples/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def close(self, accelerator, padding: tuple[int, int] | None = None) -> dict[str, float]:
        """Collective (the loss is averaged over ranks): the window's metrics; starts the next window.
        `padding`: this rank's (padded, real) steps of the window, where lengths vary."""
        self._fold()
        mean_loss = accelerator.reduce(self.loss, reduction="mean").item() / self.steps
        elapsed = time.perf_counter() - self.start
        samples = self.steps * self.global_batch
        self.total_seconds += elapsed
        self.total_samples += samples
        norm_sum, norm_count = self.norm_sum.item(), int(self.norm_count)
        metrics = {
            "train/loss": mean_loss,
            "train/lr": self.lr,
            "train/grad_norm": norm_sum / norm_count if norm_count else math.nan,
            "train/samples_per_s": samples / elapsed,
        }
        if padding is not None:  # over every rank's micro-batches: the waste does not depend on the world size
            padded, real = accelerator.reduce(torch.tensor(padding, dtype=torch.float64, device=self.loss.device),
                                              reduction="sum").tolist()
            metrics["train/padding_waste"] = padded / real if real else 0.0
        self.loss.zero_()
        self.norm_sum.zero_()
        self.norm_count.zero_()
        self.steps = 0
        self.start = time.perf_counter()
        return metrics

    @property
    def samples_per_s(self) -> float | None:
        return self.total_samples / self.total_seconds if self.total_seconds else None


class MetricsSink:
    """One call per event; on processes other than the main one every call does nothing."""

    def __init__(self, log: MetricsLog | None, tracker, bar, class_names: list[str]):
        self.log = log
        self.tracker = tracker
        self.bar = bar
        self.class_names = class_names
        self.start = time.perf_counter()
        self._postfix: dict[str, str] = {}

    def begin(self) -> None:
        """Training starts now: time_s counts from here."""
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _row(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        # time_s: wall seconds since this process started training (time to accuracy).
        row = {"step": step, **metrics, "time_s": round(self.elapsed(), 3)}
        if self.log is not None:
            self.log.write(row)
        return row

    def train(self, step: int, metrics: dict[str, Any]) -> None:
        if self.log is None:
            return
        self.tracker.log_train(step, self._row(step, metrics))
        self._show(loss=f"{metrics['train/loss']:.4f}")

    def eval(self, step: int, metrics: dict[str, Any], result, *, final: bool) -> None:
        """`result` (an EvalResult) carries the media W&B shows beside the scalar row."""
        if self.log is None:
            return
        row = self._row(step, metrics)
        self.tracker.log_eval(step, row, result.confusion, self.class_names, result.examples, final=final)
        self._show(**{"eval acc": f"{result.accuracy:.4f}"})

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """A one-off event, in metrics.jsonl and W&B: the one score on test, of the final weights; the run
        going on at another world size (resumed from a checkpoint another one wrote)."""
        if self.log is None:
            return
        self.tracker.log_train(step, self._row(step, metrics))

    def _show(self, **items: str) -> None:
        self._postfix.update(items)
        self.bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in self._postfix.items()))
