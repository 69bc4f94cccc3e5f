"""Rank-zero evaluation during training: a split scored between steps (scoring.py does the scoring), and
which split that is."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.inputs import InputScale
from pipeline.scoring import EvalResult, evaluate


class Evaluator:
    """Rank-zero evaluation on a split held in memory; keeps the time each evaluation took."""

    def __init__(self, images: torch.Tensor, lengths: torch.Tensor | None, labels: torch.Tensor, batch_size: int,
                 num_classes: int, device: torch.device, autocast, inputs: InputScale):
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
    there is nothing to evaluate on, refused. "none" evaluates nothing during training. `splitting`: the
    manifest's record of how splits were made, whose reason for a split not made is quoted."""

    def why(split: str) -> str:
        how = (splitting or {}).get(split)
        reason = getattr(how, "reason", None)
        return f" ({reason})" if reason else ""

    if requested == "none":  # nothing evaluated before the end; test, where there is one, scored once then
        if "test" not in splits:
            return "none", f"this dataset has no test split{why('test')} and eval.split is none, so the run ends without any score"
        return "none", None if "val" not in splits else (
            "eval.split is none and this dataset holds a val split, whose cases are neither trained on nor evaluated; "
            "to train on them, prepare it again with --force --val-size 0")
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
