"""The sequence classifier: a 28x28 image read row by row as 28 time steps of 28 pixels, or a batch of
right-padded sequences of any length read each only as far as it goes (`forward(x, lengths)`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.config import ModelConfig
from pipeline.model_card import ModelCard
from pipeline.model_conv import ConvBranch, ConvFrontend

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# How forward(x, lengths) keeps padding out: "masked" runs the cell over the padded batch and reads each row
# at its own last step; "packed" hands the cell a PackedSequence. Same logits to float tolerance. Masked is
# the default: on the CPU a packed LSTM's backward pass is quadratic in the time steps (a whole-input zero
# fill per step), over 60x slower at 1,500 steps, and no faster on FSDD-sized batches
# (benchmarks/packed_vs_masked.py).
LENGTH_MODES = ("masked", "packed")


class SequenceClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, input_size: int, num_classes: int, length_mode: str = "masked"):
        super().__init__()
        if length_mode not in LENGTH_MODES:
            raise ValueError(f"length_mode must be one of {LENGTH_MODES}, not {length_mode!r}")
        self.cfg = cfg
        input_size *= 2 if cfg.series_norm == "both" else 1
        # Not in ModelConfig: it changes how padding is skipped, never the weights or what they compute.
        self.length_mode = length_mode
        # The FCN branch reads the frames, as the recurrent layers do, or every step (conv_branch_input): on the
        # raw steps of a series of thousands it cost 85x the plain model's step (benchmarks/conv_speed.py), on
        # frames about 3x; but over frames a shape one step later is another input, over steps the same one shifted.
        self.branch = None
        if cfg.conv_branch:
            branch_size = input_size * (cfg.frame if cfg.conv_branch_input == "frames" else 1)
            self.branch = ConvBranch(branch_size, cfg.conv_channels, cfg.conv_kernels, cfg.conv_excite, cfg.conv_norm)
        input_size *= cfg.frame
        self.frontend = None
        if cfg.frontend == "conv":
            self.frontend = ConvFrontend(input_size, cfg.conv_channels, cfg.conv_kernels, cfg.conv_stride,
                                         cfg.conv_excite, cfg.conv_norm)
            input_size = self.frontend.out_features
        self.embed = None
        if cfg.embed_size is not None:
            self.embed = nn.Sequential(nn.Linear(input_size, cfg.embed_size), nn.ReLU())
            input_size = cfg.embed_size
        self.rnn = CELLS[cfg.cell](
            input_size=input_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        if cfg.forget_bias is not None:
            _set_forget_bias(self.rnn, cfg.forget_bias)
        width = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        width *= 2 if cfg.readout == "last_max" else 1
        self.head = nn.Linear(width + (self.branch.out_features if self.branch is not None else 0), num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: float [batch, time, features]; returns logits [batch, classes]. lengths: int64 [batch] (CPU or x's
        device), the valid steps of each row, padding at the end; None reads every step of every row."""
        if self.frontend is not None or self.branch is not None:
            # Convolutions and their statistics always read lengths: every row's, when all are full.
            lengths = (torch.full((x.shape[0],), x.shape[1], device=x.device) if lengths is None
                       else _checked_lengths(lengths, x).to(x.device, non_blocking=True))
        if self.cfg.frame > 1 or self.cfg.series_norm:
            x = self._standardised(x, lengths)
        steps = (x, lengths)
        if self.cfg.frame > 1:
            x, lengths = self._frames(x, lengths)
        branch = None
        if self.branch is not None:
            branch = self.branch(*(steps if self.cfg.conv_branch_input == "steps" else (x, lengths)))
        if self.frontend is not None:
            x, lengths = self.frontend(x, lengths)
        features = self._recurrent(x) if lengths is None else self._recurrent_lengths(x, lengths)
        if self.cfg.readout_dropout:
            features = F.dropout(features, self.cfg.readout_dropout, self.training)
        if branch is not None:
            features = torch.cat([features, branch.to(features.dtype)], dim=1)
        return self.head(features)

    def _recurrent(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input from every step of every row."""
        # Fixed-length input keeps exactly this arithmetic: published accuracies depend on it bit for bit.
        if self.embed is not None:
            x = self.embed(x)
        out, state = self.rnn(x)
        if not self.cfg.bidirectional:
            last = out[:, -1]
        else:
            # The backward direction's last step output has seen one row only; its final
            # state (at t=0) has seen them all.
            h_n = state[0] if isinstance(state, tuple) else state
            last = torch.cat([h_n[-2], h_n[-1]], dim=1)
        if self.cfg.readout == "last_max":
            last = torch.cat([last, out.amax(dim=1)], dim=1)
        return last

    def _standardised(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Padding zeroed (a frame that straddles a sequence's end must not read it) and, with model.series_norm,
        each sequence standardised over its own valid steps (beside its values as given, with `both`)."""
        steps = x.shape[1]
        valid = None
        if lengths is not None:
            valid = _valid_steps(lengths.to(x.device), steps)[..., None].to(x.dtype)
            x = x * valid
        if self.cfg.series_norm:
            count = valid.sum(1, keepdim=True) if valid is not None else torch.full_like(x[:, :1, :1], steps)
            mean = x.sum(1, keepdim=True) / count
            centred = x - mean if valid is None else (x - mean) * valid
            std = (centred.pow(2).sum(1, keepdim=True) / count).sqrt()
            own = centred / (std + 1e-5)  # a constant channel stays 0 rather than dividing by nothing
            x = torch.cat([x, own], dim=-1) if self.cfg.series_norm == "both" else own
        return x

    def _frames(self, x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """model.frame: k consecutive steps read as one step of k x features."""
        batch, steps, features = x.shape
        k = self.cfg.frame
        x = F.pad(x, (0, 0, 0, (-steps) % k)).reshape(batch, -(-steps // k), k * features)
        return x, None if lengths is None else (lengths + k - 1) // k

    def _recurrent_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The head's input from each row's valid steps only."""
        lengths = _checked_lengths(lengths, x)
        if self.embed is not None:
            x = self.embed(x)  # step by step, so padded steps never reach valid ones
        if self.length_mode == "packed":
            last, out = self._run_packed(x, lengths)
        else:
            last, out = self._run_masked(x, lengths)
        if self.cfg.readout == "last_max":
            last = torch.cat([last, out.amax(dim=1)], dim=1)
        return last

    def _run_packed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last states [B, width], outputs [B, max(lengths), width] with -inf at padded steps, for last_max only)."""
        # pack_padded_sequence wants the lengths on the CPU: a device tensor costs one host sync here.
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        # With packed input h_n holds each row's state at its own last step (and, backwards, at t=0),
        # already put back in the batch's order.
        h_n = state[0] if isinstance(state, tuple) else state
        last = torch.cat([h_n[-2], h_n[-1]], dim=1) if self.cfg.bidirectional else h_n[-1]
        padded = None
        if self.cfg.readout == "last_max":
            padded, _ = pad_packed_sequence(out, batch_first=True, padding_value=float("-inf"))
        return last, padded

    def _run_masked(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last states [B, width], outputs [B, T, width] with -inf at padded steps where the max reads them)."""
        lengths = lengths.to(x.device, non_blocking=True)
        h = self.cfg.hidden_size
        if not self.cfg.bidirectional:
            # A forward pass is causal: padding at the end cannot change the outputs before it.
            out, _ = self.rnn(x)
            last = _take_steps(out, _last_index(lengths)[:, None])[:, 0]
        else:
            out = self._bidirectional_masked(x, lengths)
            # Forward half at each row's last step; the backward half has seen the whole row by t=0.
            forward_last = _take_steps(out[..., :h], _last_index(lengths)[:, None])[:, 0]
            last = torch.cat([forward_last, out[:, 0, h:]], dim=1)
        if self.cfg.readout == "last_max":
            out = out.masked_fill(~_valid_steps(lengths, x.shape[1])[..., None], float("-inf"))
        return last, out

    def _bidirectional_masked(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Outputs [B, T, 2H] of the stacked bidirectional cell, valid at each row's valid steps.

        The backward direction must start at each row's own last step, not in the padding. Each layer's
        backward direction therefore runs as a forward pass over a copy whose valid part is reversed row by
        row (padding stays at the end, so causality keeps it out) and its outputs are reversed back. One
        fused bidirectional call cannot do this: above the first layer the forward direction wants the
        rows right-aligned and the backward one left-aligned. Per-layer calls do the same arithmetic as
        the fused call (each direction once; on the CPU bit for bit the same at full lengths), and the
        gathers cost about 5% of a step at FSDD sizes. On a GPU, cuDNN's fused call may overlap the two
        directions, which these separate calls cannot.
        """
        reverse = _reverse_index(lengths, x.shape[1])
        out = x
        for layer in range(self.cfg.num_layers):
            if layer > 0:
                # nn.LSTM's dropout sits between layers, never after the last.
                out = F.dropout(out, self.rnn.dropout, self.training)
            forward = self._one_direction(out, layer, "")
            backward = _take_steps(self._one_direction(_take_steps(out, reverse), layer, "_reverse"), reverse)
            out = torch.cat([forward, backward], dim=2)
        return out

    def _one_direction(self, x: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        """One layer, one direction of self.rnn as a unidirectional forward pass over x [B, T, in]: the same
        kernel nn.LSTM/GRU/RNN call, with that layer's own parameters (so the state_dict is unchanged)."""
        rnn = self.rnn
        names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
        if rnn.bias:
            names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
        weights = [getattr(rnn, name) for name in names]
        h0 = x.new_zeros(1, x.shape[0], rnn.hidden_size)
        if isinstance(rnn, nn.LSTM):
            return torch.lstm(x, (h0, h0), weights, rnn.bias, 1, 0.0, self.training, False, True)[0]
        if isinstance(rnn, nn.GRU):
            return torch.gru(x, h0, weights, rnn.bias, 1, 0.0, self.training, False, True)[0]
        step = torch.rnn_tanh if rnn.nonlinearity == "tanh" else torch.rnn_relu
        return step(x, h0, weights, rnn.bias, 1, 0.0, self.training, False, True)[0]


def _checked_lengths(lengths: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[0] or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be integer [batch={x.shape[0]}], got {lengths.dtype} {list(lengths.shape)}")
    lengths = lengths.to(torch.int64)
    # Range-checked only on the CPU: on a GPU the check would wait for the device every step.
    if lengths.device.type == "cpu" and lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]):
        raise ValueError(f"lengths must lie in [1, {x.shape[1]}] (the padded time axis), "
                         f"got [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths


def _last_index(lengths: torch.Tensor) -> torch.Tensor:
    return lengths - 1


def _valid_steps(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """bool [B, T]: True where a step holds data, False in the padding."""
    return torch.arange(steps, device=lengths.device) < lengths[:, None]


def _reverse_index(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """int64 [B, T]: per row, t -> lengths-1-t on the valid part and t on the padding; its own inverse."""
    t = torch.arange(steps, device=lengths.device)
    return torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)


def _take_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] at per-row time steps index [B, S] -> [B, S, C]."""
    # gather, not take_along_dim: the latter wraps the index with a remainder op each call (measurable on the CPU).
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def _set_forget_bias(lstm: nn.LSTM, value: float) -> None:
    """PyTorch orders an LSTM's gates (input, forget, cell, output) and adds two biases; the value goes
    in b_ih and b_hh's forget slice is zeroed, so that their sum is the value."""
    h = lstm.hidden_size
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_ih"):
                bias[h:2 * h].fill_(value)
            elif name.startswith("bias_hh"):
                bias[h:2 * h].zero_()


def build_model(cfg: ModelConfig, features: int, num_classes: int) -> SequenceClassifier:
    """`features`: channels per step (28 pixels per row for the images)."""
    return SequenceClassifier(cfg, input_size=features, num_classes=num_classes)


def save_trained(model: SequenceClassifier, directory, card: ModelCard) -> None:
    """Final weights as safetensors beside their model card (config.json), which records their digest so that
    evaluate and predict tell a damaged copy from the weights that were saved. Read back with
    pipeline.inference.models.load_trained_model, which checks the card, the digest and the weights."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from pipeline.files import sha256_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, weights)
    card = card.model_copy(update={"model": model.cfg, "weights_sha256": sha256_file(weights)})
    (directory / "config.json").write_text(json.dumps(card.to_dict(), indent=2) + "\n")
