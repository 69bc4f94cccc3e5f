"""Config loading: typed, validated, overrides; every bad input exits 2 naming the key, no traceback."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, run_py

from pipeline.config import load_config
from pipeline.errors import ConfigError

GOOD = ROOT / "configs" / "cpu_test.yaml"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.eval.every_steps >= 1


def test_a_run_that_evaluates_nothing_is_not_refused_for_evaluating_too_rarely():
    cfg = load_config(GOOD, ["eval.split=none", "eval.every_steps=1000", "train.max_steps=300"])
    assert cfg.eval.split == "none"


def test_mnist_is_the_classic_setup():
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers) == ("lstm", 64, 1)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs) == ("adam", 0.01, 64, 1)


def test_overrides_typed():
    cfg = load_config(GOOD, ["train.max_steps=120", "model.bidirectional=true", "optim.lr=3e-3", "wandb.tags=[a,b]"])
    assert cfg.train.max_steps == 120 and cfg.model.bidirectional is True
    assert cfg.optim.lr == 0.003 and cfg.wandb.tags == ["a", "b"]


def test_bare_off_is_log_model_off():
    assert load_config(GOOD, ["wandb.log_model=off"]).wandb.log_model == "off"


def test_yaml_bare_no_is_mixed_precision_no(tmp_path):
    raw = yaml.safe_load(GOOD.read_text())
    raw["train"]["mixed_precision"] = False  # what `mixed_precision: no` parses to
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).train.mixed_precision == "no"


# Each needle is the key path AND the reason, as the message itself words them: `_train_cli`
# blanks the echoed command-line arguments first, so a message that only repeats the user's
# override (`... with overrides optim.lr=-0.1: Input should be greater than 0`) fails.
BAD_OVERRIDES = [
    (["trian.max_steps=10"], "trian: unknown key"),
    (["train.max_step=10"], "train.max_step: unknown key"),
    (["optim.lr=-0.1"], "optim.lr: Input should be greater than 0"),
    (["optim.lr=fast"], "optim.lr: Input should be a valid number"),
    (["train.batch_size=0"], "train.batch_size: Input should be greater than or equal to 1"),
    (["train.batch_size=1.5"], "train.batch_size: Input should be a valid integer"),
    (["eval.every_steps=0"], "eval.every_steps: Input should be greater than or equal to 1"),
    (["eval.every_steps=1000"], "eval.every_steps (1000) is larger than train.max_steps (300)"),
    (["train.mixed_precision=fp8"], "train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"),
    (["model.cell=transformer"], "model.cell: Input should be 'lstm', 'gru' or 'rnn'"),
    (["model.dropout=1.5"], "model.dropout: Input should be less than 1"),
    (["model.dropout=0.3"], "model.dropout applies between recurrent layers; with model.num_layers 1 it does nothing"),
    (["model.hidden_size=-4"], "model.hidden_size: Input should be greater than or equal to 1"),
    (["train.grad_clip=0"], "train.grad_clip: Input should be greater than 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last: Input should be greater than or equal to 1"),
    (["wandb.mode=sometimes"], "wandb.mode: Input should be 'online', 'offline' or 'disabled'"),
    (["data.base_url=pipe:cat"], "data.base_url is a pipe: URL, which runs shell commands; set data.allow_pipe: true"),
    (["data=3"], "data: Input should be a valid dictionary"),
    (["train.seed"], "is not of the form key.sub=value"),
    (["train.max_steps.x=1"], "'max_steps' is a value, not a section"),
    (["data.num_workers=-1"], "data.num_workers: Input should be greater than or equal to 0"),
    (["schedule.name=linear"], "schedule.name: Input should be 'constant', 'cosine' or 'onecycle'"),
    (["data.shift=9"], "data.shift: Input should be less than or equal to 8"),
    (["train.label_smoothing=1"], "train.label_smoothing: Input should be less than 1"),
    (["data.placement=device", "data.on_error=skip"], "data.on_error skip needs data.placement stream (or auto)"),
    (["model.cell=gru", "model.forget_bias=1"], "model.forget_bias applies to LSTM cells only, and model.cell is 'gru'"),
    (["data.placement=disk"], "data.placement: Input should be 'auto', 'stream' or 'device'"),
    (["model.readout=mean"], "model.readout: Input should be 'last' or 'last_max'"),
    (["model.embed_size=0"], "model.embed_size: Input should be greater than or equal to 1"),
    (["model.conv_kernels=[8,5]"], "model.conv_channels and model.conv_kernels must list the same number of blocks"),
    (["model.conv_stride=4"], "model.conv_stride 4 strides the convolutional front-end, and model.frontend is none"),
    (["eval.patience=3"], "eval.patience 3 stops a run that has stopped improving, and eval.keep_best is off"),
    (["eval.keep_best=true", "eval.split=test"], "eval.keep_best chooses the weights on eval.split, and eval.split is test"),
    (["eval.keep_best=true", "eval.split=none"], "eval.split is none: the run evaluates nothing to choose by"),
    (["eval.split=none", "eval.score_test=false"], "it would end without any figure"),
    (["eval.split=none", "wandb.log_model=best"], "the run evaluates nothing, so none would be uploaded"),
]


def _train_cli(*args: str):
    """launch/train.py as a user runs it; a bad config must end there with exit 2 and one paragraph.
    Returns stderr with every argument blanked out, so a needle only matches the message's own words."""
    proc = run_py("launch/train.py", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return _without_args(proc.stderr, args)


def _without_args(text: str, args) -> str:
    for arg in sorted(args, key=len, reverse=True):
        text = text.replace(arg, "<arg>")
    return text


@pytest.mark.parametrize("overrides,needle", BAD_OVERRIDES)
def test_bad_overrides(overrides, needle):
    stderr = _train_cli("--config", str(GOOD), *overrides)
    assert needle in stderr
    # a bad value names the file it was loaded with (blanked above); a malformed argument names the argument
    echoed = " ".join(["<arg>"] * len(overrides))
    assert f"invalid config <arg> with overrides {echoed}: " in stderr or "command-line override '<arg>'" in stderr


BAD_FILES = [
    ("", "is empty"),
    ("data: [unclosed\n", "not valid YAML at line"),
    ("- a\n- b\n", "must hold a mapping"),
    ("output_dir: x\n", "data: required key is missing"),
    ("output_dir: x\ndata: {dir: d}\ntrain: {epochs: null}\n", "set train.max_steps or train.epochs"),
]


@pytest.mark.parametrize("text,needle", BAD_FILES)
def test_bad_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    stderr = _train_cli("--config", str(path))
    assert needle in stderr and "<arg>" in stderr  # the file is named


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--config", "configs/cpu_test.yaml", "optim.lr=-1"], 2, "optim.lr: Input should be greater than 0"),
        (["--config", "configs/missing.yaml"], 2, "<arg> does not exist"),
        (["--config", "configs/cpu_test.yaml", "train.mixed_precision=fp16"], 2, "train.mixed_precision: fp16 needs a CUDA GPU"),
        (["--config", "configs/cpu_test.yaml", "data.dir=/nonexistent/ds"], 1, "python launch/prepare_data.py --dataset fashion_mnist --out /nonexistent/ds"),
    ],
)
def test_cli_exit_codes_no_traceback(tmp_path, args, code, needle):
    args = [*args, f"output_dir={tmp_path / 'out'}"]
    proc = run_py("launch/train.py", *args)
    assert proc.returncode == code, proc.stderr
    assert needle in _without_args(proc.stderr, args[1:])
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") or "error:" in proc.stderr


def test_sequence_config_levers_for_data_sets_of_any_size():
    """configs/sequences.yaml: frames fixed from the data, at least min_steps steps, evaluation once an epoch."""
    from pipeline.data.epoch_plan import EpochPlan
    from pipeline.data.manifest import LengthStats
    from pipeline.data.order import BatchLayout
    from pipeline.training.trainer import auto_frame, resolved_frame, total_steps

    cfg = load_config("configs/sequences.yaml")
    assert cfg.model.frame == "auto" and cfg.train.min_steps == 600 and cfg.eval.every_epochs == 1
    assert [auto_frame(m) for m in (15, 64, 65, 150, 427, 1460)] == [1, 1, 2, 3, 7, 23]
    lengths = lambda median, longest: LengthStats(min=1, median=median, max=longest,  # noqa: E731
                                                  histogram={"edges": [1.0, longest + 1.0], "counts": [9]})
    assert [resolved_frame(f, lengths(427, 500)) for f in ("auto", "whole", 5)] == [7, 500, 5]
    assert resolved_frame("whole", lengths(900, 1344)) == 1024  # a series of 1,344 steps: two frames at most
    plan = lambda steps: EpochPlan(BatchLayout(32, 32, 1), 0, 4096, steps)  # noqa: E731
    assert total_steps(cfg, plan(1)) == 600 and total_steps(cfg, plan(67)) == 67 * 40
    assert load_config("configs/sequences.yaml", ["train.max_steps=20"]).train.max_steps == 20  # every_epochs rules
    with pytest.raises(ConfigError, match="is larger than train.max_steps"):
        load_config("configs/sequences.yaml", ["train.max_steps=20", "eval.every_epochs=null"])
    with pytest.raises(ConfigError, match="model.frame must be auto, whole or a number of steps"):
        load_config("configs/sequences.yaml", ["model.frame=0"])
