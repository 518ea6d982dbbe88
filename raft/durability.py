"""Where pysyncobj's log is flushed: once per burst of work, before anything leaves.

The problem. Raft counts an entry as committed once a majority stores it, and
"stores" must mean stable storage: a follower may only acknowledge entries that
would survive a power cut, and the leader, which pysyncobj always counts as one of
the majority, must have flushed its own copy before its vote in that count matters.
pysyncobj 0.3.17 has no hook between "entry appended" and "message sent". It does
all of its Raft work on one tick thread.

The approach. ``raft.journal.DurableJournal`` buffers appends and flushes them in
``sync()``. ``SyncingTCPTransport`` holds back every outgoing Raft message while the
journal has unflushed entries, and releases the held messages after one ``sync()``:

* A follower's AppendEntries answer, a vote grant and the leader's AppendEntries
  leave only after the sender's log is on disk. The leader commits an entry only
  after a follower acknowledged it, and that follower only received it after the
  leader's flush, so both copies are durable when the count reaches two of three.
* The transport flushes at two points of each tick: right after the poller has
  handled everything that arrived (a follower's acknowledgements), and at the end
  of the tick's own work (the leader's new entries and AppendEntries). Whatever was
  appended in between shares one ``fdatasync``. This matters most with
  ``appendEntriesUseBatch=False``, where pysyncobj sends one AppendEntries per
  entry: syncing inside ``send`` would cost one flush per entry on every node.
* While the journal is clean, messages go out at once, so heartbeats and the
  answers to empty AppendEntries cost nothing. Once one message is held, every
  later one queues behind it, which keeps each connection's order.
* The end-of-tick flush also covers a single-node cluster, which commits without
  sending anything.

Rejected: flushing inside ``add()`` (one flush per entry); flushing inside ``send``
(one per entry and per follower with unbatched AppendEntries, measured 406 of 406);
flushing on a timer (acknowledgements would race ahead of it); patching SyncObj's
name-mangled methods. We use the documented ``transportClass`` extension point. Two
private details of pysyncobj remain: the journal attribute, read in
``durable_journal_of``, and the poller's ``poll``, wrapped in ``_flush_after_poll``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj
import pysyncobj.transport

from raft.commit_guard import guard_commit_index
from raft.journal import DurableJournal, JournalError
from raft.peer_auth import PeerRefusals, check_connection, remote_address

# Message types whose sending promises nothing about the sender's log.
_SYNC_EXEMPT_MESSAGE_TYPES = frozenset({"apply_command", "apply_command_response"})

# Held messages before the transport flushes early instead of waiting for the tick
# (a snapshot transfer can produce many in one tick).
OUTBOX_MESSAGES_MAX = 4096

_TICK_SYNC_ATTRIBUTE = "_ensync_tick_sync_registered"


@dataclasses.dataclass(frozen=True)
class OutboxStatistics:
    held_messages: int  # waiting for the next flush right now
    early_flushes_total: int  # flushes forced by OUTBOX_MESSAGES_MAX
    dropped_messages_total: int  # discarded because the journal failed


def _create_durable_journal(journalFile: str | None = None) -> DurableJournal:
    if journalFile is None:
        raise ValueError("journalFile must be set: the Raft log always lives on disk")
    return DurableJournal(journalFile)


def install_durable_journal() -> None:
    """Make every SyncObj created from now on use ``DurableJournal``. Idempotent.

    pysyncobj imports ``createJournal`` into ``pysyncobj.syncobj`` and calls it from
    ``SyncObj.__init__``, so that module attribute is the one to replace.
    """
    pysyncobj.syncobj.createJournal = _create_durable_journal


def durable_journal_of(syncobj: Any) -> DurableJournal:
    """The journal of ``syncobj``; TypeError if it is not a DurableJournal."""
    # pysyncobj 0.3.17 keeps the log in ``SyncObj.__raftLog`` with no accessor, and
    # Python stores that name as ``_SyncObj__raftLog``. This is the only place that
    # depends on it; check it when upgrading pysyncobj.
    journal = getattr(syncobj, "_SyncObj__raftLog", None)
    if not isinstance(journal, DurableJournal):
        raise TypeError(
            f"SyncObj journal is {type(journal).__name__}, not DurableJournal; "
            "call install_durable_journal() and set journalFile"
        )
    return journal


def sync_journal_on_tick(syncobj: Any) -> None:
    """Sync the journal at the end of every tick of ``syncobj``. Idempotent.

    ``SyncingTCPTransport`` already flushes at the end of each tick; this is for a
    SyncObj built with another transport, and harmless next to ours.
    """
    journal = durable_journal_of(syncobj)
    if getattr(journal, _TICK_SYNC_ATTRIBUTE, False):
        return
    syncobj.addOnTickCallback(journal.sync)
    setattr(journal, _TICK_SYNC_ATTRIBUTE, True)


def _message_needs_durable_log(message: Any) -> bool:
    if not isinstance(message, dict):
        return True
    return message.get("type") not in _SYNC_EXEMPT_MESSAGE_TYPES


class Outbox:
    """Holds outgoing messages while the journal has unflushed entries.

    ``send_now(node, message)`` is the transport's real send. Single-threaded: the
    tick thread does all of it.
    """

    def __init__(
        self, journal: DurableJournal, send_now: Callable[[Any, Any], bool]
    ) -> None:
        self._journal = journal
        self._send_now = send_now
        self._held: list[tuple[Any, Any]] = []
        self._early_flushes_total = 0
        self._dropped_messages_total = 0

    def send(self, node: Any, message: Any) -> bool:
        """Send now if that promises nothing unflushed; otherwise hold the message.

        pysyncobj ignores the result, so a held message reports True.
        """
        held = self._held or (
            self._journal.dirty and _message_needs_durable_log(message)
        )
        if not held:
            return self._send_now(node, message)

        self._held.append((node, message))
        if len(self._held) >= OUTBOX_MESSAGES_MAX:
            self._early_flushes_total += 1
            self.flush()
        return True

    def flush(self) -> None:
        """Flush the journal once, then send every held message in order."""
        try:
            self._journal.sync()
        except JournalError:
            # A failed journal never syncs again, so this node must not speak for
            # its log any more. Drop and count rather than raise on every tick;
            # the journal logged the failure once.
            self._dropped_messages_total += len(self._held)
            self._held.clear()
            return

        held, self._held = self._held, []
        for node, message in held:
            self._send_now(node, message)

    def clear(self) -> None:
        self._held.clear()

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            held_messages=len(self._held),
            early_flushes_total=self._early_flushes_total,
            dropped_messages_total=self._dropped_messages_total,
        )


class SyncingTCPTransport(pysyncobj.transport.TCPTransport):
    """TCPTransport that sends nothing while the local journal has unflushed entries.

    Pass it as ``transportClass`` to ``SyncObj``. With a cluster secret it also
    reports peers whose frames fail the secret check (``raft/peer_auth.py``).
    """

    def __init__(self, syncObj, selfNode, otherNodes) -> None:
        # SyncObj creates its journal and poller before its transport.
        send_now = super().send
        self.outbox = Outbox(durable_journal_of(syncObj), send_now)
        # Before super().__init__, which adds the peers' connections. The SyncObj
        # may bring its own counter, to show it in its statistics.
        self.peer_refusals = getattr(syncObj, "peer_refusals", None) or PeerRefusals()
        # raft/freshness.py, when the SyncObj brings one: told of every
        # AppendEntries before pysyncobj applies what it carries.
        self._freshness = getattr(syncObj, "freshness", None)
        super().__init__(syncObj, selfNode, otherNodes)

        syncObj.addOnTickCallback(self.outbox.flush)
        _flush_after_poll(syncObj._poller, self.outbox.flush)

    def send(self, node, message) -> bool:
        return self.outbox.send(node, message)

    def _onMessageReceived(self, node, message) -> None:
        # Called on the tick thread, like pysyncobj's handler.
        if (self._freshness is not None and isinstance(message, dict)
                and message.get("type") == "append_entries"):
            self._freshness.append_received()
        # A snapshot message must not commit our unverified log suffix
        # (raft/commit_guard.py).
        super()._onMessageReceived(
            node, guard_commit_index(message, self._syncObj.raftCommitIndex))

    def addNode(self, node) -> None:
        super().addNode(node)
        # Only for the peers we dial; a refusal here means whatever answers at a
        # member's address does not hold the secret (an impostor on its port).
        conn = self._connections.get(node)
        if conn is not None:
            check_connection(conn, node.address, "outgoing", self.peer_refusals)

    def _onNewIncomingConnection(self, conn) -> None:
        super()._onNewIncomingConnection(conn)
        check_connection(conn, remote_address(conn), "incoming", self.peer_refusals)

    def destroy(self) -> None:
        self.outbox.clear()
        super().destroy()


def _flush_after_poll(poller: Any, flush) -> None:
    # pysyncobj's tick ends with ``poll()``, which reads the sockets and handles
    # every message that arrived. Flushing right after it answers the whole burst
    # with one fdatasync, before the next tick spends time applying entries.
    poll = poller.poll

    def poll_then_flush(timeout):
        poll(timeout)
        flush()

    poller.poll = poll_then_flush
