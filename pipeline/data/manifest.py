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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError, DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "pipeline.shards/v1"
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardEntry(_Strict):
    url: str = Field(description="Relative to the dataset directory or base URL")
    num_samples: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class SplitEntry(_Strict):
    num_samples: int = Field(ge=1)
    shards: list[ShardEntry] = Field(min_length=1)


class SourceEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class Validation(_Strict):
    """How the validation split was held out of another split."""

    from_split: str
    num_samples: int = Field(ge=1)
    seed: int
    stratified_by: str


class Manifest(_Strict):
    format: str = FORMAT
    dataset: str
    image_shape: list[int]
    dtype: str
    label_dtype: str
    num_classes: int
    class_names: list[str]
    block_size: int = Field(ge=1, description="Samples packed per tar record")
    shuffle_seed: int = Field(description="Seed of the permutation applied to train before packing")
    validation: Validation | None = Field(None, description="Absent in datasets prepared without a validation split")
    sources: dict[str, SourceEntry]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    splits: dict[str, SplitEntry]

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            raise DataError(f"dataset {self.dataset} has no split '{name}' (it has {', '.join(self.splits)})")
        return self.splits[name]


def fingerprint(dataset: str, splits: dict[str, SplitEntry]) -> str:
    """Identity of the data a model was trained on: the shard contents, in order."""
    payload = {
        "dataset": dataset,
        "splits": {name: [(s.url, s.sha256) for s in split.shards] for name, split in sorted(splits.items())},
    }
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


def prepare_hint(directory: str | Path, dataset: str = "fashion_mnist") -> str:
    return f"python launch/prepare_data.py --dataset {dataset} --out {directory}"


def load_manifest(directory: str | Path, dataset_hint: str = "fashion_mnist") -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {directory} is not a prepared dataset (or its preparation did not finish). "
            f"Prepare it with: {prepare_hint(directory, dataset_hint)}"
        )
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run {prepare_hint(directory, dataset_hint)} --force") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise DataError(f"{path} does not match the manifest schema ({problems}); re-run the preparation with --force") from None
    if manifest.format != FORMAT:
        raise DataError(f"{path} has format {manifest.format!r}; this version reads {FORMAT!r}")
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
    if fingerprint(manifest.dataset, manifest.splits) != manifest.fingerprint:
        raise DataError(f"{path}: the fingerprint does not match the shard list; the manifest was edited by hand")
    return manifest


def check_dataset(manifest: Manifest, directory: str | Path, expected: str) -> None:
    """The config's data.dataset must name what the directory holds: class names and reference
    figures differ between MNIST and Fashion-MNIST though the shapes are the same."""
    if manifest.dataset != expected:
        raise ConfigError(
            f"data.dataset is {expected}, but the prepared dataset in {directory} holds {manifest.dataset} (its "
            f"{MANIFEST_NAME} says so). To train on it, set data.dataset={manifest.dataset}; to train on {expected}, "
            f"point data.dir at a directory prepared with: {prepare_hint('DIR', expected)}"
        )


def manifest_json_schema() -> dict:
    return Manifest.model_json_schema()
