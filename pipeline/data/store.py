"""The shard store: where a prepared data set's shards are read from (a local directory, or a base URL:
http(s)://, pipe:), block by block with their bytes counted, or a whole split at once.

"Source" in this pipeline means a user's input format (pipeline/sources/); the store is what the
preparation wrote. Its shards are checked against the manifest by verify.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import ragged
from pipeline.data.manifest import Manifest, ShardEntry
from pipeline.data.remote import PipeShard, backoff, open_remote
from pipeline.data.shards import Block, iter_tar_blocks
from pipeline.errors import DataError
from pipeline.files import mask_url


@dataclass(frozen=True)
class ShardStore:
    """Where shards are read from: a local directory or a base URL (http(s)://, pipe:)."""

    directory: str
    base_url: str | None = None
    retry_s: float | None = None  # data.retry_s: how long a transient transfer failure is tried again (remote.py)

    def retry_delays(self) -> tuple[float, ...] | None:
        return None if self.retry_s is None else backoff(self.retry_s)

    def location(self, shard: ShardEntry) -> str:
        """Where the shard is read from: with data.base_url, the real URL (credentials and all)."""
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + shard.url
        return str(Path(self.directory) / shard.url)

    def shown(self, shard: ShardEntry) -> str:
        """The location as messages name it: a URL's credentials masked."""
        return mask_url(self.location(shard))

    def open(self, shard: ShardEntry):
        """The shard's bytes; a transfer that fails raises ShardStoreError where it is read (remote.py)."""
        loc = self.location(shard)
        if self.base_url:
            return open_remote(loc, self.retry_delays())
        try:
            return open(loc, "rb")
        except OSError as err:
            raise DataError(f"shard {loc} cannot be opened ({err.strerror}); check data.dir or re-run the preparation") from None


class CountedReader:
    """A shard's byte stream that counts what is read from it (data_bytes_read in summary.json)."""

    def __init__(self, raw, tally: list[int]):
        self.raw, self.tally = raw, tally

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.tally[0] += len(data)
        return data


def read_blocks(store: ShardStore, shard: ShardEntry, tally: list[int] | None = None) -> Iterator[Block]:
    """The shard's blocks in order; `tally[0]` grows by the bytes read. A caller may stop early: the
    rest of the shard is then neither read nor checked."""
    read = 0
    with store.open(shard) as stream:
        reader = stream if tally is None else CountedReader(stream, tally)
        for _, block in iter_tar_blocks(reader, store.shown(shard)):
            read += len(block)
            yield block
        if isinstance(stream, PipeShard):  # the reader stops at the archive's end: did the command end well too?
            stream.check()
    # tarfile takes a damaged header after the first one for the end of the archive, silently.
    if read != shard.num_samples:
        raise DataError(f"shard {store.shown(shard)} ended after {read} of its {shard.num_samples} samples: "
                        "it is truncated or corrupt; run prepare_data.py --verify on the dataset")


def load_split_arrays(manifest: Manifest, store: ShardStore, split: str) -> tuple[np.ndarray, ...]:
    """The whole split in memory, in manifest order, padded: (x [n, longest, F] in the data set's dtype,
    lengths int64 [n], labels int64 [n], sample ids int64 [n])."""
    parts: list[np.ndarray] = []
    lengths, ys, ids = [], [], []
    for shard in manifest.split(split).shards:
        for block in read_blocks(store, shard):
            parts.append(block.values)
            lengths.append(block.lengths)
            ys.append(block.labels.astype(np.int64))
            ids.append(block.ids.astype(np.int64))
    lengths_all = np.concatenate(lengths)
    x = ragged.pad(torch.from_numpy(np.concatenate(parts)), torch.from_numpy(lengths_all)).numpy()
    return x, lengths_all, np.concatenate(ys), np.concatenate(ids)


def load_split_tensors(manifest: Manifest, store: ShardStore, split: str) -> tuple[torch.Tensor, ...]:
    """Cases padded [n, longest, F], lengths and labels of the whole split (evaluation)."""
    x, lengths, y, _ = load_split_arrays(manifest, store, split)
    return torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(y)
