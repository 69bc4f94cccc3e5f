"""Smoke test of benchmarks/run.py --quick on a small budget: the JSON holds every key, with
positive values. No timing is asserted (the numbers depend on the machine and its load)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_py

BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_no_benchmark_shadows_a_module_the_others_import():
    """`python benchmarks/NAME.py` puts benchmarks/ first on sys.path, so no file there may share its
    name with a top-level module (benchmarks/cuda.py once hid cuda-python's `cuda` package from torch)."""
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() not in (BENCHMARKS, ROOT)]
    clashes = [p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__"
               and (p.stem in sys.stdlib_module_names or importlib.machinery.PathFinder.find_spec(p.stem, elsewhere))]
    assert clashes == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_starts_as_a_script_without_a_path_shim(script):
    """The benchmarks import `benchmarks` and `pipeline` as the installed packages they are
    (pyproject.toml), so no script edits sys.path, and each starts as the docs write it."""
    assert "sys.path" not in (BENCHMARKS / script).read_text()
    proc = run_py(f"benchmarks/{script}", "--help", timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_quick_benchmark_smoke(tmp_path, fashion_shards):
    out = tmp_path / "quick.json"
    proc = run_py("benchmarks/run.py", "--quick", "--data", str(fashion_shards), "--out", str(out),
                  "--reps", "1", "--steps", "5", "--per-sample-samples", "512", "--work", str(tmp_path / "work"),
                  check=True, timeout=600)
    assert "Goals" in proc.stdout and "1. Loader" in proc.stdout and "2. Training samples/s" in proc.stdout
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["sections"] == ["loader", "throughput"]
    assert r["loader_speedup"] > 0
    loader = r["loader"]
    for name in ("ours", "ours_with_cast", "ours_read_blocks_only", "per_sample", "torchvision"):
        assert loader[name]["samples_per_s"] > 0, name
    assert loader["ours"]["samples"] == 54784  # full batches of 256 from the train split (55,000)
    assert loader["per_sample"]["samples"] == 512
    assert loader["torchvision"]["samples"] == 60000
    assert set(r["train_vs_floor"]) == {"64", "256"}
    for batch, row in r["throughput"]["by_batch"].items():
        assert row["train_vs_floor"] > 0 and row["floor_samples_per_s"] > 0 and row["ours_samples_per_s"] > 0, batch
    assert set(r["goals"]) == {"loader_speedup", "loader_samples_per_s", "train_vs_floor_b64", "train_vs_floor_b256", "tta_ratio",
                              "tta_ratio_training_clocks", "cuda_min_train_vs_floor", "cuda_training_seconds_to_0.91"}
    assert r["goals"]["tta_ratio"]["met"] is None  # not measured in --quick
    assert r["environment"]["torch"] and r["environment"]["cores"] >= 1


def test_cuda_mode_fails_clearly_without_gpu(tmp_path, fashion_shards):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_py("benchmarks/run.py", "--device", "cuda", "--data", str(fashion_shards), "--out", str(tmp_path / "c.json"))
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.json").exists()


def test_missing_data_dir_is_one_line(tmp_path):
    proc = run_py("benchmarks/run.py", "--quick", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "q.json"))
    assert proc.returncode == 2 and "prepare_data.py" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_step_profile_smoke(tmp_path, fashion_shards):
    """The profile drives a real run through its public pieces: it breaks when their signatures move."""
    out = tmp_path / "p.json"
    run_py("benchmarks/run.py", "--sections", "profile", "--profile-steps", "4", "--data", str(fashion_shards),
           "--out", str(out), "--work", str(tmp_path / "work"), check=True, timeout=600)
    r = json.loads(out.read_text())["profile"]
    assert r["trainer"]["calls"]["compute"] == 4 and r["trainer"]["per_step_seconds"]["compute (train_step)"] > 0


@pytest.mark.slow
def test_time_to_target_stops_the_run_at_its_first_evaluation_there(tmp_path, fashion_shards):
    """The time-to-accuracy measurement (CPU tta, and the GPU's time to 0.91): a fresh trainer is
    stopped once an evaluation reaches the target, and the two clocks are reported."""
    from benchmarks import tta

    r = tta.time_to(0.6, "configs/cpu_test.yaml", fashion_shards, tmp_path, ["train.max_steps=3000"], timeout=300)
    assert r["reached"] and r["accuracy"] >= 0.6 and r["step"] % 50 == 0
    assert r["evals"][-1]["step"] == r["step"], "the first evaluation at the target ends the measurement"
    assert 0 < r["training_seconds"] < r["seconds"]
    assert r["exit_code"] is not None and r["exit_code"] != 0, "stopped by SIGTERM, not run to its 3000 steps"


@pytest.mark.slow
def test_sequence_benchmarks_smoke(tmp_path, fashion_shards, fsdd_shards):
    """benchmarks/sequence_speed.py and canonical_streams.py on a tiny budget: every figure is there."""
    out = tmp_path / "seq.json"
    run_py("benchmarks/sequence_speed.py", "--data", str(fsdd_shards), "--out", str(out), "--reps", "1", "--steps", "4",
           "--warm-steps", "2", check=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["floor"]["train_vs_floor"] > 0 and r["buckets_speed"]["speedup"] > 0
    assert 0 <= r["waste"][0]["buckets"] < r["waste"][0]["random"]
    out = tmp_path / "canonical.json"
    run_py("benchmarks/canonical_streams.py", "--data", str(fashion_shards), "--out", str(out), "--seeds", "0",
           "--steps", "10", check=True, timeout=900)
    r = json.loads(out.read_text())
    rows = {(b["streams"], b["world"]): b for b in r["bytes"]}
    assert rows[(1, 8)]["max_rank_share"] == 1.0 and rows[(8, 8)]["max_rank_share"] < 0.15
    assert {m["streams"] for m in r["mixing"]} == {1, 8} and set(r["accuracy"]) == {"1", "8"}


def test_conv_speed_smoke(tmp_path):
    """benchmarks/conv_speed.py, one timed step per model on FSDD's lengths: a ratio for every model."""
    out = tmp_path / "conv.json"
    run_py("benchmarks/conv_speed.py", "--workloads", "fsdd", "--repeats", "1", "--out", str(out), check=True, timeout=300)
    (r,) = json.loads(out.read_text())["results"]
    from benchmarks.conv_speed import MODELS

    assert r["ratio_to_plain"]["plain"] == 1.0 and set(r["ratio_to_plain"]) == set(MODELS)
    assert all(v > 0 for v in r["samples_per_s"].values())
    assert r["parameters"]["front-end + branch"] > r["parameters"]["conv branch"] > r["parameters"]["plain"]


@pytest.mark.slow
def test_archive_models_smoke(tmp_path, examples):
    """benchmarks/archive_models.py on one archive set, one seed, 20 steps: every run's val and test recorded, and a
    second call reads the finished runs instead of training them again."""
    out = tmp_path / "models.json"
    args = ("benchmarks/archive_models.py", "--candidate", "front", "train.min_steps=20", "train.epochs=1",
            "--candidate", "plain", "model.frontend=none", "model.conv_branch=false", "train.min_steps=20", "train.epochs=1",
            "--sets", "JapaneseVowels", "--seeds", "1", "--work", str(tmp_path / "work"), "--out", str(out))
    run_py(*args, check=True, timeout=600)
    report = json.loads(out.read_text())
    for name in ("front", "plain"):
        row = report["sets"]["JapaneseVowels"][name]
        assert len(row["val"]) == len(row["test"]) == 1 and 0 < row["test"][0] <= 1
    again = run_py(*args, check=True, timeout=600)
    assert "done" not in again.stdout + again.stderr and json.loads(out.read_text()) == report
    assert (tmp_path / "work" / "data" / "JapaneseVowels-s1" / "manifest.json").is_file(), "seed 1 on its own split"
