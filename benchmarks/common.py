"""Small helpers shared by the benchmark sections: timing, medians, tables, subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Run fn (which returns how many samples it handled); return (seconds, samples)."""
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def rate_reps(fn: Callable[[], int], reps: int) -> dict:
    """Warm up once, then `reps` timed repetitions; samples/s of each and their median."""
    samples = fn()
    rates = []
    for _ in range(reps):
        seconds, n = timed(fn)
        rates.append(n / seconds)
    return {"samples_per_s": median(rates), "reps_samples_per_s": [round(r, 1) for r in rates], "samples": samples}


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


@contextlib.contextmanager
def quiet(log_path: Path):
    """Send the trainer's own prints (tqdm.write goes to sys.stdout) to a log while it runs in-process."""
    sink = open(log_path, "a")
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        sink.close()


def env_for_children(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.update(extra or {})
    return env


def read_events(path: Path) -> list[dict]:
    """A run's metrics.jsonl events so far; a last line still being written ends the list."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def stop_processes(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to all at once (the trainer checkpoints and exits), then SIGKILL whatever outlives the grace."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_checked(args: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env_for_children(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells[1:]]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
