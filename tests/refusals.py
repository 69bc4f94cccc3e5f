"""Bad input to `launch/prepare_data.py` as a user meets it: a real subprocess, exit 2, one paragraph
(one line on stderr) naming the file and the case, no traceback, and nothing made at --out."""

from __future__ import annotations

from pathlib import Path

from conftest import run_py


def prepare_refused(args: list[str], out: Path, *needles: str) -> str:
    """Run prepare_data.py with `args` and --out `out` (which must not exist); its stderr, once every
    needle is found in it."""
    assert not out.exists(), f"{out} exists before the run"
    proc = run_py("launch/prepare_data.py", *args, "--out", str(out))
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in: {proc.stderr}"
    assert not out.exists(), f"{out} was created by a refused run"
    return proc.stderr


def prepare_ok(args: list[str], out: Path) -> str:
    """Run prepare_data.py with `args` and --out `out`; its stdout (stderr must be empty: nothing half-said)."""
    proc = run_py("launch/prepare_data.py", *args, "--out", str(out))
    assert proc.returncode == 0 and not proc.stderr, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout
