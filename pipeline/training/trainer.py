"""A run's set-up, once: the data plan, the model and optimizer, the resume, and the run's outputs.

`build_run` returns a Run (parts.py) that the loop (loop.py) and the end of the run (finish.py) take
whole. The pieces do the work: `train_step` (step.py) computes one update, a BatchProvider
(data/provider.py) delivers this rank's data, `Evaluator` (evaluation.py) scores a split on rank 0,
`Checkpointer` (checkpoint.py) owns the checkpoints, and `MetricsSink` (metrics.py) writes every
event to metrics.jsonl, W&B and the progress bar at once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.config import MAX_FRAME, Config, save_config
from pipeline.data.augment import Augment
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import LengthStats, Manifest, check_dataset, load_manifest
from pipeline.data.order import BatchLayout, fit_to_split
from pipeline.data.provider import BatchProvider
from pipeline.data.resident import ResidentBatches, choose_placement
from pipeline.data.sequence_augment import SequenceAugment
from pipeline.data.store import ShardStore
from pipeline.data.stream import TrainStream
from pipeline.data.verify import verify_shards
from pipeline.distributed.agreement import any_rank, fail_together, on_main
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.distributed.preemption import StopSignal
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.files import mask_url
from pipeline.inputs import InputScale
from pipeline.model import build_model
from pipeline.model_card import ModelCard
from pipeline.tracking import Tracker
from pipeline.training.batches import StreamBatches
from pipeline.training.checkpoint import Checkpointer, TrainState
from pipeline.training.ema import WeightAverage
from pipeline.training.evaluation import eval_split
from pipeline.training.exact_reduction import ExactReduction
from pipeline.training.finish import end_run
from pipeline.training.loop import TrainingLoop
from pipeline.training.metrics import MetricsSink, StepWindow
from pipeline.training.optimizer import build_optimizer, build_scheduler
from pipeline.training.outputs import MetricsLog, check_output_dir
from pipeline.training.parts import DataPlan, Run, make_evaluator, say
from pipeline.training.rundir import RESOLVED, AlreadyComplete, complete_message
from pipeline.training.step import StepParts


def total_steps(cfg: Config, plan: EpochPlan) -> int:
    """Optimizer steps of the run; every epoch has plan.steps global batches, at any world size."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(plan.steps * cfg.train.epochs, cfg.train.min_steps or 0)


def check_eval_every(cfg: Config, steps: int) -> None:
    """A run of epochs learns its length here; one of max_steps was checked when the config loaded."""
    problem = cfg.eval.never_within(steps, f"the run ({steps} steps)") if cfg.train.max_steps is None else None
    if problem:
        raise ConfigError(problem)


def save_resolved(resolved: dict[str, Any], path: Path) -> None:
    """Beside config.yaml (what the user wrote): the values the data decided, under the keys they answer."""
    header = "# Settings this run resolved from its data; config.yaml beside it is the config as given.\n"
    path.write_text(header + yaml.safe_dump(resolved, sort_keys=False))


def auto_frame(median_length: float, target_steps: int = 64) -> int:
    """model.frame auto: steps per frame so that the median sequence takes about `target_steps` recurrent steps."""
    return max(1, math.ceil(median_length / target_steps))


def resolved_frame(frame: int | str, lengths: LengthStats) -> int:
    """model.frame as a number of steps, from the train split's lengths for auto and whole."""
    if frame == "auto":
        return auto_frame(lengths.median)
    if frame == "whole":
        return min(int(lengths.max), MAX_FRAME)
    return frame


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


def build_run(cfg: Config, env: LaunchEnv, accelerator: Accelerator, resume: str | None = None,
              claim: Callable[[DataPlan], dict[str, Any] | None] | None = None) -> Run:
    """`env` is the launch as the entry point read it (pipeline/distributed/launch_env.py): nothing here reads
    the environment for it. `claim` (collective) runs once the run's length is known and before anything is
    written to output_dir: it refuses the directory or takes it, and returns the summary of the finished run
    that this start resumes, if it is one (pipeline/training/run.py). `cfg` is never written to."""
    data = plan_data(cfg, accelerator)
    finished_run = claim(data) if claim is not None else None
    parts = _build_parts(cfg, accelerator, data)
    card = model_card(data, accelerator)
    checkpointer = Checkpointer(
        accelerator, cfg.output_dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep_last,
        fingerprint=data.manifest.fingerprint, model_desc=data.model.model_dump(mode="json"), config=cfg.to_dict(),
        model_card=card.to_dict(), order={"global_batch_size": data.layout.global_batch, "seed": cfg.train.seed,
                                "shuffle_buffer": cfg.data.shuffle_buffer, "canonical_streams": cfg.data.canonical_streams},
        fault=env.fault, keep_best=cfg.eval.keep_best)
    unwrapped = accelerator.unwrap_model(parts.model)
    # The average of the weights, on the main process (it alone evaluates and saves it).
    ema = WeightAverage(unwrapped, cfg.train.ema.decay, cfg.train.ema.start_step) \
        if cfg.train.ema and accelerator.is_main_process else None
    resumed = _restore(checkpointer, resume, parts, ema, data.layout, accelerator)
    state = resumed[1] if resumed else TrainState()
    _stop_if_complete(cfg, finished_run, state if resumed else None, data.total_steps)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        save_resolved(data.resolved(), Path(cfg.output_dir) / RESOLVED)
    batches = _build_batches(cfg, data, accelerator)
    return _with_outputs(cfg, accelerator, data, parts, unwrapped, ema, checkpointer, state, resumed, batches, card)


def plan_data(cfg: Config, accelerator: Accelerator) -> DataPlan:
    """The manifest read and checked, the placement, the batch layout and epoch plan, the resolved model and
    the run's length: every rank alike, before any model exists."""
    store = ShardStore(cfg.data.dir, cfg.data.base_url, cfg.data.retry_s)
    manifest = _read_manifest(cfg, store, accelerator)
    placement = _choose_placement(cfg, manifest, accelerator)
    layout = _fit_layout(BatchLayout.make(cfg.train.global_batch_size, cfg.train.batch_size, accelerator.num_processes),
                         manifest, accelerator)
    plan = EpochPlan.make(manifest, "train", layout, cfg.train.seed, cfg.data.shuffle_buffer,
                          cfg.data.length_buckets, cfg.data.canonical_streams)
    _check_augmentation(cfg, manifest)
    _check_eval_split(cfg, manifest)
    # model.frame auto or whole is fixed here from the data, so the model's description holds a number; the user's
    # config keeps "auto" (config.yaml), the number is in resolved.yaml and the model card.
    frame = resolved_frame(cfg.model.frame, manifest.split("train").lengths)
    data = DataPlan(store, manifest, placement, layout, plan, InputScale.for_data(manifest),
                    cfg.model.model_copy(update={"frame": frame}), total_steps(cfg, plan))
    check_eval_every(cfg, data.total_steps)
    _log_plan(cfg, accelerator, data)
    return data


def _check_augmentation(cfg: Config, manifest: Manifest) -> None:
    if (cfg.data.hflip or cfg.data.shift or cfg.data.erase) and manifest.image_shape is None:
        raise ConfigError(f"data.hflip, data.shift and data.erase augment images, but {cfg.data.dir} holds sequences "
                          f"({manifest.dataset}); set them to false / 0 for this data set")
    if (cfg.data.time_mask or cfg.data.jitter or cfg.data.scale) and manifest.image_shape is not None:
        raise ConfigError(f"data.time_mask, data.jitter and data.scale augment standardised sequences, but {cfg.data.dir} "
                          f"holds images ({manifest.dataset}, scaled by / 255); use data.hflip, shift or erase")


def _check_eval_split(cfg: Config, manifest: Manifest) -> None:
    """What needs a validation split, on the split training will really evaluate on: without val it falls back
    to test."""
    if eval_split(cfg.eval.split, list(manifest.splits), manifest.splitting)[0] != "test":
        return
    if cfg.eval.keep_best:
        raise ConfigError(f"eval.keep_best chooses the weights on the evaluation split, and {cfg.data.dir} has no "
                          f"{cfg.eval.split} split, so training would evaluate on test: the test score would be of "
                          "weights chosen on test. Prepare the data set again with a validation split "
                          "(prepare_data.py --force --val-size), or remove eval.keep_best")
    if not cfg.eval.score_test:
        raise ConfigError(f"eval.score_test is false, so the test split is not to be read, and {cfg.data.dir} has no "
                          f"{cfg.eval.split} split: training would evaluate on test. Prepare the data set again with a "
                          "validation split (prepare_data.py --force --val-size)")


def _fit_layout(layout: BatchLayout, manifest: Manifest, accelerator: Accelerator) -> BatchLayout:
    train = manifest.split("train").num_samples
    fitted = fit_to_split(layout, train)
    if fitted != layout:
        say(accelerator, f"the train split holds {train} samples, fewer than the global batch of {layout.global_batch}: "
                         f"global batch {fitted.global_batch}, micro-batch {fitted.micro_batch} instead")
    return fitted


def _read_manifest(cfg: Config, store: ShardStore, accelerator: Accelerator) -> Manifest:
    """Every rank reads the manifest and checks the shards it reads from disk (each node may hold its own
    copy): one message, however many failed. Shards on a server are the same for every rank: the main
    process alone asks the server, and every rank learns the answer."""
    manifest, failure = None, None
    try:
        manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
        check_dataset(manifest, cfg.data.dir, cfg.data.dataset)
        if not store.base_url:
            verify_shards(manifest, store, "train", cfg.data.verify)
    except UserError as err:
        failure = err
    fail_together(accelerator, failure)
    if store.base_url:
        on_main(accelerator, lambda: verify_shards(manifest, store, "train", cfg.data.verify),
                lambda err: DataError(f"checking the shards at data.base_url failed ({mask_url(str(err))})"))
    return manifest


def _stop_if_complete(cfg: Config, finished_run: dict[str, Any] | None, resumed: TrainState | None, steps: int) -> None:
    """A finished run resumed at its end (the checkpoint has been checked against this config): nothing
    to train. Stop before config.yaml, metrics.jsonl or the W&B run are touched, every rank alike. A run that
    eval.patience ended is at its end while this config's patience has run out too; with more patience (or
    none) it trains on, as a run given that patience from the start would have."""
    reached = resumed.step if resumed is not None else (finished_run or {}).get("steps")
    patience = cfg.eval.patience
    ended_early = resumed is not None and resumed.stopped_early and patience is not None \
        and resumed.evals_since_best >= patience
    if finished_run is not None and (reached == steps or ended_early):
        raise AlreadyComplete(complete_message(Path(cfg.output_dir), finished_run, early=ended_early), finished_run)
    if resumed is not None:
        resumed.stopped_early = False


def _with_outputs(cfg: Config, accelerator: Accelerator, data: DataPlan, parts: StepParts, unwrapped: torch.nn.Module,
                  ema: WeightAverage | None, checkpointer: Checkpointer, state: TrainState,
                  resumed: tuple[Path, TrainState, tuple[int, int] | None] | None, batches: BatchProvider,
                  card: ModelCard) -> Run:
    """Evaluation, metrics, W&B and the progress bar, then the Run."""
    main, out = accelerator.is_main_process, Path(cfg.output_dir)
    split, warning = eval_split(cfg.eval.split, list(data.manifest.splits), data.manifest.splitting)
    if warning and main:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    evaluator = make_evaluator(cfg, accelerator, data, split) if main and split != "none" else None
    info = {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "gpu_rehearsal": _rehearsal(cfg, accelerator),
        "data_placement": data.placement,
        "dataset_fingerprint": data.manifest.fingerprint,
        "eval_split": split,
        "weights": "ema" if cfg.train.ema else "raw",
    }
    metrics_log = MetricsLog(out / "metrics.jsonl", state.step if resumed else None) if main else None
    window = StepWindow(accelerator.device, data.layout.global_batch)
    # W&B's config is the run as it trained: the model with model.frame resolved.
    tracked = {**cfg.to_dict(), "model": data.model.model_dump(mode="json"), **info}
    # Last: nothing after it may fail, or the W&B run would be left unfinished.
    tracker = Tracker.create(cfg.wandb, out, main, tracked, state.wandb_run_id)
    bar = tqdm(total=data.total_steps, initial=state.step, dynamic_ncols=True, desc="train",
               disable=not main or not cfg.train.progress_bar or None)
    sink = MetricsSink(metrics_log, tracker, bar, data.manifest.class_names)
    return Run(cfg, accelerator, data, parts, unwrapped, ema, checkpointer, state, resumed[0] if resumed else None,
               resumed[2] if resumed else None, batches, split, evaluator, card, info, window, tracker, bar, sink)


def train_run(run: Run, stop: StopSignal) -> dict[str, Any]:
    """Train to the end, train.stop_at_step or an agreed SIGTERM; the summary on the main process."""
    stopped_by = TrainingLoop(run).run(stop)
    return end_run(run, stopped_by)


def _rehearsal(cfg: Config, accelerator: Accelerator) -> bool:
    return cfg.train.gpu_rehearsal and accelerator.device.type == "cuda"


def _log_plan(cfg: Config, accelerator: Accelerator, data: DataPlan) -> None:
    layout, world = data.layout, accelerator.num_processes
    dropped = data.manifest.split("train").num_samples - data.plan.steps * layout.global_batch
    implicit = "" if cfg.train.global_batch_size else " (train.global_batch_size unset: batch_size x processes)"
    say(accelerator, f"world size {world} ({accelerator.distributed_type.value}, device {accelerator.device}, "
                     f"mixed precision {accelerator.mixed_precision}); global batch {layout.global_batch}{implicit} = "
                     f"{world} process(es) x {layout.accumulation} accumulation step(s) x {layout.micro_batch}; "
                     f"{data.plan.steps} steps per epoch, the last {dropped} samples of each epoch's order dropped; "
                     f"{data.total_steps} steps")
    longer = splits_longer_than_the_frame(cfg, data)
    if longer:
        say(accelerator, f"model.frame whole is {data.model.frame} steps, the train split's longest (at most {MAX_FRAME}); "
                         f"{longer}: the recurrent layers read those in more than one step")
    if _rehearsal(cfg, accelerator):
        say(accelerator, f"GPU rehearsal: {world} ranks share {torch.cuda.device_count()} GPU(s) over gloo; this checks "
                         "the multi-rank path (evaluation, checkpoints, resume), its speed means nothing")


def splits_longer_than_the_frame(cfg: Config, data: DataPlan) -> str:
    """With model.frame whole, the splits whose longest sequence does not fit one frame, said; else ''."""
    if cfg.model.frame != "whole":
        return ""
    longest = {name: entry.lengths.max for name, entry in data.manifest.splits.items()}
    return ", ".join(f"the {name} split's longest is {n} steps" for name, n in longest.items() if n > data.model.frame)


def _build_parts(cfg: Config, accelerator: Accelerator, data: DataPlan) -> StepParts:
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(data.model, data.manifest.features, data.manifest.num_classes)
    # The main process alone writes there; every rank learns if it cannot, and ends with its reason.
    on_main(accelerator, lambda: check_output_dir(out, required_free_bytes(model, cfg.checkpoint.keep_last)),
            lambda err: UserError(f"output_dir {out} cannot be checked ({err})"))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, data.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is never prepared: optimizer.py
    augment = SequenceAugment(cfg.train.seed, cfg.data.time_mask, cfg.data.jitter, cfg.data.scale)
    weights = None if cfg.train.class_weights == "none" else \
        balanced_weights(data.manifest.split("train").class_counts).to(accelerator.device)
    return StepParts(accelerator, model, optimizer, scheduler, cfg.train.grad_clip, cfg.train.label_smoothing,
                     data.inputs, weights, augment if augment.active else None,
                     ExactReduction(data.layout) if cfg.train.exact_reduction else None)


def _choose_placement(cfg: Config, manifest: Manifest, accelerator: Accelerator) -> str:
    """Where the train split lives; the same on every rank, since steps per epoch depend on it."""
    placement, why = choose_placement(cfg.data.placement, cfg.data.on_error, manifest, accelerator.device)
    if any_rank(accelerator, placement == "stream") and placement != "stream":
        placement, why = "stream", "auto: another rank's device has too little free memory"
    say(accelerator, f"data placement {placement} ({why})")
    return placement


def _build_batches(cfg: Config, data: DataPlan, accelerator: Accelerator) -> BatchProvider:
    rank, device = accelerator.process_index, accelerator.device
    augment = Augment(cfg.train.seed, hflip=cfg.data.hflip, shift=cfg.data.shift, erase=cfg.data.erase,
                      erase_area=cfg.data.erase_area)
    if data.placement == "device":
        return ResidentBatches(data.manifest, data.store, "train", data.plan, rank, device, augment,
                               record_sample_ids=cfg.data.record_sample_ids)
    stream = TrainStream(data.manifest, data.store, "train", data.plan, rank, augment, workers=cfg.data.num_workers,
                         on_error=cfg.data.on_error)
    return StreamBatches(stream, seed=cfg.train.seed, data_dir=cfg.data.dir, pin_memory=device.type == "cuda",
                         record_sample_ids=cfg.data.record_sample_ids)


def model_card(data: DataPlan, accelerator: Accelerator) -> ModelCard:
    """Saved beside the weights (model/config.json, checkpoints): what evaluate and predict need."""
    m = data.manifest
    return ModelCard(model=data.model, features=m.features, num_classes=m.num_classes, class_names=m.class_names,
                     image_shape=m.image_shape, dtype=m.dtype, ragged=data.plan.ragged, input_scale=data.inputs.card(),
                     dataset=m.dataset, dataset_fingerprint=m.fingerprint, mixed_precision=accelerator.mixed_precision)


def _restore(checkpointer: Checkpointer, resume: str | None, parts: StepParts, ema: WeightAverage | None,
             layout: BatchLayout, accelerator: Accelerator) -> tuple[Path, TrainState, tuple[int, int] | None] | None:
    """(checkpoint, its state, (world size that wrote it, this one) where they differ), or None: a fresh start."""
    removed = checkpointer.clean_partial()
    if removed:
        say(accelerator, f"removed {len(removed)} incomplete checkpoint(s): {', '.join(p.name for p in removed)}")
    path = checkpointer.resolve(resume)
    if path is None:
        return None
    state, written_by = checkpointer.restore(path, parts.model, parts.optimizer, parts.scheduler, ema=ema)
    say(accelerator, f"resumed from {path} at step {state.step} (epoch {state.epoch}, step {state.step_in_epoch} of it)")
    world = accelerator.num_processes
    if written_by == world:
        return path, state, None
    say(accelerator, f"world size {written_by} -> {world}: the same global batch of {layout.global_batch}, now "
                     f"{world} x {layout.accumulation} x {layout.micro_batch}")
    return path, state, (written_by, world)
