"""The training loop: one code path for one CPU, several processes, GPUs and nodes.

The loop only decides: when to log, evaluate, checkpoint and stop. The work is elsewhere:
`train_step` (step.py) computes one update, `TrainBatches` (batches.py) delivers this rank's
data, `Evaluator` (evaluation.py) scores the test split on rank 0, `Checkpointer`
(checkpoint.py) owns the checkpoints, and `MetricsSink` (metrics.py) writes every event to
metrics.jsonl, W&B and the progress bar at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from pipeline.config import Config, ModelConfig, save_config
from pipeline.data import order
from pipeline.data.augment import Augment
from pipeline.data.manifest import Manifest, check_dataset, load_manifest
from pipeline.data.order import BatchLayout
from pipeline.data.resident import ResidentBatches, choose_placement
from pipeline.data.stream import EpochPlan, ShardSource, TrainStream, load_split_tensors, verify_shards
from pipeline.errors import ConfigError, UserError
from pipeline.model import build_model, save_trained
from pipeline.tracking import Tracker
from pipeline.training.batches import StreamBatches
from pipeline.training.checkpoint import Checkpointer, TrainState
from pipeline.training.collectives import any_rank
from pipeline.training.elastic import init_restartable_process_group
from pipeline.training.ema import WeightAverage
from pipeline.training.evaluation import EvalResult, Evaluator, eval_split
from pipeline.training.lease import OutputDirBusy, OutputLease, job_identity
from pipeline.training.metrics import MetricsSink, StepWindow
from pipeline.training.optimizer import build_optimizer, build_scheduler
from pipeline.training.outputs import MetricsLog, check_output_dir, write_json_atomic, write_plots
from pipeline.training.peers import PeerWatch
from pipeline.training.preemption import Preempted, StopSignal
from pipeline.training.step import StepParts, StepResult, train_step


class Diverged(UserError):
    exit_code = 3


def check_gpu_count(processes_per_node: int, visible_gpus: int, rehearsal: bool) -> None:
    """NCCL refuses two ranks on one GPU, with a traceback from every rank; say so before it starts."""
    if processes_per_node <= visible_gpus or rehearsal:
        return
    raise ConfigError(
        f"{processes_per_node} processes per node were launched on CUDA, but this node has {visible_gpus} visible GPU(s), "
        "and NCCL cannot give two ranks one GPU. Launch with --num_processes equal to the GPUs per node "
        f"({visible_gpus} here; across nodes, --num_processes is the total), or set train.device=cpu to train on the CPU, "
        "or set train.gpu_rehearsal=true to rehearse the multi-rank path with ranks sharing the GPU over gloo "
        "(slow: a check before going to a cluster, not a way to train)"
    )


def check_cpu_bf16(cell: str) -> None:
    """bf16 autocast runs the CPU's recurrent layers through oneDNN, which has no bf16 kernel for
    them on CPUs without AVX-512 (seen on an AVX2-only AMD EPYC): every step would fail with
    'could not create a primitive descriptor'. A layer of four units says so before anything starts."""
    probe = build_model(ModelConfig(cell=cell, hidden_size=4), [4, 4], 2)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            probe(torch.zeros(1, 4, 4))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". Run workload")[0]
        raise ConfigError(
            f"train.mixed_precision is bf16, but this CPU has no bf16 kernel for the {cell.upper()} layers ({first}): "
            "oneDNN's need at least AVX-512. Train in fp32 here (train.mixed_precision=no), or in bf16 on a GPU or "
            "on a CPU with AVX-512"
        ) from None


def build_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cfg.train.device == "cuda" and not cuda:
        raise ConfigError("train.device is cuda, but no CUDA GPU is visible; use train.device=auto or cpu")
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is in use (on the CPU accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    if cfg.train.mixed_precision == "bf16" and not cuda:
        check_cpu_bf16(cfg.model.cell)
    rehearsal = cuda and cfg.train.gpu_rehearsal
    if cuda:
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count(), rehearsal)
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    # gloo reduces CUDA tensors and, unlike NCCL, lets ranks share a device.
    init_restartable_process_group(timeout, "gloo" if rehearsal or not cuda else "nccl")
    # Accelerate picks nccl for CUDA and gloo for the CPU itself; only a rehearsal overrides it.
    handler = InitProcessGroupKwargs(timeout=timeout, **({"backend": "gloo"} if rehearsal else {}))
    # cpu=True without CUDA: otherwise `accelerate launch --multi_gpu` on a CPU machine starts N
    # independent world-size-1 runs, each training alone on all the data.
    return Accelerator(cpu=not cuda, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[handler])


def total_steps(cfg: Config, plan: EpochPlan) -> int:
    """Optimizer steps of the run; every epoch has plan.steps global batches, at any world size."""
    return cfg.train.max_steps if cfg.train.max_steps is not None else plan.steps * cfg.train.epochs


def required_free_bytes(model: torch.nn.Module, keep_last: int) -> int:
    """Room for keep_last + 1 checkpoints (weights + Adam's two moments, fp32) and the final model, doubled."""
    params = sum(p.numel() for p in model.parameters()) * 4
    return 2 * (keep_last + 1) * 4 * params + 8 * 2**20


def load_training_manifest(cfg: Config, source: ShardSource) -> Manifest:
    manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
    check_dataset(manifest, cfg.data.dir, cfg.data.dataset)
    verify_shards(manifest, source, "train", cfg.data.verify)
    return manifest


def take_output_lease(accelerator: Accelerator, cfg: Config) -> OutputLease | None:
    """Collective: the main process takes output_dir's lease before anything is written there;
    every rank learns whether it got it, so a refused run ends on all ranks at once."""
    lease, failure = None, None
    if accelerator.is_main_process:
        lease = OutputLease(cfg.output_dir, cfg.train.lease_timeout_s, job_identity())
        try:
            warning = lease.acquire()
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except UserError as err:
            failure = err
        except OSError as err:
            failure = UserError(f"output_dir {cfg.output_dir} is not writable ({err.strerror or err}); choose another "
                                "output_dir or fix its permissions or volume mount")
    if any_rank(accelerator, failure is not None):
        raise failure or OutputDirBusy(f"output_dir {cfg.output_dir} cannot be used; the main process says why")
    return lease


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train to the end (or to train.stop_at_step, or a SIGTERM); returns the summary on the main process."""
    accelerator = build_accelerator(cfg)
    trainer: Trainer | None = None
    watch = PeerWatch.start(accelerator, cfg.train.peer_timeout_s, lambda: where_it_stopped(trainer))
    stop = StopSignal()
    lease, exit_code, preempted = None, 1, False
    try:
        lease = take_output_lease(accelerator, cfg)
        trainer = Trainer(cfg, resume, accelerator)
        summary = trainer.run(stop)
        exit_code = 0
        if watch is not None:
            watch.stop(done=True)
            watch.sign_off()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return summary
    except Preempted as err:
        exit_code, preempted = err.exit_code, True
        raise
    except Exception as err:
        lost = watch.explain(err) if watch is not None else None
        if lost is None:
            raise
        exit_code = lost.exit_code
        raise lost from None
    finally:
        if watch is not None:
            watch.stop(done=False)  # no-op after a success
        stop.restore()
        if trainer is not None:
            trainer.tracker.finish(exit_code, preempted=preempted)
        if lease is not None:
            lease.release()


def where_it_stopped(trainer: Trainer | None) -> str:
    """For a lost-peer message, from the watch's thread: the step reached and what a resume starts from."""
    if trainer is None:
        return "stopped before training began."
    newest = trainer.checkpointer.latest()
    return (f"stopped at step {trainer.state.step} of {trainer.total_steps}; the newest checkpoint is "
            f"{newest or 'none yet (the job would start over)'}.")


class Trainer:
    """Set-up in __init__ (data plan, model, optimizer, resume, tracker); the loop in run()."""

    def __init__(self, cfg: Config, resume: str | None, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.accelerator = accelerator = accelerator or build_accelerator(cfg)
        self.out = Path(cfg.output_dir)
        self.main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.device = accelerator.device
        self.rehearsal = cfg.train.gpu_rehearsal and self.device.type == "cuda"

        self.source = ShardSource(cfg.data.dir, cfg.data.base_url)
        self.manifest = load_training_manifest(cfg, self.source)
        self.placement = self._choose_placement()
        self.layout = BatchLayout.make(cfg.train.global_batch_size, cfg.train.batch_size, self.world)
        self.plan = EpochPlan.make(self.manifest, "train", self.layout, cfg.train.seed, cfg.data.shuffle_buffer)
        self.total_steps = total_steps(cfg, self.plan)
        if cfg.train.max_steps is None and cfg.eval.every_steps > self.total_steps:
            raise ConfigError(f"eval.every_steps ({cfg.eval.every_steps}) is larger than the run ({self.total_steps} steps)")
        self._log_plan()

        self.parts = self._build_parts()
        self.checkpointer = Checkpointer(
            accelerator, self.out, cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, fingerprint=self.manifest.fingerprint,
            model_desc=cfg.model.model_dump(), config=cfg.to_dict(), model_card=self._model_card(),
            order={"global_batch_size": self.layout.global_batch, "seed": cfg.train.seed,
                   "shuffle_buffer": cfg.data.shuffle_buffer})
        self.uses_dropout = cfg.model.dropout > 0
        self.unwrapped = accelerator.unwrap_model(self.parts.model)
        # The average of the weights, on the main process (it alone evaluates and saves it).
        self.ema = WeightAverage(self.unwrapped, cfg.train.ema.decay, cfg.train.ema.start_step) \
            if cfg.train.ema and self.main else None
        self.world_change: tuple[int, int] | None = None  # (world size that wrote the checkpoint, this one)
        self.resumed_from = self._restore(resume)
        self.state: TrainState = self.resumed_from[1] if self.resumed_from else TrainState()
        if self.main:
            save_config(cfg, self.out / "config.yaml")

        self.batches = self._build_batches()
        self.eval_split, warning = eval_split(cfg.eval.split, list(self.manifest.splits))
        if warning and self.main:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.evaluator = self._evaluator(self.eval_split) if self.main else None
        self.run_info = {
            "world_size": self.world,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
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
        self.stopped_by: str | None = None

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
        model = build_model(cfg.model, self.manifest.image_shape, self.manifest.num_classes)
        if self.main:
            check_output_dir(self.out, min_free=required_free_bytes(model, cfg.checkpoint.keep_last))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, self.total_steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)  # the scheduler is never prepared: optimizer.py
        return StepParts(self.accelerator, model, optimizer, scheduler, cfg.train.grad_clip, cfg.train.label_smoothing)

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

    def _model_card(self) -> dict[str, Any]:
        """Saved beside the weights (model/config.json, checkpoints): what evaluate and predict need."""
        m = self.manifest
        return {"image_shape": m.image_shape, "num_classes": m.num_classes, "class_names": m.class_names,
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

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> dict[str, Any]:
        state = self.state
        self.parts.model.train()
        self.sink.begin()
        if self.world_change:
            self.sink.world(state.step, {"world/size": self.world, "world/previous_size": self.world_change[0],
                                         "world/accumulation_steps": self.layout.accumulation})
        while state.step < self.total_steps and self.stopped_by is None:
            epoch_steps = self.plan.steps
            count = min(epoch_steps - state.step_in_epoch, self.total_steps - state.step)
            for micro in self.batches.epoch(state.epoch, state.step_in_epoch, count):
                result = train_step(self.parts, micro, self._dropout_seeds())
                self._count(result)
                self._after_step(stop)
                if self.stopped_by:
                    break
        return self._end()

    def _dropout_seeds(self) -> list[int] | None:
        """Per micro-batch, from its place in the global batch: the masks do not depend on the rank
        that computes it, and a resumed run draws what an uninterrupted one did."""
        if not self.uses_dropout:
            return None
        rank, step = self.accelerator.process_index, self.state.step
        return [order.chunk_seed(self.cfg.train.seed, step, order.chunk_index(self.layout, rank, a))
                for a in range(self.layout.accumulation)]

    def _count(self, result: StepResult) -> None:
        state = self.state
        state.step += 1
        if self.ema is not None:
            self.ema.update(self.unwrapped, state.step)
        state.step_in_epoch += 1
        state.samples_seen += self.layout.global_batch
        self.window.add(result, state.step)
        self.bar.update(1)

    def _check_finite(self) -> None:
        """At log boundaries and before checkpoints: the device's count of non-finite steps. Their
        updates were not applied; without fp16's scaler one means the run diverged."""
        count, first = self.window.take_nonfinite()
        if not count:
            return
        if self.accelerator.scaler is None:  # the gradient is the same on every rank: all stop here together
            raise self._diverged(first)
        self.state.skipped_steps += count  # fp16: the scaler skipped these and lowered its scale

    def _after_step(self, stop: StopSignal) -> None:
        """The decisions between two steps: log, evaluate, roll the epoch over, stop, checkpoint."""
        cfg, state = self.cfg, self.state
        final = state.step == self.total_steps
        epoch_steps = self.plan.steps
        boundary = state.step % cfg.train.log_every_steps == 0 or final
        if boundary:
            self._check_finite()
            self.sink.train(state.step, {**self.window.close(self.accelerator),
                                         "train/epoch": state.epoch + state.step_in_epoch / epoch_steps,
                                         "train/skipped_steps": state.skipped_steps})
        with self.window.paused():
            if self.main and (state.step % cfg.eval.every_steps == 0 or final):
                self._evaluate(final)
            if state.step_in_epoch == epoch_steps:  # a checkpoint below then resumes at the next epoch
                state.epoch += 1
                state.step_in_epoch = 0
            self.stopped_by = self._stop_reason(stop, boundary)
            if self.checkpointer.due(state.step, self.total_steps) or self.stopped_by:
                self._check_finite()
                self._checkpoint()

    def _stop_reason(self, stop: StopSignal, boundary: bool) -> str | None:
        if self.state.step == self.cfg.train.stop_at_step:
            return "train.stop_at_step"
        # Collective: every rank votes at the same log boundaries, not after every step, so the
        # step does not wait for the slowest rank's host; a SIGTERM stops within one log window.
        if boundary and stop.agreed(self.accelerator):
            return "SIGTERM"
        return None

    def _evaluator(self, split: str) -> Evaluator:
        return Evaluator(*load_split_tensors(self.manifest, self.source, split), self.cfg.eval.batch_size,
                         self.manifest.num_classes, self.device, self.accelerator.autocast)

    @property
    def shipped(self) -> torch.nn.Module:
        """The weights model/ will hold: their average when train.ema is set."""
        return self.ema.model if self.ema else self.unwrapped

    def _evaluate(self, final: bool) -> None:
        """Rank 0 only, on the unwrapped model: no collective, the other ranks wait at the next all-reduce.
        The weights are scored as they are (eval/*), and their average beside them (eval_ema/*); the
        best and the media are of the weights that will be saved."""
        state = self.state
        result = self.evaluator(self.unwrapped)
        metrics = result.metrics()
        if self.ema is not None:
            result = self.evaluator(self.ema.model)
            metrics.update({"eval_ema/accuracy": result.accuracy, "eval_ema/loss": result.loss})
        self.checkpointer.record_eval(state, result.accuracy)
        self.sink.eval(state.step, {**metrics, "eval/best_accuracy": state.best_accuracy}, result, final=final)

    def _checkpoint(self) -> None:
        state = self.state
        state.wandb_run_id = self.tracker.run_id
        path = self.checkpointer.save(state, self.parts.model, self.parts.optimizer, self.parts.scheduler, ema=self.ema)
        last = self.evaluator.last if self.evaluator else None
        self.tracker.log_checkpoint(path, state.step, last.accuracy if last else None, self.checkpointer.is_best(state))

    def _diverged(self, step: int) -> Diverged:
        last_good = self.checkpointer.latest()
        return Diverged(
            f"non-finite loss or gradient norm at step {step}; its update was not applied and training stopped at step "
            f"{self.state.step}. The last good checkpoint is {last_good or 'none (no checkpoint was written yet)'}. "
            "Lower optim.lr or set train.grad_clip"
        )

    # -- the end ----------------------------------------------------------------------------

    def _end(self) -> dict[str, Any]:
        self.bar.close()
        self.batches.save_sample_ids(self.out, self.accelerator.process_index)
        counts = torch.tensor([float(self.batches.skipped_samples)], device=self.device)
        skipped = int(self.accelerator.reduce(counts, reduction="sum").item())
        if self.stopped_by == "SIGTERM":
            raise Preempted(
                f"SIGTERM received: every rank stopped after step {self.state.step} of {self.total_steps} and its checkpoint "
                f"is in {self.checkpointer.root}; continue with --resume auto"
            )
        summary = self._finish(skipped) if self.main else {}
        self.accelerator.wait_for_everyone()
        return summary

    def _finish(self, skipped_samples: int) -> dict[str, Any]:
        """Main process: the one score on test, final model, summary.json, plots, the last line of the log."""
        state, last = self.state, self.evaluator.last
        if skipped_samples:
            self.log(f"data.on_error=skip: the places of {skipped_samples} unreadable samples were taken by other samples "
                     "of their windows; every step and every other sample kept its place")
        # Test is scored once, when the run is complete: a stopped run is paused, not finished, and
        # its resumed run must log what the uninterrupted one does.
        test = None
        if state.step == self.total_steps:
            test = last if self.eval_split == "test" else self._evaluator("test")(self.shipped)
            self.sink.test(state.step, {"test/accuracy": test.accuracy, "test/loss": test.loss})
        card = {**self._model_card(), "wandb_run_id": self.tracker.run_id, "steps": state.step,
                "weights": self.run_info["weights"], **({"ema": self.cfg.train.ema.model_dump()} if self.ema else {})}
        save_trained(self.shipped, self.out / "model", card)
        summary = self._summary(skipped_samples, test)
        write_json_atomic(self.out / "summary.json", summary)
        write_plots(self.out / "plots", self.sink.log.read(), test.confusion if test else None,
                    self.manifest.class_names, self.eval_split)
        scores = (f"final {self.eval_split} accuracy {last.accuracy:.4f} (best {state.best_accuracy:.4f})"
                  if last else "no evaluation yet")
        scores += f", test accuracy {test.accuracy:.4f}" if test else ", test not scored until the run completes"
        if summary["completed"]:
            self.log(f"done: {state.step} steps, {scores}, {summary['wall_s']:.1f} s; outputs in {self.out}")
        else:
            self.log(f"stopped at step {state.step} of {self.total_steps} ({self.stopped_by}), {scores}; "
                     "continue with --resume auto")
        return summary

    def _summary(self, skipped_samples: int, test: EvalResult | None) -> dict[str, Any]:
        state, last = self.state, self.evaluator.last
        return {
            **self.run_info,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "global_batch_size": self.layout.global_batch,
            "accumulation_steps": self.layout.accumulation,
            "wall_s": self.sink.elapsed(),
            "train_samples_per_s": self.window.samples_per_s,
            # On eval_split, of the weights model/ holds (their average with train.ema).
            "final_eval_accuracy": last.accuracy if last else None,
            "final_eval_loss": last.loss if last else None,
            "best_eval_accuracy": state.best_accuracy,
            # The same weights, scored once on test at the end.
            "test_accuracy": test.accuracy if test else None,
            "test_loss": test.loss if test else None,
            "eval_seconds_mean": self.evaluator.mean_seconds,
            "evals": len(self.evaluator.seconds),
            "skipped_steps": state.skipped_steps,
            "skipped_samples": skipped_samples,
            "resumed": self.resumed_from is not None,
            "completed": state.step == self.total_steps,
            "train_state": asdict(state),
        }
