"""Small agreements between ranks."""

from __future__ import annotations

import torch


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (collective: every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(votes, reduction="sum").item() > 0)
