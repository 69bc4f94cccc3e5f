"""What code and libraries produced a run: package versions and the git commit, best effort.

Nothing here may fail a run: a container without git or .git just reports fewer facts.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("pipeline", "torch", "accelerate", "webdataset", "wandb", "numpy", "safetensors")
# Images built from a tarball have no .git; the build can pass the commit in instead.
COMMIT_ENV = "PIPELINE_GIT_COMMIT"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        versions["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return versions


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, Any]:
    commit = os.environ.get(COMMIT_ENV) or _git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None}
    state: dict[str, Any] = {"commit": commit}
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        # A dirty tree means the commit alone does not reproduce the run.
        state["dirty"] = bool(status)
    return state


def provenance() -> dict[str, Any]:
    return {"versions": package_versions(), "git": git_state()}
