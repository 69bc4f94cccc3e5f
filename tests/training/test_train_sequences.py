"""Training on real variable-length sequences (FSDD's MFCCs, 6-92 frames): it learns; one process with
accumulation equals two processes bit for bit; a resumed run equals an uninterrupted one; the stream
and device memory give the same run; W&B offline records it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, read_jsonl, run_py, train_in_process, train_run
from safetensors.torch import load_file
from wandb_records import find_logs, parse_finished

from pipeline.config import load_config

pytestmark = pytest.mark.slow

CONFIG = "configs/sequences.yaml"
# configs/sequences.yaml's model (the LSTM and the FCN branch over both normalisations), narrower: what these
# tests claim holds at any width.
SHORT = ("model.hidden_size=32", "model.conv_channels=[16,32,16]", "train.max_steps=60", "eval.every_epochs=null", "eval.every_steps=30", "checkpoint.every_steps=30",
         "train.log_every_steps=10", "train.batch_size=16", "train.global_batch_size=32", "wandb.mode=disabled")
# Drawn from (seed, epoch, sample id): a run augments each sample the same way at any world size or placement.
AUGMENT = ("data.jitter=0.05", "data.scale=0.1", "data.time_mask=0.1")
# Every convolutional module at once (a striding front-end with squeeze-and-excitation, and the FCN branch),
# small: their masks, strides and statistics must keep the guarantees the recurrent layers give. Batch norm,
# whose statistics cross samples and whose running statistics every rank must fold alike, is the harder
# case; the per-sample norm is a function of each sequence alone (tests/model/test_model_conv.py).
CONV = ("model.frontend=conv", "model.conv_branch=true", "model.conv_excite=true", "model.conv_stride=2",
        "model.conv_norm=batch", "model.conv_channels=[8,16,8]", "model.conv_kernels=[5,3,3]",
        "model.readout_dropout=0.5")  # its masks seeded per micro-batch, as model.dropout's


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdd_trains_and_reports_padding(fsdd_shards, tmp_path):
    out = tmp_path / "run"
    summary = train_in_process(out, fsdd_shards, *SHORT, "train.max_steps=150", "eval.every_epochs=1", "wandb.mode=offline",
                               "wandb.log_model=off", config=CONFIG)
    assert summary["final_eval_accuracy"] > 0.5, summary  # ten digits: chance is 0.1
    assert summary["eval_split"] == "val"
    # eval.every_epochs=1: 2,160 training cases in global batches of 32 are 67 steps an epoch; and the last step
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in e] == [67, 134, 150]
    # Bucketed micro-batches of 16: a few percent of padding (random ones: about 0.7, tests/data/test_order_buckets.py)
    assert 0 < summary["padding_waste"] < 0.15, summary["padding_waste"]
    windows = [e["train/padding_waste"] for e in read_jsonl(out / "metrics.jsonl") if "train/loss" in e]
    assert len(windows) == 15 and all(0 <= w < 0.3 for w in windows)
    # config.yaml is the config as given (frame auto); what the data decided stands beside it, and in the card
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["frame"] == "auto"
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["model.frame"] == 1 and resolved["train.global_batch_size"] == 32 and resolved["train.max_steps"] == 150
    pinned = load_config(out / "config.yaml", [f"{key}={value}" for key, value in resolved.items()])  # as overrides
    assert pinned.model.frame == 1 and pinned.train.max_steps == 150
    card = json.loads((out / "model" / "config.json").read_text())
    assert card["model"]["frame"] == 1 and card["version"] == 1
    assert card["features"] == 13 and card["ragged"] and card["image_shape"] is None and len(card["input_scale"]["mean"]) == 13
    # evaluate.py scores the shipped model as the run did, to the last digit, on both splits
    for split, accuracy, loss in (("val", "final_eval_accuracy", "final_eval_loss"), ("test", "test_accuracy", "test_loss")):
        run_py("launch/evaluate.py", "--model", str(out / "model"), "--data", str(fsdd_shards), "--split", split,
               "--out", str(tmp_path / split), check=True)
        report = json.loads((tmp_path / split / "eval.json").read_text())
        assert (report["accuracy"], report["loss"]) == (summary[accuracy], summary[loss]), split
    assert not (tmp_path / "test" / "most_confident_mistakes.png").exists()  # a sequence has no picture
    # W&B offline, read back from the run's transaction log: what the image runs record, and the sequences' own
    (log,) = [parse_finished(p) for p in find_logs(tmp_path / "wandb-home")]  # WANDB_DIR: conftest's _isolated_wandb
    assert log.exit is not None and log.exit.exit_code == 0
    assert log.config["data_placement"] == "device" and log.config["model"]["frame"] == 1  # frame auto, resolved
    assert [v for _, v in log.column("train/padding_waste")] == windows
    assert [step for step, _ in log.column("eval/macro_f1")] == [67, 134, 150]
    assert log.summary["test/accuracy"] == summary["test_accuracy"]
    assert log.summary["data/bytes_read_total"] == sum(summary["data_bytes_read"]) > 0
    _predict_agrees_with_the_run(out, fsdd_shards, summary, tmp_path)


def _predict_agrees_with_the_run(out: Path, fsdd_shards: Path, summary: dict, tmp_path: Path) -> None:
    """predict.py on the raw .npz (labels optional): one line per recording; on the test split's recordings
    its answers score what the run's test evaluation scored."""
    from pipeline.data.manifest import load_manifest
    from pipeline.data.store import ShardStore, read_blocks

    raw = ROOT / "data" / "examples" / "fsdd" / "digits.npz"
    lines = [json.loads(line) for line in
             run_py("launch/predict.py", "--model", str(out / "model"), str(raw), check=True).stdout.splitlines()]
    assert len(lines) == 3000 and lines[7]["sequence"] == f"index 7 of {raw}" and lines[7]["steps"] > 0
    assert set(lines[0]) == {"sequence", "steps", "class", "class_index", "probability", "probabilities", "label"}
    manifest = load_manifest(fsdd_shards)
    test_ids = [int(i) for shard in manifest.split("test").shards
                for block in read_blocks(ShardStore(str(fsdd_shards)), shard) for i in block.ids]
    right = [lines[i]["class"] == lines[i]["label"] for i in test_ids]
    assert abs(sum(right) / len(right) - summary["test_accuracy"]) <= 1 / len(right)
    data = np.load(raw)
    five = int(data["lengths"][:5].sum())
    unlabelled, narrow = tmp_path / "unlabelled.npz", tmp_path / "narrow.npz"
    np.savez(unlabelled, X=data["X"][:five], lengths=data["lengths"][:5])
    np.savez(narrow, X=data["X"][:five, :12], lengths=data["lengths"][:5])
    quiet = [json.loads(line) for line in
             run_py("launch/predict.py", "--model", str(out / "model"), str(unlabelled), check=True).stdout.splitlines()]
    assert len(quiet) == 5 and "label" not in quiet[0] and [q["class"] for q in quiet] == [x["class"] for x in lines[:5]]
    proc = run_py("launch/predict.py", "--model", str(out / "model"), str(narrow))
    assert proc.returncode == 2 and "12 channel(s)" in proc.stderr and "reads 13" in proc.stderr
    _predict_refuses_what_it_cannot_answer(out / "model", tmp_path)


def _predict_refuses_what_it_cannot_answer(model: Path, tmp_path: Path) -> None:
    """A file of no sequences, and a model directory whose card lost its weights' digest: exit 2, one
    paragraph each, never an exit 0 that says nothing or weights loaded unverified."""
    empty = tmp_path / "empty.npz"
    np.savez(empty, X=np.zeros((0, 13), np.float32), lengths=np.zeros(0, np.int64))
    proc = run_py("launch/predict.py", "--model", str(model), str(empty))
    assert proc.returncode == 2 and f"{empty} holds no sequences" in proc.stderr and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    unverified = tmp_path / "unverified"
    shutil.copytree(model, unverified)
    card = json.loads((unverified / "config.json").read_text())
    del card["weights_sha256"]
    (unverified / "config.json").write_text(json.dumps(card))
    proc = run_py("launch/predict.py", "--model", str(unverified), str(empty))
    assert proc.returncode == 2 and "records no weights_sha256" in proc.stderr, proc.stderr


def test_two_processes_equal_one_with_accumulation(fsdd_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # One thread per process (threads change float sums); losses logged every step (a log window's sums
    # over steps and over ranks associate differently)
    # eval.keep_best: the main process alone keeps the best weights and writes them into the checkpoints;
    # eval.patience: it alone knows whether to stop, and tells the other ranks after each evaluation
    every_step = (*SHORT, *AUGMENT, *CONV, "train.log_every_steps=1", "eval.keep_best=true", "eval.patience=1")
    train_run(one, fsdd_shards, *every_step, config=CONFIG, env={"OMP_NUM_THREADS": "1"})
    train_run(two, fsdd_shards, *every_step, nproc=2, config=CONFIG, env={"OMP_NUM_THREADS": "1"})
    assert _same(one, two), "1 x 2 x 16 and 2 x 1 x 16 must compute the same micro-batches and sums"
    losses = lambda out: [e["train/loss"] for e in read_jsonl(out / "metrics.jsonl") if "train/loss" in e]  # noqa: E731
    assert losses(one) == losses(two)


def test_resumed_run_equals_uninterrupted(fsdd_shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_in_process(straight, fsdd_shards, *SHORT, *CONV, config=CONFIG)
    train_in_process(split, fsdd_shards, *SHORT, *CONV, "train.stop_at_step=30", config=CONFIG)
    resumed = train_in_process(split, fsdd_shards, *SHORT, *CONV, resume="auto", config=CONFIG)
    assert resumed["resumed"] and _same(straight, split)


def test_stream_and_device_memory_give_the_same_run(fsdd_shards, tmp_path):
    device, stream = tmp_path / "device", tmp_path / "stream"
    train_in_process(device, fsdd_shards, *SHORT, *AUGMENT, *CONV, "data.placement=device", config=CONFIG)
    train_in_process(stream, fsdd_shards, *SHORT, *AUGMENT, *CONV, "data.placement=stream", "data.num_workers=2",
                     config=CONFIG)
    assert _same(device, stream)


def test_balanced_class_weights_and_macro_scores(fsdd, fsdd_shards, tmp_path):
    """An imbalanced FSDD (digit 0 cut to 30 of its 300 recordings) trains with balanced weights; the
    summary reports balanced accuracy and macro-F1 beside accuracy, as evaluate.py does."""
    keep = (fsdd["y"] != 0) | (np.cumsum(fsdd["y"] == 0) <= 30)
    starts = np.concatenate([[0], np.cumsum(fsdd["lengths"])])
    rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in np.flatnonzero(keep)])
    src = tmp_path / "imbalanced.npz"
    np.savez(src, X=fsdd["X"][rows], lengths=fsdd["lengths"][keep], y=fsdd["y"][keep])
    data = tmp_path / "data"
    run_py("launch/prepare_data.py", "--from", str(src), "--out", str(data), check=True)
    out = tmp_path / "run"
    summary = train_in_process(out, data, *SHORT, "train.class_weights=balanced", config=CONFIG)
    for split in ("final_eval", "test"):
        assert 0 < summary[f"{split}_balanced_accuracy"] <= 1 and 0 < summary[f"{split}_macro_f1"] <= 1
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in e]
    assert {"eval/balanced_accuracy", "eval/macro_f1"} <= set(evals[-1])


def test_a_train_split_smaller_than_the_batch_trains_with_a_smaller_one(examples, tmp_path):
    """configs/sequences.yaml (global batch 32) on 20 BasicMotions recordings: no edit needed."""
    data = tmp_path / "bm"
    run_py("launch/prepare_data.py", "--from", str(examples / "BasicMotions"), "--out", str(data), "--val-size", "20",
           check=True)
    out = tmp_path / "run"
    proc = train_run(out, data, "train.min_steps=10", "train.epochs=1", "model.hidden_size=16", "wandb.mode=disabled",
                     config=CONFIG)
    assert "fewer than the global batch of 32: global batch 16, micro-batch 16 instead" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["global_batch_size"] == 16


def test_the_weights_balance_the_train_counts():
    from pipeline.errors import ConfigError
    from pipeline.training.trainer import balanced_weights

    counts = {"a": 90, "b": 9, "c": 1}
    weights = balanced_weights(counts).numpy()
    np.testing.assert_allclose(weights, [100 / 270, 100 / 27, 100 / 3], rtol=1e-6)
    np.testing.assert_allclose((weights * np.array([90, 9, 1])).sum(), 100, rtol=1e-6)  # the mean weight per case is 1
    with pytest.raises(ConfigError, match="no case of b"):
        balanced_weights({"a": 3, "b": 0})


def test_frame_whole_reads_a_sequence_in_one_step_and_says_which_are_longer(fsdd_shards, tmp_path, capsys):
    """LSTM-FCN's dimension shuffle: the frame is the train split's longest sequence, and the run says which
    splits hold longer ones (their sequences take more than one recurrent step)."""
    from pipeline.data.manifest import load_manifest

    out = tmp_path / "run"
    train_in_process(out, fsdd_shards, *SHORT, "model.frame=whole", "model.frontend=none", "model.conv_branch=true",
                     "model.conv_branch_input=steps", "model.readout_dropout=0.8", "train.max_steps=4",
                     "eval.every_steps=4", "checkpoint.every_steps=4", config=CONFIG)
    splits = load_manifest(fsdd_shards).splits
    frame = splits["train"].lengths.max
    assert yaml.safe_load((out / "resolved.yaml").read_text())["model.frame"] == frame
    assert json.loads((out / "model" / "config.json").read_text())["model"]["frame"] == frame
    said = capsys.readouterr()
    longer = [f"the {name} split's longest is {e.lengths.max} steps" for name, e in splits.items() if e.lengths.max > frame]
    assert all(part in said.out + said.err for part in longer)
    assert ("model.frame whole is" in said.out + said.err) == bool(longer)
    # FSDD's train split holds its longest recording: a frame of 40 steps is what a shorter train split would give
    from types import SimpleNamespace

    from pipeline.training.trainer import splits_longer_than_the_frame

    cfg = load_config(CONFIG, ["model.frame=whole"])
    short = SimpleNamespace(manifest=load_manifest(fsdd_shards), model=cfg.model.model_copy(update={"frame": 40}))
    assert splits_longer_than_the_frame(cfg, short) == (
        f"the train split's longest is {frame} steps, the val split's longest is {splits['val'].lengths.max} steps, "
        f"the test split's longest is {splits['test'].lengths.max} steps")
    assert splits_longer_than_the_frame(load_config(CONFIG), short) == ""  # frame auto: nothing to say
