"""raft/freshness.py: a node counts the gaps after which its view may be old.

The end-to-end case is jepsen-lite seed 31 with ``--nemesis pause`` (the
campaign's pauses segment): a resumed node must not push attempts that were
acked elsewhere while it stood still. Here: the counting, with the clock moved
by hand. tests/raft/test_commit_guard.py checks, on a real SyncObj, that the
transport reports AppendEntries before pysyncobj handles them.
"""

from __future__ import annotations

from raft import freshness as freshness_mod
from raft.freshness import Freshness


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gaps_in_ticks_and_in_append_entries_each_count(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(freshness_mod.time, "monotonic", clock)
    f = Freshness(gap_ms=500)
    assert f.lost_touch_total == 1  # a new node has heard nobody

    f.append_received()  # the first AppendEntries ever: nothing before it
    assert f.lost_touch_total == 2
    for _ in range(100):  # a healthy follower: ticks and appends every 10 ms
        clock.now += 0.010
        f.tick()
        f.append_received()
    assert f.lost_touch_total == 2 and not f.silent()

    clock.now += 0.8  # SIGSTOP: nothing runs
    assert f.silent(), "another thread sees the tick thread stood still"
    f.append_received()  # the kernel's buffer is read first, after the gap
    assert f.lost_touch_total == 3
    f.tick()
    assert f.lost_touch_total == 4 and not f.silent()

    clock.now += 0.4  # a short hiccup is not a gap
    f.tick()
    f.append_received()
    assert f.lost_touch_total == 4

    for _ in range(80):  # cut off: ticks go on, no AppendEntries for 0.8 s
        clock.now += 0.010
        f.tick()
    assert f.lost_touch_total == 4
    f.append_received()
    assert f.lost_touch_total == 5
