"""Init container of every training pod: fail fast on bugs, then wait for the master.

    python -m pipeline.kube.preflight --config FILE --rank R --master-addr HOST --master-port P [key=value ...]

Exit codes carry meaning for the Job's podFailurePolicy: 2 (bad config) and 1 (missing data)
fail the whole job at once, since a retry cannot fix them; 3 (master unreachable before the
timeout) is retried, since the master pod may simply have been scheduled late.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from pipeline.cli import run_cli
from pipeline.errors import UserError


class MasterUnreachable(UserError):
    exit_code = 3


def wait_for_tcp(host: str, port: int, timeout_s: float, interval_s: float = 2.0) -> float:
    """Seconds until host:port accepted a connection; MasterUnreachable after timeout_s.

    A TCP connect, not a DNS lookup: the headless record can exist well before rank 0's
    launcher listens, and connecting earlier only moves the failure into the rendezvous.
    """
    start = time.monotonic()
    last_error = "no attempt made"
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return time.monotonic() - start
        except OSError as err:
            last_error = str(err) or type(err).__name__
        if time.monotonic() - start + interval_s > timeout_s:
            raise MasterUnreachable(
                f"the master {host}:{port} did not accept a connection within {timeout_s:.0f} s ({last_error}); "
                "check that pod 0 is running: python launch/submit.py status NAME"
            )
        time.sleep(interval_s)


def check(config: str, overrides: list[str]) -> None:
    """The checks the trainer would fail on first, with their exit codes (ConfigError 2, DataError 1)."""
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest

    cfg = load_config(config, overrides)
    load_manifest(cfg.data.dir, cfg.data.dataset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--rank", type=int, required=True, help="this pod's machine rank (JOB_COMPLETION_INDEX)")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the master")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check(args.config, args.overrides)
    if args.rank > 0:
        waited = wait_for_tcp(args.master_addr, args.master_port, args.timeout)
        print(f"preflight: master {args.master_addr}:{args.master_port} reachable after {waited:.1f} s", file=sys.stderr)
    print("preflight: config and data checked", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
