"""Median against Hyperband, measured on studies that ran: their complete trials replayed under each pruner.

    python benchmarks/pruner_replay.py --studies runs/tune-archive/studies/* \\
        --out benchmarks/results/cpu-pruner-replay.json

Every complete trial of a study reported its validation accuracy at each twentieth of each fold's run
(launch/tune.py). Replayed in the order they ran, through a fresh Optuna study with the pruner as
launch/tune.py builds it (`pruner_for`, the same warm-up, the same folds), each trial stops where the
pruner would have stopped it. Per pruner and study: the share of the trials' runs still trained, and
whether the winner (the best complete trial) and the top three survive. No training is run: the figures
are exact for these curves. Two limits: trials the study itself pruned are not replayed (their curves
stop early), and the replay is sequential where the study ran two workers at once.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from benchmarks.common import say
from pipeline.tuning.study import storage_for
from pipeline.tuning.trial_run import GRID

PRUNERS = ("median", "hyperband")


def complete_curves(study_dir: Path) -> list[tuple[dict[int, float], float]]:
    """(intermediate values by progress, final value) of a study's complete trials, in the order they ran."""
    storage = storage_for(None, study_dir)
    (summary,) = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return [(dict(t.intermediate_values), t.value) for t in sorted(done, key=lambda t: t.datetime_start)]


def replay(curves: list[tuple[dict[int, float], float]], pruner: str, folds: int) -> list[int | None]:
    """The progress at which each trial is stopped under `pruner` (None: it runs to the end)."""
    from pipeline.tuning.study import pruner_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner_for(pruner, folds),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    stops: list[int | None] = []
    for values, final in curves:
        trial = study.ask()
        stop = None
        for step in sorted(values):
            trial.report(values[step], step)
            if trial.should_prune():
                stop = step
                break
        study.tell(trial, state=TrialState.PRUNED) if stop is not None else study.tell(trial, final)
        stops.append(stop)
    return stops


def measure(study_dir: Path) -> dict:
    curves = complete_curves(study_dir)
    folds = max(1, math.ceil((max(max(v) for v, _ in curves) + 1) / GRID))
    full = GRID * folds
    ranked = sorted(range(len(curves)), key=lambda i: -curves[i][1])
    out = {"complete_trials": len(curves), "folds": folds, "winner_value": curves[ranked[0]][1]}
    for pruner in PRUNERS:
        stops = replay(curves, pruner, folds)
        kept = [i for i, s in enumerate(stops) if s is None]
        out[pruner] = {
            "pruned": len(curves) - len(kept),
            "share_of_runs_trained": round(sum(full if s is None else s + 1 for s in stops) / (full * len(curves)), 3),
            "winner_kept": ranked[0] in kept,
            "top3_kept": sum(i in kept for i in ranked[:3]),
            "best_kept_value": max((curves[i][1] for i in kept), default=None),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", required=True, type=Path, help="study directories (launch/tune.py --dir)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    results = {}
    for study_dir in args.studies:
        results[study_dir.name] = r = measure(study_dir)
        say(f"{study_dir.name}: {r['complete_trials']} complete trials; " + "; ".join(
            f"{n} prunes {r[n]['pruned']}, trains {r[n]['share_of_runs_trained']:.0%} of the runs, winner "
            f"{'kept' if r[n]['winner_kept'] else 'lost'}, top 3 kept {r[n]['top3_kept']}" for n in PRUNERS))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
