"""Augmentation of standardised sequences, drawn from (seed, epoch, sample id) like the images'.

Three transforms, each off at 0, applied on the device in the training step to the model's inputs
(after the per-channel standardisation, so their sizes are in standard deviations of the train
split):
- `time_mask`: one span of each sequence set to 0, the channel mean (SpecAugment's time masking,
  Park et al., 2019); its width is drawn up to this fraction of the sequence's own length;
- `jitter`: Gaussian noise of this standard deviation on every valid value;
- `scale`: each channel of each sequence multiplied by a factor drawn from N(1, scale^2).

Every random number is a function of the sample id, the step's position in the sequence and the
channel, never of the micro-batch or the rank, so the same sample is augmented the same way at any
world size and on resume; steps past a sequence's end stay as they were (padding). Gaussian numbers
come from Box-Muller over the integer hash: the same bits on the same kind of device (the training
step always runs on the accelerator's device, whichever placement fed it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.data.augment import mix32, sample_random

# Streams of their own, apart from the image augmentations' (augment.py uses 1-8).
MASK_WIDTH, MASK_START, JITTER_A, JITTER_B, SCALE_A, SCALE_B = 11, 12, 13, 14, 15, 16
_UNIT = 2.0 ** -24  # 24 random bits -> a float32 in [0, 1) without rounding


def _uniform(seed: int, epoch: int, ids: torch.Tensor, stream: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """A float in [0, 1) per sample id, or per (id, where) with `where` (int64, broadcast against ids)
    a position inside the sample: the sample's number and the position hashed together, since the
    hash reads 32 bits and an id times a position would not fit."""
    bits = sample_random(seed, epoch, ids, stream)
    if where is not None:
        bits = mix32(bits ^ mix32(where + 1))
    return (bits >> 8).to(torch.float32) * _UNIT


def _gaussian(seed: int, epoch: int, ids: torch.Tensor, where: torch.Tensor, streams: tuple[int, int]) -> torch.Tensor:
    """A standard normal number per (id, where) (Box-Muller; 1 - u keeps the logarithm finite)."""
    u1, u2 = _uniform(seed, epoch, ids, streams[0], where), _uniform(seed, epoch, ids, streams[1], where)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)


@dataclass(frozen=True)
class SequenceAugment:
    seed: int
    time_mask: float = 0.0
    jitter: float = 0.0
    scale: float = 0.0

    @property
    def active(self) -> bool:
        return self.time_mask > 0 or self.jitter > 0 or self.scale > 0

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor | None, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """x float [n, T, F] on its device (not modified); lengths [n] (None: all T long); ids [n]."""
        if not self.active:
            return x
        n, t, f = x.shape
        dev = x.device
        ids = ids.to(dev, torch.int64)
        lengths = torch.full((n,), t, device=dev) if lengths is None else lengths.to(dev, torch.int64)
        steps = torch.arange(t, device=dev)
        valid = (steps[None, :] < lengths[:, None])[:, :, None]  # [n, T, 1]
        channels = torch.arange(f, device=dev)
        if self.scale:
            factor = 1.0 + self.scale * _gaussian(self.seed, epoch, ids[:, None], channels[None, :], (SCALE_A, SCALE_B))
            x = torch.where(valid, x * factor[:, None, :], x)
        if self.jitter:
            where = steps[None, :, None] * f + channels  # [1, T, F]: each value's place in its sequence
            noise = self.jitter * _gaussian(self.seed, epoch, ids[:, None, None], where, (JITTER_A, JITTER_B))
            x = torch.where(valid, x + noise, x)
        if self.time_mask:
            widest = (self.time_mask * lengths).long()  # whole steps within the fraction
            width = (_uniform(self.seed, epoch, ids, MASK_WIDTH) * (widest + 1)).long()  # 0 .. widest
            start = (_uniform(self.seed, epoch, ids, MASK_START) * (lengths - width + 1)).long()
            blank = (steps[None, :] >= start[:, None]) & (steps[None, :] < (start + width)[:, None])
            x = x.masked_fill(blank[:, :, None], 0.0)
        return x
