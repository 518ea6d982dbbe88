"""Key expiry and the per-recipient event limit in BrokerState (issue #6).

Plain calls, no clock: every op carries the time a test chooses, as the
proposing node's clock would stamp it.
"""

from __future__ import annotations

import orjson

from raft import schema
from raft.state import BrokerState, Close, key_expired

EXPIRES_MS = 5000


def key_create(app: str = "A", expires_ms: int | None = None, ts: int = 1) -> dict:
    op = {"op": "key_create", "name": app.lower(), "key_hash": "h-" + app,
          "app_id": app, "send": ["*"], "receive": ["*"], "ts": ts}
    if expires_ms is not None:
        op["expires_ms"] = expires_ms
    return op


def session_open(sid: str, app: str = "A", ts: int = 1) -> dict:
    return {"op": "session_open", "sid": sid, "app": app, "node": "n1", "boot": "b",
            "ts": ts}


def publish(to: str = "A", ts: int = 10, held_max: int | None = None,
            dedup_key: str | None = None) -> dict:
    op = {"op": "publish", "from": "B", "to": to, "name": "x", "payload": "",
          "metadata": {}, "ts": ts}
    if held_max is not None:
        op["recipient_events_max"] = held_max
    if dedup_key is not None:
        op["dedup_key"] = dedup_key
    return op


def expiring() -> BrokerState:
    state = BrokerState()
    results = state.apply([key_create(expires_ms=EXPIRES_MS), session_open("s1")])
    assert all(r.get("ok") for r in results.results)
    return state


# -- key expiry ------------------------------------------------------------------


def test_the_leader_plans_no_expiry_before_the_time_and_one_after():
    state = expiring()

    assert state.plan_key_expiry(EXPIRES_MS - 1, 8) == []
    ops = state.plan_key_expiry(EXPIRES_MS, 8)
    assert ops == [{"op": "key_expire", "app_id": "A", "ts": EXPIRES_MS}]
    assert state.plan_key_expiry(EXPIRES_MS + 1, 8) == []  # planned already


def test_an_applied_expiry_closes_the_keys_sessions_and_refuses_new_ones():
    state = expiring()
    applied = state.apply(state.plan_key_expiry(EXPIRES_MS, 8))
    refused = state.apply([session_open("s2", ts=EXPIRES_MS + 1)])

    assert applied.results == [{"ok": True}]
    assert applied.effects == [Close("s1", "key expired")]
    assert orjson.loads(applied.writes[schema.app_key("A")])["expired"] is True
    assert refused.results[0]["error"] == "UNAUTHORIZED"
    assert state.key_expiries == {}
    assert state.plan_key_expiry(EXPIRES_MS * 2, 8) == []


def test_an_expiry_op_stamped_before_the_expiry_is_stale():
    state = expiring()
    applied = state.apply([{"op": "key_expire", "app_id": "A", "ts": EXPIRES_MS - 1}])

    assert applied.results[0]["error"] == "STALE"
    assert "s1" in state.sessions and not applied.effects


def test_a_session_opened_after_the_expiry_in_log_time_is_refused_before_the_op():
    state = expiring()
    applied = state.apply([session_open("s2", ts=EXPIRES_MS)])

    assert applied.results[0]["error"] == "UNAUTHORIZED"
    assert key_expired(state.apps["A"], EXPIRES_MS)
    assert not key_expired(state.apps["A"], EXPIRES_MS - 1)


def test_rotating_an_expired_key_gives_a_working_key_with_the_new_expiry():
    state = expiring()
    state.apply(state.plan_key_expiry(EXPIRES_MS, 8))
    rotated = state.apply([{"op": "key_rotate", "app_id": "A", "key_hash": "h2",
                            "expires_ms": EXPIRES_MS * 3, "ts": EXPIRES_MS + 1},
                           session_open("s3", ts=EXPIRES_MS + 2)])

    assert [r.get("ok") for r in rotated.results] == [True, True]
    assert state.key_expiries == {"A": EXPIRES_MS * 3}
    assert "expired" not in state.apps["A"]


def test_rotating_without_an_expiry_leaves_the_new_key_without_one():
    state = expiring()
    state.apply([{"op": "key_rotate", "app_id": "A", "key_hash": "h2", "ts": 2}])

    assert state.key_expiries == {} and "expires_ms" not in state.apps["A"]


def test_a_replica_loaded_from_the_store_plans_the_same_expiry():
    state = expiring()
    applied = state.apply([key_create("C", expires_ms=EXPIRES_MS * 2)])
    rows = {schema.app_key(app): orjson.dumps(rec) for app, rec in state.apps.items()}
    rows.update(applied.writes)

    loaded = BrokerState()
    loaded.load(sorted((k, v) for k, v in rows.items() if v is not None))

    assert loaded.key_expiries == {"A": EXPIRES_MS, "C": EXPIRES_MS * 2}


# -- events held per recipient ---------------------------------------------------


def test_a_publish_beyond_the_recipients_limit_is_queue_full_and_stores_nothing():
    state = BrokerState()
    state.apply([key_create("A"), key_create("B")])
    accepted = state.apply([publish(held_max=2), publish(held_max=2)])
    refused = state.apply([publish(held_max=2)])
    other = state.apply([publish(to="B", held_max=2)])

    assert all(r.get("ok") for r in accepted.results)
    assert refused.results[0]["error"] == "QUEUE_FULL"
    assert refused.results[0]["message"] == "the recipient's queue is full"
    assert not any(k.startswith(b"e/") for k in refused.writes)
    assert other.results[0].get("ok")
    assert state.held_events == {"A": 2, "B": 1}


def test_a_repeat_of_an_accepted_publish_is_answered_even_at_the_limit():
    state = BrokerState()
    state.apply([key_create("A")])
    first = state.apply([publish(held_max=1, dedup_key="k")]).results[0]
    again = state.apply([publish(held_max=1, dedup_key="k", ts=11)]).results[0]

    assert again["duplicate"] and again["idem"] == first["idem"]


def test_an_answered_event_makes_room_for_the_next_publish():
    state = BrokerState()
    state.apply([key_create("A"), session_open("s1"),
                 {"op": "sub", "sid": "s1", "pattern": "x", "ts": 1},
                 publish(held_max=1)])
    state.apply(state.plan(now_ms=20, term=1, ack_timeout_ms=60_000, ops_max=4))
    idem = schema.idem_of(*next(iter(state.events)))
    state.apply([{"op": "ack", "sid": "s1", "idem": idem, "ts": 21}])
    after = state.apply([publish(held_max=1, ts=22)])

    assert after.results[0].get("ok")


def test_the_running_count_matches_a_recount_through_every_transition():
    state = BrokerState()
    state.apply([key_create("A"), key_create("B"), session_open("s1"),
                 {"op": "sub", "sid": "s1", "pattern": "x", "ts": 1}])
    steps = [[publish(ts=10 + i) for i in range(4)] + [publish(to="B", ts=14)]]
    now = 20

    def deliver() -> str:
        state.apply(state.plan(now_ms=now, term=1, ack_timeout_ms=60_000,
                               ops_max=4))
        key = next(k for k, ev in state.events.items() if ev.sid == "s1")
        return schema.idem_of(*key)

    state.apply(steps[0])
    assert state.held_events == state.count_held_events()
    for answer in ("ack", "discard", "rollback", "defer"):
        now += 10
        op = {"op": answer, "sid": "s1", "idem": deliver(), "ts": now,
              "delay_ms": 1, "delivery_limit": 1}
        state.apply([op])
        assert state.held_events == state.count_held_events(), answer
    dead = next(iter(state.dead))
    state.apply([{"op": "dlq_requeue", "p": dead[0], "off": dead[1], "ts": now}])
    assert state.held_events == state.count_held_events()
    assert state.held_events == {"A": 2, "B": 1}
