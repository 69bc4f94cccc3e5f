"""Starting a W&B run: which mode, which directory, which init arguments.

Kept apart from the Tracker so the decisions (mode, project, group, dir) are plain functions
of the config and the environment, testable without starting wandb.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import WandbConfig

STEP_KEY = "trainer/global_step"
# wandb's default is 90 s; a training job should not sit that long on a broken network before
# falling back to local metrics. WANDB_INIT_TIMEOUT still overrides it.
DEFAULT_INIT_TIMEOUT_S = 30.0
# wandb's default is to wait forever for uploads at the end, holding the job's nodes; what is
# not uploaded by then stays on disk for `wandb sync`. WANDB_FINISH_TIMEOUT overrides it.
DEFAULT_FINISH_TIMEOUT_S = 300.0

_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # online | offline | disabled
    reason: str


def resolve_mode(configured: str | None, environ: Mapping[str, str]) -> ModeChoice:
    if configured:
        return ModeChoice(configured, f"wandb.mode={configured} in the config")
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in _MODE_ALIASES:
        return ModeChoice(_MODE_ALIASES[env_mode], f"WANDB_MODE={env_mode}")
    if environ.get("WANDB_API_KEY"):
        return ModeChoice("online", "WANDB_API_KEY is set")
    return ModeChoice("offline", "WANDB_API_KEY is not set; upload later with `wandb sync`")


def resolve_dir(output_dir: Path, environ: Mapping[str, str]) -> Path:
    """Where wandb writes run files: WANDB_DIR, else the job's output dir (so they travel together)."""
    return Path(environ.get("WANDB_DIR") or output_dir)


def check_writable(directory: Path) -> None:
    """Raise OSError now rather than let wandb fail later or quietly fall back to /tmp."""
    target = directory / "wandb"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check-"):
        pass


def _from_config_or_env(cfg: WandbConfig, field: str, env_name: str, environ: Mapping[str, str]) -> Any:
    # A value written in the config wins; otherwise the cluster's env (WANDB_PROJECT etc. set in
    # the Job manifest) wins over the config's built-in default.
    if field in cfg.model_fields_set and getattr(cfg, field) is not None:
        return getattr(cfg, field)
    return environ.get(env_name) or getattr(cfg, field)


def init_kwargs(
    cfg: WandbConfig,
    mode: str,
    wandb_dir: Path,
    run_config: dict[str, Any],
    resume_run_id: str | None,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    import wandb

    settings = wandb.Settings(
        init_timeout=_seconds(environ, "WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S),
        finish_timeout=_seconds(environ, "WANDB_FINISH_TIMEOUT", DEFAULT_FINISH_TIMEOUT_S),
        # The Tracker prints its own one-line summary instead of wandb's banner.
        silent=True,
    )
    kwargs: dict[str, Any] = {
        "mode": mode,
        "dir": str(wandb_dir),
        "project": _from_config_or_env(cfg, "project", "WANDB_PROJECT", environ),
        "entity": _from_config_or_env(cfg, "entity", "WANDB_ENTITY", environ),
        "group": _from_config_or_env(cfg, "group", "WANDB_RUN_GROUP", environ),
        "name": cfg.name,
        "tags": list(cfg.tags) or None,
        "notes": cfg.notes,
        "job_type": cfg.job_type,
        "config": run_config,
        # Our Tracker owns its run object; never hand back or finish someone else's run.
        "reinit": "create_new",
        "settings": settings,
    }
    if resume_run_id:
        # "allow": continue the run if the server knows it, else start one with this id.
        # Resumed jobs may change e.g. train.max_steps, so config values may change.
        kwargs.update(id=resume_run_id, resume="allow", allow_val_change=True)
    return kwargs


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None


def define_metrics(run: Any) -> None:
    """Every metric's x axis is the optimizer step, logged as a value.

    wandb's own `step=` must increase within a run and drops rows that go backwards, which a
    resumed job does; a step metric has no such rule, so resumed runs keep appending.
    """
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    run.define_metric("eval/accuracy", step_metric=STEP_KEY, summary="max,last")
    run.define_metric("eval/loss", step_metric=STEP_KEY, summary="min,last")


def sync_dir(run: Any) -> Path:
    """The offline-run-* / run-* directory that `wandb sync` takes."""
    return Path(run.dir).parent
