"""Which cases go to train, val and test: the source's own splits, or held out by seed, stratified by
class and, when the source gives groups, grouped (no group has cases in two splits).

Pure functions of the labels, the groups and the seed: the same input gives the same splits."""

from __future__ import annotations

import numpy as np

from pipeline.data.manifest import HeldOut
from pipeline.errors import ConfigError
from pipeline.sources.base import SPLIT_NAMES, InputError

TRAIN, VAL, TEST = range(3)


def count_of(size: float, total: int, what: str) -> int:
    """A held-out size as a number of cases: a fraction of `total` (0 < size < 1) or a count."""
    # a fraction takes at least one case: a small data set still gets every split it asks for
    count = max(1, round(size * total)) if 0 < size < 1 else int(size)
    if size != count and size >= 1:
        raise ConfigError(f"{what} {size} is neither a fraction below 1 nor a whole number of cases")
    if not 0 < count < total:
        raise ConfigError(f"{what} {size} asks for {count} of {total} cases; it must leave cases on both sides "
                          "(a fraction such as 0.1, or a count below the total)")
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


def _held(labels: np.ndarray, groups: np.ndarray | None, size: int, seed: int, what: str) -> np.ndarray:
    if groups is None:
        return hold_out(labels, size, seed)
    chosen = hold_out_groups(labels, groups, size, seed)
    if len(chosen) in (0, len(labels)):
        raise InputError(f"cannot hold out {what} by groups: the {len(np.unique(groups))} group(s) cannot be divided "
                         f"into about {size} and {len(labels) - size} cases. Give more groups, or no groups")
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
           val_size: float, seed: int) -> tuple[np.ndarray, dict[str, HeldOut]]:
    """Each case's split code, and how each split was made. `given`: the source's codes (or None)."""
    codes = np.full(len(labels), TRAIN, np.int64) if given is None else given.copy()
    splitting = {}
    grouped = "group" if groups is not None else None
    for code, name, size, source in ((TEST, "test", test_size, "all"), (VAL, "val", val_size, "train")):
        if (codes == code).any():
            splitting[name] = HeldOut(origin="source")
            continue
        if size == 0:
            continue
        pool = np.flatnonzero(codes == TRAIN)
        count = count_of(size, len(pool), f"--{name}-size")
        sub_groups = None if groups is None else groups[pool]
        codes[pool[_held(labels[pool], sub_groups, count, seed, name)]] = code
        splitting[name] = HeldOut(origin="held_out", from_split="train" if source == "train" or given is not None
                                  else "all", size=size, seed=seed, stratified_by="label", grouped_by=grouped)
    _check_groups(codes, groups)
    return codes, splitting


def _check_groups(codes: np.ndarray, groups: np.ndarray | None) -> None:
    """No group in two splits, even where the source gave the splits (a leak the user should hear of)."""
    if groups is None:
        return
    for a in range(3):
        for b in range(a + 1, 3):
            shared = np.intersect1d(groups[codes == a], groups[codes == b])
            if len(shared):
                raise InputError(f"group {str(shared[0])!r} has cases in both the {SPLIT_NAMES[a]} and {SPLIT_NAMES[b]} "
                                 f"splits ({len(shared)} such group(s)): the source's split leaks groups. Fix the split, "
                                 "or leave it out to have splits drawn by group")
