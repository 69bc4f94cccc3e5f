"""The study: its storage, and the workers that ask it for trials and tell it how they ended.

Storage: by default Optuna's journal file in the study directory. Every change is one appended line
under a file lock, so several workers on one machine (or on a shared volume) share it safely; SQLite,
the other embedded choice, answers concurrent writers with "database is locked" and wants retries.
`--storage postgresql://...` (any SQLAlchemy URL) serves workers on several machines.

A trial that crashed is recorded as failed with its error and not run again. A trial that did not end
(the tuner stopped by Ctrl-C or SIGTERM; a worker lost, seen by its heartbeat going quiet) is marked
failed, "interrupted", and its parameters queued again: the next worker to ask takes them first and
continues the run from its checkpoint where the run directory is at hand. Interrupted trials do not count
against `--trials`.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from pipeline.errors import ConfigError
from pipeline.tuning.space import SearchSpace
from pipeline.tuning.trial_run import BEAT_S, Outcome, TrialCommand, finished_run, watch

STALE_S = 12 * BEAT_S  # no heartbeat for this long: the trial's worker is gone
RESUME_FROM, INTERRUPTED, ERROR, HEARTBEAT = "resume_from", "interrupted", "error", "heartbeat"
PRUNERS = ("median", "hyperband", "none")
SCHEMA_TRIES = 5
FOLD_STEPS = 10**8  # fold k's evaluations are reported at k * FOLD_STEPS + step: one axis for the pruner


def storage_for(url: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        journal = optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log"))
        return optuna.storages.JournalStorage(journal)
    for attempt in range(SCHEMA_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (ImportError, ModuleNotFoundError) as err:
            raise ConfigError(f"--storage {url}: its database driver is not installed ({err}); install it (PostgreSQL: "
                              "pip install 'psycopg[binary]', the driver SQLAlchemy uses for postgresql://) or leave "
                              "--storage out for the journal file") from None
        except Exception as err:  # SQLAlchemy's own errors: a bad URL, a server that does not answer
            # Tuners started together on an empty database all create Optuna's tables: the losers of that
            # race fail on a duplicate key, and find the tables made when they try again.
            if "IntegrityError" in type(err).__name__ and attempt + 1 < SCHEMA_TRIES:
                time.sleep(1.0 + attempt)
                continue
            raise ConfigError(f"--storage {url}: cannot open the study storage ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]})") from None
    raise AssertionError("unreachable")


def pruner_for(name: str) -> optuna.pruners.BasePruner:
    if name == "median":  # a trial below the median of the others at the same evaluation, once 5 have finished
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(name: str, storage: optuna.storages.BaseStorage, seed: int, pruner: str) -> optuna.Study:
    """Create the study, or join it. The process that creates it seeds the sampler with `seed`; a worker that
    joins adds a number of its own, or two workers would draw the same parameters."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the tuner says what happens, once, as [tune]

    def make(sampler_seed: int) -> optuna.Study:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                   sampler=optuna.samplers.TPESampler(seed=sampler_seed), pruner=pruner_for(pruner))

    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in existing:
        return make(seed)
    return make(seed + threading.get_native_id() + int(time.time() * 1000) % 1_000_000)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial spent the budget: it ended, and was not interrupted (its parameters run again)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED))


@dataclass
class Budget:
    trials: int
    timeout_s: float | None = None
    started: float = 0.0

    def open(self, study: optuna.Study) -> bool:
        trials = study.get_trials(deepcopy=False)
        taken = sum(counted(t) for t in trials) + sum(t.state == TrialState.RUNNING for t in trials)
        in_time = self.timeout_s is None or time.monotonic() - self.started < self.timeout_s
        return taken < self.trials and in_time


class Tuner:
    """Asks the study for trials and runs them, one at a time per worker thread, until the budget is spent."""

    def __init__(self, study: optuna.Study, space: SearchSpace, commands: list[TrialCommand], study_dir: Path,
                 budget: Budget, folds: list[Path | None], say: Callable[[str], None]):
        self.study, self.space, self.commands, self.dir, self.budget, self.folds, self.say = (
            study, space, commands, study_dir, budget, folds, say)
        self.stop = threading.Event()
        self._ask = threading.Lock()

    def run_dir(self, number: int) -> Path:
        return self.dir / "trials" / f"{number:04d}"

    def recover_lost(self) -> None:
        """Trials whose worker went quiet: marked interrupted, their parameters queued to continue."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT) or (t.datetime_start.timestamp() if t.datetime_start else now)
            if now - beat > STALE_S:
                self._requeue(t, f"its worker was lost (no heartbeat for {now - beat:.0f} s)")

    def _requeue(self, trial: optuna.trial.FrozenTrial, why: str) -> None:
        storage = self.study._storage
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        storage.set_trial_user_attr(trial._trial_id, ERROR, why)
        try:  # only one worker wins this; it alone queues the parameters again
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return
        self.study.enqueue_trial(trial.params, user_attrs={RESUME_FROM: trial.number})
        self.say(f"trial {trial.number}: {why}; its parameters are queued to continue")

    def _next(self) -> optuna.Trial | None:
        with self._ask:
            if self.stop.is_set():
                return None
            self.recover_lost()
            return self.study.ask() if self.budget.open(self.study) else None

    def work(self, command: TrialCommand) -> None:
        while (trial := self._next()) is not None:
            self.run(trial, command)

    def run(self, trial: optuna.Trial, command: TrialCommand) -> None:
        """The trial's runs, one per fold, each reported as it evaluates; scored by their mean."""
        values = self.space.suggest(trial)
        trial_dir, resume = self._claim_dir(trial)
        trial.set_user_attr("run_dir", str(trial_dir))
        self.say(f"trial {trial.number}{' (continued)' if resume else ''}: "
                 + ", ".join(f"{k}={v}" for k, v in values.items()))
        started, done = time.monotonic(), []
        for k, data_dir in enumerate(self.folds):
            outcome = self._fold(trial, command, values, trial_dir, k, data_dir, done, resume)
            if outcome.state != "complete":
                return self._tell(trial, outcome, time.monotonic() - started)
            done.append(outcome)
        mean = Outcome("complete", statistics.fmean(o.value for o in done), statistics.fmean(o.loss for o in done),
                       summary={"steps": done[-1].summary.get("steps"), "folds": [o.value for o in done]})
        self._tell(trial, mean, time.monotonic() - started)

    def _fold(self, trial: optuna.Trial, command: TrialCommand, values: dict, trial_dir: Path, k: int,
              data_dir: Path | None, done: list[Outcome], resume: bool) -> Outcome:
        """One run of a trial: the data set's own split (data_dir None) or fold k. A fold that finished
        before an interruption is read, not run again."""
        out = trial_dir if data_dir is None else trial_dir / f"fold-{k}"
        if resume and (out / "summary.json").is_file():
            return finished_run(out)
        storage, tid = self.study._storage, trial._trial_id

        def report(step: int, accuracy: float) -> bool:  # the running mean over the folds, this one's latest
            trial.report((sum(o.value for o in done) + accuracy) / (len(done) + 1), k * FOLD_STEPS + step)
            return trial.should_prune()

        params = self.space.overrides(values) + ([] if data_dir is None else [f"data.dir={data_dir}"])
        argv = command.argv(out, params, resume and out.is_dir(), f"trial-{trial.number}" + (f"-fold-{k}" if data_dir else ""))
        log = self.dir / "logs" / (f"{trial.number:04d}.log" if data_dir is None else f"{trial.number:04d}-fold-{k}.log")
        return watch(argv, command.env(), out, log, lambda: storage.set_trial_system_attr(tid, HEARTBEAT, time.time()),
                     report, self.stop)

    def _claim_dir(self, trial: optuna.Trial) -> tuple[Path, bool]:
        """The trial's run directory; a trial continuing an interrupted one takes that one's directory over."""
        out = self.run_dir(trial.number)
        before = trial.user_attrs.get(RESUME_FROM)
        if before is not None and self.run_dir(before).is_dir() and not out.exists():
            self.run_dir(before).rename(out)
            return out, True
        return out, False

    def _tell(self, trial: optuna.Trial, outcome: Outcome, seconds: float) -> None:
        trial.set_user_attr("seconds", round(seconds, 1))
        if outcome.loss is not None:
            trial.set_user_attr("val_loss", outcome.loss)
        for key in ("steps", "folds"):
            if outcome.summary.get(key) is not None:
                trial.set_user_attr(key, outcome.summary[key])
        if outcome.error:
            trial.set_user_attr(ERROR, outcome.error)
        if outcome.state == "complete":
            self.study.tell(trial, outcome.value)
            self.say(f"trial {trial.number}: validation accuracy {outcome.value:.4f} (loss {outcome.loss:.4f}), "
                     f"{seconds:.0f} s")
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.say(f"trial {trial.number}: {outcome.error} (validation accuracy {outcome.value:.4f})")
        elif outcome.state == "interrupted":
            self._requeue(self.study._storage.get_trial(trial._trial_id), "interrupted")
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} failed: {outcome.error.splitlines()[0]}")


def run_workers(tuner: Tuner) -> None:
    """One thread per worker (each watches a training process of its own); returns when all are done."""
    threads = [threading.Thread(target=tuner.work, args=(c,), name=f"worker-{i}", daemon=True)
               for i, c in enumerate(tuner.commands)]
    tuner.budget.started = tuner.budget.started or time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # in slices: the main thread must stay free to take Ctrl-C and SIGTERM


def wait_for_others(tuner: Tuner, poll_s: float = 5.0) -> None:
    """Before the winner is chosen: the trials other tuners still run (on this machine or others) end, or
    their workers are found lost."""
    said = False
    while not tuner.stop.is_set():
        tuner.recover_lost()
        running = tuner.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not said:
            tuner.say(f"waiting for {len(running)} trial(s) other tuners run: {', '.join(str(t.number) for t in running)}")
            said = True
        time.sleep(poll_s)


def threads_per_trial(cpus: int, workers: int) -> int:
    return max(1, math.floor(cpus / workers))
