"""Operator admin API and the ensyncctl commands on top of it.

First the pure parts (the OpenAPI document against the router, the delivery
rate counter, table rendering), then a real 3-node cluster shared by the
module. Blocking HTTP and ensyncctl runs go to a thread, so the test clients'
sockets keep being read while a test waits; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from node.client import Client, ClientError
from node.ctl import CtlError, format_age_ms, render_queues
from node.http import build_app
from node.openapi import DOCUMENT
from node.rates import DeliveryRates

ROOT = Path(__file__).resolve().parents[2]
CTL_TIMEOUT_S = 60
APPLY_WAIT_S = 10
POLL_INTERVAL_S = 0.05
CLOSE_WITHIN_S = 1.0
CONNECT_TIMEOUT_S = 10


# -- the OpenAPI document ------------------------------------------------------------


def admin_routes() -> set[tuple[str, str]]:
    app = build_app(types.SimpleNamespace())
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/admin") and route.method != "HEAD":
            routes.add((route.method.lower(), path))
    return routes


def test_openapi_describes_every_admin_route_the_router_holds():
    described = {(method, path) for path, ops in DOCUMENT["paths"].items()
                 for method in ops}

    missing = admin_routes() - described

    assert not missing, f"routes without an OpenAPI description: {sorted(missing)}"


def test_openapi_describes_no_route_the_router_lacks():
    described = {(method, path) for path, ops in DOCUMENT["paths"].items()
                 for method in ops}

    assert described - admin_routes() == set()


def test_openapi_references_only_schemas_it_defines():
    text = json.dumps(DOCUMENT)
    schemas = DOCUMENT["components"]["schemas"]

    refs = {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}

    assert refs <= set(schemas), refs - set(schemas)


# -- delivery rates --------------------------------------------------------------------


def test_delivery_rate_is_the_mean_over_the_last_whole_seconds():
    rates = DeliveryRates(window_s=10)
    for second in range(100, 110):
        for _ in range(3):
            rates.record(("app", "a/b"), second)
    rates.record(("app", "a/b"), 110)  # the current second is not counted yet

    assert rates.per_second(("app", "a/b"), 110) == 3.0
    assert rates.per_second(("app", "a/b"), 115) == 1.6
    assert rates.per_second(("app", "a/b"), 130) == 0.0
    assert rates.per_second(("app", "other"), 110) == 0.0


def test_delivery_rates_forget_the_least_recent_queue_past_the_limit():
    rates = DeliveryRates(window_s=10, queues_max=2)
    rates.record(("app", "one"), 1)
    rates.record(("app", "two"), 1)
    rates.record(("app", "one"), 2)
    rates.record(("app", "three"), 2)

    assert rates.per_second(("app", "two"), 3) == 0.0
    assert rates.per_second(("app", "one"), 3) == 0.2
    assert rates.statistics().forgotten_total == 1
    assert rates.statistics().queues == 2


# -- rendering -------------------------------------------------------------------------


def test_ages_read_in_the_largest_unit_that_fits_twice():
    assert [format_age_ms(v) for v in (None, 850, 42_000, 1_020_000, 7_200_000,
                                       3 * 86_400_000)] == [
        "-", "850ms", "42s", "17m", "2h", "3d"]


def test_queues_table_names_the_app_and_says_when_rows_were_left_out():
    queue = {"app_id": "id1", "app_name": "billing", "name": "invoice/paid",
             "pending": 7, "in_flight": 1, "oldest_age_ms": 42_000,
             "delivered_per_s": 0.5}

    lines = render_queues({"queues": [queue], "total": 3}).splitlines()

    assert lines[0].split() == ["app", "queue", "pending", "in", "flight", "oldest",
                                "delivered/s"]
    assert lines[1].split() == ["billing", "invoice/paid", "7", "1", "42s", "0.5"]
    assert lines[2] == "showing 1 of 3; raise --limit for more"
    assert render_queues({"queues": [], "total": 0}) == "no queues"


# -- against a real cluster ------------------------------------------------------------


def run_ctl(*args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    return subprocess.run([sys.executable, "-m", "node.ctl", *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=CTL_TIMEOUT_S,
                          check=False)


async def ctl(*args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_ctl, *args, env=env)


async def ctl_json(*args: str, env: dict[str, str] | None = None) -> Any:
    result = await ctl(*args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ensyncctl: error: ")
    return lines[0]


async def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


@pytest.fixture(scope="module")
def cluster_file(cluster, tmp_path_factory) -> Path:
    return cluster.write_cluster_file(tmp_path_factory.mktemp("admin") / "cluster.json")


@pytest.fixture
def key(cluster, request):
    """A fresh key per call, named after the test."""
    made = []

    def make(suffix: str = "") -> dict:
        name = f"{request.node.name[:40]}{suffix}"
        made.append(name)
        return cluster.create_key(name, ["*"], ["*"])

    return make


async def connected(ws_url: str, access_key: str) -> Client:
    client = Client(ws_url)
    try:
        await asyncio.wait_for(client.connect(access_key), CONNECT_TIMEOUT_S)
    except BaseException:
        await client.close()
        raise
    return client


async def conn_error(ws_url: str, access_key: str) -> str:
    """The code a CONN with ``access_key`` fails with ("" if it succeeds)."""
    client = Client(ws_url)
    try:
        await asyncio.wait_for(client.connect(access_key), CONNECT_TIMEOUT_S)
        return ""
    except ClientError as exc:
        return exc.code
    finally:
        await client.close()


async def admin(cluster, node_id: str, path: str, method: str = "GET",
                body: dict | None = None) -> dict:
    return await asyncio.to_thread(cluster.request, node_id, path, method, body,
                                   15_000)


async def test_apps_lists_each_app_with_its_live_sessions(cluster, cluster_file, key):
    record = key()
    client = await connected(cluster.ws_url("n2"), record["access_key"])
    try:
        async def listed():
            apps = (await ctl_json("--cluster", str(cluster_file), "apps"))["apps"]
            row = next((a for a in apps if a["name"] == record["name"]), None)
            return row if row and row["sessions"] == 1 else None

        row = await wait_for(listed, APPLY_WAIT_S, "the app with one session")
    finally:
        await client.close()

    assert row["app_id"] == record["app_id"]
    assert row["disabled"] is False
    assert (row["send"], row["receive"]) == (["*"], ["*"])
    assert isinstance(row["created_ms"], int)


async def test_disabling_a_key_closes_its_socket_within_a_second(cluster, key):
    record = key()
    client = await connected(cluster.ws_url("n2"), record["access_key"])
    try:
        # The clock starts before the request: the whole round trip counts.
        deadline = time.monotonic() + CLOSE_WITHIN_S
        answer = await admin(cluster, "n1", f"/admin/keys/{record['name']}/disable",
                             "POST", {})
        closed = await client.wait_closed(max(0.0, deadline - time.monotonic()))
    finally:
        await client.close()

    assert answer == {"name": record["name"], "app_id": record["app_id"],
                      "disabled": True}
    assert closed, f"the socket was still open {CLOSE_WITHIN_S} s after the request"
    assert client.close_code == 4000
    assert await conn_error(cluster.ws_url("n3"), record["access_key"]) == (
        "UNAUTHORIZED")


async def test_a_disabled_key_connects_again_once_enabled(cluster, cluster_file, key):
    record = key()
    cluster_args = ("--cluster", str(cluster_file))
    disabled = await ctl(*cluster_args, "keys", "disable", record["name"])
    assert disabled.returncode == 0, disabled.stderr
    assert await conn_error(cluster.ws_url("n1"), record["access_key"]) == (
        "UNAUTHORIZED")

    enabled = await ctl_json(*cluster_args, "keys", "enable", record["name"])

    assert enabled["disabled"] is False
    assert await conn_error(cluster.ws_url("n1"), record["access_key"]) == ""


async def test_rotating_a_key_refuses_the_old_access_key_and_takes_the_new(
        cluster, cluster_file, key):
    record = key()
    client = await connected(cluster.ws_url("n3"), record["access_key"])
    try:
        rotated = await ctl_json("--cluster", str(cluster_file), "keys", "rotate",
                                 record["name"])
        closed = await client.wait_closed(CLOSE_WITHIN_S)
    finally:
        await client.close()

    assert closed
    assert rotated["name"] == record["name"]
    assert rotated["app_id"] == record["app_id"]
    assert rotated["access_key"] != record["access_key"]
    assert await conn_error(cluster.ws_url("n2"), record["access_key"]) == (
        "UNAUTHORIZED")
    assert await conn_error(cluster.ws_url("n2"), rotated["access_key"]) == ""


async def test_key_actions_on_an_unknown_name_are_a_one_line_404(cluster_file):
    for action in ("disable", "enable", "rotate"):
        result = await ctl("--cluster", str(cluster_file), "keys", action, "nobody")

        line = assert_one_line_error(result)
        assert "404 NOT_FOUND" in line


async def publish_n(cluster, sender: dict, to: dict, name: str, count: int) -> None:
    client = await connected(cluster.ws_url("n1"), sender["access_key"])
    try:
        replies = [client.publish(name, to["app_id"], "e30=") for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*replies), CONNECT_TIMEOUT_S)
    finally:
        await client.close()


async def test_queues_show_the_depth_of_an_app_nobody_consumes(cluster, cluster_file,
                                                               key):
    sender, sink = key("-p"), key("-s")
    await publish_n(cluster, sender, sink, "depth/check", 5)

    async def queue_row():
        answer = await ctl_json("--cluster", str(cluster_file), "queues", "--app",
                                sink["name"])
        rows = answer["queues"]
        return rows[0] if rows and rows[0]["pending"] == 5 else None

    row = await wait_for(queue_row, APPLY_WAIT_S, "five pending events")
    table = await ctl("--cluster", str(cluster_file), "queues", "--app", sink["name"])

    assert row["app_id"] == sink["app_id"]
    assert row["app_name"] == sink["name"]
    assert row["name"] == "depth/check"
    assert row["in_flight"] == 0
    assert row["delivered_per_s"] == 0.0
    assert isinstance(row["oldest_age_ms"], int) and row["oldest_age_ms"] >= 0
    assert table.stdout.splitlines()[1].split()[:4] == [
        sink["name"], "depth/check", "5", "0"]


async def test_queues_of_an_unknown_app_are_a_one_line_404(cluster_file):
    result = await ctl("--cluster", str(cluster_file), "queues", "--app", "nobody")

    assert "404 NOT_FOUND" in assert_one_line_error(result)


async def test_queue_listing_is_sorted_by_depth_and_limited(cluster, key):
    sender, sink = key("-p"), key("-s")
    await publish_n(cluster, sender, sink, "deep/one", 3)
    await publish_n(cluster, sender, sink, "deep/two", 1)

    async def listed():
        answer = await admin(cluster, "n1", f"/admin/queues?app={sink['name']}")
        depths = [row["pending"] for row in answer["queues"]]
        return answer if depths == [3, 1] else None

    await wait_for(listed, APPLY_WAIT_S, "two queues")
    limited = await admin(cluster, "n1", f"/admin/queues?app={sink['name']}&limit=1")

    assert [row["name"] for row in limited["queues"]] == ["deep/one"]
    assert limited["total"] == 2


async def test_ctl_publish_then_subscribe_round_trip(cluster, cluster_file, key):
    sender, receiver = key("-p"), key("-r")
    demo_keys = cluster_file.parent / "demo-keys.json"
    demo_keys.write_text(json.dumps({"demo-publisher": sender}))

    published = await ctl_json("--cluster", str(cluster_file), "publish",
                               "orders/created", "--to", receiver["name"], "--data",
                               '{"order": 42}', "--count", "2", "--as",
                               "demo-publisher")
    received = await ctl("--cluster", str(cluster_file), "subscribe",
                         "orders/created", "--count", "2", "--timeout-ms", "10000",
                         "--ack", "--json",
                         env={"ENSYNC_ACCESS_KEY": receiver["access_key"]})

    assert published["to"] == receiver["app_id"]
    assert len(published["idems"]) == 2
    assert received.returncode == 0, received.stderr
    records = [json.loads(line) for line in received.stdout.splitlines()]
    assert [r["idem"] for r in records] == published["idems"]
    assert {(r["name"], r["attempt"], r["payload"]) for r in records} == {
        ("orders/created", 1, '{"order":42}')}
    for idem in published["idems"]:
        trace = await admin(cluster, "n1", f"/admin/trace/{idem}")
        assert trace["state"] in ("inflight", "acked")  # the ack may still apply

    # Every node applies every delivery, so each one counts the rate, here one
    # that served neither client (both used n1). Whole seconds only: wait one.
    async def rate():
        answer = await admin(cluster, "n3", f"/admin/queues?app={receiver['name']}")
        return answer["queues"] and answer["queues"][0]["delivered_per_s"] > 0

    await wait_for(rate, APPLY_WAIT_S, "a delivery rate on n3")


async def test_step_down_hands_leadership_to_some_follower(cluster, cluster_file):
    leader = await asyncio.to_thread(cluster.leader)

    moved = await ctl_json("--cluster", str(cluster_file), "leader", "step-down")

    assert moved["previous"] == leader
    assert moved["leader"] != leader
    assert await asyncio.to_thread(cluster.leader) == moved["leader"]


async def test_subscribe_that_gets_too_few_records_is_a_one_line_error(cluster,
                                                                       cluster_file,
                                                                       key):
    receiver = key()

    result = await ctl("--cluster", str(cluster_file), "subscribe", "quiet/none",
                       "--count", "1", "--timeout-ms", "300", "--key",
                       receiver["access_key"])

    assert "received 0 of 1 records" in assert_one_line_error(result)


async def test_publish_without_an_access_key_is_a_one_line_error(cluster_file):
    result = await ctl("--cluster", str(cluster_file), "publish", "a/b", "--to",
                       "x", "--data", "{}")

    assert "no access key" in assert_one_line_error(result)


async def test_status_watch_with_count_prints_that_many_tables(cluster_file):
    result = await ctl("--cluster", str(cluster_file), "status", "--watch",
                       "--count", "2", "--interval-ms", "100")

    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines()
               if line.startswith("node ")]
    verdicts = [line for line in result.stdout.splitlines()
                if line.startswith("healthy: ")]
    assert len(headers) == 2
    assert len(verdicts) == 2


async def test_nodes_lists_each_nodes_addresses(cluster, cluster_file):
    answer = await ctl_json("--cluster", str(cluster_file), "nodes")

    assert [node["id"] for node in answer["nodes"]] == ["n1", "n2", "n3"]
    for node in answer["nodes"]:
        assert node["ws_url"] == cluster.ws_url(node["id"])
        assert node["admin_url"] == cluster.admin_url(node["id"])


async def test_openapi_is_served_to_the_admin(cluster):
    served = await admin(cluster, "n2", "/admin/openapi.json")

    assert served == json.loads(json.dumps(DOCUMENT))


async def test_a_follower_refuses_a_transfer_and_names_the_leader(cluster):
    leader = await asyncio.to_thread(cluster.leader)
    follower = next(n for n in cluster.node_ids if n != leader)

    with pytest.raises(CtlError) as caught:
        await admin(cluster, follower, "/admin/leader/transfer", "POST",
                    {"node": follower})

    assert caught.value.status == 409
    assert (caught.value.code, caught.value.leader) == ("NOT_LEADER", leader)


async def test_leader_transfer_to_a_named_follower_moves_leadership(cluster,
                                                                    cluster_file):
    leader = await asyncio.to_thread(cluster.leader)
    target = next(n for n in cluster.node_ids if n != leader)

    moved = await ctl_json("--cluster", str(cluster_file), "leader", "transfer",
                           target)

    assert moved == {"leader": target, "previous": leader, "moved": True}
    status = await ctl_json("--cluster", str(cluster_file), "status")
    assert status["leader"] == target
    assert await asyncio.to_thread(cluster.leader) == target


async def test_leader_transfer_to_an_unknown_node_is_a_one_line_404(cluster_file):
    result = await ctl("--cluster", str(cluster_file), "leader", "transfer", "n9")

    assert "404 NOT_FOUND" in assert_one_line_error(result)
