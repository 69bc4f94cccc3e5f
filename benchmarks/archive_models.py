"""Models of configs/sequences.yaml side by side on the archive sets, the protocol of docs/sequences.md
"Convolutional models": per data set, seed N trains on its own prepared copy holding out its own validation
split (--split-seed N; FSDD one copy), the test split the source's own; two runs at a time, one thread each.

    python benchmarks/archive_models.py --candidate front-batch model.conv_norm=batch \\
        --candidate branch-batch model.frontend=none model.conv_branch=true model.conv_norm=batch \\
        --out benchmarks/results/cpu-conv-norm.json

A report, not a selection: every run's validation and test accuracy is written, as the models table asks;
the choice of a default reads validation alone (the mean over the sets of each set's validation mean).
Runs already finished (their summary.json in --work) are read, not run again.

--whole-train is the archive's own protocol, the one its published figures follow: every seed trains on the
whole train split (one copy per set, prepared with --val-size 0) and the final weights are scored on test.
Without a val split the run evaluates on test during training (its warning says so); with eval.keep_best off
nothing is chosen by those evaluations and they change no weight, so a candidate may thin them to save their
time (eval.every_epochs=100, as cpu-whole-train.json's runs did) or skip them (eval.split=none):

    python benchmarks/archive_models.py --whole-train --work runs/archive-whole-train \
        --candidate default eval.every_epochs=100 --out benchmarks/results/cpu-whole-train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.archive_sets import PUBLISHED, SETS, prepare_example
from benchmarks.common import PY, ROOT, env_for_children, say, table


def data_copy(work: Path, name: str, seed: int, whole_train: bool = False) -> Path:
    """The prepared copy seed `seed` trains on (FSDD's 240 validation recordings need one copy for all; the
    whole train split is one copy for all)."""
    if whole_train:
        return prepare_example(name, work / "data" / f"{name}-whole", val_size="0")
    split = 0 if name == "FSDD" else seed
    return prepare_example(name, work / "data" / f"{name}-s{split}", split)


def run(work: Path, name: str, candidate: str, overrides: list[str], seed: int, whole_train: bool = False) -> dict:
    out = work / "runs" / name / f"{candidate}-seed{seed}"
    if not (out / "summary.json").is_file():
        data = data_copy(work, name, seed, whole_train)
        argv = [PY, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "sequences.yaml"),
                f"data.dir={data}", f"output_dir={out}", f"train.seed={seed}", "train.cpu_threads=1",
                "wandb.mode=disabled", *overrides]
        log = work / "logs" / f"{name}-{candidate}-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run(argv, check=True, env=env_for_children(), stdout=f, stderr=subprocess.STDOUT)
        say(f"{name} {candidate} seed {seed} done")
    s = json.loads((out / "summary.json").read_text())
    val = None if s["eval_split"] == "test" else s["final_eval_accuracy"]
    return {"val": val, "test": s["test_accuracy"], "seconds": s["wall_s"]}


def cell(row: dict) -> str:
    test = f"{statistics.fmean(row['test']):.3f}"
    return test if None in row["val"] else f"{test} (val {statistics.fmean(row['val']):.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", nargs="+", action="append", required=True, metavar="NAME [key=value ...]",
                   help="a name and its overrides of configs/sequences.yaml; repeat for each candidate")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "archive-models")
    p.add_argument("--out", type=Path)
    p.add_argument("--whole-train", action="store_true",
                   help="train every seed on the whole train split, no validation held out (the archive's protocol)")
    args = p.parse_args(argv)
    candidates = {c[0]: c[1:] for c in args.candidate}
    sets, seeds = args.sets.split(","), [int(s) for s in args.seeds.split(",")]
    for name in sets:  # prepared first, one at a time: two runs must not prepare one copy together
        for seed in seeds:
            data_copy(args.work, name, seed, args.whole_train)
    jobs = [(n, c, seed) for n in sets for c in candidates for seed in seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run(args.work, j[0], j[1], candidates[j[1]], j[2], args.whole_train), jobs))
    report: dict = {"candidates": candidates, "seeds": seeds, "whole_train": args.whole_train, "sets": {}}
    for (name, candidate, _), result in zip(jobs, results, strict=True):
        row = report["sets"].setdefault(name, {}).setdefault(candidate, {"val": [], "test": [], "seconds": []})
        for key in row:
            row[key].append(result[key])
    rows = [[n, *(cell(report["sets"][n][c]) for c in candidates), PUBLISHED.get(n, (None,))[0] or "-"] for n in sets]
    print(table("test accuracy, mean of the seeds (validation mean)", ["data set", *candidates, "FCN"], rows))
    if not args.whole_train:  # there, nothing was held out to choose on
        report["validation_across_sets"] = {
            c: statistics.fmean(statistics.fmean(report["sets"][n][c]["val"]) for n in sets) for c in candidates}
        print("validation across the sets:", {c: round(v, 4) for c, v in report["validation_across_sets"].items()})
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
