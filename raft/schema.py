"""RocksDB key schema and partitioning, shared by the apply step and the readers.

Every key is ASCII and sorts the way we scan it. Integers are fixed-width hex so
lexicographic order is numeric order. Event keys carry the partition first, so a later
issue can move a range of partitions to another Raft group by prefix.

    m/applied                 last applied Raft index (8-byte big-endian)
    m/fence                   highest leader term seen in a delivery decision
    m/clock                   highest entry time applied (ms), keeps time monotonic
    m/off/<p:04x>             next event offset of partition p
    k/<sha256(access key)>    app id the key belongs to (we never store the key)
    a/<app id>                app record: name, send/receive patterns, created_ms
    s/<session id>            session: app, node, boot, opened_ms
    b/<session id>/<pattern>  subscription of a session
    r/<batch id>              results of a recently applied batch (retry dedup)
    u/<app id>;<key>          idem of a recent publish with that idempotency key
    q/<app id>;<name>;<rank>  index of pending events, in delivery order (queues.py)
    x/<p:04x>/<off:012x>      index of events held in memory: in flight, deferred, dead
    f/<ms:012x>/<p>/<off>     finished events by finish time: records to compact
    g/<ms:012x>/<p>/<off>     compacted events by finish time: history to forget
    h/<p:04x>/<off:012x>/<n:04x>  audit trail of one event, row n
    e/<p:04x>/<off:012x>      event record as published (payload, metadata, ...)
    d/<p:04x>/<off:012x>      delivery state of that event (state, session, attempts)
"""

from __future__ import annotations

import hashlib
import zlib

# The number of partitions is fixed at cluster creation; changing it would move
# apps between partitions, so it is part of the data, not a tuning knob.
PARTITIONS_COUNT = 64
# One Raft group serves every partition for now. A partition maps to a group by
# ``partition % RAFT_GROUPS_COUNT``; the multi-group issue raises this value.
RAFT_GROUPS_COUNT = 1

# The states of one event (docs/ARCHITECTURE.md, "Delivery state machine").
PENDING = "pending"      # queued, waiting for a free slot
INFLIGHT = "inflight"    # pushed to one session, waiting for its answer
DEFERRED = "deferred"    # out of the queue until due_ms (DEFER, scheduled publish)
ACKED = "acked"          # done; kept in RocksDB for audit and REPLAY
DISCARDED = "discarded"  # never delivered again; kept for audit and REPLAY
EXPIRED = "expired"      # waited longer than the retention without delivery
DEAD = "dead"            # over the delivery limit: in the dead-letter queue
FINISHED = (ACKED, DISCARDED, EXPIRED)

APPLIED = b"m/applied"
FENCE = b"m/fence"
CLOCK = b"m/clock"


def partition_of(app_id: str) -> int:
    return zlib.crc32(app_id.encode()) % PARTITIONS_COUNT


def group_of(partition: int) -> int:
    return partition % RAFT_GROUPS_COUNT


def offset_key(p: int) -> bytes:
    return b"m/off/%04x" % p


def key_hash_key(key_hash: str) -> bytes:
    return b"k/" + key_hash.encode()


def app_key(app_id: str) -> bytes:
    return b"a/" + app_id.encode()


def session_key(sid: str) -> bytes:
    return b"s/" + sid.encode()


def sub_key(sid: str, pattern: str) -> bytes:
    return b"b/" + sid.encode() + b"/" + pattern.encode()


def batch_key(batch_id: str) -> bytes:
    return b"r/" + batch_id.encode()


def publish_key(app_id: str, dedup_key: str) -> bytes:
    return b"u/" + app_id.encode() + b";" + dedup_key.encode()


def finished_key(finished_ms: int, p: int, off: int) -> bytes:
    return b"f/%012x/%04x/%012x" % (finished_ms, p, off)


def forget_key(finished_ms: int, p: int, off: int) -> bytes:
    return b"g/%012x/%04x/%012x" % (finished_ms, p, off)


def parse_time_index(key: bytes) -> tuple[int, int, int]:
    """(finished_ms, p, off) of an ``f/`` or ``g/`` key."""
    _, ts, p, off = key.split(b"/")
    return int(ts, 16), int(p, 16), int(off, 16)


def resident_key(p: int, off: int) -> bytes:
    return b"x/%04x/%012x" % (p, off)


def history_key(p: int, off: int, n: int) -> bytes:
    return b"h/%04x/%012x/%04x" % (p, off, n)


def history_prefix(p: int, off: int) -> bytes:
    return b"h/%04x/%012x/" % (p, off)


def event_key(p: int, off: int) -> bytes:
    return b"e/%04x/%012x" % (p, off)


def delivery_key(p: int, off: int) -> bytes:
    return b"d/%04x/%012x" % (p, off)


def idem_of(p: int, off: int) -> str:
    return "evt-%04x-%012x" % (p, off)


def parse_idem(idem: str) -> tuple[int, int] | None:
    """(partition, offset) of an idem we issued, or None for anything else."""
    parts = idem.split("-")
    if len(parts) != 3 or parts[0] != "evt":
        return None
    try:
        p, off = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    if not (0 <= p < PARTITIONS_COUNT and off >= 1):
        return None
    return p, off


def hash_access_key(access_key: str) -> str:
    return hashlib.sha256(access_key.encode()).hexdigest()


def matches(pattern: str, name: str) -> bool:
    """``*`` matches everything, ``prefix/*`` any name under prefix at any depth."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return name.startswith(pattern[:-1])
    return pattern == name
