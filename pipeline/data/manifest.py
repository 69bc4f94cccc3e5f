"""The dataset manifest: schema, atomic write, load with clear errors.

A manifest's presence means the dataset is complete: it is written last, through a temp file
and a rename. Shard URLs are relative to the manifest's directory (or to a base URL), so the
same manifest serves a local dir, a shared volume or object storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from pipeline.errors import ConfigError, DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "pipeline.shards/v2"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class UnsafeManifest(DataError):
    """A manifest that would make the reader open something outside the dataset."""

    exit_code = 2


def unsafe_url_reason(url: str) -> str | None:
    """Why a shard url could reach outside its dataset directory (or data.base_url); None if it cannot."""
    if not url or "\\" in url or "\x00" in url:
        return "is empty or holds a backslash or NUL"
    if _SCHEME.match(url):
        return "has a scheme (only data.base_url may name one)"
    if url.startswith("/"):
        return "is an absolute path"
    normal = posixpath.normpath(url)
    if normal == ".":
        return "names the dataset directory itself"
    if normal == ".." or normal.startswith("../"):
        return "leaves the dataset directory through '..'"
    return None


class OldManifest(DataError):
    """A manifest of another format version: the data must be prepared again."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardEntry(_Strict):
    url: str = Field(description="Relative to the dataset directory or base URL")
    num_samples: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class Histogram(_Strict):
    edges: list[float] = Field(description="Bin edges in steps: bin i holds lengths in [edges[i], edges[i+1]), the last bin closed")
    counts: list[int]


class LengthStats(_Strict):
    """Sequence lengths (steps) of a split."""

    min: int = Field(ge=1)
    median: float
    max: int = Field(ge=1)
    histogram: Histogram


class SplitEntry(_Strict):
    num_samples: int = Field(ge=1)
    class_counts: dict[str, int] = Field(description="Cases per class name, in class order")
    lengths: LengthStats
    shards: list[ShardEntry] = Field(min_length=1)

    @property
    def bytes(self) -> int:
        """The split's shards on disk."""
        return sum(s.bytes for s in self.shards)


class SourceEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class HeldOut(_Strict):
    """How a split was made: given by the source, or held out of another split by seed; or, asked for
    but holding no case (origin not_made: too few cases to hold one out), why not."""

    origin: Literal["source", "held_out", "not_made"]
    from_split: str | None = Field(None, description="With origin held_out: the split it was taken from")
    size: float | None = Field(None, description="A fraction of from_split (below 1) or a number of cases, as asked")
    seed: int | None = None
    stratified_by: str | None = Field(None, description="'label': each class gives its share")
    grouped_by: str | None = Field(None, description="'group': no group has cases in two splits")
    reason: str | None = Field(None, description="With origin not_made: why no case was held out")

    @model_serializer(mode="wrap")
    def _without_absent_reason(self, write):
        # Written only where there is one: a manifest of a split that was made reads (and fingerprints)
        # as it did before the field existed.
        data = write(self)
        if self.reason is None:
            data.pop("reason", None)
        return data


class Normalization(_Strict):
    """Per-channel statistics of the train split's steps (every valid step of every case, padding excluded)."""

    split: str = "train"
    mean: list[float]
    std: list[float]


class Manifest(_Strict):
    format: str = FORMAT
    dataset: str
    features: int = Field(ge=1, description="Channels per step")
    dtype: Literal["uint8", "float16", "float32"] = Field(description="The values' dtype in the shards")
    label_dtype: str
    num_classes: int = Field(ge=2)
    class_names: list[str]
    image_shape: list[int] | None = Field(None, description="[steps, features] of the image data sets (MNIST family); "
                                          "absent for sequences")
    block_size: int = Field(ge=1, description="Samples packed per tar record")
    shuffle_seed: int = Field(description="Seed of the permutation applied to train before packing")
    splitting: dict[str, HeldOut] = Field(description="How each split was made")
    normalization: Normalization
    sources: dict[str, SourceEntry]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    splits: dict[str, SplitEntry]

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            raise DataError(f"dataset {self.dataset} has no split '{name}' (it has {', '.join(self.splits)})")
        return self.splits[name]

    @property
    def validation(self) -> HeldOut | None:
        return self.splitting.get("val")


def fingerprint(manifest: Manifest) -> str:
    """Identity of the data a model was trained on: everything the manifest says (the shard contents in
    order, splits, classes, statistics, sources) but the fingerprint itself."""
    payload = manifest.model_dump(mode="json", exclude={"fingerprint"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    target = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def prepare_hint(directory: str | Path, dataset: str | None = "fashion_mnist") -> str:
    if dataset in ("mnist", "fashion_mnist"):
        return f"python launch/prepare_data.py --dataset {dataset} --out {directory}"
    return f"python launch/prepare_data.py --from YOUR_DATA --out {directory}"


def load_manifest(directory: str | Path, dataset_hint: str | None = "fashion_mnist") -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {directory} is not a prepared dataset (or its preparation did not finish). "
            f"Prepare it with: {prepare_hint(directory, dataset_hint)}"
        )
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and raw.get("format") != FORMAT:
            raise OldManifest(f"{path} has format {raw.get('format')!r}, written by another version of this pipeline; "
                              f"this version reads {FORMAT!r}. Prepare the data again: {prepare_hint(directory, dataset_hint)} --force")
        manifest = Manifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run {prepare_hint(directory, dataset_hint)} --force") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise DataError(f"{path} does not match the manifest schema ({problems}); re-run the preparation with --force") from None
    for name, how in manifest.splitting.items():
        if how.origin != "not_made" and name not in manifest.splits:  # a split recorded as made must be there
            raise DataError(f"{path}: the {name} split is recorded as made ({how.origin}) but the manifest lists no "
                            f"{name} shards; the manifest was edited or is damaged. Re-run the preparation with --force")
    for name, split in manifest.splits.items():
        total = sum(s.num_samples for s in split.shards)
        if total != split.num_samples:
            raise DataError(f"{path}: split {name} says {split.num_samples} samples but its shards hold {total}")
    for name, split in manifest.splits.items():
        for shard in split.shards:
            reason = unsafe_url_reason(shard.url)
            if reason:
                raise UnsafeManifest(
                    f"{path} lists shard url {shard.url!r} (split {name}), which {reason}: shard urls must be relative "
                    "paths that stay inside the dataset directory. Nothing was read. The manifest was edited or comes from "
                    f"a source you should not trust; re-run {prepare_hint(directory, dataset_hint)} --force"
                )
    if fingerprint(manifest) != manifest.fingerprint:
        raise DataError(f"{path}: the fingerprint does not match what the manifest says; the manifest was edited by hand")
    return manifest


def check_dataset(manifest: Manifest, directory: str | Path, expected: str | None) -> None:
    """The config's data.dataset, when set, must name what the directory holds: class names and reference
    figures differ between MNIST and Fashion-MNIST though the shapes are the same."""
    if expected is not None and manifest.dataset != expected:
        raise ConfigError(
            f"data.dataset is {expected}, but the prepared dataset in {directory} holds {manifest.dataset} (its "
            f"{MANIFEST_NAME} says so). To train on it, set data.dataset={manifest.dataset}; to train on {expected}, "
            f"point data.dir at a directory prepared with: {prepare_hint('DIR', expected)}"
        )


def manifest_json_schema() -> dict:
    return Manifest.model_json_schema()
