"""launch/tune.py's work: check the request, run the study's workers, write the report, train the winner."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.data.manifest import load_manifest
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError
from pipeline.tuning import final_seeds
from pipeline.tuning.final import train_final
from pipeline.tuning.folds import fold_count, prepare_folds, prepare_refit
from pipeline.tuning.report import write_report
from pipeline.tuning.space import SearchSpace, load_space
from pipeline.tuning.study import (
    Budget,
    Tuner,
    enqueue_first,
    open_study,
    storage_for,
    threads_per_trial,
    work_until_done,
)
from pipeline.tuning.trial_run import TrialCommand


def say(message: str) -> None:
    print(f"[tune] {message}", flush=True)


@dataclass(frozen=True)
class TuneRequest:
    config: str
    overrides: tuple[str, ...]
    space: str
    trials: int | None  # None: every candidate of a list of candidates
    workers: int
    study: str
    dir: Path
    storage: str | None
    timeout_s: float | None
    pruner: str
    seed: int
    final_seeds: tuple[int, ...]
    folds: int | None
    cfg: Config  # the config with the user's overrides, loaded once: the folds, threads and baseline read it
    script: Path  # launch/train.py, which each trial's run starts
    index: int = 0
    processes: int = 1  # ranks of each trial's run
    refit: bool = True  # the winner's final runs train on train + val where the trials cross-validated

    @classmethod
    def from_args(cls, args, script: Path) -> "TuneRequest":
        if (args.trials is not None and args.trials < 1) or args.workers < 1 or args.processes < 1:
            raise ConfigError(f"--trials ({args.trials}), --workers ({args.workers}) and --processes ({args.processes}) "
                              "must be at least 1")
        if args.timeout is not None and not args.timeout > 0:
            raise ConfigError(f"--timeout ({args.timeout}) must be a positive number of seconds")
        seeds = final_seeds(args.final_seeds) if args.index == 0 else ()
        cfg = load_config(args.config, args.overrides)  # a bad config or override is said before any trial
        study = args.study or f"{Path(args.config).stem}-{Path(cfg.data.dir).name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
            raise ConfigError(f"--study {study!r}: a study's name is letters, digits, '_', '.' and '-'")
        # Every trial's run would refuse a batch its ranks cannot share: said once, before the study starts.
        BatchLayout.make(cfg.train.global_batch_size, cfg.train.batch_size, args.processes, what=" (--processes)")
        if args.folds is not None and args.folds < 1:
            raise ConfigError(f"--folds ({args.folds}) must be at least 1 (1: the data set's own validation split)")
        return cls(args.config, tuple(args.overrides), args.space, args.trials, args.workers, study,
                   Path(args.dir or f"runs/tune/{study}"), args.storage, args.timeout, args.pruner, args.seed, seeds,
                   args.folds, cfg, script, args.index, args.processes, not args.no_refit)


def _folds(request: TuneRequest) -> list[Path | None]:
    """The data each trial trains on: the data set's own split ([None]), or k folds of its train and val
    (folds.py). A study chooses on validation: a data set without a val split would evaluate on test."""
    cfg = request.cfg
    if cfg.data.base_url is not None:
        return [None]  # the trials check the split on the server's manifest
    manifest = load_manifest(cfg.data.dir, cfg.data.dataset)
    if "val" not in manifest.splits or cfg.eval.split != "val":
        raise ConfigError(f"a study chooses on the validation split, and {cfg.data.dir} has splits "
                          f"{', '.join(manifest.splits)} with eval.split {cfg.eval.split}: prepare it with a validation "
                          "split (prepare_data.py --force --val-size) and evaluate on val")
    folds = fold_count(request.folds, manifest)
    return [None] if folds == 1 else list(prepare_folds(cfg.data.dir, request.dir, folds, request.seed, say))


def _refit(request: TuneRequest, folds: list[Path | None]) -> Path | None:
    """The data the winner's final runs train on instead of best.yaml's: train + val where the trials
    cross-validated (the study chose on all those cases, so the winner learns from all of them). Not where it
    chose on the data set's own val split (the final runs train as its trials did), with --no-refit, or where
    the winner keeps its best evaluation (eval.keep_best chooses on val, which the refit trains on)."""
    if folds == [None] or not request.refit:
        return None
    if load_config(request.dir / "best.yaml").eval.keep_best:
        say("the winner keeps its best evaluation (eval.keep_best), which needs validation cases it does not train "
            "on: its final runs train on the train split alone")
        return None
    return prepare_refit(request.cfg.data.dir, request.dir, say)


def _commands(request: TuneRequest) -> list[TrialCommand]:
    """One per worker: its runs' threads (the usable CPUs shared by every process of every worker, unless the
    config says) and GPUs (one a process; one process a worker may share a GPU with another worker)."""
    from pipeline.distributed.cpu_threads import usable_cpus

    workers, processes = request.workers, request.processes
    gpus = _gpus()
    if processes > 1 and gpus and len(gpus) < workers * processes:
        raise ConfigError(f"--workers {workers} x --processes {processes} needs {workers * processes} GPUs, one a "
                          f"process, and {len(gpus)} are visible: ask for fewer workers or processes")
    threads = request.cfg.train.cpu_threads or threads_per_trial(usable_cpus(), workers * processes)

    def own(i: int) -> str | None:
        if not gpus:
            return None
        return ",".join(gpus[(i * processes + j) % len(gpus)] for j in range(processes))

    return [TrialCommand(request.config, request.overrides, request.study, request.script, threads, own(i), processes,
                         request.cfg.train.mixed_precision) for i in range(workers)]


def _gpus() -> list[str]:
    """The GPUs this tuner may use, as its runs' CUDA_VISIBLE_DEVICES names them: the tuner's own list where it
    was given one (indices or UUIDs), so that a tuner started on GPUs 2 and 3 keeps its runs there."""
    import torch

    if not torch.cuda.is_available():
        return []
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = torch.cuda.device_count()
    return given[:count] if given else [str(i) for i in range(count)]


def _on_signals(stop: threading.Event, halt: threading.Event) -> None:
    def handle(signum, frame) -> None:
        if not stop.is_set():
            say(f"{signal.Signals(signum).name}: stopping the running trials (each checkpoints); start the same "
                "command again to go on")
        stop.set()
        halt.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handle)


def tune(request: TuneRequest) -> int:
    space: SearchSpace = load_space(request.space, request.config, list(request.overrides))
    trials = space.study_size(request.trials)
    commands = _commands(request)
    folds = _folds(request)
    study = open_study(request.study, storage_for(request.storage, request.dir), request.seed, request.pruner,
                       request.index, trials, len(folds))
    queued = enqueue_first(study, space, space.of(request.cfg), trials, request.dir, request.index)
    if queued:
        say(queued)
    say(f"study {request.study} in {request.dir}: {trials} trials, {request.workers} worker(s) of "
        f"{request.processes} process(es) of {commands[0].threads} thread(s)"
        f"{', GPUs ' + ' '.join(c.gpus for c in commands) if commands[0].gpus else ''}, "
        f"{len(space.params)} parameters, pruner {request.pruner}")
    tuner = Tuner(study, space, commands, request.dir, Budget(trials, request.timeout_s, time.monotonic()),
                  folds, say)
    _on_signals(tuner.stop, tuner.halt)
    work_until_done(tuner)
    if tuner.stop.is_set():
        say(f"stopped; {request.dir} keeps every trial. Run the same command again to continue")
        return 130
    if request.index != 0:
        say("the study is done; tuner 0 writes the report and trains the winner")
        return 0
    report = write_report(study, space, request.config, list(request.overrides), request.dir)
    best = report["best"]
    say(f"{report['trials']} trials ({report['complete']} complete, {report['pruned']} pruned, {report['failed']} "
        f"failed, {report['interrupted']} interrupted and queued to continue); the best, trial {best['number']}: validation accuracy {best['val_accuracy']:.4f}; "
        f"{report['best_config']} holds it")
    if request.final_seeds:
        final = train_final(commands, request.dir, best["number"], list(request.final_seeds), tuner.stop, say,
                            _refit(request, folds))
        if final["test_mean"] is not None:
            say(f"test accuracy of the winner over seeds {list(request.final_seeds)}: {final['test_mean']:.4f} "
                f"(std {final['test_std']:.4f}); {request.dir / 'final.json'}")
        if not final["complete"]:
            return 1
    return 0
