"""W&B tracker: real wandb in offline mode, read back from the `.wandb` log it would sync.

No wandb mocks: each scenario drives the Tracker the way the trainer does, finishes it, and
reads the transaction log with tests/wandb_records.py.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, run_py
from safetensors.numpy import save_file
from wandb_records import RunLog, find_logs, parse_finished

from pipeline.config import Config
from pipeline.tracking import STEP_KEY, Tracker, session
from pipeline.tracking.secrets import REDACTED, scrub, secret_values

# wandb checks that the part after a "name-" prefix has 40+ characters before using a key.
FAKE_KEY = "fakekey-" + secrets.token_hex(20)
CLASS_NAMES = [f"class_{i}" for i in range(10)]
# Every WANDB_* variable that would make a test depend on the machine it runs on.
_WANDB_ENV = (
    "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_RUN_ID",
    "WANDB_RESUME", "WANDB_NAME", "WANDB_TAGS", "WANDB_NOTES", "WANDB_JOB_TYPE", "WANDB_BASE_URL",
    "WANDB_INIT_TIMEOUT", "WANDB_SILENT", "WANDB_CONSOLE",
)


def isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Point every directory wandb (or anything else) writes to at root; return WANDB_DIR."""
    for name in _WANDB_ENV:
        mp.delenv(name, raising=False)
    # Artifacts stage under WANDB_DATA_DIR, credentials and settings under WANDB_CONFIG_DIR / HOME.
    for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("HOME", "home")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(name, str(root / sub))
    mp.setenv("WANDB_DIR", str(root / "wandb_dir"))
    return root / "wandb_dir"


@pytest.fixture
def wandb_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate_wandb(monkeypatch, tmp_path)
    return tmp_path


def make_config(root: Path, **wandb: Any) -> Config:
    return Config.model_validate({"output_dir": str(root / "out"), "data": {"dir": str(root / "data")}, "wandb": wandb})


def run_config(cfg: Config, **extra: Any) -> dict[str, Any]:
    """What the trainer passes: the resolved config plus facts of the launch."""
    facts = {"world_size": 2, "distributed_type": "MULTI_GPU", "mixed_precision": "no", "dataset_fingerprint": "ab" * 32}
    return {**cfg.to_dict(), **facts, **extra}


def checkpoint_dir(root: Path, step: int) -> Path:
    directory = root / "out" / "checkpoints" / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": np.full((4, 28), step, dtype=np.float32)}, str(directory / "model.safetensors"))
    return directory


def eval_payload(rng: np.random.Generator, k: int = 6) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    confusion = rng.integers(0, 30, size=(10, 10)).astype(np.int64)
    images = rng.integers(0, 256, size=(k, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=k)
    preds = (labels + 1) % 10  # misclassified by construction
    return confusion, (images, preds, labels)


def eval_metrics(step: int) -> dict[str, float]:
    accuracy = 0.5 + step / 1000  # rises, so max == last
    metrics = {"eval/accuracy": accuracy, "eval/loss": 1.0 / step}
    metrics.update({f"eval/acc_{c}": accuracy for c in range(10)})
    return metrics


def drive(tracker: Tracker, root: Path, steps: range, eval_every: int, ckpt_every: int, best_at: set[int], final: bool = False) -> dict[int, np.ndarray]:
    """The trainer's call pattern; returns the confusion matrix logged at each eval step."""
    rng = np.random.default_rng(steps.start)
    confusions = {}
    for step in steps:
        tracker.log_train(step, {"step": step, "train/loss": 1.0 / step, "train/lr": 0.01, "train/grad_norm": 1.5, "train/samples_per_s": 900.0, "train/epoch": step / 100, "train/skipped_steps": 0})
        if step % eval_every == 0:
            confusion, examples = eval_payload(rng)
            confusions[step] = confusion
            is_final = final and step == steps[-1]
            tracker.log_eval(step, eval_metrics(step), confusion, CLASS_NAMES, examples, final=is_final)
        if step % ckpt_every == 0:
            tracker.log_checkpoint(checkpoint_dir(root, step), step, eval_metrics(step)["eval/accuracy"], step in best_at)
    return confusions


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


# --------------------------------------------------------------------------------------------
# One simulated job plus its resumption, shared by the assertions below (wandb startup costs ~1 s).


@dataclass
class Simulated:
    root: Path
    first: RunLog
    resumed: RunLog
    first_id: str | None
    resumed_id: str | None
    confusions: dict[int, np.ndarray]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        isolate_wandb(mp, root)
        # Present as in a real cluster pod, where it must not leak into anything written.
        mp.setenv("WANDB_API_KEY", FAKE_KEY)
        cfg = make_config(
            root, mode="offline", project="lstm-tests", name="sim-run", group="sim-group", tags=["ci", "lstm"],
            notes="simulated job", job_type="train", media_every_evals=2, log_model="all",
        )
        # A secret that slipped into a config value (a URL with credentials) must be scrubbed.
        config = run_config(cfg, data_url=f"https://user:{FAKE_KEY}@example.invalid/shards", hf_token="tok-12345678")
        tracker = Tracker.create(cfg.wandb, root / "out", True, config, None)
        confusions = drive(tracker, root, range(10, 201, 10), eval_every=50, ckpt_every=100, best_at={100})
        tracker.finish(exit_code=0)
        tracker.finish(exit_code=0)  # the trainer's finally may call it again

        # wandb names run dirs by start second; a real restart is never this quick.
        time.sleep(1.1)
        resumed = Tracker.create(cfg.wandb, root / "out", True, config, resume_run_id=tracker.run_id)
        # Evals at 250, 300, 350: the resumed tracker's 1st, 2nd and 3rd, so 350 is final but not due for media.
        confusions.update(drive(resumed, root, range(210, 351, 10), eval_every=50, ckpt_every=100, best_at=set(), final=True))
        resumed.finish(exit_code=0)
    logs = [parse_finished(p) for p in find_logs(root)]
    assert len(logs) == 2, [log.path for log in logs]
    return Simulated(root, logs[0], logs[1], tracker.run_id, resumed.run_id, confusions)


def test_run_metadata(simulated: Simulated) -> None:
    run = simulated.first.run
    assert run.run_id == simulated.first_id
    assert (run.project, run.display_name, run.run_group, run.job_type, run.notes) == (
        "lstm-tests", "sim-run", "sim-group", "train", "simulated job",
    )
    assert list(run.tags) == ["ci", "lstm"]


def test_config_has_resolved_config_launch_facts_and_provenance(simulated: Simulated) -> None:
    config = simulated.first.config
    assert config["wandb"]["media_every_evals"] == 2
    assert config["eval"]["every_steps"] == 50
    assert (config["world_size"], config["distributed_type"], config["dataset_fingerprint"]) == (2, "MULTI_GPU", "ab" * 32)
    versions = config["provenance"]["versions"]
    assert {"python", "torch", "accelerate", "wandb", "numpy"} <= versions.keys()
    git = config["provenance"]["git"]
    assert isinstance(git["commit"], str) and len(git["commit"]) == 40 and "dirty" in git  # the tests run in a checkout


def test_step_metric_and_summaries_are_defined(simulated: Simulated) -> None:
    metrics = {m.name or m.glob_name: m for m in simulated.first.metrics}
    assert metrics["*"].step_metric == STEP_KEY
    assert metrics["eval/accuracy"].summary.max and metrics["eval/loss"].summary.min


def test_train_and_eval_history_rows_at_global_steps(simulated: Simulated) -> None:
    first = simulated.first
    assert [s for s, _ in first.column("train/loss")] == list(range(10, 201, 10))
    assert first.column("eval/accuracy") == [(s, pytest.approx(eval_metrics(s)["eval/accuracy"])) for s in (50, 100, 150, 200)]
    assert [s for s, _ in first.column("eval/acc_9")] == [50, 100, 150, 200]
    row = first.rows_with("train/grad_norm")[0]
    assert {"train/lr", "train/samples_per_s", "train/epoch", "train/skipped_steps"} <= row.keys()
    # The trainer's own "step" field is the x axis already, not a metric.
    assert not any("step" in r for r in first.history)


def test_summary_keeps_best_accuracy_and_lowest_loss(simulated: Simulated) -> None:
    summary = simulated.first.summary
    assert summary["eval/accuracy"]["max"] == pytest.approx(eval_metrics(200)["eval/accuracy"])
    assert summary["eval/loss"]["min"] == pytest.approx(1 / 200)
    assert summary[STEP_KEY] == 200


def test_media_every_second_eval_with_class_names(simulated: Simulated) -> None:
    first = simulated.first
    # media_every_evals=2: the 2nd and 4th evaluations (steps 100, 200) carry media.
    matrices = first.column("eval/confusion_matrix_table")
    assert [s for s, _ in matrices] == [100, 200]
    for step, descriptor in matrices:
        table = first.read_table(descriptor)
        assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
        counts = {(a, p): n for a, p, n in table["data"]}
        expected = simulated.confusions[step]
        assert counts[("class_3", "class_7")] == expected[3, 7]
        assert sum(counts.values()) == expected.sum()
    examples = first.column("eval/misclassified")
    assert [s for s, _ in examples] == [100, 200]
    table = first.read_table(examples[0][1])
    assert table["columns"] == ["image", "predicted", "true"] and len(table["data"]) == 6
    assert all(pred != true for _, pred, true in table["data"])
    assert first.config["_wandb"]["visualize"]["eval/confusion_matrix"]["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"


def test_model_artifacts_with_aliases_and_metadata(simulated: Simulated) -> None:
    models = [a for a in simulated.first.artifacts if a.type == "model"]
    assert [a.name for a in models] == [f"model-{simulated.first_id}"] * 2
    assert set(models[0].aliases) == {"latest", "best", "step-100"}
    assert set(models[1].aliases) == {"latest", "step-200"}
    meta = json.loads(models[0].metadata)
    assert meta["step"] == 100 and meta["accuracy"] == pytest.approx(eval_metrics(100)["eval/accuracy"])
    assert [c.path for c in models[0].manifest.contents] == ["model.safetensors"]


def test_run_finished_with_exit_code_zero(simulated: Simulated) -> None:
    for log in (simulated.first, simulated.resumed):
        assert log.exit is not None and log.exit.exit_code == 0
        assert not log.preempting


def test_resume_continues_the_same_run_upwards(simulated: Simulated) -> None:
    resumed = simulated.resumed
    assert simulated.resumed_id == simulated.first_id == resumed.run_id
    steps = [s for s, _ in resumed.column("train/loss")]
    assert steps == list(range(210, 351, 10))
    assert [s for s, _ in resumed.column("eval/accuracy")] == [250, 300, 350]
    # media_every_evals=2 counts from the resumed tracker's start: its 2nd eval (300) has media,
    # and 350, its 3rd, has media only because it is the final evaluation.
    assert [s for s, _ in resumed.column("eval/confusion_matrix_table")] == [300, 350]
    assert [set(a.aliases) for a in resumed.artifacts if a.type == "model"] == [{"latest", "step-300"}]


def test_api_key_and_secrets_written_nowhere(simulated: Simulated) -> None:
    assert files_containing(simulated.root, FAKE_KEY) == []
    assert files_containing(simulated.root, "tok-12345678") == []
    config = simulated.first.config
    assert config["data_url"] == f"https://user:{REDACTED}@example.invalid/shards"
    assert config["hf_token"] == REDACTED


# --------------------------------------------------------------------------------------------
# Modes and failures: each gets its own directories.


def test_disabled_mode_writes_nothing(wandb_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(wandb_root.rglob("*"))
    cfg = make_config(wandb_root, mode="disabled")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    assert not tracker.active and tracker.run_id is None
    drive(tracker, wandb_root / "elsewhere", range(10, 101, 10), eval_every=50, ckpt_every=1000, best_at=set())
    tracker.finish()
    assert sorted(wandb_root.rglob("*")) == before
    assert "tracking disabled (wandb.mode=disabled in the config)" in capsys.readouterr().out


def test_non_main_process_gets_a_silent_noop(wandb_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(wandb_root, mode="offline")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", False, run_config(cfg), None)
    tracker.log_train(10, {"train/loss": 1.0})
    tracker.finish()
    assert not tracker.active and tracker.run_id is None
    assert find_logs(wandb_root) == [] and capsys.readouterr().out == ""


def test_unwritable_wandb_dir_warns_and_training_goes_on(wandb_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A path under a regular file cannot be created even by root (tests may run as root).
    blocker = wandb_root / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))
    cfg = make_config(wandb_root, mode="offline")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    assert not tracker.active
    drive(tracker, wandb_root, range(10, 101, 10), eval_every=50, ckpt_every=100, best_at={100})
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "W&B tracking is off" in err and str(blocker) in err


def test_failure_mid_run_warns_once_then_noop_and_run_still_finishes(wandb_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Artifact staging (tables and models) lives under WANDB_DATA_DIR; making it a file stands
    # in for a full disk: the first eval's media fail at step 50.
    staging = wandb_root / "data-is-a-file"
    staging.write_text("")
    monkeypatch.setenv("WANDB_DATA_DIR", str(staging))
    cfg = make_config(wandb_root, mode="offline", log_model="all")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    assert tracker.active
    drive(tracker, wandb_root, range(10, 201, 10), eval_every=50, ckpt_every=100, best_at={100})
    assert not tracker.active and tracker.run_id is not None  # the id still goes into checkpoints
    tracker.finish(exit_code=0)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "W&B logging evaluation failed" in err
    (log,) = [parse_finished(p) for p in find_logs(wandb_root)]
    # Rows up to the failure were kept; nothing after it was logged.
    assert max(s for s, _ in log.column("train/loss")) == 50
    assert log.exit is not None and log.exit.exit_code == 0


def test_log_model_best_and_off(wandb_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(wandb_root, mode=None, log_model="best")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    drive(tracker, wandb_root, range(10, 301, 10), eval_every=100, ckpt_every=100, best_at={100, 300})
    tracker.finish(exit_code=3, preempted=True)
    out = capsys.readouterr().out
    # No key and no configured mode: offline, and one line says why.
    assert "offline (WANDB_API_KEY is not set" in out and "wandb sync" in out
    (log,) = [parse_finished(p) for p in find_logs(wandb_root)]
    models = [a for a in log.artifacts if a.type == "model"]
    assert [json_step(a) for a in models] == [100, 300]
    assert log.exit.exit_code == 3 and log.preempting



def test_log_model_off_logs_no_model_artifact(wandb_root: Path) -> None:
    cfg = make_config(wandb_root, mode="offline", log_model="off")
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    drive(tracker, wandb_root, range(10, 101, 10), eval_every=50, ckpt_every=50, best_at={50, 100})
    tracker.finish(exit_code=0)
    (log,) = [parse_finished(p) for p in find_logs(wandb_root)]
    assert [s for s, _ in log.column("eval/accuracy")] == [50, 100], "the run itself was logged"
    assert not [a for a in log.artifacts if a.type == "model"]


def json_step(artifact: Any) -> int:
    return json.loads(artifact.metadata)["step"]


def test_online_without_network_falls_back_to_noop(wandb_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    cfg = make_config(wandb_root)  # mode None + key -> online
    started = time.monotonic()
    tracker = Tracker.create(cfg.wandb, wandb_root / "out", True, run_config(cfg), None)
    assert time.monotonic() - started < 30
    assert not tracker.active
    tracker.log_train(10, {"train/loss": 1.0})
    tracker.finish()
    captured = capsys.readouterr()
    assert captured.err.count("warning:") == 1
    assert "W&B tracking is off for this job: starting the online run" in captured.err
    assert FAKE_KEY not in captured.out + captured.err
    assert files_containing(wandb_root, FAKE_KEY) == []


# --------------------------------------------------------------------------------------------
# Pure decisions: no wandb run needed.


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        (None, {}, "offline"),
        (None, {"WANDB_API_KEY": FAKE_KEY}, "online"),
        ("offline", {"WANDB_API_KEY": FAKE_KEY}, "offline"),
        ("disabled", {"WANDB_API_KEY": FAKE_KEY}, "disabled"),
        (None, {"WANDB_MODE": "dryrun", "WANDB_API_KEY": FAKE_KEY}, "offline"),
        (None, {"WANDB_MODE": "disabled"}, "disabled"),
    ],
)
def test_resolve_mode(configured: str | None, env: dict[str, str], expected: str) -> None:
    choice = session.resolve_mode(configured, env)
    assert choice.mode == expected
    assert FAKE_KEY not in choice.reason


def test_group_and_project_fall_back_to_cluster_env(tmp_path: Path) -> None:
    env = {"WANDB_RUN_GROUP": "job-abc", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team"}
    defaults = make_config(tmp_path).wandb
    kwargs = session.init_kwargs(defaults, "offline", tmp_path, {}, None, env)
    assert (kwargs["group"], kwargs["project"], kwargs["entity"]) == ("job-abc", "from-env", "team")
    assert "id" not in kwargs and "resume" not in kwargs
    explicit = make_config(tmp_path, group="g", project="p", entity="e").wandb
    kwargs = session.init_kwargs(explicit, "offline", tmp_path, {}, "run123", env)
    assert (kwargs["group"], kwargs["project"], kwargs["entity"]) == ("g", "p", "e")
    assert (kwargs["id"], kwargs["resume"]) == ("run123", "allow")


def test_init_and_finish_timeouts_are_bounded(tmp_path: Path) -> None:
    cfg = make_config(tmp_path).wandb
    settings = session.init_kwargs(cfg, "online", tmp_path, {}, None, {})["settings"]
    assert (settings.init_timeout, settings.finish_timeout) == (session.DEFAULT_INIT_TIMEOUT_S, session.DEFAULT_FINISH_TIMEOUT_S)
    settings = session.init_kwargs(cfg, "online", tmp_path, {}, None, {"WANDB_INIT_TIMEOUT": "7", "WANDB_FINISH_TIMEOUT": "9"})["settings"]
    assert (settings.init_timeout, settings.finish_timeout) == (7, 9)
    with pytest.raises(ValueError, match="WANDB_INIT_TIMEOUT='soon' is not a number"):
        session.init_kwargs(cfg, "online", tmp_path, {}, None, {"WANDB_INIT_TIMEOUT": "soon"})


def test_scrub_redacts_secret_values_and_names() -> None:
    env = {"WANDB_API_KEY": FAKE_KEY, "MY_PASSWORD": "hunter2-long", "SHORT_TOKEN": "1", "PATH": "/usr/bin"}
    found = secret_values(env)
    assert FAKE_KEY in found and "1" not in found and "/usr/bin" not in found
    value = {"url": f"x{FAKE_KEY}y", "nested": [{"api_key": "abc"}, "hunter2-long"], "steps": 1, "token": None}
    assert scrub(value, found) == {"url": f"x{REDACTED}y", "nested": [{"api_key": REDACTED}, REDACTED], "steps": 1, "token": None}


# --------------------------------------------------------------------------------------------
# End to end: the real trainer, real data, wandb offline.


def train_args(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "launch/train.py", "--config", "configs/cpu_test.yaml", f"data.dir={shards}", f"output_dir={out}", "train.device=cpu",
        "train.max_steps=100", "eval.every_steps=50", "checkpoint.every_steps=50", "wandb.mode=offline",
        "train.progress_bar=false", *overrides,
    ]


@pytest.fixture
def e2e_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # No WANDB_DIR: runs must land in output_dir/wandb, next to the checkpoints they describe.
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_SILENT", raising=False)


@pytest.mark.slow
def test_e2e_single_process_run_is_tracked(fashion_shards: Path, tmp_path: Path, e2e_env: None) -> None:
    out = tmp_path / "out"
    proc = run_py(*train_args(fashion_shards, out, "wandb.name=e2e", "wandb.tags=[e2e]"), check=True)
    (log,) = [parse_finished(p) for p in find_logs(tmp_path)]
    assert log.path.is_relative_to(out / "wandb")
    assert (log.run.display_name, list(log.run.tags), log.config["world_size"]) == ("e2e", ["e2e"], 1)
    assert [s for s, _ in log.column("eval/accuracy")] == [50, 100]
    assert [s for s, _ in log.column("train/loss")] == list(range(10, 101, 10))
    assert log.summary["eval/accuracy"]["max"] == max(v for _, v in log.column("eval/accuracy"))
    assert [s for s, _ in log.column("eval/confusion_matrix_table")] == [50, 100]
    models = [a for a in log.artifacts if a.type == "model"]
    assert [json_step(a) for a in models] == [50, 100] and "latest" in models[-1].aliases
    assert "model.safetensors" in [c.path for c in models[-1].manifest.contents]
    assert log.exit is not None and log.exit.exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert log.summary["eval/accuracy"]["last"] == pytest.approx(summary["final_eval_accuracy"])
    # One sink: every metrics.jsonl event is one W&B history row at the same step, same keys, same values.
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/best_accuracy", "time_s", "train/grad_norm"} <= {k for e in events for k in e}
    for event in events:
        rows = [row for row in log.history if row.get(STEP_KEY) == event["step"] and set(event) - {"step"} <= set(row)]
        assert any(all(row[k] == pytest.approx(v) for k, v in event.items() if k != "step") for row in rows), event
    # Exactly one line tells the user the mode and where the run is.
    assert proc.stdout.count("wandb: offline (wandb.mode=offline in the config)") == 1
    assert files_containing(tmp_path, FAKE_KEY) == []
    assert FAKE_KEY not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_e2e_resumed_job_appends_to_the_same_run(fashion_shards: Path, tmp_path: Path, e2e_env: None) -> None:
    out = tmp_path / "out"
    run_py(*train_args(fashion_shards, out, "train.stop_at_step=50"), check=True)
    time.sleep(1.1)  # wandb names run dirs by start second
    run_py(*train_args(fashion_shards, out), "--resume", "auto", check=True)
    first, resumed = [parse_finished(p) for p in find_logs(out / "wandb")]
    assert resumed.run_id == first.run_id  # the id came back from the checkpoint
    assert [s for s, _ in first.column("eval/accuracy")] == [50]
    assert [s for s, _ in resumed.column("eval/accuracy")] == [100]
    assert min(s for s, _ in resumed.column("train/loss")) > max(s for s, _ in first.column("train/loss"))


@pytest.mark.slow
def test_e2e_two_processes_make_exactly_one_run(fashion_shards: Path, tmp_path: Path, e2e_env: None) -> None:
    out = tmp_path / "out"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_py(*launch, *train_args(fashion_shards, out, "train.batch_size=64"), check=True)
    (log,) = [parse_finished(p) for p in find_logs(tmp_path)]
    assert log.config["world_size"] == 2 and log.config["distributed_type"] == "MULTI_CPU"
    assert [s for s, _ in log.column("eval/accuracy")] == [50, 100]
    assert proc.stdout.count("wandb: offline") == 1
    assert files_containing(tmp_path, FAKE_KEY) == []
