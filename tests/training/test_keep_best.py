"""eval.keep_best: the model kept is the best evaluation's, not the last; its weights travel in every
checkpoint, so a run resumed after its best step ships what an uninterrupted one ships.

A constant learning rate of 0.1 on FSDD makes validation accuracy climb, then wander: the best
evaluation (ties to the lower loss) comes before the last step, which the tests check rather than assume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_LSTM, read_jsonl, run_py, train_in_process
from safetensors.torch import load_file

from pipeline.training.checkpoint import better

CONFIG = "configs/sequences.yaml"
# The plain LSTM (the convolutional front-end learns too steadily at this rate for the best to come early).
UNSTABLE = ("model.hidden_size=32", *PLAIN_LSTM, "train.max_steps=60", "eval.every_epochs=null", "eval.every_steps=10",
            "checkpoint.every_steps=10", "checkpoint.keep_last=10", "train.batch_size=16", "train.global_batch_size=32",
            "schedule.name=constant", "optim.lr=0.1", "eval.keep_best=true")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_the_best_evaluation_is_kept_and_survives_a_resume(fsdd_shards, tmp_path):
    straight = tmp_path / "straight"
    summary = train_in_process(straight, fsdd_shards, *UNSTABLE, config=CONFIG)
    kept = summary["kept_step"]
    evals = {e["step"]: e["eval/accuracy"] for e in read_jsonl(straight / "metrics.jsonl") if "eval/accuracy" in e}
    assert kept < 60, f"this recipe's best evaluation is now its last: {evals}"
    assert kept == summary["train_state"]["best_step"] and evals[kept] == max(evals.values())
    # model/ holds the weights of that step, and says so; their validation figure is the best one
    assert _same(straight / "model" / "model.safetensors", straight / "checkpoints" / f"step-{kept:08d}" / "model.safetensors")
    assert json.loads((straight / "model" / "config.json").read_text())["kept_step"] == kept
    assert summary["final_eval_accuracy"] == summary["best_eval_accuracy"] == evals[kept]
    run_py("launch/evaluate.py", "--model", str(straight / "model"), "--data", str(fsdd_shards), "--split", "test",
           "--out", str(tmp_path / "test"), check=True)
    assert json.loads((tmp_path / "test" / "eval.json").read_text())["accuracy"] == summary["test_accuracy"]
    # Stopped after the best step and resumed: the best's weights exist only in the checkpoint it resumes from
    split = tmp_path / "split"
    train_in_process(split, fsdd_shards, *UNSTABLE, f"train.stop_at_step={kept + 5}", config=CONFIG)
    resumed = train_in_process(split, fsdd_shards, *UNSTABLE, resume="auto", config=CONFIG)
    assert resumed["resumed"] and resumed["kept_step"] == kept
    assert _same(straight / "model" / "model.safetensors", split / "model" / "model.safetensors")
    assert resumed["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.slow
def test_without_keep_best_the_last_weights_are_kept(fsdd_shards, tmp_path):
    out = tmp_path / "last"
    summary = train_in_process(out, fsdd_shards, *UNSTABLE[:-1], config=CONFIG)
    assert summary["kept_step"] == 60 and summary["train_state"]["best_step"] < 60
    assert _same(out / "model" / "model.safetensors", out / "checkpoints" / f"step-{60:08d}" / "model.safetensors")
    assert not (out / "checkpoints" / f"step-{60:08d}" / "best.safetensors").exists()


@pytest.mark.parametrize("accuracy, loss, best_accuracy, best_loss, expected", [
    (0.5, 1.0, None, None, True),  # the first evaluation
    (0.6, 9.0, 0.5, 1.0, True),  # more accurate, whatever the loss
    (0.5, 0.9, 0.5, 1.0, True),  # as accurate, lower loss
    (0.5, 1.0, 0.5, 1.0, False),  # a tie on both keeps the earlier
    (0.4, 0.1, 0.5, 1.0, False),
    (0.5, 0.1, 0.5, None, False),  # a state saved before losses were kept: accuracy alone decides
])
def test_better(accuracy, loss, best_accuracy, best_loss, expected):
    assert better(accuracy, loss, best_accuracy, best_loss) is expected


def _stop_step(evals: list[dict], patience: int) -> tuple[int, int] | None:
    """(the step eval.patience should end the run at, the best step before it), from a run without patience
    that trained the same way; None if the patience never runs out before the last step."""
    best, since, best_step = (None, None), 0, None
    for e in evals[:-1]:  # the last evaluation ends the run anyway
        if better(e["eval/accuracy"], e["eval/loss"], *best):
            best, since, best_step = (e["eval/accuracy"], e["eval/loss"]), 0, e["step"]
        else:
            since += 1
            if since >= patience:
                return e["step"], best_step
    return None


@pytest.mark.slow
def test_patience_ends_the_run_where_the_evaluations_stop_improving(fsdd_shards, tmp_path):
    every_5 = (*UNSTABLE, "eval.every_steps=5", "checkpoint.every_steps=5", "checkpoint.keep_last=20")
    oracle = tmp_path / "oracle"
    train_in_process(oracle, fsdd_shards, *every_5, config=CONFIG)
    found = _stop_step([e for e in read_jsonl(oracle / "metrics.jsonl") if "eval/accuracy" in e], patience=2)
    assert found is not None, "this recipe's evaluations no longer stall for two in a row before its last step"
    stop, kept = found
    early = tmp_path / "early"
    summary = train_in_process(early, fsdd_shards, *every_5, "eval.patience=2", config=CONFIG)
    assert (summary["steps"], summary["kept_step"]) == (stop, kept)
    assert summary["stopped_early"] and summary["completed"] and summary["test_accuracy"] is not None
    assert _same(early / "model" / "model.safetensors", oracle / "checkpoints" / f"step-{kept:08d}" / "model.safetensors")
    # Interrupted before the stop and resumed: it stops at the same step with the same model
    split = tmp_path / "split"
    train_in_process(split, fsdd_shards, *every_5, "eval.patience=2", f"train.stop_at_step={stop - 5}", config=CONFIG)
    resumed = train_in_process(split, fsdd_shards, *every_5, "eval.patience=2", resume="auto", config=CONFIG)
    assert (resumed["steps"], resumed["kept_step"], resumed["stopped_early"]) == (stop, kept, True)
    assert _same(early / "model" / "model.safetensors", split / "model" / "model.safetensors")
    # An ended run: nothing more with the same patience; with more, it trains on as the run without patience did
    again = run_py("launch/train.py", "--config", CONFIG, f"data.dir={fsdd_shards}", f"output_dir={early}",
                   "train.device=cpu", *every_5, "eval.patience=2", "wandb.mode=disabled", "--resume", "auto")
    assert again.returncode == 0 and "eval.patience ended at step" in again.stdout, again.stdout + again.stderr
    more = train_in_process(early, fsdd_shards, *every_5, "eval.patience=100", resume="auto", config=CONFIG)
    assert more["steps"] == 60 and not more["stopped_early"]
    assert _same(early / "model" / "model.safetensors", oracle / "model" / "model.safetensors")
