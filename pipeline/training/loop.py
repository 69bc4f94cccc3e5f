"""The training loop: one code path for one CPU, several processes, GPUs and nodes.

The loop only decides, between two steps: when to log, evaluate, roll the epoch over, stop and
checkpoint. What it decides about is a Run built once (parts.py, by trainer.py); it advances the
run's state and returns what stopped it; what a finished or stopped run leaves behind is written
by finish.py.
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast

from pipeline.data import order
from pipeline.distributed.preemption import StopSignal
from pipeline.errors import UserError
from pipeline.training.parts import Run
from pipeline.training.step import StepResult, train_step


class Diverged(UserError):
    exit_code = 3
    shared = True  # the gradient is the same on every rank: all stop at the same step


class TrainingLoop:
    def __init__(self, run: Run):
        self.t = run
        self.stopped_by: str | None = None

    def run(self, stop: StopSignal) -> str | None:
        """Steps until the run's end or a stop; returns what stopped it early (None: it ran to the end)."""
        t, state = self.t, self.t.state
        t.parts.model.train()
        t.sink.begin()
        if t.world_change:
            t.sink.record(state.step, {"world/size": t.world_change[1], "world/previous_size": t.world_change[0],
                                      "world/accumulation_steps": t.data.layout.accumulation})
        while state.step < t.total_steps and self.stopped_by is None:
            count = min(t.data.plan.steps - state.step_in_epoch, t.total_steps - state.step)
            epoch = state.epoch
            for micro in t.batches.epoch(epoch, state.step_in_epoch, count):
                result = train_step(t.parts, micro, self._dropout_seeds(), epoch)
                self._count(result)
                self._after_step(stop)
                if self.stopped_by:
                    break
        return self.stopped_by

    def _dropout_seeds(self) -> list[int] | None:
        """Per micro-batch, from its place in the global batch: the masks do not depend on the rank
        that computes it, and a resumed run draws what an uninterrupted one did."""
        t = self.t
        if not (t.data.model.dropout > 0 or t.data.model.readout_dropout > 0):
            return None
        rank, step, layout = t.accelerator.process_index, t.state.step, t.data.layout
        return [order.chunk_seed(t.cfg.train.seed, step, order.chunk_index(layout, rank, a))
                for a in range(layout.accumulation)]

    def _count(self, result: StepResult) -> None:
        t, state = self.t, self.t.state
        state.step += 1
        if t.ema is not None:
            t.ema.update(t.unwrapped, state.step)
        state.step_in_epoch += 1
        state.samples_seen += t.data.layout.global_batch
        t.window.add(result, state.step)
        t.bar.update(1)

    def _check_finite(self) -> None:
        """At log boundaries and before checkpoints: the device's count of non-finite steps. Their
        updates were not applied; without fp16's scaler one means the run diverged."""
        count, first = self.t.window.take_nonfinite()
        if not count:
            return
        if self.t.accelerator.scaler is None:  # the gradient is the same on every rank: all stop here together
            raise self._diverged(first)
        self.t.state.skipped_steps += count  # fp16: the scaler skipped these and lowered its scale

    def _after_step(self, stop: StopSignal) -> None:
        """The decisions between two steps: log, evaluate, roll the epoch over, stop, checkpoint."""
        t, cfg, state = self.t, self.t.cfg, self.t.state
        final = state.step == t.total_steps
        epoch_steps = t.data.plan.steps
        boundary = state.step % cfg.train.log_every_steps == 0 or final
        if boundary:
            self._check_finite()
            padding = t.batches.padding.take() if t.data.plan.ragged else None
            t.sink.train(state.step, {**t.window.close(t.accelerator, padding),
                                      "train/epoch": state.epoch + state.step_in_epoch / epoch_steps,
                                      "train/skipped_steps": state.skipped_steps})
        with t.window.paused():
            evaluated = t.eval_split != "none" and (self._eval_due() or final)
            if t.main and evaluated:
                self._evaluate(final)
            if state.step_in_epoch == epoch_steps:  # a checkpoint below then resumes at the next epoch
                state.epoch += 1
                state.step_in_epoch = 0
            self.stopped_by = self._stop_reason(stop, boundary, evaluated and not final)
            if t.checkpointer.due(state.step, t.total_steps) or self.stopped_by:
                self._check_finite()
                self._checkpoint()

    def _eval_due(self) -> bool:
        """eval.every_epochs: at the end of every N-th epoch; else every eval.every_steps steps."""
        cfg, state = self.t.cfg, self.t.state
        if cfg.eval.every_epochs is None:
            return state.step % cfg.eval.every_steps == 0
        return state.step_in_epoch == self.t.data.plan.steps and (state.epoch + 1) % cfg.eval.every_epochs == 0

    def _stop_reason(self, stop: StopSignal, boundary: bool, evaluated: bool) -> str | None:
        if evaluated and self._patience_ran_out():
            return "eval.patience"
        if self.t.state.step == self.t.cfg.train.stop_at_step:
            return "train.stop_at_step"
        # Collective: every rank votes at the same log boundaries, not after every step, so the
        # step does not wait for the slowest rank's host; a SIGTERM stops within one log window.
        if boundary and stop.agreed(self.t.accelerator):
            return "SIGTERM"
        return None

    def _patience_ran_out(self) -> bool:
        """Collective, after an evaluation: the main process (it alone evaluates) tells every rank whether
        eval.patience evaluations in a row have brought no better one."""
        t, state, patience = self.t, self.t.state, self.t.cfg.eval.patience
        if patience is None:
            return False
        ran_out = torch.tensor([int(t.main and state.evals_since_best >= patience)], device=t.device)
        if t.accelerator.num_processes > 1:
            ran_out = broadcast(ran_out, from_process=0)
        state.stopped_early = bool(ran_out.item())
        return state.stopped_early

    def _evaluate(self, final: bool) -> None:
        """Rank 0 only, on the unwrapped model: no collective, the other ranks wait at the next all-reduce.
        The weights are scored as they are (eval/*), and their average beside them (eval_ema/*); the
        best and the media are of the weights that will be saved."""
        t, state = self.t, self.t.state
        raw, averaged = t.evaluator.event(t.unwrapped, t.ema.model if t.ema is not None else None)
        metrics = raw.metrics()
        if averaged is not None:
            metrics.update({"eval_ema/accuracy": averaged.accuracy, "eval_ema/loss": averaged.loss})
        result = averaged or raw
        new_best = t.checkpointer.record_eval(state, result.accuracy, result.loss, t.shipped)
        state.evals_since_best = 0 if new_best else state.evals_since_best + 1
        t.sink.eval(state.step, {**metrics, "eval/best_accuracy": state.best_accuracy}, result, final=final)

    def _checkpoint(self) -> None:
        t, state = self.t, self.t.state
        state.wandb_run_id = t.tracker.run_id
        path = t.checkpointer.save(state, t.parts.model, t.parts.optimizer, t.parts.scheduler, ema=t.ema)
        last = t.evaluator.last if t.evaluator else None
        t.tracker.log_checkpoint(path, state.step, last.accuracy if last else None, t.checkpointer.is_best(state))

    def _diverged(self, step: int) -> Diverged:
        last_good = self.t.checkpointer.latest()
        return Diverged(
            f"non-finite loss or gradient norm at step {step}; its update was not applied and training stopped at step "
            f"{self.t.state.step}. The last good checkpoint is {last_good or 'none (no checkpoint was written yet)'}. "
            "Lower optim.lr or set train.grad_clip"
        )
