"""Queues: RocksDB holds every pending event, memory holds the head of each queue.

The problem: a queue may hold millions of events for an app that is offline, and
a node must not keep them all in memory. Yet the leader needs each queue's head at
once, in order: higher priority first, then commit order.

The approach: every pending event has an index row ``q/<app>;<name>;<rank>`` in
RocksDB, written and deleted by the apply step like any other state, so every
replica holds the same rows. Memory keeps a window: the smallest ranks of each
queue, with ``bound`` saying how far it reaches. Every pending rank at or below
``bound`` is in the window (``bound`` None: the whole queue is). An event enqueued
beyond the bound stays on disk only; when the window runs dry, it refills from
the index, ``QUEUE_WINDOW_EVENTS`` rows at a time. The window is a cache: what
apply writes never depends on it, so replicas with different windows stay equal.

Heap entries are removed lazily: an entry whose event left the queue, or was
re-ranked, is dropped when it reaches the top.
"""

from __future__ import annotations

import heapq

import orjson

from raft import schema

# Ranks per queue kept in memory after a refill or trim; a window grows to twice
# this before it is trimmed back.
QUEUE_WINDOW_EVENTS = 64
# Sorts below every real rank: "nothing of this queue is in memory yet".
_BELOW_ALL = (-99, -1)


def index_key(app: str, name: str, rank: tuple[int, int]) -> bytes:
    return index_prefix(app, name) + b"%x%012x" % (rank[0] + 9, rank[1])


def index_prefix(app: str, name: str) -> bytes:
    # ';' appears in neither a base64 app id nor an event name (node/session.py).
    return b"q/" + app.encode() + b";" + name.encode() + b";"


def parse_index_key(key: bytes) -> tuple[str, str, tuple[int, int]]:
    app, name, tail = key[2:].decode().split(";")
    return app, name, (int(tail[0], 16) - 9, int(tail[1:], 16))


class Queue:
    __slots__ = ("app", "name", "p", "heap", "bound", "pending")

    def __init__(self, app: str, name: str, pending: int = 0,
                 resident: bool = True) -> None:
        self.app = app
        self.name = name
        self.p = schema.partition_of(app)
        self.heap: list[tuple[int, int]] = []
        self.bound = None if resident else _BELOW_ALL
        self.pending = pending

    def add(self, ev, events: dict, planned: dict, windowed: bool) -> None:
        """Count a newly pending event; keep it in memory if it falls in the window."""
        self.pending += 1
        rank = ev.rank()
        if self.bound is not None and rank > self.bound:
            events.pop((ev.p, ev.off), None)  # on disk only, until a refill
            return
        events[(ev.p, ev.off)] = ev
        heapq.heappush(self.heap, rank)
        if windowed and len(self.heap) > 2 * QUEUE_WINDOW_EVENTS:
            self._trim(events, planned)

    def head(self, events: dict, planned: dict, reader, make_event):
        """The pending event with the smallest rank that no plan holds yet."""
        found = self.heads(1, events, planned, reader, make_event)
        return found[0] if found else None

    def heads(self, count: int, events: dict, planned: dict, reader,
              make_event) -> list:
        """Up to ``count`` pending events that no plan holds, smallest rank first.

        One pass for a whole window of free slots: asking ``head`` once per
        slot would set the same planned events aside again for every slot.
        """
        assert count > 0

        set_aside, found = [], []
        while len(found) < count:
            if not self.heap:
                if self.bound is None or not self._refill(events, reader, make_event):
                    break
                continue
            rank = self.heap[0]
            ev = events.get((self.p, rank[1]))
            if ev is None or ev.state != schema.PENDING or ev.rank() != rank:
                heapq.heappop(self.heap)
                continue
            set_aside.append(heapq.heappop(self.heap))
            if (self.p, ev.off) not in planned:
                found.append(ev)
        for rank in set_aside:
            heapq.heappush(self.heap, rank)
        return found

    def _refill(self, events: dict, reader, make_event) -> bool:
        """Load the next window from the index; False when nothing is left."""
        start = index_key(self.app, self.name, self.bound) + b"\x00"
        if self.bound == _BELOW_ALL:
            start = index_prefix(self.app, self.name)
        rows = reader.scan(index_prefix(self.app, self.name), start,
                           QUEUE_WINDOW_EVENTS)
        for key in rows:
            _, _, rank = parse_index_key(key)
            if (self.p, rank[1]) not in events:
                raw = reader.get(schema.delivery_key(self.p, rank[1]))
                events[(self.p, rank[1])] = make_event(self.p, rank[1], orjson.loads(raw))
            heapq.heappush(self.heap, rank)
        self.bound = parse_index_key(rows[-1])[2] if len(rows) == QUEUE_WINDOW_EVENTS \
            else None
        return bool(rows)

    def _trim(self, events: dict, planned: dict) -> None:
        live = sorted({r for r in self.heap
                       if (ev := events.get((self.p, r[1]))) is not None
                       and ev.state == schema.PENDING and ev.rank() == r})
        keep, drop = live[:QUEUE_WINDOW_EVENTS], live[QUEUE_WINDOW_EVENTS:]
        for rank in drop:
            if (self.p, rank[1]) not in planned:
                del events[(self.p, rank[1])]
        self.heap = keep  # sorted, so already a heap
        self.bound = keep[-1] if keep else _BELOW_ALL
