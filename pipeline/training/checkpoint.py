"""Checkpoints of a training run: when one is written, which ones are kept, what a run resumes from.

Nothing in a checkpoint belongs to a rank: the data position is global (optimizer steps into an epoch
of global batches), and the randomness of training is keyed on positions, not drawn from per-rank
generators (pipeline/data/order.py). So a checkpoint resumes at any world size that divides its
global batch; one of another global batch, seed, model or dataset is refused, exit 2
(pipeline/checkpoints/compatibility.py). For multi-node runs `output_dir` must be a volume all
nodes share.

`Checkpointer` is the one object the trainer talks to: it decides when a step is saved, keeps the
newest `keep_last`, tracks the best evaluation, cleans up partial writes, and resolves and checks
what to resume. The files themselves: pipeline/checkpoints/format.py; their collective write and
load: checkpoint_io.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.checkpoints.compatibility import check_compatible
from pipeline.checkpoints.format import (
    STATE_FILE,
    CheckpointMeta,
    DamagedCheckpoint,
    TrainState,
    checkpoint_root,
    list_checkpoints,
    read_meta,
    remove_partial,
    verify_checkpoint,
)
from pipeline.distributed.agreement import on_main
from pipeline.errors import UserError
from pipeline.faults import FaultPoint
from pipeline.training.checkpoint_io import load_best, load_checkpoint, save_checkpoint

__all__ = ["Checkpointer", "TrainState", "better"]


def better(accuracy: float, loss: float, best_accuracy: float | None, best_loss: float | None) -> bool:
    """Whether an evaluation beats the best so far: higher accuracy, or the same and a lower loss (a state saved
    before losses were kept has none: accuracy alone decides)."""
    if best_accuracy is None or accuracy > best_accuracy:
        return True
    return accuracy == best_accuracy and best_loss is not None and loss < best_loss


class Checkpointer:
    """The checkpoints of one output_dir. Methods marked collective run on every rank."""

    def __init__(self, accelerator, output_dir: str | Path, every_steps: int, keep_last: int, *,
                 fingerprint: str, model_desc: dict[str, Any], config: dict[str, Any], model_card: dict[str, Any],
                 order: dict[str, int], fault: FaultPoint | None = None, keep_best: bool = False):
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
        self.fault = fault
        self.keep_best = keep_best
        # eval.keep_best: the shipped weights of the best evaluation so far, on the host (main process:
        # it alone evaluates). In every checkpoint, so a resumed run ships what an uninterrupted one would.
        self.best: dict[str, Any] | None = None

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
        if not (path / STATE_FILE).is_file():
            err = UserError(f"--resume {resume} is not a complete checkpoint directory (no state.json); "
                            f"use --resume auto or one of {self.root}/step-*")
            err.shared = True  # every rank looked at the same path
            raise err
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
        return on_main(self.accelerator, fn, lambda err: UserError(f"checking the checkpoints in {self.root} failed: {err}"))

    def restore(self, path: Path, model, optimizer, scheduler, ema=None) -> tuple[TrainState, int]:
        """Check that `path` fits this run, load it into the prepared objects; its state and the world size that wrote it."""
        try:
            meta = read_meta(path)
        except UserError as err:  # every rank read the same file
            err.shared = True
            raise
        check_compatible(meta, path, self.fingerprint, self.model_desc, self.order)
        load_checkpoint(self.accelerator, path, model, optimizer, scheduler, ema)
        if self.keep_best and self.accelerator.is_main_process:
            self.best = load_best(path)
            if self.best is None and meta.state.best_step is not None:
                # eval.keep_best turned on for the resumed run: the best is chosen among evaluations from here on.
                print(f"warning: {path} holds no best weights (eval.keep_best was off); the best is chosen among "
                      "the evaluations from here on", file=sys.stderr, flush=True)
                meta.state.best_accuracy = meta.state.best_loss = meta.state.best_step = None
                meta.state.evals_since_best = 0  # eval.patience counts from the new best on
        return meta.state, meta.world_size

    def latest(self) -> Path | None:
        found = list_checkpoints(self.output_dir)
        return found[-1] if found else None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def record_eval(self, state: TrainState, accuracy: float, loss: float, shipped) -> bool:
        """Track the best evaluation in the state that checkpoints carry (ties on accuracy go to the lower loss) and,
        with eval.keep_best, the weights that gave it (`shipped`, the model that model/ would hold). True when new."""
        if not better(accuracy, loss, state.best_accuracy, state.best_loss):
            return False
        state.best_accuracy, state.best_loss, state.best_step = accuracy, loss, state.step
        if self.keep_best:
            self.best = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in shipped.state_dict().items()}
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
        return save_checkpoint(self.accelerator, self.output_dir, model, optimizer, scheduler, meta, self.keep_last, ema,
                               self.fault, best=self.best)


