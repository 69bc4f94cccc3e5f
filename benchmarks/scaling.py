"""Section 4: scaling on the CPU. One process at batch 256 vs two gloo processes at 128 each
(`accelerate launch --multi_gpu --num_processes 2`, Accelerator(cpu=True) in the trainer):
same global batch, same number of optimizer steps, same config (configs/cpu_test.yaml).
samples/s and final accuracy come from each run's summary.json; world_size is checked.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.common import PY, run_checked, say
from pipeline.distributed.launcher import free_port


def _one(nproc: int, data_dir: Path, work: Path, global_batch: int, steps: int, timeout: float) -> dict:
    out = work / f"scaling-{nproc}proc"
    shutil.rmtree(out, ignore_errors=True)
    args = ["launch/train.py", "--config", "configs/cpu_test.yaml", f"data.dir={data_dir}", f"output_dir={out}",
            f"train.batch_size={global_batch // nproc}", f"train.global_batch_size={global_batch}",
            f"train.max_steps={steps}", f"eval.every_steps={steps}",
            f"checkpoint.every_steps={steps}", f"train.log_every_steps={min(10, steps)}", "wandb.mode=disabled",
            "train.progress_bar=false"]
    if nproc == 1:
        cmd = [PY, *args]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", str(nproc),
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    run_checked(cmd, timeout)
    summary = json.loads((out / "summary.json").read_text())
    if summary["world_size"] != nproc:
        raise RuntimeError(f"asked for {nproc} processes, the run had world size {summary['world_size']}")
    return {"processes": nproc, "per_process_batch": global_batch // nproc, "global_batch": global_batch,
            "steps": summary["steps"], "world_size": summary["world_size"],
            "distributed_type": summary["distributed_type"], "samples_per_s": summary["train_samples_per_s"],
            "final_eval_accuracy": summary["final_eval_accuracy"], "wall_s": summary["wall_s"]}


def run(data_dir: Path, work: Path, steps: int, global_batch: int = 256, timeout: float = 900) -> dict:
    rows = []
    for nproc in (1, 2):
        say(f"scaling: {nproc} process(es) x batch {global_batch // nproc}, {steps} steps")
        rows.append(_one(nproc, data_dir, work, global_batch, steps, timeout))
    return {"runs": rows, "speedup_2proc": rows[1]["samples_per_s"] / rows[0]["samples_per_s"],
            "config": "configs/cpu_test.yaml",
            "note": "torch's elastic launcher sets OMP_NUM_THREADS=1 per process when several run, unless set"}
