"""Median against Hyperband, measured on studies that ran: their complete trials replayed under each pruner.

    python benchmarks/pruner_replay.py --studies runs/tune-archive/studies/* \\
        --out benchmarks/results/cpu-pruner-replay.json

Every complete trial of a study reported its validation accuracy at each twentieth of each fold's run
(launch/tune.py). Replayed in the order they ran, through a fresh Optuna study with the pruner as
launch/tune.py builds it (`pruner_for`, the same warm-up, the same folds), each trial stops where the
pruner would have stopped it. Per pruner and study: the share of the trials' runs still trained, and
whether the winner (the best complete trial, ties to the lower validation loss as the study chose) and the
top three survive. No training is run. Two limits: trials the study itself pruned are not replayed (their
curves stop early), and the replay is sequential where the study ran two workers at once.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmarks.common import say
from pipeline.tuning.report import rank
from pipeline.tuning.study import pruner_for, storage_for
from pipeline.tuning.trial_run import GRID

PRUNERS = ("median", "hyperband")


def complete_curves(study_dir: Path) -> tuple[str, list[FrozenTrial]]:
    """The study's name and its complete trials that reported, in the order they ran."""
    if not (study_dir / "journal.log").is_file():
        raise SystemExit(f"error: {study_dir} holds no study journal (journal.log): pass launch/tune.py --dir folders")
    storage = storage_for(None, study_dir)
    summaries = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    if len(summaries) != 1:
        raise SystemExit(f"error: {study_dir}/journal.log holds {len(summaries)} studies; this replays one a journal")
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.intermediate_values]
    return summaries[0].study_name, sorted(done, key=lambda t: t.datetime_start)


def replay(name: str, trials: list[FrozenTrial], pruner: str, folds: int) -> list[int | None]:
    """The progress at which each trial is stopped under `pruner` (None: it runs to the end). The study's own
    name, since Hyperband puts a trial in a bracket by a hash of it and the trial's number."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner_for(pruner, folds),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    stops: list[int | None] = []
    for done in trials:
        trial = study.ask()
        stop = None
        for step, value in sorted(done.intermediate_values.items()):
            trial.report(value, step)
            if trial.should_prune():
                stop = step
                break
        study.tell(trial, state=TrialState.PRUNED) if stop is not None else study.tell(trial, done.value)
        stops.append(stop)
    return stops


def measure(study_dir: Path) -> dict | None:
    name, trials = complete_curves(study_dir)
    if not trials:
        return None
    # Fold k reports at k * GRID + 1 .. k * GRID + GRID: the last report is the folds' count times GRID
    folds = math.ceil(max(max(t.intermediate_values) for t in trials) / GRID)
    full = GRID * folds
    ranked = sorted(trials, key=rank, reverse=True)
    best = ranked[0]
    out = {"complete_trials": len(trials), "folds": folds, "winner_value": best.value}
    for pruner in PRUNERS:
        stops = replay(name, trials, pruner, folds)
        kept = [t.number for t, s in zip(trials, stops, strict=True) if s is None]
        out[pruner] = {
            "pruned": len(trials) - len(kept),
            "share_of_runs_trained": round(sum(full if s is None else s for s in stops) / (full * len(trials)), 3),
            "winner_kept": best.number in kept,
            "top3_kept": sum(t.number in kept for t in ranked[:3]),
            "best_kept_value": max((t.value for t in trials if t.number in kept), default=None),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", required=True, type=Path, help="study directories (launch/tune.py --dir)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    results = {}
    for study_dir in args.studies:
        r = measure(study_dir)
        if r is None:
            say(f"{study_dir.name}: no complete trial with reports, nothing to replay")
            continue
        results[study_dir.name] = r
        say(f"{study_dir.name}: {r['complete_trials']} complete trials; " + "; ".join(
            f"{n} prunes {r[n]['pruned']}, trains {r[n]['share_of_runs_trained']:.0%} of the runs, winner "
            f"{'kept' if r[n]['winner_kept'] else 'lost'}, top 3 kept {r[n]['top3_kept']}" for n in PRUNERS))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
