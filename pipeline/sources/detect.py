"""Which source reads a path given to `prepare_data.py --from`: the format is taken from the path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.sources.base import InputError, Source


@dataclass(frozen=True)
class ColumnOptions:
    """Where a Parquet file keeps its parts (the --*-column flags)."""

    label: str | None = None
    sequence: str | None = None
    channels: list[str] | None = None
    group: str | None = None
    split: str | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.label, self.sequence, self.channels, self.group, self.split))


def open_source(path: str | Path, columns: ColumnOptions = ColumnOptions(), name: str | None = None,
                labels_required: bool = True) -> Source:
    """A .npz file; a .ts file or a directory of one *_TRAIN.ts / *_TEST.ts pair; a .parquet file or a
    directory of them. `labels_required=False` (cases to predict): labels are read where the file has them."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a .npz, .ts or .parquet file, or a directory of "
                         "*_TRAIN.ts/*_TEST.ts or of .parquet files")
    kind = _kind(path)
    if kind != "parquet" and columns.given():
        raise InputError(f"{path} is a {kind} source; the --*-column flags are for Parquet only")
    if kind == "npz":
        from pipeline.sources.npz import open_npz

        return open_npz(path, name, labels_required)
    if kind == "ts":
        from pipeline.sources.ts import find_pair, open_ts

        return open_ts(find_pair(path) if path.is_dir() else [path], name, labels_required=labels_required)
    from pipeline.sources.parquet import open_parquet

    if columns.label is None and labels_required:
        raise InputError(f"{path} is Parquet: name its label column with --label-column, and its values with "
                         "--sequence-column (one list<list<float>> column) or --channel-columns a,b,c (one list<float> "
                         "column per channel)")
    return open_parquet(path, columns.label, columns.sequence, columns.channels, columns.group, columns.split, name,
                        labels_required=labels_required)


def _kind(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".ts", ".parquet"):
            return suffix[1:]
        raise InputError(f"{path}: cannot tell its format from the name; a source is a .npz, .ts or .parquet "
                         "file (or a directory of .ts or .parquet files)")
    names = [p.name.lower() for p in path.iterdir() if p.is_file()]
    has_ts = any(n.endswith(".ts") for n in names)
    has_parquet = any(n.endswith(".parquet") for n in names)
    if has_ts and not has_parquet:
        return "ts"
    if has_parquet and not has_ts:
        return "parquet"
    raise InputError(f"{path} is a directory holding {'both .ts and .parquet files' if has_ts else 'no .ts or .parquet file'}; "
                     "give a directory of one *_TRAIN.ts/*_TEST.ts pair or of .parquet files, or the file itself")
