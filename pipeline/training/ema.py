"""An exponential moving average of the weights, kept on the device beside the trained model.

After every optimizer step from `start_step` on, each averaged weight moves a fraction
1 - decay towards the model's (one fused `_foreach_lerp_` over all of them); before it, the
average is the model itself. Nothing reads a value back from the device: the step count that
decides between copying and averaging is the trainer's Python int. torch's AveragedModel is
not used for that reason: its `update_parameters` compares a tensor to zero on the host every
call, one synchronisation per step on a GPU.

The average lives on the main process only (it alone evaluates and saves), as a copy of the
unwrapped model: evaluation and the final `model/` use it like any other model.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float, start_step: int):
        self.decay = decay
        self.start_step = start_step
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._ours = list(self.model.parameters())
        self._our_buffers = list(self.model.buffers())  # BatchNorm's running statistics: copied, not averaged

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based) of `model`, the unwrapped trained model."""
        theirs = [p.detach() for p in model.parameters()]
        if self._our_buffers:  # statistics of the trained weights' activations, as timm's ModelEmaV3 keeps them
            torch._foreach_copy_(self._our_buffers, list(model.buffers()))
        if step <= self.start_step:
            torch._foreach_copy_(self._ours, theirs)
        else:
            torch._foreach_lerp_(self._ours, theirs, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
