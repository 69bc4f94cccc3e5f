"""Which cases go to train, val and test: the source's own splits, or held out by seed, stratified by
class and, when the source gives groups, grouped (no group has cases in two splits).

Pure functions of the labels, the groups and the seed: the same input gives the same splits."""

from __future__ import annotations

import math

import numpy as np

from pipeline.data.manifest import HeldOut
from pipeline.errors import ConfigError
from pipeline.sources.base import SPLIT_NAMES, InputError, SourceInfo

TRAIN, VAL, TEST = range(3)


def check_size(size: float, flag: str) -> None:
    """ConfigError naming the flag and its value unless `size` is 0 (none), a fraction below 1 or a
    whole number of cases. Checked before any split is made, so a value the source's own split would
    leave unused is not silently accepted."""
    if math.isfinite(size) and size >= 0 and (size < 1 or size == int(size)):
        return
    problem = "is not a number" if math.isnan(size) else "is infinite" if math.isinf(size) else \
        "is negative" if size < 0 else "is neither a fraction below 1 nor a whole number of cases"
    raise ConfigError(f"{flag} {size:g} {problem}: give a fraction such as 0.2, a whole number of cases such as 50, "
                      "or 0 for no such split")


def count_of(size: float, total: int, flag: str, pool: str = "data set") -> int:
    """A held-out size (checked by check_size) as a number of cases: a fraction of `total` (0 < size < 1)
    or a count; ConfigError where it leaves no case to train on."""
    check_size(size, flag)
    # a fraction takes at least one case: a small data set still gets every split it asks for
    count = max(1, round(size * total)) if 0 < size < 1 else int(size)
    if not count < total:
        raise ConfigError(f"{flag} {size:g} would hold out {count} of the {pool}'s {total} cases, leaving none to train "
                          f"on: give a smaller fraction, a count below {total}, or 0 for no such split")
    return count


def hold_out(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a held-out set of `size` samples, stratified by class: each class gives its share of
    `size` (largest remainders settle the rounding), chosen by a generator of `seed`."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(int)
    by_remainder = np.argsort(-(exact - take), kind="stable")
    take[by_remainder[: size - take.sum()]] += 1
    _keep_one_of_each(take, counts, by_remainder)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def _keep_one_of_each(take: np.ndarray, counts: np.ndarray, order: np.ndarray) -> None:
    """A class is never held out whole (a small data set would lose it from training): its place goes to
    classes with cases to spare, in `order`. Where nothing binds (every class larger than its share) the
    shares stay as they are."""
    room = np.maximum(counts - 1, 0)
    short = int(np.maximum(take - room, 0).sum())
    np.minimum(take, room, out=take)
    for c in order:
        if short == 0:
            return
        extra = min(short, int(room[c] - take[c]))
        take[c] += extra
        short -= extra


def hold_out_groups(labels: np.ndarray, groups: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of whole groups whose cases come near `size`, class by class: the groups, in an order drawn
    from `seed`, each joins the held-out side when it brings the per-class counts closer to their shares
    (a greedy pass, as grouped splitters do; exact shares are rarely possible with whole groups)."""
    keys, member = np.unique(groups, return_inverse=True)
    num_classes = int(labels.max()) + 1
    per_group = np.zeros((len(keys), num_classes))
    np.add.at(per_group, (member, labels), 1)
    target = np.bincount(labels, minlength=num_classes) * size / len(labels)
    held = np.zeros(num_classes)
    chosen = []
    for g in np.random.default_rng(seed).permutation(len(keys)):
        if np.abs(target - held - per_group[g]).sum() < np.abs(target - held).sum():
            held += per_group[g]
            chosen.append(g)
    return np.flatnonzero(np.isin(member, chosen))


def _held(labels: np.ndarray, groups: np.ndarray | None, size: int, seed: int, what: str, files: str) -> np.ndarray:
    if groups is None:
        return hold_out(labels, size, seed)
    chosen = hold_out_groups(labels, groups, size, seed)
    if len(chosen) in (0, len(labels)):
        raise InputError(f"{files}: cannot hold out {what} by groups: the {len(np.unique(groups))} group(s) cannot be "
                         f"divided into about {size} and {len(labels) - size} cases. Give more groups, or no groups")
    return chosen


def source_splits(split: np.ndarray, file: str) -> np.ndarray:
    """The source's split names as codes; InputError naming an unknown one."""
    codes = np.full(len(split), -1, np.int64)
    for code, name in enumerate(SPLIT_NAMES):
        codes[split == name] = code
    if (codes < 0).any():
        bad = str(split[np.flatnonzero(codes < 0)[0]])
        raise InputError(f"{file}: a case has split {bad!r}; split names are {', '.join(SPLIT_NAMES)}. Rename it, or "
                         "leave the split out to have the test and validation splits drawn by seed")
    if not (codes == TRAIN).any():
        raise InputError(f"{file}: no case is in the train split; the source's split must give train cases")
    return codes


def assign(labels: np.ndarray, groups: np.ndarray | None, given: np.ndarray | None, test_size: float,
           val_size: float, seed: int, source: SourceInfo | None = None) -> tuple[np.ndarray, dict[str, HeldOut]]:
    """Each case's split code, and how each split was made. `given`: the source's codes (or None);
    `source`: what messages name (its files and class names)."""
    check_size(test_size, "--test-size")
    check_size(val_size, "--val-size")
    codes = np.full(len(labels), TRAIN, np.int64) if given is None else given.copy()
    splitting = {}
    files = _files(source)
    for code, size in ((TEST, test_size), (VAL, val_size)):
        name = SPLIT_NAMES[code]
        if (codes == code).any():
            splitting[name] = HeldOut(origin="source")
        elif size != 0:
            from_split = "train" if code == VAL or given is not None else "all"
            splitting[name] = _hold_out_split(codes, code, labels, groups, size, seed, from_split, files)
    _check_groups(codes, groups, files)
    _check_trained(codes, labels, splitting, source)
    return codes, splitting


def _hold_out_split(codes: np.ndarray, code: int, labels: np.ndarray, groups: np.ndarray | None, size: float,
                    seed: int, from_split: str, files: str) -> HeldOut:
    """Move `size` of the train cases to split `code` (in place in `codes`); how it was made. A data set too
    small to give a case (each class has one train case left) gets none, and the record says so."""
    name, pool = SPLIT_NAMES[code], np.flatnonzero(codes == TRAIN)
    pool_name = "data set" if from_split == "all" else "train split"
    count = count_of(size, len(pool), f"--{name}-size", pool_name)
    chosen = _held(labels[pool], None if groups is None else groups[pool], count, seed, name, files)
    codes[pool[chosen]] = code
    how = dict(from_split=from_split, size=size, seed=seed, stratified_by="label",
               grouped_by="group" if groups is not None else None)
    if len(chosen):
        return HeldOut(origin="held_out", **how)
    classes = len(np.unique(labels[pool]))
    return HeldOut(origin="not_made", reason=f"no case could be held out: each of the {len(pool)} cases of the "
                   f"{pool_name} is the only one of its class ({classes} classes), and a class is never held out "
                   "whole (training would lose it)", **how)


def _files(source: SourceInfo | None) -> str:
    """The source's files as messages name them."""
    if source is None:
        return "the data set"
    names = [str(p) for p in source.files]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_groups(codes: np.ndarray, groups: np.ndarray | None, files: str) -> None:
    """No group in two splits, even where the source gave the splits (a leak the user should hear of)."""
    if groups is None:
        return
    for a in range(3):
        for b in range(a + 1, 3):
            shared = np.intersect1d(groups[codes == a], groups[codes == b])
            if len(shared):
                raise InputError(f"{files}: group {str(shared[0])!r} has cases in both the {SPLIT_NAMES[a]} and "
                                 f"{SPLIT_NAMES[b]} splits ({len(shared)} such group(s)): the source's split leaks "
                                 "groups. Fix the split, or leave it out to have splits drawn by group")


def _check_trained(codes: np.ndarray, labels: np.ndarray, made: dict[str, HeldOut], source: SourceInfo | None) -> None:
    """Every class with val or test cases has train cases: a model never shown a class cannot predict it, and
    its held-out cases would only count as errors. Held out by seed, a class always keeps a train case;
    a source's own split, or whole groups, can take them all."""
    if len(labels) == 0:
        return
    counts = np.zeros((len(SPLIT_NAMES), int(labels.max()) + 1), np.int64)
    np.add.at(counts, (codes, labels), 1)
    lacking = np.flatnonzero((counts[TRAIN] == 0) & (counts.sum(axis=0) > 0))
    if len(lacking) == 0:
        return
    c = int(lacking[0])
    name = source.class_names[c] if source is not None and c < len(source.class_names) else str(c)
    held = [s for s in SPLIT_NAMES[1:] if counts[SPLIT_NAMES.index(s), c] and made[s].origin == "held_out"]
    fix = ("its cases' groups all went to the held-out split: change --split-seed, or give its cases more groups"
           if held else "give the class train cases in the source's split, or remove its cases from the data set")
    shown = ", ".join(f"{s} {counts[i, c]}" for i, s in enumerate(SPLIT_NAMES))
    raise InputError(f"{_files(source)}: class {name!r} has no case in the train split ({shown} cases), so a model "
                     f"trained on these splits can never predict it ({len(lacking)} such class(es)). To prepare it, {fix}")
