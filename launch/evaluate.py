"""Evaluate a trained model on a prepared split: accuracy, loss, per-class precision/recall/F1,
the confusion matrix (JSON and PNG) and the most confident mistakes.

    python launch/evaluate.py --model runs/fashion_mnist/model --data data/fashion_mnist
    python launch/evaluate.py --model runs/cpu_test/checkpoints/step-00000200 --data data/fashion_mnist --out eval/
    accelerate launch --num_processes 1 launch/evaluate.py --model ... --data ...    # on a GPU
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run's model directory (RUN/model) or a checkpoint (RUN/checkpoints/step-N)")
    p.add_argument("--data", required=True, help="prepared dataset directory (launch/prepare_data.py --out DIR)")
    p.add_argument("--split", default="test", help="split of the manifest to evaluate (default: test)")
    p.add_argument("--out", help="output directory (default: RUN/eval-SPLIT, or RUN/eval-SPLIT-step-N for a checkpoint)")
    p.add_argument("--force", action="store_true", help="replace an evaluation already in --out")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the batch size training evaluated with (its model card), else 1000")
    p.add_argument("--precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="autocast dtype; auto: the one the model was trained with, as its evaluations were")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled",
                   help="log the evaluation to W&B (a run of its own, job type eval, naming the training run)")
    p.add_argument("--wandb-into-training-run", action="store_true", help="log into the training run itself instead")
    return p.parse_args()


def main(env) -> int:
    args = parse_args()
    from pipeline.distributed.cpu_threads import configure

    configure(env)  # before torch loads: OpenMP reads its variables then
    from pipeline.inference.evaluate import print_table, run, track
    from pipeline.inference.placement import evaluation_device

    device = evaluation_device(args.device)
    if device is None:  # not the main process of a multi-process launch: rank 0 evaluates alone
        return 0
    outcome = run(args.model, args.data, args.split, args.out, args.batch_size, args.precision, args.force, device)
    print_table(outcome["report"], outcome["out"])
    if args.wandb != "disabled":
        track(outcome, args.wandb, args.wandb_into_training_run)
    return 0


if __name__ == "__main__":
    from pipeline.distributed.launch_env import LaunchEnv

    run_cli(main, LaunchEnv.from_environ)  # under accelerate launch: one rank of several
