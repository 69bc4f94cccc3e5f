"""Evaluation media for W&B: confusion matrix and a table of misclassified examples."""

from __future__ import annotations

from typing import Any

import numpy as np

# (images uint8 [k, H, W], predicted class [k], true class [k])
Examples = tuple[np.ndarray, np.ndarray, np.ndarray]


def confusion_chart(confusion: np.ndarray, class_names: list[str], title: str) -> Any:
    """wandb's confusion-matrix chart from a count matrix (rows = true, cols = predicted).

    wandb.plot.confusion_matrix wants one label pair per sample; expanding the counts back
    into pairs is exact and costs one int per evaluated sample.
    """
    import wandb

    confusion = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {confusion.shape}, expected ({n}, {n}) for {n} class names")
    true_idx, pred_idx = np.indices((n, n))
    counts = confusion.ravel()
    y_true = np.repeat(true_idx.ravel(), counts).tolist()
    preds = np.repeat(pred_idx.ravel(), counts).tolist()
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=class_names, title=title)


def examples_table(examples: Examples, class_names: list[str]) -> Any:
    """A table of example images with predicted and true class names, one row per image."""
    import wandb

    images, preds, labels = examples
    table = wandb.Table(columns=["image", "predicted", "true"])
    for image, pred, label in zip(images, preds, labels, strict=True):
        pred_name, true_name = class_names[int(pred)], class_names[int(label)]
        caption = f"predicted {pred_name}, true {true_name}"
        table.add_data(wandb.Image(np.asarray(image, dtype=np.uint8), caption=caption), pred_name, true_name)
    return table
