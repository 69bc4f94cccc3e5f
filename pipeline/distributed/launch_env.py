"""The launch environment, read once.

torchrun (and `accelerate launch`, which runs it) tells each worker where it stands through
environment variables: its rank, the world, the machines, the rendezvous master and the elastic
agent's restart counters. The entry point reads them once into a `LaunchEnv` and passes it down,
so that no module reads `os.environ` for them and a test can build any launch it needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.faults import FAULT_VAR, FaultPoint

JOB_ID_VAR = "PIPELINE_JOB_ID"


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine
    local_rank: int = 0  # this process among them
    group_rank: int = 0  # this machine's rank
    group_world_size: int = 1  # machines
    master_addr: str | None = None
    master_port: int | None = None
    elastic_run_id: str | None = None  # set when an elastic agent (torchrun) started this worker
    agent_store: bool = False  # the agent hands its own TCP store to every generation of workers
    max_restarts: int = 0
    restart_count: int | None = None  # None outside an elastic agent
    job_id: str | None = None  # PIPELINE_JOB_ID: what a job's restarts share (Kubernetes renders it)
    agent: str | None = None  # the elastic agent, our parent process: the same for every restart it makes
    fault: FaultPoint | None = None  # armed by a test only (pipeline/faults.py)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        under_agent = "TORCHELASTIC_RESTART_COUNT" in env

        def number(name: str, default: int | None) -> int | None:
            raw = env.get(name)
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"the launcher's environment variable {name}={raw!r} is not a whole number; launch with "
                                  "accelerate launch or torchrun, which set it, or unset it") from None

        return cls(
            rank=number("RANK", 0),
            world_size=number("WORLD_SIZE", 1),
            local_world_size=number("LOCAL_WORLD_SIZE", 1),
            local_rank=number("LOCAL_RANK", 0),
            group_rank=number("GROUP_RANK", 0),
            group_world_size=number("GROUP_WORLD_SIZE", 1),
            master_addr=env.get("MASTER_ADDR"),
            master_port=number("MASTER_PORT", None),
            elastic_run_id=env.get("TORCHELASTIC_RUN_ID"),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            max_restarts=number("TORCHELASTIC_MAX_RESTARTS", 0),
            restart_count=number("TORCHELASTIC_RESTART_COUNT", 0) if under_agent else None,
            job_id=env.get(JOB_ID_VAR) or None,
            agent=f"launcher {os.getppid()} on {socket.gethostname()}" if under_agent else None,
            fault=FaultPoint.parse(env.get(FAULT_VAR)),
        )

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def job_identity(self) -> str | None:
        """What stays the same when a job's trainer comes back, or None for a plain local run."""
        return self.job_id or self.agent
