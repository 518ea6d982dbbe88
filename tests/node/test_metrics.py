"""The operator's view on a real 3-node cluster: /metrics, /ready, JSON logs.

The module's cluster logs JSON (``--log-json``) and dead-letters an event on its
second delivery, so one rollback shows a redelivery and a second a dead letter.
Scrapes are parsed with prometheus-client's own parser, and counters are compared
before and after what a test did on one node. Blocking HTTP runs in a thread so
the clients' sockets keep being read; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.client import Client
from node.main import _JsonLineFormatter
from node.metrics import ready_reason
from raft.machine import RaftStatistics
from tests.cluster import Cluster

DELIVERY_LIMIT = 2
HTTP_TIMEOUT_S = 5
RECORD_WAIT_S = 10
SCRAPE_WAIT_S = 10
READY_WAIT_S = 15
ALONE_WAIT_S = 20
POLL_INTERVAL_S = 0.05
PUBLISHES = 20

T = TypeVar("T")

# Families an operator's dashboards rely on (names as the parser gives them:
# counters without their _total suffix).
FAMILIES = {
    "ensync_raft_term", "ensync_raft_commit_index", "ensync_raft_applied_index",
    "ensync_raft_role", "ensync_raft_is_leader", "ensync_raft_follower_lag_entries",
    "ensync_raft_leader_changes", "ensync_raft_role_changes",
    "ensync_raft_commit_latency_seconds", "ensync_journal_fsync_latency_seconds",
    "ensync_journal_fsync", "ensync_raft_log_entries", "ensync_raft_batches",
    "ensync_raft_batched_ops", "ensync_raft_apply_skipped", "ensync_snapshot_installs",
    "ensync_publishes", "ensync_deliveries", "ensync_acks", "ensync_redeliveries",
    "ensync_dead_letters", "ensync_dead_events", "ensync_pending_events",
    "ensync_inflight_events", "ensync_sessions", "ensync_event_loop_lag_seconds",
    "process_resident_memory_bytes", "process_open_fds", "ensync_ready",
}
# Read by other tests and benchmarks as plain `name value` lines.
PLAIN_LINES = (
    "ensync_raft_log_entries", "ensync_snapshot_installs_total",
    "ensync_raft_apply_skipped_total", "ensync_pending_events",
    "ensync_journal_fsync_total", "ensync_raft_batches_total",
    "ensync_raft_batched_ops_total",
)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Cluster:
    # Named like conftest's fixture so a failing test's report ends with the logs.
    started = Cluster(3, base_dir=tmp_path_factory.mktemp("metrics"),
                      extra_flags=["--log-json",
                                   "--delivery-limit", str(DELIVERY_LIMIT)])
    request.addfinalizer(started.stop)
    return started.start()


# -- helpers ---------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def get(cluster: Cluster, node_id: str, path: str) -> tuple[int, bytes]:
    url = cluster.admin_url(node_id) + path
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(cluster: Cluster, node_id: str) -> dict[str, dict[tuple, float]]:
    """family -> {(sample name, sorted labels): value}."""
    status, body = get(cluster, node_id, "/metrics")
    assert status == 200
    families = {}
    for family in text_string_to_metric_families(body.decode()):
        families[family.name] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    return families[family][(name or family, tuple(sorted(labels.items())))]


def ready(cluster: Cluster, node_id: str) -> tuple[int, dict]:
    status, body = get(cluster, node_id, "/ready")
    return status, json.loads(body)


async def eventually(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``check`` in a thread until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


def wait_sync(check: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def follower_of(cluster: Cluster) -> str:
    leader = cluster.leader()
    return next(n for n in cluster.node_ids if n != leader)


async def connect(cluster: Cluster, node_id: str, access_key: str) -> Client:
    client = Client(cluster.ws_url(node_id))
    await client.connect(access_key)
    return client


async def next_record(client: Client) -> dict:
    return await asyncio.wait_for(client.records.get(), RECORD_WAIT_S)


# -- /metrics ----------------------------------------------------------------------


def test_every_node_exposes_the_operator_families(cluster):
    for node_id in cluster.node_ids:
        families = wait_sync(lambda n=node_id: scrape(cluster, n), SCRAPE_WAIT_S,
                             f"{node_id} metrics")
        _, body = get(cluster, node_id, "/metrics")
        names = [f.name for f in text_string_to_metric_families(body.decode())]
        assert len(names) == len(set(names)), "two families share a name"

        missing = FAMILIES - set(families)
        assert not missing, f"{node_id} lacks {sorted(missing)}"
        assert sample(families, "process_resident_memory_bytes") > 0
        assert sample(families, "ensync_journal_fsync_latency_seconds",
                      "ensync_journal_fsync_latency_seconds_count") > 0


def test_unlabelled_lines_still_read_as_name_and_value(cluster):
    _, body = get(cluster, cluster.leader(), "/metrics")
    lines = [line for line in body.decode().splitlines() if line and line[0] != "#"]

    pairs = dict(line.split() for line in lines)
    for name in PLAIN_LINES:
        assert float(pairs[name]) >= 0, name


def test_leader_shows_lag_of_each_follower_and_everyone_saw_a_leader(cluster):
    leader = cluster.leader()
    followers = sorted(set(cluster.node_ids) - {leader})

    families = scrape(cluster, leader)
    lag = families["ensync_raft_follower_lag_entries"]
    assert sorted(dict(labels)["follower"] for _, labels in lag) == followers
    assert sample(families, "ensync_raft_role", role="leader") == 1
    assert sample(families, "ensync_raft_is_leader") == 1
    for node_id in cluster.node_ids:
        families = scrape(cluster, node_id)
        assert sample(families, "ensync_raft_leader_changes",
                      "ensync_raft_leader_changes_total") >= 1
        assert sample(families, "ensync_raft_term") >= 1
        if node_id != leader:
            assert sample(families, "ensync_raft_role", role="follower") == 1
            assert not families["ensync_raft_follower_lag_entries"]


async def test_publishes_deliveries_and_acks_move_on_the_nodes_that_did_them(cluster):
    publisher_node, consumer_node = follower_of(cluster), cluster.leader()
    key = await asyncio.to_thread(cluster.create_key, "metrics-flow",
                                  ["metrics/*"], ["metrics/*"])
    publisher = await connect(cluster, publisher_node, key["access_key"])
    consumer = await connect(cluster, consumer_node, key["access_key"])
    try:
        await consumer.subscribe("metrics/flow")
        before_pub = await asyncio.to_thread(scrape, cluster, publisher_node)
        before_con = await asyncio.to_thread(scrape, cluster, consumer_node)

        await asyncio.gather(*(publisher.publish("metrics/flow", key["app_id"],
                                                 b64(f"event {i}"))
                               for i in range(PUBLISHES)))
        for _ in range(PUBLISHES):
            record = await next_record(consumer)
            await consumer.ack(record["idem"], record["block"], record["name"])
        after_pub = await asyncio.to_thread(scrape, cluster, publisher_node)
        after_con = await asyncio.to_thread(scrape, cluster, consumer_node)
    finally:
        await publisher.close()
        await consumer.close()

    def moved(before, after, family):
        name = family + "_total"
        return sample(after, family, name) - sample(before, family, name)

    assert moved(before_pub, after_pub, "ensync_publishes") == PUBLISHES
    assert moved(before_con, after_con, "ensync_publishes") == 0
    assert moved(before_con, after_con, "ensync_deliveries") >= PUBLISHES
    assert moved(before_con, after_con, "ensync_acks") == PUBLISHES
    commits = sample(after_pub, "ensync_raft_commit_latency_seconds",
                     "ensync_raft_commit_latency_seconds_count")
    assert commits >= PUBLISHES
    fsyncs = sample(after_pub, "ensync_journal_fsync_latency_seconds",
                    "ensync_journal_fsync_latency_seconds_count")
    assert fsyncs > 0


async def test_rollbacks_show_as_redeliveries_then_a_dead_letter(cluster):
    node_id = cluster.leader()
    key = await asyncio.to_thread(cluster.create_key, "metrics-dead",
                                  ["metrics/*"], ["metrics/*"])
    client = await connect(cluster, node_id, key["access_key"])
    before = await asyncio.to_thread(scrape, cluster, node_id)
    try:
        await client.subscribe("metrics/dead")
        await client.publish("metrics/dead", key["app_id"], b64("never acked"))
        for attempt in range(1, DELIVERY_LIMIT + 1):
            record = await next_record(client)
            assert record["attempt"] == attempt
            await client.send(f"ROLLBACK;CLIENT_ID=:{client.client_id};"
                              f"EVENT_IDEM=:{record['idem']}")
    finally:
        await client.close()

    def dead_lettered():
        after = scrape(cluster, node_id)
        grew = (sample(after, "ensync_dead_letters", "ensync_dead_letters_total")
                > sample(before, "ensync_dead_letters", "ensync_dead_letters_total"))
        return after if grew else None

    after = await eventually(dead_lettered, SCRAPE_WAIT_S, "a dead letter")
    assert sample(after, "ensync_dead_events") >= 1
    assert (sample(after, "ensync_redeliveries", "ensync_redeliveries_total")
            > sample(before, "ensync_redeliveries", "ensync_redeliveries_total"))


# -- /ready -------------------------------------------------------------------------


def raft_view(**changes) -> RaftStatistics:
    view = dict(role="follower", term=3, commit_index=500, known_commit_index=500,
                applied_index=500, log_entries=10, leader="n1", leader_connected=True,
                has_quorum=True, follower_match={}, role_changes={},
                leader_changes_total=1, apply_skipped_total=0,
                snapshot_installs_total=0)
    return RaftStatistics(**{**view, **changes})


def test_ready_needs_a_reachable_leader_or_a_quorum_and_a_short_apply_lag():
    assert ready_reason(raft_view(), False, 100) is None
    assert ready_reason(raft_view(applied_index=400), False, 100) is None
    assert ready_reason(raft_view(role="leader", leader="n2"), False, 100) is None

    assert "behind" in ready_reason(raft_view(applied_index=399), False, 100)
    assert "unreachable" in ready_reason(raft_view(leader_connected=False), False, 100)
    assert "no leader" in ready_reason(
        raft_view(role="candidate", leader=None, leader_connected=False), False, 100)
    assert "quorum" in ready_reason(
        raft_view(role="leader", has_quorum=False), False, 100)
    assert "journal" in ready_reason(raft_view(), True, 100)


def test_every_node_of_a_healthy_cluster_is_ready(cluster):
    for node_id in cluster.node_ids:
        status, body = wait_sync(
            lambda n=node_id: (r := ready(cluster, n))[0] == 200 and r,
            READY_WAIT_S, f"{node_id} ready")

        assert status == 200
        assert body["ready"] is True


@pytest.mark.parametrize("left", ["leader", "follower"])
def test_node_left_alone_is_not_ready_but_still_alive(cluster_factory, left):
    alone_cluster = cluster_factory(3)
    leader = alone_cluster.leader()
    alone = leader if left == "leader" else follower_of(alone_cluster)
    wait_sync(lambda: ready(alone_cluster, alone)[0] == 200, READY_WAIT_S,
              f"{alone} ready")

    for node_id in alone_cluster.node_ids:
        if node_id != alone:
            alone_cluster.kill(node_id, signal.SIGKILL)

    status, body = wait_sync(
        lambda: (r := ready(alone_cluster, alone))[0] == 503 and r,
        ALONE_WAIT_S, f"{alone} to stop being ready")
    assert body["ready"] is False
    assert body["reason"]
    assert get(alone_cluster, alone, "/health")[0] == 200
    families = scrape(alone_cluster, alone)
    assert sample(families, "ensync_ready") == 0


# -- logs ---------------------------------------------------------------------------


def test_json_log_fields_come_from_the_message_and_never_replace_the_fixed_keys():
    record = logging.LogRecord("ensync.node", logging.WARNING, __file__, 1,
                               "follower stuck node=%s match=%d", ("n2", 7), None)
    record.node = "n1"

    entry = json.loads(_JsonLineFormatter().format(record))

    assert entry["node"] == "n1"
    assert entry["msg_node"] == "n2"
    assert entry["match"] == 7
    assert entry["level"] == "WARNING"
    assert entry["ts"].endswith("Z")


def test_json_logs_are_one_object_per_line_with_the_node_first(cluster):
    for node_id, node in cluster.nodes.items():
        lines = node.log_file.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]

        assert entries, f"{node_id} logged nothing"
        for entry in entries:
            assert list(entry)[:5] == ["node", "ts", "level", "logger", "msg"]
            assert entry["node"] == node_id
        ready_lines = [e for e in entries if e["msg"].startswith("ready ")]
        assert ready_lines and ready_lines[0]["id"] == node_id
        assert isinstance(ready_lines[0]["pid"], int)
