"""Packed vs masked variable-length batches (SequenceClassifier length_mode): milliseconds per training
step (forward, cross-entropy, backward) for LSTM-128, unidirectional and bidirectional, on

  fsdd-random    batches of 64 with FSDD's spoken-digit lengths (6-92 frames, 13 features), drawn at random
  fsdd-bucketed  the same lengths sorted and cut into buckets of 64, buckets drawn at random (little padding)
  long           batches of 32 of 200-1500 steps, 1 feature (where pytorch#149194 reports packed LSTMs slow)

    python benchmarks/packed_vs_masked.py                       # CPU, one thread
    python benchmarks/packed_vs_masked.py --device cuda --out results/packed_vs_masked-cuda.json
    python benchmarks/packed_vs_masked.py --workloads long --repeats 3

Both modes get the same weights and the same batches (seeded), the lengths on the CPU as a loader would
hand them over, and take turns batch by batch so that a busy machine slows both alike. The figure is the
median over the repeats; ratio = packed / masked (above 1: masked is faster).

On the CPU a packed LSTM's backward pass is quadratic in the time steps (every step's slice of the packed
input gets a zero-filled gradient the size of the whole input: aten::slice_backward, then fill_), so one
step at 1,500 steps takes over a minute. Where a batch is longer than PROBE_STEPS, each mode's first step
therefore runs in a forked child first, and a mode slower than --step-timeout-s per step is reported as
such (a lower bound) rather than timed for minutes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, median, say, table
from pipeline.config import ModelConfig
from pipeline.model import LENGTH_MODES, SequenceClassifier
from pipeline.model_conv import update_running_statistics

FSDD = ROOT / "data" / "examples" / "fsdd" / "digits.npz"
HIDDEN = 128
PROBE_STEPS = 256  # CPU batches longer than this get their first step probed in a child with a timeout
CLASSES = 10


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    features: int
    repeats: int  # default timed steps per mode: a few seconds each on one CPU thread


WORKLOADS = {
    "fsdd-random": Workload("fsdd-random", 64, 13, 60),
    "fsdd-bucketed": Workload("fsdd-bucketed", 64, 13, 60),
    "long": Workload("long", 32, 1, 3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--directions", nargs="+", choices=("uni", "bi"), default=["uni", "bi"])
    p.add_argument("--repeats", type=int, default=None, help="Timed steps per mode (default: per workload)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 keeps CPU figures stable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-timeout-s", type=float, default=10.0,
                   help="CPU, batches over %d steps: a mode whose first step takes longer is not timed (0: no limit)" % PROBE_STEPS)
    p.add_argument("--out", help="Write the results as JSON here")
    return p.parse_args(argv)


def fsdd_lengths() -> np.ndarray:
    """The real corpus's lengths when `make examples` has fetched it; else a uniform stand-in of the same range."""
    if FSDD.is_file():
        return np.load(FSDD)["lengths"].astype(np.int64)
    return np.random.default_rng(12345).integers(6, 93, size=3000)


def batch_lengths(work: Workload, rng: np.random.Generator, corpus: np.ndarray) -> np.ndarray:
    if work.name == "fsdd-random":
        return rng.choice(corpus, size=work.batch, replace=False)
    if work.name == "fsdd-bucketed":
        ordered = np.sort(corpus)
        bucket = rng.integers(0, len(ordered) // work.batch)
        # Shuffled within the bucket: enforce_sorted=False must still sort, as it would in training.
        return rng.permutation(ordered[bucket * work.batch:(bucket + 1) * work.batch])
    return rng.integers(200, 1501, size=work.batch)


def make_batches(work: Workload, count: int, seed: int, device: torch.device) -> list[tuple]:
    """(x [B, T, F] on device, lengths int64 [B] on the CPU, labels [B] on device), T = the batch's longest."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    corpus = fsdd_lengths()
    batches = []
    for _ in range(count):
        lengths = torch.from_numpy(batch_lengths(work, rng, corpus).astype(np.int64))
        x = torch.randn(work.batch, int(lengths.max()), work.features, generator=gen)
        labels = torch.randint(0, CLASSES, (work.batch,), generator=gen)
        batches.append((x.to(device), lengths, labels.to(device)))
    return batches


def step_ms(model: SequenceClassifier, batch: tuple, device: torch.device) -> float:
    x, lengths, labels = batch
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    F.cross_entropy(model(x, lengths), labels).backward()
    update_running_statistics(model, 1)  # model.conv_norm: batch folds its statistics once a step, as train_step does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _probe_child(model: SequenceClassifier, batch: tuple, device: torch.device, conn) -> None:
    conn.send(step_ms(model, batch, device))


def too_slow(model: SequenceClassifier, batch: tuple, device: torch.device, timeout_s: float) -> bool:
    """Whether one step outlasts timeout_s, found in a forked child (a step cannot be interrupted in-process:
    the backward pass is one C++ call). The child shares the parent's model and batch copy-on-write."""
    if device.type != "cpu" or not timeout_s or batch[0].shape[1] <= PROBE_STEPS:
        return False
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(model, batch, device, child), daemon=True)
    proc.start()
    done = parent.poll(timeout_s)
    if not done:
        proc.kill()
    proc.join()
    return not done


def time_modes(models: dict, batches: list[tuple], device: torch.device, timeout_s: float) -> tuple[dict, dict]:
    """({mode: [ms per step]}, {mode: seconds it exceeded, for modes not timed})."""
    slow = {mode: timeout_s for mode in LENGTH_MODES if too_slow(models[mode], batches[0], device, timeout_s)}
    timed = [mode for mode in LENGTH_MODES if mode not in slow]
    for mode in timed:  # warm-up: allocator, kernels, cuDNN plans
        step_ms(models[mode], batches[0], device)
    times: dict[str, list[float]] = {mode: [] for mode in timed}
    for i, batch in enumerate(batches[1:]):
        for mode in timed if i % 2 == 0 else timed[::-1]:  # neither mode always runs first
            times[mode].append(step_ms(models[mode], batch, device))
    return times, slow


def measure(work: Workload, bidirectional: bool, repeats: int, seed: int, device: torch.device, timeout_s: float) -> dict:
    cfg = ModelConfig(cell="lstm", hidden_size=HIDDEN, bidirectional=bidirectional)
    models = {}
    for mode in LENGTH_MODES:
        torch.manual_seed(seed)  # the same weights in both modes
        models[mode] = SequenceClassifier(cfg, input_size=work.features, num_classes=CLASSES, length_mode=mode).to(device)
    batches = make_batches(work, repeats + 1, seed, device)
    times, slow = time_modes(models, batches, device, timeout_s)
    ms = {mode: round(median(times[mode]), 2) if mode in times else None for mode in LENGTH_MODES}
    ratio = round(ms["packed"] / ms["masked"], 3) if None not in ms.values() else None
    lengths = torch.cat([b[1] for b in batches[1:]])
    padded_steps = sum(b[1].numel() * int(b[1].max()) for b in batches[1:])
    return {
        "workload": work.name, "direction": "bi" if bidirectional else "uni", "batch": work.batch,
        "features": work.features, "repeats": repeats, "min_length": int(lengths.min()), "max_length": int(lengths.max()),
        "padding_fraction": round(1 - int(lengths.sum()) / padded_steps, 3),
        "masked_ms": ms["masked"], "packed_ms": ms["packed"], "packed_over_masked": ratio,
        "over_timeout_s": slow, **{f"{mode}_reps_ms": [round(t, 2) for t in times[mode]] for mode in times},
    }


def _cell(result: dict, mode: str) -> str | float:
    slow = result["over_timeout_s"].get(mode)
    return f"> {slow * 1e3:,.0f}" if slow else result[f"{mode}_ms"]


def report(results: list[dict], device: str) -> str:
    rows = [[r["workload"], r["direction"], r["batch"], f"{r['min_length']}-{r['max_length']}", r["padding_fraction"],
             r["repeats"], _cell(r, "masked"), _cell(r, "packed"), _ratio(r)] for r in results]
    header = ["workload", "dir", "batch", "lengths", "padding", "reps", "masked ms", "packed ms", "packed/masked"]
    return table(f"LSTM-{HIDDEN} forward+backward per step, median ({device})", header, rows)


def _ratio(result: dict) -> str | float:
    if result["packed_over_masked"] is not None:
        return result["packed_over_masked"]
    if result["masked_ms"] is not None:
        return f"> {result['over_timeout_s']['packed'] * 1e3 / result['masked_ms']:,.0f}"
    return "-"


def open_device(name: str, threads: int) -> torch.device | None:
    """The device a timing benchmark runs on, torch's CPU threads set; None (said why) without a CUDA GPU for cuda."""
    if name == "cuda" and not torch.cuda.is_available():
        say("--device cuda: no CUDA GPU is visible to torch; run on a GPU machine or use --device cpu")
        return None
    torch.set_num_threads(threads)
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = open_device(args.device, args.threads)
    if device is None:
        return 2
    if not FSDD.is_file():
        say(f"{FSDD.relative_to(ROOT)} is missing (make examples): FSDD lengths drawn uniformly from 6-92 instead")
    results = []
    # Kept and reported: on a GPU, a per-direction call that made cuDNN copy its weights would warn here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for name in args.workloads:
            work = WORKLOADS[name]
            for direction in args.directions:
                repeats = args.repeats or work.repeats
                start = time.perf_counter()
                results.append(measure(work, direction == "bi", repeats, args.seed, device, args.step_timeout_s))
                say(f"{name} {direction}: {time.perf_counter() - start:.1f} s")
    seen = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for message in seen:
        say(f"warning: {message}")
    print(report(results, torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"))
    if args.out:
        meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "seed": args.seed,
                "fsdd_lengths": FSDD.relative_to(ROOT).as_posix() if FSDD.is_file() else "uniform 6-92 stand-in",
                "warnings": seen}
        Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
