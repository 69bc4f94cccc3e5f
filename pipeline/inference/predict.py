"""Class probabilities for the user's own images, one JSON line each."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import numpy as np
import torch

from pipeline.inference.images import load_items
from pipeline.inference.models import TrainedModel, UnusableModel, load_trained_model
from pipeline.training.evaluation import logits_in_batches


def predict(trained: TrainedModel, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Probabilities [n, classes] for uint8 images [n, H, W], computed as the trainer's evaluation does."""
    cpu = torch.device("cpu")
    logits = logits_in_batches(trained.model, torch.from_numpy(images), batch_size, cpu, trained.autocast(cpu))
    return torch.softmax(logits, dim=1).numpy()


def run(model_path: str, image_paths: list[str], invert: bool = False, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    trained = load_trained_model(model_path)
    if trained.image_shape is None:
        raise UnusableModel(f"the model in {trained.source} reads sequences ({trained.features} channel(s)), and "
                            "predict.py reads images; score a prepared sequence data set with evaluate.py --data DIR")
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
