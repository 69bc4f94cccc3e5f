"""Class labels as sources give them (integers or strings) -> class indices and names."""

from __future__ import annotations

import numpy as np

from pipeline.sources.base import InputError


def encode_labels(raw: np.ndarray, declared: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """(int64 class indices, class names). With `declared` names, integer labels index them and string
    labels must be among them; else the classes are the labels' sorted distinct values (integers in
    numeric order), named as written."""
    if declared is not None:
        if raw.dtype.kind in "iu":
            bad = (raw < 0) | (raw >= len(declared))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"{where}: case {i} has label {raw[i]}, but there are {len(declared)} classes "
                                 f"({', '.join(declared[:10])}); integer labels index the class names")
            return raw.astype(np.int64), declared
        return _index_of(raw.astype(str), declared, where), declared
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise InputError(f"{where}: the labels are fractional numbers; this pipeline classifies: give each case a "
                             "class (an integer or a name)")
        raw = raw.astype(np.int64)
    if raw.dtype.kind not in "iuUSO":
        raise InputError(f"{where}: labels of dtype {raw.dtype} cannot name classes; use integers or strings")
    values, index = np.unique(raw if raw.dtype.kind in "iu" else raw.astype(str), return_inverse=True)
    if len(values) < 2:
        raise InputError(f"{where}: every case has the label {values[0] if len(values) else '(none)'}; a classifier "
                         "needs at least two classes")
    return index.astype(np.int64), [str(v) for v in values]


def _index_of(labels: np.ndarray, names: list[str], where: str) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(names)}
    out = np.empty(len(labels), np.int64)
    for i, label in enumerate(labels):
        if label not in lookup:
            raise InputError(f"{where}: case {i} has label {label!r}, which is not one of the declared classes "
                             f"({', '.join(names[:20])}); fix the label or the class list")
        out[i] = lookup[label]
    return out
