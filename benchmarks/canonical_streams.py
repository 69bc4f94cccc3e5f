"""Canonical streams (data.canonical_streams): what each rank reads, and what the order loses.

    python benchmarks/canonical_streams.py --data data/fashion_mnist --out benchmarks/results/cpu-canonical.json
    python benchmarks/canonical_streams.py --data data/fashion_mnist --lengths data/fsdd --seeds 0,1,2

1. bytes: the training stream of every rank at W = 1, 2, 4, 8 (the loader only, one epoch,
   micro-batches of 32 in global batches of 256), with one stream and with S = 8: the bytes of
   shards each rank read, against the split's size.
2. mixing, from the order alone: the classes in a micro-batch (distinct classes, and the total
   variation distance of its class histogram from the split's), S = 1 against S = 8; with
   --lengths, the padding waste of a variable-length set's length buckets at S = 1, 4 and 8.
3. accuracy: configs/cpu_test.yaml over --seeds at S = 1 and S = 8 (global batch 256, micro 32), the
   final validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import PY, ROOT, run_checked, say, table
from pipeline.data import canonical, order
from pipeline.data.augment import Augment
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import load_manifest
from pipeline.data.order import BatchLayout
from pipeline.data.store import ShardStore, load_split_arrays
from pipeline.data.stream import TrainStream
from pipeline.training.batches import StreamBatches

GLOBAL, MICRO, SEED, WINDOW = 256, 32, 0, 4096


def bytes_per_rank(data: Path, world: int, streams: int) -> list[int]:
    """Each rank's training stream through one epoch (no training): the bytes of shards it read."""
    manifest = load_manifest(data)
    plan = EpochPlan.make(manifest, "train", BatchLayout.make(GLOBAL, MICRO, world), SEED, WINDOW, streams=streams)
    out = []
    for rank in range(world):
        stream = TrainStream(manifest, ShardStore(str(data)), "train", plan, rank, Augment(SEED))
        batches = StreamBatches(stream, seed=SEED, data_dir=str(data), pin_memory=False, record_sample_ids=False)
        for _ in batches.epoch(0, 0, plan.steps):
            pass
        out.append(batches.bytes_read)
    return out


def mixing(data: Path, streams: int, epochs: int = 3) -> dict:
    """Classes per micro-batch over `epochs` epochs of the order (positions -> labels; nothing trained)."""
    manifest = load_manifest(data)
    _, _, labels, _ = load_split_arrays(manifest, ShardStore(str(data)), "train")
    sizes = [s.num_samples for s in manifest.split("train").shards]
    share = np.bincount(labels, minlength=manifest.num_classes) / len(labels)
    distinct, distance = [], []
    for epoch in range(epochs):
        seq = canonical.epoch_sequence(sizes, None, SEED, epoch, WINDOW, BatchLayout(GLOBAL, MICRO, 1), streams)
        for chunk in labels[seq[:len(seq) // GLOBAL * GLOBAL]].reshape(-1, MICRO):  # one stream: the tail is dropped
            counts = np.bincount(chunk, minlength=manifest.num_classes)
            distinct.append((counts > 0).sum())
            distance.append(0.5 * np.abs(counts / MICRO - share).sum())
    return {"streams": streams, "distinct_classes_mean": round(float(np.mean(distinct)), 3),
            "class_distance_mean": round(float(np.mean(distance)), 4)}


def padding(data: Path, streams: int) -> float:
    manifest = load_manifest(data)
    _, lengths, _, _ = load_split_arrays(manifest, ShardStore(str(data)), "train")
    sizes = [s.num_samples for s in manifest.split("train").shards]
    layout = BatchLayout(GLOBAL, MICRO, 1)
    seq = canonical.epoch_sequence(sizes, lengths, SEED, 0, WINDOW, layout, streams)
    return round(order.epoch_padding_waste(seq, lengths, layout), 4)


def accuracy(data: Path, streams: int, seed: int, work: Path, steps: int | None = None) -> float:
    out = work / f"s{streams}-seed{seed}"
    short = [f"train.max_steps={steps}", f"eval.every_steps={steps}", f"checkpoint.every_steps={steps}"] if steps else []
    run_checked([PY, str(ROOT / "launch" / "train.py"), "--config", "configs/cpu_test.yaml", f"data.dir={data}",
                 f"output_dir={out}", f"train.seed={seed}", f"data.canonical_streams={streams}",
                 f"train.batch_size={MICRO}", f"train.global_batch_size={GLOBAL}", "data.placement=stream",
                 "wandb.mode=disabled", "train.progress_bar=false", *short], timeout=1800)
    return json.loads((out / "summary.json").read_text())["final_eval_accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a prepared data set (Fashion-MNIST for the README)")
    p.add_argument("--lengths", type=Path, help="a variable-length data set for the padding figures")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, help="train this many steps instead of cpu_test.yaml's (smoke tests)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    split = load_manifest(args.data).split("train").bytes
    results: dict = {"split_bytes": split, "global_batch": GLOBAL, "micro_batch": MICRO, "bytes": [], "mixing": []}
    for streams in (1, 8):
        for world in (1, 2, 4, 8):
            say(f"bytes: S = {streams}, W = {world}")
            read = bytes_per_rank(args.data, world, streams)
            results["bytes"].append({"streams": streams, "world": world, "per_rank": read,
                                     "max_rank_share": round(max(read) / split, 4),
                                     "max_rank_share_times_w": round(max(read) / split * world, 3)})
        results["mixing"].append(mixing(args.data, streams))
    if args.lengths:
        results["padding"] = {s: padding(args.lengths, s) for s in (1, 4, 8)}
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [int(s) for s in args.seeds.split(",")]
        results["accuracy"] = {s: [accuracy(args.data, s, seed, Path(tmp), args.steps) for seed in seeds] for s in (1, 8)}
    print(table("Bytes of training shards read per rank in one epoch", ["S", "W", "largest rank / split", "x W"],
                [[b["streams"], b["world"], b["max_rank_share"], b["max_rank_share_times_w"]] for b in results["bytes"]]))
    print(table("Classes per micro-batch of 32", ["S", "distinct classes", "distance from the split's mix"],
                [[m["streams"], m["distinct_classes_mean"], m["class_distance_mean"]] for m in results["mixing"]]))
    if args.lengths:
        print("padding waste by S:", results["padding"])
    print("final validation accuracy (cpu_test.yaml) by S:", results["accuracy"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
