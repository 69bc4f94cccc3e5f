"""Nothing a user made is lost: train.py writes only into a new or empty output_dir, or a run of this
pipeline that it continues (--resume auto) or replaces (--overwrite). Every refusal is exit 2, one
paragraph, and leaves the directory byte for byte as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, accelerate_cmd, read_jsonl, run_py, train_args, train_run

from pipeline.training import rundir

MARKER = "run.json"  # what the trainer writes first into every output_dir (pipeline/training/rundir.py)
RUN = ("wandb.mode=disabled", "eval.every_steps=10", "checkpoint.every_steps=10", "train.log_every_steps=10")


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None), so that one created or changed shows."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    return proc.stderr


def users_files(directory: Path) -> Path:
    """What a user may keep in a directory of their own, with the names a run writes."""
    (directory / "plots").mkdir(parents=True)
    (directory / "plots" / "loss.png").write_bytes(b"my plot")
    (directory / "config.yaml").write_text("my: config\n")
    (directory / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (directory / "summary.json").write_text('{"completed": true, "steps": 5}\n')
    return directory


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_shards) -> Path:
    """A run of 20 steps that completed (checkpoints at 10 and 20); tests copy it before using it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_run(out, fashion_shards, *RUN, "train.max_steps=20")
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_what_counts_as_a_run(tmp_path):
    """A user's config.yaml, metrics.jsonl, summary.json, plots/ (or a run.json of another tool) are no run;
    the marker is, and so are the traces of runs before it (a checkpoint, the lease)."""
    assert rundir.inspect(tmp_path / "missing").kind == "empty"
    (tmp_path / "volume" / "lost+found").mkdir(parents=True)  # a fresh ext4 volume mounted as output_dir
    assert rundir.inspect(tmp_path / "volume").kind == "empty"
    assert rundir.inspect(users_files(tmp_path / "user")).kind == "foreign"
    (tmp_path / "user" / rundir.RUN_MARKER).write_text('{"kind": "some other tool"}')
    assert rundir.inspect(tmp_path / "user").kind == "foreign"
    for name, make in [("marked", lambda d: (d / rundir.RUN_MARKER).write_text(json.dumps({"kind": rundir.RUN_KIND}))),
                       ("leased", lambda d: (d / "lease.json").write_text("{}")),
                       ("checkpointed", lambda d: (d / "checkpoints" / "step-00000010").mkdir(parents=True)
                        or (d / "checkpoints" / "step-00000010" / "state.json").write_text("{}"))]:
        directory = tmp_path / name
        directory.mkdir()
        make(directory)
        assert rundir.inspect(directory).kind == "run", name
    found = rundir.inspect(tmp_path / "checkpointed")
    assert found.reached == 10 and not found.finished and found.has_results
    assert not rundir.inspect(tmp_path / "leased").has_results  # a run that recorded nothing: trained over


@pytest.mark.slow
def test_a_users_directory_is_refused_whatever_the_flags(tmp_path, fashion_shards):
    out = users_files(tmp_path / "mine")
    before = snapshot(out)
    for flags in ((), ("--resume", "auto"), ("--overwrite",)):
        proc = train_cli(out, fashion_shards, "train.max_steps=10", flags=flags)
        refused(proc, f"output_dir {out} is not empty and holds no run of this pipeline (config.yaml, metrics.jsonl, "
                      "plots, summary.json", "Choose a new or empty output_dir")
        assert snapshot(out) == before, flags


def train_cli(out: Path, shards: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """launch/train.py as a user runs it, with any of its flags (--overwrite, --resume)."""
    return run_py(*train_args(out, shards, *RUN, *overrides), *flags)


@pytest.mark.slow
@pytest.mark.parametrize("marker", [True, False], ids=["run", "run-of-the-previous-version"])
def test_a_finished_run_is_not_restarted_without_resume(finished, tmp_path, fashion_shards, marker):
    out = copy_of(finished, tmp_path)
    if not marker:  # written before run.json: known by its checkpoints
        (out / MARKER).unlink(missing_ok=True)
    before = snapshot(out)
    proc = train_run(out, fashion_shards, *RUN, "train.max_steps=20", check=False)
    refused(proc, f"output_dir {out} holds a finished run of 20 steps (test accuracy", "--resume auto", "--overwrite",
            "choose another output_dir")
    assert snapshot(out) == before
    if marker:
        assert json.loads((out / MARKER).read_text())["kind"] == "lstm-pipeline training run"


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run_and_nothing_else(finished, tmp_path, fashion_shards):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    proc = train_cli(out, fashion_shards, "train.max_steps=10", flags=("--overwrite",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--overwrite: removed the earlier run's checkpoints, metrics.jsonl, summary.json, model, plots" in proc.stdout
    assert (out / "notes.txt").read_text() == "mine" and (out / MARKER).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000010"], "none of the old run's"
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "train/loss" in e] == [10]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["completed"] and not summary["resumed"]
    both = train_cli(out, fashion_shards, "train.max_steps=10", flags=("--overwrite", "--resume", "auto"))
    refused(both, "--overwrite replaces the run in output_dir", "give one of them")


@pytest.mark.slow
def test_an_unfinished_run_is_refused_without_resume_and_continued_with_it(tmp_path, fashion_shards):
    out = tmp_path / "run"
    train_run(out, fashion_shards, *RUN, "train.max_steps=20", "train.stop_at_step=10")
    before = snapshot(out)
    proc = train_run(out, fashion_shards, *RUN, "train.max_steps=20", check=False)
    refused(proc, f"output_dir {out} holds an unfinished run (its newest checkpoint is step 10)",
            "run the same command with --resume auto", "--overwrite")
    assert snapshot(out) == before
    train_run(out, fashion_shards, *RUN, "train.max_steps=20", resume="auto")
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "train/loss" in e] == [10, 20]
    assert json.loads((out / "summary.json").read_text())["completed"]


@pytest.mark.slow
def test_resume_auto_with_fewer_steps_than_a_finished_run_is_refused(finished, tmp_path, fashion_shards):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    proc = train_run(out, fashion_shards, *RUN, "train.max_steps=10", resume="auto", check=False)
    stderr = refused(proc, f"output_dir {out} holds a finished run that reached step 20, and train.max_steps=10 "
                           "ends before it", "raise train.max_steps above 20", "--overwrite", "another output_dir")
    assert "continue with --resume auto" not in stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_auto_at_the_end_of_a_finished_run_changes_nothing(finished, tmp_path, fashion_shards):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    proc = train_run(out, fashion_shards, *RUN, "train.max_steps=20", resume="auto")
    assert f"output_dir {out} holds a finished run of 20 steps (test accuracy" in proc.stdout
    assert "nothing to train, nothing changed" in proc.stdout
    assert snapshot(out) == before, "summary.json, metrics.jsonl (one test score) and the model stay as they were"


@pytest.mark.slow
def test_two_ranks_refuse_a_users_directory_alike_and_say_it_once(tmp_path, fashion_shards):
    out = users_files(tmp_path / "mine")
    before = snapshot(out)
    proc = subprocess.run([*accelerate_cmd(2), *train_args(out, fashion_shards, *RUN, "train.max_steps=10")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # accelerate launch's own code whatever its ranks'
    assert proc.stderr.count("holds no run of this pipeline") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]  # every rank ended with the refusal's code
    assert snapshot(out) == before
