"""How pysyncobj's peer connections put frames on the wire: stored, and appended.

The problem, measured with py-spy on the leader while it took 64 KiB publishes
(docs/PERFORMANCE.md, the NATS comparison): pysyncobj 0.3.17's ``TcpConnection``
spends the tick thread on two things that are not Raft.

* Every frame goes through ``zlib.compress(..., 3)``, once per follower. Event
  payloads are base64 of whatever the client sent, usually already dense: a batch
  of four 64 KiB events costs about 6.6 ms of compression per follower.
* The write buffer is ``bytes``: each new frame is appended by copying the whole
  buffer, and each partial ``send`` copies the rest of it. When a busy follower
  reads slowly, the buffer holds megabytes and this turns quadratic (60 % of the
  leader's samples with 64 KiB payloads, once compression was gone).

The approach: replace ``send`` and the private ``__processSend`` of
``TcpConnection`` with versions that compress at level 0 and keep the write
buffer in a ``bytearray``. zlib level 0 emits stored blocks (a copy plus a
checksum, about 0.1 ms for that batch), and the receiver's unchanged
``zlib.decompress`` reads them, so nodes with and without this change speak to
each other. A bytearray grows in place, and deleting its sent head is cheap in
CPython (the start offset moves). The frame format is unchanged: length prefix,
then the optionally encrypted, zlib-wrapped pickle, with the random key first
when pysyncobj uses one.

A third cost is Raft's own: pysyncobj's leader sends entries as soon as they
exist and moves its ``nextIndex`` for that follower past them (pipelining), but
every successful answer sets ``nextIndex`` back to the index the follower had
reached when it answered. With several AppendEntries in flight, the leader then
sends the in-flight entries again, and the follower cuts and re-appends them
(``ensync_journal_truncations_avoided_total`` counted about one entry in three
under pipelined publishing). ``keep_pipelined_next_index`` keeps the leader's
``nextIndex`` from moving back on a success. A follower that misses entries
answers with ``reset``, which still moves it back, as Raft requires.

Rejected: a ``TcpConnection`` subclass (the transport builds its connections
itself, so that would need a copy of the transport's connect code); keeping
level 3 (peers on a LAN have bandwidth to spare, the tick thread has none).
What stays private: the name-mangled attributes ``_TcpConnection__writeBuffer``,
``__socket`` and ``__trySendBuffer``, checked by ``install``; SyncObj's
``__raftNextIndex`` dict and the transport's message callback, checked by
``keep_pipelined_next_index``.
"""

from __future__ import annotations

import errno
import struct
import zlib

import pysyncobj.pickle
import pysyncobj.tcp_connection
from pysyncobj.monotonic import monotonic

PEER_COMPRESSION_LEVEL = 0
_Connection = pysyncobj.tcp_connection.TcpConnection
_RETRY_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK)


def _send(self, message) -> None:
    """TcpConnection.send: one frame appended to the write buffer, then sent."""
    if self.sendRandKey:
        message = (self.sendRandKey, message)
    data = zlib.compress(pysyncobj.pickle.dumps(message), PEER_COMPRESSION_LEVEL)
    if self.encryptor:
        data = self.encryptor.encrypt_at_time(data, int(monotonic()))

    buffer = self._TcpConnection__writeBuffer
    if not isinstance(buffer, bytearray):  # pysyncobj resets it to bytes()
        buffer = self._TcpConnection__writeBuffer = bytearray(buffer)
    buffer += struct.pack("i", len(data))
    buffer += data
    self._TcpConnection__trySendBuffer()


def _process_send(self) -> bool:
    """TcpConnection.__processSend: one ``send``; True when more may go now."""
    buffer = self._TcpConnection__writeBuffer
    if not buffer:
        return False
    try:
        sent = self._TcpConnection__socket.send(buffer)
    except OSError as exc:
        if exc.errno not in _RETRY_ERRNOS:
            self.disconnect()
        return False
    if sent < 0:
        self.disconnect()
        return False
    if sent == 0:
        return False
    if isinstance(buffer, bytearray):
        del buffer[:sent]
    else:
        self._TcpConnection__writeBuffer = buffer[sent:]
    return True


def install() -> None:
    """Patch pysyncobj's peer connections as described above. Idempotent."""
    for name in ("send", "_TcpConnection__processSend",
                 "_TcpConnection__trySendBuffer"):
        assert hasattr(_Connection, name), f"pysyncobj changed: no TcpConnection.{name}"
    _Connection.send = _send
    _Connection._TcpConnection__processSend = _process_send


def keep_pipelined_next_index(syncobj) -> None:
    """Wrap ``syncobj``'s message handler as the module docstring says.

    Runs on the tick thread like the handler it wraps; call it once, right
    after ``SyncObj.__init__``.
    """
    transport = syncobj._SyncObj__transport
    handle = transport._onMessageReceivedCallback
    assert handle is not None, "pysyncobj changed: no message callback"
    assert isinstance(syncobj._SyncObj__raftNextIndex, dict)

    def on_message(node, message) -> None:
        ahead = None
        if (type(message) is dict and message.get("type") == "next_node_idx"
                and message.get("success") and not message.get("reset")):
            ahead = syncobj._SyncObj__raftNextIndex.get(node)
        handle(node, message)
        if ahead is not None:
            next_index = syncobj._SyncObj__raftNextIndex
            if node in next_index and next_index[node] < ahead:
                next_index[node] = ahead

    transport.setOnMessageReceivedCallback(on_message)
