"""Section 3: time to accuracy. The classic tutorial (benchmarks/classic_tutorial.py) runs one
epoch and records its test accuracy; each of our configs (the speed recipe
configs/fashion_mnist_fast.yaml, then the quality config configs/fashion_mnist.yaml) then runs
until a rank-zero evaluation first reaches that accuracy, and is stopped there.

Two clocks, the same for both sides:
- end to end: from launching the command (a fresh Python process) to the moment the accuracy is
  known (the baseline's RESULT line; the pipeline's eval event in metrics.jsonl, polled every
  0.1 s). Start-up (imports, data, model) counts here.
- training: from the first training batch to the accuracy being known, evaluations included (the
  baseline's `training_seconds`; the trainer's `time_s`).
`tta_ratio` is the speed recipe's end-to-end ratio; `tta_ratio_training_clocks` its training one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import PY, ROOT, env_for_children, read_events, say, stop_processes


def run_baseline(tv_root: Path, work: Path, timeout: float, max_batches: int | None = None, device: str = "cpu") -> dict:
    out_json = work / "baseline.json"
    args = [PY, str(ROOT / "benchmarks" / "classic_tutorial.py"), "--root", str(tv_root), "--json", str(out_json),
            "--device", device]
    if max_batches:
        args += ["--max-batches", str(max_batches)]
    launch = time.perf_counter()
    # One pipe: reading only stdout while stderr fills its pipe would block both processes.
    proc = subprocess.Popen(args, cwd=ROOT, env=env_for_children(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    known_at, output = None, []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("RESULT "):
            known_at = time.perf_counter() - launch
    proc.wait(timeout=timeout)
    if proc.returncode != 0 or known_at is None:
        raise RuntimeError(f"classic tutorial baseline failed ({proc.returncode}): {''.join(output)[-3000:]}")
    own = json.loads(out_json.read_text())
    return {"accuracy": own["accuracy"], "seconds": known_at, "own_clock_seconds": own["seconds"],
            "training_seconds": own["training_seconds"],
            "train_samples_per_s": own["train_samples_per_s"], "train_samples": own["train_samples"]}


def run_until(args: list[str], metrics: Path, target: float, timeout: float, log: Path, env: dict | None = None) -> dict:
    """Launch a trainer command; stop it (SIGTERM, then SIGKILL) once an eval event reaches `target`."""
    metrics.unlink(missing_ok=True)
    launch = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, cwd=ROOT, env=env_for_children(env), stdout=sink, stderr=subprocess.STDOUT)
        hit, evals, known_at = None, [], None
        try:
            while True:
                evals = [e for e in read_events(metrics) if "eval/accuracy" in e]
                hit = next((e for e in evals if e["eval/accuracy"] >= target), None)
                if hit is not None:
                    known_at = time.perf_counter() - launch
                    break
                if proc.poll() is not None or time.perf_counter() - launch > timeout:
                    break
                time.sleep(0.1)
        finally:
            stop_processes([proc], grace_s=60)
    return {
        "reached": hit is not None,
        "seconds": known_at,
        "training_seconds": hit.get("time_s") if hit else None,
        "step": hit["step"] if hit else None,
        "accuracy": hit["eval/accuracy"] if hit else None,
        "evals": [{"step": e["step"], "accuracy": e["eval/accuracy"], "time_s": e.get("time_s")} for e in evals],
        "exit_code": proc.returncode,
        "time_s_field_present": bool(evals) and all("time_s" in e for e in evals),
    }


def trainer_args(config: str, data_dir: Path, out: Path, overrides: list[str] = ()) -> list[str]:
    # eval.split=test: the tutorial reports test accuracy, so the race is run on the same split. It
    # measures time; no recipe is chosen by it (they are chosen on the validation split).
    return [PY, str(ROOT / "launch" / "train.py"), "--config", config, f"data.dir={data_dir}", f"output_dir={out}",
            "wandb.mode=disabled", "train.progress_bar=false", "eval.split=test", *overrides]


def time_to(target: float, config: str, data_dir: Path, work: Path, overrides: list[str] = (), timeout: float = 1800,
            device: str = "cpu") -> dict:
    """One of our configs, launched fresh, until its first evaluation at `target` or better."""
    out, log = work / f"tta-{Path(config).stem}", work / f"tta-{Path(config).stem}.log"
    shutil.rmtree(out, ignore_errors=True)
    ours = run_until(trainer_args(config, data_dir, out, [f"train.device={device}", *overrides]), out / "metrics.jsonl",
                     target, timeout, log)
    if not ours["reached"]:
        raise RuntimeError(f"{config} never reached {target:.4f} (exit {ours['exit_code']}):\n{log.read_text()[-2000:]}")
    return {**ours, "target": target, "config": config, "overrides": list(overrides)}


CONFIGS = ("configs/fashion_mnist_fast.yaml", "configs/fashion_mnist.yaml")  # the first is the speed recipe


def run(data_dir: Path, work: Path, tv_root: Path, timeout: float = 1800, baseline_max_batches: int | None = None,
        overrides: list[str] = (), device: str = "cpu", configs: tuple[str, ...] = CONFIGS) -> dict:
    say(f"time to accuracy on {device}: classic tutorial baseline, one epoch (torchvision + DataLoader, LSTM 28->64, batch 64)")
    base = run_baseline(tv_root, work, timeout, baseline_max_batches, device)
    runs = {}
    for config in configs:
        say(f"time to accuracy: baseline reached {base['accuracy']:.4f} in {base['seconds']:.1f} s; "
            f"now {config} until it first evaluates at that accuracy")
        ours = time_to(base["accuracy"], config, data_dir, work, overrides, timeout, device)
        runs[config] = {**ours, "tta_ratio": ours["seconds"] / base["seconds"],
                        "tta_ratio_training_clocks": ours["training_seconds"] / base["training_seconds"]}
    recipe = runs[configs[0]]
    return {
        "baseline_epoch_accuracy": base["accuracy"],
        "baseline_seconds": base["seconds"],
        "recipe": configs[0],
        "pipeline_seconds_to_baseline_accuracy": recipe["seconds"],
        "tta_ratio": recipe["tta_ratio"],
        "tta_ratio_training_clocks": recipe["tta_ratio_training_clocks"],
        "baseline": base,
        "runs": runs,
        "device": device,
        "timing": "end to end: launch of the command to the accuracy known, both as fresh processes; "
                  "training clocks: first training batch to the accuracy known, evaluations included",
    }
