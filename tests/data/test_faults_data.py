"""Bad data, bad disks and hostile inputs at training time: refused clearly, nothing saved is lost."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_jsonl, train_run

from pipeline.data import manifest as mf

SHORT = ("train.max_steps=40", "eval.every_steps=20", "checkpoint.every_steps=20", "wandb.mode=disabled")


def _copy(shards: Path, dst: Path) -> Path:
    shutil.copytree(shards, dst)
    return dst


def _break_header_mid_shard(path: Path) -> None:
    """Damage the checksum of a tar header in the middle of the shard; the size stays the same."""
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    raw = bytearray(path.read_bytes())
    at = offsets[len(offsets) // 2]
    raw[at + 148 : at + 156] = b"XXXXXXXX"
    path.write_bytes(bytes(raw))


def _first_shard_of_epoch0_damaged(data: Path) -> str:
    """The shard epoch 0 reads first (seed 0, data.shuffle_buffer 4096), damaged mid-way: every rank reads it."""
    from pipeline.data import canonical

    sizes = [s.num_samples for s in mf.load_manifest(data).split("train").shards]
    first = canonical.epoch_units(sizes, 0, 0, 4096, 1)[0].pieces[0][0]
    name = f"train-{first:05d}.tar"
    _break_header_mid_shard(data / "train" / name)
    return name


@pytest.mark.slow
@pytest.mark.parametrize("placement,workers", [("stream", 0), ("stream", 1), ("device", 0)])
def test_corrupt_shard_raise_names_it(tmp_path, fashion_shards, placement, workers):
    data = _copy(fashion_shards, tmp_path / "data")
    name = _first_shard_of_epoch0_damaged(data)
    proc = train_run(tmp_path / "out", data, *SHORT, "train.max_steps=300", f"data.num_workers={workers}",
                     f"data.placement={placement}", "train.batch_size=256", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert name in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") < 10, "one clear message, not a wall of text"


@pytest.mark.slow
def test_corrupt_shard_skip_counts_stand_ins_and_keeps_every_step(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "data")
    name = _first_shard_of_epoch0_damaged(data)
    out = tmp_path / "out"
    proc = train_run(out, data, "wandb.mode=disabled", "data.on_error=skip", "train.max_steps=240", "eval.every_steps=120",
                     "checkpoint.every_steps=120", "data.record_sample_ids=true", "data.num_workers=1", nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 240
    # Every read of the bad shard (each epoch reads it once) is reported, by one rank.
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: data.on_error=skip:")]
    assert warned and all(name in line for line in warned), warned
    lost_per_epoch = int(warned[0].split()[2])
    # Each lost sample's place in the trained steps was taken by another sample of its window.
    assert 0 < summary["skipped_samples"] <= len(warned) * lost_per_epoch
    r0, r1 = np.load(out / "sample_ids" / "rank-00000.npy"), np.load(out / "sample_ids" / "rank-00001.npy")
    assert r0.shape == r1.shape == (240, 128), "every rank at the same step count"
    # The stand-ins are the window's, not the rank's: one process (2 accumulation steps) trains the same
    # global batches, stand-ins included.
    one = tmp_path / "one"
    train_run(one, data, "wandb.mode=disabled", "data.on_error=skip", "train.max_steps=240", "eval.every_steps=120",
              "checkpoint.every_steps=120", "data.record_sample_ids=true", "data.num_workers=1")
    np.testing.assert_array_equal(np.load(one / "sample_ids" / "rank-00000.npy"), np.concatenate([r0, r1], axis=1))
    assert json.loads((one / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]


@pytest.mark.slow
def test_truncated_shard_refused_before_training(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "data")
    victim = data / "train" / "train-00005.tar"
    victim.write_bytes(victim.read_bytes()[:10000])
    proc = train_run(tmp_path / "out", data, *SHORT, check=False)
    assert proc.returncode == 1 and "train-00005.tar" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists(), "refused before any training"


@pytest.mark.slow
def test_manifest_problems_refused(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "data")
    raw = json.loads((data / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][3]["num_samples"] += 5  # edited by hand
    (data / "manifest.json").write_text(json.dumps(raw))
    proc = train_run(tmp_path / "a", data, *SHORT, check=False)
    assert proc.returncode == 1 and "manifest" in proc.stderr and "Traceback" not in proc.stderr

    m = mf.load_manifest(fashion_shards)
    del m.splits["test"]
    m.fingerprint = mf.fingerprint(m)
    mf.write_manifest(m, data)
    proc = train_run(tmp_path / "b", data, *SHORT, check=False)
    assert proc.returncode == 1 and "the test split is recorded as made (source)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b" / "checkpoints").exists(), "refused before training"


@pytest.mark.parametrize("url", ["../../../../etc/hostname", "/etc/hostname", "file:///etc/hostname",
                                 "train/../../../../../etc/hostname"])
def test_shard_url_leaving_the_dataset_is_refused(tmp_path, fashion_shards, url):
    # The fingerprint is recomputed to match: only the url itself can give the manifest away.
    data = _copy(fashion_shards, tmp_path / "data")
    m = mf.load_manifest(data)
    m.splits["train"].shards[0].url = url
    m.fingerprint = mf.fingerprint(m)
    mf.write_manifest(m, data)
    proc = train_run(tmp_path / "out", data, *SHORT, "data.verify=none", check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"lists shard url '{url}' (split train)" in proc.stderr and "etc/hostname" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_shard_urls_inside_the_dataset_pass():
    for url in ("train/train-00000.tar", "train/./a.tar", "train/../test/b.tar", "shard.tar"):
        assert mf.unsafe_url_reason(url) is None, url
    for url in ("..", ".", "", "a\\..\\b", "s3://bucket/x.tar", "pipe:cat /etc/passwd", "C:/x"):
        assert mf.unsafe_url_reason(url), url


def test_unwritable_output_dir_refused(tmp_path, fashion_shards):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = train_run(blocker / "out", fashion_shards, *SHORT, check=False)
    assert proc.returncode == 1 and "not writable" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a few MiB (tmpfs): needs root, as CI and the dev machines have."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size_mib: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_too_small_refused_before_training(tmp_path, fashion_shards, small_disk):
    disk = small_disk(2)
    proc = train_run(disk / "out", fashion_shards, *SHORT, check=False)
    assert proc.returncode == 1 and "MiB free" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_disk_full_mid_run_keeps_previous_checkpoint(tmp_path, fashion_shards, small_disk):
    disk = small_disk(24)
    out = disk / "out"
    args = ["launch/train.py", "--config", "configs/cpu_test.yaml", f"data.dir={fashion_shards}", f"output_dir={out}", "train.device=cpu",
            "train.progress_bar=false", "wandb.mode=disabled", "train.max_steps=3000", "checkpoint.every_steps=25",
            "eval.every_steps=1000"]
    proc = subprocess.Popen([sys.executable, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000025" / "state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:  # fill the disk, as another job on the volume would
            f.write(b"\0" * (free - 4096))
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, stderr[-2000:]
    assert "failed" in stderr and "is kept" in stderr and "Traceback" not in stderr
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept and not list((out / "checkpoints").glob(".tmp-*")), "no partial checkpoint left behind"
    from safetensors.torch import load_file

    assert load_file(out / "checkpoints" / kept[-1] / "model.safetensors"), "the previous checkpoint is loadable"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_remote_shards_over_http_and_pipe(tmp_path, fashion_shards, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(fashion_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "http"
        train_run(out, fashion_shards, *SHORT, f"data.base_url=http://127.0.0.1:{server.server_address[1]}")
        assert json.loads((out / "summary.json").read_text())["completed"]
    finally:
        server.shutdown()
    refused = train_run(tmp_path / "p", fashion_shards, *SHORT, f"data.base_url=pipe:cat {fashion_shards}", check=False)
    assert refused.returncode == 2 and "data.allow_pipe" in refused.stderr
    out = tmp_path / "pipe"
    train_run(out, fashion_shards, *SHORT, f"data.base_url=pipe:cat {fashion_shards}", "data.allow_pipe=true")
    assert json.loads((out / "summary.json").read_text())["completed"]


@pytest.mark.slow
def test_tokens_and_keys_reach_no_file(tmp_path, fashion_shards, monkeypatch):
    secret = "tok-" + "5f3a9c" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", "fakekey-" + "ab12" * 8)
    out = tmp_path / "out"
    proc = train_run(out, fashion_shards, *SHORT[:-1], "wandb.mode=offline")
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and (secret.encode() in p.read_bytes() or b"fakekey-ab12" in p.read_bytes())]
    assert leaked == []
    assert secret not in proc.stdout + proc.stderr
    assert read_jsonl(out / "metrics.jsonl")
