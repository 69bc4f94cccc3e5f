"""One training run's parts, built once (trainer.py) and passed down: the loop and the end of the run
read them and return what they produce; neither writes into them.

Two things in a Run change while it trains, by design: `state` (the step counters that checkpoints
save and a resume restores) and the parts that keep their own running figures (the model and
optimizer, the metrics window, the batch provider's counts). Everything else is fixed when the
run is built, including the settings resolved from the data (`resolved`), which stand beside the
config as the user wrote it rather than inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.config import Config, ModelConfig
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import Manifest
from pipeline.data.order import BatchLayout
from pipeline.data.provider import BatchProvider
from pipeline.data.store import ShardStore, load_split_tensors
from pipeline.inputs import InputScale
from pipeline.model_card import ModelCard
from pipeline.tracking import Tracker
from pipeline.training.checkpoint import Checkpointer, TrainState
from pipeline.training.ema import WeightAverage
from pipeline.training.evaluation import Evaluator
from pipeline.training.metrics import MetricsSink, StepWindow
from pipeline.training.step import StepParts


@dataclass(frozen=True, eq=False)
class DataPlan:
    """What the train split and the launch decide before any model exists: every rank alike."""

    store: ShardStore
    manifest: Manifest
    placement: str  # "device" (resident) or "stream"
    layout: BatchLayout  # fitted to the split: a split smaller than the global batch shrinks it
    plan: EpochPlan
    inputs: InputScale
    model: ModelConfig  # the config's model with model.frame resolved from the data
    total_steps: int

    def resolved(self) -> dict[str, Any]:
        """The settings the data and the launch decided, under the config keys that would fix them: saved beside
        config.yaml (resolved.yaml). train.max_steps is the run's length, however the config gave it."""
        return {"model.frame": self.model.frame, "train.global_batch_size": self.layout.global_batch,
                "train.batch_size": self.layout.micro_batch, "train.max_steps": self.total_steps,
                "data.placement": self.placement}


@dataclass(frozen=True, eq=False)
class Run:
    cfg: Config  # as the user wrote it (model.frame may be auto: data.model holds the number)
    accelerator: Accelerator
    data: DataPlan
    parts: StepParts  # the prepared model, optimizer, scheduler and the step's settings
    unwrapped: torch.nn.Module
    ema: WeightAverage | None  # main process only
    checkpointer: Checkpointer
    state: TrainState  # the counters: advanced by the loop, saved in checkpoints
    resumed_from: Path | None
    world_change: tuple[int, int] | None  # (world size that wrote the checkpoint, this one)
    batches: BatchProvider
    eval_split: str
    evaluator: Evaluator | None  # main process only
    card: ModelCard  # what evaluate and predict need beside the weights (the run's end adds steps, W&B id)
    info: dict[str, Any]  # how this launch ran (world size, precision, placement, ...): summary and W&B
    window: StepWindow
    tracker: Tracker
    bar: tqdm
    sink: MetricsSink

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def total_steps(self) -> int:
        return self.data.total_steps

    @property
    def finished(self) -> bool:
        """Every step has run, or eval.patience ended the run early: test is scored, the model is final."""
        return self.state.step == self.data.total_steps or self.state.stopped_early

    @property
    def shipped(self) -> torch.nn.Module:
        """The weights model/ will hold: their average when train.ema is set."""
        return self.ema.model if self.ema else self.unwrapped

    def log(self, message: str) -> None:
        say(self.accelerator, message)

    def evaluator_for(self, split: str) -> Evaluator:
        return make_evaluator(self.cfg, self.accelerator, self.data, split)


def say(accelerator: Accelerator, message: str) -> None:
    """One [train] line, from the main process."""
    if accelerator.is_main_process:
        tqdm.write(f"[train] {message}")


def make_evaluator(cfg: Config, accelerator: Accelerator, data: DataPlan, split: str) -> Evaluator:
    x, lengths, y = load_split_tensors(data.manifest, data.store, split)
    return Evaluator(x, lengths if data.plan.ragged else None, y, cfg.eval.batch_size, data.manifest.num_classes,
                     accelerator.device, accelerator.autocast, data.inputs)
