"""The peer watch: heartbeats through a real TCPStore, judged by time; and the trainer with it.

The unit tests run several watches in this process against a real store server, each with its
own client, as ranks on several nodes would; `on_lost` collects what a rank would have printed
before ending its process. The end-to-end test runs two real ranks whose evaluations outlast the
peer timeout several times over: slow but alive must never read as lost.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from conftest import free_port, read_jsonl, train_run

from pipeline.distributed.peers import Peer, PeerWatch

TIMEOUT_S = 2.0  # interval 0.5 s
PREFIX = "pipeline/peers/test"


class Ranks:
    """n watches on one store, started together, each recording what it would have said."""

    def __init__(self, n: int, port: int, nodes: list[int] | None = None):
        self.port = port
        self.peers = [Peer(r, f"host-{r}", f"10.0.0.{r + 1}", (nodes or list(range(n)))[r]) for r in range(n)]
        self.lost: list[list[str]] = [[] for _ in range(n)]
        setup = self.client()
        for r in range(n):
            setup.set(f"{PREFIX}/beat/{r}", "0")
        self.watches = [PeerWatch(self.client, PREFIX, self.peers[r], self.peers, TIMEOUT_S, f"127.0.0.1:{port}",
                                  lambda: "stopped at step 7 of 10; the newest checkpoint is ckpt/step-5.",
                                  on_lost=self.lost[r].append) for r in range(n)]

    def client(self):
        return dist.TCPStore("127.0.0.1", self.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=2))

    def begin(self) -> None:
        for w in self.watches:
            w.begin()

    def stop(self) -> None:
        for w in self.watches:
            w.stop(done=False)

    def wait_lost(self, rank: int, within: float, start: float) -> tuple[str, float]:
        """What rank `rank` declared, and how long after `start`."""
        while time.monotonic() - start < within:
            if self.lost[rank]:
                return self.lost[rank][0], time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"rank {rank} declared nothing within {within} s")


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


def test_a_rank_that_stops_beating_is_named_by_every_other_rank_within_the_timeout(server):
    with running(3, server.port) as ranks:
        time.sleep(1.0)
        ranks.watches[2].stop(done=False)  # frozen: no more beats, and no word that it finished
        frozen = time.monotonic()
        for r in (0, 1):
            message, took = ranks.wait_lost(r, TIMEOUT_S + 3, frozen)
            assert took >= TIMEOUT_S - 1.0, f"declared after {took:.1f} s, before the timeout"
            assert message.startswith("lost peer: rank 2 (host host-2, 10.0.0.3) has sent no heartbeat for")
            assert "stopped at step 7 of 10; the newest checkpoint is ckpt/step-5." in message
            assert f"This rank ({r}, host host-{r})" in message
        assert ranks.lost[2] == []


def test_a_rank_whose_training_thread_hogs_the_interpreter_is_not_lost(server):
    with running(2, server.port) as ranks:
        end = time.monotonic() + 3 * TIMEOUT_S
        n = 0
        while time.monotonic() < end:  # pure Python: holds the GIL except at the interpreter's switch points
            n += 1
        assert ranks.lost == [[], []]


def test_a_rank_that_finished_is_not_waited_for(server):
    with running(2, server.port) as ranks:
        ranks.watches[1].stop(done=True)
        time.sleep(2 * TIMEOUT_S + 1)
        assert ranks.lost == [[], []]


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
        time.sleep(1.0)
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


def test_the_master_node_leaves_last(server):
    ranks = Ranks(3, server.port, nodes=[0, 0, 1])
    left = threading.Event()

    def master() -> None:
        ranks.watches[0].sign_off()
        left.set()

    thread = threading.Thread(target=master)
    thread.start()
    time.sleep(1.0)
    assert not left.is_set(), "node 0 left before node 1 signed off"
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
