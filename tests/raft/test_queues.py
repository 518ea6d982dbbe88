"""Queue windows: memory keeps each queue's head; RocksDB (here a dict) the rest."""

from __future__ import annotations

import bisect

from raft.queues import QUEUE_WINDOW_EVENTS
from raft.state import BrokerState


class DictReader:
    """The two reads the state makes of RocksDB, over a dict kept in key order."""

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}

    def apply(self, writes: dict) -> None:
        for key, value in writes.items():
            if value is None:
                self.rows.pop(key, None)
            else:
                self.rows[key] = value

    def get(self, key: bytes) -> bytes | None:
        return self.rows.get(key)

    def scan(self, prefix: bytes, start: bytes, limit: int | None) -> list[bytes]:
        keys = sorted(self.rows)
        found = []
        for key in keys[bisect.bisect_left(keys, start):]:
            if not key.startswith(prefix) or (limit is not None and len(found) >= limit):
                break
            found.append(key)
        return found

    def state_rows(self):
        skip = (b"d/", b"e/", b"h/", b"q/")
        return [(k, self.rows[k]) for k in sorted(self.rows) if k[:2] not in skip]


def run(state: BrokerState, db: DictReader, *ops: dict) -> list[dict]:
    applied = state.apply(list(ops))
    db.apply(applied.writes)
    return applied.results


def setup(db: DictReader) -> BrokerState:
    state = BrokerState(db)
    run(state, db,
        {"op": "key_create", "name": "a", "key_hash": "ha", "app_id": "A",
         "send": ["*"], "receive": ["*"], "ts": 1},
        {"op": "session_open", "sid": "s1", "app": "A", "node": "n1", "boot": "b",
         "ts": 1})
    return state


def drain_in_order(state: BrokerState, db: DictReader, count: int) -> list[int]:
    """Subscribe s1, then assign and ack one event at a time, like the leader."""
    run(state, db, {"op": "sub", "sid": "s1", "pattern": "q/x", "ts": 2})
    got = []
    for step in range(count + 5):
        ops = state.plan(now_ms=10 + step, term=1, ack_timeout_ms=60_000, ops_max=8)
        assigns = [op for op in ops if op["op"] == "assign"]
        if not assigns:
            break
        run(state, db, *assigns)
        off = assigns[0]["off"]
        got.append(off)
        run(state, db, {"op": "ack", "sid": "s1", "idem": f"evt-{assigns[0]['p']:04x}-"
                        f"{off:012x}", "ts": 10 + step})
        assert len(state.events) <= 2 * QUEUE_WINDOW_EVENTS + 2
    return got


def publish_many(state, db, count: int) -> None:
    for i in range(count):
        run(state, db, {"op": "publish", "from": "A", "to": "A", "name": "q/x",
                        "payload": "", "metadata": {}, "ts": 5})
        assert len(state.events) <= 2 * QUEUE_WINDOW_EVENTS


def test_a_long_queue_keeps_only_a_window_in_memory_and_delivers_in_order():
    db = DictReader()
    state = setup(db)
    publish_many(state, db, 500)

    assert state.statistics().pending_events == 500
    assert drain_in_order(state, db, 500) == list(range(1, 501))
    assert state.statistics().pending_events == 0


def test_a_restarted_state_loads_counts_not_events_and_refills_in_order():
    db = DictReader()
    state = setup(db)
    publish_many(state, db, 300)

    loaded = BrokerState(db)
    loaded.load(db.state_rows())

    assert loaded.statistics().pending_events == 300
    assert len(loaded.events) == 0
    assert drain_in_order(loaded, db, 300) == list(range(1, 301))


def test_retention_expires_old_heads_then_compacts_records_then_forgets_history():
    from raft import schema

    db = DictReader()
    state = setup(db)
    publish_many(state, db, 3)  # born at log time 5
    p = schema.partition_of("A")

    assert state.plan_expiry(now_ms=1004, term=1, retention_ms=1000, ops_max=10) == []
    ops = state.plan_expiry(now_ms=1005, term=1, retention_ms=1000, ops_max=10)
    assert [op["off"] for op in ops] == [1]  # one head per queue per round
    assert run(state, db, *ops) == [{"ok": True}]
    assert state.statistics().pending_events == 2
    assert db.get(schema.event_key(p, 1)) is not None

    finished = db.scan(b"f/", b"f/", None)
    assert [schema.parse_time_index(k)[1:] for k in finished] == [(p, 1)]
    item = list(schema.parse_time_index(finished[0]))
    run(state, db, {"op": "compact", "items": [item], "ts": 2000})
    assert db.get(schema.event_key(p, 1)) is None
    assert db.get(schema.history_key(p, 1, 0)) is not None

    run(state, db, {"op": "forget", "items": [item], "ts": 3000})
    assert db.get(schema.delivery_key(p, 1)) is None
    assert db.scan(schema.history_prefix(p, 1), schema.history_prefix(p, 1), None) == []
    assert db.scan(b"g/", b"g/", None) == []


def test_a_stale_expire_cannot_touch_an_event_that_was_assigned_meanwhile():
    db = DictReader()
    state = setup(db)
    publish_many(state, db, 1)
    expire = state.plan_expiry(now_ms=2000, term=1, retention_ms=1000, ops_max=10)
    state.forget_plans()  # the old leader's plan survives only as a proposal

    run(state, db, {"op": "sub", "sid": "s1", "pattern": "q/x", "ts": 2000})
    assigns = [op for op in state.plan(now_ms=2001, term=2, ack_timeout_ms=60_000,
                                        ops_max=8) if op["op"] == "assign"]
    run(state, db, *assigns)

    assert run(state, db, *expire)[0]["error"] == "STALE_TERM"
    expire[0]["term"] = 2
    assert run(state, db, *expire)[0]["error"] == "STALE"
    assert state.events[(assigns[0]["p"], 1)].state == "inflight"
