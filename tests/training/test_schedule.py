"""The learning rate each optimizer step used, as logged, against the configured schedule, at world
size 1 and 2. A scheduler passed to accelerator.prepare steps once per process per optimizer step
(huggingface/accelerate#2773): at world size 2 it would run through the schedule twice as fast."""

from __future__ import annotations

import math

import pytest
from conftest import read_jsonl, train_run

pytestmark = pytest.mark.slow

BASE_LR, TOTAL, MIN_RATIO = 0.004, 30, 0.1


def expected_lr(schedule: str, warmup: int, step: int) -> float:
    """The lr of optimizer step `step` (1-based), written out from the schedule's definition."""
    if schedule == "onecycle" and warmup == 0:
        warmup = int(0.3 * TOTAL)  # the documented default peak: 30% of the run
    if step <= warmup:
        return BASE_LR * step / warmup  # linear warmup reaching the peak at the warmup's last step
    progress = (step - 1 - warmup) / (TOTAL - warmup)
    if schedule == "cosine":
        return BASE_LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)
    return BASE_LR * (1 - (1 - MIN_RATIO) * progress)  # onecycle: linear down to min_lr_ratio


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("schedule,warmup", [("cosine", 5), ("onecycle", 0)])
def test_logged_lr_follows_the_schedule_step_by_step(tmp_path, fashion_shards, schedule, warmup, nproc):
    out = tmp_path / "run"
    train_run(out, fashion_shards, "wandb.mode=disabled", f"schedule.name={schedule}", f"schedule.warmup_steps={warmup}",
              f"schedule.min_lr_ratio={MIN_RATIO}", f"optim.lr={BASE_LR}", f"train.max_steps={TOTAL}", "train.log_every_steps=1",
              "train.batch_size=32", "model.hidden_size=8", f"eval.every_steps={TOTAL}", f"checkpoint.every_steps={TOTAL}",
              nproc=nproc)
    logged = {e["step"]: e["train/lr"] for e in read_jsonl(out / "metrics.jsonl") if "train/lr" in e}
    assert sorted(logged) == list(range(1, TOTAL + 1))
    for step, lr in logged.items():
        assert lr == pytest.approx(expected_lr(schedule, warmup, step), rel=1e-9, abs=1e-12), f"step {step}"
