"""The study's bookkeeping (pipeline/tuning/study.py, report.py, folds.py) on a real journal file: the budget,
a lost worker's trial continued once, the winner's tie going to the lower loss, the folds. And one real
study in process whose hopeless trial (a learning rate of 1e-5) is pruned at its evaluations."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import optuna
import pytest
from conftest import PLAIN_LSTM, ROOT
from optuna.trial import TrialState, create_trial

from pipeline.data.manifest import load_manifest
from pipeline.data.store import ShardStore, load_split_arrays
from pipeline.tuning.folds import assign, prepare_folds, prepare_refit
from pipeline.tuning.report import winner
from pipeline.tuning.space import load_space
from pipeline.tuning.study import (
    HEARTBEAT,
    INTERRUPTED,
    RESUME_FROM,
    STALE_S,
    Budget,
    Tuner,
    open_study,
    pooled,
    pruner_for,
    storage_for,
    val_cases,
)
from pipeline.tuning.trial_run import GRID, Outcome, TrialCommand, planned_steps, progress

FLOAT = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)

TRAIN = ROOT / "launch" / "train.py"


def _journal_study(tmp_path, name="s"):
    return open_study(name, storage_for(None, tmp_path), seed=0, pruner="none")


def _tuner(study, tmp_path, trials=4, folds=(None,)):
    space = load_space(_space(tmp_path), ROOT / "configs" / "sequences.yaml", [])
    return Tuner(study, space, [], tmp_path, Budget(trials), list(folds), say=lambda line: None)


def _space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}\n")
    return path


def test_the_winner_of_a_tie_is_the_lower_validation_loss(tmp_path):
    study = _journal_study(tmp_path)
    for lr, acc, loss in [(1e-3, 0.9, 0.40), (2e-3, 0.9, 0.25), (3e-3, 0.8, 0.10), (4e-3, 0.9, 0.31)]:
        study.add_trial(create_trial(value=acc, params={"optim.lr": lr}, distributions={"optim.lr": FLOAT},
                                     user_attrs={"val_loss": loss}))
    assert winner(study).params == {"optim.lr": 2e-3}


def test_the_budget_counts_ended_trials_but_not_interrupted_ones(tmp_path):
    study = _journal_study(tmp_path)
    budget = Budget(trials=3)
    study.add_trial(create_trial(value=0.5, params={}, distributions={}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs={INTERRUPTED: True}))
    assert budget.open(study)
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs={"error": "crashed"}))
    assert not budget.open(study), "a crashed trial spends the budget: it is not run again"
    assert not Budget(trials=10, timeout_s=1.0, started=time.monotonic() - 2).open(study)


def test_a_trial_whose_worker_went_quiet_is_continued_once(tmp_path):
    """Two tuners (two workers' views of one journal) find the same stale trial: one queues it again."""
    study = _journal_study(tmp_path)
    lost = study.ask({"optim.lr": FLOAT})
    study._storage.set_trial_system_attr(lost._trial_id, HEARTBEAT, time.time() - STALE_S - 5)
    alive = study.ask({"optim.lr": FLOAT})
    study._storage.set_trial_system_attr(alive._trial_id, HEARTBEAT, time.time())
    other = open_study("s", storage_for(None, tmp_path), seed=0, pruner="none")
    _tuner(study, tmp_path).recover_lost()
    _tuner(other, tmp_path).recover_lost()

    trials = study.get_trials()
    assert trials[lost.number].state == TrialState.FAIL and trials[lost.number].user_attrs[INTERRUPTED]
    assert "no heartbeat" in trials[lost.number].user_attrs["error"]
    assert trials[alive.number].state == TrialState.RUNNING
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs[RESUME_FROM] == lost.number
    assert waiting[0].system_attrs["fixed_params"] == trials[lost.number].params


def test_a_trial_that_cannot_run_is_failed_with_why_and_the_worker_goes_on(tmp_path):
    """Queued parameters outside today's space (it was edited between two runs of a study): that trial fails
    with the reason, and the worker is not lost with it."""
    study = _journal_study(tmp_path)
    study.enqueue_trial({"optim.lr": 0.5})  # the space's range ends at 0.1
    tuner = _tuner(study, tmp_path, trials=1)
    tuner.say = print
    tuner.work(TrialCommand("unused.yaml", (), "s", TRAIN, threads=1))
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and "0.5" in trial.user_attrs["error"]


def test_folds_are_stratified_balanced_and_each_case_validates_once(fsdd_shards, tmp_path):
    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    fold = assign(labels, 3, seed=0)
    assert sorted(np.bincount(fold)) == [8, 8, 9]
    for label in range(4):
        counts = np.bincount(fold[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold, assign(labels, 3, seed=0))

    dirs = prepare_folds(str(fsdd_shards), tmp_path, 3, seed=0, say=lambda line: None)
    source = json.loads((fsdd_shards / "manifest.json").read_text())
    pooled = source["splits"]["train"]["num_samples"] + source["splits"]["val"]["num_samples"]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in dirs]
    assert all(set(m["splits"]) == {"train", "val"} for m in manifests), "the test split is not copied"
    assert sum(m["splits"]["val"]["num_samples"] for m in manifests) == pooled
    assert all(m["splits"]["train"]["num_samples"] + m["splits"]["val"]["num_samples"] == pooled for m in manifests)
    assert {m["dataset"] for m in manifests} == {source["dataset"]}
    assert [val_cases(d) for d in dirs] == [m["splits"]["val"]["num_samples"] for m in manifests]


def test_the_refit_trains_on_train_and_val_and_holds_test_as_prepared(fsdd_shards, tmp_path):
    """The winner's final runs of a cross-validated study train on every case the folds held; the test
    split is the prepared one, case for case, and no case is held out as val (the runs evaluate nothing)."""
    target = prepare_refit(str(fsdd_shards), tmp_path, say=lambda line: None)
    source, refit = load_manifest(fsdd_shards, None), load_manifest(target, None)
    assert set(refit.splits) == {"train", "test"}
    arrays = {(name, split): load_split_arrays(m, ShardStore(d), split)
              for name, m, d in (("source", source, fsdd_shards), ("refit", refit, target))
              for split in ("train", "val", "test") if split in m.splits}
    ours, theirs = arrays["refit", "test"], arrays["source", "test"]
    assert all(np.array_equal(a, b) for a, b in zip(ours[:3], theirs[:3], strict=True))  # values, lengths, labels
    trained = arrays["refit", "train"][2]
    held = np.concatenate([arrays["source", "train"][2], arrays["source", "val"][2]])
    assert np.array_equal(np.bincount(trained), np.bincount(held)), "train + val, each case once"
    assert refit.class_names == source.class_names and refit.dataset == source.dataset
    made = (target / "manifest.json").stat().st_mtime_ns
    assert prepare_refit(str(fsdd_shards), tmp_path, say=lambda line: None) == target
    assert (target / "manifest.json").stat().st_mtime_ns == made, "made once per study"


def test_folds_score_as_one_validation_so_equal_cases_tie_and_the_loss_breaks_it(tmp_path):
    """OSULeaf's folds hold 67, 67 and 66 cases: 58 + 59 + 58 and 58 + 58 + 59 right are the same 175 of 200,
    which a mean of the folds' accuracies scores 0.87502 and 0.87509, above the lower loss."""
    cases = [67, 67, 66]

    def trial(right, losses):
        return pooled([Outcome("complete", r / n, loss) for r, n, loss in zip(right, cases, losses, strict=True)], cases)

    first, second = trial([58, 59, 58], [0.5, 0.5, 0.4]), trial([58, 58, 59], [0.4, 0.4, 0.4])
    assert first.value == second.value == 175 / 200
    assert second.loss == pytest.approx(0.4) and first.loss == pytest.approx((0.5 * 134 + 0.4 * 66) / 200)
    assert first.summary["folds"] == [58 / 67, 59 / 67, 58 / 66]
    study = _journal_study(tmp_path)
    for lr, outcome in [(1e-3, first), (2e-3, second)]:
        study.add_trial(create_trial(value=outcome.value, params={"optim.lr": lr}, distributions={"optim.lr": FLOAT},
                                     user_attrs={"val_loss": outcome.loss}))
    assert winner(study).params == {"optim.lr": 2e-3}


# 20 evaluations in runs of 1,000 steps: with the pruner's warm-up the hopeless trial is pruned at 35% of its
# run, and a run of 200 steps (5 s on an idle machine) once ended before the SIGTERM that pruned it arrived.
COMMON = ("data.dir={data}", "wandb.mode=disabled", *PLAIN_LSTM, "model.bidirectional=false",
          "model.hidden_size=16", "train.epochs=null", "train.min_steps=null", "train.max_steps=1000",
          "eval.every_epochs=null", "eval.every_steps=50", "checkpoint.every_steps=500", "schedule.warmup_steps=5")


def test_progress_is_the_share_of_the_run_in_twentieths(tmp_path):
    assert planned_steps(tmp_path) is None, "before the run has written its length"
    (tmp_path / "resolved.yaml").write_text("model.frame: 4\ntrain.max_steps: 600\n")
    total = planned_steps(tmp_path)
    assert [progress(s, total) for s in (1, 29, 30, 31, 300, 599, 600)] == [0, 0, 1, 1, 10, 19, 20]


@pytest.mark.parametrize("name", ["median", "hyperband"])
def test_no_trial_is_pruned_in_the_first_30_percent_of_its_first_run(name):
    """Three finished trials near 0.9 from their first evaluation; a slow starter at 0.3 is left alone until
    30% of its run (a pruner without warm-up stopped 37 of 40 ArrowHead trials at their tenth step of 600)."""
    study = optuna.create_study(direction="maximize", pruner=pruner_for(name, folds=1))
    for _ in range(3):
        done = study.ask()
        for at in range(1, GRID + 1):
            done.report(0.9, at)
        study.tell(done, 0.9)
    slow = study.ask()
    verdicts = []
    for at in range(1, GRID + 1):
        slow.report(0.3, at)
        verdicts.append(slow.should_prune())
    assert verdicts[:6] == [False] * 6, verdicts
    # The median pruner then stops it; Hyperband compares within its bracket, which three trials may not fill.
    assert any(verdicts[6:]) or name == "hyperband", verdicts


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_at_its_evaluations_and_a_crash_is_recorded(fsdd_shards, tmp_path):
    """Real runs on FSDD: a good trial first, then one at a learning rate of 1e-5 (the model stays near chance),
    which the median pruner stops before its run ends; then one whose data set name is wrong, which fails
    with the trainer's own message and is not run again."""
    overrides = tuple(o.format(data=fsdd_shards) for o in COMMON)
    space = load_space(_space(tmp_path), ROOT / "configs" / "sequences.yaml", list(overrides))
    storage = storage_for(None, tmp_path)
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize",
                                pruner=pruner_for("median", folds=1, startup=1))
    study.enqueue_trial({"optim.lr": 3e-3})
    study.enqueue_trial({"optim.lr": 1e-5})
    command = TrialCommand(str(ROOT / "configs" / "sequences.yaml"), overrides, "p", TRAIN, threads=2)
    tuner = Tuner(study, space, [command], tmp_path, Budget(2, started=time.monotonic()), [None], say=print)
    tuner.work(command)
    good, hopeless = study.get_trials()
    assert good.state == TrialState.COMPLETE and good.value > 0.3
    assert hopeless.state == TrialState.PRUNED
    assert 7 <= hopeless.last_step < GRID, "pruned after the warm-up (30% of its run) and before its end"
    stopped = tmp_path / "trials" / "0001" / "summary.json"  # a run stopped by SIGTERM is paused, not finished
    assert not stopped.exists() or json.loads(stopped.read_text())["steps"] < 1000

    bad = TrialCommand(command.config, (*overrides, "data.dataset=not-fsdd"), "p", TRAIN, threads=2)
    Tuner(study, space, [bad], tmp_path, Budget(3, started=time.monotonic()), [None], say=print).work(bad)
    crashed = study.get_trials()[2]
    assert crashed.state == TrialState.FAIL and not crashed.user_attrs.get(INTERRUPTED)
    assert "exited 2" in crashed.user_attrs["error"] and "not-fsdd" in crashed.user_attrs["error"]
    assert len(study.get_trials()) == 3, "a crashed trial is not retried"
    assert threading.active_count() >= 1


def test_a_run_that_lost_its_port_is_run_again_and_a_crash_is_not(tmp_path):
    """Another worker's launch can take the free port a run was given before its ranks bind it: the trial is
    queued to run again, where a run that crashed on its own is a failed trial."""
    import subprocess
    import sys

    from pipeline.tuning.trial_run import _finished

    log = tmp_path / "run.log"
    for text, state in [("torch.distributed.DistNetworkError: ... port: 29500, useIpv6: false, code: -98, name: "
                         "EADDRINUSE, message: address already in use", "interrupted"),
                        ("ValueError: model.hidden_size must be positive", "failed")]:
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", f"import sys; print({text!r}); sys.exit(1)"], stdout=f)
            proc.wait()
        outcome = _finished(proc, tmp_path / "out", log)
        assert outcome.state == state and text in outcome.error
