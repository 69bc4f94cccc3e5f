"""Are the store's shards the ones the manifest lists? Checked before training: present and of their size,
or byte for byte (data.verify: size | sha256 | none), on disk or on the server of data.base_url."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.manifest import Manifest, ShardEntry
from pipeline.data.remote import is_http, probe_sizes
from pipeline.data.store import ShardStore
from pipeline.errors import DataError
from pipeline.files import sha256_file, sha256_stream


def verify_shards(manifest: Manifest, store: ShardStore, split: str, mode: str) -> None:
    """Fail before training on missing or resized shards ('size'), or on changed bytes ('sha256')."""
    if mode == "none":
        return
    if store.base_url:
        _verify_remote(manifest.split(split).shards, store, mode)
        return
    for shard in manifest.split(split).shards:
        path = Path(store.location(shard))
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; re-run the preparation with --force")
        if path.stat().st_size != shard.bytes:
            raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {shard.bytes}; it is damaged")
        if mode == "sha256" and sha256_file(path) != shard.sha256:
            raise DataError(f"shard {path} does not match its sha256 in the manifest; it is damaged")


def _verify_remote(shards: list[ShardEntry], store: ShardStore, mode: str) -> None:
    """The server has every shard, at its size ('size': a HEAD request each, over http(s) only: a pipe's
    size is known only by reading it) or with its bytes ('sha256': each read whole)."""
    if mode == "sha256":
        for shard in shards:
            with store.open(shard) as stream:
                digest = sha256_stream(stream)
            if digest != shard.sha256:
                raise DataError(f"shard {store.shown(shard)} does not match its sha256 in the manifest: the server's "
                                "copy differs from the prepared one; upload the prepared dataset again")
        return
    if not is_http(store.base_url or ""):
        return
    for shard, size in zip(shards, probe_sizes([store.location(s) for s in shards], store.retry_delays()), strict=True):
        if size is not None and size != shard.bytes:
            raise DataError(f"shard {store.shown(shard)} is {size} bytes on the server, the manifest says {shard.bytes}: "
                            "the server's copy differs from the prepared one; upload the prepared dataset again")
