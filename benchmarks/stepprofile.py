"""Where the time of one training step goes, for the CPU default config (configs/fashion_mnist.yaml,
one process).

1. The real trainer (`pipeline.training.run.train`) runs a short job for its throughput. Then a
   run built from the same config (trainer.build_run) is driven through its public pieces, each timed:
   the next batch from `trainer.batches`, `train_step(trainer.parts, batch)`, the metrics sink,
   `trainer.evaluator` and `trainer.checkpointer.save`. Eval and checkpoint costs are amortized
   per step at the config's eval.every_steps / checkpoint.every_steps.
2. A replica of `train_step`, on batches already taken from the loader, splits the compute into
   input cast, forward, loss, backward, clipping (with its host sync), optimizer, scheduler +
   zero_grad (CPU ops are synchronous, so perf counters are exact).
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, quiet, say

CONFIG = ROOT / "configs" / "fashion_mnist.yaml"


def _timed_pieces(cfg, steps: int) -> tuple[dict, dict]:
    """Seconds and calls of each public piece of a run over `steps` steps."""
    from pipeline.distributed.launch_env import LaunchEnv
    from pipeline.training.accelerator import build_accelerator
    from pipeline.training.step import train_step
    from pipeline.training.trainer import build_run

    trainer = build_run(cfg, LaunchEnv(), build_accelerator(cfg, LaunchEnv()))  # one process
    seconds, calls = defaultdict(float), defaultdict(int)

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] += time.perf_counter() - start
        calls[name] += 1
        return out

    try:
        trainer.parts.model.train()
        batches = trainer.batches.epoch(0, 0, steps)
        for step in range(1, steps + 1):
            batch = timed("data", next, batches)
            result = timed("compute", train_step, trainer.parts, batch)
            trainer.window.add(result, step)
            trainer.state.step = step
            if step % cfg.train.log_every_steps == 0:
                metrics = timed("logging", trainer.window.close, trainer.accelerator)
                timed("logging", trainer.sink.train, step, metrics)
            if step % cfg.eval.every_steps == 0:
                timed("eval", trainer.evaluator, trainer.accelerator.unwrap_model(trainer.parts.model))
            if step % cfg.checkpoint.every_steps == 0:
                p = trainer.parts
                timed("checkpoint", trainer.checkpointer.save, trainer.state, p.model, p.optimizer, p.scheduler)
    finally:
        trainer.bar.close()
        trainer.tracker.finish()
    return seconds, calls


def _trainer_pieces(data_dir: Path, work: Path, steps: int) -> dict:
    from pipeline.config import load_config
    from pipeline.distributed.launch_env import LaunchEnv
    from pipeline.training.run import train

    base = load_config(CONFIG, [f"data.dir={data_dir}"])
    every = min(50, steps)
    cfgs = {}
    for name in ("profile-trainer", "profile-pieces"):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        cfgs[name] = load_config(CONFIG, [f"data.dir={data_dir}", f"output_dir={out}", f"train.max_steps={steps}",
                                          f"eval.every_steps={every}", f"checkpoint.every_steps={every}",
                                          "wandb.mode=disabled", "train.progress_bar=false"])
    with quiet(work / "profile-trainer.log"):
        start = time.perf_counter()
        summary = train(cfgs["profile-trainer"], LaunchEnv())  # one process
        wall = time.perf_counter() - start
        seconds, calls = _timed_pieces(cfgs["profile-pieces"], steps)
    cfg = cfgs["profile-trainer"]
    batch = cfg.train.batch_size
    step_s = batch / summary["train_samples_per_s"]
    per_step = {
        "data (wait for the loader)": seconds["data"] / max(1, calls["data"]),
        "compute (train_step)": seconds["compute"] / max(1, calls["compute"]),
        "logging, amortized": seconds["logging"] / steps,
        "eval, amortized at eval.every_steps=%d" % base.eval.every_steps:
            seconds["eval"] / max(1, calls["eval"]) / base.eval.every_steps,
        "checkpoint, amortized at checkpoint.every_steps=%d" % base.checkpoint.every_steps:
            seconds["checkpoint"] / max(1, calls["checkpoint"]) / base.checkpoint.every_steps,
    }
    per_step["other in-loop (progress bar, loss window, stop check)"] = max(
        0.0, step_s - per_step["data (wait for the loader)"] - per_step["compute (train_step)"] - seconds["logging"] / steps)
    return {
        "steps": steps, "batch_size": batch, "num_workers": cfg.data.num_workers,
        "trainer_samples_per_s": summary["train_samples_per_s"], "step_seconds_from_trainer": step_s,
        "per_step_seconds": per_step,
        "eval_seconds_per_call": seconds["eval"] / max(1, calls["eval"]),
        "checkpoint_seconds_per_call": seconds["checkpoint"] / max(1, calls["checkpoint"]),
        "calls": dict(calls), "wall_s": wall,
    }


def _step_regions(data_dir: Path, steps: int, warm: int = 5) -> dict:
    from pipeline.config import load_config
    from pipeline.data.augment import Augment
    from pipeline.data.epoch_plan import EpochPlan
    from pipeline.data.manifest import load_manifest
    from pipeline.data.order import BatchLayout
    from pipeline.data.store import ShardStore
    from pipeline.data.stream import TrainStream
    from pipeline.distributed.launch_env import LaunchEnv
    from pipeline.inputs import IMAGES
    from pipeline.model import build_model
    from pipeline.training.accelerator import build_accelerator
    from pipeline.training.batches import StreamBatches
    from pipeline.training.optimizer import build_optimizer, build_scheduler

    cfg = load_config(CONFIG, [f"data.dir={data_dir}", "output_dir=unused"])
    accelerator = build_accelerator(cfg, LaunchEnv())  # one process
    manifest = load_manifest(data_dir)
    layout = BatchLayout.make(cfg.train.batch_size, cfg.train.batch_size, 1)
    plan = EpochPlan.make(manifest, "train", layout, 0, cfg.data.shuffle_buffer)
    stream = TrainStream(manifest, ShardStore(str(data_dir)), "train", plan, 0, Augment(0))
    source = StreamBatches(stream, seed=0, data_dir=str(data_dir), pin_memory=False, record_sample_ids=False)
    batches = [micro[0] for micro in source.epoch(0, 0, min(plan.steps, warm + steps))]
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest.features, manifest.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, 10_000)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    base_optimizer = optimizer.optimizer
    device, clip = accelerator.device, cfg.train.grad_clip or float("inf")
    regions = defaultdict(float)
    for i, (x, y, *_) in enumerate(batches):
        t0 = time.perf_counter()
        inputs, targets = IMAGES(x, device), y.to(device)
        t1 = time.perf_counter()
        with accelerator.autocast():
            logits = model(inputs)
        t2 = time.perf_counter()
        loss = F.cross_entropy(logits.float(), targets)
        t3 = time.perf_counter()
        accelerator.backward(loss)
        t4 = time.perf_counter()
        float(accelerator.clip_grad_norm_(model.parameters(), clip))
        t5 = time.perf_counter()
        base_optimizer.step()  # as train_step: past Accelerate's wrapper when there is no scaler
        t6 = time.perf_counter()
        scheduler.step()
        base_optimizer.zero_grad(set_to_none=True)
        t7 = time.perf_counter()
        if i >= warm:
            for name, a, b in (("input cast (InputScale)", t0, t1), ("forward", t1, t2), ("loss", t2, t3),
                               ("backward", t3, t4), ("clip_grad_norm_ + host sync", t4, t5),
                               ("optimizer.step (AdamW)", t5, t6), ("scheduler.step + zero_grad", t6, t7)):
                regions[name] += b - a
    return {name: s / steps for name, s in regions.items()}


def run(data_dir: Path, work: Path, steps: int = 100, replica_steps: int = 30) -> dict:
    say(f"profile: configs/fashion_mnist.yaml, real trainer for {steps} steps with its pieces timed")
    pieces = _trainer_pieces(data_dir, work, steps)
    say(f"profile: replica of the step, {replica_steps} steps split into regions")
    regions = _step_regions(data_dir, replica_steps)
    return {"config": str(CONFIG.relative_to(ROOT)), "trainer": pieces, "compute_regions_seconds": regions,
            "torch_threads": torch.get_num_threads()}
