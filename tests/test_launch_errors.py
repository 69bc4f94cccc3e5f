"""A user's mistake under a multi-process launch: one paragraph from the main process, every rank's exit code alike."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, accelerate_cmd, train_args

pytestmark = pytest.mark.slow  # three real ranks start, rendezvous and fail

MISTAKE = ("train.global_batch_size=256", "train.batch_size=128")  # 128 x 3 ranks cannot make 256


@pytest.mark.parametrize("launcher, code", [("accelerate", 1), ("node", 2)])
def test_a_config_error_on_three_ranks_is_printed_once(tmp_path, fashion_shards, launcher, code):
    cmd = accelerate_cmd(3)
    if launcher == "node":  # the same arguments through launch/node.py, as the Kubernetes pods run them
        cmd = [sys.executable, "launch/node.py", *cmd[2:]]
    proc = subprocess.run([*cmd, *train_args(tmp_path / "out", fashion_shards, "wandb.mode=disabled", *MISTAKE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stderr.count("error: train.global_batch_size 256 is not a whole number") == 1, proc.stderr[-3000:]
    # Every rank exited with the error's own code, and the launcher's report says so.
    if launcher == "node":
        assert "Traceback" not in proc.stderr
        assert re.search(r"node: training rank \d exited with code 2;", proc.stderr)  # the first rank to end
    else:  # accelerate launch itself: torch's report of the failed ranks, exit 1 whatever their codes
        assert proc.stderr.count("exitcode  : 2") == 3
