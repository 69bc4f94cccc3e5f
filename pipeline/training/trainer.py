"""The Trainer's set-up: the data plan, the model and optimizer, the resume, and the run's outputs.

A built Trainer holds everything one run needs; `run()` hands it to the loop (loop.py) and then to
the end of the run (finish.py). The pieces do the work: `train_step` (step.py) computes one update,
`StreamBatches` (batches.py) or `ResidentBatches` (data/resident.py) deliver this rank's data,
`Evaluator` (evaluation.py) scores a split on rank 0, `Checkpointer` (checkpoint.py) owns the
checkpoints, and `MetricsSink` (metrics.py) writes every event to metrics.jsonl, W&B and the
progress bar at once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.config import Config, save_config
from pipeline.data.augment import Augment
from pipeline.data.manifest import Manifest, check_dataset, load_manifest
from pipeline.data.order import BatchLayout, fit_to_split
from pipeline.data.resident import ResidentBatches, choose_placement
from pipeline.data.sequence_augment import SequenceAugment
from pipeline.data.stream import EpochPlan, ShardSource, TrainStream, load_split_tensors, verify_shards
from pipeline.distributed.agreement import any_rank, fail_together, on_main
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.distributed.preemption import StopSignal
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.files import mask_url
from pipeline.inputs import InputScale
from pipeline.model import build_model
from pipeline.tracking import Tracker
from pipeline.training.accelerator import build_accelerator
from pipeline.training.batches import StreamBatches
from pipeline.training.checkpoint import Checkpointer, TrainState
from pipeline.training.ema import WeightAverage
from pipeline.training.evaluation import Evaluator, eval_split
from pipeline.training.exact_reduction import ExactReduction
from pipeline.training.finish import end_run
from pipeline.training.loop import TrainingLoop
from pipeline.training.metrics import MetricsSink, StepWindow
from pipeline.training.optimizer import build_optimizer, build_scheduler
from pipeline.training.outputs import MetricsLog, check_output_dir
from pipeline.training.rundir import AlreadyComplete, complete_message
from pipeline.training.step import StepParts


def total_steps(cfg: Config, plan: EpochPlan) -> int:
    """Optimizer steps of the run; every epoch has plan.steps global batches, at any world size."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(plan.steps * cfg.train.epochs, cfg.train.min_steps or 0)


def auto_frame(median_length: float, target_steps: int = 64) -> int:
    """model.frame auto: steps per frame so that the median sequence takes about `target_steps` recurrent steps."""
    return max(1, math.ceil(median_length / target_steps))


def balanced_weights(class_counts: dict[str, int]) -> torch.Tensor:
    """train.class_weights balanced: N / (classes x count) per class, so that the mean weight per case is 1."""
    counts = torch.tensor(list(class_counts.values()), dtype=torch.float64)
    missing = [name for name, count in class_counts.items() if count == 0]
    if missing:
        raise ConfigError(f"train.class_weights balanced: the train split has no case of {', '.join(missing)}, so no "
                          "weight can balance it; prepare the data so that every class is in train")
    return (counts.sum() / (len(counts) * counts)).float()


def required_free_bytes(model: torch.nn.Module, keep_last: int) -> int:
    """Room for keep_last + 1 checkpoints (weights + Adam's two moments, fp32) and the final model, doubled."""
    params = sum(p.numel() for p in model.parameters()) * 4
    return 2 * (keep_last + 1) * 4 * params + 8 * 2**20


class Trainer:
    """Set-up in __init__ (data plan, model, optimizer, resume, tracker); run() trains and ends the run."""

    def __init__(self, cfg: Config, resume: str | None, env: LaunchEnv, accelerator: Accelerator | None = None,
                 claim: Callable[[Trainer], dict[str, Any] | None] | None = None):
        """`env` is the launch as the entry point read it (pipeline/distributed/launch_env.py): nothing here reads
        the environment for it. `claim` (collective) runs once the run's length is known and before anything is
        written to output_dir: it refuses the directory or takes it, and returns the summary of the finished run
        that this start resumes, if it is one (pipeline/training/run.py)."""
        self.cfg = cfg
        self.env = env
        self.accelerator = accelerator = accelerator or build_accelerator(cfg, self.env)
        self.out = Path(cfg.output_dir)
        self.main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.device = accelerator.device
        self.rehearsal = cfg.train.gpu_rehearsal and self.device.type == "cuda"
        self._plan_data()
        self.finished_run = claim(self) if claim is not None else None
        self._build_training(resume)
        self._build_outputs()

    def _plan_data(self) -> None:
        cfg = self.cfg
        self.source = ShardSource(cfg.data.dir, cfg.data.base_url, cfg.data.retry_s)
        self.manifest = self._read_manifest()
        self.placement = self._choose_placement()
        self.layout = self._fit_layout(BatchLayout.make(cfg.train.global_batch_size, cfg.train.batch_size, self.world))
        self.plan = EpochPlan.make(self.manifest, "train", self.layout, cfg.train.seed, cfg.data.shuffle_buffer,
                                   cfg.data.length_buckets, cfg.data.canonical_streams)
        self.inputs = InputScale.for_data(self.manifest)
        if cfg.model.frame == "auto":  # fixed here from the data, so the model's description holds a number
            cfg.model.frame = auto_frame(self.manifest.split("train").lengths.median)
        if (cfg.data.hflip or cfg.data.shift or cfg.data.erase) and self.manifest.image_shape is None:
            raise ConfigError(f"data.hflip, data.shift and data.erase augment images, but {cfg.data.dir} holds sequences "
                              f"({self.manifest.dataset}); set them to false / 0 for this data set")
        if (cfg.data.time_mask or cfg.data.jitter or cfg.data.scale) and self.manifest.image_shape is not None:
            raise ConfigError(f"data.time_mask, data.jitter and data.scale augment standardised sequences, but {cfg.data.dir} "
                              f"holds images ({self.manifest.dataset}, scaled by / 255); use data.hflip, shift or erase")
        self.total_steps = total_steps(cfg, self.plan)
        if cfg.train.max_steps is None and cfg.eval.every_epochs is None and cfg.eval.every_steps > self.total_steps:
            raise ConfigError(f"eval.every_steps ({cfg.eval.every_steps}) is larger than the run ({self.total_steps} steps)")
        self._log_plan()

    def _fit_layout(self, layout: BatchLayout) -> BatchLayout:
        train = self.manifest.split("train").num_samples
        fitted = fit_to_split(layout, train)
        if fitted != layout:
            self.log(f"the train split holds {train} samples, fewer than the global batch of {layout.global_batch}: "
                     f"global batch {fitted.global_batch}, micro-batch {fitted.micro_batch} instead")
        return fitted

    def _read_manifest(self) -> Manifest:
        """Every rank reads the manifest and checks the shards it reads from disk (each node may hold its own
        copy): one message, however many failed. Shards on a server are the same for every rank: the main
        process alone asks the server, and every rank learns the answer."""
        cfg, manifest, failure = self.cfg, None, None
        try:
            manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
            check_dataset(manifest, cfg.data.dir, cfg.data.dataset)
            if not self.source.base_url:
                verify_shards(manifest, self.source, "train", cfg.data.verify)
        except UserError as err:
            failure = err
        fail_together(self.accelerator, failure)
        if self.source.base_url:
            on_main(self.accelerator, lambda: verify_shards(manifest, self.source, "train", cfg.data.verify),
                    lambda err: DataError(f"checking the shards at data.base_url failed ({mask_url(str(err))})"))
        return manifest

    def _build_training(self, resume: str | None) -> None:
        """The model, its optimizer and average, the checkpoints, and the state resumed from one of them."""
        cfg = self.cfg
        self.parts = self._build_parts()
        self.checkpointer = Checkpointer(
            self.accelerator, self.out, cfg.checkpoint.every_steps, cfg.checkpoint.keep_last,
            fingerprint=self.manifest.fingerprint, model_desc=cfg.model.model_dump(), config=cfg.to_dict(),
            model_card=self.model_card(), order={"global_batch_size": self.layout.global_batch, "seed": cfg.train.seed,
                                                 "shuffle_buffer": cfg.data.shuffle_buffer,
                                                 "canonical_streams": cfg.data.canonical_streams},
            fault=self.env.fault)
        self.uses_dropout = cfg.model.dropout > 0
        self.unwrapped = self.accelerator.unwrap_model(self.parts.model)
        # The average of the weights, on the main process (it alone evaluates and saves it).
        self.ema = WeightAverage(self.unwrapped, cfg.train.ema.decay, cfg.train.ema.start_step) \
            if cfg.train.ema and self.main else None
        self.world_change: tuple[int, int] | None = None  # (world size that wrote the checkpoint, this one)
        self.resumed_from = self._restore(resume)
        self.state: TrainState = self.resumed_from[1] if self.resumed_from else TrainState()
        self._stop_if_complete()
        if self.main:
            save_config(cfg, self.out / "config.yaml")
        self.batches = self._build_batches()

    def _stop_if_complete(self) -> None:
        """A finished run resumed at its end (the checkpoint has been checked against this config): nothing
        to train. Stop before config.yaml, metrics.jsonl or the W&B run are touched, every rank alike."""
        done = self.finished_run
        reached = self.state.step if self.resumed_from else (done or {}).get("steps")
        if done is not None and reached == self.total_steps:
            raise AlreadyComplete(complete_message(self.out, done), done)

    def _build_outputs(self) -> None:
        """Evaluation, metrics, W&B and the progress bar."""
        cfg = self.cfg
        self.eval_split, warning = eval_split(cfg.eval.split, list(self.manifest.splits), self.manifest.splitting)
        if warning and self.main:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.evaluator = self.evaluator_for(self.eval_split) if self.main else None
        self.run_info = {
            "world_size": self.world,
            "distributed_type": self.accelerator.distributed_type.value,
            "mixed_precision": self.accelerator.mixed_precision,
            "gpu_rehearsal": self.rehearsal,
            "data_placement": self.placement,
            "dataset_fingerprint": self.manifest.fingerprint,
            "eval_split": self.eval_split,
            "weights": "ema" if cfg.train.ema else "raw",
        }
        metrics_log = MetricsLog(self.out / "metrics.jsonl", self.state.step if self.resumed_from else None) if self.main else None
        self.window = StepWindow(self.device, self.layout.global_batch)
        # Last: nothing after it may fail, or the W&B run would be left unfinished.
        self.tracker = Tracker.create(cfg.wandb, self.out, self.main, {**cfg.to_dict(), **self.run_info}, self.state.wandb_run_id)
        self.bar = tqdm(total=self.total_steps, initial=self.state.step, dynamic_ncols=True, desc="train",
                        disable=not self.main or not cfg.train.progress_bar or None)
        self.sink = MetricsSink(metrics_log, self.tracker, self.bar, self.manifest.class_names)

    def run(self, stop: StopSignal) -> dict[str, Any]:
        """Train to the end, train.stop_at_step or an agreed SIGTERM; the summary on the main process."""
        stopped_by = TrainingLoop(self).run(stop)
        return end_run(self, stopped_by)

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(f"[train] {message}")

    def _log_plan(self) -> None:
        cfg, accelerator, layout = self.cfg, self.accelerator, self.layout
        dropped = self.manifest.split("train").num_samples - self.plan.steps * layout.global_batch
        implicit = "" if cfg.train.global_batch_size else " (train.global_batch_size unset: batch_size x processes)"
        self.log(f"world size {self.world} ({accelerator.distributed_type.value}, device {self.device}, "
                 f"mixed precision {accelerator.mixed_precision}); global batch {layout.global_batch}{implicit} = "
                 f"{self.world} process(es) x {layout.accumulation} accumulation step(s) x {layout.micro_batch}; "
                 f"{self.plan.steps} steps per epoch, the last {dropped} samples of each epoch's order dropped; "
                 f"{self.total_steps} steps")
        if self.rehearsal:
            self.log(f"GPU rehearsal: {self.world} ranks share {torch.cuda.device_count()} GPU(s) over gloo; this checks "
                     "the multi-rank path (evaluation, checkpoints, resume), its speed means nothing")

    def _build_parts(self) -> StepParts:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, self.manifest.features, self.manifest.num_classes)
        # The main process alone writes there; every rank learns if it cannot, and ends with its reason.
        on_main(self.accelerator, lambda: check_output_dir(self.out, required_free_bytes(model, cfg.checkpoint.keep_last)),
                lambda err: UserError(f"output_dir {self.out} cannot be checked ({err})"))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, self.total_steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)  # the scheduler is never prepared: optimizer.py
        augment = SequenceAugment(cfg.train.seed, cfg.data.time_mask, cfg.data.jitter, cfg.data.scale)
        return StepParts(self.accelerator, model, optimizer, scheduler, cfg.train.grad_clip, cfg.train.label_smoothing,
                         self.inputs, self._class_weights(), augment if augment.active else None,
                         ExactReduction(self.layout) if cfg.train.exact_reduction else None)

    def _class_weights(self) -> torch.Tensor | None:
        if self.cfg.train.class_weights == "none":
            return None
        return balanced_weights(self.manifest.split("train").class_counts).to(self.device)

    def _choose_placement(self) -> str:
        """Where the train split lives; the same on every rank, since steps per epoch depend on it."""
        placement, why = choose_placement(self.cfg.data.placement, self.cfg.data.on_error, self.manifest, self.device)
        if any_rank(self.accelerator, placement == "stream") and placement != "stream":
            placement, why = "stream", "auto: another rank's device has too little free memory"
        self.log(f"data placement {placement} ({why})")
        return placement

    def _build_batches(self) -> StreamBatches | ResidentBatches:
        cfg, rank = self.cfg, self.accelerator.process_index
        augment = Augment(cfg.train.seed, hflip=cfg.data.hflip, shift=cfg.data.shift, erase=cfg.data.erase,
                          erase_area=cfg.data.erase_area)
        if self.placement == "device":
            return ResidentBatches(self.manifest, self.source, "train", self.plan, rank, self.device, augment,
                                   record_sample_ids=cfg.data.record_sample_ids)
        stream = TrainStream(self.manifest, self.source, "train", self.plan, rank, augment, workers=cfg.data.num_workers,
                             on_error=cfg.data.on_error)
        return StreamBatches(stream, seed=cfg.train.seed, data_dir=cfg.data.dir, pin_memory=self.device.type == "cuda",
                             record_sample_ids=cfg.data.record_sample_ids)

    def model_card(self) -> dict[str, Any]:
        """Saved beside the weights (model/config.json, checkpoints): what evaluate and predict need."""
        m = self.manifest
        return {"image_shape": m.image_shape, "features": m.features, "dtype": m.dtype, "ragged": self.plan.ragged,
                "input_scale": self.inputs.card(), "num_classes": m.num_classes, "class_names": m.class_names,
                "dataset": m.dataset, "dataset_fingerprint": m.fingerprint,
                "mixed_precision": self.accelerator.mixed_precision}

    def _restore(self, resume: str | None) -> tuple[Path, TrainState] | None:
        removed = self.checkpointer.clean_partial()
        if removed:
            self.log(f"removed {len(removed)} incomplete checkpoint(s): {', '.join(p.name for p in removed)}")
        path = self.checkpointer.resolve(resume)
        if path is None:
            return None
        state, written_by = self.checkpointer.restore(path, self.parts.model, self.parts.optimizer, self.parts.scheduler,
                                                      ema=self.ema)
        self.log(f"resumed from {path} at step {state.step} (epoch {state.epoch}, step {state.step_in_epoch} of it)")
        if written_by != self.world:
            self.log(f"world size {written_by} -> {self.world}: the same global batch of {self.layout.global_batch}, now "
                     f"{self.world} x {self.layout.accumulation} x {self.layout.micro_batch}")
            self.world_change = (written_by, self.world)
        return path, state

    def evaluator_for(self, split: str) -> Evaluator:
        x, lengths, y = load_split_tensors(self.manifest, self.source, split)
        return Evaluator(x, lengths if self.plan.ragged else None, y, self.cfg.eval.batch_size,
                         self.manifest.num_classes, self.device, self.accelerator.autocast, self.inputs)

    @property
    def shipped(self) -> torch.nn.Module:
        """The weights model/ will hold: their average when train.ema is set."""
        return self.ema.model if self.ema else self.unwrapped
