"""Verified checkpoints: every file's sha256 is recorded at save and checked before a resume.
A damaged checkpoint is never loaded: --resume auto moves it aside and falls back, an explicit
--resume PATH refuses it."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import read_jsonl, train_run

from pipeline.checkpoints.format import file_digests, verify_checkpoint

RUN = ("wandb.mode=disabled", "train.max_steps=150", "eval.every_steps=50", "checkpoint.every_steps=50",
       "checkpoint.keep_last=3", "model.hidden_size=32")


def _flip_middle(path, count=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + count] = bytes(b ^ 0xFF for b in data[mid : mid + count])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, fashion_shards):
    out = tmp_path / "run"
    train_run(out, fashion_shards, *RUN, "train.stop_at_step=100")
    newest = out / "checkpoints" / "step-00000100"
    recorded = json.loads((newest / "state.json").read_text())["files"]
    assert set(recorded) == {"model.safetensors", "optimizer.pt", "scheduler.pt"}  # nothing belongs to a rank
    _flip_middle(newest / "model.safetensors")

    proc = train_run(out, fashion_shards, *RUN, resume=str(newest), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the checkpoint is damaged (model.safetensors: contents differ" in proc.stderr and "Traceback" not in proc.stderr
    assert newest.is_dir(), "an explicit --resume changes nothing"

    proc = train_run(out, fashion_shards, *RUN, resume="auto")
    assert "checkpoint step-00000100 failed verification (model.safetensors" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000050 at step 50" in proc.stdout
    assert (out / "checkpoints" / "damaged" / "step-00000100" / "model.safetensors").is_file(), "moved aside, not deleted"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 150 and summary["resumed"]
    steps = [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "train/loss" in e]
    assert steps == list(range(10, 151, 10)), "the steps after 50 were trained once, from the good checkpoint"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000050", "step-00000100", "step-00000150"]
    assert verify_checkpoint(out / "checkpoints" / "step-00000100") is None


def test_verify_names_a_missing_or_changed_file(tmp_path):
    ckpt = tmp_path / "step-00000007"
    (ckpt / "extra").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "extra" / "file.pt").write_bytes(b"rng")
    state = {"state": {"step": 7}, "fingerprint": "f", "model": {}, "world_size": 2, "files": file_digests(ckpt)}
    (ckpt / "state.json").write_text(json.dumps(state))
    assert verify_checkpoint(ckpt) is None
    (ckpt / "extra" / "file.pt").unlink()
    assert verify_checkpoint(ckpt) == "extra/file.pt: missing"
    (ckpt / "extra" / "file.pt").write_bytes(b"rnG")
    assert "extra/file.pt: contents differ" in verify_checkpoint(ckpt)
    (ckpt / "state.json").write_text("{")
    assert verify_checkpoint(ckpt).startswith("state.json: ")
    shutil.rmtree(ckpt)


def test_a_model_key_newer_than_the_checkpoint_resumes_at_its_default_and_is_refused_otherwise(tmp_path):
    from pipeline.checkpoints.compatibility import IncompatibleCheckpoint, check_compatible
    from pipeline.checkpoints.format import CheckpointMeta, TrainState
    from pipeline.config import ModelConfig

    now = ModelConfig(hidden_size=32).model_dump()
    before = {k: v for k, v in now.items() if k != "forget_bias"}  # written before model.forget_bias existed
    order = {"global_batch_size": 256, "seed": 0, "shuffle_buffer": 4096}
    meta = CheckpointMeta(state=TrainState(), fingerprint="f" * 64, model=before, world_size=1, order=order)
    check_compatible(meta, tmp_path, "f" * 64, now, order)
    with pytest.raises(IncompatibleCheckpoint, match=r"different model\.forget_bias \(forget_bias=None\)"):
        check_compatible(meta, tmp_path, "f" * 64, {**now, "forget_bias": 1.0}, order)
