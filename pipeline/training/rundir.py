"""Whose output_dir this is, and whether this start may write there: nothing a user made is lost.

train.py writes config.yaml, resolved.yaml, metrics.jsonl, summary.json, model/, plots/ and checkpoints/ into its
output_dir. Before anything is written there (before the lease), the main process looks at what the
directory holds and decides once, for every rank:
- missing or empty, or a run that has recorded nothing yet: train;
- anything that is not a run of this pipeline (a user's own files): refused, whatever the flags;
- a run with results (checkpoints, metrics, a summary) started without --resume: refused, since
  starting over would cut its metrics.jsonl and leave its checkpoints for a later --resume auto to mix
  with the new run's. --resume auto continues it; --overwrite replaces it, removing what the pipeline
  wrote there (RUN_OUTPUTS) once the lease is held;
- --resume auto on a run that is past the steps asked: refused (it cannot go back, and going on would
  overwrite its results with a run that never trained); a finished run resumed at its very end: nothing
  to do, exit 0 (the trainer says so once the checkpoint is found to fit, before it writes anything).

A run is recognised by run.json (RUN_MARKER), which the trainer writes into every output_dir right
after taking its lease; the runs of earlier versions by what only the pipeline writes: a complete or
partial checkpoint (checkpoints/step-*/state.json, checkpoints/.tmp-step-*) or the lease, lease.json.
A config.yaml, metrics.jsonl, summary.json or plots/ alone is no proof: a user may have made them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipeline import __version__
from pipeline.checkpoints.format import STEP_DIR, checkpoint_root, list_checkpoints
from pipeline.distributed.lease import LEASE_NAME
from pipeline.errors import UserError
from pipeline.training.outputs import write_json_atomic

RUN_MARKER = "run.json"
RUN_KIND = "lstm-pipeline training run"
# What a training run writes into its output_dir, and all that --overwrite removes. wandb/ stays: an
# offline W&B run there is still to be synced, and the new run's files go beside it under their own id.
RESOLVED = "resolved.yaml"  # beside config.yaml: the settings the run resolved from its data
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "model", "plots", "config.yaml", RESOLVED, "sample_ids")
_REPLACE = "add --overwrite (it removes that run's checkpoints, metrics.jsonl, summary.json, model/ and plots/ first)"


class OutputDirRefused(UserError):
    exit_code = 2


class AlreadyComplete(Exception):
    """--resume on a finished run that has every step asked for: nothing to train, exit 0. Carries the
    line to print and the run's summary."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Found:
    """What an output_dir holds, read without changing anything."""

    path: Path
    kind: str  # "empty" (missing or empty), "foreign" (not a run of this pipeline), "run"
    entries: tuple[str, ...] = ()  # foreign: what is there
    reached: int | None = None  # a run: the step of its newest complete checkpoint
    summary: dict[str, Any] | None = None  # a run: its summary.json ({} when it cannot be read)
    metrics: bool = False  # a run: whether its metrics.jsonl holds any event

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.get("completed"))

    @property
    def has_results(self) -> bool:
        return self.reached is not None or self.metrics or self.summary is not None

    @property
    def steps(self) -> int | None:
        """The step the run has reached: its newest checkpoint's, or its summary's when further."""
        known = [s for s in (self.reached, (self.summary or {}).get("steps")) if isinstance(s, int)]
        return max(known) if known else None


def inspect(out: Path) -> Found:
    """Read only. Raises OutputDirRefused when output_dir is a file."""
    if out.exists() and not out.is_dir():
        raise OutputDirRefused(f"output_dir {out} exists and is not a directory; choose a new or empty directory "
                               "for the run (output_dir=PATH)")
    # lost+found: what a fresh ext4 volume mounted as output_dir holds; the user made nothing there
    entries = tuple(sorted(p.name for p in out.iterdir() if p.name != "lost+found")) if out.is_dir() else ()
    if not entries:
        return Found(out, "empty")
    if not _is_run(out):
        return Found(out, "foreign", entries)
    checkpoints = list_checkpoints(out)
    reached = int(STEP_DIR.match(checkpoints[-1].name).group(1)) if checkpoints else None
    summary = _read_json(out / "summary.json", missing=None, unreadable={})
    metrics = out / "metrics.jsonl"
    return Found(out, "run", reached=reached, summary=summary, metrics=metrics.is_file() and metrics.stat().st_size > 0)


def _is_run(out: Path) -> bool:
    marker = _read_json(out / RUN_MARKER, missing={}, unreadable={})
    if marker.get("kind") == RUN_KIND:  # a run.json of some other tool is no proof
        return True
    root = checkpoint_root(out)  # runs of versions before the marker
    return (out / LEASE_NAME).is_file() or bool(list_checkpoints(out)) or (root.is_dir() and any(root.glob(".tmp-step-*")))


def _read_json(path: Path, missing: Any, unreadable: Any) -> Any:
    if not path.is_file():
        return missing
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return unreadable
    return value if isinstance(value, dict) else unreadable


def decide(found: Found, resume: str | None, overwrite: bool, total_steps: int, asked: str) -> None:
    """Whether this start may train into `found`; raises OutputDirRefused if not. `asked` words where the
    config ends (train.max_steps=300). A finished run that --resume finds at its end is left to the
    trainer, which says so once the checkpoint has shown that it fits (complete_message)."""
    if found.kind == "foreign":
        raise OutputDirRefused(_foreign(found))
    if found.kind == "empty" or not found.has_results or overwrite:
        return
    if resume is None:
        raise OutputDirRefused(_occupied(found))
    if resume != "auto":  # a checkpoint named by the user: where to go on from is their choice
        return
    steps, out = found.steps, found.path
    if steps is not None and steps > total_steps:
        state = "a finished" if found.finished else "an unfinished"
        raise OutputDirRefused(
            f"output_dir {out} holds {state} run that reached step {steps}, and {asked} ends before it: --resume auto "
            f"cannot go back, and going on would replace its results with those of a run that never trained. Nothing "
            f"was changed. To train it further, raise train.max_steps above {steps} and keep --resume auto; to start "
            f"a shorter run here instead, {_REPLACE} in place of --resume auto; or choose another output_dir")
    if found.finished and found.reached is None and steps != total_steps:
        raise OutputDirRefused(
            f"output_dir {out} holds a finished run of {steps} steps{_scores(found.summary)} whose checkpoints are "
            "gone, so --resume auto cannot continue it (it would start from step 0 and cut its metrics.jsonl). Nothing "
            f"was changed. Choose another output_dir, or {_REPLACE} in place of --resume auto")


def complete_message(out: Path, summary: dict[str, Any], early: bool = False) -> str:
    """--resume on a finished run that has every step the config asks for, or that eval.patience ended."""
    if early:
        return (f"output_dir {out} holds a run that eval.patience ended at step {summary.get('steps')}"
                f"{_scores(summary)}, and this config's patience has run out there too: nothing to train, nothing "
                "changed. To train it further, raise eval.patience (or remove it); to start it over, use --overwrite "
                "in place of --resume")
    return (f"output_dir {out} holds a finished run of {summary.get('steps')} steps{_scores(summary)}, as many as "
            "this config asks for: nothing to train, nothing changed. To train it further, raise train.max_steps; "
            "to start it over, use --overwrite in place of --resume")


def _foreign(found: Found) -> str:
    listed = ", ".join(found.entries[:4]) + (", ..." if len(found.entries) > 4 else "")
    return (f"output_dir {found.path} is not empty and holds no run of this pipeline ({listed}; no {RUN_MARKER}, "
            "checkpoint or lease of a run): training writes config.yaml, metrics.jsonl, summary.json, model/, plots/ "
            "and checkpoints/ there and would overwrite files of those names. Nothing was written. Choose a new or "
            "empty output_dir (output_dir=PATH), or move those files away; --overwrite replaces only a run of this "
            "pipeline, never files it did not write")


def _occupied(found: Found) -> str:
    if found.finished:
        what = f"a finished run of {found.steps} steps{_scores(found.summary)}"
        go_on = "to train it further, run again with --resume auto and a larger train.max_steps"
    else:
        newest = f"its newest checkpoint is step {found.reached}" if found.reached is not None else "no checkpoint yet"
        what = f"an unfinished run ({newest})"
        go_on = "to continue it, run the same command with --resume auto"
    return (f"output_dir {found.path} holds {what}, and this start has neither --resume nor --overwrite: starting "
            "over there would cut its metrics.jsonl and leave its checkpoints for a later --resume auto to mix with "
            f"the new run's. Nothing was written. To keep it, choose another output_dir; {go_on}; to replace it, "
            f"{_REPLACE}")


def _scores(summary: dict[str, Any] | None) -> str:
    test = (summary or {}).get("test_accuracy")
    return f" (test accuracy {test:.4f})" if isinstance(test, float) else ""


def mark(out: Path, replace: bool, log: Callable[[str], None]) -> None:
    """Main process, with the lease held: with `replace` (--overwrite on a run), remove what the earlier run
    wrote; then record the directory as this pipeline's run, before any other output is written."""
    if replace:
        removed = [name for name in RUN_OUTPUTS if _remove(out / name)]
        log(f"--overwrite: removed the earlier run's {', '.join(removed) or 'nothing'} from {out}")
    if replace or not (out / RUN_MARKER).is_file():
        write_json_atomic(out / RUN_MARKER, {"kind": RUN_KIND, "version": __version__,
                                             "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})


def _remove(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return True
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False
