"""The model card: what a trained model needs beside its weights to be used as training used it.

Written by training (model/config.json, and into every checkpoint), read by evaluate and predict
through one loader (pipeline/inference/models.py). Typed and versioned: a card is validated when it
is read, and the card of an earlier version is read into this one in `from_dict`, the one place that
knows the older layouts, so no reader needs a fallback of its own.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import ModelConfig
from pipeline.inputs import InputScale

VERSION = 1


class CardError(ValueError):
    """A card that is not a model card of this pipeline, or not one this version can read."""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = VERSION
    model: ModelConfig  # with model.frame resolved: the architecture the weights fit
    features: int = Field(ge=1)  # channels per step
    num_classes: int = Field(ge=2)
    class_names: list[str]
    image_shape: Optional[list[int]] = None  # [steps, features] of an image model; None: sequences
    dtype: Optional[str] = None  # of the stored values the model was trained on
    ragged: bool = False  # sequences of several lengths
    input_scale: Optional[dict[str, list[float]]] = None  # the train split's statistics; None: images / 255
    dataset: Optional[str] = None
    dataset_fingerprint: Optional[str] = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # Known once the run ends (model/config.json); a checkpoint's card leaves them unset.
    steps: Optional[int] = None
    kept_step: Optional[int] = None  # the step of the weights: the last, or the best evaluation's (eval.keep_best)
    # The batch training scored with (eval.batch_size), evaluate.py's default: a convolution's sums depend in their
    # last digits on the padded length of the batch a sequence is in, so the same batches give the same scores.
    eval_batch_size: Optional[int] = None
    weights: Literal["raw", "ema"] = "raw"
    ema: Optional[dict[str, Any]] = None
    wandb_run_id: Optional[str] = None
    weights_sha256: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.image_shape is not None and self.image_shape[1] != self.features:
            raise ValueError(f"image_shape {self.image_shape} does not have {self.features} features per row")
        return self

    @property
    def inputs(self) -> InputScale:
        """Stored values -> model inputs, exactly as in training (images / 255, else the train split's statistics)."""
        return InputScale.from_card(self.input_scale)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: Any) -> ModelCard:
        """A card as written by any version of this pipeline -> this version's, validated; CardError says why not."""
        if not isinstance(raw, dict):
            raise CardError("it is not a JSON object")
        raw = dict(raw)
        version = raw.pop("version", 0)
        if version == 0:  # written before cards carried a version: image models had no `features`
            if not raw.get("features"):
                raw["features"] = (raw.get("image_shape") or [None, None])[1]
            if not raw.get("class_names") and isinstance(raw.get("num_classes"), int):
                raw["class_names"] = [str(i) for i in range(raw["num_classes"])]
        elif version != VERSION:
            raise CardError(f"it is a version {version} card, and this pipeline reads version {VERSION}: use the "
                            "pipeline version that trained the model")
        try:
            return cls(**raw)
        except (ValidationError, TypeError) as err:
            raise CardError(_first_problem(err)) from None


def _first_problem(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the card"
        return f"{where}: {first['msg']}"
    return str(err)
