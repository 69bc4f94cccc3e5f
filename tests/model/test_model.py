"""SequenceClassifier.forward(x, lengths): a sequence's logits do not depend on what it is batched with.

Real sequences (FSDD spoken digits, 13 MFCCs per frame, 6-92 frames) are padded with loud random
garbage rather than zeros, so that any step of padding that reaches a logit shows up.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import pipeline.model as model_module
from pipeline.config import ModelConfig
from pipeline.model import CELLS, LENGTH_MODES, SequenceClassifier

ATOL = 1e-5
FEATURES = 13
CONFIGS = [
    dict(cell=cell, num_layers=layers, bidirectional=bidirectional, readout=readout, embed_size=embed)
    for cell, layers, bidirectional, readout, embed in itertools.product(
        sorted(CELLS), (1, 2), (False, True), ("last", "last_max"), (None, 8))
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors are tiny: a second OpenMP thread only waits on a busy machine (seconds per test under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg_id(cfg: dict) -> str:
    bi = "bi" if cfg["bidirectional"] else "uni"
    return f"{cfg['cell']}-L{cfg['num_layers']}-{bi}-{cfg['readout']}-embed{cfg['embed_size']}"


def _padded(seqs: list[torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with garbage far from the data's scale; returns (x [B, T, F], lengths int64 [B])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(seqs), int(lengths.max()), FEATURES, generator=gen) * 4 + 3
    for row, seq in enumerate(seqs):
        x[row, :len(seq)] = seq
    return x, lengths


def _model(cfg: dict, mode: str = "masked", seed: int = 0) -> SequenceClassifier:
    torch.manual_seed(seed)
    return SequenceClassifier(ModelConfig(hidden_size=12, **cfg), input_size=FEATURES, num_classes=10, length_mode=mode).eval()


def _batch_vs_alone_error(model: SequenceClassifier, seqs: list[torch.Tensor]) -> float:
    """Largest difference between a sequence's logits in the padded batch and alone (batch of one, no padding)."""
    x, lengths = _padded(seqs)
    with torch.no_grad():
        batch = model(x, lengths)
        alone = torch.cat([model(s[None], torch.tensor([len(s)])) for s in seqs])
    return float((batch - alone).abs().max())


@pytest.mark.parametrize("mode", LENGTH_MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_a_sequence_reads_the_same_alone_and_in_a_padded_batch(sequences, cfg, mode):
    model = _model(cfg, mode)
    assert _batch_vs_alone_error(model, sequences) < ATOL
    # Alone with no lengths at all is today's fixed-length path, which nothing can have broken.
    x, lengths = _padded(sequences)
    with torch.no_grad():
        batch = model(x, lengths)
        plain = torch.cat([model(s[None]) for s in sequences])
    torch.testing.assert_close(batch, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_packed_and_masked_agree_on_logits_and_gradients(sequences, cfg):
    x, lengths = _padded(sequences)
    results = {}
    for mode in LENGTH_MODES:
        model = _model(cfg, mode)
        xg = x.clone().requires_grad_(True)
        logits = model(xg, lengths)
        torch.nn.functional.cross_entropy(logits, torch.arange(len(sequences)) % 10).backward()
        results[mode] = (logits.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()})
        # Not one padded step may take part in the loss, forwards or backwards.
        padding = torch.arange(x.shape[1]) >= lengths[:, None]
        assert xg.grad[padding].abs().max() == 0, mode
    (lm, xm, gm), (lp, xp, gp) = results["masked"], results["packed"]
    torch.testing.assert_close(lm, lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(xm, xp, atol=ATOL, rtol=1e-4)
    for name in gm:
        torch.testing.assert_close(gm[name], gp[name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", LENGTH_MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_full_lengths_equal_no_lengths(sequences, cfg, mode):
    """Unpadded fixed-length input: masked unidirectional runs today's very call and reads the same step,
    so it is bit for bit the same; per-direction calls and packing reorder arithmetic, so the rest is to tolerance."""
    steps = min(len(s) for s in sequences)
    x = torch.stack([s[:steps] for s in sequences])
    model = _model(cfg, mode)
    with torch.no_grad():
        plain = model(x)
        full = model(x, torch.full((len(x),), x.shape[1]))
    if mode == "masked" and not cfg["bidirectional"]:
        assert torch.equal(plain, full)
    else:
        torch.testing.assert_close(plain, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_reading_the_padding_changes_the_logits(sequences, cfg):
    """The invariant has teeth: the naive reading (every step, padding included) gives other logits for every
    padded row, so a mode that let padding in would fail the test above."""
    model = _model(cfg)
    x, lengths = _padded(sequences)
    with torch.no_grad():
        naive = model(x)
        alone = torch.cat([model(s[None]) for s in sequences])
    padded_rows = lengths < x.shape[1]
    assert ((naive - alone).abs().amax(dim=1)[padded_rows] > 1e-3).all()


def _pack_everything(x: torch.Tensor, lengths: torch.Tensor, **kwargs):
    return torch.nn.utils.rnn.pack_padded_sequence(x, torch.full_like(lengths, x.shape[1]), **kwargs)


# name: (mode, function patched in pipeline.model, its broken stand-in, a configuration whose logits depend on it).
# In a padded batch T = max(lengths), so each stand-in is the naive reading of that batch.
BREAKAGES = {
    "masked-last-index-at-T-1": (
        "masked", "_last_index", lambda lengths: (lengths.max() - 1).expand_as(lengths),  # out[:, -1]
        dict(bidirectional=False, readout="last")),
    "masked-backward-starts-in-padding": (
        "masked", "_reverse_index", lambda lengths, t: (t - 1 - torch.arange(t)).expand(len(lengths), t),
        dict(bidirectional=True, readout="last")),
    "masked-max-reads-padding": (
        "masked", "_valid_steps", lambda lengths, t: torch.ones(len(lengths), t, dtype=torch.bool),
        dict(bidirectional=False, readout="last_max")),
    "packed-with-full-lengths": (
        "packed", "pack_padded_sequence", _pack_everything, dict(bidirectional=True, readout="last")),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_a_broken_mask_fails_the_invariant(sequences, monkeypatch, name):
    mode, attribute, broken, cfg = BREAKAGES[name]
    model = _model(dict(cell="lstm", num_layers=2, embed_size=None, **cfg), mode)
    assert _batch_vs_alone_error(model, sequences) < ATOL
    monkeypatch.setattr(model_module, attribute, broken)
    assert _batch_vs_alone_error(model, sequences) > 1e-3


@pytest.mark.parametrize("lengths, message", [
    (torch.tensor([3, 0]), "lie in"), (torch.tensor([3, 6]), "lie in"),
    (torch.tensor([3]), "lengths must be integer"), (torch.tensor([3.0, 2.0]), "lengths must be integer"),
])
def test_bad_lengths_are_refused(lengths, message):
    model = _model(CONFIGS[0])
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 5, FEATURES), lengths)


def test_int32_lengths_and_unknown_mode():
    model = _model(CONFIGS[0])
    x = torch.randn(2, 5, FEATURES)
    torch.testing.assert_close(model(x, torch.tensor([5, 3], dtype=torch.int32)), model(x, torch.tensor([5, 3])))
    with pytest.raises(ValueError, match="length_mode"):
        SequenceClassifier(ModelConfig(), input_size=28, num_classes=10, length_mode="sorted")


@pytest.mark.parametrize("frame,series_norm", [(3, False), (1, True), (4, True), (4, "both")])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_frames_and_series_norm_keep_the_padding_out(sequences, frame, series_norm, bidirectional):
    """Frames of k steps (the last one straddling a sequence's end) and per-series standardisation over the
    valid steps: a sequence's logits are still its own, alone or beside longer garbage-padded ones."""
    model = _model(dict(bidirectional=bidirectional, readout="last_max", frame=frame, series_norm=series_norm))
    assert model.rnn.input_size == FEATURES * frame * (2 if series_norm == "both" else 1)
    assert _batch_vs_alone_error(model, sequences) < ATOL
    x, lengths = _padded(sequences[-1:])  # the longest: no padding, so lengths=None reads the same steps
    with torch.no_grad():
        assert torch.allclose(model(x), model(x, lengths), atol=ATOL)


def test_series_norm_ignores_each_series_level_and_scale(sequences):
    model = _model(dict(series_norm=True, readout="last_max"))
    x, lengths = _padded(sequences)
    shifted = x * 7.5 + 100.0  # padding moves too: it must not matter
    with torch.no_grad():
        assert torch.allclose(model(x, lengths), model(shifted, lengths), atol=1e-4)


def test_both_norms_read_each_series_as_given_and_standardised(sequences):
    """series_norm: both hands the layers the values as given beside each series' own standardised ones: the
    second half of the features is blind to a series' level and scale, the first half is not."""
    model = _model(dict(series_norm="both", readout="last_max"))
    x, lengths = _padded(sequences)
    shifted = x * 7.5 + 100.0
    with torch.no_grad():
        given, alone = model._standardised(x, lengths), _model(dict(series_norm=True))._standardised(x, lengths)
        assert given.shape[-1] == 2 * FEATURES
        torch.testing.assert_close(given[..., FEATURES:], alone)
        valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
        torch.testing.assert_close(given[..., :FEATURES], x * valid, msg="the values as given, padding zeroed")
        torch.testing.assert_close(model._standardised(shifted, lengths)[..., FEATURES:], alone, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(model(x, lengths), model(shifted, lengths), atol=1e-4)
