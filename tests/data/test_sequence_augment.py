"""Sequence augmentations: each sample's draw is a function of (seed, epoch, id) and its own length
only, never of the batch it is in; padding is left alone; the sizes are what the config says."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.sequence_augment import SequenceAugment
from pipeline.errors import ConfigError

ALL = SequenceAugment(7, time_mask=0.3, jitter=0.2, scale=0.2)


def _batch(lengths: list[int], features: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), features, generator=g)
    lengths = torch.tensor(lengths)
    x[torch.arange(x.shape[1])[None, :] >= lengths[:, None]] = 0.0  # padding, as the batches hold it
    return x, lengths


def test_a_sample_is_augmented_alike_alone_and_beside_longer_ones():
    x, lengths = _batch([40, 9, 25, 3])
    ids = torch.tensor([12, 60003, 5, 999])
    batch = ALL(x, lengths, ids, epoch=4)
    for i, n in enumerate(lengths.tolist()):
        alone = ALL(x[i:i + 1, :n], lengths[i:i + 1], ids[i:i + 1], epoch=4)
        assert torch.equal(batch[i, :n], alone[0])
        assert torch.equal(batch[i, n:], x[i, n:]), "padding must stay padding"


def test_the_draw_is_keyed_on_seed_epoch_and_id():
    x, lengths = _batch([30, 30])
    ids = torch.tensor([1, 2])
    first = ALL(x, lengths, ids, epoch=0)
    assert torch.equal(first, ALL(x, lengths, ids, epoch=0))
    assert not torch.equal(first, ALL(x, lengths, ids, epoch=1))
    assert not torch.equal(first, SequenceAugment(8, 0.3, 0.2, 0.2)(x, lengths, ids, epoch=0))
    swapped = ALL(x.flip(0), lengths, ids.flip(0), epoch=0)
    assert torch.equal(swapped.flip(0), first), "the id, not the row, decides"


def test_jitter_has_the_configured_spread():
    noise = SequenceAugment(0, jitter=0.5)(torch.zeros(500, 60, 4), None, torch.arange(500), epoch=0)
    assert abs(noise.mean().item()) < 0.01 and noise.std().item() == pytest.approx(0.5, rel=0.02)
    # no two channels or steps share their numbers
    assert not torch.equal(noise[:, :, 0], noise[:, :, 1]) and not torch.equal(noise[:, 0], noise[:, 1])


def test_scale_multiplies_each_channel_of_a_sequence_by_one_factor():
    x = torch.rand(200, 20, 3) + 0.5
    y = SequenceAugment(0, scale=0.1)(x, None, torch.arange(200), epoch=0)
    ratio = y / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)
    assert ratio[:, 0].std().item() == pytest.approx(0.1, rel=0.15)


def test_time_mask_blanks_one_span_within_the_fraction():
    x, lengths = _batch([50] * 300 + [4] * 100)
    y = SequenceAugment(0, time_mask=0.2)(x, lengths, torch.arange(400), epoch=0)
    blanked = (y == 0).all(-1) & ~(x == 0).all(-1)
    widths = blanked.sum(1)
    assert widths.max().item() <= 10 and widths[:300].max().item() >= 8 and widths[300:].max().item() == 0
    for row in blanked[:300]:  # one contiguous span
        where = row.nonzero().flatten()
        assert len(where) == 0 or where[-1] - where[0] + 1 == len(where)


def test_the_config_bounds_them():
    with pytest.raises(ConfigError, match="time_mask"):
        load_config("configs/sequences.yaml", ["data.time_mask=1.5"])
    with pytest.raises(ConfigError, match="scale"):
        load_config("configs/sequences.yaml", ["data.scale=-0.1"])


@pytest.mark.parametrize("which", ["sequence augmentation on images", "image augmentation on sequences"])
def test_an_augmentation_of_the_other_kind_is_refused_naming_the_data(which, fashion_shards, fsdd_shards, tmp_path):
    from conftest import run_py

    data, override, said = ((fashion_shards, "data.jitter=0.1", "holds images") if which.endswith("images")
                            else (fsdd_shards, "data.hflip=true", "holds sequences"))
    proc = run_py("launch/train.py", "--config", "configs/sequences.yaml", f"data.dir={data}",
                  f"output_dir={tmp_path / 'out'}", "wandb.mode=disabled", override)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
