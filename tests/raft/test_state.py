"""BrokerState, the replicated state machine, driven by plain calls.

No pysyncobj, no RocksDB, no clock: ops are dicts stamped with the times and
terms a test chooses, and a dict sorted by key stands in for the database.
Grouped by section of reference/ensync-wire-protocol.md (3.x commands, 7.x
delivery), then the Raft-facing parts: fencing, determinism and recovery.
"""

from __future__ import annotations

import copy

import orjson
import pytest

from raft import schema
from raft.state import ACKED, INFLIGHT, PENDING, Applied, BrokerState, Close, Push

A, B = "app-a", "app-b"
P_A = schema.partition_of(A)
ACK_TIMEOUT_MS = 500
ORDERS = "orders/created"

assert P_A != schema.partition_of(B), "the tests assume the apps differ in partition"


# -- op builders ---------------------------------------------------------------


def key_create(app: str, name: str) -> dict:
    return {
        "op": "key_create",
        "name": name,
        "send": ["*"],
        "receive": ["*"],
        "app_id": app,
        "key_hash": "hash-" + app,
        "ts": 1,
    }


def session_open(sid: str, app: str = A, node: str = "n1", boot: str = "b1") -> dict:
    return {"op": "session_open", "sid": sid, "app": app, "node": node, "boot": boot}


def sub(sid: str, pattern: str = ORDERS) -> dict:
    return {"op": "sub", "sid": sid, "pattern": pattern}


def unsub(sid: str, pattern: str = ORDERS) -> dict:
    return {"op": "unsub", "sid": sid, "pattern": pattern}


def publish(name: str = ORDERS, to: str = A, ts: int = 0) -> dict:
    return {
        "op": "publish",
        "from": B,
        "to": to,
        "name": name,
        "payload": "eyJ4IjoxfQ==",
        "metadata": {"k": "v;w"},
        "ts": ts,
    }


def ack(sid: str, off: int, p: int = P_A) -> dict:
    return {"op": "ack", "sid": sid, "idem": schema.idem_of(p, off)}


def assign(sid: str, off: int, term: int, pattern: str = ORDERS, p: int = P_A) -> dict:
    return {
        "op": "assign",
        "p": p,
        "off": off,
        "sid": sid,
        "pattern": pattern,
        "term": term,
        "ts": 0,
        "deadline_ms": 10_000,
    }


def node_down(node: str, term: int) -> dict:
    return {"op": "node_down", "node": node, "term": term}


# -- helpers -------------------------------------------------------------------


def ok(state: BrokerState, *ops: dict) -> Applied:
    applied = state.apply(list(ops))
    for op, result in zip(ops, applied.results, strict=True):
        assert result.get("ok"), (op, result)
    return applied


def one(state: BrokerState, op: dict) -> tuple[dict, Applied]:
    applied = state.apply([op])
    return applied.results[0], applied


def two_apps() -> BrokerState:
    state = BrokerState()
    ok(state, key_create(A, "alpha"), key_create(B, "beta"))
    return state


def plan(
    state: BrokerState, now_ms: int = 1000, term: int = 1, ops_max: int = 64
) -> list[dict]:
    return state.plan(now_ms, term, ACK_TIMEOUT_MS, ops_max)


def assigned(ops: list[dict]) -> list[tuple[str, str, int]]:
    return [(op["sid"], op["pattern"], op["off"]) for op in ops if op["op"] == "assign"]


def deliver_next(state: BrokerState, now_ms: int = 1000, term: int = 1) -> list[Push]:
    """One leader round: plan, then apply what was planned; the pushes it made."""
    applied = ok(state, *plan(state, now_ms, term))
    return [e for e in applied.effects if isinstance(e, Push)]


def event_state(state: BrokerState, off: int, p: int = P_A) -> str:
    ev = state.events.get((p, off))
    return ACKED if ev is None else ev.state


class FakeRocks:
    """A dict of rows that applies write sets like a RocksDB batch and reads back
    in key order, as Store.state_rows does."""

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}

    def write(self, applied: Applied) -> None:
        for key, value in applied.writes.items():
            if value is None:
                self.rows.pop(key, None)
            else:
                self.rows[key] = value

    def state_rows(self) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.rows.items() if not k.startswith(b"e/"))


class Recorded:
    """A BrokerState whose every applied batch also lands in a FakeRocks."""

    def __init__(self) -> None:
        self.state = BrokerState()
        self.db = FakeRocks()
        self.batches: list[list[dict]] = []
        self.applied: list[Applied] = []

    def apply(self, *ops: dict) -> Applied:
        self.batches.append(copy.deepcopy(list(ops)))
        applied = self.state.apply(list(ops))
        self.db.write(applied)
        self.applied.append(applied)
        return applied


# -- 3.2 PUB -------------------------------------------------------------------


def test_publish_makes_a_pending_event_with_a_stored_record():
    state = two_apps()

    result, applied = one(state, publish(ts=1234))

    idem = schema.idem_of(P_A, 1)
    assert result == {"ok": True, "idem": idem, "ts": 1234}
    assert event_state(state, 1) == PENDING
    record = orjson.loads(applied.writes[schema.event_key(P_A, 1)])
    assert record["idem"] == record["id"] == idem
    assert (record["block"], record["loggedAt"], record["sender"]) == (1, 1234, B)
    assert record["metadata"] == {"k": "v;w"}
    delivery = orjson.loads(applied.writes[schema.delivery_key(P_A, 1)])
    assert delivery == {"to": A, "name": ORDERS, "state": PENDING, "attempts": 0,
                        "priority": 1, "hist": 2, "born_ms": 1234}


def test_blocks_count_up_per_partition_from_one():
    state = two_apps()

    results = state.apply([publish(), publish("other"), publish(to=B)]).results

    assert [r["idem"] for r in results] == [
        schema.idem_of(P_A, 1),
        schema.idem_of(P_A, 2),
        schema.idem_of(schema.partition_of(B), 1),
    ]


def test_publish_to_an_unknown_app_is_invalid_recipient():
    state = two_apps()

    result, applied = one(state, publish(to="no-such-app"))

    assert result["error"] == "INVALID_RECIPIENT"
    assert applied.writes == {}
    assert state.events == {}


def test_a_barrier_succeeds_and_changes_nothing():
    state = two_apps()

    result, applied = one(state, {"op": "barrier"})

    assert result == {"ok": True}
    assert applied.writes == {} and applied.effects == []


def test_an_unknown_operation_fails_without_touching_state():
    state = two_apps()

    result, applied = one(state, {"op": "explode"})

    assert result["error"] == "INVALID_PARAMETER"
    assert applied.writes == {} and applied.effects == []


# -- 3.1 CONN and keys: sessions belong to apps --------------------------------


def test_a_key_name_cannot_be_created_twice():
    state = two_apps()
    again = {**key_create("app-c", "alpha")}

    result, applied = one(state, again)

    assert result["error"] == "NAME_TAKEN"
    assert result["app_id"] == A
    assert applied.writes == {}


def test_a_key_hash_cannot_be_reused_under_another_name():
    state = two_apps()

    result, _ = one(state, {**key_create("app-c", "gamma"), "key_hash": "hash-" + A})

    assert result["error"] == "KEY_EXISTS"
    assert "app-c" not in state.apps


def test_a_session_for_an_unknown_app_is_unauthorized():
    state = two_apps()

    result, _ = one(state, session_open("s1", app="nobody"))

    assert result["error"] == "UNAUTHORIZED"
    assert "s1" not in state.sessions


def test_subscribing_twice_writes_once():
    state = two_apps()
    ok(state, session_open("s1"))

    first = ok(state, sub("s1"))
    second = ok(state, sub("s1"))

    assert schema.sub_key("s1", ORDERS) in first.writes
    assert second.writes == {}


# -- 7.1 / 7.2 Queues, ordering, one record in flight per slot -----------------


def test_plan_assigns_the_oldest_matching_event_to_a_free_slot():
    state = two_apps()
    ok(
        state,
        publish("other"),
        publish("orders/a"),
        publish("orders/b"),
        session_open("s1"),
        sub("s1", "orders/*"),
    )

    ops = plan(state)

    assert assigned(ops) == [("s1", "orders/*", 2)]
    assert ops[0]["term"] == 1
    assert ops[0]["deadline_ms"] == 1000 + ACK_TIMEOUT_MS


def test_plan_never_gives_one_slot_two_events():
    state = two_apps()
    ok(state, *[publish() for _ in range(3)], session_open("s1"), sub("s1"))

    first = plan(state)
    second = plan(state, now_ms=1001)

    assert assigned(first) == [("s1", ORDERS, 1)]
    assert assigned(second) == []


def test_a_slot_holding_a_record_gets_nothing_more_until_the_ack():
    state = two_apps()
    ok(state, publish(), publish(), session_open("s1"), sub("s1"))

    pushes = deliver_next(state)
    again = plan(state, now_ms=1001)

    assert [(p.sid, p.off, p.attempt) for p in pushes] == [("s1", 1, 1)]
    assert assigned(again) == []
    assert event_state(state, 1) == INFLIGHT and event_state(state, 2) == PENDING


def test_first_delivery_follows_publish_order_within_a_queue():
    state = two_apps()
    ok(state, *[publish(ts=t) for t in range(1, 6)], session_open("s1"), sub("s1"))

    order = []
    for _ in range(10):  # bounded: five events need five rounds
        pushes = deliver_next(state)
        if not pushes:
            break
        order += [p.off for p in pushes]
        ok(state, *[ack(p.sid, p.off) for p in pushes])

    assert order == [1, 2, 3, 4, 5]
    assert state.statistics().pending_events == 0


def test_ack_frees_the_slot_and_the_next_plan_assigns_the_next_event():
    state = two_apps()
    ok(state, publish(), publish(), session_open("s1"), sub("s1"))
    deliver_next(state)

    result, applied = one(state, ack("s1", 1))

    assert result == {"ok": True, "idem": schema.idem_of(P_A, 1)}
    delivery = orjson.loads(applied.writes[schema.delivery_key(P_A, 1)])
    assert delivery["state"] == ACKED
    assert assigned(plan(state, now_ms=1001)) == [("s1", ORDERS, 2)]


def test_plan_respects_ops_max_and_finishes_on_the_next_round():
    state = two_apps()
    sids = [f"s{i}" for i in range(5)]
    ok(state, *[publish() for _ in sids])
    for sid in sids:
        ok(state, session_open(sid), sub(sid))

    first = plan(state, ops_max=2)
    rest = plan(state, now_ms=1001, ops_max=64)

    assert len(assigned(first)) == 2
    offs = [off for _, _, off in assigned(first) + assigned(rest)]
    assert sorted(offs) == [1, 2, 3, 4, 5]


# -- 7.3 Competing consumers ---------------------------------------------------


def test_two_sessions_of_one_app_get_different_events():
    state = two_apps()
    ok(
        state,
        publish(),
        publish(),
        session_open("s1"),
        session_open("s2"),
        sub("s1"),
        sub("s2"),
    )

    pushes = deliver_next(state)

    assert sorted(p.sid for p in pushes) == ["s1", "s2"]
    assert sorted(p.off for p in pushes) == [1, 2]


def test_a_session_of_another_app_never_gets_the_event():
    state = two_apps()
    ok(state, publish(), session_open("sb", app=B), sub("sb", "*"))

    assert assigned(plan(state)) == []


# -- 3.7 ACK -------------------------------------------------------------------


@pytest.fixture
def held() -> BrokerState:
    """s1 and s2 of app A subscribe; s1 holds event 1, event 2 waits; sb is of B."""
    state = two_apps()
    ok(
        state,
        publish(),
        publish(),
        session_open("s1"),
        sub("s1"),
        session_open("s2"),
        session_open("sb", app=B),
        sub("sb", "*"),
    )
    ok(state, assign("s1", 1, term=1))
    return state


def test_ack_from_another_session_of_the_same_app_is_unauthorized(held):
    result, applied = one(held, ack("s2", 1))

    assert result["error"] == "UNAUTHORIZED"
    assert applied.writes == {}
    assert event_state(held, 1) == INFLIGHT


@pytest.mark.parametrize(
    "idem", ["evt-zz-1", "nonsense", schema.idem_of(P_A, 99), schema.idem_of(P_A, 0)]
)
def test_ack_of_an_unknown_idem_is_not_found(held, idem):
    result, _ = one(held, {"op": "ack", "sid": "s1", "idem": idem})

    assert result["error"] == "NOT_FOUND"


def test_ack_of_another_apps_event_is_not_found(held):
    result, _ = one(held, ack("sb", 1))

    assert result["error"] == "NOT_FOUND"
    assert event_state(held, 1) == INFLIGHT


def test_a_repeated_ack_is_not_found(held):
    ok(held, ack("s1", 1))

    result, applied = one(held, ack("s1", 1))

    assert result["error"] == "NOT_FOUND"
    assert applied.writes == {}


def test_ack_of_a_pending_event_is_not_found(held):
    result, _ = one(held, ack("s1", 2))

    assert result["error"] == "NOT_FOUND"
    assert event_state(held, 2) == PENDING


def test_ack_from_a_closed_session_is_client_not_found(held):
    result, _ = one(held, ack("gone", 1))

    assert result["error"] == "CLIENT_NOT_FOUND"


# -- 1.6 / 3.4 Closing a session, UNSUB: in-flight records go back -------------


def test_closing_a_session_returns_its_record_to_the_head_of_the_queue(held):
    applied = ok(held, {"op": "session_close", "sid": "s1", "reason": "bye"})

    assert Close("s1", "bye") in applied.effects
    assert event_state(held, 1) == PENDING
    ok(held, sub("s2"))
    pushes = deliver_next(held, now_ms=2000)
    assert [(p.sid, p.off, p.attempt) for p in pushes] == [("s2", 1, 2)]


def test_unsubscribing_returns_the_record_in_flight(held):
    ok(held, unsub("s1"))

    assert event_state(held, 1) == PENDING
    ok(held, sub("s1"))
    assert assigned(plan(held, now_ms=2000)) == [("s1", ORDERS, 1)]


def test_unsubscribing_an_unknown_pattern_is_not_found(held):
    result, _ = one(held, unsub("s1", "never/subscribed"))

    assert result["error"] == "NOT_FOUND"
    assert event_state(held, 1) == INFLIGHT


def test_closing_an_unknown_session_is_harmless(held):
    applied = ok(held, {"op": "session_close", "sid": "nobody"})

    assert applied.writes == {} and applied.effects == []


def test_node_boot_closes_only_sessions_of_older_boots_of_that_node():
    state = two_apps()
    ok(
        state,
        session_open("old", node="n1", boot="b1"),
        session_open("new", node="n1", boot="b2"),
        session_open("peer", node="n2", boot="b1"),
    )

    result, applied = one(state, {"op": "node_boot", "node": "n1", "boot": "b2"})

    assert result == {"ok": True, "closed": 1}
    assert sorted(state.sessions) == ["new", "peer"]
    assert [e.sid for e in applied.effects if isinstance(e, Close)] == ["old"]
    assert applied.writes == {schema.session_key("old"): None}


def test_node_down_closes_every_session_of_that_node(held):
    result, _ = one(held, node_down("n1", term=2))

    assert result == {"ok": True, "closed": 3}
    assert held.sessions == {}
    assert event_state(held, 1) == PENDING


# -- Raft: decisions are fenced by term ----------------------------------------


def test_node_down_from_an_older_term_is_stale_term_and_changes_nothing(held):
    ok(held, node_down("elsewhere", term=5))
    before = copy.deepcopy(held.sessions)

    result, applied = one(held, node_down("n1", term=4))

    assert result["error"] == "STALE_TERM"
    assert applied.writes == {} and applied.effects == []
    assert held.sessions == before
    assert held.fence_term == 5


def test_an_assign_from_a_deposed_leader_is_ignored_after_a_newer_term():
    state = two_apps()
    ok(
        state,
        publish(),
        publish(),
        session_open("s1"),
        session_open("s2"),
        sub("s1"),
        sub("s2"),
    )
    ok(state, assign("s1", 1, term=3))  # the new leader

    result, applied = one(state, assign("s2", 2, term=2))  # the old one

    assert result["error"] == "STALE_TERM"
    assert applied.writes == {} and applied.effects == []
    assert event_state(state, 2) == PENDING


def test_a_decision_from_a_newer_term_raises_the_fence():
    state = two_apps()
    ok(state, publish(), session_open("s1"), sub("s1"))

    applied = ok(state, assign("s1", 1, term=7))

    assert applied.writes[schema.FENCE] == b"7"
    assert state.fence_term == 7


def test_an_assign_for_an_acked_event_is_stale(held):
    ok(held, ack("s1", 1))

    result, applied = one(held, assign("s1", 1, term=1))

    assert result["error"] == "STALE"
    assert applied.effects == []


def test_an_assign_to_a_closed_session_is_stale():
    state = two_apps()
    ok(state, publish(), session_open("s1"), sub("s1"))
    ok(state, {"op": "session_close", "sid": "s1"})

    result, _ = one(state, assign("s1", 1, term=1))

    assert result["error"] == "STALE"
    assert event_state(state, 1) == PENDING


@pytest.mark.parametrize(
    ("sid", "pattern", "why"),
    [
        ("s1", ORDERS, "slot is busy"),
        ("s2", ORDERS, "not subscribed"),
        ("sb", "*", "other app"),
    ],
)
def test_an_assign_the_state_cannot_honour_is_stale(held, sid, pattern, why):
    result, _ = one(held, assign(sid, 2, term=1, pattern=pattern))

    assert result["error"] == "STALE", why
    assert event_state(held, 2) == PENDING


def test_an_assign_whose_pattern_does_not_match_the_event_is_stale():
    state = two_apps()
    ok(state, publish("billing/paid"), session_open("s1"), sub("s1"))

    result, _ = one(state, assign("s1", 1, term=1))

    assert result["error"] == "STALE"


def test_an_event_whose_assign_went_stale_is_planned_for_another_session():
    state = two_apps()
    ok(state, publish(), session_open("s1"), session_open("s2"), sub("s1"), sub("s2"))
    [(chosen, _, _)] = assigned(ops := plan(state))
    other = "s2" if chosen == "s1" else "s1"

    # The chosen consumer disconnects while its assign is still in the log.
    ok(state, {"op": "session_close", "sid": chosen})
    [result] = state.apply(ops).results
    assert result["error"] == "STALE"

    assert assigned(plan(state, now_ms=1001)) == [(other, ORDERS, 1)]


# -- 7.4 Visibility timeout ----------------------------------------------------


def test_plan_requeues_a_record_once_its_ack_deadline_passes():
    state = two_apps()
    ok(state, publish(), session_open("s1"), sub("s1"))
    deliver_next(state, now_ms=1000)
    deadline = 1000 + ACK_TIMEOUT_MS

    early = plan(state, now_ms=deadline - 1)
    due = plan(state, now_ms=deadline, term=2)

    assert early == []
    assert [(op["op"], op["off"], op["attempt"], op["term"]) for op in due] == [
        ("requeue", 1, 1, 2)
    ]


def test_applying_a_requeue_makes_the_event_pending_with_its_attempts_kept():
    state = two_apps()
    ok(state, publish(), publish(), session_open("s1"), sub("s1"))
    deliver_next(state, now_ms=1000)
    requeue = plan(state, now_ms=1000 + ACK_TIMEOUT_MS)

    applied = ok(state, *requeue)

    assert event_state(state, 1) == PENDING
    assert state.events[(P_A, 1)].attempts == 1
    delivery = orjson.loads(applied.writes[schema.delivery_key(P_A, 1)])
    assert {k: v for k, v in delivery.items() if k != "born_ms"} == {
        "to": A, "name": ORDERS, "state": PENDING, "attempts": 1, "priority": 1,
        "hist": 4}
    pushes = deliver_next(state, now_ms=2000)
    assert [(p.off, p.attempt) for p in pushes] == [(1, 2)]


def test_a_requeue_for_an_earlier_attempt_is_stale():
    state = two_apps()
    ok(state, publish(), session_open("s1"), sub("s1"))
    deliver_next(state, now_ms=1000)
    old = plan(state, now_ms=2000)
    ok(state, *old)
    deliver_next(state, now_ms=2000)

    result, _ = one(state, old[0])

    assert result["error"] == "STALE"
    assert event_state(state, 1) == INFLIGHT


def test_a_requeue_from_an_older_term_is_stale_term(held):
    ok(held, node_down("elsewhere", term=4))
    requeue = {"op": "requeue", "p": P_A, "off": 1, "attempt": 1, "term": 3}

    result, _ = one(held, requeue)

    assert result["error"] == "STALE_TERM"
    assert event_state(held, 1) == INFLIGHT


# -- Time ----------------------------------------------------------------------


def test_time_never_goes_back():
    state = two_apps()
    first = ok(state, publish(ts=2000))

    result, applied = one(state, publish(ts=1000))

    assert first.writes[schema.CLOCK] == b"2000"
    assert result["ts"] == 2000
    assert schema.CLOCK not in applied.writes
    record = orjson.loads(applied.writes[schema.event_key(P_A, 2)])
    assert record["loggedAt"] == 2000


# -- Determinism and recovery --------------------------------------------------


def scripted_run() -> Recorded:
    """A short history with every kind of op; plans come from the run itself."""
    run = Recorded()
    run.apply(key_create(A, "alpha"), key_create(B, "beta"))
    run.apply(
        session_open("s1", node="n1", boot="b1"),
        session_open("s2", node="n2", boot="b1"),
        sub("s1"),
        sub("s2"),
    )
    run.apply(*[publish(ts=100 + i) for i in range(6)], publish(to=B, ts=50))
    run.apply(*run.state.plan(1000, 1, ACK_TIMEOUT_MS, 64))
    run.apply(ack("s1", run.state.inflight[("s1", ORDERS, 0)][1]))
    run.apply(*run.state.plan(1100, 1, ACK_TIMEOUT_MS, 64))
    run.apply(*run.state.plan(5000, 2, ACK_TIMEOUT_MS, 64))  # requeues
    run.apply({"op": "node_boot", "node": "n2", "boot": "b2"})
    run.apply(session_open("s3", node="n2", boot="b2"), sub("s3", "orders/*"))
    run.apply(*run.state.plan(6000, 2, ACK_TIMEOUT_MS, 64))
    return run


def test_two_states_fed_the_same_ops_produce_identical_writes():
    run = scripted_run()
    left, right = BrokerState(), BrokerState()

    for batch, original in zip(run.batches, run.applied, strict=True):
        mine = left.apply(copy.deepcopy(batch))
        theirs = right.apply(copy.deepcopy(batch))
        assert mine.writes == theirs.writes == original.writes
        assert list(mine.writes) == list(theirs.writes)
        assert mine.results == theirs.results == original.results
        assert mine.effects == theirs.effects


def test_planning_on_the_leader_does_not_change_what_apply_writes():
    # The run planned between batches; a replica that never plans must still
    # end with the same database.
    run = scripted_run()
    replica = Recorded()

    for batch in run.batches:
        replica.apply(*copy.deepcopy(batch))

    assert replica.db.rows == run.db.rows
    assert replica.state.statistics() == run.state.statistics()


def test_load_without_subscriptions_restores_queues_offsets_fence_and_clock():
    run = Recorded()
    run.apply(key_create(A, "alpha"), key_create(B, "beta"))
    run.apply(session_open("s1"), *[publish(ts=300 + i) for i in range(3)])
    run.apply(node_down("n9", term=4))
    loaded = BrokerState()

    loaded.load(run.db.state_rows())

    assert loaded.statistics() == run.state.statistics()
    assert (loaded.fence_term, loaded.clock_ms) == (4, 302)
    assert loaded.key_hashes == run.state.key_hashes
    for state in (run.state, loaded):
        ok(state, sub("s1"))
    assert assigned(plan(loaded, term=4)) == assigned(plan(run.state, term=4))
    [result] = loaded.apply([publish(ts=1)]).results
    assert result == {"ok": True, "idem": schema.idem_of(P_A, 4), "ts": 302}
    [stale] = loaded.apply([assign("s1", 1, term=3)]).results
    assert stale["error"] == "STALE_TERM"


def test_load_of_the_writes_rebuilds_a_state_that_plans_the_same_next_assignment():
    run = scripted_run()
    loaded = BrokerState()

    loaded.load(run.db.state_rows())

    assert loaded.statistics() == run.state.statistics()
    assert loaded.inflight == run.state.inflight
    assert {sid: s.subs for sid, s in loaded.sessions.items()} == {
        sid: s.subs for sid, s in run.state.sessions.items()
    }
    late = sorted((op["off"], op["attempt"]) for op in plan(loaded, 60_000, term=2))
    assert late == sorted(
        (op["off"], op["attempt"]) for op in plan(run.state, 60_000, term=2)
    )
    # Free exactly one slot on both, so the next assignment has one answer.
    off = run.state.inflight[("s1", ORDERS, 0)][1]
    for state in (run.state, loaded):
        ok(state, ack("s1", off))
    next_loaded = assigned(plan(loaded, 7000, term=2))
    assert next_loaded == assigned(plan(run.state, 7000, term=2))
    assert next_loaded == [("s1", ORDERS, off + 1)]


# -- batch dedup: a resubmitted batch is applied once ---------------------------


def test_a_resubmitted_batch_is_answered_from_the_dedup_table():
    state = BrokerState()
    key = {"op": "key_create", "name": "a", "key_hash": "h", "app_id": "A",
           "send": ["*"], "receive": ["*"], "ts": 1}
    first = state.apply_batch("n1.b.1", [key])
    again = state.apply_batch("n1.b.1", [key])

    assert first.results == again.results == [{"ok": True, "app_id": "A"}]
    assert again.writes == {}
    assert list(state.apps) == ["A"]


def test_dedup_entries_expire_by_log_time_on_every_replica_alike():
    from raft.state import BATCH_DEDUP_WINDOW_MS

    state = BrokerState()
    state.apply_batch("old", [{"op": "barrier", "ts": 1}])
    later = state.apply_batch("new", [{"op": "barrier",
                                       "ts": 2 + BATCH_DEDUP_WINDOW_MS}])

    assert later.writes[b"r/old"] is None
    assert list(state.batches) == ["new"]


# -- keys: disable and rotate ------------------------------------------------------


def test_disabling_a_key_closes_its_sessions_and_refuses_new_ones():
    state = BrokerState()
    state.apply([{"op": "key_create", "name": "a", "key_hash": "h1", "app_id": "A",
                  "send": ["*"], "receive": ["*"], "ts": 1},
                 {"op": "session_open", "sid": "s1", "app": "A", "node": "n1",
                  "boot": "b", "ts": 1}])

    applied = state.apply([{"op": "key_disable", "app_id": "A", "disabled": True,
                            "ts": 2},
                           {"op": "session_open", "sid": "s2", "app": "A",
                            "node": "n1", "boot": "b", "ts": 2}])

    assert applied.results[1]["error"] == "UNAUTHORIZED"
    assert "s1" not in state.sessions
    assert [e.sid for e in applied.effects] == ["s1"]


def test_rotating_a_key_retires_the_old_hash_and_closes_sessions():
    state = BrokerState()
    state.apply([{"op": "key_create", "name": "a", "key_hash": "h1", "app_id": "A",
                  "send": ["*"], "receive": ["*"], "ts": 1},
                 {"op": "session_open", "sid": "s1", "app": "A", "node": "n1",
                  "boot": "b", "ts": 1}])

    applied = state.apply([{"op": "key_rotate", "app_id": "A", "key_hash": "h2",
                            "ts": 2}])

    assert applied.results == [{"ok": True}]
    assert state.key_hashes == {"h2": "A"}
    assert applied.writes[b"k/h1"] is None and "s1" not in state.sessions


def test_an_answer_naming_an_older_attempt_is_not_found():
    state = BrokerState()
    state.apply([{"op": "key_create", "name": "a", "key_hash": "h1", "app_id": "A",
                  "send": ["*"], "receive": ["*"], "ts": 1},
                 {"op": "session_open", "sid": "s1", "app": "A", "node": "n1",
                  "boot": "b", "ts": 1},
                 {"op": "sub", "sid": "s1", "pattern": "x", "ts": 1},
                 {"op": "publish", "from": "A", "to": "A", "name": "x",
                  "payload": "", "metadata": {}, "ts": 1}])
    for now in (10, 20, 21):  # deliver, time out, deliver again
        state.apply(state.plan(now_ms=now, term=1, ack_timeout_ms=5, ops_max=4))
    p = next(iter(state.events))[0]
    idem = f"evt-{p:04x}-{1:012x}"

    stale = state.apply([{"op": "ack", "sid": "s1", "idem": idem, "attempt": 1}])
    fresh = state.apply([{"op": "ack", "sid": "s1", "idem": idem, "attempt": 2}])

    assert stale.results[0]["error"] == "NOT_FOUND"
    assert fresh.results == [{"ok": True, "idem": idem}]


def test_an_event_deferred_on_its_last_allowed_delivery_goes_to_the_dlq_when_due():
    state = BrokerState()
    state.apply([{"op": "key_create", "name": "a", "key_hash": "h1", "app_id": "A",
                  "send": ["*"], "receive": ["*"], "ts": 1},
                 {"op": "session_open", "sid": "s1", "app": "A", "node": "n1",
                  "boot": "b", "ts": 1},
                 {"op": "sub", "sid": "s1", "pattern": "x", "ts": 1},
                 {"op": "publish", "from": "A", "to": "A", "name": "x",
                  "payload": "", "metadata": {}, "ts": 1}])
    state.apply(state.plan(now_ms=10, term=1, ack_timeout_ms=60_000, ops_max=4))
    key = next(iter(state.events))
    idem = f"evt-{key[0]:04x}-{key[1]:012x}"
    state.apply([{"op": "defer", "sid": "s1", "idem": idem, "delay_ms": 5, "ts": 11}])

    releases = [op for op in state.plan(now_ms=20, term=1, ack_timeout_ms=60_000,
                                        ops_max=4) if op["op"] == "release"]
    state.apply([{**op, "delivery_limit": 1} for op in releases])

    assert key in state.dead and key not in state.events


# -- SUB WINDOW (ours): several records in flight per subscription --------------


def windowed(window: int, events: int) -> Recorded:
    run = Recorded()
    run.apply(key_create(A, "alpha"), key_create(B, "beta"))
    run.apply(session_open("s1"), {**sub("s1"), "window": window})
    run.apply(*[publish(ts=100 + i) for i in range(events)])
    return run


def test_a_windowed_subscription_gets_up_to_its_window_in_flight_in_order():
    run = windowed(window=3, events=5)

    run.apply(*plan(run.state))

    held = sorted(run.state.inflight.items())
    assert [(key, off) for key, (_, off) in held] == [
        (("s1", ORDERS, 0), 1), (("s1", ORDERS, 1), 2), (("s1", ORDERS, 2), 3)]
    assert assigned(plan(run.state)) == []


def test_acking_one_record_of_a_window_frees_one_slot_for_the_next_event():
    run = windowed(window=3, events=5)
    run.apply(*plan(run.state))

    run.apply(ack("s1", 2))

    assert assigned(plan(run.state)) == [("s1", ORDERS, 4)]


def test_an_assign_beyond_the_window_is_stale():
    run = windowed(window=2, events=3)

    result, _ = one(run.state, {**assign("s1", 1, term=1), "slot": 2})

    assert result["error"] == "STALE"


def test_closing_a_windowed_session_returns_every_record_it_held():
    run = windowed(window=4, events=4)
    run.apply(*plan(run.state))

    run.apply({"op": "session_close", "sid": "s1"})

    assert run.state.inflight == {}
    assert run.state.statistics().pending_events == 4


def test_load_restores_the_window_and_the_slot_of_every_record_in_flight():
    run = windowed(window=3, events=5)
    run.apply(*plan(run.state))
    run.apply(ack("s1", 2))
    loaded = BrokerState()

    loaded.load(run.db.state_rows())

    assert loaded.inflight == run.state.inflight
    assert loaded.sessions["s1"].windows == {ORDERS: 3}
    assert assigned(plan(loaded)) == assigned(plan(run.state)) == [("s1", ORDERS, 4)]


def test_a_windowed_wildcard_takes_the_smallest_ranks_across_its_queues():
    run = Recorded()
    run.apply(key_create(A, "alpha"), key_create(B, "beta"))
    run.apply(session_open("s1"), {**sub("s1", "orders/*"), "window": 3})
    names = ["orders/a", "orders/b", "orders/b", "orders/a", "orders/b"]
    run.apply(*[publish(name, ts=100 + i) for i, name in enumerate(names)])

    assert sorted(off for _, _, off in assigned(plan(run.state))) == [1, 2, 3]


def test_a_window_wider_than_ops_max_fills_over_several_rounds():
    run = windowed(window=5, events=5)

    first = plan(run.state, ops_max=2)
    second = plan(run.state, ops_max=64)

    assert [off for _, _, off in assigned(first)] == [1, 2]
    assert [off for _, _, off in assigned(second)] == [3, 4, 5]
