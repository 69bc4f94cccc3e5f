"""The UEA/UCR time-series archive's `.ts` files (the sktime/aeon format), read by hand.

A file is a header of `@` tags (`@problemName`, `@timeStamps`, `@univariate`, `@dimensions`,
`@classLabel true <labels>`, ...; tags in any case, `#` or `%` comment lines) ended by `@data`, then one
case per line: channels separated by `:`, values within a channel by `,`, the class label after the last
`:`. `?` is a missing value (NaN here; base.check_cases refuses or fills it). With `@timeStamps true` each
value is `(timestamp,value)`: the values are kept in order and the timestamps dropped. Where labels are
optional (`open_ts(..., labels_required=False)`, cases to predict), a file saying `@classLabel false` (or
nothing) is read too: its lines have no label field, and its cases label -1.

`open_ts` reads the headers only; `TsSource.cases` streams the cases a line at a time, in runs of at most
CHUNK_CASES, so a file is never held as Python floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.sources.base import Cases, InputError, SourceInfo

CHUNK_CASES = 4096
# The archive's pair naming: <Name>_TRAIN.ts and <Name>_TEST.ts; the suffix gives the split.
_SPLIT_SUFFIXES = {"_TRAIN": "train", "_TEST": "test"}
# A problem name as some files write it ("Covid3MonthDiscrete_TEST.ts", "JapaneseVowels_TRAIN_eq.ts"):
# the data set's name is the same for both files of a pair, so the split and the extension go.
_NAME_NOISE = re.compile(r"_(TRAIN|TEST)(?=_|$)", re.IGNORECASE)
_PAIR = re.compile(r"\(([^()]*)\)")
_SHOWN_LENGTHS = 12  # channel lengths a message lists before "..." (some data sets have hundreds of channels)


class _Bad(Exception):
    """A problem in one case line; the caller names the file and line (InputError)."""


@dataclass
class _Header:
    path: Path
    problem_name: str | None = None
    classes: list[str] | None = None
    class_label: bool | None = None  # None: no @classLabel tag at all
    target_label: bool = False
    timestamps: bool = False
    univariate: bool | None = None
    dimensions: int | None = None
    data_line: int = 0  # 1-based line of @data; 0: not seen
    channels: int = 0  # declared, or the first case's
    channels_said: str = ""  # where `channels` comes from, for messages
    split: str | None = None
    first_text_line: int = 0  # a non-tag, non-comment line before @data: a file that forgot its @data line?

    @property
    def labelled(self) -> bool:
        """Whether each case line ends with ':<label>' (@classLabel true)."""
        return bool(self.class_label)


def open_ts(paths: list[Path], name: str | None = None, labels_required: bool = True) -> TsSource:
    """A source over `.ts` files (one file, or a _TRAIN/_TEST pair): their headers read and checked.

    `labels_required=False` (cases to predict): a file with `@classLabel false`, or no @classLabel line, is
    read too; its case lines have no label field, its cases get label -1 and the source no class names. A
    file with `@classLabel true ...` is read as always."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no .ts file given: name one file, or the _TRAIN.ts and _TEST.ts files of one data set")
    headers = [_read_header(path, labels_required) for path in paths]
    for header in headers:
        _settle_channels(header)
    first = headers[0]
    for other in headers[1:]:
        _check_same(first, other)
    assert first.classes is not None  # _read_header refuses a file without classes, or gives an unlabelled one []
    named = all(h.split for h in headers) and len(headers) > 1
    notes = [f"{h.path} has timestamps (@timeStamps true): they are dropped, and each channel keeps its values in "
             "file order, as if evenly spaced" for h in headers if h.timestamps]
    if len(headers) > 1 and not named:
        notes.append("the files are not a <Name>_TRAIN.ts / <Name>_TEST.ts pair, so their cases carry no split")
    info = SourceInfo(name=name or _default_name(first), files=paths, class_names=list(first.classes),
                      features=first.channels, dtype=np.dtype(np.float32), has_splits=named, notes=notes)
    return TsSource(info, headers)


def find_pair(directory: Path) -> list[Path]:
    """[train, test]: the one *_TRAIN.ts and the one *_TEST.ts in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory: give the directory that holds a data set's "
                         "<Name>_TRAIN.ts and <Name>_TEST.ts files, or the .ts files themselves")
    found = {split: sorted(p for p in directory.iterdir() if p.is_file() and p.name.upper().endswith(suffix + ".TS"))
             for suffix, split in _SPLIT_SUFFIXES.items()}
    if len(found["train"]) == 1 and len(found["test"]) == 1:
        return [found["train"][0], found["test"][0]]
    listed = "; ".join(f"{len(files)} *{suffix}.ts ({', '.join(p.name for p in files) or 'none'})"
                       for suffix, files in zip(_SPLIT_SUFFIXES, found.values(), strict=True))
    raise InputError(f"{directory} does not hold exactly one *_TRAIN.ts and one *_TEST.ts file: it holds {listed}. "
                     "Give the two .ts files of one data set instead of the directory")


class TsSource:
    """The cases of `.ts` files in file order (base.Source)."""

    def __init__(self, info: SourceInfo, headers: list[_Header]) -> None:
        self.info = info
        self._headers = headers
        # Class index = position in the first file's @classLabel; the other files declare the same set.
        self._index = {label: i for i, label in enumerate(info.class_names)}  # empty for unlabelled files

    def cases(self) -> Iterator[Cases]:
        for header in self._headers:
            yield from self._file_cases(header)

    def _file_cases(self, header: _Header) -> Iterator[Cases]:
        values: list[np.ndarray] = []
        labels: list[int] = []
        where: list[int] = []
        seen = 0
        for line_no, text in _data_lines(header):
            try:
                channels, label = _split_case(text, header)
                case = _case_values(channels, header)
                labels.append(self._label(label, header) if header.labelled else -1)
            except _Bad as bad:
                raise InputError(f"line {line_no} of {header.path}: {bad}") from None
            values.append(case)
            where.append(line_no)
            if len(values) == CHUNK_CASES:
                yield self._run(header, values, labels, where)
                seen += len(values)
                values, labels, where = [], [], []
        if values:
            yield self._run(header, values, labels, where)
        elif seen == 0:
            raise InputError(f"{header.path} has no cases after its @data line (line {header.data_line}): "
                             "give a file with at least one case per line after @data")

    def _label(self, label: str, header: _Header) -> int:
        index = self._index.get(label)
        if index is None:
            declared = ", ".join(header.classes or [])
            raise _Bad(f"the class label '{label}' is not declared by @classLabel (declared: {declared}). "
                       "Fix the label, or add it to the @classLabel line of every file of the data set, and prepare again")
        return index

    def _run(self, header: _Header, values: list[np.ndarray], labels: list[int], where: list[int]) -> Cases:
        n = len(values)
        split = None
        if self.info.has_splits:
            split = np.full(n, header.split)
        return Cases(values=np.concatenate(values).astype(np.float32, copy=False),
                     lengths=np.array([len(v) for v in values], dtype=np.int64),
                     labels=np.array(labels, dtype=np.int64),
                     file=str(header.path), where=np.array(where, dtype=np.int64), unit="line", split=split)


# ---- headers ----------------------------------------------------------------------------------------------


def _read_header(path: Path, labels_required: bool = True) -> _Header:
    """The tags up to @data; the file is not read further. Unlabelled files are refused if `labels_required`."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"{path} {what}: give the path of a .ts file of the UEA/UCR archive "
                         "(or its directory's _TRAIN.ts and _TEST.ts)")
    stem = _stem(path).upper()
    header = _Header(path=path, split=next((s for suf, s in _SPLIT_SUFFIXES.items() if stem.endswith(suf)), None))
    with _open(path) as f:
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text or text[0] in "#%":
                continue
            if text[0] != "@":
                header.first_text_line = header.first_text_line or line_no
                continue
            tag, _, value = text[1:].partition(" ")
            if tag.lower() == "data":
                header.data_line = line_no
                break
            _apply_tag(header, tag, value.strip(), line_no)
    _check_header(header, labels_required)
    if not header.labelled:
        header.classes = []
    return header


def _apply_tag(header: _Header, written: str, value: str, line_no: int) -> None:
    """One header tag (`written` as the file spells it; messages quote it so)."""
    where, tag = f"line {line_no} of {header.path}", written.lower()
    if tag == "problemname":
        # Some files name their problem twice (UnitTest_TEST.ts: UnitTest, then Chinatown): the first wins.
        header.problem_name = header.problem_name or value or None
    elif tag == "timestamps":
        header.timestamps = _flag(value, written, where)
    elif tag == "univariate":
        header.univariate = _flag(value, written, where)
    elif tag in ("dimension", "dimensions"):
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"{where}: @{written} must be followed by the number of channels (a whole number of at "
                             f"least 1), not '{value}'. Fix the header line")
        header.dimensions = int(value)
    elif tag == "classlabel":
        flag, *labels = value.split()
        header.class_label = _flag(flag if value else "", written, where)
        header.classes = labels
        if header.class_label and (not labels or len(set(labels)) != len(labels)):
            problem = "declares no labels" if not labels else "declares a label twice"
            raise InputError(f"{where}: @classLabel true {problem} ('{value}'): it must list each class label once, "
                             "separated by spaces, e.g. '@classLabel true 1 2 3'. Fix the header line")
    elif tag == "targetlabel":
        header.target_label = _flag(value, written, where)
    # @missing, @equalLength, @seriesLength and tags of later versions change nothing about reading the cases.


def _flag(value: str, tag: str, where: str) -> bool:
    word = value.split()[0].lower() if value else ""
    if word not in ("true", "false"):
        raise InputError(f"{where}: @{tag} must be followed by true or false, not '{value}'. Fix the header line")
    return word == "true"


def _check_header(header: _Header, labels_required: bool) -> None:
    path = header.path
    if not header.data_line:
        hint = (f"; line {header.first_text_line} looks like a case, so perhaps only the @data line is missing"
                if header.first_text_line else "")
        raise InputError(f"{path} has no @data line{hint}: a .ts file's header must end with a line '@data', followed "
                         "by one case per line. Is it a .ts file of the UEA/UCR archive? Add the @data line and prepare again")
    if header.target_label and not header.class_label:
        raise InputError(f"{path} declares @targetlabel true: its cases carry regression targets (a number per case), "
                         "and this pipeline trains classifiers, which need a class label per case. Prepare a "
                         "classification data set (a .ts file with '@classLabel true <labels>') instead")
    if header.class_label is False and labels_required:
        raise InputError(f"{path} declares @classLabel false: its cases are unlabelled, so there is nothing to classify. "
                         "Prepare files whose header says '@classLabel true <labels>' and whose cases end with ':<label>'")
    if header.class_label is None and labels_required:
        raise InputError(f"{path} has no @classLabel line before @data (line {header.data_line}), so its cases have no "
                         "declared classes. Add '@classLabel true <label> <label> ...' to the header and prepare again")
    if header.univariate and header.dimensions not in (None, 1):
        raise InputError(f"{path} says both @univariate true and @dimensions {header.dimensions}. Fix the header: "
                         "@univariate true means one channel")


def _settle_channels(header: _Header) -> None:
    """The channel count every case of the file must have: declared, else the first case's."""
    if header.dimensions:
        header.channels, header.channels_said = header.dimensions, f"@dimensions says {header.dimensions}"
    elif header.univariate:
        header.channels, header.channels_said = 1, "@univariate true says 1"
    else:
        for line_no, text in _data_lines(header):
            try:
                header.channels = len(_split_case(text, header)[0])
            except _Bad as bad:
                raise InputError(f"line {line_no} of {header.path}: {bad}") from None
            header.channels_said = f"the first case (line {line_no}) has {header.channels}"
            return
        raise InputError(f"{header.path} has no cases after its @data line (line {header.data_line}): "
                         "give a file with at least one case per line after @data")


def _check_same(first: _Header, other: _Header) -> None:
    """Every file of one data set is labelled alike, declares the same classes (as a set) and the same channels."""
    assert first.classes is not None and other.classes is not None
    if first.labelled != other.labelled:
        labelled, unlabelled = (first, other) if first.labelled else (other, first)
        raise InputError(f"{labelled.path} has labelled cases (@classLabel true) but {unlabelled.path} has not: every "
                         "file of one data set must be labelled alike. Give the files one at a time")
    if set(first.classes) != set(other.classes):
        raise InputError(f"{first.path} and {other.path} declare different classes ({' '.join(first.classes)} and "
                         f"{' '.join(other.classes)}): every file of one data set must have the same classes. Fix "
                         "the @classLabel lines, or prepare the files as separate data sets")
    if first.channels != other.channels:
        raise InputError(f"{first.path} and {other.path} have different channels ({first.channels}: "
                         f"{first.channels_said}; {other.channels}: {other.channels_said}): every file of one data set "
                         "must have the same channels. Prepare them as separate data sets")


def _default_name(header: _Header) -> str:
    for raw in (header.problem_name or "", _stem(header.path)):
        name = _NAME_NOISE.sub("", raw[:-3] if raw.lower().endswith(".ts") else raw)
        if name:
            return name
    return _stem(header.path)


def _stem(path: Path) -> str:
    return path.name[:-3] if path.name.lower().endswith(".ts") else path.stem


def _open(path: Path):
    # utf-8-sig drops a byte-order mark; universal newlines read Windows files; a stray byte in a comment
    # (some headers are Latin-1) must not stop the read, and one in a case is then reported as a non-number.
    return open(path, encoding="utf-8-sig", errors="replace")


# ---- cases ------------------------------------------------------------------------------------------------


def _data_lines(header: _Header) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) of each case line after @data, streamed."""
    with _open(header.path) as f:
        for line_no, line in enumerate(f, 1):
            if line_no <= header.data_line:
                continue
            text = line.strip()
            if text and text[0] not in "#%":
                yield line_no, text


def _split_label(text: str, timestamps: bool, labelled: bool = True) -> tuple[list[str], str]:
    """The channel texts and the class label ("" when not `labelled`) of a plain case line (timestamped: the
    body, unsplit)."""
    text = text.rstrip(", \t")
    if not labelled:
        return [text] if timestamps else text.split(":"), ""
    if timestamps:
        # Timestamps hold ':' ("2007-01-01 00:00:00"): the label's ':' is the first one after the last ')'.
        end = text.rfind(")")
        rest = text[end + 1:].strip()
        if end < 0 or not rest.startswith(":"):
            raise _Bad("a timestamped case must be (timestamp,value) pairs ending with '):<label>'; this line does "
                       "not end that way. Fix or remove it and prepare again")
        return [text[:end + 1]], rest[1:].strip()
    body, sep, label = text.rpartition(":")
    if not sep:
        raise _Bad("the line has no ':' before a class label: each case is its channels' values, then ':<label>'. "
                   "Fix or remove it and prepare again")
    return body.split(":"), label.strip()


def _split_case(text: str, header: _Header) -> tuple[list[list[str]], str]:
    """The value tokens of each channel, and the label ("" for an unlabelled file)."""
    timestamps = header.timestamps
    chunks, label = _split_label(text, timestamps, header.labelled)
    if timestamps:
        return _timestamped(chunks[0]), label
    channels = []
    for chunk in chunks:
        chunk = chunk.strip().rstrip(", \t")  # a trailing comma ends a channel, it is not an empty value
        tokens = chunk.split(",") if chunk else []
        if "?" in chunk:
            tokens = ["nan" if t.strip() == "?" else t for t in tokens]
        channels.append(tokens)
    return channels, label


def _timestamped(body: str) -> list[list[str]]:
    """The values of `(t,v),(t,v):(t,v),...`, per channel; the timestamps go."""
    channels: list[list[str]] = [[]]
    pos = 0
    for match in _PAIR.finditer(body):
        gap = body[pos:match.start()].strip()
        if gap == ":":
            channels.append([])
        elif gap != ("," if channels[-1] else ""):
            raise _Bad(f"'{gap}' stands between (timestamp,value) pairs, where only ',' (same channel) or ':' (next "
                       "channel) may. Fix the line and prepare again")
        stamp, comma, value = match.group(1).rpartition(",")
        if not comma:
            raise _Bad(f"'({match.group(1)})' is not a (timestamp,value) pair. Fix the line and prepare again")
        channels[-1].append("nan" if value.strip() == "?" else value)
        pos = match.end()
    if body[pos:].strip():
        raise _Bad(f"'{body[pos:].strip()[:40]}' follows the last (timestamp,value) pair. Fix the line and prepare again")
    return channels


def _case_values(channels: list[list[str]], header: _Header) -> np.ndarray:
    """float32 [steps, channels]; _Bad for a case that does not fit the file."""
    lengths = [len(tokens) for tokens in channels]
    if len(channels) != header.channels:
        raise _Bad(f"the case has {len(channels)} channel(s), but {header.channels_said}: every case of a data set needs "
                   "the same channels, separated by ':'. Fix or remove the line and prepare again")
    if 0 in lengths:
        raise _Bad(f"channel {lengths.index(0) + 1} of {len(channels)} is empty, a sequence of length 0: every channel "
                   "needs at least one value ('?' for a missing one). Fix or remove the line and prepare again")
    if min(lengths) != max(lengths):
        shown = ", ".join(map(str, lengths[:_SHOWN_LENGTHS])) + (", ..." if len(lengths) > _SHOWN_LENGTHS else "")
        odd = next(j for j, n in enumerate(lengths) if n != lengths[0])
        raise _Bad(f"the case's channels have unequal lengths ({shown} values): channel {odd + 1} has {lengths[odd]} "
                   f"values, channel 1 has {lengths[0]}. Every channel of a case needs one value per step ('?' for a "
                   "missing one). Fix or remove the line and prepare again")
    tokens = [token for chunk in channels for token in chunk]
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, reported below
            flat = np.array(tokens, dtype=np.float32)
    except ValueError:
        raise _Bad(_not_a_number(tokens, lengths[0])) from None
    if np.isinf(flat).any():
        _check_range(tokens, flat, lengths[0])
    return flat.reshape(len(channels), lengths[0]).T


def _not_a_number(tokens: list[str], steps: int) -> str:
    for i, token in enumerate(tokens):
        try:
            np.float32(token)
        except ValueError:
            shown = f"'{token.strip()}'" if token.strip() else "an empty value (two commas in a row)"
            return (f"{shown} (channel {i // steps + 1}, value {i % steps + 1}) is not a number: each value must be a "
                    "number, or '?' for a missing one. Fix the file and prepare again")
    return "a value is not a number. Fix the file and prepare again"


def _check_range(tokens: list[str], flat: np.ndarray, steps: int) -> None:
    """A finite number too large for float32 is named here; a written 'inf' is left to base.check_cases."""
    for i in np.flatnonzero(np.isinf(flat)):
        token = tokens[i].strip()
        if "inf" not in token.lower():
            raise _Bad(f"'{token}' (channel {i // steps + 1}, value {i % steps + 1}) is beyond the range of float32 "
                       "(about 3.4e38), the dtype cases are kept in. Rescale the data and prepare again")
