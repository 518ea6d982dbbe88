"""The shell around the state machine: pysyncobj, RocksDB, threads and batching.

Two threads meet here. pysyncobj's tick thread does all Raft I/O, appends to the
journal, and runs ``_apply`` for each committed entry, which updates
``BrokerState`` and RocksDB under ``lock``. The asyncio thread proposes batches
and consumes what apply produced: results for waiting clients and effects
(records to push to sessions served here). Results and effects cross threads
through one deque, drained by a single ``call_soon_threadsafe`` per burst.

Group commit: ``Proposer`` collects concurrent operations from every connection of
this node into one Raft entry, bounded by ``batch_ops_max``, ``batch_bytes_max``
and ``batches_in_flight_max``. While batches are in flight, new ops wait and the
next entry grows, so the fsync per entry is shared by more writes under load.

Forwarding: a follower's proposal goes to the leader through pysyncobj's own
forwarding, and its callback fires when the follower has applied the entry
itself, so a client reads its own writes on the node it talks to.

Time: an op carries ``ts`` from the node that proposed it; the leader stamps
delivery decisions itself. ``BrokerState`` clamps time so it never goes back.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import pysyncobj.tcp_connection
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from node.errors import RequestRejected, Unavailable
from raft import peer_wire, snapshot
from raft.durability import (SyncingTCPTransport, durable_journal_of,
                             install_durable_journal)
from raft.freshness import Freshness
from raft.peer_auth import PeerRefusals
from raft.state import BrokerState, Close, Push
from raft.store import Store, applied_index_of

log = logging.getLogger("ensync.raft")


class _TruncationNotice(logging.Filter):
    """pysyncobj logs every suffix truncation on a follower at CRITICAL, also
    when the re-sent entries are identical; our journal then writes nothing
    (raft/journal.py). Keep the line, at the level its reader needs: WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.CRITICAL and "truncating already-applied" in str(
                record.msg):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("pysyncobj.syncobj").addFilter(_TruncationNotice())

# pysyncobj chunks any command larger than its AppendEntries batch size, and that
# path is buggy (reference/pysyncobj-rocksdict.md 6.2.3). The batch size is set
# well above the largest command we build (``batch_bytes_max`` plus the batch
# header), so no command is ever chunked.
APPEND_ENTRIES_BYTES_MAX = 8 << 20
# Ops accepted by this node and not yet in a batch; beyond it writes fail fast.
OPS_WAITING_MAX = 100_000
# Calls waiting for the tick thread (admin actions such as a leadership transfer).
TICK_CALLS_MAX = 64
# pysyncobj's _RAFT_STATE values, by name.
ROLES = {0: "follower", 1: "candidate", 2: "leader"}


@dataclass
class RaftConfig:
    node_id: str
    raft_address: str
    peers: dict[str, str]  # node id -> raft address
    data_dir: str
    raft_min_timeout_ms: int = 1000
    raft_max_timeout_ms: int = 2500
    leader_fallback_timeout_ms: int = 3000
    compaction_min_entries: int = 20000
    compaction_min_time_ms: int = 600_000
    connection_timeout_ms: int = 30_000
    connection_retry_ms: int = 500
    append_period_ms: int = 10
    tick_period_ms: int = 2
    batch_ops_max: int = 512
    batch_bytes_max: int = 2 << 20
    batches_in_flight_max: int = 32
    write_timeout_ms: int = 10_000
    # pysyncobj's password: every peer frame sealed and checked (raft/peer_auth.py).
    # Empty: peer links are plain and anyone reaching the Raft port is believed.
    cluster_secret: str = field(default="", repr=False)
    addresses: dict[str, str] = field(default_factory=dict)  # filled in post_init

    def __post_init__(self) -> None:
        self.addresses = {self.node_id: self.raft_address, **self.peers}


def raft_source_host(raft_address: str) -> str | None:
    """The host outgoing Raft connections should leave from, or None.

    None (let the kernel choose, as pysyncobj does) for 127.0.0.1, the default
    single-machine layout, and for anything that is not an IP literal. Any other
    address is this node's own (its Raft server binds it), so a connection that
    leaves from it looks, to a peer and to a firewall, like it comes from this node.
    """
    host = raft_address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified or host == "127.0.0.1":
        return None
    return host


_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)


class _SourceBoundSockets:
    """Stands in for the ``socket`` module inside ``pysyncobj.tcp_connection``.

    ``TcpConnection.connect`` makes its socket with ``socket.socket(...)`` and
    connects it at once, with no bind and no hook in between; that module uses
    ``socket`` for nothing else but constants and exceptions, which pass through.
    A socket made here is bound to ``host`` (port chosen at connect) first.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._warned = False

    def __getattr__(self, name: str):
        return getattr(socket, name)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, *args):
        sock = socket.socket(family, type, *args)
        if family != self.family:
            return sock
        try:
            if _BIND_ADDRESS_NO_PORT is not None:  # Linux: no port held until connect
                sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.host, 0))
        except OSError as exc:
            # Raising here would end pysyncobj's tick thread; connect unbound.
            if not self._warned:
                self._warned = True
                log.warning("raft source bind failed host=%s error=%s", self.host, exc)
        return sock


def install_raft_source_address(host: str | None) -> None:
    """Make pysyncobj's outgoing peer connections leave from ``host``. Opt-in.

    pysyncobj binds its listening socket to ``bindAddress`` but connects to peers
    from whatever source address the kernel picks: on one machine with nodes on
    127.0.0.2-4, every link would come from 127.0.0.1, and a firewall rule per
    node address (jepsen-lite's partitions) could not tell the links apart.
    Process-wide, like ``install_durable_journal``: a node runs one SyncObj.
    ``None`` restores pysyncobj's own behaviour.
    """
    pysyncobj.tcp_connection.socket = (
        socket if host is None else _SourceBoundSockets(host))


class ReplicatedBroker(SyncObj):
    """One Raft group whose log entries are batches of broker operations."""

    def __init__(self, cfg: RaftConfig, on_applied) -> None:
        os.makedirs(cfg.data_dir, exist_ok=True)
        self.cfg = cfg
        self.lock = threading.RLock()
        self.store = Store(os.path.join(cfg.data_dir, "state.rocksdb"))
        self.state = BrokerState(self.store)
        self.state.load(self.store.state_rows())
        self._on_applied = on_applied  # called on the tick thread
        self.snapshot_installs = 0
        self.apply_skipped = 0
        # Written on the tick thread, read by scrapes: plain ints, no lock.
        self.role_changes = collections.Counter()  # role entered -> times
        self.leader_changes_total = 0
        self._leadership: tuple[object, int] | None = None  # (leader node, term)
        self._tick_calls: collections.deque[Callable[[], None]] = collections.deque()
        self.peer_refusals = PeerRefusals()  # SyncingTCPTransport reports here
        # Gaps in ticks and in AppendEntries (raft/freshness.py); the transport
        # reports what arrives, node/server.py holds pushes after a gap.
        self.freshness = Freshness()

        install_durable_journal()
        peer_wire.install()
        source_host = raft_source_host(cfg.raft_address)
        if source_host is not None:
            install_raft_source_address(source_host)
        super().__init__(cfg.raft_address, list(cfg.peers.values()),
                         self._conf(), transportClass=SyncingTCPTransport)
        peer_wire.keep_pipelined_next_index(self)
        self.addOnTickCallback(self._notice_leader)
        self.addOnTickCallback(self._run_tick_calls)
        self.addOnTickCallback(self.freshness.tick)
        log.info("raft started address=%s applied=%d peers_authenticated=%s",
                 cfg.raft_address, self.store.applied_index,
                 str(bool(cfg.cluster_secret)).lower())
        if not cfg.cluster_secret and cfg.peers:
            log.warning("raft peers are not authenticated: anyone who reaches "
                        "address=%s can join the group; set cluster_secret_file",
                        cfg.raft_address)

    def _conf(self) -> SyncObjConf:
        c = self.cfg
        return SyncObjConf(
            bindAddress=c.raft_address,  # never 0.0.0.0: the port unpickles input
            journalFile=os.path.join(c.data_dir, "raft.journal"),
            fullDumpFile=os.path.join(c.data_dir, "raft.snapshot"),
            serializer=self._serialize,
            deserializer=self._deserialize,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=c.append_period_ms / 1000,
            autoTickPeriod=c.tick_period_ms / 1000,
            appendEntriesBatchSizeBytes=APPEND_ENTRIES_BYTES_MAX,
            raftMinTimeout=c.raft_min_timeout_ms / 1000,
            raftMaxTimeout=c.raft_max_timeout_ms / 1000,
            leaderFallbackTimeout=c.leader_fallback_timeout_ms / 1000,
            connectionTimeout=c.connection_timeout_ms / 1000,
            # The default 5 s leaves a node that started first alone for 5 s.
            connectionRetryTime=c.connection_retry_ms / 1000,
            logCompactionMinEntries=c.compaction_min_entries,
            logCompactionMinTime=c.compaction_min_time_ms / 1000,
            # Split windows would also delay a forced compaction by minutes.
            logCompactionSplit=False,
            commandsWaitLeader=True,
            dynamicMembershipChange=False,
            password=c.cluster_secret or None,
            onStateChanged=self._on_state_changed,
        )

    # -- role and leader changes (tick thread) -----------------------------------

    def _on_state_changed(self, old: int, new: int) -> None:
        self.role_changes[ROLES[new]] += 1
        # pysyncobj enters candidacy first and raises the term right after.
        term = self.raftCurrentTerm + (ROLES[new] == "candidate")
        log.info("role changed from=%s to=%s term=%d", ROLES[old], ROLES[new], term)

    def _notice_leader(self) -> None:
        """Count each new (leader, term): a follower sees elections only this way."""
        leader = self._getLeader()
        if leader is None:
            return
        leadership = (leader, self.raftCurrentTerm)
        if leadership != self._leadership:
            self._leadership = leadership
            self.leader_changes_total += 1
            log.info("leader known leader=%s term=%d",
                     self.node_id_of(leader.address), leadership[1])

    # -- apply (tick thread) ---------------------------------------------------

    @replicated
    def apply_batch(self, blob: str):
        index = self.raftLastApplied + 1
        if index <= self.store.applied_index:
            self.apply_skipped += 1
            return None

        batch = orjson.loads(blob)
        with self.lock:
            applied = self.state.apply_batch(batch["id"], batch["ops"], index)
            self.store.write(applied.writes, index)
            effects = [self._resolve(e) for e in applied.effects]
            # A publish or an ack pushes nothing, but it may give the leader's
            # dispatcher work (an event to assign, a slot to fill): wake it now
            # rather than at its next interval (dispatch_interval_ms). Only an
            # app with a session can be assigned anything.
            wake = self._isLeader() and any(self.state.app_sessions.get(app)
                                            for app in self.state.dirty_apps)
        if effects or wake:
            self._on_applied(effects)
        # The batch id travels back with the results: the proposer checks that
        # a callback answers the batch it was registered for.
        return batch["id"], applied.results

    def _resolve(self, effect):
        """(effect, record, queue): a push gets its stored record, since only this
        thread reads the DB, and its queue (app, name) for per-queue counters."""
        if isinstance(effect, Push):
            key = (effect.p, effect.off)
            body = self.store.get(b"e/%04x/%012x" % key)
            ev = self.state.events.get(key) or self.state.dead.get(key)
            return effect, body, None if ev is None else (ev.app, ev.name)
        return effect, None, None

    # -- snapshots (tick thread) -----------------------------------------------

    def _serialize(self, path: str, data) -> None:
        ckpt = os.path.join(self.cfg.data_dir, "snapshot.checkpoint")
        try:
            with self.lock:
                applied = self.store.applied_index
                self.store.checkpoint(ckpt)
            size = snapshot.write_snapshot(path, ckpt, applied, data)
            log.info("snapshot written applied=%d bytes=%d", applied, size)
        except Exception:
            log.exception("snapshot failed")
            raise
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)

    def _deserialize(self, path: str):
        header = snapshot.read_header(path)
        data = snapshot.raft_data(header)
        if self.store.applied_index >= header["applied"]:
            return data  # a restart: our database is already at least this new

        live = self.store.path
        fresh = live + ".incoming"
        snapshot.extract(path, header, fresh)
        got = applied_index_of(fresh)
        if got != header["applied"]:
            raise snapshot.SnapshotCorrupt(
                f"snapshot holds index {got}, header says {header['applied']}")
        self._swap_in(fresh)
        log.info("snapshot installed applied=%d", got)
        return data

    def _swap_in(self, fresh: str) -> None:
        live = self.store.path
        with self.lock:
            self.store.close()
            shutil.rmtree(live + ".old", ignore_errors=True)
            os.rename(live, live + ".old")
            os.rename(fresh, live)
            self.store.open()
            dead_lettered_total = self.state.dead_lettered_total
            self.state = BrokerState(self.store)
            self.state.load(self.store.state_rows())
            # A counter, not state: it keeps counting across the swap.
            self.state.dead_lettered_total = dead_lettered_total
            self.snapshot_installs += 1
        shutil.rmtree(live + ".old", ignore_errors=True)
        self._on_applied([(Close("*", "snapshot installed"), None, None)])

    # -- calls into pysyncobj from other threads ----------------------------------

    def call_on_tick(self, call: Callable[[], None]) -> bool:
        """Run ``call()`` on the tick thread, which alone may touch Raft state.

        False when ``TICK_CALLS_MAX`` calls already wait: the caller backs off.
        """
        if len(self._tick_calls) >= TICK_CALLS_MAX:
            return False
        self._tick_calls.append(call)
        return True

    def request_transfer(self, target_id: str | None,
                         done: Callable[[bool], None]) -> bool:
        """Ask ``target_id`` (None: the most caught-up follower) to take over.

        pysyncobj's TimeoutNow: the leader tells a fully caught-up follower to
        start an election at once. ``done(sent)`` runs on the tick thread; True
        only means the request left, not that leadership moved. Denied when this
        node does not lead or the target lags behind the leader's log.
        """
        address = None if target_id is None else self.cfg.addresses[target_id]

        def transfer() -> None:
            self.transferLeadership(
                address, lambda _, err: done(err == FAIL_REASON.SUCCESS))

        return self.call_on_tick(transfer)

    def _run_tick_calls(self) -> None:
        for _ in range(len(self._tick_calls)):
            call = self._tick_calls.popleft()
            try:
                call()
            except Exception:
                log.exception("call on the tick thread failed")

    # -- status (any thread) ----------------------------------------------------

    def node_id_of(self, address: str | None) -> str | None:
        for node_id, addr in self.cfg.addresses.items():
            if addr == address:
                return node_id
        return None

    def leader_id(self) -> str | None:
        leader = self._getLeader()
        return self.node_id_of(leader.address if leader is not None else None)

    def connected_ids(self) -> set[str]:
        return {self.node_id_of(n.address) for n in self.otherNodes
                if self.isNodeConnected(n)}

    def follower_match(self) -> dict[str, int]:
        """Leader only: the match index pysyncobj holds for each follower."""
        raw = self.getStatus()
        return {self.node_id_of(k[len("match_idx_server_"):]): v
                for k, v in raw.items() if k.startswith("match_idx_server_")}

    def journal(self):
        return durable_journal_of(self)

    def statistics(self) -> RaftStatistics:
        raw = self.getStatus()
        leader = raw.get("leader")
        commit = raw.get("commit_idx", 0)
        return RaftStatistics(
            role=ROLES.get(raw.get("state"), "follower"),
            term=raw.get("raft_term", 0),
            commit_index=commit,
            # A follower learns the leader's commit index before it can commit
            # the entries itself; readiness compares against the larger one.
            known_commit_index=max(commit, raw.get("leader_commit_idx") or 0),
            applied_index=raw.get("last_applied", 0),
            log_entries=raw.get("log_len", 0),
            leader=self.node_id_of(leader.address if leader is not None else None),
            leader_connected=leader is not None and (
                leader == self.selfNode or self.isNodeConnected(leader)),
            has_quorum=bool(raw.get("has_quorum")),
            follower_match={self.node_id_of(k[len("match_idx_server_"):]): v
                            for k, v in raw.items()
                            if k.startswith("match_idx_server_")},
            role_changes=dict(self.role_changes),
            leader_changes_total=self.leader_changes_total,
            apply_skipped_total=self.apply_skipped,
            snapshot_installs_total=self.snapshot_installs,
            peers_authenticated=bool(self.cfg.cluster_secret),
            peer_refusals_total=self.peer_refusals.refusals_total,
        )


@dataclass(frozen=True)
class RaftStatistics:
    role: str  # follower, candidate or leader
    term: int
    commit_index: int
    known_commit_index: int  # the larger of ours and the leader's, as last heard
    applied_index: int  # pysyncobj's, counting the no-op entries of new leaders
    log_entries: int
    leader: str | None
    leader_connected: bool  # we lead, or our link to the leader is up
    has_quorum: bool
    follower_match: dict[str, int]  # leader only: follower id -> match index
    role_changes: dict[str, int]  # role entered -> times, since start
    leader_changes_total: int  # new (leader, term) pairs seen, since start
    apply_skipped_total: int
    snapshot_installs_total: int
    peers_authenticated: bool = False  # a cluster secret seals every peer frame
    peer_refusals_total: int = 0  # frames refused for a wrong or missing secret


@dataclass
class _Batch:
    batch_id: str
    blob: str
    futures: list
    created_s: float
    submitted_s: float = 0.0
    attempts: int = 0
    failed: bool = False
    # When its first (oldest) op's write_timeout_ms runs out; the batch's
    # callers are told UNAVAILABLE then.
    deadline_s: float = float("inf")


class Proposer:
    """Groups concurrent operations of this node into Raft entries (group commit).

    pysyncobj drops a forwarded command when the link to the leader is down at that
    moment, and then never calls back; a leader change makes other outcomes
    unknown. So every batch carries an id, apply answers a repeated id from its
    dedup table (``BrokerState.apply_batch``), and a batch without an answer is
    submitted again, backing off, until ``write_timeout_ms``.
    """

    RETRY_CHECK_MS = 100
    RETRY_FIRST_MS = 1000

    def __init__(self, broker: ReplicatedBroker, loop: asyncio.AbstractEventLoop,
                 id_prefix: str):
        self.broker = broker
        self.cfg = broker.cfg
        self.loop = loop
        self._id_prefix = id_prefix
        self._seq = itertools.count(1)
        # (serialized op, future, its deadline in monotonic seconds), waiting
        # for a batch; oldest first
        self._ops: collections.deque[tuple[bytes, asyncio.Future, float]] = (
            collections.deque())
        self._open: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._done: collections.deque = collections.deque()
        self._retry_task = loop.create_task(self._retry_loop())
        self.batches_total = 0
        self.ops_total = 0
        self.resubmits_total = 0
        self.mismatched_callbacks_total = 0
        self.committed_ops = collections.Counter()  # op name -> committed, no error
        # Seconds from propose() to its result, for each committed op.
        self.commit_observer: Callable[[float], None] | None = None
        self.closed = False

    def close(self) -> None:
        """Fail every waiting write at once: the node is shutting down."""
        self.closed = True
        self._retry_task.cancel()
        waiting = [fut for _, fut, _ in self._ops]
        for batch in self._open.values():
            waiting.extend(batch.futures)
        self._ops.clear()
        self._open.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(Unavailable("node is shutting down, outcome unknown"))

    async def propose(self, op: dict) -> dict:
        """Commit one op and return its result; raise Unavailable on timeout."""
        if self.closed:
            raise Unavailable("node is shutting down")
        if len(self._ops) >= OPS_WAITING_MAX:
            raise Unavailable("too many writes waiting on this node")
        encoded = orjson.dumps(op)
        if len(encoded) > self.cfg.batch_bytes_max:
            raise RequestRejected("operation is larger than one Raft entry may be",
                                  "PAYLOAD_TOO_LARGE")
        # No wait_for here: it costs a timer and two futures per op. The
        # retry loop fails what outlives write_timeout_ms instead, at most
        # RETRY_CHECK_MS late.
        started_s = time.monotonic()
        fut = self.loop.create_future()
        self._ops.append((encoded, fut, started_s + self.cfg.write_timeout_ms / 1000))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        result = await fut

        if not result.get("error"):
            self.committed_ops[op["op"]] += 1
        if self.commit_observer is not None:
            self.commit_observer(time.monotonic() - started_s)
        return result

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._ops and len(self._open) < self.cfg.batches_in_flight_max:
            ops = self._take_ops()
            batch_id = f"{self._id_prefix}{next(self._seq)}"
            blob = (b'{"id":"' + batch_id.encode() + b'","ops":['
                    + b",".join(op for op, _, _ in ops) + b"]}")
            batch = _Batch(batch_id, blob.decode(), [fut for _, fut, _ in ops],
                           time.monotonic(), deadline_s=ops[0][2])
            self._open[batch_id] = batch
            self.batches_total += 1
            self.ops_total += len(ops)
            self._submit(batch)

    def _take_ops(self) -> list[tuple[bytes, asyncio.Future, float]]:
        taken, size = [], 0
        while self._ops and len(taken) < self.cfg.batch_ops_max:
            op_size = len(self._ops[0][0]) + 1
            if taken and size + op_size > self.cfg.batch_bytes_max:
                break
            taken.append(self._ops.popleft())
            size += op_size
        return taken

    def _submit(self, batch: _Batch) -> None:
        batch.attempts += 1
        batch.failed = False
        batch.submitted_s = time.monotonic()

        def on_result(result, err):  # tick thread
            first = not self._done
            self._done.append((batch, result, err))
            if first:
                self.loop.call_soon_threadsafe(self._drain)

        self.broker.apply_batch(batch.blob, callback=on_result)

    def _drain(self) -> None:
        while self._done:
            batch, result, err = self._done.popleft()
            if batch.batch_id not in self._open:
                continue  # answered already, or given up
            if err == FAIL_REASON.SUCCESS and result is not None:
                if result[0] != batch.batch_id:
                    # pysyncobj called back with another entry's result (seen
                    # around snapshot installs under partitions). Never trust
                    # it: resubmit, and the dedup table answers correctly.
                    self.mismatched_callbacks_total += 1
                    if self.mismatched_callbacks_total == 1:
                        log.warning("raft callback answered another batch; "
                                    "resubmitting batch=%s", batch.batch_id)
                    batch.failed = True
                    continue
                del self._open[batch.batch_id]
                for fut, res in zip(batch.futures, result[1]):
                    if not fut.done():
                        fut.set_result(res)
            else:
                batch.failed = True  # the retry loop resubmits it
        if self._ops and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.RETRY_CHECK_MS / 1000)
            now = time.monotonic()
            self._fail_late_ops(now)
            for batch in list(self._open.values()):
                if now >= batch.deadline_s:
                    del self._open[batch.batch_id]
                    _fail_all(batch.futures, self._timed_out())
                    continue
                wait_s = self.RETRY_FIRST_MS / 1000 * 2 ** (batch.attempts - 1)
                if batch.failed or now - batch.submitted_s > wait_s:
                    self.resubmits_total += 1
                    self._submit(batch)
            if self._ops and not self._flush_scheduled:
                self._flush()

    def _timed_out(self) -> Unavailable:
        return Unavailable(f"no commit within {self.cfg.write_timeout_ms} ms, "
                           "outcome unknown")

    def _fail_late_ops(self, now_s: float) -> None:
        """Ops still waiting for a batch past their deadline: never sent now."""
        while self._ops and self._ops[0][2] <= now_s:
            _, fut, _ = self._ops.popleft()
            _fail_all([fut], self._timed_out())

    def statistics(self) -> dict:
        return {"batches_total": self.batches_total, "ops_total": self.ops_total,
                "batches_in_flight": len(self._open), "ops_waiting": len(self._ops),
                "resubmits_total": self.resubmits_total,
                "mismatched_callbacks_total": self.mismatched_callbacks_total,
                "committed_ops": dict(self.committed_ops)}


def _fail_all(futures: list[asyncio.Future], exc: Exception) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
