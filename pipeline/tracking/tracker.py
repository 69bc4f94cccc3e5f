"""The W&B tracker the trainer calls: one run per job, on the main process only.

Tracking is never allowed to stop training. Any wandb failure (no network, full disk,
init timeout, a bad value) prints one warning and turns the tracker into a no-op; the trainer's
local metrics.jsonl does not depend on it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import WandbConfig
from pipeline.files import mask_url
from pipeline.tracking import media, session
from pipeline.tracking.provenance import provenance
from pipeline.tracking.secrets import scrub
from pipeline.tracking.session import STEP_KEY


def _say(line: str) -> None:
    print(f"wandb: {scrub(line)}", flush=True)


def _warn(line: str) -> None:
    print(f"warning: {scrub(line)}", file=sys.stderr, flush=True)


class Tracker:
    """A W&B run, or nothing: every method is safe to call in both cases."""

    def __init__(self, run: Any = None, *, mode: str = "disabled", media_every_evals: int = 1, log_model: str = "off"):
        self._run = run
        # A run that failed is kept only to be finished, so it is not left "running" on the server.
        self._broken_run: Any = None
        self.mode = mode if run is not None else "disabled"
        self.run_id: str | None = run.id if run is not None else None
        self._media_every_evals = media_every_evals
        self._log_model = log_model
        self._evals = 0
        self._finished = False

    @classmethod
    def noop(cls) -> Tracker:
        return cls()

    @classmethod
    def create(
        cls,
        wandb_cfg: WandbConfig,
        output_dir: Path,
        is_main: bool,
        run_config: dict[str, Any],
        resume_run_id: str | None,
    ) -> Tracker:
        if not is_main:
            return cls.noop()
        environ = os.environ
        choice = session.resolve_mode(wandb_cfg.mode, environ)
        if choice.mode == "disabled":
            _say(f"tracking disabled ({choice.reason})")
            return cls.noop()
        wandb_dir = session.resolve_dir(Path(output_dir), environ)
        run = None
        try:
            session.check_writable(wandb_dir)
            config = {**run_config, "provenance": provenance()}
            # Name, notes, tags and config all end up on the server: scrub them all.
            kwargs = scrub(session.init_kwargs(wandb_cfg, choice.mode, wandb_dir, config, resume_run_id, environ))
            # wandb records the command line (sys.argv) with the run, at its start and again at its end:
            # a URL's credentials given there (data.base_url=https://user:token@...) are masked for good.
            sys.argv[:] = [mask_url(arg) for arg in scrub(sys.argv)]
            import wandb

            run = wandb.init(**kwargs)
            session.define_metrics(run)
        except Exception as err:  # noqa: BLE001 - any wandb failure must leave training running
            _warn(
                f"W&B tracking is off for this job: starting the {choice.mode} run in {wandb_dir} failed "
                f"({type(err).__name__}: {_first_line(err)}). Training continues; metrics go to metrics.jsonl."
            )
            if run is not None:
                cls(run).finish(exit_code=1)  # started but unusable: do not leave it "running"
            return cls.noop()
        resumed = f", resuming {resume_run_id}" if resume_run_id else ""
        if choice.mode == "offline":
            _say(f"offline ({choice.reason}){resumed}: run {run.id} in {session.sync_dir(run)}")
        else:
            _say(f"online ({choice.reason}){resumed}: {run.url}")
        return cls(run, mode=choice.mode, media_every_evals=wandb_cfg.media_every_evals, log_model=wandb_cfg.log_model)

    @property
    def active(self) -> bool:
        return self._run is not None

    @contextmanager
    def _guard(self, action: str) -> Iterator[Any]:
        """Yield the run (or None); on any error warn once and stop tracking."""
        if self._run is None:
            yield None
            return
        try:
            yield self._run
        except Exception as err:  # noqa: BLE001 - see module docstring
            _warn(
                f"W&B {action} failed ({type(err).__name__}: {_first_line(err)}); "
                "tracking is off for the rest of this job. Training continues; metrics go to metrics.jsonl."
            )
            self._broken_run, self._run = self._run, None

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        with self._guard("logging train metrics") as run:
            if run is not None:
                run.log(_row(step, metrics))

    def log_eval(
        self,
        step: int,
        metrics: dict[str, float],
        confusion: np.ndarray,
        class_names: list[str],
        examples: media.Examples | None,
        *,
        final: bool = False,
    ) -> None:
        """Eval metrics every time; media every `media_every_evals`-th eval and on the final one."""
        with self._guard("logging evaluation") as run:
            if run is None:
                return
            self._evals += 1
            row = _row(step, metrics)
            if final or self._evals % self._media_every_evals == 0:
                row["eval/confusion_matrix"] = media.confusion_chart(
                    confusion, class_names, title="Confusion matrix (latest evaluation)"
                )
                if examples is not None and len(examples[0]):
                    row["eval/misclassified"] = media.examples_table(examples, class_names)
            run.log(row)

    def summarize(self, values: dict[str, Any]) -> None:
        """Figures of the run as a whole, for the run's summary rather than a chart (the bytes read)."""
        with self._guard("writing the run summary") as run:
            if run is not None:
                run.summary.update(values)

    def log_checkpoint(self, model_dir: Path, step: int, accuracy: float | None, is_best: bool) -> None:
        """A model artifact version per checkpoint (log_model=all) or per new best (log_model=best)."""
        if self._log_model == "off" or (self._log_model == "best" and not is_best):
            return
        with self._guard("logging the model artifact") as run:
            if run is None:
                return
            import wandb

            artifact = wandb.Artifact(
                f"model-{run.id}",
                type="model",
                metadata={"step": step, "accuracy": accuracy, "run_id": run.id},
            )
            # The default "mutable" policy copies files into staging now, so the trainer may
            # rotate the checkpoint dir away before the upload happens.
            artifact.add_dir(str(model_dir))
            aliases = ["latest", f"step-{step}"] + (["best"] if is_best else [])
            run.log_artifact(artifact, aliases=aliases)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Finish the run with the job's exit code; safe to call twice and after failures."""
        if self._finished:
            return
        self._finished = True
        run, self._run = self._run or self._broken_run, None
        self._broken_run = None
        if run is None:
            return
        try:
            if preempted:
                # Shown as "preempted" rather than "crashed"/"failed" in the UI; the resumed
                # job continues the same run.
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            _warn(f"W&B could not finish run {run.id} ({type(err).__name__}: {_first_line(err)})")
            return
        if self.mode == "offline":
            _say(f"run {run.id} saved offline; upload with: wandb sync {session.sync_dir(run)}")


def _row(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    # The trainer's metrics.jsonl events carry their own "step"; in W&B it would only be a
    # duplicate chart of the x axis.
    row = {k: v for k, v in metrics.items() if k != "step"}
    row[STEP_KEY] = step
    return row


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"
