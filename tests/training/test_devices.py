"""Which device a launch trains on, and the refusal of more ranks per node than GPUs.

The GPU rows run where a CUDA GPU is visible (the lent H200 check); on CPU machines they skip,
and the preflight's rule is checked directly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, accelerate_cmd, run_py, train_args

from pipeline.errors import ConfigError
from pipeline.training.accelerator import check_gpu_count

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_more_ranks_than_gpus_is_refused_unless_rehearsing():
    check_gpu_count(1, 1, rehearsal=False)
    check_gpu_count(8, 8, rehearsal=False)
    check_gpu_count(2, 1, rehearsal=True)
    with pytest.raises(ConfigError) as err:
        check_gpu_count(2, 1, rehearsal=False)
    message = str(err.value)
    assert "2 processes per node" in message and "1 visible GPU(s)" in message
    for fix in ("--num_processes", "train.device=cpu", "train.gpu_rehearsal=true"):
        assert fix in message


def test_cuda_asked_for_without_a_gpu_exits_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_py("launch/train.py", "--config", "configs/cpu_test.yaml", f"output_dir={tmp_path}", "train.device=cuda")
    assert proc.returncode == 2 and "train.device is cuda, but no CUDA GPU is visible" in proc.stderr
    assert "Traceback" not in proc.stderr


def _gpu_run(out, shards, nproc, *overrides, resume=None):
    import subprocess

    args = [a for a in train_args(out, shards, "wandb.mode=disabled", *overrides) if a != "train.device=cpu"]
    if resume:
        args += ["--resume", resume]
    cmd = accelerate_cmd(nproc)
    cmd = [c for c in cmd if c != "--multi_gpu"] + (["--multi_gpu"] if nproc > 1 else [])
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@GPU
def test_two_ranks_on_one_gpu_without_rehearsal_exit_2(tmp_path, fashion_shards):
    if torch.cuda.device_count() != 1:
        pytest.skip("needs exactly one GPU")
    proc = _gpu_run(tmp_path / "out", fashion_shards, 2, "train.max_steps=20", "eval.every_steps=10")
    assert proc.returncode != 0 and "2 processes per node were launched on CUDA" in proc.stderr
    assert "NCCL error" not in proc.stderr


@GPU
@pytest.mark.slow
def test_rehearsal_two_ranks_share_one_gpu_evaluate_checkpoint_and_resume(tmp_path, fashion_shards):
    out = tmp_path / "out"
    common = ("train.gpu_rehearsal=true", "train.max_steps=60", "eval.every_steps=30", "checkpoint.every_steps=30")
    first = _gpu_run(out, fashion_shards, 2, *common, "train.stop_at_step=30")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _gpu_run(out, fashion_shards, 2, *common, resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_GPU" and summary["gpu_rehearsal"]
    assert summary["resumed"] and summary["steps"] == 60 and summary["final_eval_accuracy"] > 0.5
    assert "GPU rehearsal" in resumed.stdout
