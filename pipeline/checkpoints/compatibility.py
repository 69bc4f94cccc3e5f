"""What must not change under a checkpoint that a run resumes: the data, the model, and the order of samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.checkpoints.format import CheckpointMeta
from pipeline.config import ModelConfig
from pipeline.errors import UserError


class IncompatibleCheckpoint(UserError):
    exit_code = 2
    shared = True  # every rank reads the same checkpoint and the same config


def check_compatible(meta: CheckpointMeta, path: Path, fingerprint: str, model_cfg: dict[str, Any],
                     order: dict[str, int]) -> None:
    """What must not change under a checkpoint: the data, the model, and what fixes the order of the samples."""
    fresh = "or start a new output_dir"
    if meta.fingerprint != fingerprint:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was trained on dataset {meta.fingerprint[:12]}, but data.dir holds {fingerprint[:12]}; "
            f"resume with the same prepared dataset, {fresh}")
    # A model key that came after the checkpoint was written built its model with the key's default.
    # Both as JSON holds them (a tuple of channels is a list there).
    saved = json.loads(json.dumps({**ModelConfig().model_dump(mode="json"), **meta.model}))
    model_cfg = json.loads(json.dumps(model_cfg))
    changed = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if changed:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} holds a model with different {', '.join('model.' + k for k in changed)} "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with the same model config {fresh}")
    if not meta.order:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was written by an earlier version, whose data order depended on the number of "
            f"processes; this one cannot say where that run stood in its data. Finish it with that version, {fresh}")
    # A key that came after the checkpoint was written had its default then (one canonical stream).
    saved_order = {"canonical_streams": 1, **meta.order}
    changed = {k: (saved_order.get(k), v) for k, v in order.items() if saved_order.get(k) != v}
    if changed:
        keys = {"global_batch_size": "train.global_batch_size", "seed": "train.seed", "shuffle_buffer": "data.shuffle_buffer",
                "canonical_streams": "data.canonical_streams"}
        said = ", ".join(f"{keys.get(k, k)} {old} -> {new}" for k, (old, new) in changed.items())
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was trained with another order of samples ({said}): its data position means nothing "
            f"under the new one. Resume with the checkpoint's values (any number of processes that divides its "
            f"global batch works), {fresh}")


