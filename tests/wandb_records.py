"""Read what an offline wandb run would sync: the `.wandb` transaction log.

wandb >= 0.30 dropped its Python reader (wandb.sdk.internal.datastore), so tests read the file
themselves. Format, as written by wandb-core 0.31 (checked against a real run):
  * 7-byte header `<4sHB`: b":W&B", 0xBEE1, version 0;
  * then LevelDB-log style chunks in 32 KiB blocks; a block tail shorter than a chunk header
    is zero padding;
  * chunk header `<IHB`: crc32 (zlib, unmasked, seeded with the type byte), payload length,
    type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4;
  * each reassembled payload is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

from pipeline.tracking import STEP_KEY

MAGIC = b":W&B"
MAGIC_VERSION = 0xBEE1
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptLog(ValueError):
    pass


def _payloads(data: bytes) -> Iterator[bytes]:
    magic, version, _ = FILE_HEADER.unpack_from(data)
    if magic != MAGIC or version != MAGIC_VERSION:
        raise CorruptLog(f"not a wandb transaction log (header {data[:7]!r})")
    pos, pending = FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            raise CorruptLog(f"truncated chunk header at byte {pos}")
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        payload = data[start : start + length]
        if kind == 0 and length == 0:
            # Zero padding up to the end of a block.
            pos += left_in_block
            continue
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise CorruptLog(f"bad chunk at byte {pos} (type {kind}, length {length})")
        pos = start + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += payload
            if kind == LAST:
                yield pending
                pending = None
        else:
            raise CorruptLog(f"unexpected chunk type {kind} at byte {pos}")


def read_records(path: Path) -> list[pb.Record]:
    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _path(item: Any) -> list[str]:
    # Flat keys come as `key`, nested ones (media descriptors, "_wandb") as a path. A logged
    # key like "eval/accuracy" is a single element: the slash is part of the name.
    return [item.key] if item.key else list(item.nested_key)


def _assign(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _path(item)
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = json.loads(item.value_json)


def _remove(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _path(item)
    for name in parents:
        target = target.get(name, {})
    target.pop(leaf, None)


@dataclass
class RunLog:
    """The facts of one `.wandb` file, decoded into plain Python values."""

    path: Path
    run: pb.RunRecord | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[pb.MetricRecord] = field(default_factory=list)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    exit: pb.RunExitRecord | None = None
    preempting: bool = False

    @property
    def run_id(self) -> str:
        assert self.run is not None, f"{self.path} holds no run record"
        return self.run.run_id

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def read_table(self, descriptor: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a logged wandb.Table, from its history/summary descriptor."""
        assert descriptor.get("_type") == "table-file", descriptor
        return json.loads((self.path.parent / "files" / descriptor["path"]).read_text())

    def column(self, key: str, step_key: str = STEP_KEY) -> list[tuple[Any, Any]]:
        """(step, value) for every history row holding `key`."""
        return [(row.get(step_key), row[key]) for row in self.rows_with(key)]


def _update(target: dict[str, Any], updates: Any, removes: Any = ()) -> None:
    for item in updates:
        _assign(target, item)
    for item in removes:
        _remove(target, item)


def parse(path: Path) -> RunLog:
    log = RunLog(path=Path(path))
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            log.run = record.run
            _update(log.config, record.run.config.update)
        elif kind == "config":
            _update(log.config, record.config.update, record.config.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _update(row, record.history.item)
            log.history.append(row)
        elif kind == "summary":
            _update(log.summary, record.summary.update, record.summary.remove)
        elif kind == "metric":
            log.metrics.append(record.metric)
        elif kind == "artifact":
            log.artifacts.append(record.artifact)
        elif kind == "exit":
            log.exit = record.exit
        elif kind == "preempting":
            log.preempting = True
    return log


def find_logs(root: Path) -> list[Path]:
    """All `.wandb` files under root, oldest run directory first."""

    def started(path: Path) -> tuple[str, float]:
        stamp = re.search(r"\d{8}_\d{6}", path.parent.name)
        return (stamp.group(0) if stamp else "", path.stat().st_mtime)

    return sorted(Path(root).rglob("run-*.wandb"), key=started)


def parse_finished(path: Path, timeout_s: float = 30.0) -> RunLog:
    """Parse a run's log once its exit record is on disk.

    wandb-core writes the log asynchronously: `run.finish()` can return while the file still
    holds only its header (seen with 0.31 in offline mode); process exit waits, a test must too.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            log = parse(path)
            if log.exit is not None:
                return log
        except (CorruptLog, struct.error):
            pass  # caught mid-write
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout_s} s")
        time.sleep(0.05)
