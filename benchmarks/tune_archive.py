"""Tune `configs/sequences.yaml` on archive data sets with one budget for all, and report the winners' test
accuracy (mean of the final seeds) beside the published figures.

    python benchmarks/tune_archive.py --sets PLAID ArrowHead --work runs/tune-archive \\
        --trials 40 --timeout 1800 --workers 2 --out benchmarks/results/cpu-tuned.json

Each set is prepared from `make examples`' files (data/examples/NAME) with the default splits, then tuned
with launch/tune.py and configs/search/sequences.yaml: chosen on validation (k-fold where the val split is
small), the winner trained with seeds 0-2 and test read once each. A set already tuned in --work is read,
not run again; the JSON gathers every set done so far.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from benchmarks.archive_sets import PUBLISHED, PUBLISHED_NAMES, prepare_example
from benchmarks.common import PY, ROOT, env_for_children, say, table
from benchmarks.fold_choice import queued
from pipeline.tuning.study import PRUNERS

SPACE = ROOT / "configs" / "search" / "sequences.yaml"

def tune_set(name: str, work: Path, args: argparse.Namespace) -> dict:
    # A study under another pruner is another study: the median's keep the set's name alone
    study = work / "studies" / (name if args.pruner == "median" else f"{name}-{args.pruner}")
    data = prepare_example(name, work / "data" / name)
    if not (study / "final.json").is_file():
        start = time.perf_counter()
        argv = [PY, str(ROOT / "launch" / "tune.py"), "--config", str(ROOT / "configs" / "sequences.yaml"),
                f"data.dir={data}", "wandb.mode=disabled", "--space", str(SPACE), "--trials", str(args.trials),
                "--workers", str(args.workers), "--timeout", str(args.timeout), "--pruner", args.pruner, "--dir", str(study)]
        with open(work / f"{name}.log", "w") as log:
            subprocess.run(argv, check=True, env=env_for_children(), stdout=log, stderr=subprocess.STDOUT)
        (study / "wall_s").write_text(f"{time.perf_counter() - start:.1f}\n")
    report = json.loads((study / "study.json").read_text())
    final = json.loads((study / "final.json").read_text())
    wall = study / "wall_s"
    return {"trials": report["trials"], "complete": report["complete"], "pruned": report["pruned"],
            "failed": report["failed"], "best": report["best"], "final": final,
            "wall_s": float(wall.read_text()) if wall.is_file() else None,
            # the config as given and the starting points, measured by every study: a model chosen across sets
            "starts": queued(study / "trials.csv")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", required=True, help="names under data/examples (make examples)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="launch/tune.py --pruner; none gives every trial's whole curve "
                   "to benchmarks/pruner_replay.py")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    for name in args.sets:
        say(f"{name}: tuning ({args.trials} trials, {args.workers} workers, at most {args.timeout:.0f} s)")
        results[name] = {**tune_set(name, args.work, args), "budget": {"trials": args.trials, "timeout_s": args.timeout,
                                                                       "workers": args.workers,
                                                                       "pruner": args.pruner}}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = []
    for name, r in results.items():
        published = dict(zip(PUBLISHED_NAMES, PUBLISHED.get(name, (None,) * len(PUBLISHED_NAMES)), strict=True))
        rows.append([name, f"{r['final']['test_mean']:.3f} ± {r['final']['test_std']:.3f}",
                     f"{r['best']['val_accuracy']:.3f}", f"{r['trials']} ({r['pruned']} pruned)",
                     f"{r['wall_s'] or 0:.0f}", *(f"{v:.3f}" if v is not None else "-" for v in published.values())])
    print(table("tuned configs/sequences.yaml, beside the published figures", ["data set", "test (seeds 0-2)", "val (folds)", "trials", "wall s", *PUBLISHED_NAMES], rows))


if __name__ == "__main__":
    main()
