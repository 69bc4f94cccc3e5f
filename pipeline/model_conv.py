"""Temporal convolutions that read each sequence only as far as it goes: the blocks of a convolutional
front-end (DeepConvLSTM / CNN-LSTM: convolutions, then the recurrent layers over their output) and of
an FCN branch beside the recurrent layers (LSTM-FCN / MLSTM-FCN: pooled, concatenated before the head).

Tensors here are [batch, channels, steps] with right padding; `lengths` holds each row's valid steps.
A row's outputs must not depend on its neighbours or on its padding, so that a sequence's logits are
the same alone and in any batch, at any world size:
- the padding is zeroed before every convolution, so a window that reaches past a sequence's end reads
  the zeros it would read alone ('same' padding);
- a stride shortens each row to ceil(length / stride) steps, and its lengths go with it;
- normalisation is per sample, over the channels and the valid steps only (`sample`); or, with
  `batch`, BatchNorm as FCN has it, its statistics over each micro-batch's valid steps while training
  and running statistics for evaluation, so that a sequence's logits at evaluation are its own. A
  micro-batch holds the same samples at any world size (pipeline/data/order.py), and the running
  statistics take every micro-batch of a step in the global batch's chunk order
  (`update_running_statistics`), so 2 ranks x 16 and 1 rank x 2 accumulation steps x 16 keep the same;
- pooled values (the squeeze-and-excitation gate, the branch's readout) average valid steps only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
EXCITE_REDUCTION = 16  # MLSTM-FCN's squeeze ratio


def valid_steps(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """float [B, 1, T]: 1 where a step holds data, 0 in the padding."""
    return (torch.arange(steps, device=lengths.device) < lengths[:, None])[:, None, :].float()


def strided_lengths(lengths: torch.Tensor, stride: int) -> torch.Tensor:
    """Valid outputs of a 'same'-padded convolution with this stride: one per started stride."""
    return (lengths + stride - 1) // stride


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, C, T] averaged over each row's valid steps -> [B, C]."""
    return (x * valid).sum(2) / valid.sum(2)


def masked_moments(x: torch.Tensor, valid: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The mean and (biased) variance of x over `dims` (kept), valid steps only, and how many values each covers.

    Float32 whatever the autocast dtype: a mean over thousands of steps loses digits in half.
    """
    x, valid = x.float(), valid.float()
    count = valid.sum(dims, keepdim=True) * math.prod(x.shape[d] // valid.shape[d] for d in dims)
    mean = (x * valid).sum(dims, keepdim=True) / count
    var = ((x - mean) * valid).pow(2).sum(dims, keepdim=True) / count
    return mean, var, count


def _standardised(x: torch.Tensor, valid: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, then each channel's scale and shift, in float32; padding -> 0; in x's dtype."""
    out = (x.float() - mean) * torch.rsqrt(var + EPS) * weight[:, None].float() + bias[:, None].float()
    return (out * valid.float()).to(x.dtype)


def masked_norm(x: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GroupNorm with one group, its statistics over each row's channels and valid steps only; padding -> 0."""
    mean, var, _ = masked_moments(x, valid, (1, 2))
    return _standardised(x, valid, mean, var, weight, bias)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the valid steps only. Training: the micro-batch's statistics, each kept in `pending`
    until update_running_statistics folds them into the running ones; evaluation: the running ones."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.pending: list[torch.Tensor] = []  # [2, C] per training forward: mean, unbiased variance

    def forward(self, x: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, count = masked_moments(x, valid, (0, 2))  # [1, C, 1] each
            if torch.is_grad_enabled():
                unbiased = var * count / (count - 1).clamp(min=1)
                self.pending.append(torch.stack([mean.flatten(), unbiased.flatten()]).detach())
        else:
            mean, var = self.running_mean[None, :, None], self.running_var[None, :, None]
        return _standardised(x, valid, mean, var, weight, bias)

    def fold(self, statistics: torch.Tensor) -> None:
        """Running statistics += each micro-batch's ([N, 2, C], in chunk order), as PyTorch's BatchNorm would."""
        with torch.no_grad():
            for mean, var in statistics:
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)


class ConvBlock(nn.Module):
    """Convolution ('same' padding, optional stride), masked normalisation, ReLU: FCN's block."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, norm: str = "sample"):
        super().__init__()
        # No bias: the normalisation's shift takes its place.
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False)
        self.weight = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.batch_norm = MaskedBatchNorm(out_channels) if norm == "batch" else None
        self.left = (kernel - 1) // 2  # PyTorch's padding='same' split, which it refuses with a stride
        self.right = kernel - 1 - self.left

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * valid_steps(lengths, x.shape[2]).to(x.dtype)
        x = self.conv(F.pad(x, (self.left, self.right)))
        lengths = strided_lengths(lengths, self.conv.stride[0])
        valid = valid_steps(lengths, x.shape[2])
        norm = self.batch_norm if self.batch_norm is not None else masked_norm
        return F.relu(norm(x, valid, self.weight, self.bias)), lengths


def update_running_statistics(model: nn.Module, world_size: int) -> None:
    """Fold the micro-batch statistics of one optimizer step into every MaskedBatchNorm's running ones, in
    the global batch's chunk order (chunk a*W + r: rank r's accumulation step a, order.chunk_index), so that
    any world size that computes the same micro-batches ends with the same running statistics, bit for bit.
    All ranks call it once per step (a collective where W > 1); a model without batch norm returns at once."""
    norms = [m for m in model.modules() if isinstance(m, MaskedBatchNorm)]
    if not norms or not norms[0].pending:  # every rank alike: the same model, the same micro-batch count
        return
    # [A, sum of 2 x C]: each row one micro-batch, every layer's statistics side by side
    local = torch.cat([torch.stack(n.pending).flatten(1) for n in norms], 1)
    for n in norms:
        n.pending.clear()
    if world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, local.contiguous())
        local = torch.stack(gathered, 1).flatten(0, 1)  # [A * W, ...]: row a*W + r is chunk a*W + r
    at = 0
    for n in norms:
        width = 2 * n.running_mean.numel()
        n.fold(local[:, at:at + width].unflatten(1, (2, -1)))
        at += width


class SqueezeExcite(nn.Module):
    """Each channel scaled by a gate computed from the channels' means over the valid steps (Hu et al. 2018)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // EXCITE_REDUCTION)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = valid_steps(lengths, x.shape[2]).to(x.dtype)
        return x * self.gate(masked_mean(x, valid))[:, :, None]


class ConvStack(nn.Module):
    """FCN's blocks in a row; the first may stride; squeeze-and-excitation after every block but the last
    (MLSTM-FCN's placement) when `excite`. forward: x [B, C_in, T] -> ([B, C_out, T'], lengths')."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], kernels: tuple[int, ...],
                 stride: int = 1, excite: bool = False, norm: str = "sample"):
        super().__init__()
        ins = (in_channels, *channels[:-1])
        self.blocks = nn.ModuleList(ConvBlock(i, o, k, stride if n == 0 else 1, norm)
                                    for n, (i, o, k) in enumerate(zip(ins, channels, kernels, strict=True)))
        self.excite = nn.ModuleList(
            SqueezeExcite(c) if excite and n < len(channels) - 1 else nn.Identity() for n, c in enumerate(channels))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block, excite in zip(self.blocks, self.excite, strict=True):
            x, lengths = block(x, lengths)
            if isinstance(excite, SqueezeExcite):
                x = excite(x, lengths)
        return x, lengths


class ConvFrontend(nn.Module):
    """Learned local features for the recurrent layers: [B, T, F] -> ([B, T', C], lengths')."""

    def __init__(self, features: int, channels: tuple[int, ...], kernels: tuple[int, ...], stride: int, excite: bool,
                 norm: str = "sample"):
        super().__init__()
        self.stack = ConvStack(features, channels, kernels, stride, excite, norm)
        self.out_features = channels[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lengths = self.stack(x.transpose(1, 2), lengths)
        return out.transpose(1, 2), lengths


class ConvBranch(nn.Module):
    """FCN beside the recurrent layers: [B, T, F] -> [B, C], the last block averaged over valid steps."""

    def __init__(self, features: int, channels: tuple[int, ...], kernels: tuple[int, ...], excite: bool,
                 norm: str = "sample"):
        super().__init__()
        self.stack = ConvStack(features, channels, kernels, 1, excite, norm)
        self.out_features = channels[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, lengths = self.stack(x.transpose(1, 2), lengths)
        return masked_mean(out, valid_steps(lengths, out.shape[2]).to(out.dtype))
