"""One mixed precision's throughput sweep, in a process of its own: Accelerate's state is one per
process, so a second `Accelerator(mixed_precision=...)` in the same process raises. For each
batch size: the in-memory floor on the device, then our trainer (configs/fashion_mnist.yaml),
and their ratio. Both use fused AdamW, the trainer's sync-free step; the trainer draws its batches
with `data.placement=auto` (resident where the split fits; the config pins the stream for its
CPU accuracy figure). Writes one JSON file; benchmarks/precision.py runs one of these per precision.

    python benchmarks/precision_sweep.py --device cuda --precision bf16 --data DIR --work DIR --out sweep-bf16.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import throughput
from benchmarks.common import ROOT, say

CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
SHARED = ["optim.fused=true"]


def sweep(device: str, precision: str, data: Path, work: Path, batches: list[int], steps: int, warm: int = 10) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    floor = throughput.Floor(data, CONFIG, device=device, precision=precision, extra=SHARED)
    rows = []
    for batch in batches:
        say(f"{device} {precision}: batch {batch}, floor then trainer ({warm}+{steps} steps each)")
        f = floor.once(data, batch, warm, steps)
        o = throughput.ours_once(data, work, batch, warm, steps, config=CONFIG,
                                 extra=[*SHARED, "data.placement=auto", f"train.mixed_precision={precision}",
                                        f"train.device={device}"])
        rows.append({"mixed_precision": precision, "batch_size": batch, "floor_samples_per_s": f["samples_per_s"],
                     "samples_per_s": o["samples_per_s"], "train_vs_floor": o["samples_per_s"] / f["samples_per_s"],
                     "eval_seconds": o["eval_seconds_mean"], "final_eval_accuracy": o["final_eval_accuracy"],
                     "data_placement": o["data_placement"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    rows = sweep(args.device, args.precision, args.data, args.work / f"sweep-{args.precision}",
                 [int(b) for b in args.batches.split(",")], args.steps)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
