"""Agreement between two real ranks (gloo): one decision for all, one error for all, naming who failed."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, accelerate_cmd

pytestmark = pytest.mark.slow  # a real two-process launch

PROBE = """
import json, os, sys
from accelerate import Accelerator
from pipeline.distributed.agreement import fail_together, on_main
from pipeline.errors import DataError, UserError

acc = Accelerator(cpu=True)
rank = acc.process_index

def outcome(fn):
    try:
        return f"value {fn()!r}"
    except UserError as err:
        return f"{type(err).__name__} exit {err.exit_code} shared {err.shared}: {err}"

def explain(err):
    return UserError(f"explained {err}")

def main_refuses():
    raise DataError("the main process refuses")

def main_cannot_write():
    raise OSError("disk on fire")

results = {
    "decided": outcome(lambda: on_main(acc, lambda: "from main", explain)),
    "refused": outcome(lambda: on_main(acc, main_refuses, explain)),
    "oserror": outcome(lambda: on_main(acc, main_cannot_write, explain)),
    "one_failed": outcome(lambda: fail_together(acc, OSError("No space left") if rank == 1 else None)),
    "both_alike": outcome(lambda: fail_together(acc, DataError("same everywhere"))),
    "both_differ": outcome(lambda: fail_together(acc, DataError(f"only on {rank}"))),
    "none_failed": outcome(lambda: fail_together(acc, None)),
}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # one file each: two ranks' prints can interleave
    json.dump(results, f)
acc.wait_for_everyone()
os._exit(0)  # as cli.leave does: torch's teardown of a gloo group held by a live interpreter can abort
"""


def test_ranks_agree_on_decisions_and_failures(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([*accelerate_cmd(2), str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {
        "decided": "value 'from main'",
        "refused": "DataError exit 1 shared True: the main process refuses",
        "oserror": "UserError exit 1 shared True: explained disk on fire",
        "one_failed": "UserError exit 1 shared True: rank 1: No space left",
        "both_alike": "DataError exit 1 shared True: same everywhere",
        "both_differ": "UserError exit 1 shared True: rank 0: only on 0; rank 1: only on 1",
        "none_failed": "value None",
    }
    for name, text in expected.items():
        assert ranks[0][name] == ranks[1][name] == text, (name, ranks[0][name], ranks[1][name])
