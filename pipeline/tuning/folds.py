"""k-fold cross-validation for data sets whose validation split is too small to tell settings apart.

A validation split of a few dozen cases moves in steps of several points: 27 cases (JapaneseVowels) or
4 (ArrowHead) cannot rank candidates that differ by one or two. Below MIN_VAL cases, the study pools the
prepared train and val splits and cuts them into FOLDS stratified folds; each trial trains once per fold,
validating on it, and is scored over all the folds' cases, so every non-test case validates exactly once. k-fold rather
than repeated hold-out: no case counts twice and none is left out, at the same cost of one run per fold.
Three folds, not five or ten: a trial costs a run per fold, and three already validate on every case.

The folds are prepared once per study (STUDY/folds/kK-seedS/fold-N), from the train and val shards alone:
the test split is not copied, nor read.

The winner is then trained on every case the folds validated on (a refit, as scikit-learn's search does):
STUDY/folds/refit trains on train + val, the cases the study chose on, and holds the test split as it was.
It holds no val split: its runs evaluate nothing before the end (eval.split none), where a val inside what
they train on would say nothing held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.prepare import ShardOptions, prepare
from pipeline.data.store import ShardStore, load_split_arrays
from pipeline.errors import ConfigError
from pipeline.files import exclusive_lock

MIN_VAL = 400  # validation cases below which a study cross-validates (the standard error of 0.8 there is 0.02)
FOLDS = 3


def fold_count(requested: int | None, manifest: Manifest) -> int:
    """--folds as given, or by the size of the prepared validation split."""
    if requested is not None:
        return requested
    return FOLDS if manifest.split("val").num_samples < MIN_VAL else 1


def assign(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold of each case: each class's cases shuffled and dealt round-robin, so every fold has its share."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    offset = 0
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # the next class continues the deal: folds of equal size
    return fold


def _pool(data_dir: str, manifest: Manifest, splits: tuple[str, ...] = ("train", "val")
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cases of `splits` one after the other, padded to the longest: (x, lengths, labels)."""
    store = ShardStore(data_dir)
    parts = [load_split_arrays(manifest, store, split) for split in splits]
    longest = max(p[0].shape[1] for p in parts)
    x = np.concatenate([np.pad(p[0], ((0, 0), (0, longest - p[0].shape[1]), (0, 0))) for p in parts])
    return x, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _check(data_dir: str, manifest: Manifest) -> None:
    held = manifest.splitting.get("val")
    if held is not None and held.grouped_by:
        raise ConfigError(f"{data_dir}: its validation split keeps groups ({held.grouped_by}) apart from train, and the "
                          "shards do not carry the groups, so folds could put one speaker or subject on both sides. "
                          "Tune on the prepared split with --folds 1")


def prepare_folds(data_dir: str, study_dir: Path, folds: int, seed: int, say: Callable[[str], None]) -> list[Path]:
    """FOLDS prepared data sets, fold k validating on the k-th part of train + val; made once per study (in a
    directory named for K and the seed), under a lock: tuners started together share them."""
    manifest = load_manifest(data_dir, None)
    _check(data_dir, manifest)
    home = study_dir / "folds" / f"k{folds}-seed{seed}"
    home.mkdir(parents=True, exist_ok=True)
    targets = [home / f"fold-{k}" for k in range(folds)]
    with exclusive_lock(home / ".lock"):  # the other tuners wait here, then find the folds made
        if not all((t / "manifest.json").is_file() for t in targets):
            _write_folds(data_dir, manifest, targets, seed)
    say(f"{folds}-fold cross-validation over the train and val cases of {data_dir} (its val split holds "
        f"{manifest.split('val').num_samples}, fewer than {MIN_VAL}): {home}")
    return targets


def _write_folds(data_dir: str, manifest: Manifest, targets: list[Path], seed: int) -> None:
    x, lengths, labels = _pool(data_dir, manifest)
    fold = assign(labels, len(targets), seed)
    for k, target in enumerate(targets):
        if not (target / "manifest.json").is_file():
            _write(manifest, target, x, lengths, labels, np.where(fold == k, "val", "train"))


def _write(manifest: Manifest, target: Path, x: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
           split: np.ndarray) -> None:
    """Cases (padded x, their lengths and labels) prepared at `target` in the splits named case by case, with
    the source data set's name, classes, block size and dtype."""
    from pipeline.sources.npz import NpzSource

    source_file = target.parent / f"{target.name}.npz"
    ragged = np.concatenate([x[i, :n] for i, n in enumerate(lengths)])
    np.savez(source_file, X=ragged, lengths=lengths, y=labels, classes=np.array(manifest.class_names), split=split)
    prepare(NpzSource(source_file, manifest.dataset), target,
            ShardOptions(manifest.block_size, val_size=0, test_size=0, dtype=manifest.dtype), name=manifest.dataset)
    source_file.unlink()


def prepare_refit(data_dir: str, study_dir: Path, say: Callable[[str], None]) -> Path:
    """STUDY/folds/refit: train + val to train on and test as prepared, no val (its runs evaluate nothing before
    the end: eval.split none); made once."""
    manifest = load_manifest(data_dir, None)
    target = study_dir / "folds" / "refit"
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / ".lock-refit"):
        if not (target / "manifest.json").is_file():
            x, lengths, labels = _pool(data_dir, manifest, ("train", "val", "test"))
            pooled = sum(manifest.split(s).num_samples for s in ("train", "val"))
            split = np.repeat(["train", "test"], [pooled, len(labels) - pooled])
            _write(manifest, target, x, lengths, labels, split)
    say(f"the winner trains on the train and val cases of {data_dir} ({target}), as the folds did between them, "
        "evaluating nothing before its test")
    return target
