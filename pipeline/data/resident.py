"""A split held in device memory: batches drawn where the model runs, no loader, no workers.

For data that fits (Fashion-MNIST's train split is 47 MB of uint8), this replaces the stream.
It keeps the stream's contract: each epoch the shard list is permuted with a seed shared by all
ranks and split by rank, so within an epoch the ranks read disjoint samples; every rank takes
the same number of steps (the manifest's minimum of full batches over ranks); a batch is a
pure function of (seed, epoch, rank, batch index), augmentation included, so a resumed run
draws exactly the batches an uninterrupted one does, without replaying the epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.manifest import Manifest
from pipeline.data.stream import ShardSource, StreamPlan, epoch_assignment, load_split_arrays, save_sample_ids

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
    """Device memory the split takes: uint8 images plus int64 labels and sample ids."""
    pixels = int(np.prod(manifest.image_shape))
    return manifest.split(split).num_samples * (pixels + 16)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class ResidentBatches:
    """The trainer's batch source (the same interface as TrainBatches), from device memory."""

    def __init__(self, manifest: Manifest, source: ShardSource, split: str, plan: StreamPlan, rank: int,
                 device: torch.device, *, hflip: bool = False, shift: int = 0, record_sample_ids: bool = False):
        x, y, ids, self.offsets = load_split_arrays(manifest, source, split)
        self.x, self.y, self.ids = (torch.from_numpy(a).to(device) for a in (x, y, ids))
        self.num_shards = len(manifest.split(split).shards)
        self.plan = plan
        self.rank = rank
        self.device = device
        self.hflip = hflip
        self.shift = shift
        self.sample_ids: list[np.ndarray] | None = [] if record_sample_ids else None
        self.skipped_samples = 0  # every shard was read and counted at load: nothing is skipped later
        self.padded_passes = 0

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """`count` batches of `epoch` after its first `start`."""
        order = torch.from_numpy(self._order(epoch)).to(self.device)
        bs = self.plan.batch_size
        for b in range(start, start + count):
            rows = order[b * bs : (b + 1) * bs]
            x = self._augment(self.x[rows], epoch, b)
            ids = self.ids[rows]
            if self.sample_ids is not None:
                self.sample_ids.append(ids.cpu().numpy())
            yield x, self.y[rows], ids

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's rows for the epoch: its shards (as the stream assigns them), shuffled."""
        (shards,) = epoch_assignment(self.num_shards, self.plan.seed, epoch, self.plan.world_size, 0)[self.rank]
        rows = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards])
        return rows[np.random.default_rng([self.plan.seed, epoch, self.rank]).permutation(len(rows))]

    def _augment(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        if not (self.hflip or self.shift):
            return x
        seed = int(np.random.SeedSequence([self.plan.seed, epoch, self.rank, batch]).generate_state(1)[0])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        n, h, w = x.shape
        if self.hflip:
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None], x.flip(-1), x)
        if self.shift:
            s = self.shift
            padded = F.pad(x, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=gen, device=self.device)
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, :, None]
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, :]
            x = padded[torch.arange(n, device=self.device)[:, None, None], rows, cols]
        return x

    def save_sample_ids(self, output_dir: Path) -> None:
        if self.sample_ids is not None:
            save_sample_ids(output_dir, self.rank, self.sample_ids)
