"""The convolutional front-end and FCN branch read each sequence only as far as it goes.

Real FSDD digits (6-92 frames of 13 MFCCs) padded with loud garbage: a sequence's logits alone must equal
its logits beside longer ones, for every module and combination; and each way of letting the padding
in (a convolution reading it, a statistic or a pooled mean over it, a stride that forgets the lengths)
must break that equality.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

import pipeline.model_conv as conv_module
from pipeline.config import ModelConfig
from pipeline.model_conv import (
    ConvBlock,
    MaskedBatchNorm,
    masked_mean,
    masked_moments,
    masked_norm,
    update_running_statistics,
    valid_steps,
)
from tests.model.test_model import ATOL, FEATURES, _batch_vs_alone_error, _model, _one_thread, _padded  # noqa: F401

SMALL = dict(conv_channels=(8, 12, 8), conv_kernels=(8, 5, 3))
# (front-end, branch and what it reads, stride, excite, frame, bidirectional); the branch reading steps
# differs from reading frames only where there are frames
COMBINATIONS = [
    dict(frontend=frontend, conv_branch=branch, conv_branch_input=branch_input, conv_stride=stride,
         conv_excite=excite, frame=frame, bidirectional=bidirectional)
    for frontend, branch, branch_input, stride, excite, frame, bidirectional in itertools.product(
        ("none", "conv"), (False, True), ("frames", "steps"), (1, 3), (False, True), (1, 2), (False, True))
    if (frontend == "conv" or branch) and (stride == 1 or frontend == "conv")
    and (branch_input == "frames" or (branch and frame > 1))
]
# Each sequence's values as given beside its own standardised ones, into every convolutional module
BOTH_NORMS = [dict(c, series_norm="both") for c in COMBINATIONS if c["frontend"] == "conv" and c["conv_branch"]][-2:]


def _conv_id(cfg: dict) -> str:
    parts = [*(["batch-norm"] if cfg.get("conv_norm") == "batch" else []),
             *(["both-norms"] if cfg.get("series_norm") == "both" else []), f"front-{cfg['frontend']}", ("branch" + ("-steps" if cfg.get("conv_branch_input") == "steps" else "")) if cfg["conv_branch"] else "no-branch", f"stride{cfg['conv_stride']}",
             "excite" if cfg["conv_excite"] else "plain", f"frame{cfg['frame']}", "bi" if cfg["bidirectional"] else "uni"]
    return "-".join(parts)


def _conv_model(cfg: dict, seed: int = 0):
    return _model(dict(readout="last_max", **SMALL, **cfg), seed=seed)


@pytest.mark.parametrize("cfg", COMBINATIONS + BOTH_NORMS, ids=_conv_id)
def test_a_sequence_reads_the_same_alone_and_in_a_padded_batch(sequences, cfg):
    model = _conv_model(cfg)
    assert _batch_vs_alone_error(model, sequences) < ATOL
    # No lengths: every step is read, and a batch of one needs no padding.
    x, lengths = _padded(sequences[-1:])
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, lengths), atol=ATOL, rtol=0)


BATCH_NORM = [dict(cfg, conv_norm="batch") for cfg in (COMBINATIONS[0], COMBINATIONS[-1])]


@pytest.mark.parametrize("cfg", BATCH_NORM, ids=_conv_id)
def test_with_batch_norm_a_trained_model_reads_a_sequence_the_same_alone_and_in_a_padded_batch(sequences, cfg):
    """Training reads the micro-batch's statistics over valid steps only; evaluation, the running ones."""
    model = _conv_model(cfg).train()
    x, lengths = _padded(sequences)
    for _ in range(3):  # running statistics that have moved away from their initial 0 and 1
        model(x, lengths).sum().backward()
        update_running_statistics(model, 1)
    norms = [m for m in model.modules() if isinstance(m, MaskedBatchNorm)]
    assert norms and all(not n.pending and n.running_mean.abs().sum() > 0 for n in norms)
    assert _batch_vs_alone_error(model.eval(), sequences) < ATOL


def test_batch_statistics_read_valid_steps_only_and_fold_in_chunk_order():
    x = torch.randn(3, 4, 9)
    lengths = torch.tensor([9, 5, 2])
    valid = valid_steps(lengths, 9)
    garbage = x + 1e3 * (1 - valid)
    mean, var, count = masked_moments(garbage, valid, (0, 2))
    mean, var = mean.flatten(), var.flatten()
    assert count.item() == lengths.sum()
    values = torch.cat([x[i, :, :n] for i, n in enumerate(lengths.tolist())], 1)  # [C, valid steps of all rows]
    torch.testing.assert_close(mean, values.mean(1))
    torch.testing.assert_close(var, values.var(1, unbiased=False))
    norm = MaskedBatchNorm(4)
    norm.fold(torch.stack([torch.stack([torch.ones(4), 2 * torch.ones(4)]), torch.stack([3 * torch.ones(4),
                                                                                          torch.ones(4)])]))
    torch.testing.assert_close(norm.running_mean, torch.full((4,), 0.9 * 0.1 + 0.3))  # 0 -> 0.1 -> 0.39
    torch.testing.assert_close(norm.running_var, torch.full((4,), (0.9 + 0.2) * 0.9 + 0.1))


@pytest.mark.parametrize("cfg", [COMBINATIONS[0], COMBINATIONS[-1], *BATCH_NORM], ids=_conv_id)
def test_no_gradient_reaches_the_padding(sequences, cfg):
    model = _conv_model(cfg).train()
    x, lengths = _padded(sequences)
    x.requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x, lengths), torch.arange(len(sequences)) % 10).backward()
    padding = torch.arange(x.shape[1]) >= lengths[:, None]
    assert x.grad[padding].abs().max() == 0
    assert x.grad[~padding].abs().max() > 0


def test_the_lengths_follow_each_stride(sequences):
    model = _conv_model(dict(frontend="conv", conv_branch=False, conv_stride=4, conv_excite=False, frame=1,
                             bidirectional=False))
    x, lengths = _padded(sequences)
    out, out_lengths = model.frontend(x, lengths)
    assert out.shape[1] == -(-x.shape[1] // 4)
    assert out_lengths.tolist() == [-(-n // 4) for n in lengths.tolist()]


def test_the_head_reads_the_branch_beside_the_recurrent_readout():
    model = _conv_model(dict(frontend="none", conv_branch=True, conv_stride=1, conv_excite=True, frame=1,
                             bidirectional=True))
    assert model.head.in_features == 12 * 2 * 2 + 8  # bidirectional x last_max, plus the branch's last block
    assert model.rnn.input_size == FEATURES  # the branch sits beside, not before, the recurrent layers


def test_readout_dropout_drops_the_recurrent_readout_in_training_only(sequences):
    model = _conv_model(dict(frontend="none", conv_branch=True, conv_stride=1, conv_excite=False, frame=1,
                             bidirectional=False, readout_dropout=0.75))
    plain = _conv_model(dict(frontend="none", conv_branch=True, conv_stride=1, conv_excite=False, frame=1,
                             bidirectional=False))
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x, lengths = _padded(sequences)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, lengths), plain.eval()(x, lengths), atol=0, rtol=0)
        torch.manual_seed(0)
        model.train()(x, lengths)
    readout, branch = seen[-1][:, :-model.branch.out_features], seen[-1][:, -model.branch.out_features:]
    assert 0.6 < float((readout == 0).float().mean()) < 0.9  # about 3 in 4 dropped, the rest scaled by 4
    torch.testing.assert_close(branch, seen[0][:, -model.branch.out_features:])  # the branch is never dropped


def test_a_branch_reading_steps_reads_every_step_while_the_recurrent_layers_read_frames(sequences):
    cfg = dict(frontend="none", conv_branch=True, conv_stride=1, conv_excite=False, frame=3, bidirectional=False)
    steps = _conv_model(dict(cfg, conv_branch_input="steps"))
    assert steps.branch.stack.blocks[0].conv.in_channels == FEATURES and steps.rnn.input_size == 3 * FEATURES
    frames = _conv_model(dict(cfg, conv_branch_input="frames"))
    assert frames.branch.stack.blocks[0].conv.in_channels == 3 * FEATURES
    # Shifted by one step inside the sequence, a series keeps its steps' neighbourhoods but not its frames:
    # the branch over steps sees the same values moved, so its pooled readout barely moves.
    x, lengths = _padded(sequences[:1])
    later = (torch.nn.functional.pad(x, (0, 0, 1, 0)), lengths + 1)  # one silent step first
    with torch.no_grad():
        moved_steps = steps.branch(*later) - steps.branch(x, lengths)
        moved_frames = frames.branch(*frames._frames(*later)) - frames.branch(*frames._frames(x, lengths))
    assert moved_steps.abs().max() < moved_frames.abs().max() / 3


def _pooled_over_everything(x, valid):
    return x.mean(2)


def _norm_over_everything(x, valid, weight, bias):
    return masked_norm(x, torch.ones_like(valid), weight, bias) * valid


def _stride_forgets_lengths(lengths, stride):
    return lengths


class _UnmaskedConv(ConvBlock):
    """A convolution that reads the padding: the row's zeros after its end replaced by its neighbours' garbage."""

    def forward(self, x, lengths):
        x = self.conv(torch.nn.functional.pad(x, (self.left, self.right)))
        lengths = conv_module.strided_lengths(lengths, self.conv.stride[0])
        return torch.relu(masked_norm(x, valid_steps(lengths, x.shape[2]), self.weight, self.bias)), lengths


# name: (attribute of pipeline.model_conv, its broken stand-in, a configuration that reads it)
BREAKAGES = {
    "branch-mean-over-padding": ("masked_mean", _pooled_over_everything,
                                 dict(frontend="none", conv_branch=True, conv_excite=False)),
    "excite-mean-over-padding": ("masked_mean", _pooled_over_everything,
                                 dict(frontend="conv", conv_branch=False, conv_excite=True)),
    "norm-statistics-over-padding": ("masked_norm", _norm_over_everything,
                                     dict(frontend="conv", conv_branch=False, conv_excite=False)),
    "stride-without-length-update": ("strided_lengths", _stride_forgets_lengths,
                                     dict(frontend="conv", conv_branch=False, conv_excite=False, conv_stride=3)),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_a_broken_mask_fails_the_invariant(sequences, monkeypatch, name):
    attribute, broken, cfg = BREAKAGES[name]
    model = _conv_model(dict(dict(frame=1, bidirectional=False, conv_stride=1), **cfg))
    assert _batch_vs_alone_error(model, sequences) < ATOL
    monkeypatch.setattr(conv_module, attribute, broken)
    assert _invariant_broken(model, sequences)


def _invariant_broken(model, sequences) -> bool:
    """Other logits in the batch than alone, or lengths the recurrent layers refuse (a stride that kept them)."""
    try:
        return _batch_vs_alone_error(model, sequences) > 1e-3
    except ValueError as error:
        return "lengths must lie in" in str(error)


def test_an_unmasked_convolution_fails_the_invariant(sequences):
    model = _conv_model(dict(frontend="conv", conv_branch=False, conv_stride=1, conv_excite=False, frame=1,
                             bidirectional=False))
    assert _batch_vs_alone_error(model, sequences) < ATOL
    for block in model.frontend.stack.blocks:
        block.__class__ = _UnmaskedConv
    assert _invariant_broken(model, sequences)


def test_the_normalisation_uses_valid_steps_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 10, generator=gen)
    lengths = torch.tensor([6])
    valid = valid_steps(lengths, 10)
    out = masked_norm(x, valid, torch.ones(4), torch.zeros(4))
    alone = masked_norm(x[..., :6], torch.ones(1, 1, 6), torch.ones(4), torch.zeros(4))
    torch.testing.assert_close(out[..., :6], alone)
    assert out[..., 6:].abs().max() == 0
    assert float(alone.mean()) == pytest.approx(0, abs=1e-6) and float(alone.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    torch.testing.assert_close(masked_mean(x, valid), x[..., :6].mean(2))


@pytest.mark.parametrize("overrides, message", [
    (dict(conv_channels=(8, 8), conv_kernels=(3,)), "same number of blocks"),
    (dict(conv_channels=(), conv_kernels=()), "same number of blocks"),
    (dict(conv_channels=(0,), conv_kernels=(3,)), "must lie in"),
    (dict(conv_stride=2), "model.frontend is none"),
])
def test_bad_convolution_settings_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**overrides)
