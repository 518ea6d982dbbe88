"""A node: the aiohttp app, its clients, the admin API, and the leader's dispatcher.

Data flow of one event: a PUB on any node becomes a ``publish`` op, grouped with
others by the ``Proposer`` into one Raft entry. When the entry is applied on the
node that took the PUB, the publisher gets ``+PASS``. On the leader, the
dispatcher then plans an ``assign`` (event -> session with a free slot) and
proposes it; when that entry is applied on the node serving the session, the
record is pushed. The ACK is one more op, which frees the slot.

The dispatcher also turns time into ops: expired acknowledgements (``requeue``)
and sessions on nodes the leader has not heard from (``node_down``). Both carry
the leader's term, and apply ignores them from an older term.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import heapq
import itertools
import logging
import os
import secrets
import ssl

import orjson
from dataclasses import dataclass, field

from aiohttp import web
from nacl.signing import SigningKey

from node.errors import BrokerError, NotLeader, RequestRejected, Unavailable
from node.rates import DeliveryRates
from node.session import Connection
from node.unsafe import EarlyAcker
from raft import schema
from raft.machine import Proposer, RaftConfig, ReplicatedBroker, now_ms
from raft.schema import PENDING
from raft.state import Close, Push

log = logging.getLogger("ensync.node")

ROLES = {0: "follower", 1: "candidate", 2: "leader"}
# A node further behind its known commit index than this holds its pushes, and
# looks again this often: entries it has not applied may supersede them.
PUSH_LAG_ENTRIES_MAX = 32
PUSH_LAG_RECHECK_MS = 20
# Expiries, and events compacted or forgotten, per leader round.
RETENTION_OPS_MAX = 256
# Ops that can hand an in-flight event back, so may send it to the DLQ.
RETURNING_OPS = frozenset({"session_close", "node_boot", "node_down", "unsub",
                           "rollback", "requeue", "key_disable", "key_rotate",
                           "key_expire", "release"})
# Key expiries the leader proposes per dispatcher round.
KEY_EXPIRE_OPS_MAX = 64
# Client ops committed through this node, counted for the dashboard's rates.
COUNTED_OPS = {"publish": "publishes_total", "ack": "acks_total"}
# Leadership transfer: how long an admin call waits for the new leader, how often
# it looks, and how long one answer from the tick thread may take.
TRANSFER_TIMEOUT_MS = 10_000
TRANSFER_POLL_MS = 50
TRANSFER_ANSWER_MS = 1000


@dataclass
class NodeConfig:
    raft: RaftConfig
    host: str = "127.0.0.1"
    port: int = 8081
    admin_token: str = ""
    ack_timeout_ms: int = 60_000
    node_down_ms: int = 5_000
    dispatch_interval_ms: int = 20
    dispatch_ops_max: int = 512
    plan_age_ms_max: int = 15_000
    ping_interval_ms: int = 30_000
    ws_heartbeat_ms: int = 20_000
    stuck_follower_ms: int = 10_000
    delivery_limit: int = 20
    journal_bytes_max: int = 64 << 20
    retention_ms: int = 30 * 86_400_000  # pending events wait at most this long
    finished_retention_ms: int = 7 * 86_400_000  # acked/discarded records kept
    history_retention_ms: int = 30 * 86_400_000  # their audit trail kept
    retention_check_ms: int = 1000
    dedup_window_ms: int = 120_000
    idle_after_ms: int = 60_000
    ready_lag_entries_max: int = 100  # /ready: applied may trail commit this much
    # Client limits (node/session.py, node/limits.py; docs/PROTOCOL.md "Limits").
    # 2000: the SDK awaits each reply, so a client of it stays far below; one
    # node here handles about 10 000 junk frames a second in all, so 20 000
    # (the first default) let one flooding socket take the whole loop
    # (docs/bench/flood.json). Pipelining tools set their own.
    client_frames_per_s_max: int = 2000
    client_abuse_close_ms: int = 5000
    connections_per_key_max: int = 256
    reply_bytes_max: int = 64 << 20
    client_write_buffer_bytes_max: int = 4 << 20
    client_pending_requests_max: int = 1024
    # Undelivered events per recipient app; a PUB beyond gets -FAIL:QUEUE_FULL.
    recipient_events_max: int = 1_000_000
    # CONN must prove possession of the app's Ed25519 secret key (node/session.py).
    conn_proof_required: bool = False
    peer_http: dict[str, str] = field(default_factory=dict)  # id -> http://host:port
    # node/tls.py: None serves plain ws:// and http://; the client context
    # verifies peers this node calls over https (the dashboard's cluster view).
    tls_server: ssl.SSLContext | None = None
    tls_client: ssl.SSLContext | None = None

    @property
    def id(self) -> str:
        return self.raft.node_id

    @property
    def ws_url(self) -> str:
        scheme = "ws" if self.tls_server is None else "wss"
        return f"{scheme}://{self.host}:{self.port}/message"


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.boot = secrets.token_hex(4)
        self.connections: dict[str, Connection] = {}
        self._session_seq = itertools.count(1)
        self._applied: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.broker = ReplicatedBroker(cfg.raft, self._on_applied)
        self.proposer = Proposer(self.broker, self.loop, f"{self.id}.{self.boot}.")
        self._tasks: list[asyncio.Task] = []
        self._leading = False
        self._node_seen_ms: dict[str, int] = {}
        self._node_down_sent_ms: dict[str, int] = {}
        self.counters = collections.Counter()
        self.delivery_rates = DeliveryRates()
        # Pushes wait until a barrier proposed after the node last lost touch
        # with the cluster has applied here (raft/freshness.py, _maybe_stale).
        self._fresh_marks = 0
        self._stale_logged_marks = 0
        self._freshening: asyncio.Future | None = None
        # UNSAFE, test builds only (node/unsafe.py); None everywhere else.
        self.early_acker = EarlyAcker.from_environment(self.commit, self.counters)
        # Client limits: open sockets, sessions per app (access key) on this
        # node, and reply and push text built but not yet written.
        self.live_connections = 0
        self.key_connections: collections.Counter = collections.Counter()
        self._keys_warned: set[str] = set()
        self.reply_bytes = 0
        # read_fresh: barriers proposed and finished; one runs at a time.
        self._barriers_started = 0
        self._barriers_done = 0
        self._barrier_lock = asyncio.Lock()

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._dispatch_loop()))
        self._tasks.append(asyncio.create_task(self._announce_boot()))
        self._tasks.append(asyncio.create_task(self._ping_loop()))
        self._tasks.append(asyncio.create_task(self._watchdog_loop()))
        self._tasks.append(asyncio.create_task(self._retention_loop()))

    async def stop(self) -> None:
        """Fail waiting writes, close clients; the caller then stops Raft."""
        for task in self._tasks:
            task.cancel()
        if self.early_acker is not None:
            self.early_acker.close()
        self.proposer.close()
        closing = [conn.ws.close(code=1001, message=b"node shutting down")
                   for conn in list(self.connections.values())]
        await asyncio.gather(*closing, return_exceptions=True)

    def close_storage(self) -> None:
        self.broker.destroy()
        with self.broker.lock:
            self.broker.store.close()

    # -- state access (loop thread) -------------------------------------------------

    def app_for_key(self, access_key: str) -> str | None:
        """The app of an enabled access key, or None; an expired key's app too
        (``key_expired`` tells the caller it has expired)."""
        with self.broker.lock:
            state = self.broker.state
            app = state.key_hashes.get(schema.hash_access_key(access_key))
            if app is None or state.apps[app].get("disabled"):
                return None
            return app

    def app_record(self, app_id: str | None) -> dict | None:
        with self.broker.lock:
            return self.broker.state.apps.get(app_id)

    async def read_fresh(self, lookup, *args):
        """``lookup(*args)``; on a miss, once more after a Raft barrier.

        A key or app created through another node a moment ago may not be applied
        here yet. The barrier commits through the leader and is applied here, so
        everything committed before it is visible afterwards.
        """
        found = lookup(*args)
        if found is None:
            await self.fresh_barrier()
            found = lookup(*args)
        return found

    async def fresh_barrier(self) -> None:
        """A Raft barrier proposed after this call began, shared by every miss
        waiting meanwhile: a client sending unknown keys, recipients or idems
        costs the log one entry per round trip, not one per frame."""
        wanted = self._barriers_started + 1
        async with self._barrier_lock:
            if self._barriers_done >= wanted:
                self.counters["fresh_reads_shared_total"] += 1
                return
            self._barriers_started += 1
            started = self._barriers_started
            self.counters["fresh_read_barriers_total"] += 1
            await self.commit({"op": "barrier"})
            self._barriers_done = max(self._barriers_done, started)

    def stored_event(self, idem: str) -> tuple[dict, dict] | None:
        """(record, delivery state) of an event, from this node's RocksDB."""
        parsed = schema.parse_idem(idem)
        if parsed is None:
            return None
        with self.broker.lock:
            body = self.broker.store.get(schema.event_key(*parsed))
            state = self.broker.store.get(schema.delivery_key(*parsed))
        if body is None or state is None:
            return None
        return orjson.loads(body), orjson.loads(state)

    def take_key_slot(self, app: str) -> bool:
        """One more connection for ``app`` here, unless it has its maximum."""
        if self.key_connections[app] >= self.cfg.connections_per_key_max:
            self.counters["connections_per_key_rejected_total"] += 1
            if app not in self._keys_warned:  # bounded by the number of apps
                self._keys_warned.add(app)
                log.warning("too many connections for a key app=%s max=%d", app,
                            self.cfg.connections_per_key_max)
            return False
        self.key_connections[app] += 1
        return True

    def release_key_slot(self, app: str) -> None:
        assert self.key_connections[app] > 0

        self.key_connections[app] -= 1
        if not self.key_connections[app]:
            del self.key_connections[app]

    def new_session_id(self) -> str:
        return f"{self.id}.{self.boot}.{next(self._session_seq)}"

    def _stamp(self, op: dict) -> dict:
        """Settings apply reads must travel in the op: replicas may differ in config."""
        op.setdefault("ts", now_ms())
        if op["op"] in RETURNING_OPS:
            op["delivery_limit"] = self.cfg.delivery_limit
        if op["op"] == "publish":
            op["recipient_events_max"] = self.cfg.recipient_events_max
        return op

    async def commit(self, op: dict) -> dict:
        result = await self.proposer.propose(self._stamp(op))
        if result.get("error"):
            if result["error"] == "QUEUE_FULL":
                self.counters["queue_full_rejected_total"] += 1
            raise BrokerError(result["message"], result["error"])
        if op["op"] in COUNTED_OPS:
            self.counters[COUNTED_OPS[op["op"]]] += 1
        return result

    # -- applied entries: tick thread -> loop thread ------------------------------

    def _on_applied(self, effects) -> None:
        first = not self._applied
        self._applied.extend(effects)
        if first:
            self.loop.call_soon_threadsafe(self._drain_applied)

    def _drain_applied(self) -> None:
        self._wake.set()
        while self._applied:
            effect, body, queue = self._applied.popleft()
            if isinstance(effect, Push):
                if queue is not None:
                    self.delivery_rates.record(queue, int(self.loop.time()))
                self._deliver(effect, body)
            elif isinstance(effect, Close):
                self._close_local(effect)

    def _deliver(self, push: Push, body: bytes) -> None:
        conn = self.connections.get(push.sid)
        if conn is not None and (self._lagging() or self._maybe_stale()):
            # This node is far behind the log, or may be (it was paused or cut
            # off): later entries may requeue or ack this event. Push once caught up.
            self.loop.call_later(PUSH_LAG_RECHECK_MS / 1000, self._deliver, push, body)
            return
        if conn is not None and self._superseded(push):
            # Applied late here (a lagging node): by now the event was requeued,
            # redelivered or answered; pushing this attempt would only mislead.
            self.counters["superseded_pushes_total"] += 1
            return
        if conn is not None:
            self.counters["deliveries_total"] += 1
            if push.attempt > 1:
                self.counters["redeliveries_total"] += 1
            conn.push(push.pattern, body, push.attempt)
        elif push.sid.startswith(self.id + "."):
            # Ours, but the socket is gone and its close has not committed yet.
            asyncio.ensure_future(self._close_session(push.sid, "socket gone"))

    def _lagging(self) -> bool:
        behind = self.broker.raftCommitIndex - self.broker.raftLastApplied
        return behind > PUSH_LAG_ENTRIES_MAX

    def _maybe_stale(self) -> bool:
        """True until a barrier proposed after this node's last gap (a stall, or
        no AppendEntries for a while: raft/freshness.py) has applied here.

        What arrives right after a gap can be old: entries and commit indexes the
        kernel buffered while the process stood still. The barrier's entry comes
        after everything committed when it was proposed, so once it is applied
        here, ``_superseded`` judges a held push against a current state.
        """
        freshness = self.broker.freshness
        marks = freshness.lost_touch_total
        if marks == self._fresh_marks and not freshness.silent():
            return False
        if self._freshening is None or self._freshening.done():
            if marks != self._stale_logged_marks:
                self._stale_logged_marks = marks
                log.info("lost touch with the cluster; pushes wait for a barrier "
                         "marks=%d", marks)
            self._freshening = asyncio.ensure_future(self._freshen(marks))
        return True

    async def _freshen(self, marks: int) -> None:
        try:
            await self.commit({"op": "barrier"})
        except BrokerError:
            return  # no quorum yet: the next held push starts another
        self.counters["push_freshness_barriers_total"] += 1
        self._fresh_marks = max(self._fresh_marks, marks)

    def _superseded(self, push: Push) -> bool:
        with self.broker.lock:
            ev = self.broker.state.events.get((push.p, push.off))
            return ev is None or ev.sid != push.sid or ev.attempts != push.attempt

    def _close_local(self, close: Close) -> None:
        if close.sid == "*":  # a snapshot replaced the state: drop what it lacks
            with self.broker.lock:
                gone = [s for s in self.connections if s not in self.broker.state.sessions]
        else:
            gone = [close.sid] if close.sid in self.connections else []
        for sid in gone:
            conn = self.connections.pop(sid)
            log.info("closing client sid=%s reason=%s", sid, close.reason)
            asyncio.ensure_future(conn.ws.close(code=4000, message=b"session expired"))

    # -- client lifecycle ---------------------------------------------------------------

    async def on_disconnect(self, conn: Connection) -> None:
        if conn.sid is None:
            return
        self.connections.pop(conn.sid, None)
        await self._close_session(conn.sid, "client closed")

    def abandon_session(self, sid: str, reason: str) -> None:
        """Close a session whose CONN nobody will see answered.

        A client that gave up (closed the socket) while its CONN was committing
        leaves ``on_disconnect`` nothing to close, and the session would stay
        open, counted against its key, until this node restarts. A close for a
        session that never opened changes nothing, so this is safe when the
        open's outcome is unknown too: proposed later, it lands after it.
        """
        self.counters["abandoned_sessions_total"] += 1
        log.info("closing a session whose client left during CONN sid=%s", sid)
        asyncio.ensure_future(self._close_session(sid, reason))

    async def _close_session(self, sid: str, reason: str) -> None:
        # Bounded retries; if all fail, the push path or node_down closes it later.
        for attempt in range(5):
            try:
                await self.commit({"op": "session_close", "sid": sid, "reason": reason})
                return
            except Unavailable:
                if self.proposer.closed:
                    return  # node_boot closes it when this node starts again
                await asyncio.sleep(0.2 * (attempt + 1))
        log.warning("could not close session sid=%s", sid)

    async def _announce_boot(self) -> None:
        """Close sessions a previous run of this node left in the replicated state."""
        while True:
            try:
                result = await self.commit({"op": "node_boot", "node": self.id,
                                            "boot": self.boot})
                log.info("boot announced closed_sessions=%d", result["closed"])
                return
            except Unavailable:
                await asyncio.sleep(0.5)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ping_interval_ms / 1000)
            for conn in list(self.connections.values()):
                if not conn.ws.closed:
                    asyncio.ensure_future(_send_quietly(conn.ws, "PING"))

    def _exit_if_journal_failed(self) -> None:
        """A journal whose fsync failed must never speak for its log again.

        After a failed fsync Linux may report a retry as successful with the data
        gone, so the journal stays failed; the node stops rather than linger as a
        member that cannot vote or acknowledge honestly.
        """
        if self.broker.journal().failed:
            log.critical("journal write failed; stopping the node, restart it "
                         "after checking the disk")
            os._exit(70)

    async def _retention_loop(self) -> None:
        """Leader: expire old pending events, then compact records, then history.

        Each step is an op through the log, so every replica drops the same rows;
        nothing is deleted by a timer of its own (reference/pysyncobj-rocksdict.md
        3.3 on TTL compaction).
        """
        while True:
            await asyncio.sleep(self.cfg.retention_check_ms / 1000)
            if not self.broker._isLeader():
                continue
            now = now_ms()
            with self.broker.lock:
                ops = self.broker.state.plan_expiry(now, self.broker.raftCurrentTerm,
                                                    self.cfg.retention_ms,
                                                    RETENTION_OPS_MAX)
            for op_name, prefix, keep_ms in (
                    ("compact", b"f/", self.cfg.finished_retention_ms),
                    ("forget", b"g/", self.cfg.history_retention_ms)):
                items = self._finished_before(prefix, now - keep_ms)
                if items:
                    ops.append({"op": op_name, "items": items, "ts": now})
            if ops:
                await self._propose_all(ops)

    def _finished_before(self, prefix: bytes, before_ms: int) -> list[list[int]]:
        with self.broker.lock:
            keys = self.broker.store.scan(prefix, prefix, RETENTION_OPS_MAX)
        items = [list(schema.parse_time_index(key)) for key in keys]
        return [item for item in items if item[0] <= before_ms]

    def _compact_if_journal_large(self) -> None:
        """pysyncobj compacts by entry count; entries hold whole batches, so the
        journal (which also lives in memory) is bounded in bytes here."""
        if self.broker.journal().statistics().file_bytes > self.cfg.journal_bytes_max:
            self.counters["journal_size_compactions_total"] += 1
            self.broker.forceLogCompaction()

    async def _watchdog_loop(self) -> None:
        """Leader: force a snapshot when a connected follower stops catching up.

        pysyncobj can leave a deposed leader stuck behind forever after it resumes
        from a pause (reference/pysyncobj-rocksdict.md 6.2.1); a snapshot install
        is the one thing that moves it again.
        """
        watch: dict[str, tuple[int, int]] = {}  # node -> (match index, since ms)
        while True:
            await asyncio.sleep(1)
            self._exit_if_journal_failed()
            self._compact_if_journal_large()
            if not self.broker._isLeader():
                watch.clear()
                continue
            now = now_ms()
            commit = self.broker.raftCommitIndex
            connected = self.broker.connected_ids()
            for node, match in self.broker.follower_match().items():
                last, since = watch.get(node, (-1, now))
                if match != last or match >= commit or node not in connected:
                    watch[node] = (match, now)
                elif now - since > self.cfg.stuck_follower_ms:
                    log.warning("follower stuck, forcing a snapshot node=%s match=%d "
                                "commit=%d", node, match, commit)
                    self.counters["stuck_follower_snapshots_total"] += 1
                    self.broker.forceLogCompaction()
                    watch[node] = (match, now)

    # -- leader's dispatcher -------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        interval_s = self.cfg.dispatch_interval_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                ops = self._plan()
            except Exception:
                log.exception("dispatcher failed")
                ops = []
            if ops:
                asyncio.ensure_future(self._propose_all(ops))
            await asyncio.sleep(0)  # let the proposals batch together

    def _plan(self) -> list[dict]:
        leading = self.broker._isLeader()
        if leading != self._leading:
            self._leading = leading
            with self.broker.lock:
                self.broker.state.forget_plans()
            log.info("%s term=%d", "leading" if leading else "no longer leading",
                     self.broker.raftCurrentTerm)
        if not leading:
            return []

        now = now_ms()
        term = self.broker.raftCurrentTerm
        with self.broker.lock:
            state = self.broker.state
            state.expire_plans(now, self.cfg.plan_age_ms_max)
            ops = state.plan(now, term, self.cfg.ack_timeout_ms,
                             self.cfg.dispatch_ops_max)
            ops += state.plan_key_expiry(now, KEY_EXPIRE_OPS_MAX)
            nodes = state.nodes_with_sessions()
        return ops + self._node_down_ops(nodes, now, term)

    def _node_down_ops(self, nodes: set[str], now: int, term: int) -> list[dict]:
        connected = self.broker.connected_ids()
        ops = []
        for node in nodes - {self.id}:
            if node in connected:
                self._node_seen_ms[node] = now
                continue
            seen = self._node_seen_ms.setdefault(node, now)
            sent = self._node_down_sent_ms.get(node, 0)
            if now - seen > self.cfg.node_down_ms and now - sent > self.cfg.node_down_ms:
                self._node_down_sent_ms[node] = now
                log.warning("node unreachable, closing its sessions node=%s",
                            node)
                ops.append({"op": "node_down", "node": node, "term": term, "ts": now})
        return ops

    async def _propose_all(self, ops: list[dict]) -> None:
        results = await asyncio.gather(*(self.proposer.propose(self._stamp(op))
                                         for op in ops),
                                       return_exceptions=True)
        self.counters["decisions_total"] += len(ops)
        self.counters["decisions_failed_total"] += sum(
            1 for r in results if isinstance(r, Exception))

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict:
        raw = self.broker.getStatus()
        return {
            "id": self.id,
            "role": ROLES.get(raw.get("state"), "follower"),
            "term": raw.get("raft_term", 0),
            "commit_index": raw.get("commit_idx", 0),
            # pysyncobj's own index: it also counts the no-op a new leader
            # appends, which never reaches our apply (and so not m/applied).
            "applied_index": raw.get("last_applied", 0),
            "state_applied_index": self.broker.store.applied_index,
            "leader": self.broker.leader_id(),
            "has_quorum": bool(raw.get("has_quorum")),
            "clients": len(self.connections),
            "ws_url": self.cfg.ws_url,
            "raft_address": self.cfg.raft.raft_address,
            # A cluster secret seals every Raft peer frame (raft/peer_auth.py);
            # without one, any process reaching the Raft port may attach as a
            # read-only listener and receive the log: counted here.
            "raft_peers_authenticated": bool(self.cfg.raft.cluster_secret),
            "raft_partners": raw.get("partner_nodes_count", 0),
            "raft_readonly_peers": raw.get("readonly_nodes_count", 0),
            "log_len": raw.get("log_len", 0),
            # Since this process started; rates are the client's business.
            "publishes_total": self.counters["publishes_total"],
            "deliveries_total": self.counters["deliveries_total"],
            "acks_total": self.counters["acks_total"],
        }

    def create_key_material(self) -> dict:
        signing = SigningKey.generate()
        public = bytes(signing.verify_key)
        return {
            "access_key": "ensk_" + secrets.token_urlsafe(32),
            "app_id": base64.b64encode(public).decode(),
            "secret_key": base64.b64encode(bytes(signing) + public).decode(),
        }

    # -- admin reads (loop thread; this node's applied state, not the leader's) ----

    def trace(self, idem: str, with_record: bool = False) -> dict | None:
        """An event's delivery state and audit rows; None for an unknown idem.

        One hold of the lock, so the record, its state and its history come from
        the same applied index.
        """
        parsed = schema.parse_idem(idem)
        if parsed is None:
            return None
        with self.broker.lock:
            store = self.broker.store
            body = store.get(schema.event_key(*parsed))
            state = store.get(schema.delivery_key(*parsed))
            rows = store.scan_prefix(schema.history_prefix(*parsed))
        if body is None or state is None:
            return None

        record, d = orjson.loads(body), orjson.loads(state)
        trace = {"idem": record["idem"], "name": d["name"], "from": record["sender"],
                 "to": d["to"], "state": d["state"], "attempts": d["attempts"],
                 "history": [orjson.loads(value) for _, value in rows]}
        if with_record:
            trace["record"] = record
        return trace

    def dead_letters(self, limit: int) -> tuple[list[dict], int]:
        """Up to ``limit`` dead letters in (partition, offset) order, and the total.

        ``dead_since_ms`` costs one point read each: while an event is dead its
        last audit row is the ``dead-lettered`` one, so no history scan is needed.
        """
        assert limit > 0

        with self.broker.lock:
            dead = self.broker.state.dead
            chosen = heapq.nsmallest(limit, dead.values(), key=lambda e: (e.p, e.off))
            rows = [self._dead_letter_row(ev) for ev in chosen]
            return rows, len(dead)

    def _dead_letter_row(self, ev) -> dict:
        row = {"idem": schema.idem_of(ev.p, ev.off), "name": ev.name, "to": ev.app,
               "attempts": ev.attempts}
        if ev.hist == 0:  # stored before events had audit rows
            return row
        last = self.broker.store.get(schema.history_key(ev.p, ev.off, ev.hist - 1))
        if last is not None:
            audit = orjson.loads(last)
            if audit.get("what") == "dead-lettered":
                row["dead_since_ms"] = audit["at"]
        return row

    def sessions_view(self, now: int, limit: int) -> tuple[list[dict], int]:
        """Connected sessions (oldest first), then recently closed ones (newest first).

        ``now`` is this node's wall clock; ``last_active_ms`` is log time, stamped
        by the proposing node's wall clock, so the two compare on synced clocks.
        """
        assert limit > 0

        with self.broker.lock:
            state = self.broker.state
            held = collections.Counter(sid for sid, _, _ in state.inflight)
            live = heapq.nsmallest(limit, state.sessions.items(),
                                   key=lambda kv: (kv[1].opened_ms, kv[0]))
            rows = [self._live_session_row(sid, s, held[sid], now) for sid, s in live]
            closed = itertools.islice(reversed(state.closed_sessions), limit - len(rows))
            rows += [self._closed_session_row(c) for c in closed]
            total = len(state.sessions) + len(state.closed_sessions)
        return rows, total

    def _app_name(self, app: str) -> str | None:
        return self.broker.state.apps.get(app, {}).get("name")

    def _live_session_row(self, sid: str, s, in_flight: int, now: int) -> dict:
        recent = now - s.last_active_ms <= self.cfg.idle_after_ms
        return {"client_id": sid, "app": s.app, "app_name": self._app_name(s.app),
                "node": s.node, "status": "active" if in_flight or recent else "idle",
                "in_flight": in_flight, "opened_ms": s.opened_ms,
                "last_active_ms": s.last_active_ms}

    def queues_view(self, limit: int, offset: int = 0,
                    app: str | None = None) -> tuple[list[dict], int]:
        """Queues by pending events, most first, skipping ``offset``; and the count.

        One pass over every queue under the lock (or over one app's), then a
        bounded heap: thousands of queues cost a few milliseconds, and only the
        rows shown look at their queue's head. A queue whose events are all in
        flight may exist only in ``inflight`` after a restart, so both are counted.
        ``app`` (an app id) keeps that app's queues only.
        """
        assert limit > 0
        assert offset >= 0

        now, now_s = now_ms(), int(self.loop.time())
        with self.broker.lock:
            state = self.broker.state
            by_app = state.queues if app is None else {app: state.queues.get(app, {})}
            queues = {(q.app, q.name): q
                      for by_name in by_app.values() for q in by_name.values()}
            counts = {key: [q.pending, 0] for key, q in queues.items()}
            for key in state.inflight.values():
                ev = state.events.get(key)
                if ev is not None and app in (None, ev.app):
                    counts.setdefault((ev.app, ev.name), [0, 0])[1] += 1
            chosen = heapq.nsmallest(offset + limit, counts.items(),
                                     key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
            rows = [self._queue_row(key, pending, held, queues.get(key), now, now_s)
                    for key, (pending, held) in chosen[offset:]]
        return rows, len(counts)

    def _queue_row(self, key: tuple[str, str], pending: int, held: int, queue,
                   now: int, now_s: int) -> dict:
        app, name = key
        born_ms = None if queue is None else _head_born_ms(queue,
                                                           self.broker.state.events)
        # "app" is the dashboard's name for the id; "app_id" the admin API's.
        return {"app": app, "app_id": app, "app_name": self._app_name(app),
                "name": name, "pending": pending, "in_flight": held,
                "oldest_age_ms": None if born_ms is None else max(0, now - born_ms),
                "delivered_per_s": self.delivery_rates.per_second(key, now_s)}

    def apps_view(self) -> list[dict]:
        """Every app (key) by name, with its live session count; no secrets."""
        with self.broker.lock:
            state = self.broker.state
            rows = [{"app_id": app_id, "name": rec["name"], "send": rec["send"],
                     "receive": rec["receive"], "created_ms": rec["created_ms"],
                     "disabled": bool(rec.get("disabled")),
                     "expires_ms": rec.get("expires_ms"),
                     "expired": bool(rec.get("expired")),
                     "sessions": len(state.app_sessions.get(app_id, ()))}
                    for app_id, rec in state.apps.items()]
        rows.sort(key=lambda row: row["name"])
        return rows

    def app_id_of(self, name_or_id: str) -> str | None:
        """The app a key name, or else an app id, names here; None if neither."""
        with self.broker.lock:
            state = self.broker.state
            app = state.app_names.get(name_or_id)
            if app is None and name_or_id in state.apps:
                app = name_or_id
            return app

    async def transfer_leadership(self, target: str | None) -> str:
        """Hand leadership to ``target`` (None: the most caught-up follower).

        Returns the id of the leader this node follows afterwards. pysyncobj
        denies a transfer while the target lags the leader's log, and the
        election it starts can still be lost, so the request is repeated (once
        per election timeout) until ``TRANSFER_TIMEOUT_MS``. Raises NotLeader
        when this node does not lead, Unavailable (TIMEOUT) when time runs out.
        """
        if not self.broker._isLeader():
            raise NotLeader(self.broker.leader_id())
        assert target is None or target in self.cfg.raft.peers

        log.info("leadership transfer requested target=%s", target or "any")
        settle_s = self.cfg.raft.raft_max_timeout_ms / 1000
        deadline = self.loop.time() + TRANSFER_TIMEOUT_MS / 1000
        asked_at = None
        for _ in range(TRANSFER_TIMEOUT_MS // TRANSFER_POLL_MS + 1):
            leader = self.broker.leader_id()
            if not self.broker._isLeader() and leader not in (None, self.id):
                log.info("leadership moved to=%s", leader)
                return leader

            now = self.loop.time()
            if self.broker._isLeader() and (asked_at is None
                                            or now - asked_at > settle_s):
                sent = await self._request_transfer(target)
                asked_at = now if sent else None
            if self.loop.time() >= deadline:
                break
            await asyncio.sleep(TRANSFER_POLL_MS / 1000)
        raise Unavailable(f"leadership did not move within {TRANSFER_TIMEOUT_MS} ms",
                          "TIMEOUT")

    async def _request_transfer(self, target: str | None) -> bool:
        fut = self.loop.create_future()

        def done(sent: bool) -> None:  # tick thread
            self.loop.call_soon_threadsafe(_settle, fut, sent)

        if not self.broker.request_transfer(target, done):
            return False
        try:
            return await asyncio.wait_for(fut, TRANSFER_ANSWER_MS / 1000)
        except asyncio.TimeoutError:
            return False

    def _closed_session_row(self, c) -> dict:
        return {"client_id": c.sid, "app": c.app, "app_name": self._app_name(c.app),
                "node": c.node, "status": "disconnected", "in_flight": 0,
                "opened_ms": c.opened_ms,
                "last_active_ms": getattr(c, "last_active_ms", None),
                "closed_ms": c.closed_ms, "reason": c.reason}


def _head_born_ms(queue, events: dict) -> int | None:
    """Log time of a queue's first pending event, if its window holds it.

    The heap drops stale entries lazily, so its top may be one; then the rest
    of the window (at most twice ``QUEUE_WINDOW_EVENTS``) is scanned. A window
    that ran dry leaves the head on disk only: None, no RocksDB read here.
    """
    if queue.pending == 0 or not queue.heap:
        return None
    live = []
    for rank in queue.heap:
        ev = events.get((queue.p, rank[1]))
        if ev is not None and ev.state == PENDING and ev.rank() == rank:
            if rank == queue.heap[0]:
                return ev.born_ms
            live.append(ev)
    return min(live, key=lambda ev: ev.rank()).born_ms if live else None


def _settle(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


async def _send_quietly(ws, text: str) -> None:
    try:
        await ws.send_str(text)
    except ConnectionError:
        pass

