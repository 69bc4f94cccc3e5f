"""How stored values become the model's inputs, on the device, the same in training, evaluation and
prediction: uint8 images divided by 255 (as the image recipes always were); any other data
standardised per channel with its train split's statistics (the manifest's `normalization`), saved
in the model card so that evaluate and predict apply exactly what training did (tsai#603 is what
happens when statistics come from the first batch instead)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

# A channel that never varies in training (std 0) is centred and left unscaled.
MIN_STD = 1e-8


@dataclass(frozen=True)
class InputScale:
    mean: tuple[float, ...] | None = None  # None: images, / 255
    std: tuple[float, ...] | None = None

    @classmethod
    def for_data(cls, manifest) -> InputScale:
        if manifest.image_shape is not None:
            return cls()
        return cls(tuple(manifest.normalization.mean), tuple(manifest.normalization.std))

    def __call__(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """float32 inputs on `device`; the cast happens after the copy (fewer bytes moved)."""
        x = x.to(device, non_blocking=True).float()
        if self.mean is None:
            return x.div_(255.0)
        return (x - _on(self.mean, x.device)) / _on(self.std, x.device).clamp_min(MIN_STD)

    def card(self) -> dict[str, Any] | None:
        """As the model card keeps it (None: images)."""
        return None if self.mean is None else {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_card(cls, card: dict[str, Any] | None) -> InputScale:
        return cls() if not card else cls(tuple(card["mean"]), tuple(card["std"]))


@functools.lru_cache(maxsize=16)
def _on(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The statistics as a tensor on `device`, made once: not a host-to-device copy every micro-batch."""
    return torch.tensor(values, dtype=torch.float32, device=device)


IMAGES = InputScale()  # the image data sets' scaling: the default where none is given
