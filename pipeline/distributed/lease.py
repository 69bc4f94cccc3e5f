"""One run per output_dir: a lease file that the main process takes before writing anything.

`output_dir/lease.json` names its holder (host, pid, job id, start time) and carries a
heartbeat that a background thread refreshes. A second run into a busy directory is refused.
A lease is stale, and taken over with a warning, when its holder's process is gone (same host)
or its heartbeat is older than train.lease_timeout_s. The same job coming back (an elastic
restart under the same launcher, a Kubernetes pod of the same Job, PIPELINE_JOB_ID) continues
silently. A run that ends in any ordinary way, SIGTERM included, gives the lease back.

Taking over renames the stale file away first: of two runs that find the same stale lease only
one rename succeeds, and the loser then finds the winner's fresh lease.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UserError

LEASE_NAME = "lease.json"


class OutputDirBusy(UserError):
    exit_code = 2


@dataclass
class Holder:
    host: str
    pid: int
    job_id: str | None
    started: str  # ISO time, UTC
    heartbeat: float  # unix time of the last refresh
    token: str  # tells this holder's lease from a successor's

    def describe(self, now: float) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on host {self.host}{job}, since {self.started} (heartbeat {now - self.heartbeat:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLease:
    def __init__(self, directory: str | Path, timeout_s: float, job_id: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LEASE_NAME
        self.timeout_s = timeout_s
        self.me = Holder(host=socket.gethostname(), pid=os.getpid(), job_id=job_id,
                         started=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         heartbeat=time.time(), token=uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lease; returns a warning when a stale one was taken over. Raises OutputDirBusy."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return None
            holder = self._read()
            verdict = self._judge(holder)
            if verdict == "busy":
                raise OutputDirBusy(self._busy_message(holder))
            if verdict == "same job":
                self._write()  # the same job, back: take it over silently
                self._start_heartbeat()
                return None
            if self._set_aside() and self._create():
                self._start_heartbeat()
                return self._stale_message(holder, verdict)
            # another run took it over first: look again
        raise OutputDirBusy(f"output_dir {self.directory}: could not take {self.path} (other runs keep taking it); "
                            "make sure only one run uses this output_dir")

    def refuse_if_busy(self) -> None:
        """Read only: raise OutputDirBusy if a live run holds the lease, so that a start which looks at
        output_dir before taking it names the run in there rather than judging that run's files."""
        holder = self._read() if self.path.is_file() else None
        if holder is not None and self._judge(holder) == "busy":
            raise OutputDirBusy(self._busy_message(holder))

    def _judge(self, holder: Holder | None) -> str:
        now = time.time()
        if holder is None:
            return "unreadable"
        if holder.job_id and holder.job_id == self.me.job_id:
            return "same job"
        if holder.host == self.me.host and not _pid_alive(holder.pid):
            return "holder gone"
        if now - holder.heartbeat > self.timeout_s:
            return "heartbeat expired"
        return "busy"

    def _busy_message(self, holder: Holder) -> str:
        return (
            f"output_dir {self.directory} is in use by another run: {holder.describe(time.time())}. Nothing was written. "
            f"Wait for that run to finish, or choose another output_dir; if that run is gone for good, delete {self.path} "
            f"(a lease whose heartbeat is older than train.lease_timeout_s={self.timeout_s:g} s is taken over by itself)"
        )

    def _stale_message(self, holder: Holder | None, verdict: str) -> str:
        who = holder.describe(time.time()) if holder else "an unreadable lease file"
        reason = {"holder gone": "its process is gone", "heartbeat expired": f"no heartbeat for over {self.timeout_s:g} s",
                  "unreadable": "it cannot be read"}[verdict]
        return f"took over the lease of {self.directory} from {who}: {reason}"

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _set_aside(self) -> bool:
        try:
            os.rename(self.path, self.path.with_name(f".{LEASE_NAME}.stale-{self.me.token}"))
        except FileNotFoundError:
            return False
        os.unlink(self.path.with_name(f".{LEASE_NAME}.stale-{self.me.token}"))
        return True

    def _create(self) -> bool:
        """Create the lease file, whole, if there is none: of several runs exactly one succeeds, and
        no run ever reads a lease half-written (link() fails when the name exists)."""
        tmp = self.path.with_name(f".{LEASE_NAME}.{self.me.token}")
        tmp.write_text(json.dumps(asdict(self.me)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self) -> None:
        tmp = self.path.with_name(f".{LEASE_NAME}.{self.me.token}")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)

    def _start_heartbeat(self) -> None:
        interval = max(1.0, self.timeout_s / 10)
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="output-lease", daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            current = self._read()
            if current is not None and current.token != self.me.token:
                print(f"warning: the lease of {self.directory} was taken over by {current.describe(time.time())}; "
                      "this run's outputs may mix with that run's", file=sys.stderr, flush=True)
                return
            self.me.heartbeat = time.time()
            try:
                self._write()
            except OSError:  # a full disk: the next checkpoint reports it; the lease just ages
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.token == self.me.token:
            try:
                self.path.unlink()
            except OSError:
                pass
