"""Speed on variable-length sequences (configs/sequences.yaml), each figure against its baseline in
the same run, alternated A B A B:

  floor    our trainer against an in-memory floor on the same data: the same model, optimizer,
           schedule, loss and clipping stepping over micro-batches already padded, standardised and
           in memory, in the trainer's own order (so both pad exactly alike). samples/s from the
           trainer's log windows, the first (warm-up) skipped.
  buckets  padding waste (padded steps / real steps) over whole epochs, length buckets against
           random micro-batches, from the order functions alone; and the trainer's samples/s with
           data.length_buckets on and off.

    python benchmarks/sequence_speed.py --data data/fsdd --out benchmarks/results/cpu-sequences.json
    python benchmarks/sequence_speed.py --data data/fsdd --waste-only data/jv data/gunpoint ...

Packed against masked LSTMs per step is benchmarks/packed_vs_masked.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, median, say, table
from benchmarks.throughput import bench_config, ours_once

CONFIG = ROOT / "configs" / "sequences.yaml"
# Evaluation once at the very end (outside the measured windows), the split resident on the device.
MEASURED = ["eval.every_epochs=null", "train.min_steps=null", "data.placement=device"]


class SequenceFloor:
    """The trainer's step over micro-batches prepared in memory beforehand: what training would cost
    with no loader, no Accelerate, no logging, no checkpoints."""

    def __init__(self, data_dir: Path, batch: int, steps: int, buckets: bool = True):
        from pipeline.data import canonical
        from pipeline.data.manifest import load_manifest
        from pipeline.data.order import BatchLayout
        from pipeline.data.store import ShardStore, load_split_arrays
        from pipeline.inputs import InputScale

        manifest = load_manifest(data_dir)
        sizes = [s.num_samples for s in manifest.split("train").shards]
        x, lengths, y, _ = load_split_arrays(manifest, ShardStore(str(data_dir)), "train")
        cfg = bench_config(CONFIG, data_dir, Path("unused"), batch, steps, steps, MEASURED)
        layout = BatchLayout.make(batch, batch, 1)
        scale, device = InputScale.for_data(manifest), torch.device("cpu")
        self.batches = []
        epoch = 0
        while len(self.batches) < steps:
            sequence = canonical.epoch_sequence(sizes, lengths if buckets else None, cfg.train.seed, epoch,
                                                cfg.data.shuffle_buffer, layout, cfg.data.canonical_streams)
            for lo in range(0, len(sequence) // batch * batch, batch):
                rows = sequence[lo:lo + batch]
                longest = int(lengths[rows].max())
                self.batches.append((scale(torch.from_numpy(x[rows, :longest]), device),
                                     torch.from_numpy(y[rows]).long(), torch.from_numpy(lengths[rows])))
            epoch += 1
        self.manifest, self.data_dir = manifest, data_dir

    def once(self, batch: int, warm_steps: int, steps: int) -> dict:
        from pipeline.model import build_model
        from pipeline.training.optimizer import build_optimizer, build_scheduler
        from pipeline.training.trainer import resolved_frame

        cfg = bench_config(CONFIG, self.data_dir, Path("unused"), batch, warm_steps + steps, warm_steps, MEASURED)
        cfg.model.frame = resolved_frame(cfg.model.frame, self.manifest.split("train").lengths)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.manifest.features, self.manifest.num_classes)
        model.train()
        opt = build_optimizer(model, cfg.optim)
        sched = build_scheduler(opt, cfg.schedule, warm_steps + steps)
        start = None
        for i, (x, y, lengths) in enumerate(self.batches[:warm_steps + steps]):
            if i == warm_steps:
                start = time.perf_counter()
            loss = F.cross_entropy(model(x, lengths).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return {"samples_per_s": steps * batch / (time.perf_counter() - start)}


def floor_section(data_dir: Path, work: Path, batch: int, reps: int, warm: int, steps: int) -> dict:
    floor = SequenceFloor(data_dir, batch, warm + steps)
    pairs = []
    for rep in range(reps):
        say(f"sequences floor: repetition {rep + 1}/{reps}: floor, then ours ({warm}+{steps} steps of {batch})")
        f = floor.once(batch, warm, steps)["samples_per_s"]
        o = ours_once(data_dir, work, batch, warm, steps, config=CONFIG, extra=MEASURED)["samples_per_s"]
        pairs.append({"floor": f, "ours": o, "ratio": o / f})
    return {"batch": batch, "pairs": pairs, "floor_samples_per_s": median([p["floor"] for p in pairs]),
            "ours_samples_per_s": median([p["ours"] for p in pairs]),
            "train_vs_floor": median([p["ratio"] for p in pairs])}


def waste(data_dir: Path, batch: int, epochs: int = 5) -> dict:
    """Padding waste per epoch for `epochs` epochs, buckets against random micro-batches (no training)."""
    from pipeline.config import load_config
    from pipeline.data import canonical
    from pipeline.data.manifest import load_manifest
    from pipeline.data.order import BatchLayout, epoch_padding_waste
    from pipeline.data.store import ShardStore, load_split_arrays

    manifest = load_manifest(data_dir)
    sizes = [s.num_samples for s in manifest.split("train").shards]
    _, lengths, _, _ = load_split_arrays(manifest, ShardStore(str(data_dir)), "train")
    cfg = load_config(CONFIG)
    layout = BatchLayout.make(batch, batch, 1)
    out = {}
    for buckets in (True, False):
        per_epoch = [epoch_padding_waste(canonical.epoch_sequence(sizes, lengths if buckets else None, cfg.train.seed, e,
                                                                  cfg.data.shuffle_buffer, layout, cfg.data.canonical_streams),
                                         lengths, layout) for e in range(epochs)]
        out["buckets" if buckets else "random"] = round(float(np.mean(per_epoch)), 4)
    t = manifest.split("train").lengths
    return {"dataset": manifest.dataset, "train_cases": manifest.split("train").num_samples,
            "lengths": f"{t.min}-{t.max} (median {t.median})", **out,
            "ratio": round(out["random"] / out["buckets"], 2) if out["buckets"] else None}


def buckets_speed(data_dir: Path, work: Path, batch: int, reps: int, warm: int, steps: int) -> dict:
    pairs = []
    for rep in range(reps):
        say(f"length buckets: repetition {rep + 1}/{reps}: on, then off ({warm}+{steps} steps of {batch})")
        on = ours_once(data_dir, work, batch, warm, steps, config=CONFIG, extra=[*MEASURED, "data.length_buckets=true"])
        off = ours_once(data_dir, work, batch, warm, steps, config=CONFIG, extra=[*MEASURED, "data.length_buckets=false"])
        pairs.append({"buckets": on["samples_per_s"], "random": off["samples_per_s"],
                      "speedup": on["samples_per_s"] / off["samples_per_s"]})
    return {"batch": batch, "pairs": pairs, "speedup": median([p["speedup"] for p in pairs])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a prepared sequence data set (FSDD for the README)")
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--waste-only", nargs="*", type=Path, default=[], help="more data sets for the padding-waste table")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warm-steps", type=int, default=20)
    args = p.parse_args(argv)
    results: dict = {"torch_threads": torch.get_num_threads(), "config": str(CONFIG.relative_to(ROOT))}
    results["waste"] = [waste(d, args.batch) for d in [args.data, *args.waste_only]]
    print(table("Padding waste per epoch (padded steps / real steps), mean of 5 epochs",
                ["data set", "train cases", "lengths", "buckets", "random", "random / buckets"],
                [[w["dataset"], w["train_cases"], w["lengths"], w["buckets"], w["random"], w["ratio"]]
                 for w in results["waste"]]))
    with tempfile.TemporaryDirectory() as tmp:
        results["floor"] = floor_section(args.data, Path(tmp), args.batch, args.reps, args.warm_steps, args.steps)
        results["buckets_speed"] = buckets_speed(args.data, Path(tmp), args.batch, args.reps, args.warm_steps, args.steps)
    f, b = results["floor"], results["buckets_speed"]
    print(f"trainer {f['ours_samples_per_s']:.0f} samples/s, floor {f['floor_samples_per_s']:.0f}: "
          f"train_vs_floor {f['train_vs_floor']:.3f} (median of {args.reps})")
    print(f"length buckets against random micro-batches: {b['speedup']:.2f}x the trainer's samples/s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
