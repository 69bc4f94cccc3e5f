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
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from pipeline.data.manifest import load_manifest
from pipeline.errors import ConfigError
from pipeline.files import exclusive_lock, mask_url
from pipeline.tuning.space import SearchSpace
from pipeline.tuning.trial_run import BEAT_S, GRID, Outcome, TrialCommand, finished_run, planned_steps, progress, watch

STALE_S = 12 * BEAT_S  # no heartbeat for this long: the trial's worker is gone
RESUME_FROM, INTERRUPTED, ERROR, HEARTBEAT, ORIGIN = "resume_from", "interrupted", "error", "heartbeat", "origin"
SETTINGS, QUEUED = "settings", "queued"  # study attributes: what its reports mean; its queue is in
QUEUE_WAIT_S = 300.0  # how long a tuner of index > 0 waits for tuner 0's queue (tuner 0 may be making the folds)
PRUNERS = ("median", "hyperband", "none")
SCHEMA_TRIES = 5


def storage_for(url: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        journal = optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log"))
        return optuna.storages.JournalStorage(journal)
    for attempt in range(SCHEMA_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (ImportError, ModuleNotFoundError) as err:
            # Masked: the URL may come from $OPTUNA_STORAGE (a Secret) with a password that no log may show.
            raise ConfigError(mask_url(f"--storage {url}: its database driver is not installed ({err}); install it "
                                       "(PostgreSQL: pip install 'psycopg[binary]', the driver SQLAlchemy uses for "
                                       "postgresql://) or leave --storage out for the journal file")) from None
        except Exception as err:  # SQLAlchemy's own errors: a bad URL, a server that does not answer
            # Tuners started together on an empty database all create Optuna's tables: the losers of that
            # race fail on a duplicate key, and find the tables made when they try again.
            if "IntegrityError" in type(err).__name__ and attempt + 1 < SCHEMA_TRIES:
                time.sleep(1.0 + attempt)
                continue
            raise ConfigError(mask_url(f"--storage {url}: cannot open the study storage ({type(err).__name__}: "
                                       f"{str(err).splitlines()[0]})")) from None
    raise AssertionError("unreachable")


def pruner_for(name: str, folds: int = 1, startup: int = 3) -> optuna.pruners.BasePruner:
    """Trials report at their progress, fold k's run at k * GRID + its twentieths (Tuner._fold). Neither pruner
    acts in the first 30% of a trial's first run: a small learning rate or strong augmentation starts slow, and
    with a short run's evaluation each step a median pruner without warm-up stopped 37 of 40 ArrowHead trials
    at their tenth step, against the three queued trials that had finished."""
    warmup = int(GRID * 0.3) + 1
    if name == "median":  # a trial below the median of the others at the same progress, once `startup` have
        # finished (not Optuna's 5: on two cores a study of half an hour ends a long run only every few minutes)
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "hyperband":  # rungs from the end of the warm-up to all the folds' runs
        return optuna.pruners.HyperbandPruner(min_resource=warmup, max_resource=GRID * folds, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage: optuna.storages.BaseStorage, seed: int, pruner: str, index: int = 0,
               trials: int = 40, folds: int = 1) -> optuna.Study:
    """Create the study, or join it. The sampler's seed is `seed` for tuner 0 creating it (a study of one tuner
    is reproducible); tuners started together (`index`, a pod's) and tuners that join add numbers of their own,
    or they would draw the same parameters. TPE models the space after a quarter of the trials (at least 4,
    at most Optuna's 10) drawn at random: a study of a dozen trials would otherwise be a random search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the tuner says what happens, once, as [tune]
    startup = min(10, max(4, trials // 4))

    def make(sampler_seed: int) -> optuna.Study:
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup)
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                   sampler=sampler, pruner=pruner_for(pruner, folds))

    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    own = seed + 100_003 * index
    study = make(own if name not in existing else own + os.getpid() + int(time.time() * 1000) % 1_000_000)
    _same_settings(study, {"pruner": pruner, "folds": folds})
    return study


def _same_settings(study: optuna.Study, settings: dict) -> None:
    """A study's reports are progress over its folds, pruned one way: a tuner that joins with another pruner or
    another number of folds would mix two scales in one study, so it is refused."""
    held = study.user_attrs.get(SETTINGS)
    if held is None:
        study.set_user_attr(SETTINGS, settings)
    elif held != settings:
        raise ConfigError(f"study {study.study_name} was begun with --pruner {held['pruner']} over {held['folds']} "
                          f"fold(s), and this tuner asks for --pruner {settings['pruner']} over {settings['folds']}: one "
                          "study prunes one way on one set of folds. Start it with the settings it was begun with, or "
                          "name a new study (--study)")


def enqueue_first(study: optuna.Study, space: SearchSpace, given: dict, trials: int, study_dir: Path,
                  index: int = 0) -> str:
    """What a new study runs before its sampler draws (SearchSpace.queue), and a line saying so ('' where
    nothing): each candidate of a list, or the config as given (so that the winner is never a setting that
    validation rates below the untuned one) and the space's starting points. Every tuner of a study calls it
    before asking for a trial, so that tuners started together never draw before the queue is in: tuners on
    one machine or volume take turns under a lock in the study directory, and tuners started together on
    several (`index` > 0) leave the queue to tuner 0 and wait for it."""
    if index > 0:
        _wait_for_queue(study)
        return ""
    queue = space.queue(given)
    with exclusive_lock(study_dir / ".queue.lock"):
        if study.get_trials(deepcopy=False) or not queue:
            study.set_user_attr(QUEUED, True)
            return ""
        for origin, values in queue:
            study.enqueue_trial(values, user_attrs={ORIGIN: origin}, skip_if_exists=True)
        study.set_user_attr(QUEUED, True)
    if space.candidates:
        return f"the trials are the {len(queue)} candidates of {space.path}, in its order"
    line = "first, before the sampler draws: " + ", ".join(origin for origin, _ in queue)
    if outside := space.outside(given):
        line += (f" (not the config as given: {', '.join(outside)} lie outside {space.path}; the starting points "
                 "take its other values)")
    if trials < len(queue):
        line += f"; --trials {trials} runs the first {trials} of them"
    return line


def _wait_for_queue(study: optuna.Study) -> None:
    deadline = time.monotonic() + QUEUE_WAIT_S
    while not study.user_attrs.get(QUEUED) and time.monotonic() < deadline:
        time.sleep(1.0)


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


def val_cases(data_dir: Path) -> int:
    return load_manifest(data_dir, None).split("val").num_samples


def pooled(done: list[Outcome], cases: list[int]) -> Outcome:
    """The folds' validation as one over all their cases: correct cases over cases, the loss per case. A mean
    of the folds' accuracies would score two settings that get the same number of cases right differently
    whenever the folds' sizes differ (67, 67 and 66 cases: 0.87494 against 0.87487), and the lower loss
    would never break their tie (report.rank)."""
    correct = sum(round(o.value * n) for o, n in zip(done, cases, strict=True))
    loss = sum(o.loss * n for o, n in zip(done, cases, strict=True)) / sum(cases)
    return Outcome("complete", correct / sum(cases), loss,
                   summary={"steps": done[-1].summary.get("steps"), "folds": [o.value for o in done]})


class Tuner:
    """Asks the study for trials and runs them, one at a time per worker thread, until the budget is spent."""

    def __init__(self, study: optuna.Study, space: SearchSpace, commands: list[TrialCommand], study_dir: Path,
                 budget: Budget, folds: list[Path | None], say: Callable[[str], None]):
        self.study, self.space, self.commands, self.dir, self.budget, self.folds, self.say = (
            study, space, commands, study_dir, budget, folds, say)
        self.stop = threading.Event()  # Ctrl-C, SIGTERM: the study pauses, every trial kept to continue
        self.halt = threading.Event()  # the running runs stop: on a signal, or when --timeout is reached
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
        try:  # only one tuner wins this (the others find the trial finished); it alone queues the parameters again
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            storage.set_trial_user_attr(trial._trial_id, ERROR, why)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return
        # fixed_params: what the trial was queued with, where its worker was lost before it drew them all.
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        self.study.enqueue_trial(params, user_attrs={RESUME_FROM: trial.number,
                                                          ORIGIN: trial.user_attrs.get(ORIGIN, "drawn")})
        self.say(f"trial {trial.number}: {why}; its parameters are queued to continue")

    def _next(self) -> optuna.Trial | None:
        with self._ask:
            if self.halt.is_set():
                return None
            self.recover_lost()
            return self.study.ask() if self.budget.open(self.study) else None

    def work(self, command: TrialCommand) -> None:
        while (trial := self._next()) is not None:
            try:
                self.run(trial, command)
            except UpdateFinishedTrialError:  # its run was stopped on the way out (watch's finally)
                self.say(f"trial {trial.number} was ended by another tuner, which found its heartbeat late; "
                         "this worker goes on with the next")
            except Exception as err:  # noqa: BLE001 - one trial's failure is recorded; the study goes on
                self._fail(trial, f"{type(err).__name__}: {err}")

    def _fail(self, trial: optuna.Trial, error: str) -> None:
        """A trial that could not run (its queued parameters outside today's space, a tuner error): failed,
        with why, and not run again."""
        try:
            trial.set_user_attr(ERROR, error)
            self.study.tell(trial, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass
        self.say(f"trial {trial.number} failed: {error}")

    def run(self, trial: optuna.Trial, command: TrialCommand) -> None:
        """The trial's runs, one per fold, each reported as it evaluates; scored over all their cases (pooled)."""
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
        score = done[0] if self.folds == [None] else pooled(done, [val_cases(d) for d in self.folds])
        self._tell(trial, score, time.monotonic() - started)

    def _fold(self, trial: optuna.Trial, command: TrialCommand, values: dict, trial_dir: Path, k: int,
              data_dir: Path | None, done: list[Outcome], resume: bool) -> Outcome:
        """One run of a trial: the data set's own split (data_dir None) or fold k. A fold that finished
        before an interruption is read, not run again. Evaluations are reported at the run's progress, fold k
        at k * GRID + its twentieths, the first evaluation in each twentieth: the pruner compares trials at the
        same share of their runs, whatever a setting's steps or how often it evaluates, and Hyperband's budget
        counts twentieths of a run."""
        out = trial_dir if data_dir is None else trial_dir / f"fold-{k}"
        if resume and (out / "summary.json").is_file():
            return finished_run(out)
        storage, tid = self.study._storage, trial._trial_id
        last, total = [k * GRID], [None]  # the run's length, read once it has written it

        def report(step: int, accuracy: float) -> bool:  # the running mean over the folds, this one's latest
            total[0] = total[0] or planned_steps(out)
            at = None if total[0] is None else k * GRID + progress(step, total[0])
            if at is None or at <= last[0]:
                return False
            last[0] = at
            trial.report((sum(o.value for o in done) + accuracy) / (len(done) + 1), last[0])
            return trial.should_prune()

        params = self.space.overrides(values) + ([] if data_dir is None else [f"data.dir={data_dir}"])
        argv = command.argv(out, params, resume and out.is_dir(), f"trial-{trial.number}" + (f"-fold-{k}" if data_dir else ""))
        log = self.dir / "logs" / (f"{trial.number:04d}.log" if data_dir is None else f"{trial.number:04d}-fold-{k}.log")
        return watch(argv, command.env(), out, log, lambda: storage.set_trial_system_attr(tid, HEARTBEAT, time.time()),
                     report, self.halt)

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
            # The error's first line and the last of its log's tail; trials.csv holds the whole of it
            lines = outcome.error.splitlines()
            self.say(f"trial {trial.number} failed: {' '.join(lines[:1] + lines[1:][-1:])}")


def run_workers(tuner: Tuner) -> None:
    """One thread per worker (each watches a training process of its own); returns when all are done. At
    --timeout the running trials are stopped too (each run checkpoints; its trial is queued to continue in a
    later, longer study): a time box is kept, not overrun by the last trials it started."""
    threads = [threading.Thread(target=tuner.work, args=(c,), name=f"worker-{i}", daemon=True)
               for i, c in enumerate(tuner.commands)]
    budget = tuner.budget
    budget.started = budget.started or time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # in slices: the main thread must stay free to take Ctrl-C and SIGTERM
            if budget.timeout_s is not None and time.monotonic() - budget.started >= budget.timeout_s:
                tuner.halt.set()


def work_until_done(tuner: Tuner) -> None:
    """Rounds of the workers until the budget is spent and no trial is running anywhere or queued again:
    another tuner's trial interrupted after this one's workers stopped asking is run here."""
    while not tuner.halt.is_set():
        run_workers(tuner)
        wait_for_others(tuner)
        queued = tuner.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not (queued and tuner.budget.open(tuner.study)):
            return


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
