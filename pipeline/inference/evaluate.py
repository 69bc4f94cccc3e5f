"""Evaluate a trained model on a prepared split: the trainer's evaluation, written out for people.

`output/eval.json` (accuracy, loss, per-class precision/recall/F1/support, confusion matrix),
`predictions.csv` (index, true, predicted, confidence per sample), `confusion.png` and
`most_confident_mistakes.png`; a short table on stdout; optionally a W&B run.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.epoch_plan import varying_lengths
from pipeline.data.manifest import load_manifest
from pipeline.data.store import ShardStore, load_split_tensors
from pipeline.errors import UserError
from pipeline.inference.models import TrainedModel, UnusableModel, load_trained_model
from pipeline.inputs import InputScale
from pipeline.scoring import EvalResult, evaluate
from pipeline.training.outputs import plot_confusion, write_json_atomic

OUTPUTS = ("eval.json", "predictions.csv", "confusion.png", "most_confident_mistakes.png")


class OutputExists(UserError):
    exit_code = 2


def default_out(model_path: Path, split: str) -> Path:
    """RUN/eval-test for RUN/model; RUN/eval-test-step-00000100 for RUN/checkpoints/step-00000100."""
    if model_path.parent.name == "checkpoints":
        return model_path.parent.parent / f"eval-{split}-{model_path.name}"
    return model_path.parent / f"eval-{split}"


def check_fits(trained: TrainedModel, manifest, data_dir: str) -> None:
    """The data must be what the model reads and predicts: same image shape, same classes."""
    if (manifest.image_shape is None) != (trained.image_shape is None):
        what = f"sequences ({manifest.dataset}, {manifest.features} channel(s))" if manifest.image_shape is None \
            else f"images of shape {manifest.image_shape}"
        reads = f"images of shape {trained.image_shape}" if trained.image_shape else f"sequences of {trained.features} channel(s)"
        raise UnusableModel(f"{data_dir} holds {what}, but the model in {trained.source} reads {reads}; evaluate it on "
                            "the data set it was trained for")
    if manifest.image_shape is not None and list(manifest.image_shape) != list(trained.image_shape):
        raise UnusableModel(f"{data_dir} holds images of shape {manifest.image_shape}, but the model in {trained.source} "
                            f"reads {trained.image_shape}; evaluate it on data prepared the same way")
    if manifest.features != trained.features:
        raise UnusableModel(f"{data_dir} holds sequences of {manifest.features} channel(s), but the model in "
                            f"{trained.source} reads {trained.features}; evaluate it on data with the model's channels")
    if InputScale.for_data(manifest) != trained.inputs:
        raise UnusableModel(f"{data_dir} was prepared with other normalisation statistics (its train split's channel "
                            f"means {_short(manifest.normalization.mean)}) than the data the model in {trained.source} was "
                            f"trained on ({_short(trained.inputs.mean)}): its inputs would be scaled differently. Evaluate "
                            "it on the preparation it was trained on")
    if manifest.num_classes != trained.num_classes:
        raise UnusableModel(f"{data_dir} has {manifest.num_classes} classes, but the model in {trained.source} predicts "
                            f"{trained.num_classes}; evaluate it on the dataset it was trained for ({trained.dataset})")
    if trained.dataset and manifest.dataset != trained.dataset:
        # Allowed (a model can be tried on a sibling dataset), but its class names are not the data's.
        print(f"warning: the model was trained on {trained.dataset} and {data_dir} holds {manifest.dataset}; class "
              "indices are compared as they are, under the model's class names", file=sys.stderr, flush=True)


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in list(values or [])[:3]) + (", ...]" if len(values or []) > 3 else "]")


def prepare_out(out: Path, force: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise OutputExists(f"{out} already holds an evaluation ({', '.join(existing)}); pass --force to replace it, "
                        "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def run(model_path: str, data_dir: str, split: str = "test", out: str | None = None, batch_size: int | None = None,
        precision: str = "auto", force: bool = False, device: torch.device | None = None) -> dict[str, Any]:
    """`batch_size` None: the one training scored with (the model card's), else 1000."""
    trained = load_trained_model(model_path)
    batch_size = batch_size or trained.card.eval_batch_size or 1000
    manifest = load_manifest(data_dir, trained.dataset or "fashion_mnist")
    check_fits(trained, manifest, data_dir)
    out_dir = Path(out) if out else default_out(Path(model_path), split)
    prepare_out(out_dir, force)
    device = device or torch.device("cpu")
    images, lengths, labels = load_split_tensors(manifest, ShardStore(data_dir), split)
    model = trained.model.to(device)
    result = evaluate(model, images, labels, batch_size, device, trained.autocast(device, precision),
                      trained.num_classes, max_examples=25, inputs=trained.inputs,
                      lengths=lengths if varying_lengths(manifest) else None)
    report = _report(result, trained, manifest, data_dir, split, len(labels))
    write_json_atomic(out_dir / "eval.json", report)
    _write_predictions(out_dir / "predictions.csv", result, labels.numpy(), trained.class_names)
    plot_confusion(out_dir / "confusion.png", result.confusion, trained.class_names,
                   title=f"Confusion matrix, {manifest.dataset} {split}")
    if result.examples is not None:
        plot_mistakes(out_dir / "most_confident_mistakes.png", result, trained.class_names)
    return {"report": report, "result": result, "out": out_dir, "trained": trained}


def _report(result: EvalResult, trained: TrainedModel, manifest, data_dir: str, split: str, samples: int) -> dict[str, Any]:
    return {
        "accuracy": result.accuracy,
        "balanced_accuracy": result.balanced_accuracy,
        "macro_f1": result.macro_f1,
        "loss": result.loss,
        "samples": samples,
        "per_class": result.per_class_report(trained.class_names),
        "confusion": result.confusion.tolist(),
        "confusion_axes": "rows: true class, columns: predicted class (class_names order)",
        "class_names": trained.class_names,
        "model": str(trained.source),
        "model_kind": trained.kind,
        "data": str(data_dir),
        "dataset": manifest.dataset,
        "dataset_fingerprint": manifest.fingerprint,
        "split": split,
        "seconds": result.seconds,
    }


def _write_predictions(path: Path, result: EvalResult, labels: np.ndarray, class_names: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "true", "predicted", "confidence", "true_class", "predicted_class"])
        for i, (t, p, c) in enumerate(zip(labels, result.predictions, result.confidence, strict=True)):
            writer.writerow([i, int(t), int(p), f"{c:.6f}", class_names[int(t)], class_names[int(p)]])
    os.replace(tmp, path)


def plot_mistakes(path: Path, result: EvalResult, class_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, preds, labels = result.examples
    cols = 5
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, pred, label, conf in zip(axes.ravel(), images, preds, labels, result.examples_confidence, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{class_names[int(pred)]} {conf:.2f}\ntrue: {class_names[int(label)]}", fontsize=8)
    fig.suptitle("Most confident mistakes (predicted, confidence; true class)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(report: dict[str, Any], out_dir: Path) -> None:
    rows = report["per_class"]
    width = max(len(r["class"]) for r in rows)
    print(f"{report['dataset']} {report['split']}: accuracy {report['accuracy']:.4f}, balanced accuracy "
          f"{report['balanced_accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, loss {report['loss']:.4f} "
          f"on {report['samples']} samples ({report['model']})")
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for r in rows:
        print(f"{r['class']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:5.4f}  {r['support']:7d}")
    print(f"written: {', '.join(str(out_dir / name) for name in OUTPUTS)}")


def track(outcome: dict[str, Any], mode: str, into_training_run: bool) -> str | None:
    """Log the evaluation to W&B: a run of its own (job type eval) that names the training run, or,
    asked for, the training run itself. Returns the run id; tracking failures only warn."""
    from pipeline.config import WandbConfig
    from pipeline.tracking import Tracker

    trained, report, result = outcome["trained"], outcome["report"], outcome["result"]
    resume = trained.wandb_run_id if into_training_run else None
    if into_training_run and not resume:
        raise UserError(f"--wandb-into-training-run: {trained.source} records no W&B run id (it was trained with "
                        "W&B disabled); drop the flag to log a run of its own")
    wandb_cfg = WandbConfig(mode=mode, job_type="eval", tags=["eval"], log_model="off",
                            name=None if resume else f"eval-{report['dataset']}-{report['split']}")
    config = {"evaluation": {k: report[k] for k in ("model", "model_kind", "data", "dataset", "dataset_fingerprint", "split")},
              "training_run_id": trained.wandb_run_id}
    tracker = Tracker.create(wandb_cfg, outcome["out"], True, config, resume)
    prefix = f"evaluate/{report['split']}"
    metrics = {f"{prefix}/accuracy": report["accuracy"], f"{prefix}/loss": report["loss"]}
    metrics.update({f"{prefix}/f1_{row['class']}": row["f1"] for row in report["per_class"]})
    tracker.log_eval(trained.card.steps or 0, metrics, result.confusion, trained.class_names, result.examples,
                     final=True)
    run_id = tracker.run_id
    tracker.finish(0)
    return run_id
