"""A data set too small, or prepared, to lack a split: training says at the start what it lacks (no test
score at the end), and refuses where there is nothing to evaluate on, quoting why the manifest says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_py, train_run

CONFIG = "configs/sequences.yaml"


def _npz(path: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), per_class)
    lengths = rng.integers(5, 12, len(labels))
    np.savez(path, X=rng.normal(size=(int(lengths.sum()), 3)).astype(np.float32), lengths=lengths, y=labels)
    return path


def _prepared(tmp_path: Path, per_class: int, *flags: str) -> Path:
    out = tmp_path / "data"
    run_py("launch/prepare_data.py", "--from", str(_npz(tmp_path / "cases.npz", per_class)), "--out", str(out), *flags,
           check=True)
    return out


@pytest.mark.slow
def test_no_test_split_is_said_at_the_start_and_the_run_ends_without_a_test_score(tmp_path):
    data = _prepared(tmp_path, 20, "--test-size", "0")
    proc = train_run(tmp_path / "run", data, "train.min_steps=4", "train.epochs=1", "wandb.mode=disabled", config=CONFIG)
    assert "warning: this dataset has no test split" in proc.stderr, proc.stderr
    assert "no test split to score" in proc.stdout and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["test_accuracy"] is None and (tmp_path / "run" / "model").is_dir()


def test_nothing_to_evaluate_on_is_refused_with_the_manifests_reason(tmp_path):
    data = _prepared(tmp_path, 1)  # one case per class: neither test nor val can be held out
    assert set(json.loads((data / "manifest.json").read_text())["splits"]) == {"train"}
    proc = train_run(tmp_path / "run", data, "wandb.mode=disabled", config=CONFIG, check=False)
    assert proc.returncode == 2 and "no validation or test split to evaluate on" in proc.stderr, proc.stderr
    assert "no case could be held out" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("setting, needle", [
    ("eval.keep_best=true", "has no val split, so training would evaluate on test"),
    ("eval.score_test=false", "the test split is not to be read, and"),
])
def test_what_needs_a_validation_split_is_refused_without_one_before_anything_is_written(tmp_path, setting, needle):
    """Without val, training evaluates on test: keep-best would choose the weights on the split it reports, and
    a run that must not read test (a tuning trial) would read it at every evaluation."""
    data = _prepared(tmp_path, 20, "--val-size", "0")
    assert "val" not in json.loads((data / "manifest.json").read_text())["splits"]
    proc = train_run(tmp_path / "run", data, setting, "wandb.mode=disabled", config=CONFIG, check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_final_model_on_every_case_evaluates_nothing_and_reads_test_once(tmp_path):
    """eval.split: none, on data prepared with --val-size 0: the same weights as a run that evaluated on test at
    every epoch (evaluations change no weight), no evaluation event, test scored once at the end."""
    from safetensors.torch import load_file

    data = _prepared(tmp_path, 20, "--val-size", "0")
    common = ("train.min_steps=12", "train.epochs=1", "train.batch_size=8", "train.global_batch_size=8",
              "train.cpu_threads=1", "wandb.mode=disabled")
    train_run(tmp_path / "seen", data, *common, config=CONFIG, check=True)
    blind = train_run(tmp_path / "blind", data, *common, "eval.split=none", config=CONFIG, check=True)
    assert "warning" not in blind.stderr and "no evaluation during training (eval.split: none)" in blind.stdout
    events = read_jsonl(tmp_path / "blind" / "metrics.jsonl")
    assert not any(key.startswith("eval") for e in events for key in e)
    assert sum("test/accuracy" in e for e in events) == 1
    summary, seen = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("blind", "seen"))
    assert summary["evals"] == 0 and summary["final_eval_accuracy"] is None and summary["best_eval_accuracy"] is None
    assert seen["evals"] >= 2 and summary["test_loss"] == seen["test_loss"]  # seen: one evaluation per epoch
    seen_w, blind_w = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("seen", "blind"))
    assert all(torch.equal(seen_w[k], blind_w[k]) for k in seen_w) and seen_w.keys() == blind_w.keys()


def test_keeping_the_best_of_no_evaluation_is_refused(tmp_path):
    data = _prepared(tmp_path, 20, "--val-size", "0")
    proc = train_run(tmp_path / "run", data, "eval.split=none", "eval.keep_best=true", "wandb.mode=disabled",
                     config=CONFIG, check=False)
    assert proc.returncode == 2 and "evaluates nothing to choose by" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("splits, warned", [
    (["train", "test"], None),
    (["train", "val", "test"], "whose cases are neither trained on nor evaluated"),
    (["train", "val"], "so the run ends without any score"),
])
def test_what_a_run_that_evaluates_nothing_says_before_it_trains(splits, warned):
    from pipeline.training.evaluation import eval_split

    split, warning = eval_split("none", splits)
    assert split == "none" and (warning is None if warned is None else warned in warning)
