"""The pieces of a step and an evaluation, each checked where its bug would show:
autocast really computing in bf16, a non-finite gradient never applied, and the confusion
matrix's orientation (rows true, columns predicted) in every place it is shown."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, accelerate_cmd, run_py

from pipeline.data.manifest import load_manifest
from pipeline.data.store import ShardStore, load_split_tensors
from pipeline.inputs import IMAGES
from pipeline.scoring import evaluate

# Runs in a fresh process (Accelerate's precision is fixed per process): the trainer as built
# from the config, forward hooks on its layers, one real train_step on a real batch.
DTYPE_PROBE = """
import json, sys
from pipeline.config import load_config
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.training.accelerator import build_accelerator
from pipeline.training.trainer import build_run
from pipeline.training.step import train_step
cfg = load_config("configs/cpu_test.yaml", sys.argv[1:])
env = LaunchEnv.from_environ()
trainer = build_run(cfg, env, build_accelerator(cfg, env))
model = trainer.accelerator.unwrap_model(trainer.parts.model)
seen = {}
def record(name):
    def hook(module, inputs, out):
        seen[name] = str((out[0] if isinstance(out, tuple) else out).dtype)
    return hook
for name in ("rnn", "head"):
    getattr(model, name).register_forward_hook(record(name))
train_step(trainer.parts, next(trainer.batches.epoch(0, 0, 1)))
trainer.tracker.finish()
print("DTYPES " + json.dumps(seen))
"""


@pytest.mark.parametrize("precision,expected", [("bf16", "torch.bfloat16"), ("no", "torch.float32")])
def test_mixed_precision_sets_the_dtype_layers_compute_in(tmp_path, fashion_shards, precision, expected):
    from test_train import cpu_runs_bf16_lstm

    if precision == "bf16" and not cpu_runs_bf16_lstm():
        pytest.skip("this CPU has no bf16 LSTM kernel: the trainer refuses bf16 here (test_train checks that)")
    proc = run_py("-c", DTYPE_PROBE, f"data.dir={fashion_shards}", f"output_dir={tmp_path / 'out'}", "wandb.mode=disabled",
                  "train.progress_bar=false", "train.device=cpu", f"train.mixed_precision={precision}", check=True)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("DTYPES ")]
    assert json.loads(line[len("DTYPES "):]) == {"rnn": expected, "head": expected}


def test_non_finite_gradient_is_never_applied():
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR

    from pipeline.config import ModelConfig
    from pipeline.model import build_model
    from pipeline.training.step import StepParts, train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=8), 28, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator, model, optimizer, scheduler, grad_clip=1.0)
    x, y = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (16,))
    first = train_step(parts, [(x, y)])
    assert first.finite and first.lr == 0.1 and scheduler.last_epoch == 1
    with torch.no_grad():
        accelerator.unwrap_model(model).head.weight[0, 0] = float("nan")  # every logit of class 0 is NaN now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_step(parts, [(x, y)])
    assert not second.finite and second.lr == 0.05
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=f"a non-finite update changed {k}")
    assert scheduler.last_epoch == 1, "the schedule advanced on a withheld step"
    assert all(p.grad is None for p in model.parameters())


class AlwaysThree(torch.nn.Module):
    """A classifier with a known bias: whatever the image, class 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10)
        logits[:, 3] = 1.0
        return logits


def test_confusion_rows_are_true_classes_and_columns_predictions(fashion_shards, tmp_path):
    manifest = load_manifest(fashion_shards)
    images, _, labels = load_split_tensors(manifest, ShardStore(str(fashion_shards)), "test")
    images, labels = images[:1500], labels[:1500]
    result = evaluate(AlwaysThree(), images, labels, 500, torch.device("cpu"), contextlib.nullcontext, 10, inputs=IMAGES)
    per_true = np.bincount(labels.numpy(), minlength=10)
    assert (result.confusion[:, 3] == per_true).all(), "column 3 (predicted) holds every sample of each true class"
    assert result.confusion.sum() == len(labels) and (np.delete(result.confusion, 3, axis=1) == 0).all()
    assert result.per_class_accuracy == [1.0 if c == 3 else 0.0 for c in range(10)]
    assert result.accuracy == pytest.approx(per_true[3] / len(labels))

    # W&B's chart: Actual is the true class, Predicted the model's answer.
    from pipeline.tracking import media

    chart = media.confusion_chart(result.confusion, manifest.class_names, title="t")
    cells = {(a, p): n for a, p, n in chart.table.data}
    names = manifest.class_names
    assert all(cells[(names[c], names[3])] == per_true[c] for c in range(10))
    assert all(cells[(names[c], names[p])] == 0 for c in range(10) for p in range(10) if p != 3)


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (.item(), float(), bool(): a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False])
def test_the_step_reads_nothing_back_from_the_device(fused):
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR

    from pipeline.config import ModelConfig, OptimConfig
    from pipeline.model import build_model
    from pipeline.training.optimizer import build_optimizer
    from pipeline.training.step import StepParts, train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=8), 28, 10)
    optimizer = build_optimizer(model, OptimConfig(name="adam", fused=fused))
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator, model, optimizer, LambdaLR(optimizer.optimizer, lambda step: 1.0), grad_clip=1.0)
    batch = (torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (16,)))
    train_step(parts, [batch])  # warm-up: lazy state creation may read values once
    with HostReads() as reads:
        result = train_step(parts, [batch])
    # Fused: not one value comes back. Unfused: the finite check, and foreach Adam's own reads of its step counts.
    assert (reads.count == 0) == fused, reads.count
    assert bool(result.finite)


def test_a_class_without_cases_has_no_accuracy(fashion_shards):
    """Per-class accuracy of a class the split lacks is undefined: left out of the metrics, not logged as 0.0."""
    manifest = load_manifest(fashion_shards)
    images, _, labels = load_split_tensors(manifest, ShardStore(str(fashion_shards)), "test")
    keep = (labels[:1500] != 5).nonzero().squeeze(1)
    result = evaluate(AlwaysThree(), images[keep], labels[keep], 500, torch.device("cpu"), contextlib.nullcontext, 10, inputs=IMAGES)
    assert result.per_class_accuracy[5] is None
    assert result.per_class_accuracy[3] == 1.0 and result.per_class_accuracy[0] == 0.0
    metrics = result.metrics()
    assert "eval/acc_5" not in metrics and metrics["eval/acc_0"] == 0.0 and metrics["eval/acc_3"] == 1.0


def test_fused_optimizer_skips_a_non_finite_update_on_the_device():
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR

    from pipeline.config import ModelConfig, OptimConfig
    from pipeline.model import build_model
    from pipeline.training.optimizer import build_optimizer
    from pipeline.training.step import StepParts, train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=8), 28, 10)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", fused=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator, model, optimizer, LambdaLR(optimizer.optimizer, lambda step: 1.0))
    batch = (torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (16,)))
    assert bool(train_step(parts, [batch]).finite)
    with torch.no_grad():
        accelerator.unwrap_model(model).head.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not bool(train_step(parts, [batch]).finite)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=f"a non-finite update changed {k}")
    step = optimizer.optimizer.state[next(iter(accelerator.unwrap_model(model).parameters()))]["step"]
    assert int(step) == 1, "the skipped step is not counted in Adam's bias correction"


@pytest.mark.parametrize("log_every", [7, 600])  # windows shorter than one fold, and spanning three
def test_step_window_counts_what_each_window_saw(log_every):
    """Loss and norm means over a window, non-finite steps counted and the first one named, however
    the window's steps were folded into the device sums."""
    from accelerate import Accelerator

    from pipeline.training.metrics import StepWindow
    from pipeline.training.step import StepResult

    bad_steps = {5, 300, 301, 513}
    window, accelerator = StepWindow(torch.device("cpu"), global_batch=4), Accelerator(cpu=True)
    seen, start = [], 1
    for step in range(1, 601):
        finite = step not in bad_steps
        window.add(StepResult(loss=torch.tensor(float(step)), grad_norm=torch.tensor(2.0 * step if finite else math.inf),
                              finite=torch.tensor(finite), lr=0.1), step)
        if step % log_every == 0 or step == 600:
            count, first = window.take_nonfinite()
            in_window = sorted(s for s in bad_steps if start <= s <= step)
            assert (count, first) == (len(in_window), in_window[0] if in_window else -1), step
            row = window.close(accelerator)
            steps = range(start, step + 1)
            assert row["train/loss"] == pytest.approx(sum(steps) / len(steps))
            good = [2.0 * s for s in steps if s not in bad_steps]
            assert row["train/grad_norm"] == pytest.approx(sum(good) / len(good))
            seen.append(step)
            start = step + 1
    assert seen[-1] == 600


# Two real ranks: the trainer as built from the config, a counting comm hook on its DDP model,
# one optimizer step of two micro-batches per rank.
ALLREDUCE_PROBE = """
import sys, torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from pipeline.config import load_config
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.training.accelerator import build_accelerator
from pipeline.training.trainer import build_run
from pipeline.training.step import train_step
cfg, env = load_config("configs/cpu_test.yaml", sys.argv[1:]), LaunchEnv.from_environ()
trainer = build_run(cfg, env, build_accelerator(cfg, env))
calls = [0]
def counting(state, bucket):
    calls[0] += 1
    return allreduce_hook(state, bucket)
trainer.parts.model.register_comm_hook(None, counting)
micro = next(trainer.batches.epoch(0, 0, 1))
train_step(trainer.parts, micro)
trainer.tracker.finish()
print(f"ALLREDUCES {calls[0]} MICRO {len(micro)} RANK {trainer.accelerator.process_index}")
"""


@pytest.mark.slow
def test_micro_batches_that_only_accumulate_are_not_all_reduced(tmp_path, fashion_shards):
    script = tmp_path / "probe.py"
    script.write_text(ALLREDUCE_PROBE)
    proc = subprocess.run([*accelerate_cmd(2), str(script), f"data.dir={fashion_shards}", f"output_dir={tmp_path / 'out'}",
                           "wandb.mode=disabled", "train.progress_bar=false", "train.device=cpu",
                           "train.global_batch_size=512"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks print to one pipe, and their lines can land in one another.
    lines = sorted(re.findall(r"ALLREDUCES \d+ MICRO \d+ RANK \d+", proc.stdout))
    # The model's gradients fit one bucket: one all-reduce per optimizer step, after the last micro-batch.
    assert lines == ["ALLREDUCES 1 MICRO 2 RANK 0", "ALLREDUCES 1 MICRO 2 RANK 1"], proc.stdout


def test_forget_bias_sets_the_forget_gates_and_nothing_else():
    from pipeline.config import ModelConfig
    from pipeline.model import SequenceClassifier

    torch.manual_seed(0)
    plain = SequenceClassifier(ModelConfig(hidden_size=8, num_layers=2, bidirectional=True), input_size=28, num_classes=10).rnn
    torch.manual_seed(0)
    biased = SequenceClassifier(ModelConfig(hidden_size=8, num_layers=2, bidirectional=True, forget_bias=1.0), input_size=28, num_classes=10).rnn
    forget = slice(8, 16)  # gates (input, forget, cell, output)
    for suffix in ("l0", "l1", "l0_reverse", "l1_reverse"):
        b_ih, b_hh = getattr(biased, f"bias_ih_{suffix}"), getattr(biased, f"bias_hh_{suffix}")
        assert torch.equal(b_ih[forget] + b_hh[forget], torch.ones(8))
        for name in (f"bias_ih_{suffix}", f"bias_hh_{suffix}"):
            rest = torch.cat([getattr(biased, name)[:8], getattr(biased, name)[16:]])
            assert torch.equal(rest, torch.cat([getattr(plain, name)[:8], getattr(plain, name)[16:]]))
    assert all(torch.equal(p, getattr(plain, n)) for n, p in biased.named_parameters() if n.startswith("weight"))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_row_embedding_and_max_readout_feed_the_head(bidirectional):
    from pipeline.config import ModelConfig
    from pipeline.model import SequenceClassifier

    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(hidden_size=8, bidirectional=bidirectional, embed_size=5, readout="last_max"), input_size=28, num_classes=10)
    x = torch.rand(3, 28, 28)
    linear = model.embed[0]
    rows = torch.relu(x @ linear.weight.T + linear.bias)  # each row on its own, the same layer for all 28
    out, (h_n, _) = model.rnn(rows)
    last = torch.cat([h_n[-2], h_n[-1]], dim=1) if bidirectional else out[:, -1]
    expected = model.head(torch.cat([last, out.max(dim=1).values], dim=1))
    assert model.rnn.input_size == 5 and model.head.in_features == 8 * (2 if bidirectional else 1) * 2
    torch.testing.assert_close(model(x), expected)
