"""The peer watch: heartbeats through a real TCPStore, judged by time; and the trainer with it.

The unit tests run several watches in this process against a real store server, each with its
own client, as ranks on several nodes would; `on_lost` collects what a rank would have printed
before ending its process; the tests wait for what the watches read and declare, not for a guessed
time. `explain` is tested on the transport's own words, recorded from a real gloo failure and made
anew by killing a real gloo peer mid all-reduce. The end-to-end test runs two real ranks whose
evaluations outlast the peer timeout several times over: slow but alive must never read as lost.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, read_jsonl, train_run

from pipeline.distributed.peers import Peer, PeerWatch

TIMEOUT_S = 2.0  # interval 0.5 s
PREFIX = "pipeline/peers/test"


class Ranks:
    """n watches on one store, started together, each recording what it would have said.

    Each watch talks to the store through a `Client` that reports what its watch read, so that a
    test waits for the condition it needs (every rank has seen every other beat, a rank has read
    another's done mark) instead of for a guessed time."""

    def __init__(self, n: int, port: int, nodes: list[int] | None = None, addresses: list[str] | None = None):
        self.port = port
        addresses = addresses or [f"10.0.0.{r + 1}" for r in range(n)]
        self.peers = [Peer(r, f"host-{r}", addresses[r], (nodes or list(range(n)))[r]) for r in range(n)]
        self.lost: list[list[str]] = [[] for _ in range(n)]
        self.read: list[list[bytes] | None] = [None] * n  # each watch's latest read of every beat
        self.changed = threading.Condition()
        setup = self.client()
        for r in range(n):
            setup.set(f"{PREFIX}/beat/{r}", "0")
        self.watches = [PeerWatch(functools.partial(Client, self, r), PREFIX, self.peers[r], self.peers, TIMEOUT_S,
                                  f"127.0.0.1:{port}", lambda: "stopped at step 7 of 10; the newest checkpoint is ckpt/step-5.",
                                  on_lost=functools.partial(self._declared, r)) for r in range(n)]

    def client(self):
        return dist.TCPStore("127.0.0.1", self.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=2))

    def begin(self) -> None:
        for w in self.watches:
            w.begin()

    def stop(self) -> None:
        for w in self.watches:
            w.stop(done=False)

    def _declared(self, rank: int, message: str) -> None:
        with self.changed:
            self.lost[rank].append(message)
            self.changed.notify_all()

    def _saw(self, rank: int, values: list[bytes]) -> None:
        with self.changed:
            self.read[rank] = list(values)
            self.changed.notify_all()

    def wait_until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout=within), f"{what}: not within {within} s"

    def wait_all_beating(self, within: float = 10) -> None:
        """Until every watch has read a beat of every rank: all are up and have heard from each other."""
        self.wait_until(lambda: all(seen is not None and b"0" not in seen for seen in self.read), within,
                        "every rank hears every other")

    def wait_lost(self, rank: int, within: float, start: float) -> tuple[str, float]:
        """What rank `rank` declared, and how long after `start`."""
        self.wait_until(lambda: bool(self.lost[rank]), within, f"rank {rank} declares a loss")
        return self.lost[rank][0], time.monotonic() - start

    def none_lost_for(self, seconds: float) -> bool:
        """True if no rank declares anything for `seconds` (returns at the first declaration)."""
        with self.changed:
            return not self.changed.wait_for(lambda: any(self.lost), timeout=seconds)


class Client:
    """A watch's store client: the real TCPStore, telling `Ranks` what its watch read."""

    def __init__(self, ranks: Ranks, rank: int):
        self.ranks, self.rank, self.store = ranks, rank, ranks.client()

    def set(self, key: str, value) -> None:
        self.store.set(key, value)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        values = self.store.multi_get(keys)
        self.ranks._saw(self.rank, values)
        return values

    def check(self, keys: list[str]) -> bool:
        return self.store.check(keys)


@contextlib.contextmanager
def running(n: int, port: int):
    ranks = Ranks(n, port)
    ranks.begin()
    try:
        yield ranks
    finally:
        ranks.stop()


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    yield store


@pytest.mark.slow
def test_a_rank_that_stops_beating_is_named_by_every_other_rank_within_the_timeout(server):
    with running(3, server.port) as ranks:
        ranks.wait_all_beating()
        ranks.watches[2].stop(done=False)  # frozen: no more beats, and no word that it finished
        frozen = time.monotonic()
        for r in (0, 1):
            message, took = ranks.wait_lost(r, TIMEOUT_S + 3, frozen)
            assert took >= TIMEOUT_S - 1.0, f"declared after {took:.1f} s, before the timeout"
            assert message.startswith("lost peer: rank 2 (host host-2, 10.0.0.3) has sent no heartbeat for")
            assert "stopped at step 7 of 10; the newest checkpoint is ckpt/step-5." in message
            assert f"This rank ({r}, host host-{r})" in message
        assert ranks.lost[2] == []


@pytest.mark.slow
def test_a_rank_whose_training_thread_hogs_the_interpreter_is_not_lost(server):
    with running(2, server.port) as ranks:
        end = time.monotonic() + 3 * TIMEOUT_S
        n = 0
        while time.monotonic() < end:  # pure Python: holds the GIL except at the interpreter's switch points
            n += 1
        assert ranks.lost == [[], []]


@pytest.mark.slow
def test_a_rank_that_finished_is_not_waited_for(server):
    with running(2, server.port) as ranks:
        stopped = time.monotonic()
        ranks.watches[1].stop(done=True)
        ranks.wait_until(lambda: ranks.read[0] is not None and ranks.read[0][1] == b"done", TIMEOUT_S,
                         "rank 0 reads rank 1's done mark")
        # Rank 1 is silent from here on: until well past the timeout, nobody may be declared lost.
        assert ranks.none_lost_for(stopped + 2 * TIMEOUT_S + 1 - time.monotonic()), ranks.lost


@pytest.mark.slow
def test_the_store_going_away_is_lost_contact_with_the_job():
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", (
        "import time, datetime, torch.distributed as d; "
        f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); time.sleep(600)")])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ranks = Ranks(2, port)
                break
            except Exception:
                assert time.monotonic() < deadline, "the store process did not start"
                time.sleep(0.2)
        ranks.begin()
        ranks.wait_all_beating()
        host.kill()
        gone = time.monotonic()
        for r in (0, 1):
            message, _took = ranks.wait_lost(r, TIMEOUT_S + 4, gone)
            assert message.startswith(f"lost contact with the job: the rendezvous store at 127.0.0.1:{port}")
            assert "(hosted by the node of rank 0 (host host-0, 10.0.0.1))" in message
        ranks.stop()
    finally:
        host.kill()
        host.wait()


# gloo's own words when a peer dies mid-collective, as torch raises them: a plain RuntimeError. The
# first as this torch (2.14, gloo's tcp/pair.cc) raised it when the other rank of an all-reduce was
# SIGKILLed (test_a_peer_killed_in_the_middle_of_a_real_gloo_all_reduce_is_a_lost_peer makes it anew).
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[10.0.0.3]:11472. This is typically caused by a remote worker crashing. Check the logs of the remote "
               "worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.0.0.3]:12345: Connection reset by "
              "peer. This is typically caused by a remote worker hanging or bugs in the application.")
GLOO_TIMEOUT = ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv "
                "operation to complete")


def test_a_transport_error_names_the_peer_at_its_address(server):
    ranks = Ranks(3, server.port)
    watch = ranks.watches[0]
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.3]:41234: Connection "
                        "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
    lost = watch.explain(gloo)
    assert lost is not None and lost.exit_code == 75
    assert str(lost).startswith("lost peer: rank 2 (host host-2, 10.0.0.3) broke off in the middle of a collective "
                                "(Read error [10.0.0.3]:41234: Connection reset by peer): its process or its node died.")
    # Without an address, several candidates: none is named.
    assert "lost peer: a peer broke off" in str(watch.explain(RuntimeError("Connection closed by peer")))
    # A bug in the step is not a lost peer.
    assert watch.explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")) is None
    assert watch.explain(ValueError("Connection reset by peer")) is None


def test_a_bug_that_mentions_send_or_recv_is_not_a_lost_peer_but_the_transport_s_own_errors_are(server):
    """Exit 75 makes the Job's podFailurePolicy retry without end: only the transport's failures may get it."""
    watch = Ranks(3, server.port).watches[0]
    for bug in (RuntimeError("could not send the batch to the model"),
                RuntimeError("recv buffer holds 64 samples but the batch needs 128"),
                RuntimeError("Timed out waiting for the data loader's first batch"),
                RuntimeError("socket closed by the tokenizer")):
        assert watch.explain(bug) is None, bug
    for text in (GLOO_CLOSED, GLOO_RESET, GLOO_TIMEOUT):
        lost = watch.explain(RuntimeError(text))
        assert lost is not None and lost.exit_code == 75, text
    assert str(watch.explain(RuntimeError(GLOO_CLOSED))).startswith(
        "lost peer: rank 2 (host host-2, 10.0.0.3) broke off in the middle of a collective (Connection closed by peer "
        "[10.0.0.3]:11472): its process or its node died.")
    # The transport's own exception types, whatever their words: the store's client when the store's
    # host died, and NCCL's failures.
    store_gone = dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote "
                                       "server shutdown or crash?")
    nccl = dist.DistBackendError("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, remote "
                                 "process exited or there was a network error, NCCL version 2.21.5")
    for err in (store_gone, nccl):
        lost = watch.explain(err)
        assert lost is not None and lost.exit_code == 75, err
    # NCCL's type raised for a wrong call is still a bug.
    misuse = dist.DistBackendError("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:317, invalid usage "
                                   "(run with NCCL_DEBUG=WARN for details), NCCL version 2.21.5\nncclInvalidUsage: This "
                                   "usually reflects invalid usage of NCCL library.")
    assert watch.explain(misuse) is None


GLOO_PEER = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.PrefixStore("gloo", dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, wait_for_workers=False,
                                               timeout=timedelta(seconds=30)))
group = dist.ProcessGroupGloo(store, 1, 2, timedelta(seconds=30))
time.sleep(600)  # never joins the all-reduce: it is killed in the middle of it
"""


@pytest.mark.slow
def test_a_peer_killed_in_the_middle_of_a_real_gloo_all_reduce_is_a_lost_peer(server):
    """The real thing: rank 0 (this process) in an all-reduce with rank 1 (a process) when rank 1 is SIGKILLed."""
    ranks = Ranks(3, server.port, addresses=["10.0.0.1", "127.0.0.1", "10.0.0.3"])
    peer = subprocess.Popen([sys.executable, "-c", GLOO_PEER, str(server.port)])
    try:
        group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", server), 0, 2, timedelta(seconds=30))
        work = group.allreduce([torch.ones(1000)])
        peer.kill()
        peer.wait()
        with pytest.raises(RuntimeError) as raised:
            work.wait()
    finally:
        peer.kill()
        peer.wait()
    lost = ranks.watches[0].explain(raised.value)
    assert lost is not None and lost.exit_code == 75, raised.value
    assert str(lost).startswith("lost peer: rank 1 (host host-1, 127.0.0.1) broke off in the middle of a collective "
                                "("), (str(lost), str(raised.value))


@pytest.mark.slow
def test_the_master_node_leaves_last(server):
    ranks = Ranks(3, server.port, nodes=[0, 0, 1])
    left = threading.Event()

    def master() -> None:
        ranks.watches[0].sign_off()
        left.set()

    thread = threading.Thread(target=master)
    thread.start()
    assert not left.wait(1.0), "node 0 left before node 1 signed off"
    signed = time.monotonic()
    ranks.watches[2].sign_off()  # node 1's rank: says so and goes
    assert left.wait(10)
    assert time.monotonic() - signed >= 1.5, "node 0 must give node 1's launcher time to reach its exit barrier"
    thread.join()


@pytest.mark.slow
def test_evaluations_longer_than_the_peer_timeout_do_not_lose_the_waiting_rank(tmp_path, fashion_shards):
    # A model big enough that rank 0's evaluation of the test split takes a few peer timeouts
    # while rank 1 waits in the next all-reduce.
    out = tmp_path / "slow-eval"
    proc = train_run(out, fashion_shards, "model.hidden_size=384", "train.max_steps=10", "eval.every_steps=5",
                     "checkpoint.every_steps=10", "train.peer_timeout_s=2", "eval.split=test", "wandb.mode=disabled",
                     nproc=2, timeout=900)
    assert "lost peer" not in proc.stderr and "lost contact" not in proc.stderr
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if "eval/seconds" in e]
    # The premise: each evaluation outlasted the peer timeout (2 s) that the waiting rank watches.
    assert len(evals) == 2 and min(e["eval/seconds"] for e in evals) > 2, evals


def test_from_the_side_of_a_cut_link_the_silent_store_is_named_not_the_peer_whose_beat_it_read_last(server):
    """The cut-off side's last read of the store may hold a peer's beat older than the read itself by up
    to a beat: judging that peer silent before the store would name the wrong failure."""
    ranks = Ranks(2, server.port)
    watch = ranks.watches[1]
    watch.connect = lambda: (_ for _ in ()).throw(RuntimeError("Connection reset by peer"))  # the link is cut
    watch.store = None
    now = time.monotonic()
    watch._store_ok = now - (TIMEOUT_S - 3 * watch.interval_s)  # the store's last answer, before the cut
    watch._last_change[0] = now - TIMEOUT_S  # rank 0's beat as that answer held it: a beat older
    watch.begin()
    try:
        ranks.wait_until(lambda: ranks.lost[1], within=3 * TIMEOUT_S, what="rank 1 declares something")
    finally:
        ranks.stop()
    assert ranks.lost[1][0].startswith("lost contact with the job: the rendezvous store"), ranks.lost[1]
