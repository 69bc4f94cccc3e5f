"""The model card: typed, versioned, read by one loader; the cards earlier versions wrote still read."""

from __future__ import annotations

import pytest

from pipeline.config import ModelConfig
from pipeline.model_card import VERSION, CardError, ModelCard

# model/config.json as the trainer wrote it before cards carried a version (an image model: no `features`).
VERSION_0 = {
    "model": {"cell": "lstm", "hidden_size": 64, "num_layers": 1},
    "image_shape": [28, 28], "num_classes": 10, "class_names": [f"c{i}" for i in range(10)], "dataset": "fashion_mnist",
    "mixed_precision": "no", "wandb_run_id": "abc123", "steps": 300, "weights": "raw", "weights_sha256": "0" * 64,
}


def _card(**change) -> dict:
    card = ModelCard(model=ModelConfig(), features=13, num_classes=3, class_names=["a", "b", "c"], ragged=True,
                     input_scale={"mean": [0.0] * 13, "std": [1.0] * 13})
    return {**card.to_dict(), **change}


def test_a_card_reads_back_as_it_was_written():
    raw = _card(steps=5, weights="ema")
    card = ModelCard.from_dict(raw)
    assert card.version == VERSION and card.to_dict() == raw
    assert card.inputs.mean == (0.0,) * 13 and card.model == ModelConfig()


def test_a_card_of_before_versions_reads_with_its_features_from_the_image_shape():
    card = ModelCard.from_dict(VERSION_0)
    assert card.version == VERSION and card.features == 28 and card.image_shape == [28, 28]
    assert card.model.hidden_size == 64 and card.steps == 300 and card.inputs.mean is None  # images: / 255
    names = ModelCard.from_dict({k: v for k, v in VERSION_0.items() if k != "class_names"}).class_names
    assert names == [str(i) for i in range(10)]


@pytest.mark.parametrize("change, said", [
    ({"version": 2}, "version 2 card, and this pipeline reads version 1"),
    ({"architectures": ["BertModel"]}, "architectures: Extra inputs are not permitted"),
    ({"class_names": ["a", "b"]}, "2 class names for 3 classes"),
    ({"num_classes": "three"}, "num_classes"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"model": {"hidden_size": -1}}, "model.hidden_size"),
])
def test_a_card_that_cannot_be_read_says_which_field(change, said):
    with pytest.raises(CardError, match=said.replace("(", r"\(")):
        ModelCard.from_dict(_card(**change))


def test_not_a_card_at_all():
    with pytest.raises(CardError, match="not a JSON object"):
        ModelCard.from_dict(["a", "list"])
    with pytest.raises(CardError, match="model"):
        ModelCard.from_dict({"architectures": ["BertModel"]})
