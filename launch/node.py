"""Run one node of a multi-node job: `accelerate launch`'s arguments, its failures in plain words.

    python launch/node.py --num_machines 2 --num_processes 2 --machine_rank 0 --main_process_ip HOST \\
        --main_process_port 29500 --multi_gpu --same_network launch/train.py --config ... --resume auto

The rendered Kubernetes pods run this; pipeline/distributed/launcher.py says what it changes.
It sets no OpenMP variables: each rank it starts (launch/train.py) counts its own CPU threads and
chooses its waiting (pipeline/distributed/cpu_threads.py), which inherited values would override.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_cli

if __name__ == "__main__":
    from pipeline.distributed.launcher import run_node

    run_cli(lambda: run_node(sys.argv[1:]))
