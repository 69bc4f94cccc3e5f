"""Where a command that uses a trained model runs: the CPU, or the GPU an `accelerate launch` gives it."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def evaluation_device(choice: str) -> torch.device | None:
    """The device for the main process; None on the other processes of a multi-process launch."""
    cuda = torch.cuda.is_available() and choice != "cpu"
    if choice == "cuda" and not cuda:
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not cuda)
    return state.device if state.is_main_process else None
