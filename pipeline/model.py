"""The sequence classifier: a 28x28 image read row by row as 28 time steps of 28 pixels."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class SequenceClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, input_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.cfg = cfg
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
        self.head = nn.Linear(width * (2 if cfg.readout == "last_max" else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [batch, time, features] in [0, 1]; returns logits [batch, classes]."""
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
        return self.head(last)


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


def to_inputs(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 28, 28] in [0, 1] on device; the cast happens after the copy (4x fewer bytes moved)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def build_model(cfg: ModelConfig, image_shape: list[int], num_classes: int) -> SequenceClassifier:
    return SequenceClassifier(cfg, input_size=image_shape[1], num_classes=num_classes)


def save_trained(model: SequenceClassifier, directory, extra: dict) -> None:
    """Final weights as safetensors beside the config needed to rebuild the module."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from pipeline.files import sha256_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, weights)
    # The digest lets evaluate/predict tell a damaged copy from the weights that were saved.
    card = {"model": model.cfg.model_dump(), **extra, "weights_sha256": sha256_file(weights)}
    (directory / "config.json").write_text(json.dumps(card, indent=2) + "\n")


def load_trained(directory) -> SequenceClassifier:
    """`model = pipeline.model.load_trained("runs/fashion_mnist/model")` -> eval-mode module on the CPU."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    model = build_model(ModelConfig(**meta["model"]), meta["image_shape"], meta["num_classes"])
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval()
