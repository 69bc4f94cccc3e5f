"""The trainer on a shared CPU: samples/s idle, beside one busy loop and beside two, as ratios.

    python benchmarks/cpu_threads.py --data data/fashion_mnist --out benchmarks/results/cpu-threads.json
    python benchmarks/cpu_threads.py --data data/fashion_mnist --out /tmp/candidates.json \\
        --settings today,ours,passive,threads1,spin1000,spin30000 --configs cpu_test   # the choice

Each trial is a fresh `launch/train.py` process (as `make train` runs a rank: OpenMP reads its
environment when torch loads, so a setting cannot change inside one process), started while
0, 1 or 2 neighbours run: `sh -c 'while :; do :; done'` at the same priority, started and killed
here, and each bounded by `timeout` should this process die first. samples/s are the trainer's own
log windows (evaluation and checkpoints excluded) after a warm-up; a trial still running at
--trial-timeout is stopped and measured on the windows it finished (a collapsed run would take
many minutes). The order is interleaved: for each repetition, each load, each setting in turn;
every figure is the median of --reps.

Settings (environment of the trainer process):
  ours      nothing set: pipeline/distributed/cpu_threads.py chooses (the shipped behaviour)
  today     what `make train` ran before: OMP_NUM_THREADS=<nproc>, libgomp's default waiting
            (GOMP_SPINCOUNT=300000, its value when OMP_WAIT_POLICY is unset), forced
  passive   OMP_NUM_THREADS=<nproc>, OMP_WAIT_POLICY=PASSIVE (sleep at once)
  threads1  OMP_NUM_THREADS=1, default waiting
  spinN     OMP_NUM_THREADS=<nproc>, GOMP_SPINCOUNT=N

Goals (this issue's, on a 2-core machine): ours beside one loop >= 0.6 of ours idle, beside two
>= 0.45, and ours idle >= 0.95 of today idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, ROOT, env_for_children, median, read_events, say, stop_processes, table

OPENMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
LIBGOMP_DEFAULT_SPIN = "300000"  # libgomp's spin count when OMP_WAIT_POLICY is unset (about 3 ms)
CONFIGS = {  # name -> (config file, optimizer steps measured after the warm-up)
    "cpu_test": ("configs/cpu_test.yaml", 300),
    "main": ("configs/fashion_mnist.yaml", 150),  # make train's job; its first steps
}
WARM_STEPS = 10
LOG_EVERY = 5
GOALS = {"ours_beside_one_vs_idle": 0.6, "ours_beside_two_vs_idle": 0.45, "ours_idle_vs_today_idle": 0.95}


def setting_env(name: str, cores: int) -> dict[str, str]:
    """The OpenMP variables of a setting; those not named are removed from the trainer's environment."""
    if name == "ours":
        return {}
    if name == "today":
        return {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN}
    if name == "passive":
        return {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
    if name == "threads1":
        return {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN}
    if name.startswith("spin") and name[4:].isdigit():
        return {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": name[4:]}
    raise SystemExit(f"unknown setting {name!r}: ours, today, passive, threads1 or spinN")


def neighbours(count: int, bound_s: float) -> list[subprocess.Popen]:
    """Busy loops at our priority; `timeout` ends them even if this process is killed first."""
    loop = ["timeout", str(int(bound_s)), "sh", "-c", "while :; do :; done"]
    return [subprocess.Popen(loop, stdin=subprocess.DEVNULL) for _ in range(count)]


def window_rate(events: list[dict], batch: int, warm: int = WARM_STEPS) -> tuple[float | None, int]:
    """samples/s over the trainer's log windows after step `warm`, and the steps they cover."""
    windows = [e for e in events if "train/samples_per_s" in e]
    samples = seconds = 0.0
    prev = max((e["step"] for e in windows if e["step"] <= warm), default=0)
    for e in windows:
        if e["step"] <= warm:
            continue
        n = (e["step"] - prev) * batch
        samples, seconds, prev = samples + n, seconds + n / e["train/samples_per_s"], e["step"]
    return (samples / seconds if seconds else None), int(samples // batch)


def trial(config: str, steps: int, setting: dict[str, str], load: int, work: Path, timeout_s: float) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    total = WARM_STEPS + steps
    env = {k: v for k, v in env_for_children().items() if k not in OPENMP_VARS}
    env.update(setting)
    cmd = [PY, "launch/train.py", "--config", config, f"data.dir={work / 'data'}", f"output_dir={out}",
           f"train.max_steps={total}", f"train.log_every_steps={LOG_EVERY}", f"eval.every_steps={total}",
           f"checkpoint.every_steps={total}", "checkpoint.keep_last=1", "wandb.mode=disabled", "train.progress_bar=false"]
    loops = neighbours(load, timeout_s + 300)  # start-up and stop included
    procs = list(loops)
    try:
        with open(work / "trainer.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.insert(0, proc)
            cut = _wait_training(proc, out / "metrics.jsonl", timeout_s)
    finally:  # the trainer checkpoints on SIGTERM and exits; the loops end with it
        stop_processes(procs, grace_s=10)
    text = (work / "trainer.log").read_text(errors="replace")
    if not cut and proc.returncode != 0:
        raise TrialFailed(f"the trainer exited {proc.returncode}: {text[-1500:]}")
    said = next((line for line in text.splitlines() if line.startswith("[threads]")), None)
    events = read_events(out / "metrics.jsonl")
    global_batch = _global_batch(config)
    rate, measured = window_rate(events, global_batch)
    if rate is not None:
        return {"samples_per_s": rate, "steps_measured": measured, "cut_at_timeout": cut, "threads_line": said}
    rate, measured = window_rate(events, global_batch, warm=0)  # so slow that the warm-up is all it did
    if rate is not None:
        return {"samples_per_s": rate, "steps_measured": measured, "cut_at_timeout": cut, "warm_up_only": True,
                "threads_line": said}
    # Not one window in the time: at most one window's steps were done.
    return {"samples_per_s": LOG_EVERY * global_batch / timeout_s, "upper_bound": True, "steps_measured": 0,
            "cut_at_timeout": cut, "threads_line": said}


class TrialFailed(RuntimeError):
    pass


def _trial_with_retries(config: str, steps: int, setting: dict[str, str], load: int, work: Path, timeout_s: float,
                        tries: int = 3) -> dict:
    """A trainer that fails (not one we stopped) is retried: on a shared working tree, someone's half-saved
    edit can break a start; the failures are kept with the figure."""
    failures = []
    for _ in range(tries):
        try:
            return {**trial(config, steps, setting, load, work, timeout_s), "failed_tries": failures}
        except TrialFailed as err:
            say(f"  trial failed, retrying in 30 s: {str(err)[-300:]}")
            failures.append(str(err)[-1500:])
            time.sleep(30)
    raise SystemExit(f"the trainer failed {tries} times in a row; the last: {failures[-1]}")


def _wait_training(proc: subprocess.Popen, metrics: Path, timeout_s: float, startup_s: float = 180.0) -> bool:
    """Wait for the trainer to end, at most `timeout_s` after its first log window (the imports and the
    data set-up before it do not count: slow beside busy neighbours too, but not what is measured).
    Whether it was cut short."""
    start = time.monotonic()
    first: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if first is None and metrics.is_file() and metrics.stat().st_size:
            first = now
        if now - (start if first is None else first) > (startup_s if first is None else timeout_s):
            return True
        time.sleep(0.2)
    return False


def _global_batch(config: str) -> int:
    from pipeline.config import load_config

    train = load_config(ROOT / config, [f"data.dir={ROOT / 'data'}"]).train
    return train.global_batch_size or train.batch_size


def busy_processes(window_s: float = 1.0) -> list[str]:
    """Other processes using at least a tenth of a CPU over the last `window_s` (the figures mean little
    beside them); this process and its children excluded."""
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in mine]
    for proc in procs:
        try:
            proc.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(window_s)
    rows = []
    for proc in procs:
        try:
            pct = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 10:
            rows.append((pct, f"{proc.pid} {pct:.0f}% {' '.join(proc.info['cmdline'] or [])[:100]}"))
    return [text for _, text in sorted(rows, reverse=True)[:5]]


def wait_quiet(limit_s: float) -> list[str]:
    """Wait up to `limit_s` for other busy processes to end (a shared machine); those still running."""
    deadline = time.monotonic() + limit_s
    others = busy_processes()
    while others and time.monotonic() < deadline:
        time.sleep(5)
        others = busy_processes()
    return others


def openmp_runtime() -> str:
    """Which OpenMP runtime torch loaded in this process (the knobs differ: GOMP_* for GNU, KMP_* for Intel)."""
    import torch  # noqa: F401

    libs = {line.split()[-1] for line in open("/proc/self/maps") if "omp" in line.rsplit("/", 1)[-1]}
    return ", ".join(sorted(libs)) or "none found"


def run(args: argparse.Namespace, work: Path) -> dict:
    cores = len(os.sched_getaffinity(0))
    settings = {name: setting_env(name, cores) for name in args.settings.split(",")}
    rows: list[dict] = []
    for rep in range(args.reps):
        for load in (int(n) for n in args.loads.split(",")):
            for config_name in args.configs.split(","):
                config, steps = CONFIGS[config_name]
                for name, env in settings.items():
                    others = wait_quiet(args.wait_quiet)
                    say(f"rep {rep + 1}/{args.reps}, {load} busy loop(s), {config_name}, {name}"
                        + (f" (also running: {others})" if others else ""))
                    r = _trial_with_retries(config, args.steps or steps, env, load, work, args.trial_timeout)
                    rows.append({"rep": rep, "load": load, "config": config_name, "setting": name, **r,
                                 "load_average": os.getloadavg()[0], "others_busy_before": others,
                                 "others_busy_after": busy_processes()})
                    say(f"  {r['samples_per_s']:,.0f} samples/s" + (" (upper bound: no window finished)" if r.get("upper_bound") else ""))
    return {"settings": settings, "cores": cores, "rows": rows}


RATIOS = {"beside_one_vs_idle": ("1", "0", None), "beside_two_vs_idle": ("2", "0", None),
          "idle_vs_today_idle": ("0", "0", "today")}  # name -> (load, load of the base, setting of the base)


def summarise(results: dict) -> dict:
    """Medians of each figure, and each ratio as the median of its repetitions' ratios: the two figures of
    a ratio come from the same repetition, minutes apart at most, so the VM's drift over the run cancels
    (the ratio of the medians is kept beside it)."""
    by: dict = {}
    for row in results["rows"]:
        key = (row["config"], row["setting"], str(row["load"]))
        by.setdefault(key, {})[row["rep"]] = row["samples_per_s"]
    figures: dict = {}
    for (config, setting, load), reps in by.items():
        figures.setdefault(config, {}).setdefault(setting, {})[load] = median(list(reps.values()))
    ratios: dict = {}
    for config, settings in figures.items():
        for setting in settings:
            out = ratios.setdefault(config, {}).setdefault(setting, {})
            for name, (load, base_load, base_setting) in RATIOS.items():
                top, base = by.get((config, setting, load)), by.get((config, base_setting or setting, base_load))
                if top and base and (base_setting is None or base_setting in settings):
                    paired = [top[rep] / base[rep] for rep in sorted(top) if rep in base]
                    out[name] = median(paired)
                    out[f"{name}_by_rep"] = paired
                    out[f"{name}_of_medians"] = figures[config][setting][load] / figures[config][base_setting or setting][base_load]
    goals = {}
    for config, r in ratios.items():
        if "ours" in r:
            goals[config] = {f"ours_{name}": _goal(r["ours"].get(name), GOALS[f"ours_{name}"])
                             for name in ("beside_one_vs_idle", "beside_two_vs_idle", "idle_vs_today_idle")}
    return {"median_samples_per_s": figures, "ratios": ratios, "goals": goals}


def _goal(value: float | None, bound: float) -> dict:
    return {"value": value, "goal": f">= {bound}", "met": None if value is None else value >= bound}


def report(results: dict) -> str:
    parts = []
    for config, by_setting in results["median_samples_per_s"].items():
        rows = [[s, f.get("0"), f.get("1"), f.get("2")] + [results["ratios"][config][s].get(k) for k in RATIOS]
                for s, f in by_setting.items()]
        parts.append(table(f"{config}: samples/s, median of {results['reps']}; ratios: median of the repetitions' ratios",
                           ["setting", "idle", "1 loop", "2 loops", "1 loop / idle", "2 loops / idle", "idle / today idle"], rows))
    for config, g in results["goals"].items():
        parts.append(f"{config} goals: " + "; ".join(f"{k} {v['value']:.3f} ({v['goal']}: {'met' if v['met'] else 'MISSED'})"
                                                   for k, v in g.items() if v["value"] is not None))
    return "\n\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="prepared Fashion-MNIST (make data)")
    p.add_argument("--out", required=True, type=Path, help="JSON results file")
    p.add_argument("--settings", default="today,ours", help="comma-separated: ours, today, passive, threads1, spinN")
    p.add_argument("--configs", default="cpu_test,main", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--report", action="store_true", help="measure nothing: summarise --out again and print its tables")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loads", default="0,1,2", help="busy loops beside the trainer, comma-separated")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each trial, wait up to this many seconds for other busy processes to end")
    p.add_argument("--steps", type=int, help="steps measured after the warm-up (default: 300 cpu_test, 150 main)")
    p.add_argument("--trial-timeout", type=float, default=45.0,
                   help="seconds of training (from its first log window) before a trial is stopped and measured as it is")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Stopped with SIGTERM: unwind, so that the trainer and the busy loops of the trial are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        results = json.loads(args.out.read_text())
        results.update(summarise(results))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(report(results))
        return 0
    if not (args.data / "manifest.json").is_file():
        print(f"error: {args.data} holds no manifest.json; run: make data", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        (work / "data").symlink_to(args.data.resolve())
        started = time.time()
        results = {"command": " ".join(sys.argv), "openmp_runtime": openmp_runtime(), "reps": args.reps,
                   "warm_steps": WARM_STEPS, "trial_timeout_s": args.trial_timeout,
                   "busy_at_start": busy_processes(), "load_average_start": os.getloadavg()[0], **run(args, work)}
    results.update(summarise(results), seconds=time.time() - started, load_average_end=os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
