"""Keys and client limits on a real 3-node cluster (issue #6): key expiry,
proof of possession, events held per recipient, unanswered requests per
connection, and lookups that miss, through real sockets and ensyncctl.

The module's cluster runs with a small ``recipient_events_max`` and
``client_pending_requests_max``; the test of a node that requires proof of
possession starts a one-node cluster of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time

import pytest
from ensync_core import EnSyncError
from ensync_sdk_ws import EnSyncEngine

from node import proof
from node.client import Client, ClientError
from node.ctl import HttpFailure
from tests.cluster import ROOT, Cluster

RECIPIENT_EVENTS_MAX = 3
PENDING_REQUESTS_MAX = 8
PIPELINED_REQUESTS = 300
EXPIRES_IN_MS = 3000
CLOSE_AFTER_EXPIRY_MS_MAX = 1000
RECORD_WAIT_S = 15.0
CLOSE_WAIT_S = 15.0
PAYLOAD = base64.b64encode(b"{}").decode()


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Cluster:
    started = Cluster(3, base_dir=tmp_path_factory.mktemp("keys"), extra_flags=[
        "--recipient-events-max", str(RECIPIENT_EVENTS_MAX),
        "--client-pending-requests-max", str(PENDING_REQUESTS_MAX)])
    request.addfinalizer(started.stop)
    return started.start()


def ctl(cluster: Cluster, tmp_path, *args: str) -> dict:
    cluster_file = cluster.write_cluster_file(tmp_path / "cluster.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    done = subprocess.run(
        [sys.executable, "-m", "node.ctl", "--cluster", str(cluster_file), *args,
         "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def connect(cluster: Cluster, node_id: str, key: dict, **proof_args) -> Client:
    client = Client(cluster.ws_url(node_id))
    await client.connect(key["access_key"], **proof_args)
    return client


async def conn_reply(cluster: Cluster, node_id: str, frame: str) -> str:
    """The reply to ``frame`` as the first request on a fresh socket."""
    client = Client(cluster.ws_url(node_id))
    await client.open()
    try:
        return await client.exchange(frame)
    finally:
        await client.close()


# -- expiry ------------------------------------------------------------------------


async def test_an_expired_keys_sessions_close_within_a_second_and_its_conn_fails(
    cluster, tmp_path
):
    key = ctl(cluster, tmp_path, "keys", "create", "--name", "expiring", "--send", "*",
              "--receive", "*", "--expires-in-ms", str(EXPIRES_IN_MS))
    assert key["expires_ms"] > time.time() * 1000
    clients = [await connect(cluster, n, key) for n in cluster.node_ids]

    closed_at_ms = []
    for client in clients:
        wait_s = key["expires_ms"] / 1000 - time.time() + CLOSE_WAIT_S
        assert await client.wait_closed(wait_s), "session outlived its key"
        closed_at_ms.append(time.time() * 1000)
        assert client.close_code == 4000
    late_ms = max(closed_at_ms) - key["expires_ms"]
    print(f"sessions closed {late_ms:.0f} ms after the key expired")

    refused = await conn_reply(cluster, "n2", f"CONN;ACCESS_KEY=:{key['access_key']}")
    listed = ctl(cluster, tmp_path, "keys", "list")
    rotated = ctl(cluster, tmp_path, "keys", "rotate", "expiring")
    again = await connect(cluster, "n3", {"access_key": rotated["access_key"]})
    await again.close()

    assert 0 <= late_ms <= CLOSE_AFTER_EXPIRY_MS_MAX
    assert refused == "-FAIL:UNAUTHORIZED;MESSAGE=access key has expired"
    row = next(k for k in listed["keys"] if k["name"] == "expiring")
    assert row["expired"] is True and row["expires_ms"] == key["expires_ms"]
    assert rotated["expires_ms"] is None


async def test_a_key_rotated_with_an_expiry_stops_working_then(cluster, tmp_path):
    key = cluster.create_key("rotate-expiring", ["*"], ["*"])
    rotated = ctl(cluster, tmp_path, "keys", "rotate", "rotate-expiring",
                  "--expires-in-ms", "1500")
    client = await connect(cluster, "n1", {"access_key": rotated["access_key"]})
    assert await client.wait_closed(CLOSE_WAIT_S)
    refused = await conn_reply(cluster, "n1",
                               f"CONN;ACCESS_KEY=:{rotated['access_key']}")
    old = await conn_reply(cluster, "n1", f"CONN;ACCESS_KEY=:{key['access_key']}")

    assert refused == "-FAIL:UNAUTHORIZED;MESSAGE=access key has expired"
    assert old == "-FAIL:UNAUTHORIZED;MESSAGE=access key is not valid"


def test_the_admin_api_refuses_a_malformed_expiry(cluster):
    for body in ({"expires_ms": -5}, {"expires_in_ms": "soon"},
                 {"expires_ms": 10**13, "expires_in_ms": 5}):
        with pytest.raises(HttpFailure) as refused:
            cluster.request(cluster.leader(), "/admin/keys", "POST",
                            {"name": "bad-expiry", "send": [], "receive": [], **body})
        assert (refused.value.status, refused.value.code) == (400, "INVALID_PARAMETER")


# -- proof of possession -------------------------------------------------------------


async def test_a_conn_with_a_signed_nonce_is_accepted_on_any_node(cluster):
    key = cluster.create_key("pop-ok", ["*"], ["*"])
    for node_id in cluster.node_ids:
        client = await connect(cluster, node_id, key, secret_key=key["secret_key"])
        assert client.client_id
        await client.close()
    assert cluster.metrics("n1").get("ensync_conn_proof_failures_total", 0) == 0


async def _challenged(cluster: Cluster, node_id: str) -> tuple[Client, str]:
    client = Client(cluster.ws_url(node_id))
    await client.open()
    reply = await client.exchange("CHALLENGE")
    assert re.fullmatch(r"\+PASS:CHALLENGE;NONCE=[A-Za-z0-9+/]{43}=", reply), reply
    return client, reply.split("NONCE=", 1)[1]


def signed_conn(key: dict, nonce: str, signature: str) -> str:
    return f"CONN;ACCESS_KEY=:{key['access_key']};NONCE=:{nonce};SIGNATURE=:{signature}"


async def test_a_bad_signature_or_another_apps_signature_is_refused(cluster):
    key = cluster.create_key("pop-bad", ["*"], ["*"])
    other = cluster.create_key("pop-other", ["*"], ["*"])
    refused = []
    for signature_of in (
        lambda nonce: base64.b64encode(os.urandom(64)).decode(),
        lambda nonce: proof.sign(other["secret_key"], nonce),
        lambda nonce: "not base64!",
    ):
        client, nonce = await _challenged(cluster, "n2")
        refused.append(await client.exchange(signed_conn(key, nonce,
                                                         signature_of(nonce))))
        # The nonce is used up: the right signature now fails too.
        right = proof.sign(key["secret_key"], nonce)
        refused.append(await client.exchange(signed_conn(key, nonce, right)))
        await client.close()

    bad = "-FAIL:UNAUTHORIZED;MESSAGE=SIGNATURE does not prove the app's secret key"
    used = ("-FAIL:UNAUTHORIZED;MESSAGE=NONCE was not issued to this connection or "
            "is used up")
    assert refused == [bad, used] * 3


async def test_a_replayed_nonce_and_signature_are_refused_on_another_connection(
    cluster,
):
    key = cluster.create_key("pop-replay", ["*"], ["*"])
    first, nonce = await _challenged(cluster, "n1")
    frame = signed_conn(key, nonce, proof.sign(key["secret_key"], nonce))
    accepted = await first.exchange(frame)

    # An eavesdropper sends the same frame on its own socket, with or without a
    # nonce of its own; and the first socket cannot use it twice either.
    thief, _ = await _challenged(cluster, "n1")
    stolen = await thief.exchange(frame)
    fresh = await conn_reply(cluster, "n1", frame)
    twice = await first.exchange(frame)
    for client in (first, thief):
        await client.close()

    used = ("-FAIL:UNAUTHORIZED;MESSAGE=NONCE was not issued to this connection or "
            "is used up")
    assert accepted.startswith("+PASS:{clientId=")
    assert stolen == fresh == twice == used


async def test_a_node_that_requires_proof_refuses_a_plain_conn_and_the_sdk(
    cluster_factory,
):
    strict = cluster_factory(1, extra_flags=["--conn-proof-required"])
    key = strict.create_key("pop-required", ["*"], ["*"])
    plain = await conn_reply(strict, "n1", f"CONN;ACCESS_KEY=:{key['access_key']}")
    proven = await connect(strict, "n1", key, secret_key=key["secret_key"])
    published = await proven.publish("pop/x", key["app_id"], PAYLOAD)
    await proven.close()

    with pytest.raises(EnSyncError) as sdk_refused:
        await EnSyncEngine(strict.nodes["n1"].admin_url).create_client(
            key["access_key"], {"appSecretKey": key["secret_key"]})

    assert plain == ("-FAIL:UNAUTHORIZED;MESSAGE=this node requires proof of "
                     "possession: CHALLENGE, then CONN with NONCE and SIGNATURE")
    assert published.startswith("PUBLISHED;IDEM=")
    assert "proof of possession" in sdk_refused.value.message
    assert strict.metrics("n1")["ensync_conn_proof_failures_total"] >= 1


# -- events held per recipient --------------------------------------------------------


async def test_a_publish_beyond_the_recipients_limit_is_queue_full_and_nothing_is_lost(
    cluster,
):
    sender = cluster.create_key("full-sender", ["*"], [])
    recipient = cluster.create_key("full-recipient", ["*"], ["*"])
    publisher = await connect(cluster, "n1", sender)
    accepted = [await publisher.publish("full/x", recipient["app_id"], PAYLOAD)
                for _ in range(RECIPIENT_EVENTS_MAX)]
    with pytest.raises(ClientError) as refused:
        await publisher.publish("full/x", recipient["app_id"], PAYLOAD)

    consumer = await connect(cluster, "n2", recipient)
    await consumer.subscribe("full/x")
    delivered = []
    for _ in range(RECIPIENT_EVENTS_MAX):
        record = await consumer.next_record(RECORD_WAIT_S)
        assert record is not None
        delivered.append(record["idem"])
        await consumer.ack(record["idem"], record["block"], "full/x")
    later = await publisher.publish("full/x", recipient["app_id"], PAYLOAD)
    record = await consumer.next_record(RECORD_WAIT_S)
    for client in (publisher, consumer):
        await client.close()

    assert refused.value.code == "QUEUE_FULL"
    # Only "full": a sender learns nothing of the recipient's backlog or limit.
    assert refused.value.message == "the recipient's queue is full"
    assert delivered == [re.search(r"IDEM=([^;]+)", r)[1] for r in accepted]
    assert record is not None and record["idem"] in later
    assert cluster.metrics("n1")["ensync_queue_full_rejected_total"] == 1


# -- misses share one Raft barrier ---------------------------------------------------


async def test_unknown_recipients_in_a_burst_share_raft_barriers(cluster):
    key = cluster.create_key("misses", ["*"], ["*"])
    client = await connect(cluster, "n3", key)
    nobody = base64.b64encode(b"\x02" * 32).decode()
    before = cluster.metrics("n3").get("ensync_fresh_read_barriers_total", 0)
    replies = await asyncio.gather(*(client.send(
        f"PUB;CLIENT_ID=:{client.client_id};EVENT_NAME=:m/x;PAYLOAD=:{PAYLOAD};"
        f"DELIVERY_TO=:{nobody}", whole=True) for _ in range(200)))
    await client.close()
    barriers = cluster.metrics("n3")["ensync_fresh_read_barriers_total"] - before

    assert set(replies) == {
        "-FAIL:INVALID_RECIPIENT;MESSAGE=DELIVERY_TO names no known app"}
    print(f"200 misses took {barriers:.0f} barriers")
    assert barriers < 100


# -- unanswered requests per connection -----------------------------------------------


async def test_a_client_past_its_unanswered_request_limit_is_paused_not_refused(
    cluster,
):
    key = cluster.create_key("pipeline", ["*"], ["*"])
    client = await connect(cluster, "n2", key)
    cid = client.client_id
    frames = [f"{verb};CLIENT_ID=:{cid};EVENT_NAME=:pipe/x"
              for _ in range(PIPELINED_REQUESTS // 2) for verb in ("SUB", "UNSUB")]
    replies = await asyncio.gather(*(client.send(f, whole=True) for f in frames))
    await client.close()

    expected = [f"+PASS:SUBSCRIBED;EVENT_NAME=pipe/x",
                f"+PASS:UNSUBSCRIBED;EVENT_NAME=pipe/x;CLIENT_ID={cid}"]
    assert replies == expected * (PIPELINED_REQUESTS // 2)
    assert cluster.metrics("n2")["ensync_pending_requests_pauses_total"] >= 1
