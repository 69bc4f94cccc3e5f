"""The run's devices: what this machine can run, checked before anything starts, and the Accelerator."""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.config import Config, ModelConfig
from pipeline.distributed.elastic import init_restartable_process_group
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.errors import DeviceError
from pipeline.model import build_model


def check_gpu_count(processes_per_node: int, visible_gpus: int, rehearsal: bool) -> None:
    """NCCL refuses two ranks on one GPU, with a traceback from every rank; say so before it starts."""
    if processes_per_node <= visible_gpus or rehearsal:
        return
    raise DeviceError(
        f"{processes_per_node} processes per node were launched on CUDA, but this node has {visible_gpus} visible GPU(s), "
        "and NCCL cannot give two ranks one GPU. Launch with --num_processes equal to the GPUs per node "
        f"({visible_gpus} here; across nodes, --num_processes is the total), or set train.device=cpu to train on the CPU, "
        "or set train.gpu_rehearsal=true to rehearse the multi-rank path with ranks sharing the GPU over gloo "
        "(slow: a check before going to a cluster, not a way to train)"
    )


def check_cpu_bf16(cell: str) -> None:
    """bf16 autocast runs the CPU's recurrent layers through oneDNN, which has no bf16 kernel for
    them on CPUs without AVX-512 (seen on an AVX2-only AMD EPYC): every step would fail with
    'could not create a primitive descriptor'. A layer of four units says so before anything starts."""
    probe = build_model(ModelConfig(cell=cell, hidden_size=4), 4, 2)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            probe(torch.zeros(1, 4, 4))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". Run workload")[0]
        raise DeviceError(
            f"train.mixed_precision is bf16, but this CPU has no bf16 kernel for the {cell.upper()} layers ({first}): "
            "oneDNN's need at least AVX-512. Train in fp32 here (train.mixed_precision=no), or in bf16 on a GPU or "
            "on a CPU with AVX-512"
        ) from None


def check_devices(cfg: Config, cuda: bool, env: LaunchEnv) -> None:
    """What this machine cannot run in the configured device and precision, said before it starts."""
    if cfg.train.device == "cuda" and not cuda:
        raise DeviceError("train.device is cuda, but no CUDA GPU is visible; use train.device=auto or cpu")
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise DeviceError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is in use (on the CPU accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    if cfg.train.mixed_precision == "bf16" and not cuda:
        check_cpu_bf16(cfg.model.cell)
    if cuda:
        check_gpu_count(env.local_world_size, torch.cuda.device_count(), cfg.train.gpu_rehearsal)


def build_accelerator(cfg: Config, env: LaunchEnv) -> Accelerator:
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    check_devices(cfg, cuda, env)
    rehearsal = cuda and cfg.train.gpu_rehearsal
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    # gloo reduces CUDA tensors and, unlike NCCL, lets ranks share a device.
    init_restartable_process_group(timeout, "gloo" if rehearsal or not cuda else "nccl", env)
    # Accelerate picks nccl for CUDA and gloo for the CPU itself; only a rehearsal overrides it.
    handler = InitProcessGroupKwargs(timeout=timeout, **({"backend": "gloo"} if rehearsal else {}))
    # cpu=True without CUDA: otherwise `accelerate launch --multi_gpu` on a CPU machine starts N
    # independent world-size-1 runs, each training alone on all the data.
    return Accelerator(cpu=not cuda, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[handler])
