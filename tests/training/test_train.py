"""Real training runs on the real Fashion-MNIST shards: one process, two gloo processes, resume.

What a resume or a start refuses is checked in this process, on the real config loader and the
real checks (fast); one end-to-end run shows the refusal as a user meets it: exit 2, one paragraph.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, read_jsonl, train_in_process, train_run
from safetensors.torch import load_file

from pipeline.checkpoints.compatibility import IncompatibleCheckpoint, check_compatible
from pipeline.checkpoints.format import CheckpointMeta, TrainState, read_meta, write_meta
from pipeline.config import load_config
from pipeline.data import manifest as mf
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError
from pipeline.inference.models import load_trained_model
from pipeline.model import build_model

NO_WANDB = "wandb.mode=disabled"
@pytest.mark.slow
def test_fast_recipe_reaches_the_tutorials_accuracy(tmp_path, fashion_shards):
    """configs/fashion_mnist_fast.yaml's promise: the classic tutorial's one-epoch accuracy
    (0.82-0.84 on the machines measured) within its 350 steps, on resident data with fused Adam."""
    out = tmp_path / "fast"
    train_run(out, fashion_shards, NO_WANDB, config="configs/fashion_mnist_fast.yaml")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_placement"] == "device" and summary["steps"] == 350
    assert summary["final_eval_accuracy"] >= 0.84, summary["final_eval_accuracy"]
@pytest.mark.slow
def test_cpu_test_mode_end_to_end(tmp_path, fashion_shards):
    out = tmp_path / "run"
    proc = train_run(out, fashion_shards, NO_WANDB)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("world_size", "distributed_type", "mixed_precision", "steps", "samples_seen", "wall_s",
                "train_samples_per_s", "final_eval_accuracy", "best_eval_accuracy", "eval_seconds_mean"):
        assert summary[key] is not None, key
    assert summary["world_size"] == 1 and summary["steps"] == 300
    assert summary["padding_waste"] == 0.0, "fixed-length images pad nothing: a figure, not null"
    assert summary["final_eval_accuracy"] >= 0.75
    events = read_jsonl(out / "metrics.jsonl")
    assert all("step" in e for e in events)
    assert [e["step"] for e in events if "eval/accuracy" in e] == [50, 100, 150, 200, 250, 300]
    assert all(math.isfinite(e["train/grad_norm"]) for e in events if "train/loss" in e)
    assert load_config(out / "config.yaml").train.max_steps == 300, "the config as given, saved and loadable"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000200", "step-00000300"], "keep_last 2"
    for png in ("loss.png", "accuracy.png", "confusion.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the documented one-liner gives a working classifier
    model = load_trained_model(out / "model").model
    from pipeline.data.manifest import load_manifest
    from pipeline.data.store import ShardStore, load_split_tensors

    x, _, y = load_split_tensors(load_manifest(fashion_shards), ShardStore(str(fashion_shards)), "test")
    with torch.no_grad():
        acc = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    assert abs(acc - summary["test_accuracy"]) < 1e-3
    assert "Traceback" not in proc.stderr
@pytest.mark.slow
def test_two_process_gloo_run(tmp_path, fashion_shards):
    out = tmp_path / "ddp"
    train_run(out, fashion_shards, NO_WANDB, "train.max_steps=240", "eval.every_steps=40", "checkpoint.every_steps=120",
              "data.record_sample_ids=true", "data.placement=stream", "data.num_workers=1", nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    r0 = np.load(out / "sample_ids" / "rank-00000.npy")
    r1 = np.load(out / "sample_ids" / "rank-00001.npy")
    assert r0.shape == r1.shape == (240, 128), "both ranks take the same steps"
    from pipeline.data.manifest import load_manifest

    steps_per_epoch = load_manifest(fashion_shards).split("train").num_samples // 256  # global batches
    first_epoch = np.concatenate([r0[:steps_per_epoch].ravel(), r1[:steps_per_epoch].ravel()])
    assert len(np.unique(first_epoch)) == len(first_epoch), "the ranks' samples within an epoch are disjoint"
    evals = [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in e]
    assert evals == [40, 80, 120, 160, 200, 240], "exactly one eval line per eval step"
    assert summary["samples_seen"] == 240 * 2 * 128


def cpu_runs_bf16_lstm() -> bool:
    """Whether this CPU's PyTorch runs an LSTM under bf16 autocast (oneDNN: AVX-512 or newer)."""
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(1, 1, 4))
        return True
    except RuntimeError:
        return False
@pytest.mark.slow
def test_bf16_on_cpu_trains_or_is_refused_where_the_cpu_has_no_kernel(tmp_path, fashion_shards):
    out = tmp_path / "bf16"
    proc = train_run(out, fashion_shards, NO_WANDB, "train.mixed_precision=bf16", "train.max_steps=100", check=False)
    if not cpu_runs_bf16_lstm():
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "this CPU has no bf16 kernel for the LSTM layers" in proc.stderr and "train.mixed_precision=no" in proc.stderr
        assert not out.exists() or not (out / "checkpoints").exists(), "refused before anything was written"
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    assert summary["final_eval_accuracy"] > 0.6
@pytest.mark.slow
def test_grad_clip_bounds_applied_norm(tmp_path, fashion_shards):
    # SGD with lr 1 and no momentum: the weight change is exactly the applied (clipped) gradient.
    out = tmp_path / "clip"
    clip = 0.01
    train_run(out, fashion_shards, NO_WANDB, "optim.name=sgd", "optim.lr=1.0", "optim.momentum=0", "schedule.name=constant",
              "schedule.warmup_steps=0", f"train.grad_clip={clip}", "train.max_steps=1", "eval.every_steps=1",
              "train.log_every_steps=1")
    cfg = load_config(out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model, 28, 10).state_dict()
    final = load_file(out / "model" / "model.safetensors")
    applied = math.sqrt(sum(((final[k] - initial[k]).double() ** 2).sum().item() for k in initial))
    logged = read_jsonl(out / "metrics.jsonl")[0]["train/grad_norm"]
    assert logged > 10 * clip, "the test needs a gradient far above the clip"
    assert applied == pytest.approx(clip, rel=1e-3)
@pytest.mark.slow
def test_exact_resume_bit_identical(tmp_path, fashion_shards):
    common = (NO_WANDB, "train.max_steps=200", "model.num_layers=2", "model.dropout=0.2", "data.placement=stream",
              "data.num_workers=2", "data.hflip=true", "train.batch_size=512", "train.global_batch_size=512",
              "checkpoint.every_steps=100")  # 117 steps per epoch: the resumed run crosses an epoch, with persistent workers
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_run(straight, fashion_shards, *common)
    train_run(split, fashion_shards, *common, "train.stop_at_step=100")
    assert not (split / "checkpoints" / "step-00000200").exists()
    train_run(split, fashion_shards, *common, resume="auto")
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(split / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights equal the uninterrupted run's bit for bit"

    def stable(events):  # timings differ run to run; everything else must not
        return [{k: v for k, v in e.items() if k not in ("train/samples_per_s", "eval/seconds", "time_s")} for e in events]

    ea, eb = read_jsonl(straight / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert stable(ea) == stable(eb)
    assert json.loads((split / "summary.json").read_text())["resumed"] is True


# What a resume must not change, as a user would change it, and the words that name it: before -> after.
CHANGES = [("train.global_batch_size=128", "train.global_batch_size 256 -> 128"), ("train.seed=1", "train.seed 0 -> 1"),
           ("data.shuffle_buffer=1024", "data.shuffle_buffer 4096 -> 1024"),
           ("model.hidden_size=32", "different model.hidden_size (hidden_size=64)")]


def cpu_test_config(shards, *overrides: str):
    """configs/cpu_test.yaml through the real loader, with overrides as a command line gives them."""
    return load_config(ROOT / "configs/cpu_test.yaml", [f"data.dir={shards}", "train.device=cpu", NO_WANDB, *overrides])


def run_order(cfg, world: int = 1) -> dict[str, int]:
    """What a run records of its order of samples (the trainer's Checkpointer(order=...)) at a world size."""
    layout = BatchLayout.make(cfg.train.global_batch_size, cfg.train.batch_size, world)
    return {"global_batch_size": layout.global_batch, "seed": cfg.train.seed, "shuffle_buffer": cfg.data.shuffle_buffer}


@pytest.fixture
def saved(tmp_path, fashion_shards):
    """The state.json of a checkpoint of configs/cpu_test.yaml on the real shards, written and read back as
    checkpoints are: (its meta, its directory, the shards' manifest)."""
    cfg = cpu_test_config(fashion_shards)
    manifest = mf.load_manifest(fashion_shards)
    path = tmp_path / "run" / "checkpoints" / "step-00000050"
    path.mkdir(parents=True)
    write_meta(path, CheckpointMeta(state=TrainState(step=50, epoch=0, step_in_epoch=50), fingerprint=manifest.fingerprint,
                                    model=cfg.model.model_dump(), world_size=1, config=cfg.to_dict(), order=run_order(cfg)))
    return read_meta(path), path, manifest


def refusal(meta, path, fingerprint: str, cfg, world: int = 1) -> IncompatibleCheckpoint | None:
    try:
        check_compatible(meta, path, fingerprint, cfg.model.model_dump(), run_order(cfg, world))
    except IncompatibleCheckpoint as err:
        return err
    return None


def test_resume_accepts_the_same_run_at_any_world_size_that_divides_its_global_batch(saved, fashion_shards):
    meta, path, manifest = saved
    for world in (1, 2):
        assert refusal(meta, path, manifest.fingerprint, cpu_test_config(fashion_shards), world) is None
    # What may change: how long it runs, how often it evaluates.
    later = cpu_test_config(fashion_shards, "train.max_steps=600", "eval.every_steps=100")
    assert refusal(meta, path, manifest.fingerprint, later) is None


@pytest.mark.parametrize("change,said", CHANGES)
def test_resume_refuses_another_model_global_batch_or_seed_naming_both(saved, fashion_shards, change, said):
    meta, path, manifest = saved
    refused = refusal(meta, path, manifest.fingerprint, cpu_test_config(fashion_shards, change))
    assert refused is not None and refused.exit_code == 2, change
    message = str(refused)
    assert message.startswith(f"checkpoint {path} ") and said in message, message
    assert "\n" not in message and message.endswith("or start a new output_dir"), message  # one paragraph, with the way out


def test_resume_refuses_another_dataset_naming_both(saved, fashion_shards, tmp_path):
    meta, path, manifest = saved
    other = mf.load_manifest(fashion_shards)  # the same split, less its last shard: another prepared dataset
    dropped = other.splits["train"].shards.pop()
    other.splits["train"].num_samples -= dropped.num_samples
    other.fingerprint = mf.fingerprint(other)
    (tmp_path / "other").mkdir()
    mf.write_manifest(other, tmp_path / "other")
    fingerprint = mf.load_manifest(tmp_path / "other").fingerprint
    assert fingerprint != manifest.fingerprint
    refused = refusal(meta, path, fingerprint, cpu_test_config(tmp_path / "other"))
    assert refused is not None and refused.exit_code == 2
    assert (f"was trained on dataset {manifest.fingerprint[:12]}, but data.dir holds {fingerprint[:12]}; resume with "
            "the same prepared dataset") in str(refused)


def test_config_dataset_must_match_the_prepared_data_in_process(fashion_shards):
    cfg = cpu_test_config(fashion_shards, "data.dataset=mnist")
    with pytest.raises(ConfigError) as refused:
        mf.check_dataset(mf.load_manifest(cfg.data.dir, cfg.data.dataset), cfg.data.dir, cfg.data.dataset)
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert message.startswith(f"data.dataset is mnist, but the prepared dataset in {fashion_shards} holds fashion_mnist")
    assert "set data.dataset=fashion_mnist" in message and "--dataset mnist" in message


@pytest.mark.slow
def test_resume_refusals_end_to_end(tmp_path, fashion_shards):
    """The trainer records what the checks above are given, and a user meets the refusal as exit 2 and one paragraph."""
    out = tmp_path / "run"
    train_in_process(out, fashion_shards, "train.max_steps=50")
    for change, said in CHANGES:  # the real resume, in this process
        with pytest.raises(IncompatibleCheckpoint, match=re.escape(said)):
            train_in_process(out, fashion_shards, "train.max_steps=50", change, resume="auto")
    other = tmp_path / "other_data"
    shutil.copytree(fashion_shards, other)
    m = mf.load_manifest(other)
    m.splits["train"].num_samples -= m.splits["train"].shards.pop().num_samples
    m.fingerprint = mf.fingerprint(m)
    mf.write_manifest(m, other)
    with pytest.raises(IncompatibleCheckpoint, match="trained on dataset"):
        train_in_process(out, other, "train.max_steps=50", resume="auto")
    # As a user meets it: the command line, its exit status, its one paragraph.
    proc = train_run(out, fashion_shards, NO_WANDB, "train.max_steps=50", CHANGES[0][0], resume="auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr  # one, and the last word
    assert errors[0].startswith(f"error: checkpoint {out / 'checkpoints' / 'step-00000050'} was trained with another "
                                f"order of samples ({CHANGES[0][1]})") and errors[0].endswith("start a new output_dir")
    assert not (out / "checkpoints" / "step-00000100").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])  # the host decides the skip / the fused kernel skips on the device
def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, fashion_shards, fused):
    out = tmp_path / "nan"
    proc = train_run(out, fashion_shards, NO_WANDB, "optim.name=sgd", "optim.lr=1e38", "train.grad_clip=null",
                     "schedule.warmup_steps=0", "train.max_steps=50", "checkpoint.every_steps=2", f"optim.fused={fused}",
                     check=False)
    assert proc.returncode == 3, proc.stderr
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    good = sorted((out / "checkpoints").glob("step-*"))
    assert good, "the last good checkpoint is kept"
    weights = load_file(good[-1] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
@pytest.mark.slow
def test_config_dataset_must_match_the_prepared_data(tmp_path, fashion_shards):
    out = tmp_path / "run"
    proc = train_run(out, fashion_shards, NO_WANDB, "data.dataset=mnist", check=False)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.replace("data.dataset=mnist", "<arg>")  # the echoed override alone proves nothing
    assert message.startswith("error: data.dataset is mnist, but the prepared dataset") and "Traceback" not in message
    assert "holds fashion_mnist" in message and "set data.dataset=fashion_mnist" in message
    assert "--dataset mnist" in message, "says how to prepare the dataset the config asks for"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
