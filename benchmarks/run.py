"""Benchmarks of the data loader, the trainer's throughput, time to accuracy and CPU scaling,
each against its baseline in the same run.

    python benchmarks/run.py --data data/fashion_mnist --out benchmarks/results/cpu.json
    python benchmarks/run.py --quick --data data/fashion_mnist --out benchmarks/results/quick.json
    python benchmarks/run.py --device cuda --data data/fashion_mnist --out benchmarks/results/cuda.json

Sections (--quick runs 1 and 2 with fewer repetitions, in under 3 minutes on 2 CPU cores):
  1. loader      ours (the trainer's TrainStream) vs one-sample-per-tar-member webdataset vs torchvision
  2. throughput  our trainer vs an in-memory floor, same model/optimizer, batch 64 and 256, A B A B
  3. tta         time to the classic tutorial's one-epoch accuracy (fashion_mnist_fast.yaml, fashion_mnist.yaml)
  4. scaling     1 process x 256 vs 2 gloo processes x 128, same steps
  5. profile     where a step of configs/fashion_mnist.yaml spends its time
  6. precision  each mixed precision in a fresh process: floor vs trainer at batch 256..4096 on CUDA
                (64, 256 on the CPU); on CUDA also time to the tutorial's accuracy on the same GPU.
                --device cuda runs loader + precision by default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("loader", "throughput", "tta", "scaling", "profile", "precision")
GOALS = {
    "loader_speedup": (">=", 100.0),
    "loader_samples_per_s": (">=", 300_000.0),
    "train_vs_floor_b64": (">=", 0.95),
    "train_vs_floor_b256": (">=", 0.95),
    "tta_ratio": ("<=", 0.25),
    "tta_ratio_training_clocks": ("<=", 0.25),
    "cuda_min_train_vs_floor": (">=", 0.9),  # fp32 and bf16, every batch size
    "cuda_training_seconds_to_0.91": ("<=", 10.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="prepared dataset (launch/prepare_data.py --out DIR)")
    p.add_argument("--out", required=True, type=Path, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="loader + throughput only, fewer repetitions (< 3 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement (default 3 quick, 5 full)")
    p.add_argument("--steps", type=int, help="measured optimizer steps per throughput run (default 60 quick, 150 full)")
    p.add_argument("--per-sample-samples", type=int,
                   help="samples written in the per-sample layout (default 10000 quick, the whole split full)")
    p.add_argument("--scaling-steps", type=int, default=300)
    p.add_argument("--profile-steps", type=int, default=100)
    p.add_argument("--tta-timeout", type=float, default=1800.0)
    p.add_argument("--baseline-max-batches", type=int, help=argparse.SUPPRESS)  # smoke tests: cut the baseline epoch short
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed afterwards)")
    return p.parse_args(argv)


def environment() -> dict:
    import accelerate
    import numpy
    import torch
    import torchvision
    import webdataset

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"), "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
        # OpenMP's default (active) waiting makes 2-thread torch ~25x slower whenever another process
        # competes for the cores; these say how the run was set up.
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")},
    }


def goals(results: dict) -> dict:
    cuda = results.get("cuda", {})
    values = {
        "loader_speedup": results.get("loader_speedup"),
        "loader_samples_per_s": results.get("loader", {}).get("ours", {}).get("samples_per_s"),
        "train_vs_floor_b64": results.get("train_vs_floor", {}).get("64"),
        "train_vs_floor_b256": results.get("train_vs_floor", {}).get("256"),
        "tta_ratio": results.get("tta_ratio"),
        "tta_ratio_training_clocks": results.get("tta_ratio_training_clocks"),
        "cuda_min_train_vs_floor": min((r["train_vs_floor"] for r in cuda.get("sweep", [])
                                        if r.get("mixed_precision") in ("no", "bf16") and "train_vs_floor" in r), default=None),
        "cuda_training_seconds_to_0.91": cuda.get("time_to_quality", {}).get("training_seconds"),
    }
    out = {}
    for key, (op, bound) in GOALS.items():
        v = values[key]
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out[key] = {"value": v, "goal": f"{op} {bound:g}", "met": met}
    return out


def tta_table(title: str, t: dict) -> str:
    """One table for a tta result (tta.run), on the CPU section and on a GPU alike."""
    from benchmarks.common import table

    rows = [["classic tutorial, 1 epoch (torchvision, batch 64)", t["baseline_epoch_accuracy"], t["baseline_seconds"],
             t["baseline"]["training_seconds"], None, None]]
    rows += [[f"ours, {config}, first eval >= that (step {r['step']})", r["accuracy"], r["seconds"],
              r["training_seconds"], r["tta_ratio"], r["tta_ratio_training_clocks"]] for config, r in t["runs"].items()]
    return table(f"{title} (tta_ratio {t['tta_ratio']:.3f}, training clocks {t['tta_ratio_training_clocks']:.3f}: "
                 f"{t['recipe']})", ["run", "accuracy", "s from launch", "s training", "ratio", "ratio, training"], rows)


def report(results: dict) -> str:
    from benchmarks.common import table

    parts = []
    env = results["environment"]
    parts.append(f"machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, accelerate {env['accelerate']}, "
                 f"webdataset {env['webdataset']}, torchvision {env['torchvision']}; {env['torch_threads']} torch threads, "
                 f"OMP_WAIT_POLICY={env['env']['OMP_WAIT_POLICY'] or 'unset'}; load average at start "
                 f"{results['load_average_start']}, at end {results['load_average_end']}")
    if "loader" in results:
        lo = results["loader"]
        rows = [["ours: packed shards, TrainStream (trainer path)", lo["ours"]["samples_per_s"], lo["ours"]["bytes_on_disk"] / 1e6, 1.0],
                ["  ours + cast to float (InputScale)", lo["ours_with_cast"]["samples_per_s"], None,
                 lo["ours_with_cast"]["samples_per_s"] / lo["ours"]["samples_per_s"]],
                ["  read_blocks only (tar + np.load, no shuffle)", lo["ours_read_blocks_only"]["samples_per_s"], None,
                 lo["ours_read_blocks_only"]["samples_per_s"] / lo["ours"]["samples_per_s"]],
                [f"one sample per tar member, wds default decode ({lo['per_sample']['samples']:,} samples)",
                 lo["per_sample"]["samples_per_s"], lo["per_sample"]["bytes_on_disk"] / 1e6 * 60000 / lo["per_sample"]["samples"],
                 lo["per_sample"]["samples_per_s"] / lo["ours"]["samples_per_s"]],
                ["torchvision FashionMNIST + DataLoader(64), ToTensor (float)", lo["torchvision"]["samples_per_s"], None,
                 lo["torchvision"]["samples_per_s"] / lo["ours"]["samples_per_s"]]]
        parts.append(table(f"1. Loader: read + decode the train split, one process (median of {lo['reps']})",
                           ["layout", "samples/s", "MB for 60k", "vs ours"], rows))
    if "throughput" in results:
        th = results["throughput"]
        rows = [[f"batch {b}", r["floor_samples_per_s"], r["ours_samples_per_s"], r["train_vs_floor"]] for b, r in th["by_batch"].items()]
        parts.append(table(f"2. Training samples/s, {th['config']}, ABAB x {th['reps']} (median)",
                           ["", "in-memory floor", "our trainer", "ours / floor"], rows))
    if "tta" in results:
        parts.append(tta_table("3. Time to the tutorial's accuracy", results["tta"]))
    if "scaling" in results:
        s = results["scaling"]
        rows = [[f"{r['processes']} x {r['per_process_batch']}", r["world_size"], r["steps"], r["samples_per_s"], r["final_eval_accuracy"]] for r in s["runs"]]
        parts.append(table(f"4. CPU scaling, {s['config']}, global batch 256 (2 proc / 1 proc = {s['speedup_2proc']:.2f})",
                           ["processes x batch", "world", "steps", "samples/s", "final accuracy"], rows))
    if "profile" in results:
        pr = results["profile"]
        tr = pr["trainer"]
        rows = [[k, v * 1000, 100 * v / tr["step_seconds_from_trainer"]] for k, v in tr["per_step_seconds"].items()]
        parts.append(table(f"5a. Per step, real trainer, {pr['config']} (batch {tr['batch_size']}, {tr['num_workers']} loader worker; "
                           f"{tr['trainer_samples_per_s']:.0f} samples/s = {tr['step_seconds_from_trainer'] * 1000:.1f} ms/step)",
                           ["piece", "ms/step", "% of step"], rows))
        total = sum(pr["compute_regions_seconds"].values())
        rows = [[k, v * 1000, 100 * v / total] for k, v in pr["compute_regions_seconds"].items()]
        parts.append(table("5b. The step's compute, replica of train_step", ["region", "ms/step", "% of compute"], rows))
    for device in ("cpu", "cuda"):
        if device not in results:
            continue
        c = results[device]
        rows = [[r["mixed_precision"], r.get("batch_size"), r.get("floor_samples_per_s"), r.get("samples_per_s"),
                 r.get("train_vs_floor"), r.get("eval_seconds"), r.get("skipped")] for r in c["sweep"]]
        parts.append(table(f"6. Precision sweep on {device} ({c['device_name']}), {c['config']}, each precision in a fresh process",
                           ["precision", "batch", "floor samples/s", "trainer samples/s", "trainer / floor", "eval s", "note"], rows))
        if "tta" in c:
            parts.append(tta_table(f"Time to the tutorial's accuracy on {device}", c["tta"]))
        if "time_to_quality" in c:
            q = c["time_to_quality"]
            parts.append(f"{q['config']} to {q['target']} on {device}: step {q['step']}, {q['training_seconds']:.1f} s of "
                         f"training, {q['seconds']:.1f} s from launch")
    rows = [[k, g["value"], g["goal"], {True: "met", False: "MISSED", None: "not measured"}[g["met"]]] for k, g in results["goals"].items()]
    parts.append(table("Goals", ["metric", "value", "goal", ""], rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks.common import say

    if not (args.data / "manifest.json").is_file():
        print(f"error: {args.data} holds no manifest.json; run: python launch/prepare_data.py --dataset fashion_mnist "
              f"--out {args.data}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        from benchmarks import precision

        try:
            precision.require_cuda()
        except precision.NoCuda as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    default_sections = ("loader", "throughput") if args.quick else SECTIONS[:-1]
    if args.device == "cuda":
        default_sections = ("loader", "precision")
    sections = tuple(s.strip() for s in args.sections.split(",")) if args.sections else default_sections
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    reps = args.reps or (3 if args.quick else 5)
    steps = args.steps or (60 if args.quick else 150)
    per_sample = args.per_sample_samples or (10_000 if args.quick else None)

    results: dict = {"command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]),
                     "quick": args.quick, "device": args.device, "sections": list(sections),
                     "environment": environment(), "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data.resolve()
        if "loader" in sections:
            from benchmarks import loader

            results["loader"] = loader.run(data, work, reps, per_sample)
            results["loader_speedup"] = results["loader"]["loader_speedup"]
        if "throughput" in sections:
            from benchmarks import throughput

            results["throughput"] = throughput.run(data, work, [64, 256], max(1, reps - 1) if args.quick else 3, steps)
            results["train_vs_floor"] = results["throughput"]["train_vs_floor"]
        if "tta" in sections:
            from benchmarks import loader, tta

            r = tta.run(data, work, loader.torchvision_root(work / "torchvision"), args.tta_timeout, args.baseline_max_batches)
            results["tta"] = r
            for key in ("baseline_epoch_accuracy", "baseline_seconds", "pipeline_seconds_to_baseline_accuracy", "tta_ratio",
                        "tta_ratio_training_clocks"):
                results[key] = r[key]
        if "scaling" in sections:
            from benchmarks import scaling

            results["scaling"] = scaling.run(data, work, args.scaling_steps)
        if "profile" in sections:
            from benchmarks import stepprofile

            results["profile"] = stepprofile.run(data, work, args.profile_steps)
        if "precision" in sections:
            from benchmarks import loader, precision

            results[args.device] = precision.run(data, work, args.quick, steps, args.tta_timeout, args.device,
                                            loader.torchvision_root(work / "torchvision"))
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    results["goals"] = goals(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"done in {results['seconds']:.0f} s; results in {args.out}")
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
