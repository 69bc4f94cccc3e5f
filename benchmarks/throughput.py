"""Section 2: training samples/s of our trainer vs an in-memory floor, alternated A B A B.

- ours: `pipeline.training.run.train(cfg)` in this process, configs/cpu_test.yaml (LSTM 28->64,
  Adam, cosine schedule, grad clip 1.0, data.num_workers 0) with the batch size under test,
  wandb disabled, one evaluation and one checkpoint at the very end (both outside the trainer's
  samples/s windows). samples/s = samples / seconds over the trainer's own log windows
  (metrics.jsonl `train/samples_per_s`), skipping the first window (warm-up).
- floor: the same model, optimizer, schedule, loss and clipping stepping over float tensors
  already in memory (the whole train split, pre-shuffled): no loader, no Accelerate, no logging.
  Same warm-up and measured step counts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, median, quiet, say

CONFIG = ROOT / "configs" / "cpu_test.yaml"


def bench_config(config: Path, data_dir: Path, out: Path, batch: int, total_steps: int, log_every: int, extra: list[str] = ()):
    from pipeline.config import load_config

    return load_config(config, [
        f"data.dir={data_dir}", f"output_dir={out}", f"train.batch_size={batch}", f"train.global_batch_size={batch}",
        f"train.max_steps={total_steps}",
        f"train.log_every_steps={log_every}", f"eval.every_steps={total_steps}", f"checkpoint.every_steps={total_steps}",
        "checkpoint.keep_last=1", "wandb.mode=disabled", "train.progress_bar=false", *extra,
    ])


def ours_once(data_dir: Path, work: Path, batch: int, warm_steps: int, steps: int, config: Path = CONFIG, extra=()) -> dict:
    from pipeline.distributed.launch_env import LaunchEnv
    from pipeline.training.run import train

    out = work / f"ours-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = bench_config(config, data_dir, out, batch, warm_steps + steps, warm_steps, list(extra))
    with quiet(work / "trainer.log"):
        summary = train(cfg, LaunchEnv())  # one process
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [e for e in events if "train/samples_per_s" in e and e["step"] > warm_steps]
    samples = seconds = 0.0
    prev = warm_steps
    for e in windows:
        n = (e["step"] - prev) * batch
        samples += n
        seconds += n / e["train/samples_per_s"]
        prev = e["step"]
    return {"samples_per_s": samples / seconds, "summary_train_samples_per_s": summary["train_samples_per_s"],
            "final_eval_accuracy": summary["final_eval_accuracy"], "steps": summary["steps"],
            "data_placement": summary["data_placement"],
            "eval_seconds_mean": summary.get("eval_seconds_mean")}


class Floor:
    """The same math as the trainer's step, over tensors already in memory (on `device`), under the
    same autocast (and, for fp16, a GradScaler)."""

    def __init__(self, data_dir: Path, config: Path = CONFIG, device: str = "cpu", precision: str = "no",
                 extra: list[str] = ()):
        from pipeline.data.manifest import load_manifest
        from pipeline.data.store import ShardStore, load_split_tensors

        manifest = load_manifest(data_dir)
        x, _, y = load_split_tensors(manifest, ShardStore(str(data_dir)), "train")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        self.device = torch.device(device)
        self.x = x[perm].to(self.device).float().div_(255.0).contiguous()
        self.y = y[perm].to(self.device).contiguous()
        self.features, self.num_classes = manifest.features, manifest.num_classes
        self.config = config
        self.extra = list(extra)  # config overrides the trainer is measured with (e.g. optim.fused=true)
        self.precision = precision

    def once(self, data_dir: Path, batch: int, warm_steps: int, steps: int) -> dict:
        from pipeline.model import build_model
        from pipeline.training.optimizer import build_optimizer, build_scheduler

        cfg = bench_config(self.config, data_dir, Path("unused"), batch, warm_steps + steps, warm_steps, self.extra)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.features, self.num_classes).to(self.device)
        model.train()
        opt = build_optimizer(model, cfg.optim)
        sched = build_scheduler(opt, cfg.schedule, warm_steps + steps)
        clip = cfg.train.grad_clip
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        per_epoch = len(self.y) // batch
        start = None
        for i in range(warm_steps + steps):
            if i == warm_steps:
                _sync(self.device)
                start = time.perf_counter()
            lo = (i % per_epoch) * batch
            x, y = self.x[lo : lo + batch], self.y[lo : lo + batch]
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if clip is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                assert math.isfinite(norm) or scaler
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return {"samples_per_s": steps * batch / (time.perf_counter() - start)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(data_dir: Path, work: Path, batches: list[int], reps: int, steps: int, warm_steps: int = 10) -> dict:
    floor = Floor(data_dir)
    results = {}
    for batch in batches:
        pairs = []
        for rep in range(reps):  # A B A B: floor, ours, floor, ours ...
            say(f"throughput: batch {batch}, repetition {rep + 1}/{reps}: floor, then ours ({warm_steps}+{steps} steps each)")
            f = floor.once(data_dir, batch, warm_steps, steps)
            o = ours_once(data_dir, work, batch, warm_steps, steps)
            pairs.append({"floor": f["samples_per_s"], "ours": o["samples_per_s"], "ratio": o["samples_per_s"] / f["samples_per_s"],
                          "ours_summary_train_samples_per_s": o["summary_train_samples_per_s"]})
        results[str(batch)] = {
            "floor_samples_per_s": median([p["floor"] for p in pairs]),
            "ours_samples_per_s": median([p["ours"] for p in pairs]),
            "train_vs_floor": median([p["ratio"] for p in pairs]),
            "pairs": pairs,
            "steps_measured": steps,
            "warmup_steps": warm_steps,
        }
    return {
        "config": str(CONFIG.relative_to(ROOT)),
        "by_batch": results,
        "train_vs_floor": {b: r["train_vs_floor"] for b, r in results.items()},
        "reps": reps,
        "torch_threads": torch.get_num_threads(),
    }
