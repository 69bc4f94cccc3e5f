"""Weight averaging (train.ema): the average's arithmetic, no host reads per step, exact resume,
both curves in the metrics, and model/ holding the average."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_jsonl, train_in_process
from safetensors.torch import load_file
from test_step import HostReads

from pipeline.config import ModelConfig
from pipeline.model import build_model
from pipeline.training.ema import WeightAverage

EMA = ("train.ema={decay: 0.9, start_step: 5}", "model.hidden_size=32", "train.max_steps=40", "eval.every_steps=20",
       "checkpoint.every_steps=20")


def test_the_average_copies_until_its_start_then_moves_a_fraction_towards_the_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=4), 28, 10)
    ema = WeightAverage(model, decay=0.75, start_step=2)
    history = []
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        history.append([p.clone() for p in model.parameters()])
        with HostReads() as reads:
            ema.update(model, step)
        assert reads.count == 0, "one host read per step would be a GPU sync per step"
    expected = history[1]  # steps 1 and 2 copy
    for weights in history[2:]:
        expected = [0.75 * e + 0.25 * w for e, w in zip(expected, weights, strict=True)]
    for ours, want in zip(ema.model.parameters(), expected, strict=True):
        torch.testing.assert_close(ours, want)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_the_average_keeps_the_trained_models_batch_norm_statistics():
    """model.conv_norm: batch keeps running statistics, buffers not weights: the average evaluates with the
    trained model's, not with the 0 and 1 it was built with."""
    from pipeline.model_conv import update_running_statistics

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=4, frontend="conv", conv_norm="batch", conv_channels=(4, 4),
                                    conv_kernels=(3, 3)), 3, 2).train()
    ema = WeightAverage(model, decay=0.9, start_step=0)
    for step in range(1, 4):
        model(torch.randn(5, 7, 3) * 4 + 2, torch.tensor([7, 6, 5, 4, 3])).sum().backward()
        update_running_statistics(model, 1)
        ema.update(model, step)
    buffers = dict(model.named_buffers())
    assert buffers and all(b.abs().sum() > 0 for name, b in buffers.items() if "running_mean" in name)
    for name, ours in ema.model.named_buffers():
        assert torch.equal(ours, buffers[name]), name


@pytest.mark.slow  # trains
def test_averaged_weights_resume_bit_for_bit_and_are_what_model_holds(tmp_path, fashion_shards):
    full = train_in_process(tmp_path / "straight", fashion_shards, *EMA)
    train_in_process(tmp_path / "split", fashion_shards, *EMA, "train.stop_at_step=20")
    resumed = train_in_process(tmp_path / "split", fashion_shards, *EMA, resume="auto")
    assert resumed["resumed"] and full["weights"] == resumed["weights"] == "ema"
    for name in ("model/model.safetensors", "checkpoints/step-00000040/ema.safetensors",
                 "checkpoints/step-00000040/model.safetensors"):
        a, b = (load_file(tmp_path / d / name) for d in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # model/ is the average, not the last weights; its card says so.
    shipped = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    average = load_file(tmp_path / "straight" / "checkpoints" / "step-00000040" / "ema.safetensors")
    raw = load_file(tmp_path / "straight" / "checkpoints" / "step-00000040" / "model.safetensors")
    assert all(torch.equal(shipped[k], average[k]) for k in shipped) and not all(torch.equal(shipped[k], raw[k]) for k in raw)
    card = json.loads((tmp_path / "straight" / "model" / "config.json").read_text())
    assert card["weights"] == "ema" and card["ema"] == {"decay": 0.9, "start_step": 5}
    # Both curves, at every evaluation; the best and the final figures are the average's.
    evals = [e for e in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "eval/accuracy" in e]
    assert [e["step"] for e in evals] == [20, 40] and all("eval_ema/accuracy" in e for e in evals)
    assert full["evals"] == len(evals), "an evaluation event scores both weights and counts once"
    assert full["final_eval_accuracy"] == evals[-1]["eval_ema/accuracy"] != evals[-1]["eval/accuracy"]


@pytest.mark.slow  # trains
def test_resume_without_the_saved_average_would_differ(tmp_path, fashion_shards):
    """What the bit-for-bit test guards: an average restarted from the weights at the resume ends elsewhere."""
    train_in_process(tmp_path / "straight", fashion_shards, *EMA)
    train_in_process(tmp_path / "split", fashion_shards, *EMA, "train.stop_at_step=20")
    (tmp_path / "split" / "checkpoints" / "step-00000020" / "ema.safetensors").unlink()
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000020" / "state.json").read_text())
    state["files"].pop("ema.safetensors")
    (tmp_path / "split" / "checkpoints" / "step-00000020" / "state.json").write_text(json.dumps(state))
    train_in_process(tmp_path / "split", fashion_shards, *EMA, resume="auto")
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("straight", "split"))
    assert not all(torch.equal(a[k], b[k]) for k in a), "the saved average is what makes the resume exact"
