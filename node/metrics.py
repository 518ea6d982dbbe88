"""What an operator scrapes: Prometheus metrics and the readiness verdict.

Each node keeps its own ``CollectorRegistry``, so nothing here depends on
process-global state and a test process could hold several nodes.

Most numbers already live somewhere as plain counters or can be computed from the
state: the Raft status, ``statistics()`` snapshots of the state, journal and
proposer, ``Node.counters``. Those are read when Prometheus scrapes, by
``_NodeCollector``, so the hot paths pay an integer increment at most. Only the
two latency histograms are fed as things happen, because a distribution cannot
be rebuilt from totals afterwards: the journal calls ``fsync_observer`` for each
fsync (on the tick thread), the proposer calls ``commit_observer`` for each
committed op (on the loop thread). prometheus-client's histograms take a lock, so
both threads may observe.

Readiness is a separate question from liveness (``/health``): a node is ready to
take clients when it belongs to a majority and has applied nearly everything it
knows to be committed. ``ready_reason`` decides it from a ``RaftStatistics``
snapshot and says why not.

Counters that come from applied entries (``ensync_dead_letters_total``) count
what this replica applied since it started, so every node shows the cluster's
dead letters; counters of proposals (``ensync_publishes_total``) count only what
was proposed through this node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from raft.machine import ROLES, RaftStatistics

CONTENT_TYPE = CONTENT_TYPE_LATEST
LOOP_LAG_INTERVAL_MS = 500
READY_LAG_ENTRIES_MAX_DEFAULT = 100

FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0)

# Node.counters keys shown even before their first increment: name -> help.
NODE_COUNTERS = {
    "deliveries_total": "records pushed to clients of this node",
    "redeliveries_total": "records pushed to clients of this node with attempt > 1",
    "decisions_total": "delivery and retention ops the leader proposed from here",
    "decisions_failed_total": "of those, ops that failed or timed out",
    "stuck_follower_snapshots_total": "snapshots forced for a stuck follower",
    "journal_size_compactions_total": "snapshots forced by the journal's size",
    "bad_frames_total": "frames from clients of this node that did not parse",
    "frames_rate_limited_total": "client frames refused over client_frames_per_s_max",
    "abusive_closes_total": "clients closed with 4008 after client_abuse_close_ms",
    "connections_per_key_rejected_total":
        "CONNs refused over connections_per_key_max",
    "reply_bytes_pauses_total": "client reads paused while reply_bytes_max was full",
    "slow_consumer_closes_total":
        "clients closed with 4009 over client_write_buffer_bytes_max",
    "push_freshness_barriers_total":
        "barriers this node ran before pushing again after losing touch",
    "fresh_read_barriers_total":
        "Raft barriers for lookups that missed (unknown key, recipient, idem)",
    "fresh_reads_shared_total": "missed lookups answered by a barrier shared",
    "queue_full_rejected_total":
        "PUBs refused over recipient_events_max (-FAIL:QUEUE_FULL)",
    "conn_proof_failures_total": "CONNs refused for a missing or bad proof",
    "abandoned_sessions_total":
        "sessions closed because their client left while the CONN committed",
    "pending_requests_pauses_total":
        "client reads paused at client_pending_requests_max unanswered requests",
}


def ready_reason(raft: RaftStatistics, journal_failed: bool,
                 lag_entries_max: int) -> str | None:
    """Why this node should not take clients now; None when it is ready."""
    assert lag_entries_max >= 0

    if journal_failed:
        return "journal write failed"
    if raft.role == "leader" and not raft.has_quorum:
        return "leader without a quorum"
    if raft.role != "leader" and raft.leader is None:
        return "no leader known"
    if not raft.leader_connected:
        return f"leader {raft.leader} unreachable"

    behind = raft.known_commit_index - raft.applied_index
    if behind > lag_entries_max:
        return (f"applied index {raft.applied_index} is {behind} entries behind "
                f"commit index {raft.known_commit_index}")
    return None


class NodeMetrics:
    """The registry of one node, its latency histograms and its loop-lag probe."""

    def __init__(self, node) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        self.fsync_latency = Histogram(
            "ensync_journal_fsync_latency_seconds",
            "time of each journal fsync or fdatasync",
            buckets=FSYNC_BUCKETS_S, registry=self.registry)
        self.commit_latency = Histogram(
            "ensync_raft_commit_latency_seconds",
            "time from proposing an op on this node to its result",
            buckets=COMMIT_BUCKETS_S, registry=self.registry)
        self.loop_lag_s = 0.0
        self._lag_task: asyncio.Task | None = None
        ProcessCollector(registry=self.registry)
        self.registry.register(_NodeCollector(self))

    def start(self) -> None:
        """Hang the histograms on the journal and proposer; start the lag probe."""
        self.node.broker.journal().fsync_observer = self.fsync_latency.observe
        self.node.proposer.commit_observer = self.commit_latency.observe
        self._lag_task = asyncio.get_running_loop().create_task(self._probe_loop_lag())

    def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
        self.node.proposer.commit_observer = None
        self.node.broker.journal().fsync_observer = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def _probe_loop_lag(self) -> None:
        """How late a sleep wakes up: time the loop spent on other work."""
        loop = asyncio.get_running_loop()
        interval_s = LOOP_LAG_INTERVAL_MS / 1000
        while True:
            started = loop.time()
            await asyncio.sleep(interval_s)
            self.loop_lag_s = max(0.0, loop.time() - started - interval_s)


class _NodeCollector:
    """Reads every gauge and plain counter at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        # Empty, so registering does not call collect() before the node runs.
        return []

    def collect(self) -> Iterator[Metric]:
        node = self.metrics.node
        raft = node.broker.statistics()
        yield from _raft_families(raft, node.cfg.ready_lag_entries_max,
                                  node.broker.journal().failed)
        yield from _journal_families(node.broker.journal().statistics())
        yield from _proposer_families(node.proposer.statistics())
        with node.broker.lock:
            state = node.broker.state.statistics()
        yield from _broker_families(state, node)
        yield _gauge("ensync_event_loop_lag_seconds",
                     "how late the last 500 ms sleep of the event loop woke up",
                     self.metrics.loop_lag_s)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _raft_families(raft: RaftStatistics, lag_max: int,
                   journal_failed: bool) -> Iterator[Metric]:
    yield _gauge("ensync_raft_term", "current Raft term", raft.term)
    yield _gauge("ensync_raft_commit_index", "Raft commit index", raft.commit_index)
    yield _gauge("ensync_raft_applied_index", "last Raft index applied here",
                 raft.applied_index)
    yield _gauge("ensync_raft_log_entries", "entries in the Raft journal",
                 raft.log_entries)
    yield _gauge("ensync_raft_is_leader", "1 on the leader",
                 int(raft.role == "leader"))
    yield _gauge("ensync_raft_has_quorum", "1 while connected to a majority",
                 int(raft.has_quorum))
    ready = ready_reason(raft, journal_failed, lag_max) is None
    yield _gauge("ensync_ready", "1 while /ready answers 200", int(ready))

    role = GaugeMetricFamily("ensync_raft_role", "1 for this node's Raft role",
                             labels=["role"])
    for name in ROLES.values():
        role.add_metric([name], int(raft.role == name))
    yield role

    # Only the leader holds match indexes; the family is empty elsewhere.
    lag = GaugeMetricFamily("ensync_raft_follower_lag_entries",
                            "leader: commit index minus the follower's match index",
                            labels=["follower"])
    if raft.role == "leader":
        for follower, match in sorted(raft.follower_match.items()):
            lag.add_metric([follower], max(0, raft.commit_index - match))
    yield lag

    changes = CounterMetricFamily("ensync_raft_role_changes_total",
                                  "times this node entered each Raft role",
                                  labels=["role"])
    for name in ROLES.values():
        changes.add_metric([name], raft.role_changes.get(name, 0))
    yield changes
    yield _counter("ensync_raft_leader_changes_total",
                   "new (leader, term) pairs this node has seen",
                   raft.leader_changes_total)
    yield _counter("ensync_raft_apply_skipped_total",
                   "entries replayed on restart and skipped by apply",
                   raft.apply_skipped_total)
    yield _counter("ensync_snapshot_installs_total",
                   "snapshots installed from the leader", raft.snapshot_installs_total)
    yield _gauge("ensync_raft_peers_authenticated",
                 "1 when a cluster secret seals every Raft peer frame",
                 int(raft.peers_authenticated))
    yield _counter("ensync_raft_peer_refusals_total",
                   "Raft peer frames refused for a wrong or missing cluster secret",
                   raft.peer_refusals_total)


def _journal_families(journal) -> Iterator[Metric]:
    yield _counter("ensync_journal_fsync_total", "journal fsync and fdatasync calls",
                   journal.fsync_total)
    yield _counter("ensync_journal_fsync_seconds_total", "time spent in those calls",
                   journal.fsync_seconds_total)
    yield _counter("ensync_journal_truncations_avoided_total",
                   "suffix cuts whose entries all came back unchanged",
                   journal.truncations_avoided_total)
    yield _gauge("ensync_journal_bytes", "bytes in the journal file",
                 journal.file_bytes)


def _proposer_families(prop: dict) -> Iterator[Metric]:
    yield _counter("ensync_raft_batches_total", "Raft entries proposed from here",
                   prop["batches_total"])
    yield _counter("ensync_raft_batched_ops_total", "ops in those entries",
                   prop["ops_total"])
    yield _counter("ensync_raft_batch_resubmits_total",
                   "entries proposed again after no answer", prop["resubmits_total"])
    yield _counter("ensync_raft_mismatched_callbacks_total",
                   "pysyncobj answers that named another batch (resubmitted)",
                   prop["mismatched_callbacks_total"])
    yield _gauge("ensync_raft_batches_in_flight", "entries proposed, not yet applied",
                 prop["batches_in_flight"])
    yield _gauge("ensync_raft_ops_waiting", "ops waiting for a free batch slot",
                 prop["ops_waiting"])

    committed = prop["committed_ops"]
    ops = CounterMetricFamily("ensync_committed_ops_total",
                              "ops proposed here that committed without error",
                              labels=["op"])
    for name, count in sorted(committed.items()):
        ops.add_metric([name], count)
    yield ops
    yield _counter("ensync_publishes_total", "publishes committed through this node",
                   committed.get("publish", 0))
    yield _counter("ensync_acks_total", "acks committed through this node",
                   committed.get("ack", 0))


def _broker_families(state, node) -> Iterator[Metric]:
    yield _gauge("ensync_pending_events", "events waiting in their queues",
                 state.pending_events)
    yield _gauge("ensync_inflight_events", "events delivered and not yet settled",
                 state.inflight_events)
    yield _gauge("ensync_resident_events", "events held in memory",
                 state.resident_events)
    yield _gauge("ensync_dead_events", "events in the dead-letter queue",
                 state.dead_events)
    yield _counter("ensync_dead_letters_total",
                   "events this replica moved to the dead-letter queue",
                   state.dead_lettered_total)
    yield _gauge("ensync_sessions", "open sessions in the cluster", state.sessions)
    yield _gauge("ensync_subscriptions", "subscriptions of open sessions",
                 state.subscriptions)
    yield _gauge("ensync_apps", "access keys (apps)", state.apps)
    yield _gauge("ensync_clients", "WebSocket sessions served by this node",
                 len(node.connections))
    yield _gauge("ensync_client_sockets", "WebSocket connections open on this node",
                 node.live_connections)
    yield _gauge("ensync_reply_bytes",
                 "reply and push text built and not yet written, this node",
                 node.reply_bytes)

    for key, documentation in NODE_COUNTERS.items():
        yield _counter("ensync_" + key, documentation, node.counters.get(key, 0))
