"""What a run leaves in output_dir for a user without W&B: metrics.jsonl, summary.json, model/, plots/."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.files import write_text_atomic


def check_output_dir(out: Path, min_free: int) -> None:
    """Fail before training, not at the first checkpoint, when output_dir cannot take the run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {out} is not writable ({err.strerror or err}); choose another output_dir "
                        "or fix its permissions or volume mount") from None
    free = shutil.disk_usage(out).free
    if free < min_free:
        raise UserError(f"output_dir {out} has {free / 2**20:.1f} MiB free, less than the {min_free / 2**20:.1f} MiB "
                        "its checkpoints and outputs need; free space or choose another output_dir")


class MetricsLog:
    """Append-only JSON lines, one object per log or eval event, each with `step`."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.failed = False
        if resume_step is not None and path.is_file():
            # Events after the checkpoint we resume from will be produced again; drop the stale ones.
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, event: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError as err:  # a full disk is reported once, and by the next checkpoint, which stops the run
            if not self.failed:
                print(f"warning: cannot append to {self.path} ({err.strerror or err}); metrics are lost until it is writable",
                      file=sys.stderr, flush=True)
            self.failed = True

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_plots(plots_dir: Path, events: list[dict[str, Any]], confusion: np.ndarray | None, class_names: list[str],
                eval_split: str = "test") -> None:
    """Curves on `eval_split` (with the weight average's beside them when there is one), the final
    score on test, and the test split's confusion matrix of the final weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    train = [e for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/accuracy" in e]
    averaged = [e for e in evals if "eval_ema/accuracy" in e]
    tests = [e for e in events if "test/accuracy" in e]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["step"] for e in train], [e["train/loss"] for e in train], label="train")
    if evals:  # none with eval.split: none
        ax.plot([e["step"] for e in evals], [e["eval/loss"] for e in evals], "o-", label=eval_split)
    if averaged:
        ax.plot([e["step"] for e in averaged], [e["eval_ema/loss"] for e in averaged], "s-", label=f"{eval_split}, averaged weights")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval/accuracy"] for e in evals], "o-", label=eval_split)
    if averaged:
        ax.plot([e["step"] for e in averaged], [e["eval_ema/accuracy"] for e in averaged], "s-",
                label=f"{eval_split}, averaged weights")
    for e in tests[-1:]:
        ax.plot([e["step"]], [e["test/accuracy"]], "*", markersize=12, label=f"test, once: {e['test/accuracy']:.4f}")
    during = f"{eval_split} during training, " if evals else ""
    ax.set(xlabel="optimizer step", ylabel="accuracy", title=f"Accuracy ({during}test at the end)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "accuracy.png", dpi=100)
    plt.close(fig)

    if confusion is not None:
        plot_confusion(plots_dir / "confusion.png", confusion, class_names, title="Confusion matrix (test, final weights)")


def plot_confusion(path: Path, confusion: np.ndarray, class_names: list[str], title: str) -> None:
    """Rows are the true class, columns the prediction, as everywhere in the pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > confusion.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
