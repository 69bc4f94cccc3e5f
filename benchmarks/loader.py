"""Section 1: read + decode the Fashion-MNIST train split in one process, three layouts.

Product: batches of 256 uint8 images [B, 28, 28] and int64 labels as torch tensors, which is
what the trainer's loader hands its step (the step casts to float itself: `pipeline.inputs.InputScale`,
timed in sections 2 and 5; "ours + cast" shows the loader with that cast added).

- ours: the trainer's code path (TrainStream through StreamBatches, world 1, workers 0, batch 256,
  shuffle window as in configs/fashion_mnist.yaml).
- per-sample: the same images written one sample per tar member pair (`.npy` + `.cls`) with
  wds.TarWriter, read back with `wds.WebDataset(urls, shardshuffle=False).decode()`,
  `.to_tuple("npy", "cls").batched(256)`, then torch.from_numpy.
- torchvision: torchvision.datasets.FashionMNIST + ToTensor per sample + DataLoader(batch_size=64,
  shuffle=True), the classic tutorial path. Debian's .gz files are recompressed, so their md5
  differs from the one torchvision knows; torchvision only checks that the *decompressed* raw
  files exist (download=False), so we write those under ROOT/FashionMNIST/raw/. No download.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import rate_reps, say

FASHION_IDX = Path("/usr/share/datasets/fashion-mnist")
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_root(tmp: Path, source: Path = FASHION_IDX) -> Path:
    """A torchvision root holding FashionMNIST/raw/<decompressed IDX files>; built once per tmp dir."""
    raw = tmp / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in RAW_FILES):
        return tmp
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        gz, plain = source / f"{name}.gz", source / name
        if plain.is_file():
            shutil.copyfile(plain, raw / name)
        elif gz.is_file():
            with gzip.open(gz, "rb") as src, open(raw / f".{name}.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (raw / f".{name}.tmp").replace(raw / name)
        else:
            raise FileNotFoundError(f"{gz} is missing: install Debian's dataset-fashion-mnist")
    return tmp


def bench_ours(data_dir: Path, reps: int, shuffle_buffer: int = 8192, batch_size: int = 256, cast: bool = False) -> dict:
    from pipeline.data.augment import Augment
    from pipeline.data.epoch_plan import EpochPlan
    from pipeline.data.manifest import load_manifest
    from pipeline.data.order import BatchLayout
    from pipeline.data.store import ShardStore
    from pipeline.data.stream import TrainStream
    from pipeline.inputs import IMAGES
    from pipeline.training.batches import StreamBatches

    manifest = load_manifest(data_dir)
    plan = EpochPlan.make(manifest, "train", BatchLayout.make(batch_size, batch_size, 1), 0, shuffle_buffer)
    stream = TrainStream(manifest, ShardStore(str(data_dir)), "train", plan, 0, Augment(0))
    batches = StreamBatches(stream, seed=0, data_dir=str(data_dir), pin_memory=False, record_sample_ids=False)
    cpu = torch.device("cpu")
    epoch = [0]

    def once() -> int:
        n = 0
        for micro in batches.epoch(epoch[0], 0, plan.steps):  # as the trainer reads it
            for x, y, *_ in micro:
                if cast:
                    x = IMAGES(x, cpu)
                n += len(y)
        epoch[0] += 1
        return n

    result = rate_reps(once, reps)
    size = manifest.split("train").bytes
    return {**result, "bytes_on_disk": size, "shards": len(manifest.split("train").shards),
            "what": f"StreamBatches world 1 workers 0 batch {batch_size}, shuffle window {shuffle_buffer}"
                    + (", then the step's input scaling (uint8 -> float / 255)" if cast else "")}


def bench_blocks_only(data_dir: Path, reps: int) -> dict:
    """read_blocks over every train shard in manifest order: tar parsing + np.load, no shuffle/batching."""
    from pipeline.data.manifest import load_manifest
    from pipeline.data.store import ShardStore, read_blocks

    manifest = load_manifest(data_dir)
    source = ShardStore(str(data_dir))

    def once() -> int:
        return sum(len(y) for shard in manifest.split("train").shards for y in (b.labels for b in read_blocks(source, shard)))

    return rate_reps(once, reps)


def write_per_sample(data_dir: Path, out: Path, n_samples: int | None, num_shards: int = 8) -> dict:
    """The textbook layout: one `.npy` + `.cls` member pair per sample, written with wds.TarWriter."""
    import webdataset as wds

    from pipeline.data.manifest import load_manifest
    from pipeline.data.store import ShardStore, load_split_tensors

    images, _, labels = load_split_tensors(load_manifest(data_dir), ShardStore(str(data_dir)), "train")
    images, labels = images.numpy(), labels.numpy()
    n = len(labels) if not n_samples else min(n_samples, len(labels))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    urls = []
    bounds = [i * n // num_shards for i in range(num_shards + 1)]
    for s in range(num_shards):
        path = out / f"persample-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(bounds[s], bounds[s + 1]):
                sink.write({"__key__": f"{i:06d}", "npy": images[i], "cls": int(labels[i])})
        urls.append(str(path))
    seconds = time.perf_counter() - start
    return {"urls": urls, "samples": n, "write_s": seconds, "bytes_on_disk": sum(Path(u).stat().st_size for u in urls)}


def bench_per_sample(urls: list[str], reps: int, batch_size: int = 256) -> dict:
    import webdataset as wds

    def once() -> int:
        ds = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy", "cls").batched(batch_size)
        n = 0
        for x, y in ds:
            x = torch.from_numpy(np.asarray(x))
            y = torch.as_tensor(y, dtype=torch.int64)
            n += len(y)
        return n

    return rate_reps(once, reps)


def bench_torchvision(root: Path, reps: int, batch_size: int = 64) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start = time.perf_counter()
    ds = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
    build_s = time.perf_counter() - start
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True)

    def once() -> int:
        n = 0
        for _, y in loader:
            n += len(y)
        return n

    return {**rate_reps(once, reps), "dataset_build_s": build_s,
            "what": f"torchvision FashionMNIST, ToTensor per sample, DataLoader(batch_size={batch_size}, shuffle=True)"}


def run(data_dir: Path, tmp: Path, reps: int, per_sample_samples: int | None) -> dict:
    say("loader: ours (StreamBatches, the trainer's path)")
    ours = bench_ours(data_dir, reps)
    ours_cast = bench_ours(data_dir, reps, cast=True)
    blocks = bench_blocks_only(data_dir, reps)
    say(f"loader: writing the per-sample layout ({per_sample_samples or 'all'} samples) with wds.TarWriter")
    written = write_per_sample(data_dir, tmp / "persample", per_sample_samples)
    say("loader: per-sample layout with webdataset's default decoding")
    # The per-sample layout is ~200x slower: at most 3 timed passes over it.
    per_sample = {**bench_per_sample(written["urls"], min(reps, 3)), "write_s": written["write_s"],
                  "bytes_on_disk": written["bytes_on_disk"], "shards": len(written["urls"]),
                  "what": "one .npy + .cls member per sample, wds.WebDataset(shardshuffle=False).decode().to_tuple().batched(256)"}
    say("loader: torchvision FashionMNIST + DataLoader(batch 64, ToTensor)")
    tv = bench_torchvision(torchvision_root(tmp / "torchvision"), reps)
    tv["setup"] = ("Debian's .gz files fail torchvision's md5 (recompressed); the benchmark writes the decompressed "
                   "IDX files into ROOT/FashionMNIST/raw/ and builds the dataset with download=False (no download)")
    return {
        "ours": ours,
        "ours_with_cast": ours_cast,
        "ours_read_blocks_only": blocks,
        "per_sample": per_sample,
        "torchvision": tv,
        "loader_speedup": ours["samples_per_s"] / per_sample["samples_per_s"],
        "loader_speedup_vs_torchvision": ours["samples_per_s"] / tv["samples_per_s"],
        "reps": reps,
    }
