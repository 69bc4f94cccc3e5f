"""The checkpoint on disk: its layout, its state.json, and whether its files are as they were saved.

Layout of `output_dir/checkpoints/step-00000100/`:
  model.safetensors   weights of the unwrapped model
  ema.safetensors     their average, with train.ema
  optimizer.pt        optimizer state (tensors and numbers only: loaded with weights_only)
  scheduler.pt, scaler.pt
  state.json          step, epoch, data position, best accuracy, W&B run id, dataset fingerprint, what
                      fixes the data order (global batch, seed, shuffle window), config, and the
                      sha256 of every other file; written last, so a directory without it is no checkpoint

A checkpoint is written into `.tmp-step-...` and renamed when complete, so a crash mid-write
leaves a temp dir that the next start removes, never a half checkpoint that looks whole.
Training (the Checkpointer, pipeline/training/checkpoint.py; the write and load of the files,
checkpoint_io.py) and inference (pipeline/inference/models.py) both find, read and verify
checkpoints through this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import UserError
from pipeline.files import sha256_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
EMA_FILE = "ema.safetensors"
BEST_FILE = "best.safetensors"  # eval.keep_best: the weights of the best evaluation so far
STATE_FILE = "state.json"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    best_accuracy: Optional[float] = None
    wandb_run_id: Optional[str] = None
    skipped_steps: int = 0
    best_step: Optional[int] = None  # the step whose evaluation gave best_accuracy
    best_loss: Optional[float] = None  # its loss: an evaluation as accurate but of lower loss is better
    evals_since_best: int = 0  # evaluations since the best one (eval.patience counts them)
    stopped_early: bool = False  # eval.patience ended the run: it is finished short of its last step


@dataclass
class CheckpointMeta:
    state: TrainState
    fingerprint: str
    model: dict[str, Any]
    world_size: int  # that wrote it: informative only
    config: dict[str, Any] = field(default_factory=dict)
    # What fixes the order of the samples: global_batch_size, seed, shuffle_buffer. Empty in
    # checkpoints of versions whose order depended on the world size.
    order: dict[str, int] = field(default_factory=dict)
    # What evaluate/predict need beside the weights: image shape, class names, dataset, precision.
    model_card: dict[str, Any] = field(default_factory=dict)
    # sha256 of every other file of the checkpoint (all ranks'), relative path -> hex digest;
    # empty in checkpoints written before digests were recorded.
    files: dict[str, str] = field(default_factory=dict)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def remove_partial(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    partial = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


class DamagedCheckpoint(UserError):
    exit_code = 2
    shared = True  # the main process verifies; every rank raises what it found


def write_meta(directory: Path, meta: CheckpointMeta) -> None:
    """state.json, holding the digests of every other file already in `directory`: written last."""
    meta.files = file_digests(directory)
    _write_json(directory / STATE_FILE, {**asdict(meta), "state": asdict(meta.state)})


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` but state.json, by relative path."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE):
        digests[path.relative_to(directory).as_posix()] = sha256_file(path)
    return digests


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (a file missing, or not as it was saved); None if nothing.
    A checkpoint written before digests were recorded can only be checked for its state.json."""
    try:
        meta = read_meta(path)
    except UserError as err:
        return f"state.json: {err}"
    actual = file_digests(path) if meta.files else {}
    for name, digest in meta.files.items():
        if name not in actual:
            return f"{name}: missing"
        if actual[name] != digest:
            return f"{name}: contents differ from the sha256 recorded when it was saved"
    return None


def read_meta(path: Path) -> CheckpointMeta:
    try:
        raw = json.loads((path / STATE_FILE).read_text())
        return CheckpointMeta(
            state=TrainState(**raw["state"]), fingerprint=raw["fingerprint"], model=raw["model"],
            world_size=raw["world_size"], config=raw.get("config", {}), files=raw.get("files", {}),
            model_card=raw.get("model_card", {}), order=raw.get("order", {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {path} has an unreadable state.json ({err}); resume from an older one with --resume PATH") from None


