"""Typed training configuration: YAML file + ``key.sub=value`` overrides, validated at load.

Every error names the file and the key path, and exits with status 2 (ConfigError).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.files import mask_url, write_text_atomic

MAX_FRAME = 1024  # steps per frame: model.frame whole stops here, so the first layer (frame x features inputs) stays bounded


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise. A non-finite number (inf, .nan) is no setting: accepted,
    # optim.lr=inf would end the run at its first steps as a "non-finite loss", far from the key that caused it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    dir: str = Field(description="Prepared dataset directory holding manifest.json")
    dataset: Optional[str] = Field(
        None, description="The data set data.dir must hold (its manifest's name), so that a config meant for one is "
        "never trained on another; null: whatever data.dir holds")
    base_url: Optional[str] = Field(
        None, description="Read shards from BASE_URL/<url> (http(s)://, pipe:) instead of data.dir; credentials in it "
        "(https://user:token@host/...) go to the server as HTTP basic auth, and are masked (https://***@host/...) "
        "wherever the config is written or printed"
    )
    retry_s: float = Field(
        60.0, ge=0, description="With data.base_url: how long a transient transfer failure (refused, timed out, HTTP 5xx) "
        "is tried again, with pauses of 1, 2, 4 ... s, before the run exits 75")
    placement: Literal["auto", "stream", "device"] = Field(
        "auto",
        description="device: hold the train split in the training device's memory and draw batches there (no loader); "
        "stream: read shards through DataLoader workers; auto: device when the split takes at most a quarter of the "
        "free memory of every rank's device (and data.on_error is raise)",
    )
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader workers per rank (data.placement stream); they read "
                             "the epoch's windows in turn, and the batches are the same for any number of them")
    shuffle_buffer: int = Field(
        4096, ge=0, description="The epoch's shards are read in windows of at least this many samples, each shuffled "
        "as a whole (pipeline/data/order.py)")
    canonical_streams: int = Field(
        1, ge=1, le=4096, description="The epoch cut into this many streams, each global batch taking an equal share "
        "of every one (pipeline/data/canonical.py): a streamed rank reads only the streams of its micro-batches, "
        "1/W of the data when the world size W divides it. The batches are the same at any W; 1 is the order "
        "before streams (every rank reads every shard). It must divide global batch / batch_size")
    verify: Literal["none", "size", "sha256"] = "size"
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A corrupt shard at training time: stop naming it, or skip it (counted; ranks stay equal)"
    )
    hflip: bool = Field(False, description="Augment: mirror half the training images left-right (clothes are symmetric)")
    shift: int = Field(0, ge=0, le=8, description="Augment: move each training image by up to N pixels each way (zero fill)")
    erase: float = Field(0.0, ge=0.0, le=1.0, description="Augment: the probability that a training image gets a "
                         "rectangle blanked (random erasing)")
    erase_area: tuple[float, float] = Field((0.02, 0.25), description="Random erasing: the rectangle's area, as a "
                                            "fraction of the image, drawn from this range")
    time_mask: float = Field(0.0, ge=0.0, lt=1.0, description="Augment sequences: blank (set to the channel mean) "
                             "one span of each training sequence, its width drawn up to this fraction of its length")
    jitter: float = Field(0.0, ge=0.0, le=10.0, description="Augment sequences: Gaussian noise of this standard "
                          "deviation, in the train split's standard deviations, on every value")
    scale: float = Field(0.0, ge=0.0, le=1.0, description="Augment sequences: multiply each channel of each training "
                         "sequence by a factor drawn from N(1, scale^2)")
    length_buckets: bool = Field(
        True, description="Where lengths vary: each window's samples are arranged so that a micro-batch holds samples "
        "of similar length (less padding; pipeline/data/order.py); the same global batches at any world size")
    allow_pipe: bool = False
    record_sample_ids: bool = Field(
        False, description="Audit: write each rank's trained sample indices to output_dir/sample_ids/rank-N.npy"
    )


class EmaConfig(_Section):
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="Each step the average moves 1 - decay towards the weights")
    start_step: int = Field(0, ge=0, description="Until this optimizer step the average is the weights themselves")


class ModelConfig(_Section):
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    hidden_size: int = Field(64, ge=1, le=8192)
    num_layers: int = Field(1, ge=1, le=16)
    bidirectional: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embed_size: Optional[int] = Field(
        None, ge=1, le=8192, description="Each row goes through a linear layer of this width and a ReLU before the "
        "recurrent layers, so that the cell reads features of a row rather than its raw pixels; null feeds the pixels in"
    )
    readout: Literal["last", "last_max"] = Field(
        "last", description="What the head reads: `last`, the final states; `last_max`, also each unit's largest "
        "output over the rows, so that a feature seen early need not be carried to the end"
    )
    forget_bias: Optional[float] = Field(
        None, description="LSTM only: the forget gates' bias at initialisation, so that early gradients reach back "
        "through the rows (1.0 in Jozefowicz et al., 2015); null keeps PyTorch's uniform initialisation"
    )
    frame: Union[int, Literal["auto", "whole"]] = Field(
        1, description="Read k consecutive steps as one step of k x features (an image read row by row is a pixel "
        "sequence in frames of 28): a long series takes k times fewer recurrent steps. auto: the train split's median "
        "length / 64, rounded up (1 for sequences of up to 64 steps); whole: the train split's longest length (at most "
        "1024), so that the recurrent layers read a series in one step, LSTM-FCN's 'dimension shuffle', while a "
        "branch with model.conv_branch_input: steps reads its steps; each fixed when the run starts")
    series_norm: Union[bool, Literal["both"]] = Field(
        False, description="Standardise each sequence by its own mean and std per channel over its valid steps, "
        "before the frames (after the data set's per-channel statistics): for series whose level or scale says "
        "nothing of their class. both: the values as the data set's statistics give them and each sequence's own "
        "standardised beside them (twice the features), for data where level tells some classes apart and shape "
        "others")
    frontend: Literal["none", "conv"] = Field(
        "none", description="conv: temporal convolution blocks (model.conv_*) read the steps (after the frames) and the "
        "recurrent layers read their output, each sequence only as far as it goes (DeepConvLSTM / CNN-LSTM)")
    conv_branch: bool = Field(
        False, description="An FCN branch beside the recurrent layers (the same blocks, then the mean over each "
        "sequence's valid steps), concatenated with their readout before the head (LSTM-FCN / MLSTM-FCN); "
        "model.conv_branch_input says what it reads")
    conv_branch_input: Literal["frames", "steps"] = Field(
        "frames", description="What the FCN branch reads. frames: the frames the recurrent layers read (cheap on long "
        "series). steps: every step, as FCN does, while the recurrent layers read frames: a shape shifted by one step "
        "looks the same to it, at the cost of convolutions over the whole length. Read only with model.conv_branch, as "
        "conv_norm and conv_excite are only with a convolution, so that a search space may draw them apart")
    readout_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the recurrent layers' readout before the head, in training "
        "(LSTM-FCN's 0.8): with a branch beside them, the head cannot lean on a readout that memorised the train split")
    conv_channels: tuple[int, ...] = Field(
        (128, 256, 128), description="Output channels of each convolution block (FCN's 128-256-128)")
    conv_kernels: tuple[int, ...] = Field(
        (8, 5, 3), description="Kernel width of each block, in steps, one per model.conv_channels entry (FCN's 8-5-3)")
    conv_stride: int = Field(
        1, ge=1, le=64, description="The front-end's first block keeps one step in this many, each sequence's "
        "length with it: the learned counterpart of model.frame for long series")
    conv_excite: bool = Field(
        False, description="Squeeze-and-excitation after every block but the last, gated by the means over valid "
        "steps (MLSTM-FCN)")
    conv_norm: Literal["sample", "batch"] = Field(
        "sample", description="How each convolution block's output is standardised. sample: per sequence, over its "
        "channels and valid steps (group norm, one group). batch: each channel over the micro-batch's valid steps "
        "while training (FCN's BatchNorm) and over running statistics in evaluation; a micro-batch holds the same "
        "sequences at any world size, and the running statistics take each micro-batch in the global batch's order, "
        "so runs stay the same at any world size with the same train.batch_size")

    @field_validator("frame")
    @classmethod
    def _frame_range(cls, value: Any) -> Any:
        if value not in ("auto", "whole") and not 1 <= value <= MAX_FRAME:
            raise ValueError(f"model.frame must be auto, whole or a number of steps from 1 to {MAX_FRAME}, not {value}")
        return value

    @model_validator(mode="after")
    def _conv_shape(self) -> "ModelConfig":
        channels, kernels = self.conv_channels, self.conv_kernels
        if not 1 <= len(channels) <= 8 or len(kernels) != len(channels):
            raise ValueError(f"model.conv_channels and model.conv_kernels must list the same number of blocks (1 to 8), "
                             f"not {len(channels)} channels and {len(kernels)} kernels: give one kernel per block")
        if not all(1 <= c <= 8192 for c in channels) or not all(1 <= k <= 1024 for k in kernels):
            raise ValueError(f"model.conv_channels must lie in 1..8192 and model.conv_kernels in 1..1024, "
                             f"not {list(channels)} and {list(kernels)}")
        if self.conv_stride > 1 and self.frontend != "conv":
            raise ValueError(f"model.conv_stride {self.conv_stride} strides the convolutional front-end, and "
                             "model.frontend is none: set model.frontend: conv, or remove model.conv_stride")
        return self

    @model_validator(mode="after")
    def _forget_bias_is_lstm(self) -> "ModelConfig":
        if self.forget_bias is not None and self.cell != "lstm":
            raise ValueError(f"model.forget_bias applies to LSTM cells only, and model.cell is {self.cell!r}: "
                             "remove model.forget_bias or set model.cell: lstm")
        return self


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool = Field(
        False, description="Fused optimizer kernels; with them a non-finite update is skipped on the device, so "
        "the step never waits for the host (the GPU recipe's choice)"
    )


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(_Section):
    batch_size: int = Field(64, ge=1, description="Micro-batch: samples per forward and backward pass of one process")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="Samples per optimizer step over all processes: batch_size x processes x accumulation "
        "steps. It fixes the run's order and schedule at any world size; unset, it is batch_size x processes"
    )
    epochs: Optional[int] = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides epochs when set")
    min_steps: Optional[int] = Field(
        None, ge=1, description="With epochs: at least this many optimizer steps, so that a small data set (one step "
        "an epoch) still trains long enough; a large one is not affected")
    stop_at_step: Optional[int] = Field(
        None, ge=1, description="Checkpoint and exit after this step, schedule unfinished (time-boxed jobs); --resume auto goes on"
    )
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else the CPU; cpu: the CPU even on a GPU machine"
    )
    gpu_rehearsal: bool = Field(
        False, description="Let several ranks share a GPU over gloo, to rehearse a multi-GPU job on one GPU (slow; not for real training)"
    )
    grad_clip: Optional[float] = Field(None, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Training loss only; eval reports plain cross-entropy")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: each class's training loss weighted by the inverse of its frequency in the "
        "train split (the manifest's class_counts: N / (classes x count)); eval reports plain cross-entropy")
    exact_reduction: bool = Field(
        False, description="Add every micro-batch's gradient in the global batch's order on every rank (an all-gather "
        "instead of DDP's all-reduce): the same weights bit for bit at any world size, for W x the gradient traffic "
        "(pipeline/training/exact_reduction.py). Not with fp16, whose loss scaling is per rank")
    ema: Optional[EmaConfig] = Field(None, description="Weight averaging: evaluated beside the weights, and what "
                                     "model/ holds")
    log_every_steps: int = Field(10, ge=1)
    dist_timeout_s: int = Field(900, ge=30, description="Process-group timeout; must exceed rank-zero eval time")
    peer_timeout_s: Optional[int] = Field(
        30, ge=2, description="A rank whose heartbeat (a thread of its own, beating whatever training does) stops "
        "this long is lost: every other rank ends naming it, long before dist_timeout_s; null turns the watch off"
    )
    lease_timeout_s: int = Field(
        300, ge=5, description="output_dir's lease is stale, and taken over, after this long without a heartbeat"
    )
    progress_bar: bool = True
    cpu_threads: Optional[int] = Field(
        None, ge=1, description="CPU threads per process (torch's OpenMP pool); null: OMP_NUM_THREADS when set, else the "
        "CPUs the process may use (affinity, cgroup quota) / the processes of its node (pipeline/distributed/cpu_threads.py)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False.
        return "no" if value is False else value

    @model_validator(mode="after")
    def _exact_without_fp16(self) -> "TrainConfig":
        if self.exact_reduction and self.mixed_precision == "fp16":
            raise ValueError("train.exact_reduction adds gradients across ranks itself, and fp16 scales each rank's loss "
                             "on its own: use mixed_precision bf16 or no with it, or set exact_reduction false")
        return self


class EvalConfig(_Section):
    every_steps: int = Field(50, ge=1)
    every_epochs: Optional[int] = Field(
        None, ge=1, description="Evaluate at the end of every N-th epoch instead of every_steps: a config for data sets "
        "of any size (steps per epoch differ by orders of magnitude)")
    split: str = Field("val", description="The split evaluated every every_steps, for choosing recipes; the final "
                       "model is scored once on test at the end. none: no evaluation during training, for a final model "
                       "trained on every labelled case (prepare_data.py --val-size 0), whose test is then read once")
    batch_size: int = Field(1000, ge=1)
    keep_best: bool = Field(
        False, description="The model kept (model/, scored on test) is the evaluation with the best accuracy, ties to "
        "the lower loss, not the last; its weights travel in every checkpoint, so a resumed run keeps the same")

    score_test: bool = Field(
        True, description="Score the finished run once on the test split. false: the test split is never read (a tuning "
        "trial: choices are made on validation, and the test is read once, of the winner)")
    patience: Optional[int] = Field(
        None, ge=1, description="Early stopping: the run ends, finished and scored on test, once this many evaluations "
        "in a row bring no better one (eval.keep_best's rule, which it needs: the model kept is the best's)")

    @model_validator(mode="after")
    def _patience_keeps_best(self) -> "EvalConfig":
        if self.patience is not None and not self.keep_best:
            raise ValueError(f"eval.patience {self.patience} stops a run that has stopped improving, and eval.keep_best "
                             "is off: the model kept would be the last, trained past its best. Set eval.keep_best: "
                             "true, or remove eval.patience")
        return self

    @model_validator(mode="after")
    def _keep_best_on_validation(self) -> "EvalConfig":
        why = {"none": "the run evaluates nothing to choose by",
               "test": "the test score would be of weights chosen on test"}.get(self.split) if self.keep_best else None
        if why:
            raise ValueError(f"eval.keep_best chooses the weights on eval.split, and eval.split is {self.split}: {why}. "
                             "Evaluate on a validation split (eval.split: val; prepare_data.py --val-size) or remove "
                             "eval.keep_best")
        return self

    @model_validator(mode="after")
    def _some_figure(self) -> "EvalConfig":
        if self.split == "none" and not self.score_test:
            raise ValueError("eval.split is none, so the run evaluates nothing while it trains, and eval.score_test is "
                             "false, so it reads no test at the end: it would end without any figure. Evaluate on a "
                             "validation split (eval.split: val), or let it score test (eval.score_test: true)")
        return self

    def never_within(self, steps: int, named: str) -> str | None:
        """The one rule for eval.every_steps against a run's length (`named`: how the user gave it), or None.
        eval.every_epochs replaces every_steps: its value then says nothing about when the run evaluates."""
        if self.split != "none" and self.every_epochs is None and self.every_steps > steps:
            return f"eval.every_steps ({self.every_steps}) is larger than {named}: the run would never evaluate before the end"
        return None


class CheckpointConfig(_Section):
    every_steps: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)


class WandbConfig(_Section):
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="Default: online when WANDB_API_KEY is set, offline otherwise"
    )
    project: str = "lstm-pipeline"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    notes: Optional[str] = None
    job_type: str = "train"
    media_every_evals: int = Field(1, ge=1)
    log_model: Literal["off", "best", "all"] = "all"

    @field_validator("log_model", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False (log_model: off in a file, or wandb.log_model=off).
        return "off" if value is False else value


class Config(_Section):
    output_dir: str
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.train.max_steps is None and self.train.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.model.dropout > 0 and self.model.num_layers == 1:
            raise ValueError(
                "model.dropout applies between recurrent layers; with model.num_layers 1 it does nothing"
            )
        if self.train.max_steps is not None:  # a run of epochs is checked once its length is known (trainer.py)
            problem = self.eval.never_within(self.train.max_steps, f"train.max_steps ({self.train.max_steps})")
            if problem:
                raise ValueError(problem)
        if self.data.placement == "device" and self.data.on_error == "skip":
            raise ValueError(
                "data.placement device reads and checks every shard before training, so there is nothing to skip later; "
                "data.on_error skip needs data.placement stream (or auto)"
            )
        if self.train.global_batch_size is not None and self.train.global_batch_size % self.train.batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of train.batch_size "
                f"({self.train.batch_size}), the micro-batch each process computes at a time"
            )
        if self.train.peer_timeout_s is not None and self.train.peer_timeout_s >= self.train.dist_timeout_s:
            raise ValueError(
                f"train.peer_timeout_s ({self.train.peer_timeout_s}) must be shorter than train.dist_timeout_s "
                f"({self.train.dist_timeout_s}), or a silent peer is found only after the collective gave up"
            )
        low, high = self.data.erase_area
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"data.erase_area ({low}, {high}) must be fractions of the image with 0 < low <= high < 1")
        if self.data.base_url and self.data.base_url.startswith("pipe:") and not self.data.allow_pipe:
            raise ValueError("data.base_url is a pipe: URL, which runs shell commands; set data.allow_pipe: true")
        return self

    @model_validator(mode="after")
    def _best_model_needs_evaluations(self) -> "Config":
        if self.wandb.log_model == "best" and self.eval.split == "none":
            raise ValueError("wandb.log_model best uploads the checkpoints of the best evaluation, and eval.split is "
                             "none: the run evaluates nothing, so none would be uploaded. Use wandb.log_model all (or "
                             "off), or evaluate on a validation split (eval.split: val)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as it is written (config.yaml, checkpoints, W&B): credentials in URLs masked
        (data.base_url https://user:token@host/... -> https://***@host/...). Reading uses the fields."""
        return _masked(self.model_dump(mode="json"))


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last one silently,
    so a recipe with `lr:` twice trains with whichever comes later; the YAML spec calls keys unique.
    Every user YAML config is read through `load_yaml`, so the rule holds wherever one is loaded."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` and keys after it that override it are meant
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping, at lines {first} and {line} (YAML "
                    "would keep the second silently); keep the one you mean", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """A user's YAML (a config file, an override's value), with duplicate keys refused (UniqueKeyLoader)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(mask_url(f"command-line override '{item}' is not of the form key.sub=value (for example "
                                   "train.max_steps=100)"))
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(mask_url(f"command-line override '{item}' has an empty key path"))
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(mask_url(f"command-line override '{item}': '{part}' is a value, not a section"))
            node = child
        node[path[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "value_error" and not path:
            # A cross-check of several keys: its message names them itself.
            lines.append(msg.removeprefix("Value error, "))
            continue
        path = path or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/*.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        if "input" in e and e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{path}: {msg}")
    return mask_url(f"invalid config {source}: " + "; ".join(lines))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one of configs/*.yaml with --config")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; start from one of configs/*.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, train:, ...), not a {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    source = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
