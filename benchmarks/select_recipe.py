"""Choose a recipe on the validation split, then score only the chosen one on test.

    python benchmarks/select_recipe.py --spec benchmarks/recipes/lstm_092.yaml --data data/fashion_mnist \
        --work runs/select --device cuda --seeds 0,1,2 --parallel 6

A spec lists candidates, each a config plus `key=value` overrides. Every candidate trains with
every seed, each run in its own process, `--parallel` at a time (on a GPU they share it: one
small LSTM leaves most of an H200 idle). The candidate with the highest mean final validation
accuracy over the seeds wins; a tie (a small validation split that every good candidate gets
right) goes to the lowest mean validation loss. The report gives every run's validation figures and the test
accuracy of the winner's runs alone: the trainer scores each run on test when it ends, but only
a figure that played no part in the choice is honest to publish, so the others' test scores are
never read.

Small data sets: one validation split of a few dozen cases cannot tell recipes apart. `--data`
then takes one prepared copy per seed, each holding out another validation split (prepare_data.py
--split-seed N), and seed N's runs train on copy N (repeated hold-out): every candidate is judged
on all of them, and the test split, the source's own, is the same in each.

`--deadline-s` bounds the whole selection: a run still going then is stopped (SIGTERM: it
checkpoints, and `--resume auto` could continue it) and reported as unfinished with its last
validation figure, so a time-boxed machine still returns what it learned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.common import PY, ROOT, env_for_children, read_events, say, stop_processes, table
from pipeline.config import load_config
from pipeline.errors import ConfigError


@dataclass
class Candidate:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    why: str = ""


@dataclass
class Run:
    candidate: Candidate
    seed: int
    out: Path
    data: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    result: dict = field(default_factory=dict)


def load_spec(path: Path, extra: list[str] | tuple[str, ...] = ()) -> list[Candidate]:
    """The spec's candidates, each with `extra` overrides appended, every one validated as a config."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"error: cannot read the candidate spec {path} ({err}); give a YAML file with "
                         "`candidates: [{name, config, overrides}]`") from None
    items = raw.get("candidates") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise SystemExit(f"error: {path} lists no candidates; it needs `candidates:` with at least one "
                         "`{name, config, overrides}` entry")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"name", "config"} <= set(item) or set(item) - {"name", "config", "overrides", "why"}:
            raise SystemExit(f"error: {path}, candidates[{i}]: each candidate has `name` and `config` and may have "
                             f"`overrides` (a list of key=value) and `why`; got {item!r}")
        if not (ROOT / item["config"]).is_file():
            raise SystemExit(f"error: {path}, candidate {item['name']}: config {item['config']} does not exist")
        overrides = [str(o) for o in item.get("overrides") or []] + list(extra)
        candidate = Candidate(item["name"], item["config"], overrides, item.get("why", ""))
        try:  # a bad override fails here, not hours later in one candidate's runs
            load_config(ROOT / candidate.config, candidate.overrides)
        except ConfigError as err:
            raise SystemExit(f"error: {path}, candidate {candidate.name}: {err}") from None
        out.append(candidate)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: {path}: candidate names must be unique; got {names}")
    return out


def command(run: Run, device: str, precision: str | None) -> list[str]:
    args = [PY, str(ROOT / "launch" / "train.py"), "--config", run.candidate.config, f"data.dir={run.data}",
            f"output_dir={run.out}", f"train.seed={run.seed}", f"train.device={device}", "wandb.mode=disabled",
            "train.progress_bar=false", "checkpoint.keep_last=1"]
    if precision:
        args.append(f"train.mixed_precision={precision}")
    return args + run.candidate.overrides


def read_result(run: Run) -> dict:
    """Validation figures from what the run wrote; the test figure is read only for the winner."""
    summary_path = run.out / "summary.json"
    evals = [e for e in read_events(run.out / "metrics.jsonl") if "eval/accuracy" in e]
    last = evals[-1] if evals else {}
    shipped = "eval_ema" if "eval_ema/accuracy" in last else "eval"
    out = {"candidate": run.candidate.name, "seed": run.seed, "finished": summary_path.is_file(),
           "last_eval_step": last.get("step"), "val_accuracy": last.get(f"{shipped}/accuracy"),
           "val_loss": last.get(f"{shipped}/loss"),
           "seconds": round(time.perf_counter() - run.started, 1) if run.started else None}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        out.update(val_accuracy=summary["final_eval_accuracy"], best_val_accuracy=summary["best_eval_accuracy"],
                   training_seconds=summary["wall_s"], steps=summary["steps"], weights=summary.get("weights"),
                   mixed_precision=summary.get("mixed_precision"))
    return out


def run_all(runs: list[Run], device: str, precision: str | None, parallel: int, deadline: float) -> None:
    active: list[Run] = []
    try:
        _run_all(runs, active, device, precision, parallel, deadline)
    except BaseException:
        # Ctrl-C or SIGTERM to the selection: the runs (in sessions of their own, so that a terminal's
        # Ctrl-C does not reach them half-way through a step) are stopped the way a deadline stops them.
        stop_all(active, "the selection was stopped")
        raise


def _run_all(runs: list[Run], active: list[Run], device: str, precision: str | None, parallel: int,
             deadline: float) -> None:
    pending = list(runs)
    while pending or active:
        while pending and len(active) < parallel and time.perf_counter() < deadline:
            run = pending.pop(0)
            run.out.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.out.parent / f"{run.out.name}.log", "w")
            say(f"start {run.candidate.name} seed {run.seed}")
            run.started = time.perf_counter()
            run.proc = subprocess.Popen(command(run, device, precision), cwd=ROOT, env=env_for_children(),
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            active.append(run)
        if not active and pending:  # the deadline passed before these could start
            for run in pending:
                run.result = {"candidate": run.candidate.name, "seed": run.seed, "finished": False, "not_started": True}
            return
        time.sleep(1.0)
        if time.perf_counter() > deadline:
            stop_all(active, "deadline")
        for run in [r for r in active if r.proc.poll() is not None]:
            run.result = read_result(run)
            run.result["exit_code"] = run.proc.returncode
            say(f"{run.candidate.name} seed {run.seed}: exit {run.proc.returncode}, "
                f"validation {run.result.get('val_accuracy')}, {run.result.get('seconds')} s")
            active.remove(run)


def stop_all(active: list[Run], why: str) -> None:
    """Every run at once, as a deadline or a stopped selection asks."""
    for run in active:
        say(f"{why}: stopping {run.candidate.name} seed {run.seed}")
    stop_processes([run.proc for run in active], grace_s=20)


def mean_spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 5), "min": min(values), "max": max(values),
            "range": round(max(values) - min(values), 5), "values": values} if values else {}


def choose(val_by_candidate: dict[str, dict]) -> str:
    """The highest mean validation accuracy; among equals, the lowest mean validation loss."""
    def rank(name: str) -> tuple[float, float]:
        loss = val_by_candidate[name]["loss_mean"]
        return val_by_candidate[name]["mean"], -(math.inf if loss is None else loss)

    return max(val_by_candidate, key=rank)


def select(candidates: list[Candidate], seeds: list[int], work: Path, data: list[Path], device: str,
           precision: str | None, parallel: int, deadline_s: float) -> dict:
    """`data`: one prepared data set for every seed, or one for each seed, in the seeds' order."""
    copies = dict(zip(seeds, data if len(data) == len(seeds) else data * len(seeds), strict=True))
    runs = [Run(c, s, work / f"{c.name}-seed{s}", copies[s]) for s in seeds for c in candidates]  # seed-major
    run_all(runs, device, precision, parallel, time.perf_counter() + deadline_s)
    report: dict = {"device": device, "seeds": seeds, "data": {s: str(d) for s, d in copies.items()},
                    "runs": [r.result for r in runs],
                    "candidates": {c.name: {"config": c.config, "overrides": c.overrides, "why": c.why} for c in candidates}}
    complete = {}
    for c in candidates:
        mine = [r.result for r in runs if r.candidate is c]
        if all(r.get("finished") and r.get("exit_code") == 0 for r in mine):
            losses = [r["val_loss"] for r in mine if r.get("val_loss") is not None]
            complete[c.name] = {**mean_spread([r["val_accuracy"] for r in mine]),  # no loss logged: it loses ties
                                "loss_mean": round(statistics.fmean(losses), 5) if len(losses) == len(mine) else None}
    report["val_by_candidate"] = complete
    if not complete:
        report["winner"] = None
        return report
    name = choose(complete)
    say(f"chosen on validation: {name} (mean {complete[name]['mean']:.4f})")
    winners = [r for r in runs if r.candidate.name == name]
    for run in winners:  # the winner's runs alone are scored on test
        run.result["test_accuracy"] = json.loads((run.out / "summary.json").read_text())["test_accuracy"]
    report.update(winner=name, winner_runs=[r.result for r in winners], winner_val=complete[name],
                  winner_test=mean_spread([r.result["test_accuracy"] for r in winners]))
    return report


def render(report: dict) -> str:
    val = report.get("val_by_candidate", {})
    rows = [[r["candidate"], r["seed"], r.get("val_accuracy"), r.get("best_val_accuracy"), r.get("val_loss"),
             r.get("training_seconds"), "yes" if r.get("finished") else "no"] for r in report["runs"]]
    parts = [table("Every run (validation only)", ["candidate", "seed", "val (final)", "val (best)", "val loss",
                                                   "training s", "finished"], rows)]
    rows = [[name, s["mean"], s["range"], s.get("loss_mean")]
            for name, s in sorted(val.items(), key=lambda kv: (-kv[1]["mean"], math.inf if kv[1].get("loss_mean") is None else kv[1]["loss_mean"]))]
    parts.append(table("Candidates that finished every seed", ["candidate", "val mean", "val range", "val loss mean"], rows))
    if report.get("winner"):
        rows = [[r["seed"], r.get("val_accuracy"), r.get("test_accuracy"), r.get("training_seconds")] for r in report["winner_runs"]]
        parts.append(table(f"Chosen on validation: {report['winner']}", ["seed", "val", "test", "training s"], rows))
        t = report["winner_test"]
        parts.append(f"test: mean {t['mean']:.4f}, range {t['range']:.4f} over {len(t['values'])} seeds")
    else:
        parts.append("no candidate finished every seed: nothing chosen")
    return "\n\n".join(parts)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, type=Path, help="YAML: candidates: [{name, config, overrides, why}]")
    p.add_argument("--data", required=True, help="prepared dataset with a validation split; or comma-separated, "
                   "one per seed (repeated hold-out: each copy prepared with its own --split-seed)")
    p.add_argument("--work", required=True, type=Path, help="where each run's output_dir goes")
    p.add_argument("--out", type=Path, help="report JSON (default WORK/selection.json)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), help="override train.mixed_precision")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (they share the device)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the cores divided among the runs)")
    p.add_argument("--deadline-s", type=float, default=24 * 3600.0)
    p.add_argument("--extra", action="append", default=[], help="key=value added to every candidate (smoke tests)")
    args = p.parse_args(argv)
    candidates = load_spec(args.spec, args.extra)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        if len(set(seeds)) != len(seeds):
            raise ValueError
    except ValueError:
        print(f"error: --seeds takes distinct comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    data = [Path(d).resolve() for d in args.data.split(",")]
    if len(data) not in (1, len(seeds)):
        print(f"error: --data names {len(data)} data sets for {len(seeds)} seeds; give one, or one per seed",
              file=sys.stderr)
        return 2
    for d in data:
        if not (d / "manifest.json").is_file():
            print(f"error: {d} holds no manifest.json; prepare it first (python launch/prepare_data.py --dataset "
                  f"fashion_mnist --out {d}, or --from YOUR_DATA --out {d})", file=sys.stderr)
            return 2
    args.work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by every run: N runs x all cores would thrash
    report = select(candidates, seeds, args.work.resolve(), data, args.device, args.precision,
                    max(1, args.parallel), args.deadline_s)
    out = args.out or args.work / "selection.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0 if report.get("winner") else 1


if __name__ == "__main__":
    sys.exit(main())
