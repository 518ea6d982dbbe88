"""Hand-off on disconnect, and bounded failure without a quorum."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from node.client import Client, ClientError

PAYLOAD = base64.b64encode(b'{"n": 1}').decode()


async def _client(cluster, node_id: str, key: dict) -> Client:
    client = Client(cluster.ws_url(node_id))
    await client.connect(key["access_key"])
    return client


async def test_unacked_record_moves_to_another_session_within_2_s(cluster_factory):
    cluster = cluster_factory(3)
    pub_key = cluster.create_key("ho-publisher", ["*"], [])
    con_key = cluster.create_key("ho-consumer", [], ["*"])
    first = await _client(cluster, "n2", con_key)
    second = await _client(cluster, "n3", con_key)
    publisher = await _client(cluster, "n1", pub_key)
    try:
        await first.subscribe("task/x")
        reply = await publisher.publish("task/x", con_key["app_id"], PAYLOAD)
        idem = reply.split("IDEM=")[1].split(";")[0]
        record = await asyncio.wait_for(first.records.get(), 10)
        assert record["idem"] == idem

        await second.subscribe("task/x")
        assert second.records.empty()
        closed_at = time.monotonic()
        await first.close()
        moved = await asyncio.wait_for(second.records.get(), 5)
        assert moved["idem"] == idem
        assert time.monotonic() - closed_at < 2.0
        assert await second.ack(moved["idem"], moved["block"]) == f"ACKNOWLEDGED;IDEM={idem}"
    finally:
        for client in (second, publisher):
            await client.close()


async def test_a_write_without_quorum_fails_unavailable_in_bounded_time(cluster_factory):
    write_timeout_ms = 2000
    cluster = cluster_factory(3, extra_flags=["--write-timeout-ms", str(write_timeout_ms)])
    key = cluster.create_key("nq-publisher", ["*"], ["*"])
    leader = cluster.leader()
    survivor = next(n for n in cluster.node_ids if n != leader)
    client = await _client(cluster, survivor, key)
    try:
        for node_id in cluster.node_ids:
            if node_id != survivor:
                cluster.kill(node_id)

        started = time.monotonic()
        first = client.publish("a/b", key["app_id"], PAYLOAD)
        second = client.send("FOO;CLIENT_ID=:x")  # answered only after the PUB
        with pytest.raises(ClientError) as failure:
            await first
        elapsed_s = time.monotonic() - started
        assert failure.value.code == "UNAVAILABLE"
        assert elapsed_s < write_timeout_ms / 1000 + 1.5
        with pytest.raises(ClientError) as unknown:
            await second
        assert unknown.value.code == "UNKNOWN_COMMAND"
    finally:
        await client.close()


async def test_the_server_pings_and_takes_pong_without_replying(cluster_factory):
    cluster = cluster_factory(1, extra_flags=["--ping-interval-ms", "300"])
    key = cluster.create_key("ping-client", ["*"], ["*"])
    client = Client(cluster.ws_url("n1"))
    pings = []
    original = client._on_frame

    def watch(text):
        if text == "PING":
            pings.append(text)
        original(text)

    client._on_frame = watch
    await client.connect(key["access_key"])
    try:
        deadline = time.monotonic() + 5
        while len(pings) < 2:
            assert time.monotonic() < deadline, "no PING from the server"
            await asyncio.sleep(0.05)
        # PONGs went out; the next reply still pairs with the next request.
        assert (await client.subscribe("a/b")) == "SUBSCRIBED;EVENT_NAME=a/b"
    finally:
        await client.close()


async def test_our_client_fails_a_request_on_a_closed_socket_at_once(cluster_factory):
    cluster = cluster_factory(1)
    key = cluster.create_key("closed-client", ["*"], ["*"])
    client = Client(cluster.ws_url("n1"))
    await client.connect(key["access_key"])
    await client.close()

    started = time.monotonic()
    with pytest.raises(ClientError) as failure:
        await asyncio.wait_for(client.subscribe("a/b"), 5)
    assert failure.value.code == "DISCONNECTED"
    assert time.monotonic() - started < 1
