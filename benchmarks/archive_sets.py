"""The sequence data sets the models and tuning benchmarks run on (`make examples` fetches them), how each is
prepared, and the published figures set beside ours."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.common import PY, ROOT, env_for_children

# (FCN, ResNet, InceptionTime, ROCKET, LSTM-FCN rerun): dl-4-tsc results-ucr-128.csv / results-mts.csv (means of
# runs), InceptionTime's and ROCKET's results csv, LSTM-FCN's train_loss_old_datasets.csv (checkpoints chosen on
# training loss). None: not published for that set.
PUBLISHED = {
    "ArrowHead": (0.843, 0.838, 0.846, 0.814, 0.897),
    "OSULeaf": (0.979, 0.980, 0.942, 0.941, 0.984),
    "PLAID": (0.904, 0.940, 0.944, 0.903, None),
    "PickupGestureWiimoteZ": (0.744, 0.704, 0.760, 0.830, None),
    "BasicMotions": (None, None, None, None, None),  # 1.0 for most published methods (UEA archive papers)
    "GunPoint": (1.0, 0.991, 1.0, 1.0, 1.0),
    "JapaneseVowels": (0.993, 0.992, None, None, None),
    "FSDD": (None, None, None, None, None),
}
PUBLISHED_NAMES = ("FCN", "ResNet", "InceptionTime", "ROCKET", "LSTM-FCN")
SETS = tuple(PUBLISHED)
SOURCES = {"FSDD": ROOT / "data" / "examples" / "fsdd" / "digits.npz"}  # the others: data/examples/NAME


def prepare_example(name: str, out: Path, split_seed: int | None = None, val_size: str | None = None) -> Path:
    """`out`, prepared from the set's example files unless it already is; `split_seed` holds out another
    validation split (prepare_data.py --split-seed), `val_size` another size of it ("0": none)."""
    if not (out / "manifest.json").is_file():
        source = SOURCES.get(name, ROOT / "data" / "examples" / name)
        seed = [] if split_seed is None else ["--split-seed", str(split_seed)]
        size = [] if val_size is None else ["--val-size", val_size]
        proc = subprocess.run([PY, str(ROOT / "launch" / "prepare_data.py"), "--from", str(source), "--out", str(out),
                               *seed, *size], env=env_for_children(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"preparing {name} into {out} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out
