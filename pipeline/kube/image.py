"""Build the training image with docker or podman, tagged from git.

The Dockerfile's default base is the CUDA PyTorch runtime. Where that cannot be pulled (no
registry reachable), a CPU stand-in is built here and passed as BASE_IMAGE: a minimal Debian root
filesystem from mmdebstrap, imported as an image, with the CPU torch wheel on top
(Dockerfile.cpu-base). The Dockerfile is the same for both; the stand-in's image is tagged
`<commit>-cpu`, so it is never mistaken for the GPU image. Both bases are cached by tag: the
stand-in is rebuilt only when its recipe changes, the image's dependency layer only when
pyproject.toml does.
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
IMAGE_REPO = "localhost/lstm-pipeline"
CPU_BASE_REPO = "localhost/lstm-pipeline-cpu-base"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, which the torch wheel below is built for
CPU_TORCH = "2.13.0"
_ROOTFS_PACKAGES = "python3,python3-venv,ca-certificates"


@dataclass(frozen=True)
class Engine:
    name: str  # docker or podman
    path: str

    def run(self, *args: str, check: bool = True, quiet: bool = False, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        out = subprocess.PIPE if quiet else None
        try:
            proc = subprocess.run([self.path, *args], stdout=out, stderr=out, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise UserError(f"'{self.name} {args[0]}' did not finish within {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            tail = [line for line in f"{proc.stdout or ''}\n{proc.stderr or ''}".splitlines() if line.strip()][-6:]
            detail = ":\n  " + "\n  ".join(tail) if quiet and tail else " (its output is above)"
            raise UserError(f"'{self.name} {' '.join(args[:2])} ...' failed with exit status {proc.returncode}{detail}")
        return proc

    def has_image(self, ref: str) -> bool:
        args = ("image", "exists", ref) if self.name == "podman" else ("image", "inspect", ref)
        return self.run(*args, check=False, quiet=True).returncode == 0


def find_engine(preferred: str | None = None) -> Engine:
    """docker when its daemon answers (a docker client alone cannot build), else podman."""
    candidates = [preferred] if preferred else ["docker", "podman"]
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        if name == "docker" and subprocess.run([path, "info"], capture_output=True).returncode != 0:
            continue
        return Engine(name, path)
    wanted = preferred or "docker (with a running daemon) or podman"
    raise UserError(f"building the image needs {wanted}, and none is usable here: install podman (Debian: apt-get "
                    "install podman) or start the docker daemon")


def default_base() -> str:
    """The Dockerfile's own BASE_IMAGE default, read from it so that the two never differ."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise UserError("the Dockerfile declares no default BASE_IMAGE")
    return match.group(1)


def pip_ca_bundle() -> str | None:
    """The CA bundle this machine's pip trusts, if it is configured with one: a package index
    behind a private CA needs it inside the build too (as the build secret `pip-ca`)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".cert") and value.strip("'\""):
            path = value.strip("'\"")
            if Path(path).is_file():
                return path
    return None


def _secret_args() -> list[str]:
    ca = pip_ca_bundle()
    return ["--secret", f"id=pip-ca,src={ca}"] if ca else []


def git_tag() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "dev"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _recipe_hash() -> str:
    recipe = (ROOT / "Dockerfile.cpu-base").read_bytes() + f"{DEBIAN_SUITE} {_ROOTFS_PACKAGES} {CPU_TORCH}".encode()
    return hashlib.sha256(recipe).hexdigest()[:12]


def _torch_spec() -> str:
    # PyPI's x86-64 torch is the CUDA build; PyTorch's CPU index names the CPU one +cpu.
    return f"{CPU_TORCH}+cpu" if platform.machine() in ("x86_64", "AMD64") else CPU_TORCH


def _fetch_torch_wheel(into: Path) -> None:
    """Copy or download the CPU torch wheel into the stand-in's build context, where this machine's
    pip can get it (its own find-links, a local index); the build reaches the index itself otherwise."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--python-version", "3.11", "--dest", str(into), f"torch=={_torch_spec()}"],
                   capture_output=True, text=True, timeout=900)


def build_cpu_base(engine: Engine, quiet: bool = False) -> str:
    tag = f"{CPU_BASE_REPO}:{DEBIAN_SUITE}-torch{CPU_TORCH}-{_recipe_hash()}"
    if engine.has_image(tag):
        return tag
    rootfs = f"{CPU_BASE_REPO}-rootfs:{DEBIAN_SUITE}"
    with tempfile.TemporaryDirectory(prefix="lstm-pipeline-base-") as tmp:
        if not engine.has_image(rootfs):
            mmdebstrap = shutil.which("mmdebstrap")
            if mmdebstrap is None:
                raise UserError("the CPU stand-in base is built from a Debian root filesystem by mmdebstrap, which is "
                                "not installed (Debian: apt-get install mmdebstrap); or pass --base IMAGE, an image "
                                "with python, pip and torch")
            print(f"image: {DEBIAN_SUITE} root filesystem (mmdebstrap)", file=sys.stderr, flush=True)
            tar = Path(tmp) / "rootfs.tar"
            proc = subprocess.run([mmdebstrap, "--quiet", "--variant=minbase", f"--include={_ROOTFS_PACKAGES}",
                                   DEBIAN_SUITE, str(tar)], capture_output=True, text=True)
            if proc.returncode != 0:
                last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
                raise UserError(f"mmdebstrap could not build the {DEBIAN_SUITE} root filesystem ({last}); it needs "
                                "root and a reachable Debian mirror")
            engine.run("import", str(tar), rootfs, quiet=True)
        context = Path(tmp) / "context"
        _fetch_torch_wheel(context / "wheels")
        print(f"image: CPU base {tag} (torch {_torch_spec()})", file=sys.stderr, flush=True)
        engine.run("build", *_secret_args(), "--build-arg", f"ROOTFS={rootfs}", "--build-arg",
                   f"TORCH_VERSION={_torch_spec()}", "-f", str(ROOT / "Dockerfile.cpu-base"), "-t", tag, str(context),
                   quiet=quiet)
    return tag


def resolve_base(engine: Engine, base: str, quiet: bool = False) -> tuple[str, bool]:
    """(base image, whether it is the CPU stand-in) for --base auto|cuda|cpu|IMAGE."""
    if base == "cpu":
        return build_cpu_base(engine, quiet), True
    if base not in ("auto", "cuda"):
        return base, False
    cuda = default_base()
    if engine.has_image(cuda):
        return cuda, False
    pulled = engine.run("pull", cuda, check=False, quiet=True, timeout=3600)
    if pulled.returncode == 0:
        return cuda, False
    reason = pulled.stderr.strip().splitlines()[-1] if pulled.stderr and pulled.stderr.strip() else "no message"
    if base == "cuda":
        raise UserError(f"the CUDA base {cuda} cannot be pulled ({reason})")
    print(f"image: the CUDA base {cuda} cannot be pulled ({reason[:200]}); building on the CPU stand-in base "
          "instead: this image trains on CPUs only", file=sys.stderr, flush=True)
    return build_cpu_base(engine, quiet), True


def build_image(base: str = "auto", tag: str | None = None, engine_name: str | None = None, quiet: bool = False) -> str:
    """Build the project's image; returns its name."""
    engine = find_engine(engine_name)
    base_image, cpu = resolve_base(engine, base, quiet)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = tag or f"{IMAGE_REPO}:{git_tag()}{'-cpu' if cpu else ''}"
    print(f"image: {name} on {base_image} ({engine.name})", file=sys.stderr, flush=True)
    engine.run("build", *_secret_args(), "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg",
               f"PIPELINE_GIT_COMMIT={commit}", "-f", str(ROOT / "Dockerfile"), "-t", name, str(ROOT), quiet=quiet)
    return name
