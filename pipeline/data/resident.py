"""A split held in device memory: steps drawn where the model runs, no loader, no workers.

For data that fits (Fashion-MNIST's train split is 47 MB of uint8), this replaces the stream
and keeps its contract exactly: the order is pipeline/data/order.py's, this rank's micro-batches
of each global batch are its chunks, and augmentation is keyed on the sample id, with the same
random numbers as the stream's (computed here with torch, on the device). The batches of a step
are therefore those the stream would give, bit for bit, and a resumed run draws exactly what an
uninterrupted one does without replaying anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import order, ragged
from pipeline.data.augment import Augment
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import Manifest
from pipeline.data.provider import save_sample_ids
from pipeline.data.store import ShardStore, load_split_arrays

# The train split goes to the device only if it takes at most this share of the free memory
# there: the model, its activations at large batches and the evaluation need the rest.
RESIDENT_FRACTION = 0.25


def choose_placement(requested: str, on_error: str, manifest: Manifest, device: torch.device) -> tuple[str, str]:
    """("device" | "stream", why) for this rank; ranks must then agree (any stream -> all stream)."""
    need = split_bytes(manifest, "train")
    size = f"the train split ({need / 2**20:.0f} MiB)"
    if requested != "auto":
        return requested, f"data.placement={requested}"
    if on_error == "skip":
        return "stream", "auto: data.on_error=skip needs the stream"
    free = free_memory(device)
    verdict = "device" if need <= RESIDENT_FRACTION * free else "stream"
    relation = "fits in" if verdict == "device" else "exceeds"
    return verdict, f"auto: {size} {relation} a quarter of the {free / 2**30:.1f} GiB free on {device.type}"


def split_bytes(manifest: Manifest, split: str) -> int:
    """Device memory the split takes, padded to its longest case, plus int64 lengths, labels and sample ids."""
    entry = manifest.split(split)
    steps = entry.lengths.max * manifest.features * np.dtype(manifest.dtype).itemsize
    return entry.num_samples * (steps + 24)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class ResidentBatches:
    """The train split from device memory (a BatchProvider: provider.py, as StreamBatches is)."""

    def __init__(self, manifest: Manifest, store: ShardStore, split: str, plan: EpochPlan, rank: int,
                 device: torch.device, augment: Augment, record_sample_ids: bool = False):
        x, lengths, y, ids = load_split_arrays(manifest, store, split)
        self.x, self.y, self.ids = (torch.from_numpy(a).to(device) for a in (x, y, ids))
        self.host_lengths = lengths  # the order and each micro-batch's longest case come from here: no device sync
        self.lengths = torch.from_numpy(lengths).to(device)
        self.sizes = [s.num_samples for s in manifest.split(split).shards]
        self.plan = plan
        self.rank = rank
        self.device = device
        self.augment = augment
        self.sample_ids: list[np.ndarray] | None = [] if record_sample_ids else None
        self.skipped_samples = 0  # every shard was read and counted at load: nothing is skipped later
        self.bytes_read = manifest.split(split).bytes  # all of them, at load, by every rank
        self.padding = ragged.PaddingCount()

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[list[tuple[torch.Tensor, ...]]]:
        """`count` steps of `epoch` from step `start`: each the rank's micro-batches, in accumulation order."""
        plan, layout = self.plan, self.plan.layout
        host = plan.sequence(self.sizes, self.host_lengths, epoch)
        sequence = torch.from_numpy(host).to(self.device)
        for step in range(start, start + count):
            micro = []
            for a in range(layout.accumulation):
                where = order.micro_positions(layout, self.rank, step, a)
                rows = sequence[where]
                ids = self.ids[rows]
                if plan.ragged:  # padded to this micro-batch's longest case
                    run = self.host_lengths[host[where]]
                    self.padding.add(run)
                    longest = int(run.max())
                    micro.append((self.x[rows, :longest], self.y[rows], ids, self.lengths[rows]))
                else:
                    micro.append((self.augment.torch(self.x[rows], ids, epoch), self.y[rows], ids, None))
            if self.sample_ids is not None:
                self.sample_ids.append(torch.cat([b[2] for b in micro]).cpu().numpy())
            yield micro

    def save_sample_ids(self, output_dir: Path, rank: int) -> None:
        if self.sample_ids is not None:
            save_sample_ids(output_dir, rank, self.sample_ids)
