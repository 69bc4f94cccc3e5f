"""Augmentation whose randomness belongs to the sample: a function of (seed, epoch, sample id).

A sample is mirrored, shifted and erased the same way whichever rank, loader worker or
placement handles it, and a resumed run redraws exactly what an uninterrupted one drew. The
random numbers come from a counter-based integer hash (lowbias32, by Chris Wellons), written
once with the operators numpy arrays and torch tensors share, so the loader workers (numpy) and
resident data (torch, on the device) compute the same bits. Every product stays below 2**63, so
int64 never overflows: 32-bit multiplications are done in 16-bit halves. Every decision is made
in integers (the one square root is of an integer, which IEEE rounds the same everywhere), so
no library's rounding of a transcendental function can tell the two apart.

Random erasing (Zhong et al., 2017; torchvision's RandomErasing) blanks a rectangle of each
chosen image: its area a fraction of the image drawn from `erase_area`, its height within about
1.75x of the area's square root either way (aspect ratios up to ~3), its place uniform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
# What each random number decides; one stream each, so adding a decision changes none of the others.
FLIP, SHIFT_Y, SHIFT_X = 1, 2, 3
ERASE, ERASE_AREA, ERASE_HEIGHT, ERASE_Y, ERASE_X = 4, 5, 6, 7, 8


def _mul32(x, c: int):
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def mix32(x):
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_random(seed: int, epoch: int, ids, stream: int):
    """A 32-bit random integer per sample id (int64 array or tensor, like `ids`)."""
    key = mix32(mix32(mix32(seed & _M32) ^ (epoch & _M32)) ^ stream)
    return mix32(ids ^ key)


@dataclass(frozen=True)
class Augment:
    seed: int
    hflip: bool = False
    shift: int = 0
    erase: float = 0.0  # probability that an image gets a rectangle blanked
    erase_area: tuple[float, float] = (0.02, 0.25)  # of the image, the rectangle's range

    @property
    def active(self) -> bool:
        return self.hflip or self.shift > 0 or self.erase > 0

    def numpy(self, x: np.ndarray, ids: np.ndarray, epoch: int) -> np.ndarray:
        """x uint8 [n, h, w] (not modified), ids int64 [n]."""
        if not self.active:
            return x
        x = x.copy()
        ids = ids.astype(np.int64)
        if self.hflip:
            flip = (sample_random(self.seed, epoch, ids, FLIP) & 1).astype(bool)
            x[flip] = x[flip, :, ::-1]
        if self.shift:
            s, (n, h, w) = self.shift, x.shape
            dy = sample_random(self.seed, epoch, ids, SHIFT_Y) % (2 * s + 1)
            dx = sample_random(self.seed, epoch, ids, SHIFT_X) % (2 * s + 1)
            padded = np.pad(x, ((0, 0), (s, s), (s, s)))
            rows = (dy[:, None] + np.arange(h))[:, :, None]
            cols = (dx[:, None] + np.arange(w))[:, None, :]
            x = padded[np.arange(n)[:, None, None], rows, cols]
        if self.erase:
            mask = self._erase_mask(ids, epoch, x.shape, np.arange,
                                    lambda v: np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64))
            x[mask] = 0
        return x

    def torch(self, x: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """The same on tensors, on their device."""
        if not self.active:
            return x
        ids = ids.to(torch.int64)
        if self.hflip:
            flip = (sample_random(self.seed, epoch, ids, FLIP) & 1).bool()
            x = torch.where(flip[:, None, None], x.flip(-1), x)
        if self.shift:
            s, (n, h, w), dev = self.shift, x.shape, x.device
            dy = sample_random(self.seed, epoch, ids, SHIFT_Y) % (2 * s + 1)
            dx = sample_random(self.seed, epoch, ids, SHIFT_X) % (2 * s + 1)
            padded = F.pad(x, (s, s, s, s))
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]
            x = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]
        if self.erase:
            dev = x.device
            mask = self._erase_mask(ids, epoch, x.shape, lambda k: torch.arange(k, device=dev),
                                    lambda v: torch.floor(torch.sqrt(v.double())).long())
            x = x.masked_fill(mask, 0)
        return x

    def _erase_mask(self, ids, epoch: int, shape, arange, isqrt):
        """[n, h, w] True where a pixel is blanked; integer decisions only (module docstring)."""
        _, h, w = shape
        chosen = (sample_random(self.seed, epoch, ids, ERASE) & 0xFFFF) < round(self.erase * 65536)
        low, high = max(1, int(np.ceil(self.erase_area[0] * h * w))), max(1, int(self.erase_area[1] * h * w))
        area = low + sample_random(self.seed, epoch, ids, ERASE_AREA) % (high - low + 1)
        root = isqrt(area)
        tall_low = (root * 4 // 7).clip(1, h)
        tall_high = (root * 7 // 4).clip(1, h)
        height = tall_low + sample_random(self.seed, epoch, ids, ERASE_HEIGHT) % (tall_high - tall_low + 1)
        width = ((area + height // 2) // height).clip(1, w)
        top = sample_random(self.seed, epoch, ids, ERASE_Y) % (h - height + 1)
        left = sample_random(self.seed, epoch, ids, ERASE_X) % (w - width + 1)
        rows, cols = arange(h)[None, :], arange(w)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
        return chosen[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
