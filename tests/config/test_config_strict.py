"""A config says one thing: no non-finite numbers (inf, nan), no key given twice. Both are refused at
load, exit 2, naming the key and the file (and, for a key given twice, both of its lines)."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_py

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.kube import build_spec

GOOD = ROOT / "configs" / "cpu_test.yaml"

NON_FINITE = [
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.betas=[0.9, .inf]", "optim.betas.1"),
    ("optim.betas=[.nan, 0.999]", "optim.betas.0"),
    ("data.retry_s=inf", "data.retry_s"),
    ("model.forget_bias=-.inf", "model.forget_bias"),
    ("model.forget_bias=nan", "model.forget_bias"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    # Refused before too, by a range their nan fails, in words that hid the cause:
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("data.erase_area=[0.1, .nan]", "data.erase_area.1"),
    ("train.ema={decay: .nan}", "train.ema.decay"),
    ("schedule.min_lr_ratio=nan", "schedule.min_lr_ratio"),
]


@pytest.mark.parametrize("override,key", NON_FINITE)
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"invalid config {GOOD} with overrides .*: {key}: Input should be a finite number"):
        load_config(GOOD, [override])


def test_non_finite_numbers_in_the_file_are_refused(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text(GOOD.read_text().replace("lr: 0.01", "lr: .inf"))
    with pytest.raises(ConfigError, match=rf"invalid config {path}: optim.lr: Input should be a finite number"):
        load_config(path)


def test_optim_lr_inf_exits_2_before_training(tmp_path):
    proc = run_py("launch/train.py", "--config", str(GOOD), "optim.lr=inf", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "optim.lr: Input should be a finite number" in proc.stderr and not (tmp_path / "out").exists()


DUPLICATES = [
    # (text appended to or replacing part of the good config, key, first line, second line)
    ("optim:\n  lr: 0.01\n  name: adam\n  lr: 0.1\n", "'lr'", 2, 4),
    ("train:\n  max_steps: 10\ntrain:\n  max_steps: 20\n", "'train'", 1, 3),
    ("train:\n  ema: {decay: 0.9, decay: 0.99}\n", "'decay'", 2, 2),
]


@pytest.mark.parametrize("text,key,first,second", DUPLICATES)
def test_a_key_given_twice_is_refused_naming_it_both_lines_and_the_file(tmp_path, text, key, first, second):
    path = tmp_path / "twice.yaml"
    path.write_text(text + "output_dir: x\ndata: {dir: d}\neval: {every_steps: 5}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"config file {path} " in message and f"key {key} is given twice" in message, message
    assert f"at lines {first} and {second}" in message, message


def test_a_yaml_merge_that_a_key_overrides_is_no_duplicate(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("output_dir: x\ndata: {dir: d}\noptim:\n  <<: {lr: 0.01, name: adam}\n  lr: 0.1\n")
    assert load_config(path).optim.lr == 0.1


def test_a_key_given_twice_exits_2_on_the_command_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(GOOD.read_text() + "optim:\n  lr: 0.5\n")  # cpu_test.yaml has optim: already
    proc = run_py("launch/train.py", "--config", str(path), f"output_dir={tmp_path / 'out'}", "train.max_steps=50",
                  "wandb.mode=disabled")  # what it trains if the key given twice goes unseen
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"config file {path} is not valid YAML" in proc.stderr and "key 'optim' is given twice" in proc.stderr


def test_submit_refuses_a_key_given_twice(tmp_path):
    """The Kubernetes job is built from the same file through the same loader."""
    path = tmp_path / "twice.yaml"
    path.write_text("output_dir: runs/tiny\ndata: {dir: d}\ntrain: {max_steps: 20}\neval: {every_steps: 10}\n"
                    "train: {max_steps: 40}\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice in one mapping, at lines 3 and 5"):
        build_spec(path, "job", image="ghcr.io/example/lstm-pipeline:0.1.0", nodes=2, gpus_per_node=1,
                   data_pvc="lstm-data", output_pvc="lstm-out")
