"""The parts an epoch's order is made of, and the batch layout: pure functions.

Everything here is a function of the dataset's shard sizes, the seed, the epoch and the batch
layout; nothing reads data, and nothing but the layout's functions knows the world size. The
epoch's sequence itself is put together in one place, `canonical.epoch_sequence`
(pipeline/data/canonical.py; one canonical stream, the default, is the plain order): the stream,
the resident batches, the benchmarks and the tests all take their order from there. Its parts:
- `shard_permutation`: the order in which the epoch reads its shards, seeded by (seed, epoch);
- `group_windows`: consecutive shards form windows of at least `window` samples
  (`data.shuffle_buffer`): the bounded shuffle a streaming reader can afford;
- `window_permutation`: a window's samples permuted by (seed, epoch, window), or
  `bucketed_window_permutation` (below): micro-batches of similar lengths.
Global batch k of the epoch is positions [k*G, (k+1)*G) of the sequence; the last, partial
global batch is dropped (the epoch's last N mod G samples, different ones each epoch).

A global batch is cut into C = G / m micro-batches of m samples (chunk c is the c-th run of m);
with W ranks and A = C / W accumulation steps, rank r computes chunks a*W + r for a = 0..A-1. So
1 rank x 2 accumulation steps computes the same chunks, in the same sums, as 2 ranks x 1, and a
run resumes at any world size that divides the global batch. Randomness that belongs to a
sample (augmentation) is keyed on its id, not its rank; dropout on the chunk (`chunk_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is computed: W ranks x A accumulation steps x m samples."""

    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def chunks(self) -> int:
        return self.global_batch // self.micro_batch

    @classmethod
    def make(cls, global_batch: int | None, micro_batch: int, world_size: int, what: str = "") -> BatchLayout:
        """The layout for this launch; ConfigError (exit 2) naming the three numbers when they do not fit."""
        if global_batch is None:
            return cls(micro_batch * world_size, micro_batch, world_size)
        if global_batch % (micro_batch * world_size):
            fits = [w for w in range(1, global_batch // micro_batch + 1) if global_batch % (micro_batch * w) == 0]
            raise ConfigError(
                f"train.global_batch_size {global_batch} is not a whole number of micro-batches of train.batch_size "
                f"{micro_batch} on {world_size} process(es){what}: {micro_batch} x {world_size} x accumulation steps "
                f"must equal {global_batch}. With this batch size the world size can be "
                f"{', '.join(map(str, fits)) or 'none'}; or "
                + (f"change train.batch_size so that it divides {global_batch} / {world_size}"
                   if global_batch % world_size == 0 else
                   f"choose a world size that divides the global batch, or train.global_batch_size a multiple of "
                   f"{micro_batch} x {world_size}")
            )
        return cls(global_batch, micro_batch, world_size)


def fit_to_split(layout: BatchLayout, num_samples: int) -> BatchLayout:
    """A global batch larger than the train split, halved until one step fits: a config written for
    data sets of any size (configs/sequences.yaml) still trains one of a few dozen cases. The
    micro-batch is halved as often, so the number of micro-batches per global batch (and with it the
    layout's fit to every world size and to data.canonical_streams) stays. The new global batch
    depends on the config and the split alone, so the order stays the same at any world size; where
    the micro-batch cannot be halved as often, the layout stays and canonical.steps_in_epoch refuses it."""
    g, m, w = layout.global_batch, layout.micro_batch, layout.world_size
    halvings = 0
    while (g >> halvings) > num_samples and (g >> halvings) % 2 == 0:
        halvings += 1
    if halvings == 0 or m % (1 << halvings):
        return layout
    return BatchLayout(g >> halvings, m >> halvings, w)


def shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which the epoch reads its shards."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def group_windows(sizes: list[int], window: int) -> list[list[int]]:
    """Consecutive items (indices into `sizes`, samples each) grouped into windows of at least `window`
    samples; the last window may hold fewer."""
    out: list[list[int]] = [[]]
    held = 0
    for i, size in enumerate(sizes):
        if held >= max(window, 1):
            out.append([])
            held = 0
        out[-1].append(i)
        held += size
    return out


def window_permutation(seed: int, epoch: int, index: int, size: int) -> np.ndarray:
    """The order of a window's samples (indices into the window's shards, concatenated)."""
    return np.random.default_rng([seed, epoch, index, 1]).permutation(size)


def shard_offsets(shard_sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)


def micro_positions(layout: BatchLayout, rank: int, step: int, accumulation_step: int) -> slice:
    """The sequence positions of this rank's micro-batch `accumulation_step` of the epoch's step `step`."""
    start = step * layout.global_batch + chunk_index(layout, rank, accumulation_step) * layout.micro_batch
    return slice(start, start + layout.micro_batch)


def chunk_index(layout: BatchLayout, rank: int, accumulation_step: int) -> int:
    return accumulation_step * layout.world_size + rank


def chunk_seed(seed: int, global_step: int, chunk: int) -> int:
    """The torch seed of one micro-batch's dropout: the same whichever rank computes the chunk."""
    return int(np.random.SeedSequence([seed, global_step, chunk, 2]).generate_state(1)[0])


# --- Length-bucketed order (an option; the functions above are unchanged) -------------------------
#
# For variable-length samples a micro-batch is padded to its longest member, so random chunks waste
# most of the compute. The bucketed order keeps the windows (same shards, same samples in each
# window, same bounded shuffle a stream can afford) and only rearranges the samples inside a window
# so that every chunk of the global grid (positions [c*m, (c+1)*m)) holds samples of similar length.
# It depends on the window's lengths, its first sequence position and m, never on the world size,
# so the micro-batches stay the same at any W dividing G/m.


def window_segments(lo: int, size: int, micro_batch: int) -> np.ndarray:
    """Sizes of the pieces of the chunk grid that window positions [lo, lo+size) fall into, in order.

    Windows hold whole shards, so their ends are generally not multiples of m: the first and last
    piece may be partial (the rest of that chunk belongs to the neighbouring window)."""
    hi = lo + size
    cuts = np.arange((lo // micro_batch + 1) * micro_batch, hi, micro_batch, dtype=np.int64)
    return np.diff(np.concatenate([[lo], cuts, [hi]])).astype(np.int64)


def bucketed_window_permutation(lengths: np.ndarray, seed: int, epoch: int, index: int, lo: int,
                                micro_batch: int) -> np.ndarray:
    """The bucketed order of a window's samples: a permutation p of range(len(lengths)), sample p[i]
    at sequence position lo + i (like `window_permutation`, which it replaces).

    The window's samples sorted by length (ties in `window_permutation`'s order, so equal lengths
    stay shuffled by the seed) are cut into consecutive runs, one per grid piece of the window; which
    run goes to which piece is drawn from (seed, epoch, index, 3), so short and long chunks are
    spread over the window instead of ascending. With all lengths equal there is nothing to bucket
    and the result is exactly `window_permutation`: bucketing fixed-length data keeps the published
    order."""
    lengths = np.asarray(lengths)
    base = window_permutation(seed, epoch, index, len(lengths))
    if len(lengths) == 0 or np.ptp(lengths) == 0:
        return base
    ranked = base[np.argsort(lengths[base], kind="stable")]  # by length; ties in the seeded order
    pieces = window_segments(lo, len(lengths), micro_batch)
    draw = np.random.default_rng([seed, epoch, index, 3]).permutation(len(pieces))
    # Runs of the sorted samples, taken in the drawn order of pieces, each as long as its piece.
    run_start = np.zeros(len(pieces), np.int64)
    run_start[draw] = np.concatenate([[0], np.cumsum(pieces[draw])[:-1]])
    piece_start = np.concatenate([[0], np.cumsum(pieces)[:-1]])
    out = np.empty(len(lengths), dtype=base.dtype)
    for start, run, size in zip(piece_start.tolist(), run_start.tolist(), pieces.tolist(), strict=True):
        out[start:start + size] = ranked[run:run + size]
    return out


def padded_and_real(lengths) -> tuple[int, int]:
    """(padded steps, real steps) of one micro-batch padded to its longest sample."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return 0, 0
    real = int(lengths.sum())
    return len(lengths) * int(lengths.max()) - real, real


def padding_waste(micro_batches: list[np.ndarray] | np.ndarray) -> float:
    """Padded steps per real step: sum over micro-batches of (size x longest - sum of lengths),
    over the sum of lengths. 0 when every micro-batch is of one length."""
    padded = real = 0
    for lengths in micro_batches:
        p, r = padded_and_real(lengths)
        padded, real = padded + p, real + r
    return padded / real if real else 0.0


def epoch_padding_waste(sequence: np.ndarray, lengths: np.ndarray, layout: BatchLayout) -> float:
    """The padding waste of an epoch trained in this order: its whole global batches (the partial
    last one is dropped), cut into chunks of m. The chunks do not depend on the world size."""
    used = len(sequence) // layout.global_batch * layout.global_batch
    return padding_waste(np.asarray(lengths)[sequence[:used]].reshape(-1, layout.micro_batch))
