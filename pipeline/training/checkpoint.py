"""Checkpoints: written atomically with every rank taking part, rotated, resumed exactly.

Layout of `output_dir/checkpoints/step-00000100/`:
  model.safetensors   weights of the unwrapped model
  ema.safetensors     their average, with train.ema
  optimizer.pt        optimizer state (tensors and numbers only: loaded with weights_only)
  scheduler.pt, scaler.pt
  state.json          step, epoch, data position, best accuracy, W&B run id, dataset fingerprint, what
                      fixes the data order (global batch, seed, shuffle window), config

Nothing in it belongs to a rank: the data position is global (optimizer steps into an epoch of
global batches), and the randomness of training is keyed on positions, not drawn from per-rank
generators (pipeline/data/order.py). So a checkpoint resumes at any world size that divides its
global batch; one of another global batch, seed or dataset is refused, exit 2.

A checkpoint is written into `.tmp-step-...` and renamed when complete, so a crash mid-write
leaves a temp dir that the next start removes, never a half checkpoint that looks whole.
For multi-node runs `output_dir` must be a volume all nodes share.

`Checkpointer` is the one object the trainer talks to: it decides when a step is saved, keeps
the newest `keep_last`, tracks the best evaluation, cleans up partial writes, and resolves and
checks what to resume. The free functions below it are its mechanics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.training.collectives import any_rank

STEP_DIR = re.compile(r"^step-(\d{8})$")
EMA_FILE = "ema.safetensors"


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


class Checkpointer:
    """The checkpoints of one output_dir. Methods marked collective run on every rank."""

    def __init__(self, accelerator, output_dir: str | Path, every_steps: int, keep_last: int, *,
                 fingerprint: str, model_desc: dict[str, Any], config: dict[str, Any], model_card: dict[str, Any],
                 order: dict[str, int]):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.root = checkpoint_root(output_dir)
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.model_desc = model_desc
        self.config = config
        self.model_card = model_card
        self.order = order

    def clean_partial(self) -> list[Path]:
        """Collective: the main process removes what a crash mid-write left; the others wait for it."""
        removed = remove_partial(self.output_dir) if self.accelerator.is_main_process else []
        self.accelerator.wait_for_everyone()
        return removed

    def resolve(self, resume: str | None) -> Path | None:
        """Collective. `auto`: the newest checkpoint that verifies, damaged newer ones moved aside
        (None when there is none at all); a path: that checkpoint, which must verify; None: fresh start."""
        if resume is None:
            return None
        if resume == "auto":
            return self._on_main(self._newest_verified)
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise UserError(f"--resume {resume} is not a complete checkpoint directory (no state.json); "
                            f"use --resume auto or one of {self.root}/step-*")
        problem = self._on_main(lambda: verify_checkpoint(path))
        if problem:
            raise DamagedCheckpoint(
                f"--resume {resume}: the checkpoint is damaged ({problem}); nothing was loaded or changed. Resume from "
                f"another of {self.root}/step-*, or use --resume auto, which moves damaged checkpoints aside and takes "
                "the newest one that verifies"
            )
        return path

    def _newest_verified(self) -> Path | None:
        found = list_checkpoints(self.output_dir)
        for path in reversed(found):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            aside = self.root / "damaged" / path.name
            shutil.rmtree(aside, ignore_errors=True)
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            print(f"warning: checkpoint {path.name} failed verification ({problem}); moved to {aside} (kept for "
                  "inspection), falling back to an older checkpoint", file=sys.stderr, flush=True)
        if found:
            raise DamagedCheckpoint(
                f"--resume auto: none of the {len(found)} checkpoint(s) in {self.root} verifies; all were moved to "
                f"{self.root / 'damaged'}. Start a new output_dir, or run without --resume to train from scratch here"
            )
        return None

    def _on_main(self, fn):
        """fn() on the main process, its result (or its error) handed to every rank: one decision, no rank left waiting."""
        outcome: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                outcome = [("ok", fn())]
            except (UserError, OSError) as err:
                outcome = [("error", err)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(outcome, from_process=0)
        kind, value = outcome[0]
        if kind == "error":
            raise value if isinstance(value, UserError) else UserError(f"checking the checkpoints in {self.root} failed: {value}")
        return value

    def restore(self, path: Path, model, optimizer, scheduler, ema=None) -> tuple[TrainState, int]:
        """Check that `path` fits this run, load it into the prepared objects; its state and the world size that wrote it."""
        meta = read_meta(path)
        check_compatible(meta, path, self.fingerprint, self.model_desc, self.order)
        load_checkpoint(self.accelerator, path, model, optimizer, scheduler)
        if ema is not None:
            if (path / EMA_FILE).is_file():
                ema.load_state_dict(load_file(path / EMA_FILE, device="cpu"))
            else:  # train.ema was turned on for the resumed run: the average starts from the weights
                ema.load_state_dict(self.accelerator.unwrap_model(model).state_dict())
                print(f"warning: {path} holds no weight average; train.ema starts averaging from its weights",
                      file=sys.stderr, flush=True)
        return meta.state, meta.world_size

    def latest(self) -> Path | None:
        found = list_checkpoints(self.output_dir)
        return found[-1] if found else None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    @staticmethod
    def record_eval(state: TrainState, accuracy: float) -> bool:
        """Track the best evaluation in the state that checkpoints carry; True when this one is the new best."""
        if state.best_accuracy is not None and accuracy <= state.best_accuracy:
            return False
        state.best_accuracy, state.best_step = accuracy, state.step
        return True

    @staticmethod
    def is_best(state: TrainState) -> bool:
        """Whether a checkpoint of this state holds the best model evaluated so far."""
        return state.best_step == state.step

    def save(self, state: TrainState, model, optimizer, scheduler, ema=None) -> Path:
        """Collective: every rank must call this at the same step; keeps the newest keep_last. `ema`
        (the main process's WeightAverage) is saved beside the weights."""
        meta = CheckpointMeta(state=state, fingerprint=self.fingerprint, model=self.model_desc,
                              world_size=self.accelerator.num_processes, config=self.config, model_card=self.model_card,
                              order=self.order)
        return save_checkpoint(self.accelerator, self.output_dir, model, optimizer, scheduler, meta, self.keep_last, ema)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def remove_partial(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    partial = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def save_checkpoint(accelerator, output_dir: str | Path, model, optimizer, scheduler, meta: CheckpointMeta, keep_last: int,
                    ema=None) -> Path:
    """Collective: every rank must call this at the same step."""
    root = checkpoint_root(output_dir)
    name = f"step-{meta.state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    failure: BaseException | None = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as err:
        failure = err
    _agree_or_fail(accelerator, failure, tmp, meta.state.step, output_dir)
    try:
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            save_file({k: v.detach().contiguous().cpu() for k, v in unwrapped.state_dict().items()}, tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / EMA_FILE)
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    # A full disk: torch.save says RuntimeError, safetensors its own SafetensorError.
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = err
    _agree_or_fail(accelerator, failure, tmp, meta.state.step, output_dir)
    try:
        if accelerator.is_main_process:
            # state.json last, holding the other files' digests: a directory without it is never
            # taken for a checkpoint.
            meta.files = file_digests(tmp)
            _write_json(tmp / "state.json", {**asdict(meta), "state": asdict(meta.state)})
    except OSError as err:
        failure = err
    _agree_or_fail(accelerator, failure, tmp, meta.state.step, output_dir)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(UserError):
    exit_code = 4


class DamagedCheckpoint(UserError):
    exit_code = 2


def _agree_or_fail(accelerator, failure: BaseException | None, tmp: Path, step: int, output_dir) -> None:
    """Collective: if any rank failed to write, every rank raises (none is left at a barrier)."""
    if not any_rank(accelerator, failure is not None):
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = list_checkpoints(output_dir)
    reason = f" ({failure})" if failure is not None else " (on another rank)"
    raise CheckpointWriteError(
        f"writing the checkpoint of step {step} in {checkpoint_root(output_dir)} failed{reason}; the previous checkpoint "
        f"{previous[-1] if previous else '(none)'} is kept. Free disk space or fix the volume, then rerun with --resume auto"
    )


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` but state.json, by relative path."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "state.json"):
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
        raw = json.loads((path / "state.json").read_text())
        return CheckpointMeta(
            state=TrainState(**raw["state"]), fingerprint=raw["fingerprint"], model=raw["model"],
            world_size=raw["world_size"], config=raw.get("config", {}), files=raw.get("files", {}),
            model_card=raw.get("model_card", {}), order=raw.get("order", {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {path} has an unreadable state.json ({err}); resume from an older one with --resume PATH") from None


class IncompatibleCheckpoint(UserError):
    exit_code = 2


def check_compatible(meta: CheckpointMeta, path: Path, fingerprint: str, model_cfg: dict[str, Any],
                     order: dict[str, int]) -> None:
    """What must not change under a checkpoint: the data, the model, and what fixes the order of the samples."""
    fresh = "or start a new output_dir"
    if meta.fingerprint != fingerprint:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was trained on dataset {meta.fingerprint[:12]}, but data.dir holds {fingerprint[:12]}; "
            f"resume with the same prepared dataset, {fresh}")
    # A model key that came after the checkpoint was written built its model with the key's default.
    saved = {**ModelConfig().model_dump(), **meta.model}
    changed = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if changed:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} holds a model with different {', '.join('model.' + k for k in changed)} "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with the same model config {fresh}")
    if not meta.order:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was written by an earlier version, whose data order depended on the number of "
            f"processes; this one cannot say where that run stood in its data. Finish it with that version, {fresh}")
    changed = {k: (meta.order.get(k), v) for k, v in order.items() if meta.order.get(k) != v}
    if changed:
        keys = {"global_batch_size": "train.global_batch_size", "seed": "train.seed", "shuffle_buffer": "data.shuffle_buffer"}
        said = ", ".join(f"{keys.get(k, k)} {old} -> {new}" for k, (old, new) in changed.items())
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was trained with another order of samples ({said}): its data position means nothing "
            f"under the new one. Resume with the checkpoint's values (any number of processes that divides its "
            f"global batch works), {fresh}")


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> None:
    unwrapped = accelerator.unwrap_model(model)
    # Everything is read into host memory and load_state_dict copies it onto the model's device:
    # multi-process CPU runs place tensors on "cpu:0", a device safetensors rejects and torch.load
    # cannot restore to, so files written by such a run are only readable this way.
    unwrapped.load_state_dict(load_file(path / "model.safetensors", device="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True, map_location="cpu"))
