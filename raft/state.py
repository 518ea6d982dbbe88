"""The broker's state machine: what every replica does with a committed batch.

The problem: every node must reach the same state from the same log, and the
leader must decide delivery (which session gets which event) in a way that a new
leader neither skips nor repeats. pysyncobj gives us an ordered log; this module
gives that log a meaning.

The approach: ``BrokerState.apply`` takes one committed batch of operations and the
entry's Raft index and returns three things: the RocksDB writes that make the batch
durable, one result per operation (what the waiting client is told), and effects
for the serving node (push this record to that local session, close that socket).
It reads no clock, no random source and no network: times come inside the ops,
stamped by the node that proposed them, and are clamped so they never go back.

Delivery decisions are ops too. The leader calls ``plan`` (pure, over the applied
state) and proposes ``assign``/``requeue``/``node_down`` ops stamped with its term.
``apply`` re-validates each one against the state at that point of the log and
ignores decisions from a term older than one already applied (a deposed leader
that still believes it leads cannot move an event). So a stale plan is harmless,
and the assignment that a serving node acts on is always the committed one.

In memory we keep only what delivery needs: apps, sessions, subscriptions, and the
events not yet acknowledged (without payloads). RocksDB holds everything, and
``load`` rebuilds the memory from it at start and after a snapshot install.

Rejected: applying on the asyncio thread (the snapshot would then not match
pysyncobj's applied index), and keeping payloads in memory (unbounded).
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field

import orjson

from raft import schema
from raft.planning import Planning
from raft.queues import Queue, index_key, parse_index_key
from raft.schema import (ACKED, DEAD, DEFERRED, DISCARDED, EXPIRED, FINISHED,
                         INFLIGHT, PENDING)

# A proposer that got no answer resubmits the same batch under the same id. Apply
# answers a repeat from this table instead of applying it twice. Entries leave the
# table by log time, so every replica drops the same ones.
BATCH_DEDUP_WINDOW_MS = 30_000

# Defaults used when an op does not carry its own (older proposers).
DELIVERY_LIMIT_DEFAULT = 20
PUBLISH_DEDUP_WINDOW_MS_DEFAULT = 120_000
# Events held for one recipient app (pending, in flight, deferred) when a
# publish op carries no ``recipient_events_max``: no limit.
RECIPIENT_EVENTS_MAX_DEFAULT = 1 << 62



@dataclass
class Event:
    p: int
    off: int
    app: str
    name: str
    state: str = PENDING
    sid: str | None = None
    pattern: str | None = None
    attempts: int = 0
    deadline_ms: int = 0
    priority: int = 1
    due_ms: int = 0
    hist: int = 0  # audit rows written so far
    born_ms: int = 0  # log time of the publish
    slot: int = 0  # which of its subscription's window slots holds it in flight

    def rank(self) -> tuple[int, int]:
        """Queue order: higher priority first, then commit order."""
        return (-self.priority, self.off)


@dataclass
class Session:
    app: str
    node: str
    boot: str
    opened_ms: int
    subs: dict[str, bool] = field(default_factory=dict)  # pattern -> paused
    # pattern -> ack timeout chosen at SUB; absent: the node's default
    ack_timeouts_ms: dict[str, int] = field(default_factory=dict)
    # pattern -> records it may hold in flight at once (SUB WINDOW, ours);
    # absent: one, as the SDK expects
    windows: dict[str, int] = field(default_factory=dict)
    last_active_ms: int = 0  # log time of its last delivery or answer


@dataclass(frozen=True)
class ClosedSession:
    sid: str
    app: str
    node: str
    opened_ms: int
    closed_ms: int
    reason: str


# Recently closed sessions kept in memory for operators ("disconnected").
CLOSED_SESSIONS_MAX = 1000


@dataclass(frozen=True)
class Push:
    sid: str
    pattern: str
    p: int
    off: int
    attempt: int


@dataclass(frozen=True)
class Close:
    sid: str
    reason: str


@dataclass
class Applied:
    writes: dict[bytes, bytes | None]
    results: list[dict]
    effects: list[Push | Close]


@dataclass(frozen=True)
class StateStatistics:
    apps: int
    sessions: int
    subscriptions: int
    pending_events: int
    inflight_events: int
    resident_events: int  # in memory: queue windows, in flight, deferred
    dead_events: int  # in the dead-letter queue now
    dead_lettered_total: int  # moved to the DLQ since this replica loaded


def _fail(code: str, message: str) -> dict:
    return {"error": code, "message": message}


def _limit(op: dict) -> int:
    return op.get("delivery_limit", DELIVERY_LIMIT_DEFAULT)


def key_expired(rec: dict, now_ms: int) -> bool:
    """Whether an app's key has expired by ``now_ms`` (log time or a clock)."""
    return bool(rec.get("expired")) or 0 < rec.get("expires_ms", 0) <= now_ms


class BrokerState(Planning):
    """The replicated state; ``reader`` reads this node's RocksDB (get, scan).

    Without a reader every pending event stays in memory (the core's tests);
    with one, queues keep only a window in memory (``raft/queues.py``).
    """

    def __init__(self, reader=None) -> None:
        self.reader = reader
        self.apps: dict[str, dict] = {}
        self.key_hashes: dict[str, str] = {}
        # app -> expiry (ms, log time) of keys that carry one and have not
        # expired yet; the leader proposes ``key_expire`` once it passes.
        self.key_expiries: dict[str, int] = {}
        # app -> events addressed to it and still to deliver (pending, in
        # flight, deferred; not finished, not dead); derived, never stored:
        # ``load`` recounts.
        self.held_events: collections.Counter[str] = collections.Counter()
        self.app_names: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.app_sessions: dict[str, list[str]] = {}
        self.events: dict[tuple[int, int], Event] = {}
        self.queues: dict[str, dict[str, Queue]] = {}  # app -> name -> queue
        # (sid, pattern, slot) -> event; slot < the subscription's window
        self.inflight: dict[tuple[str, str, int], tuple[int, int]] = {}
        self.deferred: list[tuple[int, int, int]] = []  # heap of (due_ms, p, off)
        self.dead: dict[tuple[int, int], Event] = {}
        self.closed_sessions: collections.deque[ClosedSession] = collections.deque(
            maxlen=CLOSED_SESSIONS_MAX)
        # (sender app, idempotency key) -> (log time, idem), oldest first
        self.publish_keys: collections.OrderedDict[tuple[str, str], tuple[int, str]] = (
            collections.OrderedDict())
        self.index = 0  # Raft index of the entry being applied, for the audit
        self.next_off: dict[int, int] = {}
        self.fence_term = 0
        self.clock_ms = 0
        # Events this replica moved to the DLQ since it loaded; a counter for
        # operators, never written to the store.
        self.dead_lettered_total = 0
        # Leader-local planning memory; never replicated, reset on leader change.
        self.dirty_apps: set[str] = set()
        self.planned: dict[tuple[int, int], int] = {}
        self.planned_slots: dict[tuple[str, str, int], int] = {}
        # batch id -> (log time, results), oldest first
        self.batches: collections.OrderedDict[str, tuple[int, list]] = (
            collections.OrderedDict())

    # -- loading ----------------------------------------------------------------

    def load(self, rows) -> None:
        """Rebuild memory from RocksDB rows (key, value) in key order."""
        subs = []  # ``b/`` sorts before ``s/``: attach subscriptions last
        batches = []
        for key, value in rows:
            prefix = key[:2]
            if prefix == b"a/":
                self._load_app(key[2:].decode(), orjson.loads(value))
            elif prefix == b"k/":
                self.key_hashes[key[2:].decode()] = value.decode()
            elif prefix == b"s/":
                self._add_session(key[2:].decode(), orjson.loads(value))
            elif prefix == b"b/":
                subs.append((key[2:].decode(), orjson.loads(value)))
            elif prefix == b"d/" and self.reader is None:
                self._load_delivery(key, orjson.loads(value))
            elif prefix == b"x/" and self.reader is not None:
                p, off = int(key[2:6], 16), int(key[7:], 16)
                raw = self.reader.get(schema.delivery_key(p, off))
                self._load_delivery(schema.delivery_key(p, off), orjson.loads(raw))
            elif prefix == b"u/":
                app, _, key_text = key[2:].decode().partition(";")
                rec = orjson.loads(value)
                batches.append((rec["ts"], "u", (app, key_text, rec["idem"])))
            elif prefix == b"r/":
                rec = orjson.loads(value)
                batches.append((rec["ts"], key[2:].decode(), rec["results"]))
            elif key.startswith(b"m/off/"):
                self.next_off[int(key[6:], 16)] = int(value)
            elif key == schema.FENCE:
                self.fence_term = int(value)
            elif key == schema.CLOCK:
                self.clock_ms = int(value)
        for ts, kind, item in sorted(batches, key=lambda b: b[0]):
            if kind == "u":
                self.publish_keys[(item[0], item[1])] = (ts, item[2])
            else:
                self.batches[kind] = (ts, item)
        for sid_pattern, sub in subs:
            sid, _, pattern = sid_pattern.partition("/")
            self.sessions[sid].subs[pattern] = sub["paused"]
            if sub.get("ack_timeout_ms"):
                self.sessions[sid].ack_timeouts_ms[pattern] = sub["ack_timeout_ms"]
            if sub.get("window"):
                self.sessions[sid].windows[pattern] = sub["window"]
        if self.reader is not None:
            self._load_queue_counts()
        self.held_events = self.count_held_events()
        self.dirty_apps = set(self.apps)

    def count_held_events(self) -> collections.Counter[str]:
        """Unfinished events per recipient, counted from scratch."""
        held: collections.Counter[str] = collections.Counter()
        for app, queues in self.queues.items():
            held[app] += sum(q.pending for q in queues.values())
        for ev in self.events.values():
            if ev.state != PENDING:
                held[ev.app] += 1
        return +held

    def _load_queue_counts(self) -> None:
        """Count each queue's pending events from its index; load none of them."""
        counts: dict[tuple[str, str], int] = collections.Counter()
        for key in self.reader.scan(b"q/", b"q/", None):
            app, name, _ = parse_index_key(key)
            counts[(app, name)] += 1
        for (app, name), pending in counts.items():
            queue = Queue(app, name, pending, resident=False)
            self.queues.setdefault(app, {})[name] = queue

    def _load_app(self, app_id: str, rec: dict) -> None:
        self.apps[app_id] = rec
        self.app_names[rec["name"]] = app_id
        self._track_expiry(app_id, rec)

    def _track_expiry(self, app_id: str, rec: dict) -> None:
        if rec.get("expires_ms") and not rec.get("expired"):
            self.key_expiries[app_id] = rec["expires_ms"]
        else:
            self.key_expiries.pop(app_id, None)

    def _load_delivery(self, key: bytes, d: dict) -> None:
        if d["state"] in FINISHED:
            return
        p, off = int(key[2:6], 16), int(key[7:], 16)
        ev = self._make_event(p, off, d)
        if ev.state == DEAD:
            self.dead[(p, off)] = ev
            return
        self.events[(p, off)] = ev
        if ev.state == INFLIGHT:
            self.inflight[(ev.sid, ev.pattern, ev.slot)] = (p, off)
        elif ev.state == DEFERRED:
            heapq.heappush(self.deferred, (ev.due_ms, p, off))
        else:
            self._enqueue(ev, None)

    def _make_event(self, p: int, off: int, d: dict) -> Event:
        return Event(p, off, d["to"], d["name"], d["state"], d.get("sid"),
                     d.get("pattern"), d["attempts"], d.get("deadline_ms", 0),
                     d.get("priority", 1), d.get("due_ms", 0), d.get("hist", 0),
                     d.get("born_ms", 0), d.get("slot", 0))

    def _pending_event(self, key: tuple[int, int]) -> Event | None:
        """A pending event, from memory or, outside the window, from RocksDB."""
        ev = self.events.get(key)
        if ev is not None or self.reader is None:
            return ev if ev is not None and ev.state == PENDING else None
        raw = self.reader.get(schema.delivery_key(*key))
        if raw is None:
            return None
        d = orjson.loads(raw)
        return self._make_event(*key, d) if d["state"] == PENDING else None

    # -- apply ------------------------------------------------------------------

    def apply_batch(self, batch_id: str, ops: list[dict], index: int = 0) -> Applied:
        """Apply a proposer's batch once, however many times it was submitted."""
        self.index = index
        seen = self.batches.get(batch_id)
        if seen is not None:
            return Applied({}, seen[1], [])

        out = self.apply(ops)
        self.batches[batch_id] = (self.clock_ms, out.results)
        out.writes[schema.batch_key(batch_id)] = orjson.dumps(
            {"ts": self.clock_ms, "results": out.results})
        horizon_ms = self.clock_ms - BATCH_DEDUP_WINDOW_MS
        while self.batches:
            oldest_id, (ts, _) = next(iter(self.batches.items()))
            if ts >= horizon_ms:
                break
            del self.batches[oldest_id]
            out.writes[schema.batch_key(oldest_id)] = None
        return out

    def apply(self, ops: list[dict]) -> Applied:
        assert isinstance(ops, list)

        out = Applied({}, [], [])
        for op in ops:
            ts = op.get("ts", 0)
            if ts > self.clock_ms:
                self.clock_ms = ts
                out.writes[schema.CLOCK] = b"%d" % ts
            handler = _HANDLERS.get(op.get("op"))
            if handler is None:
                out.results.append(_fail("INVALID_PARAMETER", "unknown operation"))
                continue
            out.results.append(handler(self, op, out))
        return out

    def _op_key_create(self, op: dict, out: Applied) -> dict:
        if op["name"] in self.app_names:
            app_id = self.app_names[op["name"]]
            return {**_fail("NAME_TAKEN", "key name exists"), "app_id": app_id}
        if op["key_hash"] in self.key_hashes or op["app_id"] in self.apps:
            return _fail("KEY_EXISTS", "key exists")

        rec = {"name": op["name"], "send": op["send"], "receive": op["receive"],
               "key_hash": op["key_hash"], "created_ms": self.clock_ms}
        if op.get("expires_ms"):
            rec["expires_ms"] = op["expires_ms"]
        self._load_app(op["app_id"], rec)
        self.key_hashes[op["key_hash"]] = op["app_id"]
        out.writes[schema.app_key(op["app_id"])] = orjson.dumps(rec)
        out.writes[schema.key_hash_key(op["key_hash"])] = op["app_id"].encode()
        return {"ok": True, "app_id": op["app_id"]}

    def _op_key_disable(self, op: dict, out: Applied) -> dict:
        """Disable (or enable) an app's key; its open sessions close at once."""
        rec = self.apps.get(op["app_id"])
        if rec is None:
            return _fail("NOT_FOUND", "no such app")
        rec["disabled"] = op["disabled"]
        out.writes[schema.app_key(op["app_id"])] = orjson.dumps(rec)
        if op["disabled"]:
            for sid in list(self.app_sessions.get(op["app_id"], [])):
                self._close_session(sid, "key disabled", out, _limit(op))
        return {"ok": True}

    def _op_key_rotate(self, op: dict, out: Applied) -> dict:
        """Replace an app's access key; sessions opened with the old one close."""
        rec = self.apps.get(op["app_id"])
        if rec is None:
            return _fail("NOT_FOUND", "no such app")
        if op["key_hash"] in self.key_hashes:
            return _fail("KEY_EXISTS", "key exists")
        self.key_hashes.pop(rec["key_hash"], None)
        out.writes[schema.key_hash_key(rec["key_hash"])] = None
        rec["key_hash"] = op["key_hash"]
        rec["rotated_ms"] = self.clock_ms
        # The new key carries the expiry the rotation names, or none.
        rec.pop("expired", None)
        rec.pop("expires_ms", None)
        if op.get("expires_ms"):
            rec["expires_ms"] = op["expires_ms"]
        self._track_expiry(op["app_id"], rec)
        self.key_hashes[op["key_hash"]] = op["app_id"]
        out.writes[schema.key_hash_key(op["key_hash"])] = op["app_id"].encode()
        out.writes[schema.app_key(op["app_id"])] = orjson.dumps(rec)
        for sid in list(self.app_sessions.get(op["app_id"], [])):
            self._close_session(sid, "key rotated", out, _limit(op))
        return {"ok": True}

    def _op_key_expire(self, op: dict, out: Applied) -> dict:
        """Leader: a key's expiry passed (in log time); its sessions close.

        Apply reads no clock, so the leader proposes this once its clock passes
        the expiry; the entry's own time decides, so a replica agrees."""
        self.planned.pop(("key", op["app_id"]), None)
        rec = self.apps.get(op["app_id"])
        if rec is None:
            return _fail("NOT_FOUND", "no such app")
        if rec.get("expired"):
            return {"ok": True}
        if not rec.get("expires_ms") or rec["expires_ms"] > self.clock_ms:
            return _fail("STALE", "key has not expired")
        rec["expired"] = True
        self._track_expiry(op["app_id"], rec)
        out.writes[schema.app_key(op["app_id"])] = orjson.dumps(rec)
        for sid in list(self.app_sessions.get(op["app_id"], [])):
            self._close_session(sid, "key expired", out, _limit(op))
        return {"ok": True}

    def _op_barrier(self, op: dict, out: Applied) -> dict:
        return {"ok": True}

    def _op_session_open(self, op: dict, out: Applied) -> dict:
        rec = self.apps.get(op["app"])
        if rec is None or rec.get("disabled") or key_expired(rec, self.clock_ms):
            return _fail("UNAUTHORIZED", "unknown, disabled or expired key")
        if op["sid"] in self.sessions:
            return {"ok": True}

        rec = {"app": op["app"], "node": op["node"], "boot": op["boot"],
               "opened_ms": self.clock_ms}
        self._add_session(op["sid"], rec)
        out.writes[schema.session_key(op["sid"])] = orjson.dumps(rec)
        return {"ok": True}

    def _add_session(self, sid: str, rec: dict) -> None:
        self.sessions[sid] = Session(rec["app"], rec["node"], rec["boot"],
                                     rec["opened_ms"], last_active_ms=rec["opened_ms"])
        self.app_sessions.setdefault(rec["app"], []).append(sid)

    def _op_session_close(self, op: dict, out: Applied) -> dict:
        if op["sid"] not in self.sessions:
            return {"ok": True}
        self._close_session(op["sid"], op.get("reason", "closed"), out, _limit(op))
        return {"ok": True}

    def _close_session(self, sid: str, reason: str, out: Applied, limit: int) -> None:
        session = self.sessions[sid]
        for pattern in list(session.subs):
            self._drop_sub(sid, pattern, out, limit)
        del self.sessions[sid]
        self.app_sessions[session.app].remove(sid)
        self.closed_sessions.append(ClosedSession(
            sid, session.app, session.node, session.opened_ms, self.clock_ms, reason))
        out.writes[schema.session_key(sid)] = None
        out.effects.append(Close(sid, reason))

    def _op_node_boot(self, op: dict, out: Applied) -> dict:
        stale = [sid for sid, s in self.sessions.items()
                 if s.node == op["node"] and s.boot != op["boot"]]
        for sid in stale:
            self._close_session(sid, "node restarted", out, _limit(op))
        return {"ok": True, "closed": len(stale)}

    def _op_node_down(self, op: dict, out: Applied) -> dict:
        if not self._fence(op, out):
            return _fail("STALE_TERM", "decision from an older term")
        gone = [sid for sid, s in self.sessions.items() if s.node == op["node"]]
        for sid in gone:
            self._close_session(sid, "node unreachable", out, _limit(op))
        return {"ok": True, "closed": len(gone)}

    def _op_sub(self, op: dict, out: Applied) -> dict:
        session = self.sessions.get(op["sid"])
        if session is None:
            return _fail("CLIENT_NOT_FOUND", "session is closed")
        if op["pattern"] not in session.subs:
            session.subs[op["pattern"]] = False
            key = schema.sub_key(op["sid"], op["pattern"])
            sub = {"paused": False}
            if op.get("ack_timeout_ms"):
                sub["ack_timeout_ms"] = op["ack_timeout_ms"]
                session.ack_timeouts_ms[op["pattern"]] = op["ack_timeout_ms"]
            if op.get("window", 1) > 1:
                sub["window"] = op["window"]
                session.windows[op["pattern"]] = op["window"]
            out.writes[key] = orjson.dumps(sub)
            self.dirty_apps.add(session.app)
        return {"ok": True}

    def _op_unsub(self, op: dict, out: Applied) -> dict:
        session = self.sessions.get(op["sid"])
        if session is None:
            return _fail("CLIENT_NOT_FOUND", "session is closed")
        if op["pattern"] not in session.subs:
            return _fail("NOT_FOUND", "no such subscription")
        self._drop_sub(op["sid"], op["pattern"], out, _limit(op))
        return {"ok": True}

    def _drop_sub(self, sid: str, pattern: str, out: Applied, limit: int) -> None:
        session = self.sessions[sid]
        del session.subs[pattern]
        window = session.windows.pop(pattern, 1)
        out.writes[schema.sub_key(sid, pattern)] = None
        for slot in range(window):
            held = self.inflight.get((sid, pattern, slot))
            if held is not None:
                ev = self.events[held]
                self._audit(ev, "returned", out, sid=sid, why="unsubscribed or closed")
                self._return_to_queue(ev, out, limit)

    def _op_publish(self, op: dict, out: Applied) -> dict:
        if op["to"] not in self.apps:
            return _fail("INVALID_RECIPIENT", "no app with that id")
        dedup_key = (op["from"], op["dedup_key"]) if op.get("dedup_key") else None
        self._expire_publish_keys(op, out)
        if dedup_key in self.publish_keys:
            ts, idem = self.publish_keys[dedup_key]
            return {"ok": True, "idem": idem, "ts": ts, "duplicate": True}
        held_max = op.get("recipient_events_max", RECIPIENT_EVENTS_MAX_DEFAULT)
        if self.held_events[op["to"]] >= held_max:
            # Says no more than "full": the recipient's backlog is not the sender's
            # business.
            return _fail("QUEUE_FULL", "the recipient's queue is full")
        self.held_events[op["to"]] += 1

        p = schema.partition_of(op["to"])
        off = self.next_off.get(p, 1)
        self.next_off[p] = off + 1
        idem = schema.idem_of(p, off)
        record = {"idem": idem, "id": idem, "name": op["name"], "block": off,
                  "loggedAt": self.clock_ms, "payload": op["payload"],
                  "metadata": op["metadata"], "sender": op["from"]}

        ev = Event(p, off, op["to"], op["name"], born_ms=self.clock_ms)
        self.events[(p, off)] = ev
        self._audit(ev, "published", out, by=op["from"], node=op.get("node"),
                    sid=op.get("sid"))
        self._audit(ev, "committed", out, index=self.index)
        due_ms = op.get("deliver_at_ms") or 0
        if due_ms > self.clock_ms:
            self._defer(ev, due_ms, 1, "scheduled", out)
        else:
            self._enqueue(ev, out)
        out.writes[schema.offset_key(p)] = b"%d" % (off + 1)
        out.writes[schema.event_key(p, off)] = orjson.dumps(record)
        self._write_delivery(ev, out)
        if dedup_key is not None:
            self.publish_keys[dedup_key] = (self.clock_ms, idem)
            out.writes[schema.publish_key(*dedup_key)] = orjson.dumps(
                {"ts": self.clock_ms, "idem": idem})
        return {"ok": True, "idem": idem, "ts": self.clock_ms}

    def _expire_publish_keys(self, op: dict, out: Applied) -> None:
        window_ms = op.get("dedup_window_ms", PUBLISH_DEDUP_WINDOW_MS_DEFAULT)
        while self.publish_keys:
            key, (ts, _) = next(iter(self.publish_keys.items()))
            if ts >= self.clock_ms - window_ms:
                break
            del self.publish_keys[key]
            out.writes[schema.publish_key(*key)] = None

    def _op_assign(self, op: dict, out: Applied) -> dict:
        key = (op["p"], op["off"])
        self.planned.pop(key, None)
        slot = op.get("slot", 0)
        self.planned_slots.pop((op["sid"], op["pattern"], slot), None)
        if not self._fence(op, out):
            return _fail("STALE_TERM", "decision from an older term")

        ev = self._pending_event(key)
        if ev is not None:
            # Whatever the outcome, the leader must look at this app again.
            self.dirty_apps.add(ev.app)
        session = self.sessions.get(op["sid"])
        if ev is None or ev.state != PENDING or session is None:
            return _fail("STALE", "event or session changed")
        if session.app != ev.app or session.subs.get(op["pattern"]) is not False:
            return _fail("STALE", "subscription changed")
        if not schema.matches(op["pattern"], ev.name):
            return _fail("STALE", "pattern does not match")
        if slot >= session.windows.get(op["pattern"], 1):
            return _fail("STALE", "slot is outside the window")
        if (op["sid"], op["pattern"], slot) in self.inflight:
            return _fail("STALE", "slot is busy")

        self._dequeue(ev, out)
        self.events[key] = ev
        ev.state, ev.sid, ev.pattern, ev.slot = INFLIGHT, op["sid"], op["pattern"], slot
        ev.attempts += 1
        ev.deadline_ms = op["deadline_ms"]
        self.inflight[(ev.sid, ev.pattern, slot)] = key
        session.last_active_ms = self.clock_ms
        self._audit(ev, "delivered", out, sid=ev.sid, node=session.node,
                    attempt=ev.attempts)
        self._write_delivery(ev, out)
        out.effects.append(Push(ev.sid, ev.pattern, ev.p, ev.off, ev.attempts))
        return {"ok": True}

    def _op_ack(self, op: dict, out: Applied) -> dict:
        ev, error = self._held_event(op)
        if error:
            return error
        self._finish(ev, ACKED, out, sid=op["sid"])
        return {"ok": True, "idem": op["idem"]}

    def _op_defer(self, op: dict, out: Applied) -> dict:
        ev, error = self._held_event(op)
        if error:
            return error
        self._release_slot(ev)
        due_ms = self.clock_ms + op["delay_ms"]
        self._defer(ev, due_ms, op.get("priority", 1), op.get("reason", ""), out)
        self._write_delivery(ev, out)
        return {"ok": True, "idem": op["idem"], "due_ms": due_ms}

    def _op_discard(self, op: dict, out: Applied) -> dict:
        ev, error = self._held_event(op)
        if error:
            return error
        self._finish(ev, DISCARDED, out, sid=op["sid"], reason=op.get("reason", ""))
        return {"ok": True, "idem": op["idem"]}

    def _op_rollback(self, op: dict, out: Applied) -> dict:
        ev, error = self._held_event(op)
        if error:
            return error
        self._audit(ev, "rolled back", out, sid=op["sid"])
        self._return_to_queue(ev, out, _limit(op))
        return {"ok": True, "idem": op["idem"]}

    def _op_pause(self, op: dict, out: Applied) -> dict:
        session = self.sessions.get(op["sid"])
        if session is None:
            return _fail("CLIENT_NOT_FOUND", "session is closed")
        paused = session.subs.get(op["pattern"])
        if paused is None:
            return _fail("NOT_SUBSCRIBED", "no such subscription")
        if paused == op["paused"]:
            if paused:
                return _fail("ALREADY_PAUSED", "subscription is paused")
            return _fail("NOT_PAUSED", "subscription is not paused")
        session.subs[op["pattern"]] = op["paused"]
        sub = {"paused": op["paused"]}
        if op["pattern"] in session.ack_timeouts_ms:
            sub["ack_timeout_ms"] = session.ack_timeouts_ms[op["pattern"]]
        if op["pattern"] in session.windows:
            sub["window"] = session.windows[op["pattern"]]
        out.writes[schema.sub_key(op["sid"], op["pattern"])] = orjson.dumps(sub)
        self.dirty_apps.add(session.app)
        return {"ok": True}

    def _op_release(self, op: dict, out: Applied) -> dict:
        """Leader: a deferred event is due; it rejoins its queue by priority."""
        self.planned.pop((op["p"], op["off"]), None)
        ev = self.events.get((op["p"], op["off"]))
        if ev is None or ev.state != DEFERRED or ev.due_ms > self.clock_ms:
            return _fail("STALE", "event is not due")
        ev.due_ms = 0
        if ev.attempts >= _limit(op):
            # Deferring counts as a delivery, as a delayed NAK does in JetStream:
            # an event deferred on its last allowed delivery goes to the DLQ.
            del self.events[(ev.p, ev.off)]
            ev.state = DEAD
            self.dead[(ev.p, ev.off)] = ev
            self.dead_lettered_total += 1
            self._count_gone(ev.app)
            self._audit(ev, "dead-lettered", out, attempts=ev.attempts,
                        limit=_limit(op))
        else:
            ev.state = PENDING
            self._audit(ev, "released", out)
            self._enqueue(ev, out)
        self._write_delivery(ev, out)
        return {"ok": True}

    def _op_dlq_requeue(self, op: dict, out: Applied) -> dict:
        ev = self.dead.pop((op["p"], op["off"]), None)
        if ev is None:
            return _fail("NOT_FOUND", "no such dead letter")
        ev.state, ev.attempts = PENDING, 0
        self.events[(ev.p, ev.off)] = ev
        self.held_events[ev.app] += 1
        self._audit(ev, "requeued from the dead-letter queue", out,
                    by=op.get("by", "admin"))
        self._enqueue(ev, out)
        self._write_delivery(ev, out)
        return {"ok": True, "idem": schema.idem_of(ev.p, ev.off)}

    def _held_event(self, op: dict) -> tuple[Event | None, dict | None]:
        """The in-flight event an ACK-like op names, if this session holds it."""
        parsed = schema.parse_idem(op["idem"])
        ev = self.events.get(parsed) if parsed else None
        session = self.sessions.get(op["sid"])
        if session is None:
            return None, _fail("CLIENT_NOT_FOUND", "session is closed")
        if ev is None or ev.app != session.app or ev.state != INFLIGHT:
            return None, _fail("NOT_FOUND", "no such event in flight")
        if ev.sid != op["sid"]:
            return None, _fail("UNAUTHORIZED", "event is held by another client")
        if op.get("attempt") and op["attempt"] != ev.attempts:
            return None, _fail("NOT_FOUND", "that delivery attempt is over")
        session.last_active_ms = self.clock_ms
        return ev, None

    def _op_requeue(self, op: dict, out: Applied) -> dict:
        if not self._fence(op, out):
            return _fail("STALE_TERM", "decision from an older term")
        ev = self.events.get((op["p"], op["off"]))
        if ev is None or ev.state != INFLIGHT or ev.attempts != op["attempt"]:
            return _fail("STALE", "event is not in that delivery any more")
        self._audit(ev, "timed out", out, sid=ev.sid, attempt=ev.attempts)
        self._return_to_queue(ev, out, _limit(op))
        return {"ok": True}

    # -- helpers ----------------------------------------------------------------

    def _fence(self, op: dict, out: Applied) -> bool:
        term = op["term"]
        if term < self.fence_term:
            return False
        if term > self.fence_term:
            self.fence_term = term
            out.writes[schema.FENCE] = b"%d" % term
        return True

    def _release_slot(self, ev: Event) -> None:
        del self.inflight[(ev.sid, ev.pattern, ev.slot)]
        ev.sid, ev.pattern, ev.deadline_ms, ev.slot = None, None, 0, 0
        self.dirty_apps.add(ev.app)

    def _return_to_queue(self, ev: Event, out: Applied,
                         limit: int = DELIVERY_LIMIT_DEFAULT) -> None:
        """Back to the queue, or to the dead-letter queue once over the limit.

        One step either way: an event is never both gone and missing from the DLQ.
        """
        self._release_slot(ev)
        if ev.attempts >= limit:
            del self.events[(ev.p, ev.off)]
            ev.state = DEAD
            self.dead[(ev.p, ev.off)] = ev
            self.dead_lettered_total += 1
            self._count_gone(ev.app)
            self._audit(ev, "dead-lettered", out, attempts=ev.attempts, limit=limit)
        else:
            ev.state = PENDING
            self._enqueue(ev, out)
        self._write_delivery(ev, out)

    def _finish(self, ev: Event, state: str, out: Applied, **fields) -> None:
        self._release_slot(ev)
        del self.events[(ev.p, ev.off)]
        self._finished(ev, state, out, **fields)

    def _finished(self, ev: Event, state: str, out: Applied, **fields) -> None:
        self._count_gone(ev.app)
        ev.state = state
        self._audit(ev, state, out, **fields)
        self._write_delivery(ev, out)
        # Retention: the record goes after ``compact``, the history after ``forget``.
        out.writes[schema.finished_key(self.clock_ms, ev.p, ev.off)] = b""

    def _op_expire(self, op: dict, out: Applied) -> dict:
        """Leader: a pending event waited longer than the retention."""
        key = (op["p"], op["off"])
        self.planned.pop(key, None)
        if not self._fence(op, out):
            return _fail("STALE_TERM", "decision from an older term")
        ev = self._pending_event(key)
        if ev is None or ev.born_ms + op["retention_ms"] > self.clock_ms:
            return _fail("STALE", "event is not pending past its retention")
        self._dequeue(ev, out)
        self.events.pop(key, None)
        self._finished(ev, EXPIRED, out, retention_ms=op["retention_ms"])
        return {"ok": True}

    def _op_compact(self, op: dict, out: Applied) -> dict:
        """Leader: drop the records of events finished before ``before_ms``."""
        for finished_ms, p, off in op["items"]:
            out.writes[schema.finished_key(finished_ms, p, off)] = None
            out.writes[schema.event_key(p, off)] = None
            out.writes[schema.forget_key(finished_ms, p, off)] = b""
        return {"ok": True, "count": len(op["items"])}

    def _op_forget(self, op: dict, out: Applied) -> dict:
        """Leader: drop the delivery state and history of long-finished events."""
        assert self.reader is not None, "forget needs the store"
        for finished_ms, p, off in op["items"]:
            out.writes[schema.forget_key(finished_ms, p, off)] = None
            raw = self.reader.get(schema.delivery_key(p, off))
            if raw is None:
                continue
            for n in range(orjson.loads(raw).get("hist", 0)):
                out.writes[schema.history_key(p, off, n)] = None
            out.writes[schema.delivery_key(p, off)] = None
        return {"ok": True, "count": len(op["items"])}

    def _count_gone(self, app: str) -> None:
        self.held_events[app] -= 1
        if self.held_events[app] <= 0:
            del self.held_events[app]

    def _defer(self, ev: Event, due_ms: int, priority: int, reason: str,
               out: Applied) -> None:
        ev.state, ev.due_ms, ev.priority = DEFERRED, due_ms, priority
        heapq.heappush(self.deferred, (due_ms, ev.p, ev.off))
        self._audit(ev, "deferred", out, until_ms=due_ms, priority=priority,
                    reason=reason)

    def _queue(self, app: str, name: str) -> Queue:
        queues = self.queues.setdefault(app, {})
        queue = queues.get(name)
        if queue is None:
            queue = queues[name] = Queue(app, name)
        return queue

    def _enqueue(self, ev: Event, out: Applied | None) -> None:
        """``ev`` is pending now: index it (``out`` None: loading) and count it."""
        if out is not None:
            out.writes[index_key(ev.app, ev.name, ev.rank())] = b""
        self._queue(ev.app, ev.name).add(ev, self.events, self.planned,
                                         self.reader is not None)
        self.dirty_apps.add(ev.app)

    def _dequeue(self, ev: Event, out: Applied) -> None:
        """``ev`` leaves the pending state."""
        out.writes[index_key(ev.app, ev.name, ev.rank())] = None
        self._queue(ev.app, ev.name).pending -= 1

    def _audit(self, ev: Event, what: str, out: Applied, **fields) -> None:
        row = {"what": what, "at": self.clock_ms, **fields}
        out.writes[schema.history_key(ev.p, ev.off, ev.hist)] = orjson.dumps(row)
        ev.hist += 1

    def _write_delivery(self, ev: Event, out: Applied) -> None:
        d = {"to": ev.app, "name": ev.name, "state": ev.state,
             "attempts": ev.attempts, "priority": ev.priority, "hist": ev.hist,
             "born_ms": ev.born_ms}
        if ev.state == INFLIGHT:
            d.update(sid=ev.sid, pattern=ev.pattern, deadline_ms=ev.deadline_ms)
            if ev.slot:
                d["slot"] = ev.slot
        elif ev.state == DEFERRED:
            d["due_ms"] = ev.due_ms
        out.writes[schema.delivery_key(ev.p, ev.off)] = orjson.dumps(d)
        # States that live in memory are indexed, so a restart finds them fast.
        resident = ev.state in (INFLIGHT, DEFERRED, DEAD)
        out.writes[schema.resident_key(ev.p, ev.off)] = b"" if resident else None

    def statistics(self) -> StateStatistics:
        subs = sum(len(s.subs) for s in self.sessions.values())
        pending = sum(q.pending for queues in self.queues.values()
                      for q in queues.values())
        return StateStatistics(len(self.apps), len(self.sessions), subs, pending,
                               len(self.inflight), len(self.events), len(self.dead),
                               self.dead_lettered_total)


_HANDLERS = {
    "barrier": BrokerState._op_barrier,
    "key_create": BrokerState._op_key_create,
    "key_disable": BrokerState._op_key_disable,
    "key_rotate": BrokerState._op_key_rotate,
    "key_expire": BrokerState._op_key_expire,
    "session_open": BrokerState._op_session_open,
    "session_close": BrokerState._op_session_close,
    "node_boot": BrokerState._op_node_boot,
    "node_down": BrokerState._op_node_down,
    "sub": BrokerState._op_sub,
    "unsub": BrokerState._op_unsub,
    "publish": BrokerState._op_publish,
    "assign": BrokerState._op_assign,
    "ack": BrokerState._op_ack,
    "requeue": BrokerState._op_requeue,
    "defer": BrokerState._op_defer,
    "discard": BrokerState._op_discard,
    "rollback": BrokerState._op_rollback,
    "pause": BrokerState._op_pause,
    "release": BrokerState._op_release,
    "dlq_requeue": BrokerState._op_dlq_requeue,
    "expire": BrokerState._op_expire,
    "compact": BrokerState._op_compact,
    "forget": BrokerState._op_forget,
}
