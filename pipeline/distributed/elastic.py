"""Process-group set-up that survives elastic restarts (`--max_restarts`).

torch's elastic agent keeps one TCP store alive across restarts and hands it to every generation
of workers without a per-restart prefix. The restarted workers then find the keys their dead
predecessors wrote (gloo peer addresses, the NCCL unique id) and race them: sometimes they
connect, sometimes they dial a dead port, sometimes they wait forever (pytorch/pytorch#135712).
"""

from __future__ import annotations

from datetime import timedelta

from pipeline.distributed.launch_env import LaunchEnv
from pipeline.errors import ConfigError

# Makes the agent start a fresh store for every rendezvous round; read by the agent, not the workers.
FRESH_STORE_VAR = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _restarts_share_a_store(env: LaunchEnv) -> bool:
    return env.elastic_run_id is not None and env.agent_store and env.max_restarts > 0 and env.multi_process


def init_restartable_process_group(timeout: timedelta, backend: str, env: LaunchEnv) -> bool:
    """Create the default process group in a namespace of its own restart, if restarts can collide.

    Returns whether it did; otherwise Accelerate creates the group as usual. With one elastic
    agent (one node) every worker of a generation carries the same TORCHELASTIC_RESTART_COUNT, so
    it names the generation exactly. Agents on different nodes count restarts independently, so
    there the only safe store is a fresh one per round, which only the launcher can ask for.
    """
    # torch is imported here so that the manifests' renderer can share FRESH_STORE_VAR without it.
    import torch.distributed as dist

    if not _restarts_share_a_store(env) or dist.is_initialized():
        return False
    if env.group_world_size > 1:
        raise ConfigError(
            f"elastic restarts (--max_restarts {env.max_restarts}) across "
            f"{env.group_world_size} nodes share torch's rendezvous store between worker generations, and restarted "
            f"workers hang or fail joining it (pytorch/pytorch#135712); launch with --rdzv_backend c10d and export "
            f"{FRESH_STORE_VAR}=1 in the launcher's environment on every node (the manifests from launch/submit.py "
            "do), or launch with --max_restarts 0"
        )
    store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
    generation = dist.PrefixStore(f"pipeline/restart-{env.restart_count or 0}", store)
    dist.init_process_group(
        backend=backend,
        store=generation,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return True
