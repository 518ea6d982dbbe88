"""A snapshot message never commits a follower's unverified log suffix.

Regression for jepsen-lite seed 31 (``--nemesis partition``): an old leader cut
off by a one-way partition kept entries of its term that the new leader never
had. The new leader sent it a snapshot; on the first chunk pysyncobj raised the
follower's commit index to the end of its own log and applied those entries, and
the follower answered a publish with an offset the cluster had given to another
event and an ack the cluster never applied (``inconsistent_idem``,
``redelivered_after_ack``). raft/commit_guard.py has the whole story.

Here a real SyncObj follower (pysyncobj, our journal and transport) is driven by
hand, one tick at a time, and fed the leader's messages through the transport's
receive path, the way a socket would deliver them: first five entries it stores
but nobody commits, then snapshot messages with a high commit index. The control
runs pysyncobj's own transport and shows the bug is real.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pysyncobj.syncobj
import pysyncobj.transport
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.syncobj import _COMMAND_TYPE, _bchr

from raft.commit_guard import guard_commit_index, is_snapshot_message
from raft.durability import SyncingTCPTransport, install_durable_journal
from raft.freshness import Freshness

UNCOMMITTED_ENTRIES = 5
LEADER_COMMIT_INDEX = 100  # far beyond anything the follower holds
TICKS = 3


@pytest.fixture
def durable_journal_installed(monkeypatch):
    # monkeypatch restores pysyncobj's own factory after the test.
    monkeypatch.setattr(pysyncobj.syncobj, "createJournal",
                        pysyncobj.syncobj.createJournal)
    install_durable_journal()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Counter(SyncObj):
    def __init__(self, address: str, peer: str, conf: SyncObjConf,
                 transport_class) -> None:
        self.freshness = Freshness()  # as ReplicatedBroker brings one
        super().__init__(address, [peer], conf, transportClass=transport_class)
        self.value = 0

    @replicated
    def incr(self) -> int:
        self.value += 1
        return self.value


def _recording(transport_class):
    """A subclass of ``transport_class`` that keeps the instance SyncObj makes."""
    class Recording(transport_class):
        made: list = []

        def __init__(self, *args) -> None:
            super().__init__(*args)
            Recording.made.append(self)

    return Recording


def _follower(tmp_path: Path, transport_class):
    address = f"127.0.0.1:{_free_port()}"
    peer = f"127.0.0.1:{_free_port()}"  # nobody listens: the leader is us, by hand
    conf = SyncObjConf(journalFile=str(tmp_path / "journal"), bindAddress=address,
                       autoTick=False, raftMinTimeout=60, raftMaxTimeout=70,
                       connectionTimeout=100)  # no election during the test
    transport_class = _recording(transport_class)
    node = _Counter(address, peer, conf, transport_class)
    node.doTick(0)
    return node, transport_class.made[0], next(iter(node.otherNodes))


def _feed_uncommitted_then_snapshot(node, transport, leader) -> None:
    assert node.raftCommitIndex == 1 and node.getStatus()["log_len"] == 1
    command = _bchr(_COMMAND_TYPE.REGULAR) + pickle.dumps(node._methodToID["incr_v0"])
    entries = [(command, index, 1) for index in range(2, 2 + UNCOMMITTED_ENTRIES)]
    # Term 1's leader: five entries after the first, none committed yet.
    transport._onMessageReceived(leader, {
        "type": "append_entries", "term": 1, "commit_index": 0, "entries": entries,
        "prevLogIdx": 1, "prevLogTerm": 0})
    node.doTick(0)
    assert node.getStatus()["log_len"] == 1 + UNCOMMITTED_ENTRIES
    assert (node.raftCommitIndex, node.value) == (1, 0)

    # Term 2's leader lacks them and sends a snapshot: a first chunk, then a
    # message whose data is not ready yet (None). Neither checks our log.
    for serialized in ((b"first of several chunks", True, False), None):
        transport._onMessageReceived(leader, {
            "type": "append_entries", "term": 2,
            "commit_index": LEADER_COMMIT_INDEX, "serialized": serialized})
    for _ in range(TICKS):
        node.doTick(0)


def test_a_snapshot_chunk_does_not_commit_the_followers_own_entries(
        durable_journal_installed, tmp_path):
    node, transport, leader = _follower(tmp_path, SyncingTCPTransport)
    try:
        _feed_uncommitted_then_snapshot(node, transport, leader)
        assert node.raftCommitIndex == 1
        assert (node.raftLastApplied, node.value) == (1, 0), "applied uncommitted"
        # The transport also told raft/freshness.py of the first AppendEntries.
        assert node.freshness.lost_touch_total == 2
    finally:
        node.destroy()


def test_without_the_guard_pysyncobj_applies_entries_nobody_committed(
        durable_journal_installed, tmp_path):
    # The control: pysyncobj's own transport shows the bug the guard removes.
    node, transport, leader = _follower(tmp_path, pysyncobj.transport.TCPTransport)
    try:
        _feed_uncommitted_then_snapshot(node, transport, leader)
        assert node.raftCommitIndex == 1 + UNCOMMITTED_ENTRIES
        assert node.value == UNCOMMITTED_ENTRIES
    finally:
        node.destroy()


def test_the_guard_touches_only_snapshot_messages_and_only_lowers():
    entries = {"type": "append_entries", "term": 3, "commit_index": 50,
               "entries": [], "prevLogIdx": 40, "prevLogTerm": 3}
    assert guard_commit_index(entries, 10) is entries  # checked against the log
    chunk = {"type": "append_entries", "term": 3, "commit_index": 50,
             "serialized": (b"x", True, True)}
    assert is_snapshot_message(chunk)
    assert guard_commit_index(chunk, 10) == {**chunk, "commit_index": 10}
    assert chunk["commit_index"] == 50, "the caller's message is not changed"
    assert guard_commit_index(chunk, 60) is chunk  # never raises the index
    vote = {"type": "request_vote", "term": 4}
    assert guard_commit_index(vote, 10) is vote
    assert guard_commit_index(["not", "a", "dict"], 10) == ["not", "a", "dict"]
