"""raft/peer_wire.py: pysyncobj's peer frames, stored and appended, and a
leader that does not resend what is already in flight.

The connection methods run on a real ``TcpConnection`` whose socket is a fake
that takes a set number of bytes per ``send``; what it received is decoded the
way pysyncobj's receiving side decodes a frame. ``keep_pipelined_next_index``
runs against a stand-in with the two private attributes it touches.
"""

from __future__ import annotations

import errno
import struct
import zlib

import pysyncobj.pickle
import pytest
from pysyncobj.tcp_connection import TcpConnection

from raft import peer_wire


class TrickleSocket:
    """Takes at most ``per_send`` bytes per call; EAGAIN once ``full``."""

    def __init__(self, per_send: int) -> None:
        self.per_send = per_send
        self.full = False
        self.received = bytearray()

    def send(self, data) -> int:
        if self.full:
            raise OSError(errno.EAGAIN, "would block")
        taken = bytes(data[: self.per_send])
        self.received += taken
        return len(taken)


def connection(sock: TrickleSocket) -> TcpConnection:
    conn = TcpConnection.__new__(TcpConnection)  # no poller, no real socket
    conn.sendRandKey = None
    conn.encryptor = None
    conn._TcpConnection__socket = sock
    conn._TcpConnection__writeBuffer = bytes()
    conn._TcpConnection__trySendBuffer = lambda: _drain(conn)
    return conn


def _drain(conn: TcpConnection) -> None:
    while peer_wire._process_send(conn):
        pass


def decode_frames(data: bytes) -> list:
    """What pysyncobj's reader makes of a byte stream: length, zlib, pickle."""
    messages = []
    while data:
        (length,) = struct.unpack("i", data[:4])
        messages.append(pysyncobj.pickle.loads(zlib.decompress(data[4:4 + length])))
        data = data[4 + length:]
    return messages


def test_frames_are_stored_not_compressed_and_an_unchanged_reader_decodes_them():
    sock = TrickleSocket(per_send=1 << 20)
    conn = connection(sock)
    message = {"type": "append_entries", "entries": [(b"x" * 5000, 1, 1)]}

    peer_wire._send(conn, message)

    assert decode_frames(bytes(sock.received)) == [message]
    assert len(sock.received) > 5000  # level 0: the payload is not squeezed


def test_partial_sends_deliver_every_frame_whole_and_in_order():
    sock = TrickleSocket(per_send=7)
    conn = connection(sock)
    messages = [{"n": i, "data": b"y" * (i * 100)} for i in range(20)]

    for message in messages:
        peer_wire._send(conn, message)

    assert decode_frames(bytes(sock.received)) == messages
    assert not conn._TcpConnection__writeBuffer


def test_bytes_left_unsent_wait_in_the_buffer_for_the_next_send():
    sock = TrickleSocket(per_send=10)
    conn = connection(sock)
    sock.full = True

    peer_wire._send(conn, {"n": 1})
    held = bytes(conn._TcpConnection__writeBuffer)
    sock.full = False
    _drain(conn)

    assert held and decode_frames(bytes(sock.received)) == [{"n": 1}]


class FakeTransport:
    def __init__(self, handle) -> None:
        self._onMessageReceivedCallback = handle

    def setOnMessageReceivedCallback(self, callback) -> None:
        self._onMessageReceivedCallback = callback


class FakeSyncObj:
    """pysyncobj's handler as far as nextIndex goes (syncobj.py, next_node_idx)."""

    def __init__(self) -> None:
        self._SyncObj__raftNextIndex = {"f": 1}
        self._SyncObj__transport = FakeTransport(self.handle)

    def handle(self, node, message) -> None:
        if message.get("reset") or message.get("success"):
            self._SyncObj__raftNextIndex[node] = message["next_node_idx"]

    def receive(self, **message) -> None:
        self._SyncObj__transport._onMessageReceivedCallback("f", message)


@pytest.fixture
def leader() -> FakeSyncObj:
    syncobj = FakeSyncObj()
    peer_wire.keep_pipelined_next_index(syncobj)
    syncobj._SyncObj__raftNextIndex["f"] = 30  # entries up to 29 are in flight
    return syncobj


def test_a_success_for_an_earlier_append_does_not_move_next_index_back(leader):
    leader.receive(type="next_node_idx", next_node_idx=11, success=True, reset=False)

    assert leader._SyncObj__raftNextIndex["f"] == 30


def test_a_success_beyond_next_index_moves_it_forward(leader):
    leader.receive(type="next_node_idx", next_node_idx=41, success=True, reset=False)

    assert leader._SyncObj__raftNextIndex["f"] == 41


def test_a_reset_from_a_follower_that_missed_entries_moves_next_index_back(leader):
    leader.receive(type="next_node_idx", next_node_idx=11, success=False, reset=True)

    assert leader._SyncObj__raftNextIndex["f"] == 11


def test_other_messages_pass_through_untouched(leader):
    seen = []
    leader.handle = lambda node, message: seen.append(message)
    leader._SyncObj__transport = FakeTransport(leader.handle)
    peer_wire.keep_pipelined_next_index(leader)

    leader.receive(type="append_entries", term=3)

    assert seen == [{"type": "append_entries", "term": 3}]
