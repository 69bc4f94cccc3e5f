"""A trained classifier back from disk: a run's `model/` directory or one of its checkpoints.

Everything that can be wrong with what the user pointed at (not a model directory, a damaged
weights file, weights that do not fit the description) becomes one UserError naming the file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.inputs import InputScale
from pipeline.model import SequenceClassifier, build_model
from pipeline.model_card import CardError, ModelCard


class UnusableModel(UserError):
    exit_code = 2


@dataclass
class TrainedModel:
    model: SequenceClassifier  # eval mode, on the CPU
    card: ModelCard  # everything recorded beside the weights
    source: Path  # what the user pointed at
    kind: str  # "model" (a run's model/) or "checkpoint"

    @property
    def image_shape(self) -> list[int] | None:
        """[steps, features] of an image model; None: sequences."""
        return self.card.image_shape

    @property
    def class_names(self) -> list[str]:
        return self.card.class_names

    @property
    def dataset(self) -> str | None:
        return self.card.dataset

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def features(self) -> int:
        return self.card.features

    @property
    def inputs(self) -> InputScale:
        """Stored values -> model inputs, exactly as in training (images / 255, else the train split's statistics)."""
        return self.card.inputs

    @property
    def mixed_precision(self) -> str:
        return self.card.mixed_precision

    @property
    def wandb_run_id(self) -> str | None:
        return self.card.wandb_run_id

    def autocast(self, device: torch.device, precision: str = "auto"):
        """The trainer evaluates under its mixed precision; the same choice reproduces its numbers
        (evaluate and predict both use this). `precision` auto: the one the model was trained with."""
        precision = self.mixed_precision if precision == "auto" else precision
        if precision == "no":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)


HINT = "pass a run's model directory (RUN/model) or one of its checkpoints (RUN/checkpoints/step-N)"


def load_trained_model(path: str | Path) -> TrainedModel:
    path = Path(path)
    if not path.is_dir():
        raise UnusableModel(f"{path} is not a directory; {HINT}")
    if (path / "config.json").is_file():
        return _from_model_dir(path)
    if (path / "state.json").is_file():
        return _from_checkpoint(path)
    raise UnusableModel(f"{path} holds neither config.json (a model directory) nor state.json (a checkpoint); {HINT}")


def _from_model_dir(path: Path) -> TrainedModel:
    card = _card(_read_json(path / "config.json"), path / "config.json")
    weights = path / "model.safetensors"
    if not card.weights_sha256:  # every model directory the trainer writes records it: without it, damage would go unseen
        raise UnusableModel(f"{path / 'config.json'} records no weights_sha256, so {weights.name} cannot be verified "
                            "against what training saved; re-copy the run's model directory whole, or use one of its "
                            "checkpoints (RUN/checkpoints/step-N), which verify themselves")
    if weights.is_file() and sha256_file(weights) != card.weights_sha256:
        raise UnusableModel(f"{weights} is damaged: its sha256 differs from the one recorded in config.json when it was "
                            "saved; re-copy the run's model directory or use one of its checkpoints")
    model = _with_weights(build_model(card.model, card.features, card.num_classes), weights)
    return TrainedModel(model, card, path, "model")


def _from_checkpoint(path: Path) -> TrainedModel:
    from pipeline.checkpoints.format import read_meta, verify_checkpoint

    problem = verify_checkpoint(path)
    if problem:
        raise UnusableModel(f"checkpoint {path} is damaged ({problem}); use another checkpoint or the run's model directory")
    meta = read_meta(path)
    if not meta.model_card:
        raise UnusableModel(f"checkpoint {path} was written before checkpoints carried a model card, so what its weights "
                            "were trained on (classes, inputs) is unknown; use the run's model directory (RUN/model)")
    raw = {**meta.model_card, "model": meta.model}  # the architecture the weights fit, as the checkpoint records it
    raw["wandb_run_id"] = raw.get("wandb_run_id") or meta.state.wandb_run_id
    card = _card(raw, path / "state.json")
    model = _with_weights(build_model(card.model, card.features, card.num_classes), path / "model.safetensors")
    return TrainedModel(model, card, path, "checkpoint")


def _card(raw: dict[str, Any], where: Path) -> ModelCard:
    try:
        return ModelCard.from_dict(raw)
    except CardError as err:
        raise UnusableModel(f"{where} is not a model description this pipeline can read ({err}); {HINT}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UnusableModel(f"{path} cannot be read as JSON ({err}); {HINT}") from None
    if not isinstance(raw, dict):
        raise UnusableModel(f"{path} is not a model description of this pipeline; {HINT}")
    return raw


def _with_weights(model: SequenceClassifier, weights: Path) -> SequenceClassifier:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise UnusableModel(f"{weights} is missing; {HINT}")
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UnusableModel(f"{weights} is damaged and cannot be read ({err}); re-copy it or use a checkpoint of the run") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UnusableModel(f"{weights} does not fit the model its directory describes ({first}); the weights and "
                            "config.json come from different runs") from None
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise UnusableModel(f"{weights} holds non-finite weights (NaN or inf); use an earlier checkpoint of the run")
    return model.eval()
