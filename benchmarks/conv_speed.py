"""Samples per second of the convolutional models against the plain LSTM, as ratios in one run: each
training step (forward, cross-entropy, backward) of `configs/sequences.yaml`'s model (bidirectional
LSTM-128, last_max, frame auto) alone, with the convolutional front-end, with the FCN branch, with
both (FCN's 128-256-128 blocks, kernels 8-5-3), and as the config has it today, on

  fsdd   batches of 32 with FSDD's spoken-digit lengths (6-92 frames, 13 features) in length buckets
  long   batches of 32 of 300-3,000 steps, 1 feature (frame auto: median / 64 steps per frame)

    python benchmarks/conv_speed.py                         # CPU, one thread
    python benchmarks/conv_speed.py --device cuda --out benchmarks/results/conv_speed-cuda.json

Every model gets the same batches and takes turns batch by batch, so that a busy machine slows all alike;
the figure is the median over the repeats, and ratio = model's samples/s over the plain LSTM's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median, say, table
from benchmarks.packed_vs_masked import fsdd_lengths, open_device, step_ms
from pipeline.config import ModelConfig
from pipeline.model import SequenceClassifier
from pipeline.training.trainer import auto_frame

MODELS = {
    "plain": {},
    "conv front-end": {"frontend": "conv"},
    "front-end, batch norm": {"frontend": "conv", "conv_norm": "batch"},
    "conv branch": {"conv_branch": True},
    "front-end + branch": {"frontend": "conv", "conv_branch": True},
    "branch, batch norm, readout dropout": {"conv_branch": True, "conv_norm": "batch", "readout_dropout": 0.8},
    "branch over steps, batch norm": {"conv_branch": True, "conv_branch_input": "steps", "conv_norm": "batch"},
    "front-end + branch over steps, batch norm": {"frontend": "conv", "conv_branch": True,
                                                  "conv_branch_input": "steps", "conv_norm": "batch"},
    # configs/sequences.yaml's model today: the branch as above over both normalisations (twice the features)
    "the default: branch, batch norm, readout dropout, both": {"conv_branch": True, "conv_norm": "batch",
                                                               "readout_dropout": 0.8, "series_norm": "both"},
}
WORKLOADS = {"fsdd": (13, 20), "long": (1, 3)}  # name: (features, default timed steps per model)
BATCH = 32
CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=None, help="Timed steps per model (default: per workload)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 keeps CPU figures stable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="Write the results as JSON here")
    return p.parse_args(argv)


def batch_lengths(workload: str, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    if workload == "fsdd":
        ordered = np.sort(fsdd_lengths())
        starts = rng.integers(0, len(ordered) - BATCH, size=count)  # a length bucket, as training lays them out
        return [ordered[s:s + BATCH] for s in starts]
    return [rng.integers(300, 3001, size=BATCH) for _ in range(count)]


def make_batches(workload: str, count: int, seed: int, device: torch.device) -> list[tuple]:
    features = WORKLOADS[workload][0]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in batch_lengths(workload, np.random.default_rng(seed), count):
        lengths = torch.from_numpy(lengths.astype(np.int64))
        x = torch.randn(BATCH, int(lengths.max()), features, generator=gen)
        batches.append((x.to(device), lengths, torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)))
    return batches


def build(name: str, features: int, frame: int, seed: int, device: torch.device) -> SequenceClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=128, bidirectional=True, readout="last_max", frame=frame, **MODELS[name])
    return SequenceClassifier(cfg, input_size=features, num_classes=CLASSES).to(device)


def measure(workload: str, repeats: int, seed: int, device: torch.device) -> dict:
    batches = make_batches(workload, repeats + 1, seed, device)
    frame = auto_frame(float(np.median(np.concatenate([b[1].numpy() for b in batches]))))
    models = {name: build(name, WORKLOADS[workload][0], frame, seed, device) for name in MODELS}
    for model in models.values():  # warm-up: allocator, kernels, cuDNN plans
        step_ms(model, batches[0], device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i, batch in enumerate(batches[1:]):
        for name in list(models) if i % 2 == 0 else list(models)[::-1]:
            times[name].append(step_ms(models[name], batch, device))
    ms = {name: median(t) for name, t in times.items()}
    return {"workload": workload, "frame": frame, "repeats": repeats,
            "lengths": [int(min(b[1].min() for b in batches)), int(max(b[1].max() for b in batches))],
            "ms_per_step": {name: round(v, 2) for name, v in ms.items()},
            "samples_per_s": {name: round(BATCH * 1e3 / v, 1) for name, v in ms.items()},
            "ratio_to_plain": {name: round(ms["plain"] / v, 3) for name, v in ms.items()},
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
            "reps_ms": {name: [round(t, 2) for t in v] for name, v in times.items()}}


def report(results: list[dict], device: str) -> str:
    rows = [[r["workload"], f"{r['lengths'][0]}-{r['lengths'][1]}", r["frame"], name, r["parameters"][name],
             r["ms_per_step"][name], r["samples_per_s"][name], r["ratio_to_plain"][name]]
            for r in results for name in MODELS]
    header = ["workload", "lengths", "frame", "model", "parameters", "ms/step", "samples/s", "vs plain"]
    return table(f"training step, batches of {BATCH}, median ({device})", header, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = open_device(args.device, args.threads)
    if device is None:
        return 2
    results = []
    for workload in args.workloads:
        start = time.perf_counter()
        results.append(measure(workload, args.repeats or WORKLOADS[workload][1], args.seed, device))
        say(f"{workload}: {time.perf_counter() - start:.1f} s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(report(results, name))
    if args.out:
        meta = {"device": name, "threads": args.threads, "torch": torch.__version__, "seed": args.seed, "batch": BATCH}
        Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
