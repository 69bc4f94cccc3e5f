"""`prepare_data.py --force` never loses the earlier data set: the new one is built beside --out and
swapped in at the end (pipeline/data/replace.py). Real processes, real signals, a real small filesystem;
the earlier data set's bytes (every file's sha256 under --out) are compared before and after."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_py

from pipeline.data.manifest import load_manifest

PAUSED = "fault: prepare paused at"


def _npz(path: Path, cases: int = 300, seed: int = 0, features: int = 4, steps: tuple[int, int] = (5, 20)) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*steps, cases)
    values = rng.normal(size=(int(lengths.sum()), features)).astype(np.float32)
    np.savez(path, X=values, lengths=lengths, y=np.arange(cases) % 3)
    return path


def _digest(out: Path) -> dict[str, str]:
    """Every entry under `out`: a file's sha256, or 'dir'."""
    return {str(p.relative_to(out)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))}


def _beside(out: Path) -> list[str]:
    """What lies next to --out in its parent (the tests give each --out a parent of its own)."""
    return sorted(name for name in os.listdir(out.parent) if name != out.name)


def _prepare(src: Path, out: Path, *args: str, env: dict | None = None):
    return run_py("launch/prepare_data.py", "--from", str(src), "--out", str(out), "--name", "good", *args, env=env)


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.fixture
def earlier(tmp_path) -> tuple[Path, dict[str, str]]:
    """A data set prepared before, alone in its parent directory, and its digest."""
    out = tmp_path / "vol" / "d"
    proc = _prepare(_npz(tmp_path / "good.npz"), out)
    assert proc.returncode == 0, proc.stderr
    return out, _digest(out)


def _paused(src: Path, out: Path, phase: str, *args: str) -> subprocess.Popen:
    """prepare_data.py --force stopped at `phase` by its test-only pause; returns once it is there."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_FAULT": f"prepare-pause:{phase}"}
    cmd = [sys.executable, "launch/prepare_data.py", "--from", str(src), "--out", str(out), "--name", "good", "--force", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(PAUSED):
            return proc
    proc.wait(timeout=30)
    raise AssertionError(f"no pause at {phase} (exit {proc.returncode}): {''.join(seen)}{proc.stderr.read()[-3000:]}")


def test_a_bad_flag_keeps_the_earlier_data_set(earlier, tmp_path):
    out, before = earlier
    proc = _prepare(_npz(tmp_path / "other.npz", seed=1), out, "--force", "--test-shards", "1000")
    assert proc.returncode == 1 and "ask for at most" in _one_line(proc.stderr)
    assert _digest(out) == before and _beside(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["staging", "shards", "manifest"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_at_any_phase_keeps_the_earlier_data_set(earlier, tmp_path, phase, sig):
    out, before = earlier
    proc = _paused(_npz(tmp_path / "other.npz", seed=1), out, phase)
    assert _beside(out), "the new data set is being built beside --out"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert _digest(out) == before
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and _beside(out)  # what a kill leaves, until the next run
        rerun = _prepare(tmp_path / "good.npz", out)
        assert rerun.returncode == 0 and "already holds a complete good dataset" in rerun.stdout, rerun.stderr
        notes = [line for line in rerun.stdout.splitlines() if line.startswith("note: removed what an interrupted")]
        assert len(notes) == 1, rerun.stdout
    else:
        assert proc.returncode == 128 + sig, stderr
        assert _one_line(stderr) == f"prepare_data: interrupted by {sig.name}; {out} is unchanged (the earlier data set is kept)\n"
    assert _digest(out) == before and _beside(out) == []


def test_ctrl_c_in_a_first_preparation_leaves_nothing(tmp_path):
    out = tmp_path / "vol" / "new"
    proc = _paused(_npz(tmp_path / "good.npz"), out, "shards")
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and _one_line(stderr) == f"prepare_data: interrupted by SIGINT; nothing was written to {out}\n"
    assert os.listdir(out.parent) == []


def test_a_kill_between_the_two_renames_is_undone_by_the_next_run(earlier, tmp_path):
    """Where the filesystem cannot exchange, the swap is two renames; --out is missing between them."""
    out, before = earlier
    proc = _paused(_npz(tmp_path / "other.npz", seed=1), out, "renamed")
    assert not out.exists()
    proc.kill()
    proc.wait(timeout=30)
    rerun = _prepare(tmp_path / "good.npz", out)
    assert rerun.returncode == 0 and "already holds a complete good dataset" in rerun.stdout, rerun.stderr
    assert f"note: put the earlier data set back in {out}" in rerun.stdout
    assert _digest(out) == before and _beside(out) == []


def test_a_signal_after_the_swap_lets_the_run_finish(earlier, tmp_path):
    """Once the new data set has taken --out's place, SIGTERM is noted and the run ends as it would have:
    --out holds exactly what a fresh preparation gives, in a directory of the same permissions."""
    out, before = earlier
    out.chmod(0o750)
    other = _npz(tmp_path / "other.npz", seed=1)
    proc = _paused(other, out, "swapped")
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and "prepared good" in stdout and stderr == "", stderr
    fresh = tmp_path / "fresh" / "d"
    assert _prepare(other, fresh).returncode == 0
    assert _digest(out) == _digest(fresh) != before and _beside(out) == []
    assert (out.stat().st_mode & 0o777) == 0o750


def test_a_kill_after_the_swap_leaves_the_new_data_set_and_the_next_run_tidies(earlier, tmp_path):
    out, before = earlier
    other = _npz(tmp_path / "other.npz", seed=1)
    proc = _paused(other, out, "swapped")
    proc.kill()
    proc.wait(timeout=30)
    after = _digest(out)
    assert after != before and load_manifest(out).dataset == "good"
    rerun = _prepare(other, out)
    assert rerun.returncode == 0 and "note: removed what an interrupted preparation left" in rerun.stdout, rerun.stdout
    assert _digest(out) == after and _beside(out) == []


def test_a_noop_rerun_removes_an_old_staging_and_a_killed_runs_leftovers(earlier, tmp_path):
    """The issue: 'Interrupted preparation leaves .staging (289 MB after a SIGTERM) that a no-op rerun never removes'."""
    out, before = earlier
    (out / ".staging").mkdir()
    (out / ".staging" / "values.bin").write_bytes(b"\0" * 300_000)  # as the previous version left it
    killed = out.parent / ".d.prepare-4242"  # as a SIGKILL leaves a build beside --out
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "train-00000.tar.tmp").write_bytes(b"half a shard")
    (out.parent / ".d.prepare.lock").write_text("4242\n")  # its lock file, no longer held by anyone
    proc = _prepare(tmp_path / "good.npz", out)
    assert proc.returncode == 0 and "already holds a complete good dataset" in proc.stdout, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and ".d.prepare-4242" in notes[0] and "d/.staging" in notes[0], proc.stdout
    assert _digest(out) == before and _beside(out) == []


def test_a_second_preparation_of_the_same_directory_is_refused_while_one_runs(earlier, tmp_path):
    out, before = earlier
    other = _npz(tmp_path / "other.npz", seed=1)
    first = _paused(other, out, "shards")
    try:
        second = _prepare(other, out, "--force")
        assert second.returncode == 1 and f"another preparation of --out {out} is running (pid {first.pid}" in _one_line(second.stderr)
        assert _digest(out) == before
        stdout, stderr = first.communicate("\n", timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "prepared good" in stdout, stderr
    assert _digest(out) != before and _beside(out) == []


# -- a real small filesystem ------------------------------------------------------------------------


@pytest.fixture
def mounted(tmp_path):
    """mount(ARGS...) -> a directory with that mounted on it, unmounted after the test. Needs root, as CI and
    the dev machines have; CI sets PIPELINE_REQUIRE_CONTAINERS=1, and there not being able to mount is a failure."""
    points = []

    def mount(*args: str) -> Path:
        point = tmp_path / f"mount{len(points)}"
        point.mkdir()
        proc = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            problem = f"cannot mount here ({proc.stderr.strip()}); needs root"
            if os.environ.get("PIPELINE_REQUIRE_CONTAINERS") == "1":
                pytest.fail(problem)
            pytest.skip(problem)
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def small_disk(mounted):
    """A real filesystem of a few hundred KiB (tmpfs)."""
    return lambda size_kib: mounted("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs")


def _earlier_on(disk: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    out = disk / "vol" / "d"
    proc = _prepare(_npz(tmp_path / "good.npz"), out)
    assert proc.returncode == 0, proc.stderr
    return out, _digest(out)


def test_a_second_data_set_that_cannot_fit_is_refused_before_its_shards(tmp_path, small_disk):
    disk = small_disk(2048)
    out, before = _earlier_on(disk, tmp_path)
    bigger = _npz(tmp_path / "bigger.npz", cases=2000, seed=1, features=8, steps=(10, 24))  # ~1.1 MiB of steps
    proc = _prepare(bigger, out, "--force")
    assert proc.returncode == 1, proc.stderr
    message = _one_line(proc.stderr)
    for needle in (f"not enough space to prepare {out}", f"{disk / 'vol'} has", "MiB free", "needs about", "MiB of shards",
                   "earlier data set", f"{out} is unchanged"):
        assert needle in message, message
    assert _digest(out) == before and _beside(out) == []


def test_a_disk_filled_while_staging_keeps_the_earlier_data_set(tmp_path, small_disk):
    disk = small_disk(2048)
    out, before = _earlier_on(disk, tmp_path)
    huge = _npz(tmp_path / "huge.npz", cases=3000, seed=1, features=16, steps=(10, 24))  # ~3.1 MiB of steps
    proc = _prepare(huge, out, "--force")
    assert proc.returncode == 1, proc.stderr
    message = _one_line(proc.stderr)
    assert "No space left on device" in message and "needs more than" in message and "MiB free" in message, message
    assert _digest(out) == before and _beside(out) == []


def test_a_disk_filled_while_shards_are_written_keeps_the_earlier_data_set(tmp_path, small_disk):
    disk = small_disk(2048)
    out, before = _earlier_on(disk, tmp_path)
    proc = _paused(_npz(tmp_path / "other.npz", seed=1), out, "shards")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:  # another writer takes what is left, as on a shared volume
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError:
                pass
        stdout, stderr = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        (disk / "filler").unlink(missing_ok=True)
    assert proc.returncode == 1, stderr
    assert "No space left on device" in _one_line(stderr) and "needs about" in stderr, stderr
    assert _digest(out) == before and _beside(out) == []


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_a_mount_point_takes_a_first_data_set_and_never_has_one_replaced(tmp_path, mounted, kind):
    """A claim mounted at --out (Kubernetes' /data) gets its first data set, built inside it and moved into
    place; a data set there is never replaced (a mount point cannot be swapped). A bind mount of a directory
    on the same filesystem too, which os.path.ismount does not see."""
    (tmp_path / "shared").mkdir()
    disk = mounted("-t", "tmpfs", "-o", "size=1024k", "tmpfs") if kind == "tmpfs" else mounted("--bind", str(tmp_path / "shared"))
    killed = _paused(_npz(tmp_path / "good.npz"), disk, "shards")  # a first preparation killed half-way
    killed.kill()
    killed.wait(timeout=30)
    assert [name for name in os.listdir(disk) if name.startswith(".prepare-")], "its build lies inside the mount"
    first = _prepare(tmp_path / "good.npz", disk)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert "note: removed what an interrupted preparation left" in first.stdout
    assert sorted(os.listdir(disk)) == ["manifest.json", "test", "train", "val"], "no build or lock left inside"
    assert run_py("launch/prepare_data.py", "--verify", str(disk)).returncode == 0
    before = _digest(disk)
    again = _prepare(_npz(tmp_path / "good.npz"), disk)
    assert again.returncode == 0 and "already holds a complete good dataset" in again.stdout, again.stderr
    proc = _prepare(_npz(tmp_path / "other.npz", seed=1), disk, "--force")
    assert proc.returncode == 1, proc.stderr
    message = _one_line(proc.stderr)
    assert f"--out {disk} is a mount point that already holds a data set" in message and f"--out {disk}/good" in message
    assert _digest(disk) == before and not [name for name in os.listdir(tmp_path) if name.startswith(".")]
