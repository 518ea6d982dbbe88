"""Delivery inspection on a real 3-node cluster: trace, dead letters, sessions.

Reads answer from each node's own applied state, so every check that names a
node polls that node until it has applied what the test did, with a deadline.
Blocking HTTP and ensyncctl runs go to a thread, so the clients' sockets keep
being read while a test waits.

n3 shows sessions idle after IDLE_AFTER_MS_N3; the other nodes keep the default
(60 s), which lets one test see both answers for the same session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node.client import Client
from node.ctl import CtlError
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
ACK_TIMEOUT_MS = 1000
DELIVERY_LIMIT = 2
IDLE_AFTER_MS_N3 = 300
RECORD_WAIT_S = 10
APPLY_WAIT_S = 10
# Two deliveries, each held until the ack timeout, then the dispatcher's turn.
DEAD_WAIT_S = 15
POLL_INTERVAL_S = 0.05
CTL_TIMEOUT_S = 60
HTTP_TIMEOUT_S = 5

T = TypeVar("T")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def admin_cluster(request, tmp_path_factory) -> Cluster:
    cluster = Cluster(
        3,
        base_dir=tmp_path_factory.mktemp("admin"),
        extra_flags=["--ack-timeout-ms", str(ACK_TIMEOUT_MS),
                     "--delivery-limit", str(DELIVERY_LIMIT)],
        node_flags={"n3": ["--idle-after-ms", str(IDLE_AFTER_MS_N3)]},
    )
    request.addfinalizer(cluster.stop)
    return cluster.start()


@pytest.fixture(scope="module")
def cluster_file(admin_cluster, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("admin-ctl") / "cluster.json"
    return admin_cluster.write_cluster_file(path)


@pytest.fixture
async def pair(admin_cluster, request):
    """Fresh publisher and consumer apps each test; publisher on n1, consumer on n2."""
    name = request.node.name[:40]
    pub_key = admin_cluster.create_key(f"p-{name}", ["*"], ["*"])
    con_key = admin_cluster.create_key(f"c-{name}", ["*"], ["*"])
    publisher = Client(admin_cluster.ws_url("n1"))
    consumer = Client(admin_cluster.ws_url("n2"))
    await publisher.connect(pub_key["access_key"])
    await consumer.connect(con_key["access_key"])
    yield publisher, consumer, con_key, pub_key
    await publisher.close()
    await consumer.close()


# -- helpers -------------------------------------------------------------------


async def publish(client: Client, to: dict, text: str, name: str) -> str:
    reply = await client.publish(name, to["app_id"], b64(text))
    return reply.split("IDEM=")[1].split(";")[0]


async def next_record(client: Client) -> dict:
    return await asyncio.wait_for(client.records.get(), RECORD_WAIT_S)


async def eventually(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``check`` in a thread until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = await asyncio.to_thread(check)
            if value:
                return value
        except CtlError as exc:  # e.g. 404 until the node has applied it
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                 f"last error: {last_error}")
        await asyncio.sleep(POLL_INTERVAL_S)


def trace_in_state(cluster: Cluster, node_id: str, idem: str, state: str):
    trace = cluster.request(node_id, f"/admin/trace/{idem}")
    return trace if trace["state"] == state else None


def whats(trace: dict) -> list[str]:
    return [row["what"] for row in trace["history"]]


def dead_letter(cluster: Cluster, node_id: str, idem: str, path: str = "/admin/dlq"):
    letters = cluster.request(node_id, path)["dead_letters"]
    return next((letter for letter in letters if letter["idem"] == idem), None)


def session_row(cluster: Cluster, node_id: str, sid: str) -> dict | None:
    sessions = cluster.request(node_id, "/admin/sessions")["sessions"]
    return next((row for row in sessions if row["client_id"] == sid), None)


def session_where(cluster, node_id, sid, test: Callable[[dict], bool]):
    row = session_row(cluster, node_id, sid)
    return row if row is not None and test(row) else None


def http_status(cluster: Cluster, node_id: str, path: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """Status and JSON body of a request sent with exactly ``headers``."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(cluster.admin_url(node_id) + path, data=data,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def run_ctl(cluster_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENSYNC_ADMIN_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "node.ctl", "--cluster", str(cluster_file), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=CTL_TIMEOUT_S,
        check=False)


async def ctl(cluster_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_ctl, cluster_file, *args)


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensyncctl: error: "), lines
    return lines[0]


# -- trace ---------------------------------------------------------------------


async def test_trace_shows_publish_commit_delivery_and_ack_in_order_on_every_node(
        pair, admin_cluster, cluster_file):
    publisher, consumer, to, sender = pair
    await consumer.subscribe("order/created")
    idem = await publish(publisher, to, "o1", "order/created")
    record = await next_record(consumer)
    assert record["idem"] == idem
    await consumer.ack(idem, record["block"])

    for node_id in admin_cluster.node_ids:
        trace = await eventually(
            lambda n=node_id: trace_in_state(admin_cluster, n, idem, "acked"),
            APPLY_WAIT_S, f"{node_id} to apply the ack")
        assert whats(trace) == ["published", "committed", "delivered", "acked"]
        assert (trace["idem"], trace["name"]) == (idem, "order/created")
        assert (trace["from"], trace["to"]) == (sender["app_id"], to["app_id"])
        assert trace["attempts"] == 1
        delivered = trace["history"][2]
        assert delivered["sid"] == consumer.client_id
        assert delivered["node"] == "n2"
        assert delivered["attempt"] == 1
        times = [row["at"] for row in trace["history"]]
        assert times == sorted(times)

    table = await ctl(cluster_file, "trace", idem)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"{idem}  order/created  state acked")
    header = next(i for i, line in enumerate(lines) if line.startswith("time (UTC)"))
    assert [line.split()[2] for line in lines[header + 1:]] == [
        "published", "committed", "delivered", "acked"]
    as_json = await ctl(cluster_file, "trace", idem, "--json")
    assert json.loads(as_json.stdout)["history"] == trace["history"]


@pytest.mark.parametrize("idem", ["evt-0000-0fffffffffff", "nonsense", "evt-zz-1"])
async def test_trace_of_an_unknown_or_malformed_idem_is_404(admin_cluster, idem):
    status, body = await asyncio.to_thread(
        http_status, admin_cluster, "n1", f"/admin/trace/{idem}",
        headers={"Authorization": f"Bearer {admin_cluster.admin_token}"})

    assert status == 404
    assert body["error"] == "NOT_FOUND"


async def test_ctl_trace_of_an_unknown_event_is_one_line_error(cluster_file):
    result = await ctl(cluster_file, "trace", "evt-0000-0fffffffffff")

    line = assert_one_line_error(result)
    assert "404 NOT_FOUND" in line


# -- dead letters --------------------------------------------------------------


async def test_poison_event_is_dead_lettered_then_requeued_and_delivered_again(
        pair, admin_cluster, cluster_file):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/poison")
    idem = await publish(publisher, to, "poison", "job/poison")
    for attempt in range(1, DELIVERY_LIMIT + 1):
        record = await next_record(consumer)  # and never acked
        assert (record["idem"], record["attempt"]) == (idem, attempt)

    for node_id in admin_cluster.node_ids:
        letter = await eventually(
            lambda n=node_id: dead_letter(admin_cluster, n, idem),
            DEAD_WAIT_S, f"{idem} in the DLQ of {node_id}")
        assert letter["name"] == "job/poison"
        assert letter["to"] == to["app_id"]
        assert letter["attempts"] == DELIVERY_LIMIT
        assert isinstance(letter["dead_since_ms"], int)

    listing = await ctl(cluster_file, "dlq", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert idem in [d["idem"] for d in json.loads(listing.stdout)["dead_letters"]]
    shown = await ctl(cluster_file, "dlq", "show", idem, "--json")
    assert shown.returncode == 0, shown.stderr
    dead = json.loads(shown.stdout)
    assert dead["state"] == "dead"
    assert dead["record"]["payload"] == b64("poison")
    assert whats(dead)[-2:] == ["timed out", "dead-lettered"]

    requeue = await ctl(cluster_file, "dlq", "requeue", idem)
    assert (requeue.returncode, requeue.stdout) == (0, f"requeued {idem}\n")
    again = await next_record(consumer)
    assert (again["idem"], again["attempt"]) == (idem, 1)
    await consumer.ack(idem, again["block"])

    for node_id in admin_cluster.node_ids:
        trace = await eventually(
            lambda n=node_id: trace_in_state(admin_cluster, n, idem, "acked"),
            APPLY_WAIT_S, f"{node_id} to apply the ack after the requeue")
        tail = whats(trace)[-4:]
        assert tail == ["dead-lettered", "requeued from the dead-letter queue",
                        "delivered", "acked"]
        assert trace["history"][-3]["by"] == "admin"
        gone = await asyncio.to_thread(dead_letter, admin_cluster, node_id, idem)
        assert gone is None


async def test_requeue_or_show_of_an_event_not_in_the_dlq_is_404(
        pair, admin_cluster, cluster_file):
    publisher, _, to, _ = pair
    idem = await publish(publisher, to, "fine", "job/fine")  # pending: nobody listens
    auth = {"Authorization": f"Bearer {admin_cluster.admin_token}"}

    for path, method in ((f"/admin/dlq/{idem}/requeue", "POST"),
                         (f"/admin/dlq/{idem}", "GET"),
                         ("/admin/dlq/nonsense/requeue", "POST")):
        status, body = await asyncio.to_thread(
            http_status, admin_cluster, "n1", path, method, auth)
        assert (status, body["error"]) == (404, "NOT_FOUND"), path

    result = await ctl(cluster_file, "dlq", "requeue", idem)
    assert "404 NOT_FOUND" in assert_one_line_error(result)


async def test_dlq_limit_is_a_positive_integer(admin_cluster):
    auth = {"Authorization": f"Bearer {admin_cluster.admin_token}"}

    for bad in ("0", "-1", "x"):
        status, body = await asyncio.to_thread(
            http_status, admin_cluster, "n2", f"/admin/dlq?limit={bad}", "GET", auth)
        assert (status, body["error"]) == (400, "INVALID_PARAMETER"), bad
    status, body = await asyncio.to_thread(
        http_status, admin_cluster, "n2", "/admin/dlq?limit=1", "GET", auth)
    assert status == 200
    assert len(body["dead_letters"]) <= 1
    assert body["total"] >= len(body["dead_letters"])


# -- sessions ------------------------------------------------------------------


async def test_consumer_with_a_record_in_flight_is_active_then_disconnected(
        pair, admin_cluster, cluster_file):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/slow")
    # Several unacked events keep the slot busy for seconds, though each one is
    # taken back after the ack timeout and handed out again.
    for n in range(3):
        await publish(publisher, to, f"slow{n}", "job/slow")
    await next_record(consumer)
    sid = consumer.client_id

    def busy(row: dict) -> bool:
        return row["status"] == "active" and row["in_flight"] == 1

    for node_id in admin_cluster.node_ids:
        row = await eventually(
            lambda n=node_id: session_where(admin_cluster, n, sid, busy),
            APPLY_WAIT_S, f"{node_id} to show {sid} active with a record in flight")
        assert row["app"] == to["app_id"]
        assert row["app_name"] == to["name"]
        assert row["node"] == "n2"
        assert row["last_active_ms"] >= row["opened_ms"]
        assert "closed_ms" not in row
    table = await ctl(cluster_file, "sessions")
    assert table.returncode == 0, table.stderr
    assert any(line.split()[:4] == [sid, to["name"], "n2", "active"]
               for line in table.stdout.splitlines())

    await consumer.close()
    for node_id in admin_cluster.node_ids:
        row = await eventually(
            lambda n=node_id: session_where(
                admin_cluster, n, sid, lambda r: r["status"] == "disconnected"),
            APPLY_WAIT_S, f"{node_id} to show {sid} disconnected")
        assert row["in_flight"] == 0
        assert row["reason"] == "client closed"
        assert row["closed_ms"] >= row["opened_ms"]
    as_json = await ctl(cluster_file, "sessions", "--json")
    rows = json.loads(as_json.stdout)["sessions"]
    assert [r["status"] for r in rows if r["client_id"] == sid] == ["disconnected"]


async def test_quiet_consumer_is_idle_after_idle_after_ms_and_active_before(
        pair, admin_cluster):
    _, consumer, _, _ = pair
    await consumer.subscribe("job/quiet")
    sid = consumer.client_id

    # n3 waits IDLE_AFTER_MS_N3 of quiet; n1 the default 60 s.
    def idle(row: dict) -> bool:
        return row["status"] == "idle"

    await eventually(lambda: session_where(admin_cluster, "n3", sid, idle),
                     APPLY_WAIT_S, f"n3 to show {sid} idle")
    row = await asyncio.to_thread(session_row, admin_cluster, "n1", sid)
    assert (row["status"], row["in_flight"]) == ("active", 0)


# -- authentication ------------------------------------------------------------

NEW_ROUTES = [
    ("GET", "/admin/trace/evt-0000-000000000001"),
    ("GET", "/admin/dlq"),
    ("GET", "/admin/dlq/evt-0000-000000000001"),
    ("POST", "/admin/dlq/evt-0000-000000000001/requeue"),
    ("GET", "/admin/sessions"),
]


@pytest.mark.parametrize(("method", "path"), NEW_ROUTES)
async def test_new_admin_routes_refuse_requests_without_the_token(
        admin_cluster, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = await asyncio.to_thread(
            http_status, admin_cluster, "n1", path, method, headers)
        assert (status, body["error"]) == (401, "UNAUTHORIZED"), headers


async def test_ctl_with_a_wrong_token_is_one_line_error(cluster_file):
    for args in (["sessions"], ["dlq", "list"], ["dlq", "requeue", "evt-0000-1"]):
        result = await ctl(cluster_file, "--token", "wrong", *args)
        assert "401" in assert_one_line_error(result), args
