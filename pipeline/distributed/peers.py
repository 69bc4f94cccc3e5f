"""Lost peers end a job in bounded time and in plain words.

A collective waits for a silent peer (a node whose network was cut, or that froze) until the
process-group timeout, `train.dist_timeout_s` (15 minutes by default), and then fails with a
transport error that names neither the peer nor what to do next. A dead peer (a killed pod)
fails the collective at once, with an error that names only the peer's address.

`PeerWatch` runs a heartbeat thread on every rank through the rendezvous store, on a connection
of its own so that it never queues behind the training thread: each rank bumps its counter every
`interval` seconds and reads everyone's. A rank whose counter has not moved for `timeout`
seconds is lost, and so is the job when the store itself has not answered for that long (from
the side of a cut link, the other side is unreachable). The thread beats whatever the training
thread is doing, so a slow but alive rank (a long evaluation, a checkpoint, a straggler) is never
declared lost. A training thread stuck in a collective cannot be interrupted from Python, so the
watch prints its paragraph and ends the process itself; nothing that was saved is lost, since
checkpoints are renamed into place only when complete.

At the end of a successful multi-node run `sign_off` makes the master's node leave last. Its
launcher hosts the store that every launcher's exit barrier waits on, and when it left first the
others logged "Error waiting on exit barrier ... Failed to recv" after a run that had succeeded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from pipeline.distributed.launch_env import LaunchEnv
from pipeline.errors import EX_TEMPFAIL, UserError

# The job can go on once its pods are replaced; the Job's podFailurePolicy retries it.
PEER_LOST_EXIT_CODE = EX_TEMPFAIL
# How long machine 0 waits for the other machines to sign off, and then for their launchers to
# reach their exit barrier (a worker's interpreter exit plus the launcher's 0.1 s poll).
SIGN_OFF_WAIT_S = 10.0
SIGN_OFF_GRACE_S = 2.0

_DONE = b"done"
# Transport failures in the transport's own words, as opposed to a bug in the step that happens to be a
# RuntimeError (and may well say "send" or "recv"). gloo raises a plain RuntimeError from its tcp
# transport: pair.cc's "Connection closed by peer [10.0.0.2]:4242", "Read error [10.0.0.2]:4242: Connection
# reset by peer", "Read timeout [..]:..", "writev [..]:..: Broken pipe", "Socket closed [..]:..", and
# unbound_buffer.cc's "Timed out waiting 1800000ms for recv operation to complete"; NCCL's say "NCCL error
# in: ..., remote process exited or there was a network error" or name an ncclRemoteError/ncclSystemError.
# Case-sensitive: these are quoted words, not topics.
_TRANSPORT = re.compile(
    r"Connection (closed|reset) by (remote )?peer|Connection refused|Connection timed out|Broken pipe|No route to host|"
    r"(Read|Write|Connect) (error|timeout) \[|writev \[|Socket (unexpectedly )?closed \[|Socket Timeout|"
    r"Timed out waiting \d+ms for (send|recv) operation to complete|Application timeout caused pair closure|"
    r"NCCL error|NCCL communicator was aborted|ncclRemoteError|ncclSystemError|remote process exited|"
    r"Watchdog caught collective operation timeout")
# NCCL's words for a call that was wrong, not a peer that went away: a bug, however it is raised.
_MISUSE = re.compile(r"ncclInvalidUsage|ncclInvalidArgument|NCCL error.*invalid (usage|argument)")
_ADDRESS = re.compile(r"\[([0-9a-fA-F:.]+?)\]:\d+")


def _transport_detail(text: str) -> str:
    """The transport's own words, without its source location and advice: 'Read error [10.0.0.2]:4242: Connection reset by peer'."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)
    return first.split(". This is typically")[0].rstrip(".")[:300]


class PeerLost(UserError):
    exit_code = PEER_LOST_EXIT_CODE


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    address: str  # the address this rank reaches the master from: what its peers' transports see
    node: int  # machine rank (GROUP_RANK)

    def label(self) -> str:
        return f"rank {self.rank} (host {self.host}, {self.address})"


def _own_address(master: str, port: int) -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, port))  # UDP: no packet is sent, the kernel only picks the route
            return s.getsockname()[0]
    except OSError:
        return "address unknown"


def _interval(timeout_s: float) -> float:
    return max(0.5, min(5.0, timeout_s / 10))


def default_on_lost(message: str) -> None:
    """The training thread may be blocked in a collective for many minutes: say why and end the process."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_EXIT_CODE)


class PeerWatch:
    """Heartbeats between the ranks of one job; see the module docstring.

    Two threads: one beats and reads the others' beats through the store, the other judges from
    the times of what the first saw. The judge never touches the network, so a store call that
    hangs (a TCPStore client on a cut link may wait in a read for good after its first timeout)
    cannot keep it from declaring the store lost.
    """

    def __init__(self, connect: Callable[[], object], prefix: str, me: Peer, peers: list[Peer], timeout_s: float,
                 store_label: str, describe: Callable[[], str], on_lost: Callable[[str], None] = default_on_lost):
        self.connect = connect  # a new store client; the first one is made here
        self.store = connect()
        self.prefix = prefix
        self.me = me
        self.peers = peers  # every rank, this one included
        self.timeout_s = timeout_s
        self.interval_s = _interval(timeout_s)
        self.store_label = store_label
        self.describe = describe
        self.on_lost = on_lost
        self.lost: str | None = None
        now = time.monotonic()
        self._store_ok = now  # when the store last answered a whole round
        self._store_error = ""
        self._last_change = {p.rank: now for p in peers}
        self._done: set[int] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="peer-beat", daemon=True)
        self._judge = threading.Thread(target=self._judge_loop, name="peer-watch", daemon=True)

    # -- set-up ------------------------------------------------------------------------------

    @classmethod
    def start(cls, accelerator, timeout_s: float | None, describe: Callable[[], str], env: LaunchEnv) -> PeerWatch | None:
        """Collective. None for a single process or with train.peer_timeout_s unset."""
        if accelerator.num_processes == 1 or timeout_s is None:
            return None
        import torch.distributed as dist
        from accelerate.utils import broadcast_object_list

        master, port = env.master_addr, env.master_port
        token = [secrets.token_hex(8) if accelerator.is_main_process else None]
        broadcast_object_list(token, from_process=0)  # one namespace per run, whatever the launcher's counters say
        prefix = f"pipeline/peers/{token[0]}"
        store_timeout = timedelta(seconds=max(2 * _interval(timeout_s), 5.0))

        def connect():
            return dist.TCPStore(master, port, is_master=False, wait_for_workers=False, timeout=store_timeout)

        rank = accelerator.process_index
        me = Peer(rank, socket.gethostname(), _own_address(master, port), env.group_rank)
        store = connect()
        store.set(f"{prefix}/peer/{rank}", json.dumps(me.__dict__))
        store.set(f"{prefix}/beat/{rank}", "0")
        accelerator.wait_for_everyone()  # every rank's keys exist from here on
        peers = [Peer(**json.loads(raw)) for raw in store.multi_get([f"{prefix}/peer/{r}" for r in
                                                                    range(accelerator.num_processes)])]
        first = [store]
        watch = cls(lambda: first.pop() if first else connect(), prefix, me, peers, timeout_s, f"{master}:{port}",
                    describe)
        watch.begin()
        return watch

    def begin(self) -> None:
        self._beat.start()
        self._judge.start()

    # -- the threads -------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        beats = 0
        keys = [f"{self.prefix}/beat/{p.rank}" for p in self.peers]
        seen: dict[int, bytes] = {}
        while not self._stop.wait(self.interval_s):
            try:
                if self.store is None:
                    self.store = self.connect()
                beats += 1
                self.store.set(keys[self.me.rank], str(beats))
                values = self.store.multi_get(keys)
            except Exception as err:  # the store's errors are RuntimeErrors of several kinds
                self._store_error = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.store = None  # after a timeout a client's stream is out of step: start a new one
                continue
            now = time.monotonic()
            self._store_ok = now
            for peer, value in zip(self.peers, values, strict=True):
                if value == _DONE:
                    self._done.add(peer.rank)
                if value != seen.get(peer.rank):
                    seen[peer.rank] = value
                    self._last_change[peer.rank] = now

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - self._store_ok >= self.timeout_s:
                self._declare(self._store_lost_message())
                return
            # A peer is judged silent only on a recent answer of the store: from the side of a cut link
            # its last beat may be older than the store's last answer by up to a beat, and naming that
            # peer would hide what this side sees, that nobody answers.
            if now - self._store_ok >= 2 * self.interval_s:
                continue
            for peer in self.peers:
                silent = now - self._last_change[peer.rank]
                if peer.rank != self.me.rank and peer.rank not in self._done and silent >= self.timeout_s:
                    self._declare(self._silent_message(peer, silent))
                    return

    def _declare(self, message: str) -> None:
        if self._stop.is_set():  # the run finished while the last check ran
            return
        self.lost = message
        self.on_lost(message)

    # -- messages ----------------------------------------------------------------------------

    def _tail(self) -> str:
        return (f"This rank ({self.me.rank}, host {self.me.host}) {self.describe()} Nothing that was saved is lost: "
                f"the job resumes from that checkpoint when its pods are restarted (Kubernetes retries exit code "
                f"{PEER_LOST_EXIT_CODE}) or when the same job is run again with --resume auto.")

    def _silent_message(self, peer: Peer, silent_s: float) -> str:
        return (f"lost peer: {peer.label()} has sent no heartbeat for {silent_s:.0f} s (train.peer_timeout_s is "
                f"{self.timeout_s:g}): its node is gone, frozen, or its network is cut. {self._tail()}")

    def _store_lost_message(self) -> str:
        master = self.peers[0]
        why = f" ({self._store_error})" if self._store_error else ""
        return (f"lost contact with the job: the rendezvous store at {self.store_label} (hosted by the node of "
                f"{master.label()}) has not answered for {self.timeout_s:g} s{why}: that node is gone, or this "
                f"node's network is cut. {self._tail()}")

    def explain(self, err: BaseException) -> PeerLost | None:
        """A PeerLost for a transport failure seen by the training thread (a dead peer), else None.

        A transport failure is one of torch.distributed's own exception types for the backend (NCCL) and
        the network (the store's client), or a RuntimeError in the transport's own words (gloo raises no
        type of its own). Anything else is a bug or a bad input, which a retry would only repeat: exit 75
        would have the Job's podFailurePolicy retry it without end."""
        import torch.distributed as dist

        text = str(err)
        is_transport = isinstance(err, (dist.DistBackendError, dist.DistNetworkError)) or (
            isinstance(err, RuntimeError) and _TRANSPORT.search(text) is not None)
        if not is_transport or _MISUSE.search(text):
            return None
        if self.lost:
            return PeerLost(self.lost)
        detail = _transport_detail(text) or type(err).__name__
        culprit = self._peer_at(text)
        who = culprit.label() if culprit else "a peer"
        return PeerLost(f"lost peer: {who} broke off in the middle of a collective ({detail}): its process or its "
                        f"node died. {self._tail()}")

    def _peer_at(self, text: str) -> Peer | None:
        addresses = {m.removeprefix("::ffff:") for m in _ADDRESS.findall(text)}
        others = [p for p in self.peers if p.rank != self.me.rank]
        found = [p for p in others if p.address in addresses]
        if found:
            return found[0]
        return others[0] if len(others) == 1 else None  # two ranks: the other one is the only candidate

    # -- the end -----------------------------------------------------------------------------

    def stop(self, done: bool) -> None:
        """Stop watching. done: this rank finished, and its peers stop watching it (only after a success:
        on a failure the threads may be blocked on a dead store, and nobody waits for them)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if not done:
            return
        self._beat.join(timeout=self.interval_s + 10)  # its last beat must not overwrite the mark below
        try:
            (self.store or self.connect()).set(f"{self.prefix}/beat/{self.me.rank}", _DONE)
        except Exception:  # the job is over; a peer that cannot read this has nothing left to wait for
            pass

    def sign_off(self) -> None:
        """After a successful run: every node but the master's says so; the master's node waits for them."""
        others = [p for p in self.peers if p.node != 0]
        if not others:
            return
        try:
            store = self.store or self.connect()
            if self.me.node != 0:
                store.set(f"{self.prefix}/left/{self.me.rank}", "1")
                return
            keys = [f"{self.prefix}/left/{p.rank}" for p in others]
            deadline = time.monotonic() + SIGN_OFF_WAIT_S
            while not store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(SIGN_OFF_GRACE_S)
        except Exception:  # best effort: the run has succeeded and its outputs are written
            pass
