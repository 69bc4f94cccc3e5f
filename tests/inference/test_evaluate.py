"""launch/evaluate.py and launch/predict.py on a really trained model, as a user runs them."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, accelerate_cmd, run_py, train_args
from wandb_records import find_logs, parse_finished

from pipeline.data import manifest as mf
from pipeline.data.store import ShardStore, load_split_tensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_shards):
    """A finished configs/cpu_test.yaml run (W&B offline, so the model knows its training run)."""
    base = tmp_path_factory.mktemp("trained")
    out = base / "run"
    # The run's W&B files go to run/wandb; wandb's own config and cache stay in this test's temp dir.
    env = {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(base / "wandb-config"), "WANDB_CACHE_DIR": str(base / "wandb-cache"),
           "WANDB_DATA_DIR": str(base / "wandb-data")}
    run_py(*train_args(out, fashion_shards, "wandb.mode=offline", "wandb.log_model=off"), env=env, check=True)
    return out


def _evaluate(*args: str, launcher: list[str] | None = None):
    if launcher:
        return subprocess.run([*launcher, "launch/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return run_py("launch/evaluate.py", *args)


def _user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_evaluate_reproduces_the_runs_final_accuracy(trained, fashion_shards, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    one = _evaluate("--model", str(trained / "model"), "--data", str(fashion_shards), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    launched = _evaluate("--model", str(trained / "model"), "--data", str(fashion_shards), "--out", str(tmp_path / "acc"),
                         launcher=accelerate_cmd(1))
    assert launched.returncode == 0, launched.stderr
    checkpoint = _evaluate("--model", str(trained / "checkpoints" / "step-00000300"), "--data", str(fashion_shards),
                           "--out", str(tmp_path / "ckpt"))
    assert checkpoint.returncode == 0, checkpoint.stderr
    for name in ("one", "acc", "ckpt"):
        report = json.loads((tmp_path / name / "eval.json").read_text())
        # The run's one score on test, to the last digit.
        assert report["accuracy"] == summary["test_accuracy"], name
        assert report["loss"] == summary["test_loss"], name
    # On the split the run evaluated during training: its last evaluation, to the last digit.
    val = _evaluate("--model", str(trained / "model"), "--data", str(fashion_shards), "--split", "val",
                    "--out", str(tmp_path / "val"))
    assert val.returncode == 0 and summary["eval_split"] == "val", val.stderr
    report = json.loads((tmp_path / "val" / "eval.json").read_text())
    assert (report["accuracy"], report["loss"]) == (summary["final_eval_accuracy"], summary["final_eval_loss"])
    report = json.loads((tmp_path / "one" / "eval.json").read_text())
    confusion = np.array(report["confusion"])
    assert [r["support"] for r in report["per_class"]] == confusion.sum(axis=1).tolist() == [1000] * 10
    shirt = report["per_class"][6]
    assert shirt["class"] == "Shirt" and shirt["recall"] == pytest.approx(confusion[6, 6] / 1000)
    assert shirt["precision"] == pytest.approx(confusion[6, 6] / confusion[:, 6].sum())
    assert shirt["f1"] == pytest.approx(2 * shirt["precision"] * shirt["recall"] / (shirt["precision"] + shirt["recall"]))
    for png in ("confusion.png", "most_confident_mistakes.png"):
        assert (tmp_path / "one" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"accuracy {summary['test_accuracy']:.4f}" in one.stdout and "precision  recall" in one.stdout


def test_predict_on_png_files_agrees_with_evaluate(trained, fashion_shards, tmp_path):
    from PIL import Image

    out = tmp_path / "eval"
    assert _evaluate("--model", str(trained / "model"), "--data", str(fashion_shards), "--out", str(out)).returncode == 0
    with open(out / "predictions.csv") as f:
        evaluated = {int(r["index"]): r["predicted_class"] for r in csv.DictReader(f)}
    images, _, _ = load_split_tensors(mf.load_manifest(fashion_shards), ShardStore(str(fashion_shards)), "test")
    paths = []
    for i in range(24):
        path = tmp_path / f"test-{i:02d}.png"
        Image.fromarray(images[i].numpy()).save(path)
        paths.append(str(path))
    proc = run_py("launch/predict.py", "--model", str(trained / "model"), *paths, check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [ln["image"] for ln in lines] == paths
    assert [ln["class"] for ln in lines] == [evaluated[i] for i in range(24)]
    assert all(abs(sum(ln["probabilities"].values()) - 1) < 1e-4 and ln["probability"] == max(ln["probabilities"].values())
               for ln in lines)
    # The same images as one .npy stack, and one of them as a 3x larger colour JPEG-free PNG: same classes.
    np.save(tmp_path / "stack.npy", images[:24].numpy())
    Image.fromarray(np.stack([images[0].numpy()] * 3, axis=-1)).resize((84, 84), Image.NEAREST).save(tmp_path / "big.png")
    proc = run_py("launch/predict.py", "--model", str(trained / "model"), str(tmp_path / "stack.npy"), str(tmp_path / "big.png"),
                  check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [ln["class"] for ln in lines[:24]] == [evaluated[i] for i in range(24)]
    assert lines[24]["class"] == evaluated[0]


def test_bad_inputs_exit_2_naming_the_file(trained, fashion_shards, examples, tmp_path):
    model = trained / "model"
    # data with another class count than the model predicts
    other = tmp_path / "five_classes"
    shutil.copytree(fashion_shards, other)
    m = mf.load_manifest(other)
    m.num_classes, m.class_names = 5, m.class_names[:5]
    m.fingerprint = mf.fingerprint(m)
    mf.write_manifest(m, other)
    _user_error(_evaluate("--model", str(model), "--data", str(other)), "has 5 classes", "predicts 10")
    # sequences, not images
    sequences = tmp_path / "japanese_vowels"
    run_py("launch/prepare_data.py", "--from", str(examples / "JapaneseVowels"), "--out", str(sequences), check=True)
    _user_error(_evaluate("--model", str(model), "--data", str(sequences)), "holds sequences (JapaneseVowels, 12 channel(s))")
    # a directory that is no model of ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    _user_error(_evaluate("--model", str(foreign), "--data", str(fashion_shards)), str(foreign / "config.json"),
                "not a model description")
    _user_error(run_py("launch/predict.py", "--model", str(tmp_path), "x.png"), "neither config.json")
    # damaged weights: bytes flipped in the middle still parse as safetensors; the recorded digest catches them
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    _user_error(run_py("launch/predict.py", "--model", str(damaged), "x.png"), str(damaged / "model.safetensors"), "damaged")
    (damaged / "model.safetensors").write_bytes(b"not safetensors at all")
    _user_error(_evaluate("--model", str(damaged), "--data", str(fashion_shards)), str(damaged / "model.safetensors"))
    # an image that cannot be decoded
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _user_error(run_py("launch/predict.py", "--model", str(model), str(tmp_path / "broken.png")),
                str(tmp_path / "broken.png"), "cannot be decoded")
    # an evaluation is not overwritten without --force
    out = tmp_path / "eval"
    assert _evaluate("--model", str(model), "--data", str(fashion_shards), "--out", str(out)).returncode == 0
    before = (out / "eval.json").read_bytes()
    _user_error(_evaluate("--model", str(model), "--data", str(fashion_shards), "--out", str(out)), "--force")
    assert (out / "eval.json").read_bytes() == before
    assert _evaluate("--model", str(model), "--data", str(fashion_shards), "--out", str(out), "--force").returncode == 0


def test_evaluation_is_logged_to_its_own_wandb_run_naming_the_training_run(trained, fashion_shards, tmp_path):
    (train_log,) = [parse_finished(p) for p in find_logs(trained / "wandb")]
    out = tmp_path / "eval"
    proc = run_py("launch/evaluate.py", "--model", str(trained / "model"), "--data", str(fashion_shards), "--out", str(out),
                  "--wandb", "offline", env={"WANDB_DIR": str(tmp_path / "wandb-eval")}, check=True)
    (log,) = [parse_finished(p) for p in find_logs(tmp_path / "wandb-eval")]
    assert log.run.job_type == "eval" and log.run_id != train_log.run_id
    assert log.config["training_run_id"] == train_log.run_id
    report = json.loads((out / "eval.json").read_text())
    assert [v for _, v in log.column("evaluate/test/accuracy")] == [report["accuracy"]]
    assert log.column("evaluate/test/accuracy")[0][0] == 300, "at the training run's last step"
    assert log.exit is not None and log.exit.exit_code == 0
    assert "Traceback" not in proc.stderr and sys.executable
