"""launch/tune.py as a user runs it, on FSDD with short runs: a study stopped by SIGTERM goes on where it
stopped when started again (the interrupted trial continues from its checkpoint), the winner is trained
with the final seeds and read on test once each; two tuners on one journal finish one study between them,
no trial run twice."""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import PLAIN_LSTM, ROOT, free_port

from pipeline.config import load_config

pytestmark = pytest.mark.slow

COMMON = ("wandb.mode=disabled", *PLAIN_LSTM, "model.bidirectional=false", "model.hidden_size=16",
          "train.epochs=null", "train.min_steps=null", "train.max_steps=100", "eval.every_epochs=null",
          "eval.every_steps=50", "checkpoint.every_steps=10", "schedule.warmup_steps=5")


def _tune(data, space, study, *flags: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "tune.py"), "--config", str(ROOT / "configs" / "sequences.yaml"),
            f"data.dir={data}", *COMMON, *overrides, "--space", str(space), "--dir", str(study), "--folds", "1", "--pruner", "none",
            *flags]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    return path


def _trials(study) -> list[dict]:
    with open(study / "trials.csv") as f:
        return list(csv.DictReader(f))


def _stop_and_continue(argv: list[str], study: Path) -> None:
    """SIGTERM to the tuner once trial 0 has checkpointed, then the same command again: trial 1 continues it."""
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = study / "trials" / "0000" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoint.is_dir() and any(checkpoint.glob("step-*"))) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert "Run the same command again" in out
    stopped = (study / "logs" / "0000.log").read_text()
    assert "SIGTERM received: every rank stopped after step" in stopped, stopped[-3000:]

    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trial 1 (continued)" in again.stdout
    log = (study / "logs" / "0001.log").read_text()
    assert re.search(r"resumed from \S+step-\d+ at step [1-9]", log), log


def test_a_stopped_study_goes_on_where_it_stopped(fsdd_shards, space, tmp_path):
    study = tmp_path / "study"
    # Runs of 500 steps: an idle machine ran a 100-step run to its end between its first checkpoint and the
    # SIGTERM, and there was nothing left to continue.
    argv = _tune(fsdd_shards, space, study, "--trials", "2", "--final-seeds", "0",
                 overrides=("train.max_steps=500", "eval.every_steps=250"))
    _stop_and_continue(argv, study)
    rows = _trials(study)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "interrupted"), ("1", "complete"), ("2", "complete")]
    assert rows[0]["param:optim.lr"] == rows[1]["param:optim.lr"], "the interrupted trial's parameters continue"
    assert float(rows[0]["param:optim.lr"]) == 0.003, "trial 0 is the config as given (configs/sequences.yaml's lr)"
    assert [r["origin"] for r in rows] == ["the config as given", "the config as given", "drawn"], "kept when continued"
    assert not (study / "trials" / "0000").exists(), "its run directory went to the trial that continued it"

    best = load_config(study / "best.yaml")
    winner = max(rows[1:], key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
    assert best.optim.lr == pytest.approx(float(winner["param:optim.lr"]))
    assert best.eval.score_test, "best.yaml is a plain config: its runs are scored on test"
    final = json.loads((study / "final.json").read_text())
    assert final["complete"] and 0.0 < final["seeds"]["0"]["test_accuracy"] <= 1.0
    for trial in ("0001", "0002"):  # no trial read the test split
        summary = json.loads((study / "trials" / trial / "summary.json").read_text())
        assert summary["test_accuracy"] is None and summary["final_eval_accuracy"] is not None
    assert (study / "optimization_history.png").stat().st_size > 0
    wandb = yaml.safe_load((study / "trials" / "0001" / "config.yaml").read_text())["wandb"]
    assert (wandb["group"], wandb["name"]) == ("sequences-fsdd", "sequences-fsdd-trial-1")  # the study's default name


def test_a_trial_of_two_processes_is_one_run_of_two_ranks_that_stops_and_goes_on(fsdd_shards, space, tmp_path):
    """--processes 2: each run is accelerate launch with two ranks (gloo here), SIGTERM reaching both through
    the launcher; the continued trial and the winner's final run are two-rank runs too."""
    study = tmp_path / "study"
    argv = _tune(fsdd_shards, space, study, "--trials", "1", "--final-seeds", "0", "--processes", "2",
                 overrides=("train.max_steps=500", "eval.every_steps=250", "train.batch_size=16"))
    _stop_and_continue(argv, study)
    for run in (study / "trials" / "0001", study / "final" / "trial-0001" / "seed-0"):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 500, (run, summary)
    assert json.loads((study / "final.json").read_text())["complete"]


def test_a_list_of_candidates_runs_each_once_and_the_winner_is_one_of_them(fsdd_shards, tmp_path):
    """A recipe comparison: each candidate one trial with its own overrides, in the file's order; more trials
    than candidates is refused before any run."""
    space = tmp_path / "candidates.yaml"
    space.write_text("candidates:\n  - {name: narrow, overrides: [model.hidden_size=8]}\n"
                     "  - {name: slow, overrides: [optim.lr=0.0003], why: a learning rate too small for 100 steps}\n")
    study = tmp_path / "study"
    proc = subprocess.run(_tune(fsdd_shards, space, study, "--trials", "3"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "lists 2 candidates" in proc.stderr and not study.exists()
    proc = subprocess.run(_tune(fsdd_shards, space, study, "--final-seeds", ""), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _trials(study)
    assert [(r["number"], r["state"], r["param:candidate"]) for r in rows] == [
        ("0", "complete", "narrow"), ("1", "complete", "slow")]
    assert load_config(study / "trials" / "0000" / "config.yaml").model.hidden_size == 8
    assert load_config(study / "trials" / "0001" / "config.yaml").optim.lr == 0.0003
    winner = max(rows, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
    best = load_config(study / "best.yaml")
    assert (best.model.hidden_size, best.optim.lr) == ((8, 0.003) if winner["param:candidate"] == "narrow" else (16, 0.0003))


def test_a_cross_validated_winner_trains_on_every_case_the_folds_held(fsdd_shards, space, tmp_path):
    """--folds 2: the trials train on folds of train + val, and the winner's final run on all of it (a refit),
    evaluating nothing before its one test."""
    study = tmp_path / "study"
    proc = subprocess.run(_tune(fsdd_shards, space, study, "--trials", "1", "--final-seeds", "0", "--folds", "2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the winner trains on the train and val cases" in proc.stdout
    run = study / "final" / "trial-0000-refit" / "seed-0"
    assert load_config(run / "config.yaml").data.dir == str(study / "folds" / "refit")
    final = json.loads((study / "final.json").read_text())
    assert final["trained_on"] == "train and val" and final["complete"]
    assert final["seeds"]["0"]["val_accuracy"] is None and 0.0 < final["seeds"]["0"]["test_accuracy"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_split"] == "none" and summary["evals"] == 0
    assert load_config(study / "best.yaml").data.dir == str(fsdd_shards), "best.yaml stays the user's config"


def _two_tuners(data, space, tmp_path, *flags: str, dirs: tuple[str, str] = ("study", "study")) -> None:
    """Two tune.py processes on one study of 3 trials: each runs some, none runs one the other ran."""
    procs = [subprocess.Popen(_tune(data, space, tmp_path / d, "--trials", "3", "--final-seeds", "", "--study", "shared",
                                    "--index", str(i), *flags), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, d in enumerate(dirs)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    ran = [set(re.findall(r"\[tune\] trial (\d+): validation accuracy", out)) for out in outs]
    assert ran[0] and ran[1], f"each tuner ran trials: {ran}"
    assert not ran[0] & ran[1], f"no trial run by both: {ran}"
    numbers = sorted(int(n) for n in ran[0] | ran[1])
    assert 3 <= len(numbers) <= 4 and numbers == list(range(len(numbers)))  # at most one over: two asked at once
    for n, d in [(n, d) for n in numbers for d in set(dirs)]:
        log = tmp_path / d / "logs" / f"{n:04d}.log"
        assert not log.exists() or log.read_text().count("[train] done") == 1, log.read_text()


def test_two_tuners_on_one_journal_finish_one_study_between_them(fsdd_shards, space, tmp_path):
    _two_tuners(fsdd_shards, space, tmp_path)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server of Debian's package, on a free port, for this module; skipped only where it
    is not installed or cannot start as its own user (CI sets PIPELINE_REQUIRE_POSTGRES=1: there a skip fails)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    problem = ("PostgreSQL is not installed (make test installs it as root with apt)" if not bins else
               "the server is started as the postgres user, which needs root" if os.geteuid() != 0 else None)
    if problem:
        if os.environ.get("PIPELINE_REQUIRE_POSTGRES") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    user = pwd.getpwnam("postgres")
    base = Path(tempfile.mkdtemp(prefix="tune-pg-"))  # not under pytest's root-only temp: the server's user reads it
    os.chown(base, user.pw_uid, user.pw_gid)
    port, as_postgres = free_port(), ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(bins[-1] / "initdb"), "-D", str(base / "data"), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    ctl = [*as_postgres, str(bins[-1] / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log")]
    subprocess.run([*ctl, "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "-w", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run([*as_postgres, str(bins[-1] / "createdb"), "-h", "127.0.0.1", "-p", str(port), "tune"], check=True,
                       capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_two_tuners_on_two_machines_share_one_study_in_postgresql(fsdd_shards, space, tmp_path, postgres):
    """Each tuner with a study directory of its own, as on two machines: the database alone is shared."""
    _two_tuners(fsdd_shards, space, tmp_path, "--storage", postgres, dirs=("machine-a", "machine-b"))


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_a_storage_that_does_not_answer_is_one_paragraph_without_its_password(fsdd_shards, space, tmp_path, given):
    """The URL comes from --storage or, as a Kubernetes Secret hands it over, from $OPTUNA_STORAGE."""
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/tune"
    flags, env = (["--storage", url], None) if given == "flag" else ([], {**os.environ, "OPTUNA_STORAGE": url})
    proc = subprocess.run(_tune(fsdd_shards, space, tmp_path / "s", "--trials", "1", *flags), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --storage postgresql://***@127.0.0.1")
    assert "hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_a_tuner_killed_outright_leaves_no_run_training_on(fsdd_shards, space, tmp_path):
    """SIGKILL gives the tuner no chance to stop its runs: each run is told by the kernel instead (it
    checkpoints and exits), so no orphan trains on for a study nobody reads."""
    import psutil

    argv = _tune(fsdd_shards, space, tmp_path / "study", "--trials", "1", overrides=("train.max_steps=100000",))
    tuner = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (runs := psutil.Process(tuner.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs, "the tuner started no run"
    tuner.kill()
    tuner.wait()
    gone, alive = psutil.wait_procs(runs, timeout=60)
    assert not alive, f"runs still training after their tuner was killed: {alive}"
