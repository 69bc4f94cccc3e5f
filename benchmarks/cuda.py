"""Section 5 (`--device cuda`, GPU machines): our trainer's samples/s at batch 256..4096 in fp32,
bf16 and fp16 (configs/fashion_mnist.yaml), its rank-zero evaluation time, and the time to a
0.90 test accuracy on Fashion-MNIST. Fails with a clear message where CUDA is absent.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import throughput, tta
from benchmarks.common import ROOT, say

BATCHES = (256, 512, 1024, 2048, 4096)
PRECISIONS = ("no", "bf16", "fp16")


class NoCuda(SystemExit):
    pass


def require_cuda() -> str:
    if not torch.cuda.is_available():
        raise NoCuda(
            "benchmarks/run.py --device cuda: no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"torch.cuda.device_count() = {torch.cuda.device_count()}); run it on a GPU machine, "
            "or use --device cpu"
        )
    return torch.cuda.get_device_name(0)


def run(data_dir: Path, work: Path, quick: bool, steps: int, target: float = 0.90, tta_timeout: float = 1800) -> dict:
    name = require_cuda()
    config = ROOT / "configs" / "fashion_mnist.yaml"
    sweep = []
    for precision in PRECISIONS:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            sweep.append({"mixed_precision": precision, "skipped": "bf16 not supported by this GPU"})
            continue
        for batch in BATCHES:
            say(f"cuda: {precision}, batch {batch}")
            r = throughput.ours_once(data_dir, work, batch, 10, steps, config=config,
                                     extra=[f"train.mixed_precision={precision}"])
            sweep.append({"mixed_precision": precision, "batch_size": batch, "samples_per_s": r["samples_per_s"],
                          "eval_seconds": r["eval_seconds_mean"], "final_eval_accuracy": r["final_eval_accuracy"]})
    result = {"device_name": name, "config": str(config.relative_to(ROOT)), "sweep": sweep}
    if not quick:
        say(f"cuda: time to {target} test accuracy (configs/fashion_mnist.yaml, bf16)")
        out = work / "cuda-tta"
        precision = "bf16" if torch.cuda.is_bf16_supported() else "no"
        r = tta.run_until(tta.trainer_args("configs/fashion_mnist.yaml", data_dir, out, [f"train.mixed_precision={precision}"]),
                          out / "metrics.jsonl", target, tta_timeout, work / "cuda-tta.log")
        result["time_to_target"] = {"target": target, "mixed_precision": precision, **r}
    return result
