"""Whether this node may be looking at an old state: marks for "lost touch".

The problem (jepsen-lite seed 31, ``--nemesis pause``). A node that was stopped
(SIGSTOP) or cut off still believes what it last applied. When it runs again it
first reads what the kernel buffered meanwhile, or TCP retransmits: AppendEntries
sent seconds ago, whose ``commit_index`` is as old as they are. It applies those
entries, its applied index reaches that old commit index, so it does not look
behind (``PUSH_LAG_ENTRIES_MAX`` in node/server.py sees nothing), and it pushes
records assigned to its clients back then, which the cluster has since given to
other consumers and seen acknowledged. A consumer then gets an event that was
already acked: ``redelivered_after_ack``.

What a node can notice by itself is the gap. ``lost_touch_total`` counts the
times a gap was seen, on the tick thread:

* a tick that comes more than ``gap_ms`` after the one before (the process, or
  its tick thread, stood still);
* an AppendEntries that arrives more than ``gap_ms`` after the one before (the
  leader sends one every few ms; a node that heard none for this long was cut
  off, paused, or is new). ``SyncingTCPTransport`` reports each one here before
  pysyncobj sees it, so the mark comes before any entry or commit index it carries.

A node that starts counts one mark: it has heard nobody yet. node/server.py holds
pushes while marks are newer than its last Raft barrier: a barrier proposed after
the mark and applied here proves that everything committed before it, acks from
other nodes included, is in this node's state, and the held pushes are checked
against that state before they go out.
"""

from __future__ import annotations

import time

# Far above the leader's AppendEntries period (10 ms) and the tick (2 ms); far
# below the ack timeouts after which the leader hands an event to someone else.
LOST_TOUCH_GAP_MS = 500


class Freshness:
    """Written on the tick thread only; ``lost_touch_total`` and ``silent`` may be
    read from any thread (plain int and float reads)."""

    def __init__(self, gap_ms: int = LOST_TOUCH_GAP_MS) -> None:
        self.gap_s = gap_ms / 1000
        self.lost_touch_total = 1  # a new node has heard nobody yet
        self._last_tick_s = time.monotonic()
        self._last_append_s: float | None = None

    def tick(self) -> None:
        """Call at every tick (a pysyncobj tick callback)."""
        now = time.monotonic()
        if now - self._last_tick_s > self.gap_s:
            self.lost_touch_total += 1
        self._last_tick_s = now

    def append_received(self) -> None:
        """Call for every AppendEntries, before pysyncobj handles it."""
        now = time.monotonic()
        if self._last_append_s is None or now - self._last_append_s > self.gap_s:
            self.lost_touch_total += 1
        self._last_append_s = now

    def silent(self) -> bool:
        """True while the tick thread has not run for ``gap_ms``: it stood still
        and has not yet counted that (another thread asks)."""
        return time.monotonic() - self._last_tick_s > self.gap_s
