"""Optimizer and learning-rate schedule, both counted in optimizer steps.

The scheduler is never passed to `accelerator.prepare`: a prepared scheduler steps once per
process per optimizer step (huggingface/accelerate#2773), which would finish a cosine
schedule N times too early on N ranks.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import OptimConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    fused = True if cfg.fused else None  # None: torch's default (foreach where it can)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based)."""
    warmup = cfg.warmup_steps
    if cfg.name == "onecycle" and warmup == 0:
        warmup = max(1, int(0.3 * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.name == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    # onecycle: linear warmup to the peak, then linear annealing to min_lr_ratio
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))
