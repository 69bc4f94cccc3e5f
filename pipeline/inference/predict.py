"""Class probabilities for the user's own images or sequences, one JSON line each."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import numpy as np
import torch

from pipeline.inference.images import load_items
from pipeline.inference.models import TrainedModel, load_trained_model
from pipeline.scoring import logits_in_batches


def predict(trained: TrainedModel, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Probabilities [n, classes] for uint8 images [n, H, W], computed as the trainer's evaluation does."""
    cpu = torch.device("cpu")
    logits = logits_in_batches(trained.model, torch.from_numpy(images), batch_size, cpu, trained.autocast(cpu), trained.inputs)
    return torch.softmax(logits, dim=1).numpy()


def run(model_path: str, image_paths: list[str], invert: bool = False, out: TextIO = sys.stdout,
        columns=None, missing: str = "refuse") -> list[dict[str, Any]]:
    trained = load_trained_model(model_path)
    if trained.image_shape is None:
        return _sequences(trained, image_paths, columns, missing, out)
    items = load_items(image_paths, tuple(trained.image_shape), invert)
    probabilities = predict(trained, np.stack([item.image for item in items]))
    lines = []
    for item, probs in zip(items, probabilities, strict=True):
        best = int(probs.argmax())
        line = {"image": item.name, "class": trained.class_names[best], "class_index": best,
                "probability": round(float(probs[best]), 6),
                "probabilities": {name: round(float(p), 6) for name, p in zip(trained.class_names, probs, strict=True)}}
        out.write(json.dumps(line) + "\n")
        lines.append(line)
    out.flush()
    return lines


def _sequences(trained: TrainedModel, paths: list[str], columns, missing: str, out: TextIO) -> list[dict[str, Any]]:
    """A sequence model: each path is a file (or directory) of sequences, as prepare_data.py --from reads them."""
    from pipeline.inference.sequences import predict_file
    from pipeline.sources.detect import ColumnOptions

    lines = []
    for path in paths:
        lines += predict_file(trained, path, columns or ColumnOptions(), missing, out=out)
    return lines
