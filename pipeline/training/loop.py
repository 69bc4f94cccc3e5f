"""The training loop: one code path for one CPU, several processes, GPUs and nodes."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from pipeline.config import Config, save_config
from pipeline.data.manifest import load_manifest
from pipeline.data.stream import (
    ShardSource,
    StreamPlan,
    TrainStream,
    load_split_tensors,
    make_train_loader,
    verify_shards,
)
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.model import build_model, save_trained, to_inputs
from pipeline.tracking import Tracker
from pipeline.training import checkpoint as ckpt
from pipeline.training.elastic import init_restartable_process_group
from pipeline.training.evaluation import EvalResult, evaluate
from pipeline.training.optimizer import build_optimizer, build_scheduler
from pipeline.training.outputs import (
    MetricsLog,
    check_output_dir,
    write_json_atomic,
    write_plots,
)
from pipeline.training.preemption import Preempted, StopSignal


class Diverged(UserError):
    exit_code = 3


def build_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is visible (on the CPU accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    init_restartable_process_group(timeout)
    # cpu=True without CUDA: otherwise `accelerate launch --multi_gpu` on a CPU machine starts N
    # independent world-size-1 runs, each training alone on all the data.
    return Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )


def plan_steps(cfg: Config, plan: StreamPlan, manifest) -> tuple[int, list[int]]:
    """Total optimizer steps and steps per epoch (equal on every rank, from the manifest)."""
    if cfg.train.max_steps is not None:
        first = plan.steps_in_epoch(manifest, "train", 0)
        epochs = math.ceil(cfg.train.max_steps / first) + 1
        return cfg.train.max_steps, [plan.steps_in_epoch(manifest, "train", e) for e in range(epochs)]
    per_epoch = [plan.steps_in_epoch(manifest, "train", e) for e in range(cfg.train.epochs)]
    return sum(per_epoch), per_epoch


def required_free_bytes(model: torch.nn.Module, keep_last: int) -> int:
    """Room for keep_last + 1 checkpoints (weights + Adam's two moments, fp32) and the final model, doubled."""
    params = sum(p.numel() for p in model.parameters()) * 4
    return 2 * (keep_last + 1) * 4 * params + 8 * 2**20


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train to the end (or to train.stop_at_step, or a SIGTERM); returns the summary on the main process."""
    stop = StopSignal()
    try:
        trainer = Trainer(cfg, resume)
    except BaseException:
        stop.restore()
        raise
    exit_code, preempted = 1, False
    try:
        summary = trainer.run(stop)
        exit_code = 0
        return summary
    except Preempted as err:
        exit_code, preempted = err.exit_code, True
        raise
    finally:
        stop.restore()
        trainer.tracker.finish(exit_code, preempted=preempted)


class Trainer:
    """Set-up in __init__ (data plan, model, optimizer, resume, tracker); the loop in run()."""

    def __init__(self, cfg: Config, resume: str | None):
        self.cfg = cfg
        self.accelerator = accelerator = build_accelerator(cfg)
        self.out = Path(cfg.output_dir)
        self.main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.device = accelerator.device

        self.manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
        self.source = ShardSource(cfg.data.dir, cfg.data.base_url)
        verify_shards(self.manifest, self.source, "train", cfg.data.verify)
        self.plan = StreamPlan(cfg.train.batch_size, self.world, cfg.data.num_workers, cfg.train.seed)
        self.plan.check(self.manifest, "train")
        self.total_steps, self.steps_per_epoch = plan_steps(cfg, self.plan, self.manifest)
        if cfg.train.max_steps is None and cfg.eval.every_steps > self.total_steps:
            raise ConfigError(f"eval.every_steps ({cfg.eval.every_steps}) is larger than the run ({self.total_steps} steps)")
        dropped = self.manifest.split("train").num_samples - self.steps_per_epoch[0] * cfg.train.batch_size * self.world
        self.log(f"world size {self.world} ({accelerator.distributed_type.value}, device {self.device}, "
                 f"mixed precision {accelerator.mixed_precision}); {self.steps_per_epoch[0]} steps per epoch of "
                 f"{cfg.train.batch_size} x {self.world} samples, {dropped} samples per epoch dropped to keep ranks equal; "
                 f"{self.total_steps} steps")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.manifest.image_shape, self.manifest.num_classes)
        if self.main:
            check_output_dir(self.out, min_free=required_free_bytes(model, cfg.checkpoint.keep_last))
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.schedule, self.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model_desc = cfg.model.model_dump()

        if self.main:
            removed = ckpt.remove_partial(self.out)
            if removed:
                self.log(f"removed {len(removed)} incomplete checkpoint(s): {', '.join(p.name for p in removed)}")
        accelerator.wait_for_everyone()
        self.state = ckpt.TrainState()
        resume_path = ckpt.resolve_resume(self.out, resume)
        self.resumed = resume_path is not None
        if resume_path is not None:
            meta = ckpt.read_meta(resume_path)
            ckpt.check_compatible(meta, resume_path, self.manifest.fingerprint, self.model_desc, self.world)
            ckpt.load_checkpoint(accelerator, resume_path, self.model, self.optimizer, self.scheduler)
            self.state = meta.state
            self.log(f"resumed from {resume_path} at step {self.state.step} "
                     f"(epoch {self.state.epoch}, batch {self.state.step_in_epoch})")
        else:
            # Per-rank dropout streams; the initial weights above are the same on every rank.
            torch.manual_seed(cfg.train.seed + 1 + accelerator.process_index)
        if self.main:
            save_config(cfg, self.out / "config.yaml")

        self.run_info = {
            "world_size": self.world,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
            "dataset_fingerprint": self.manifest.fingerprint,
        }
        self.tracker = Tracker.create(cfg, self.out, self.main, {**cfg.to_dict(), **self.run_info}, self.state.wandb_run_id)

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(f"[train] {message}")

    # -- data -------------------------------------------------------------------------------

    def _epoch_batches(self, stream: TrainStream, loader, epoch: int) -> Iterator[tuple]:
        """The epoch's batches; with data.on_error=skip, restarts the epoch's stream to pad a
        rank that lost data, so every rank still takes the same number of steps."""
        stream.set_epoch(epoch)
        rank = self.accelerator.process_index
        while True:
            produced = 0
            for item in loader:
                if isinstance(item, str):  # a worker hit bad data in raise mode: its message
                    raise DataError(item)
                if isinstance(item, int):  # skip mode: samples lost to an unreadable shard
                    self.skipped_samples += item
                    continue
                produced += 1
                yield item
            if self.cfg.data.on_error == "raise":
                raise DataError(f"rank {rank} ran out of training data after {produced} batches of epoch {epoch}: the shards "
                                f"hold fewer samples than the manifest says; run prepare_data.py --verify {self.cfg.data.dir}")
            if produced == 0:
                raise DataError(f"rank {rank} has no readable training data left in epoch {epoch} (data.on_error=skip)")
            self.padded_passes += 1

    # -- one optimizer step -----------------------------------------------------------------

    def _step(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
        inputs, targets = to_inputs(x, self.device), y.to(self.device, non_blocking=True)
        with self.accelerator.autocast():
            logits = self.model(inputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.train.label_smoothing)
        self.accelerator.backward(loss)
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
        # The norm is the same on every rank after the gradient all-reduce: all ranks stop together.
        if not math.isfinite(norm):
            if self.accelerator.scaler is None:
                last_good = ckpt.list_checkpoints(self.out)
                raise Diverged(
                    f"non-finite loss or gradient norm at step {self.state.step + 1} (loss {loss.item():.4g}, lr "
                    f"{self.scheduler.get_last_lr()[0]:.3g}); training stopped before the update. The last good checkpoint "
                    f"is {last_good[-1] if last_good else 'none (no checkpoint was written yet)'}. "
                    "Lower optim.lr or set train.grad_clip"
                )
            self.state.skipped_steps += 1  # fp16: the scaler skips this step and lowers its scale
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), norm

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> dict[str, Any]:
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.metrics = MetricsLog(self.out / "metrics.jsonl", state.step if self.resumed else None) if self.main else None
        self.test_x = self.test_y = None
        if self.main:
            self.test_x, self.test_y = load_split_tensors(self.manifest, self.source, "test")
        stream = TrainStream(self.manifest, self.source, "train", self.plan, accelerator.process_index,
                             cfg.data.shuffle_buffer, on_error=cfg.data.on_error, hflip=cfg.data.hflip,
                             shift=cfg.data.shift)
        loader = make_train_loader(stream, pin_memory=self.device.type == "cuda")
        # A private generator: the loader's base seed must not consume the global RNG, or a
        # resumed run's dropout masks would differ from an uninterrupted run's.
        loader.generator = torch.Generator().manual_seed(cfg.train.seed)

        self.eval_times: list[float] = []
        self.last_eval: EvalResult | None = None
        self.padded_passes = 0
        self.skipped_samples = 0
        sample_ids: list | None = [] if cfg.data.record_sample_ids else None
        clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf
        bar = tqdm(total=self.total_steps, initial=state.step, dynamic_ncols=True, desc="train",
                   disable=not self.main or not cfg.train.progress_bar or None)
        window_loss, window_steps = torch.zeros((), device=self.device), 0
        self.run_start = window_start = time.perf_counter()
        train_seconds, trained_samples = 0.0, 0  # this process's share, for throughput after a resume
        stopped_by: str | None = None
        self.model.train()

        while state.step < self.total_steps and stopped_by is None:
            epoch_steps = self.steps_per_epoch[state.epoch]
            batches = self._epoch_batches(stream, loader, state.epoch)
            for _ in range(state.step_in_epoch):  # exact resume: replay the epoch's data position
                next(batches)
            for _ in range(min(epoch_steps - state.step_in_epoch, self.total_steps - state.step)):
                x, y, idx = next(batches)
                if sample_ids is not None:
                    sample_ids.append(idx.numpy())
                loss, norm = self._step(x, y, clip)
                state.step += 1
                state.step_in_epoch += 1
                state.samples_seen += len(y) * self.world
                window_loss += loss
                window_steps += 1
                bar.update(1)

                if state.step % cfg.train.log_every_steps == 0 or state.step == self.total_steps:
                    mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
                    elapsed = time.perf_counter() - window_start
                    samples = window_steps * cfg.train.batch_size * self.world
                    train_seconds += elapsed
                    trained_samples += samples
                    event = {
                        "step": state.step,
                        "train/loss": mean_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": norm,
                        "train/samples_per_s": samples / elapsed,
                        "train/epoch": state.epoch + state.step_in_epoch / epoch_steps,
                        "train/skipped_steps": state.skipped_steps,
                    }
                    self._write_event(event)
                    self.tracker.log_train(state.step, event)
                    bar.set_postfix_str(f"loss {mean_loss:.4f}" + (f" eval acc {self.last_eval.accuracy:.4f}" if self.last_eval else ""))
                    window_loss.zero_()
                    window_steps = 0
                    window_start = time.perf_counter()

                pause = time.perf_counter()  # eval and checkpoints stay out of samples/s
                improved = False
                if self.main and (state.step % cfg.eval.every_steps == 0 or state.step == self.total_steps):
                    improved = self._evaluate(bar)
                if state.step_in_epoch == epoch_steps:  # a checkpoint below then resumes at the next epoch
                    state.epoch += 1
                    state.step_in_epoch = 0
                if state.step == cfg.train.stop_at_step:
                    stopped_by = "train.stop_at_step"
                elif stop.agreed(accelerator):
                    stopped_by = "SIGTERM"
                if state.step % cfg.checkpoint.every_steps == 0 or state.step == self.total_steps or stopped_by:
                    self._checkpoint(improved)
                window_start += time.perf_counter() - pause
                if stopped_by:
                    break
        bar.close()
        if sample_ids is not None:
            (self.out / "sample_ids").mkdir(parents=True, exist_ok=True)
            np.save(self.out / "sample_ids" / f"rank-{accelerator.process_index:05d}.npy", np.stack(sample_ids))
        counts = torch.tensor([float(self.skipped_samples), float(self.padded_passes)], device=self.device)
        skipped_total, padded_total = (int(v) for v in accelerator.reduce(counts, reduction="sum").tolist())
        if stopped_by == "SIGTERM":
            raise Preempted(
                f"SIGTERM received: every rank stopped after step {state.step} of {self.total_steps} and its checkpoint "
                f"is in {ckpt.checkpoint_root(self.out)}; continue with --resume auto"
            )
        summary = self._finish(stopped_by, train_seconds, trained_samples, skipped_total, padded_total)
        accelerator.wait_for_everyone()
        return summary

    def _write_event(self, event: dict[str, Any]) -> None:
        if self.main:  # time_s: wall seconds since this process started training (time-to-accuracy)
            self.metrics.write({**event, "time_s": round(time.perf_counter() - self.run_start, 3)})

    def _evaluate(self, bar) -> bool:
        """Rank 0 only, on the unwrapped model: no collective, the other ranks wait at the next all-reduce."""
        state = self.state
        result = evaluate(self.accelerator.unwrap_model(self.model), self.test_x, self.test_y, self.cfg.eval.batch_size,
                          self.device, self.accelerator.autocast, self.manifest.num_classes)
        self.eval_times.append(result.seconds)
        improved = state.best_accuracy is None or result.accuracy > state.best_accuracy
        if improved:
            state.best_accuracy = result.accuracy
        self.last_eval = result
        metrics = result.metrics()
        self._write_event({"step": state.step, **metrics, "eval/best_accuracy": state.best_accuracy})
        self.tracker.log_eval(state.step, metrics, result.confusion, self.manifest.class_names,
                              result.examples, final=state.step == self.total_steps)
        bar.set_postfix_str(f"eval acc {result.accuracy:.4f}")
        return improved

    def _checkpoint(self, improved: bool) -> None:
        state = self.state
        state.wandb_run_id = self.tracker.run_id
        meta = ckpt.CheckpointMeta(state=state, fingerprint=self.manifest.fingerprint, model=self.model_desc,
                                   world_size=self.world, config=self.cfg.to_dict())
        path = ckpt.save_checkpoint(self.accelerator, self.out, self.model, self.optimizer, self.scheduler, meta,
                                    self.cfg.checkpoint.keep_last)
        self.tracker.log_checkpoint(path, state.step, self.last_eval.accuracy if self.last_eval else None, improved)

    def _finish(self, stopped_by: str | None, train_seconds: float, trained_samples: int,
                skipped_samples: int, padded_passes: int) -> dict[str, Any]:
        if not self.main:
            return {}
        state, last = self.state, self.last_eval
        completed = state.step == self.total_steps
        wall = time.perf_counter() - self.run_start
        if skipped_samples:
            self.log(f"data.on_error=skip: {skipped_samples} unreadable samples skipped; "
                     f"{padded_passes} epoch pass(es) restarted to keep ranks equal")
        save_trained(self.accelerator.unwrap_model(self.model), self.out / "model", {
            "image_shape": self.manifest.image_shape, "num_classes": self.manifest.num_classes,
            "class_names": self.manifest.class_names, "dataset": self.manifest.dataset,
            "dataset_fingerprint": self.manifest.fingerprint,
        })
        summary = {
            **self.run_info,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "wall_s": wall,
            "train_samples_per_s": (trained_samples / train_seconds) if train_seconds else None,
            "final_eval_accuracy": last.accuracy if last else None,
            "final_eval_loss": last.loss if last else None,
            "best_eval_accuracy": state.best_accuracy,
            "eval_seconds_mean": sum(self.eval_times) / len(self.eval_times) if self.eval_times else None,
            "evals": len(self.eval_times),
            "skipped_steps": state.skipped_steps,
            "skipped_samples": skipped_samples,
            "resumed": self.resumed,
            "completed": completed,
            "train_state": asdict(state),
        }
        write_json_atomic(self.out / "summary.json", summary)
        write_plots(self.out / "plots", self.metrics.read(), last.confusion if last else None, self.manifest.class_names)
        accuracy = f"final test accuracy {last.accuracy:.4f}, best {state.best_accuracy:.4f}" if last else "no evaluation yet"
        if completed:
            self.log(f"done: {state.step} steps, {accuracy}, {wall:.1f} s; outputs in {self.out}")
        else:
            self.log(f"stopped at step {state.step} of {self.total_steps} ({stopped_by}), {accuracy}; "
                     "continue with --resume auto")
        return summary
