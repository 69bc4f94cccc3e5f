"""The training loop: one code path for one CPU, several processes, GPUs and nodes."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from pipeline.config import Config, save_config
from pipeline.data.manifest import load_manifest
from pipeline.data.stream import ShardSource, StreamPlan, TrainStream, load_split_tensors, make_train_loader, verify_shards
from pipeline.errors import ConfigError, UserError
from pipeline.model import build_model, save_trained, to_inputs
from pipeline.training import checkpoint as ckpt
from pipeline.training.evaluation import EvalResult, evaluate
from pipeline.training.optimizer import build_optimizer, build_scheduler
from pipeline.training.outputs import MetricsLog, write_json_atomic, write_plots
from pipeline.tracking import Tracker


class Diverged(UserError):
    exit_code = 3


def build_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is visible (on the CPU accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    # cpu=True without CUDA: otherwise `accelerate launch --multi_gpu` on a CPU machine starts N
    # independent world-size-1 runs, each training alone on all the data.
    return Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )


def plan_steps(cfg: Config, plan: StreamPlan, manifest) -> tuple[int, list[int]]:
    """Total optimizer steps and steps per epoch (equal on every rank, from the manifest)."""
    if cfg.train.max_steps is not None:
        per_epoch = [plan.steps_in_epoch(manifest, "train", 0)]
        epochs = math.ceil(cfg.train.max_steps / per_epoch[0]) + 1
        per_epoch = [plan.steps_in_epoch(manifest, "train", e) for e in range(epochs)]
        return cfg.train.max_steps, per_epoch
    per_epoch = [plan.steps_in_epoch(manifest, "train", e) for e in range(cfg.train.epochs)]
    return sum(per_epoch), per_epoch


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    accelerator = build_accelerator(cfg)
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    log = _printer(main)

    manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
    source = ShardSource(cfg.data.dir, cfg.data.base_url)
    verify_shards(manifest, source, "train", cfg.data.verify)
    plan = StreamPlan(cfg.train.batch_size, world, cfg.data.num_workers, cfg.train.seed)
    plan.check(manifest, "train")
    total_steps, steps_per_epoch = plan_steps(cfg, plan, manifest)
    if cfg.train.max_steps is None and cfg.eval.every_steps > total_steps:
        raise ConfigError(f"eval.every_steps ({cfg.eval.every_steps}) is larger than the run ({total_steps} steps)")
    dropped = manifest.split("train").num_samples - steps_per_epoch[0] * cfg.train.batch_size * world
    log(f"world size {world} ({accelerator.distributed_type.value}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}); {steps_per_epoch[0]} steps per epoch of "
        f"{cfg.train.batch_size} x {world} samples, {dropped} samples per epoch dropped to keep ranks equal; {total_steps} steps")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, manifest.image_shape, manifest.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_partial(out)
        if removed:
            log(f"removed {len(removed)} incomplete checkpoint(s): {', '.join(p.name for p in removed)}")
    accelerator.wait_for_everyone()
    state = ckpt.TrainState()
    resume_path = ckpt.resolve_resume(out, resume)
    model_desc = cfg.model.model_dump()
    if resume_path is not None:
        meta = ckpt.read_meta(resume_path)
        ckpt.check_compatible(meta, resume_path, manifest.fingerprint, model_desc)
        ckpt.load_checkpoint(accelerator, resume_path, model, optimizer, scheduler)
        state = meta.state
        log(f"resumed from {resume_path} at step {state.step} (epoch {state.epoch}, batch {state.step_in_epoch})")
    else:
        # Per-rank dropout streams; the initial weights above are the same on every rank.
        torch.manual_seed(cfg.train.seed + 1 + accelerator.process_index)
    if main:
        save_config(cfg, out / "config.yaml")

    run_info = {
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "dataset_fingerprint": manifest.fingerprint,
    }
    tracker = Tracker.create(cfg, out, main, {**cfg.to_dict(), **run_info}, state.wandb_run_id)
    exit_code = 1
    try:
        summary = _run(cfg, accelerator, model, optimizer, scheduler, manifest, source, plan, state,
                       total_steps, steps_per_epoch, tracker, out, resume_path is not None, log, run_info, model_desc)
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code)


def _printer(main: bool):
    def log(message: str) -> None:
        if main:
            tqdm.write(f"[train] {message}")
    return log


def _run(cfg, accelerator, model, optimizer, scheduler, manifest, source, plan, state, total_steps,
         steps_per_epoch, tracker, out: Path, resumed: bool, log, run_info, model_desc) -> dict[str, Any]:
    main = accelerator.is_main_process
    device = accelerator.device
    world = accelerator.num_processes
    metrics = MetricsLog(out / "metrics.jsonl", state.step if resumed else None) if main else None
    test_x = test_y = None
    if main:
        test_x, test_y = load_split_tensors(manifest, source, "test")
    stream = TrainStream(manifest, source, "train", plan, accelerator.process_index, cfg.data.shuffle_buffer)
    # A private generator: the loader's base seed must not consume the global RNG, or a
    # resumed run's dropout masks would differ from an uninterrupted run's.
    loader = make_train_loader(stream, pin_memory=device.type == "cuda")
    loader.generator = torch.Generator().manual_seed(cfg.train.seed)

    def write_event(event: dict[str, Any]) -> None:
        if main:
            metrics.write(event)

    def meta() -> ckpt.CheckpointMeta:
        return ckpt.CheckpointMeta(state=state, fingerprint=manifest.fingerprint, model=model_desc,
                                   world_size=world, config=cfg.to_dict())

    eval_times: list[float] = []
    last_eval: EvalResult | None = None
    clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf
    bar = tqdm(total=total_steps, initial=state.step, disable=not main or not cfg.train.progress_bar or None,
               dynamic_ncols=True, desc="train")
    window_loss = torch.zeros((), device=device)
    window_steps = 0
    window_start = time.perf_counter()
    train_seconds = 0.0
    trained_samples = 0  # by this process's run, for throughput (samples_seen includes pre-resume steps)
    run_start = time.perf_counter()
    sample_ids: list | None = [] if cfg.data.record_sample_ids else None
    model.train()

    def run_eval() -> None:
        nonlocal last_eval
        result = evaluate(accelerator.unwrap_model(model), test_x, test_y, cfg.eval.batch_size, device,
                          accelerator.autocast, manifest.num_classes)
        eval_times.append(result.seconds)
        improved = state.best_accuracy is None or result.accuracy > state.best_accuracy
        if improved:
            state.best_accuracy = result.accuracy
        last_eval = result
        write_event({"step": state.step, **result.metrics(), "eval/best_accuracy": state.best_accuracy})
        tracker.log_eval(state.step, result.metrics(), result.confusion, manifest.class_names, result.examples,
                         final=state.step == total_steps)
        bar.set_postfix_str(f"eval acc {result.accuracy:.4f}")
        return improved

    while state.step < total_steps:
        epoch_steps = steps_per_epoch[state.epoch]
        stream.set_epoch(state.epoch)
        batches = iter(loader)
        for _ in range(state.step_in_epoch):  # exact resume: replay the epoch's data position
            next(batches)
        for _ in range(min(epoch_steps - state.step_in_epoch, total_steps - state.step)):
            x, y, idx = next(batches)
            if sample_ids is not None:
                sample_ids.append(idx.numpy())
            inputs, targets = to_inputs(x, device), y.to(device, non_blocking=True)
            with accelerator.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            norm = float(grad_norm)  # identical on every rank after the all-reduce: all stop together
            if not math.isfinite(norm):
                if accelerator.scaler is None:
                    last_good = ckpt.list_checkpoints(out)
                    raise Diverged(
                        f"non-finite loss or gradient norm at step {state.step + 1} (loss {loss.item():.4g}, lr "
                        f"{scheduler.get_last_lr()[0]:.3g}); training stopped before the update. The last good checkpoint "
                        f"is {last_good[-1] if last_good else 'none (no checkpoint was written yet)'}. Lower optim.lr or set train.grad_clip"
                    )
                state.skipped_steps += 1  # fp16: the scaler skips this step and lowers its scale
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1
            state.samples_seen += len(y) * world
            window_loss += loss.detach()
            window_steps += 1
            bar.update(1)

            if state.step % cfg.train.log_every_steps == 0 or state.step == total_steps:
                mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                trained_samples += window_steps * cfg.train.batch_size * world
                event = {
                    "step": state.step,
                    "train/loss": mean_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": norm,
                    "train/samples_per_s": window_steps * cfg.train.batch_size * world / elapsed,
                    "train/epoch": state.epoch + state.step_in_epoch / epoch_steps,
                    "train/skipped_steps": state.skipped_steps,
                }
                write_event(event)
                tracker.log_train(state.step, event)
                bar.set_postfix_str(f"loss {mean_loss:.4f}" + (f" eval acc {last_eval.accuracy:.4f}" if last_eval else ""))
                window_loss.zero_()
                window_steps = 0
                window_start = time.perf_counter()

            improved = False
            eval_due = state.step % cfg.eval.every_steps == 0 or state.step == total_steps
            if eval_due and main:
                pause = time.perf_counter()
                improved = run_eval()
                window_start += time.perf_counter() - pause  # keep eval out of samples/s
            if state.step_in_epoch == epoch_steps:  # the checkpoint below then resumes at the next epoch
                state.epoch += 1
                state.step_in_epoch = 0
            stopping = state.step == cfg.train.stop_at_step
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == total_steps or stopping:
                state.wandb_run_id = tracker.run_id
                pause = time.perf_counter()
                path = ckpt.save_checkpoint(accelerator, out, model, optimizer, scheduler, meta(), cfg.checkpoint.keep_last)
                if main:
                    tracker.log_checkpoint(path, state.step, last_eval.accuracy if last_eval else None, improved)
                window_start += time.perf_counter() - pause
            if stopping:
                break
        if state.step == cfg.train.stop_at_step:
            break
    bar.close()
    completed = state.step == total_steps
    if sample_ids is not None:
        (out / "sample_ids").mkdir(parents=True, exist_ok=True)
        np.save(out / "sample_ids" / f"rank-{accelerator.process_index:05d}.npy", np.stack(sample_ids))

    wall = time.perf_counter() - run_start
    summary = {}
    if main:
        if not completed:
            log(f"stopped at step {state.step} of {total_steps} (train.stop_at_step); continue with --resume auto")
        unwrapped = accelerator.unwrap_model(model)
        save_trained(unwrapped, out / "model", {
            "image_shape": manifest.image_shape, "num_classes": manifest.num_classes,
            "class_names": manifest.class_names, "dataset": manifest.dataset, "dataset_fingerprint": manifest.fingerprint,
        })
        summary = {
            **run_info,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "wall_s": wall,
            "train_samples_per_s": (trained_samples / train_seconds) if train_seconds else None,
            "final_eval_accuracy": last_eval.accuracy if last_eval else None,
            "final_eval_loss": last_eval.loss if last_eval else None,
            "best_eval_accuracy": state.best_accuracy,
            "eval_seconds_mean": sum(eval_times) / len(eval_times) if eval_times else None,
            "evals": len(eval_times),
            "skipped_steps": state.skipped_steps,
            "resumed": resumed,
            "completed": completed,
            "train_state": asdict(state),
        }
        write_json_atomic(out / "summary.json", summary)
        write_plots(out / "plots", metrics.read(), last_eval.confusion if last_eval else None, manifest.class_names)
        log(f"{'done' if completed else 'stopped'}: {state.step} steps, final test accuracy {summary['final_eval_accuracy']:.4f}, "
            f"best {summary['best_eval_accuracy']:.4f}, {wall:.1f} s; outputs in {out}")
    accelerator.wait_for_everyone()
    return summary
