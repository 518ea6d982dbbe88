"""A follower never commits entries a snapshot message did not vouch for.

The bug (pysyncobj 0.3.17, found by jepsen-lite seed 31, partition nemesis). A
leader that has compacted past a follower's next index sends it a snapshot, in
AppendEntries messages that carry ``serialized`` (a chunk, or None while the
leader's serializer is busy) instead of ``prevLogIdx``. The follower's handler
skips the log-matching check for those messages, as it must, but then runs the
same tail as for a matched append: ``commitIndex = min(leader_commit, own log
end)``. A follower whose log ends in entries of an old term that the new leader
never had (an old leader cut off by a partition keeps them) thus commits and
applies those entries while the snapshot is still on its way, and answers their
callbacks with results computed on a state that no other node ever had. The
next chunk finishes the snapshot and the state is replaced, so the replicas
agree again at the end; but clients were already told, for instance, that a
publish got an offset which the cluster gave to another event, or that an ack
passed when the cluster never applied it.

The fix, at the transport (the extension point pysyncobj offers; its handler is
a name-mangled method we do not patch): a snapshot message reaches pysyncobj
with ``commit_index`` lowered to the follower's own commit index, so it cannot
move it. A finished install does not need it either: the snapshot's entries
count as applied when it loads, and the next regular AppendEntries, which is
checked against the log, raises the commit index as usual.
"""

from __future__ import annotations

from typing import Any


def is_snapshot_message(message: Any) -> bool:
    """An AppendEntries that installs (part of) a snapshot, not log entries."""
    return (isinstance(message, dict) and message.get("type") == "append_entries"
            and "prevLogIdx" not in message)


def guard_commit_index(message: Any, own_commit_index: int) -> Any:
    """``message``, or a copy whose ``commit_index`` cannot raise ours."""
    if not is_snapshot_message(message):
        return message
    leader_commit = message.get("commit_index", 0)
    if leader_commit <= own_commit_index:
        return message
    return {**message, "commit_index": own_commit_index}
