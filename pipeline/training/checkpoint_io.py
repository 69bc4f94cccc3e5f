"""The collective write and the load of a checkpoint's files (the layout: pipeline/checkpoints/format.py).

Every rank calls `save_checkpoint` at the same step; the main process writes. Each stage ends in
an agreement: if any rank failed, every rank raises the same error and the previous checkpoint is
kept, so no rank is left at a barrier that the others never reach.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.checkpoints.format import BEST_FILE, EMA_FILE, CheckpointMeta, checkpoint_root, list_checkpoints, write_meta
from pipeline.distributed.agreement import fail_together
from pipeline.errors import UserError
from pipeline.faults import FaultPoint


def save_checkpoint(accelerator, output_dir: str | Path, model, optimizer, scheduler, meta: CheckpointMeta, keep_last: int,
                    ema=None, fault: FaultPoint | None = None, best: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank must call this at the same step. `fault`: a test's injection point; `best`: the main
    process's weights of the best evaluation (eval.keep_best)."""
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
            if best is not None:
                save_file(best, tmp / BEST_FILE)
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    # A full disk: torch.save says RuntimeError, safetensors its own SafetensorError.
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = err
    _agree_or_fail(accelerator, failure, tmp, meta.state.step, output_dir)
    if fault is not None:
        fault.reached("checkpoint-write", meta.state.step)
    try:
        if accelerator.is_main_process:
            write_meta(tmp, meta)  # last: a directory without state.json is never taken for a checkpoint
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


def _agree_or_fail(accelerator, failure: BaseException | None, tmp: Path, step: int, output_dir) -> None:
    """Collective: if any rank failed to write, every rank raises (none is left at a barrier)."""

    def error(reasons: str) -> CheckpointWriteError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        return CheckpointWriteError(
            f"writing the checkpoint of step {step} in {checkpoint_root(output_dir)} failed ({reasons}); the previous "
            f"checkpoint {previous[-1] if previous else '(none)'} is kept. Free disk space or fix the volume, then rerun "
            "with --resume auto"
        )

    fail_together(accelerator, failure, error)


def load_best(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of the best evaluation that the checkpoint at `path` carries (eval.keep_best), if any."""
    return load_file(path / BEST_FILE, device="cpu") if (path / BEST_FILE).is_file() else None


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, ema=None) -> None:
    """Into the prepared objects; `ema`, the main process's WeightAverage, from its own file."""
    unwrapped = accelerator.unwrap_model(model)
    # Everything is read into host memory and load_state_dict copies it onto the model's device:
    # multi-process CPU runs place tensors on "cpu:0", a device safetensors rejects and torch.load
    # cannot restore to, so files written by such a run are only readable this way.
    unwrapped.load_state_dict(load_file(path / "model.safetensors", device="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True, map_location="cpu"))
    if ema is None:
        return
    if (path / EMA_FILE).is_file():
        ema.load_state_dict(load_file(path / EMA_FILE, device="cpu"))
    else:  # train.ema was turned on for the resumed run: the average starts from the weights
        ema.load_state_dict(unwrapped.state_dict())
        print(f"warning: {path} holds no weight average; train.ema starts averaging from its weights",
              file=sys.stderr, flush=True)
