"""benchmarks/select_recipe.py: the recipe is chosen on validation, and only the chosen one's
runs are read on test. Real training runs of configs/cpu_test.yaml, a few dozen steps each."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, run_py

from benchmarks.select_recipe import choose, load_spec
from pipeline.config import load_config


def _spec(path, *candidates):
    lines = ["candidates:"]
    for name, overrides in candidates:
        lines += [f"  - name: {name}", "    config: configs/cpu_test.yaml", f"    overrides: [{', '.join(overrides)}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


COMMON = ("train.max_steps=40", "eval.every_steps=20", "checkpoint.every_steps=20", "schedule.warmup_steps=5")


@pytest.mark.slow
def test_chosen_on_validation_and_only_the_winner_is_scored_on_test(tmp_path, fashion_shards):
    # A learning rate of 1e-7 leaves the model at chance: the other candidate must win on validation.
    spec = _spec(tmp_path / "spec.yaml", ("frozen", ["optim.lr=1e-7", *COMMON]), ("learns", list(COMMON)))
    proc = run_py("benchmarks/select_recipe.py", "--spec", str(spec), "--data", str(fashion_shards), "--work",
                  str(tmp_path / "work"), "--seeds", "0,1", "--parallel", "2", check=True, timeout=600)
    report = json.loads((tmp_path / "work" / "selection.json").read_text())
    assert report["winner"] == "learns" and "Chosen on validation: learns" in proc.stdout
    assert set(report["val_by_candidate"]) == {"frozen", "learns"}
    assert report["val_by_candidate"]["learns"]["mean"] > report["val_by_candidate"]["frozen"]["mean"] + 0.2
    assert len(report["runs"]) == 4 and all(r["finished"] and r["exit_code"] == 0 for r in report["runs"])
    # The losers' test scores exist on disk (the trainer always scores test) but are never read.
    for run in report["runs"]:
        assert ("test_accuracy" in run) == (run["candidate"] == "learns"), run
    tests = []
    for seed in (0, 1):
        run_dir = tmp_path / "work" / f"learns-seed{seed}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == seed
        tests.append(json.loads((run_dir / "summary.json").read_text())["test_accuracy"])
    assert report["winner_test"]["values"] == tests
    assert report["winner_test"]["mean"] == pytest.approx(sum(tests) / 2, abs=1e-5)
    # The validation figure is the run's final one, on the weights it ships.
    val = json.loads((tmp_path / "work" / "learns-seed0" / "summary.json").read_text())["final_eval_accuracy"]
    assert report["winner_runs"][0]["val_accuracy"] == val
    # benchmarks/model_table.py reports every candidate's test beside its validation, and chooses on validation
    out = tmp_path / "table.json"
    proc = run_py("benchmarks/model_table.py", "--work", str(tmp_path / "work"), "--out", str(out), check=True)
    table = json.loads(out.read_text())
    assert table["chosen"] == "learns" and "frozen" in proc.stdout
    assert table["sets"]["work"]["learns"]["test"] == tests


@pytest.mark.slow
def test_the_deadline_stops_runs_which_report_their_last_validation(tmp_path, fashion_shards):
    spec = _spec(tmp_path / "spec.yaml", ("long", ["train.max_steps=100000", "eval.every_steps=10", "checkpoint.every_steps=1000"]))
    proc = run_py("benchmarks/select_recipe.py", "--spec", str(spec), "--data", str(fashion_shards), "--work",
                  str(tmp_path / "work"), "--seeds", "0", "--deadline-s", "20", timeout=300)
    assert proc.returncode == 1 and "nothing chosen" in proc.stdout
    run = json.loads((tmp_path / "work" / "selection.json").read_text())["runs"][0]
    assert run["finished"] is False and run["exit_code"] == 143  # SIGTERM: the trainer checkpointed and left
    assert run["val_accuracy"] is not None and run["last_eval_step"] >= 10
    assert list((tmp_path / "work" / "long-seed0" / "checkpoints").iterdir())


def test_a_spec_without_a_config_is_one_line(tmp_path, fashion_shards):
    spec = tmp_path / "spec.yaml"
    spec.write_text("candidates:\n  - name: a\n    overrides: [train.max_steps=5]\n")
    proc = run_py("benchmarks/select_recipe.py", "--spec", str(spec), "--data", str(fashion_shards), "--work", str(tmp_path / "w"))
    assert proc.returncode != 0 and "candidates[0]" in proc.stderr and "`config`" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "benchmarks" / "recipes").glob("*.yaml")))
def test_shipped_candidate_specs_load(spec):
    candidates = load_spec(ROOT / "benchmarks" / "recipes" / spec)
    assert len(candidates) >= 1 and all(c.why for c in candidates)


def test_a_bad_override_is_refused_before_any_run(tmp_path):
    spec = _spec(tmp_path / "spec.yaml", ("ok", ["train.max_steps=50"]), ("typo", ["model.hiden_size=64"]))
    with pytest.raises(SystemExit) as err:
        load_spec(spec)
    assert "candidate typo" in str(err.value) and "hiden_size" in str(err.value)


@pytest.mark.slow
def test_stopping_the_selection_stops_its_runs_with_a_checkpoint(tmp_path, fashion_shards):
    import signal
    import subprocess
    import sys
    import time

    spec = _spec(tmp_path / "spec.yaml", ("long", ["train.max_steps=100000", "eval.every_steps=10", "checkpoint.every_steps=1000"]))
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "benchmarks/select_recipe.py", "--spec", str(spec), "--data", str(fashion_shards),
                             "--work", str(work), "--seeds", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = work / "long-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and "eval/accuracy" in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "the selection was stopped: stopping long seed 0" in output
    # The run got SIGTERM too (it lives in a session of its own): it checkpointed and is gone.
    assert list((work / "long-seed0" / "checkpoints").iterdir())
    leftover = subprocess.run(["pgrep", "-f", f"output_dir={work}/long-seed0"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_a_tie_on_accuracy_goes_to_the_lower_validation_loss():
    val = {"a": {"mean": 1.0, "loss_mean": 0.05}, "b": {"mean": 1.0, "loss_mean": 0.02}, "c": {"mean": 0.99, "loss_mean": 0.001}}
    assert choose(val) == "b"
    assert choose({"a": val["a"], "c": val["c"]}) == "a", "accuracy first"
    assert choose({"a": val["a"], "n": {"mean": 1.0, "loss_mean": None}}) == "a", "a run that logged no loss loses ties"


@pytest.mark.slow
def test_each_seed_trains_on_its_own_hold_out_copy(tmp_path, examples):
    """Repeated hold-out: --data takes one prepared copy per seed, each with its own validation split."""
    copies = []
    for split_seed in (0, 1):
        copy = tmp_path / f"jv{split_seed}"
        run_py("launch/prepare_data.py", "--from", str(examples / "JapaneseVowels"), "--out", str(copy),
               "--split-seed", str(split_seed), "--val-size", "0.15", check=True)
        copies.append(copy)
    spec = tmp_path / "spec.yaml"
    spec.write_text("candidates:\n  - name: short\n    config: configs/sequences.yaml\n"
                    "    overrides: [train.min_steps=null, train.epochs=2, model.hidden_size=16, 'model.conv_channels=[8,8,8]']\n")
    work = tmp_path / "work"
    run_py("benchmarks/select_recipe.py", "--spec", str(spec), "--data", ",".join(map(str, copies)), "--work", str(work),
           "--seeds", "0,1", check=True, timeout=600)
    report = json.loads((work / "selection.json").read_text())
    assert report["data"] == {"0": str(copies[0]), "1": str(copies[1])}
    for seed in (0, 1):
        used = yaml.safe_load((work / f"short-seed{seed}" / "config.yaml").read_text())["data"]["dir"]
        assert used == str(copies[seed])
    assert report["val_by_candidate"]["short"]["loss_mean"] > 0
    proc = run_py("benchmarks/select_recipe.py", "--spec", str(spec), "--data", ",".join(map(str, copies)), "--work",
                  str(work), "--seeds", "0,1,2")
    assert proc.returncode == 2 and "2 data sets for 3 seeds" in proc.stderr


@pytest.mark.parametrize("config,spec,report", [
    ("configs/fsdd.yaml", "fsdd.yaml", "cpu-select-fsdd.json"),
    ("configs/japanese_vowels.yaml", "japanese_vowels.yaml", "cpu-select-jv.json"),
])
def test_a_tuned_recipe_is_its_selections_winner(config, spec, report):
    """The shipped recipe is configs/sequences.yaml with the winning candidate's overrides, nothing else
    (where it writes to and which data it reads aside), as the committed selection report says."""
    winner = json.loads((ROOT / "benchmarks" / "results" / report).read_text())["winner"]
    candidate = {c.name: c for c in load_spec(ROOT / "benchmarks" / "recipes" / spec)}[winner]
    shipped = load_config(ROOT / config).to_dict()
    chosen = load_config(ROOT / candidate.config, candidate.overrides).to_dict()
    for cfg in (shipped, chosen):
        cfg.pop("output_dir"), cfg["data"].pop("dir"), cfg["wandb"].pop("tags")
    assert shipped == chosen
