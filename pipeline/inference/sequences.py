"""Class probabilities for a user's file of sequences (.npz, .ts, Parquet; labels optional), one JSON
line per sequence: read by the sources that prepare data, checked as they are, scaled with the
model's own training statistics, and scored by the evaluation's forward pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch

from pipeline.data import ragged
from pipeline.inference.models import TrainedModel, UnusableModel
from pipeline.scoring import logits_in_batches
from pipeline.sources.base import Cases, InputError, check_cases
from pipeline.sources.detect import ColumnOptions, open_source


def predict_file(trained: TrainedModel, path: str | Path, columns: ColumnOptions | None = None,
                 missing: str = "refuse", batch_size: int = 256, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    source = open_source(path, columns or ColumnOptions(), labels_required=False)
    if source.info.features != trained.features:
        raise UnusableModel(f"{path} holds sequences of {source.info.features} channel(s), but the model in "
                            f"{trained.source} reads {trained.features}; give it data with the channels it was trained on")
    lines = []
    for cases in source.cases():
        for line in _predict_cases(trained, check_cases(cases, source.info.features, missing), source.info.class_names,
                                   batch_size):
            out.write(json.dumps(line) + "\n")
            lines.append(line)
    out.flush()
    if not lines:  # an exit 0 with no output would read as success on a file that had nothing to predict
        raise InputError(f"{path} holds no sequences, so there is nothing to predict; check that it is the file you "
                         "meant (an export that wrote no rows, a filter that kept none)")
    return lines


def _predict_cases(trained: TrainedModel, cases: Cases, label_names: list[str], batch_size: int) -> Iterator[dict]:
    lengths = torch.from_numpy(cases.lengths)
    x = ragged.pad(torch.from_numpy(cases.values), lengths)
    cpu = torch.device("cpu")
    logits = logits_in_batches(trained.model, x, batch_size, cpu, trained.autocast(cpu), trained.inputs, lengths)
    probabilities = torch.softmax(logits, dim=1).numpy()
    names = trained.class_names
    for i, probs in enumerate(probabilities):
        best = int(probs.argmax())
        line = {"sequence": cases.case(i), "steps": int(cases.lengths[i]), "class": names[best], "class_index": best,
                "probability": round(float(probs[best]), 6),
                "probabilities": {name: round(float(p), 6) for name, p in zip(names, probs, strict=True)}}
        if cases.labels[i] >= 0:  # the file's own label, as the file names it
            line["label"] = label_names[int(cases.labels[i])]
        yield line
