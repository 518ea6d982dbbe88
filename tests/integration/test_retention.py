"""Retention: undelivered events wait, then expire; finished ones are compacted."""

from __future__ import annotations

import asyncio
import base64

from node.client import Client, ClientError

RETENTION_MS = 3000


def idem_of(reply: str) -> str:
    return reply.split("IDEM=")[1].split(";")[0]


def trace_whats(cluster, node_id, idem):
    try:
        return [row["what"] for row in cluster.request(node_id, f"/admin/trace/{idem}")
                ["history"]]
    except Exception:  # 404 once the history is forgotten
        return None


async def test_events_wait_for_a_subscriber_then_expire_then_are_forgotten(
        cluster_factory):
    cluster = cluster_factory(3, extra_flags=[
        "--retention-ms", str(RETENTION_MS), "--finished-retention-ms", "500",
        "--history-retention-ms", "2500"])
    key = cluster.create_key("ret-app", ["*"], ["*"])
    publisher = Client(cluster.ws_url("n1"))
    await publisher.connect(key["access_key"])
    payload = base64.b64encode(b'{"a": 1}').decode()
    try:
        waiting = idem_of(await publisher.publish("r/x", key["app_id"], payload))
        expiring = idem_of(await publisher.publish("r/y", key["app_id"], payload))

        # Within the retention, a late subscriber still gets its event.
        consumer = Client(cluster.ws_url("n2"))
        await consumer.connect(key["access_key"])
        await consumer.subscribe("r/x")
        record = await asyncio.wait_for(consumer.records.get(), 10)
        assert record["idem"] == waiting
        await consumer.ack(record["idem"], record["block"])

        # Nobody subscribes to r/y: it expires, its record is compacted (REPLAY
        # finds nothing), then its audit trail is forgotten.
        cluster.wait_for(lambda: "expired" in (trace_whats(cluster, "n3", expiring)
                                               or []), 15, "r/y to expire")
        await consumer.subscribe("r/y")
        replay = (f"REPLAY;CLIENT_ID=:{consumer.client_id};EVENT_IDEM=:{expiring};"
                  f"EVENT_NAME=:r/y")
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                await consumer.send(replay)
            except ClientError as failure:
                assert failure.code == "NOT_FOUND"
                break
            assert asyncio.get_running_loop().time() < deadline, "never compacted"
            await asyncio.sleep(0.2)
        cluster.wait_for(lambda: trace_whats(cluster, "n2", expiring) is None, 15,
                         "the history to be forgotten")
        assert consumer.records.empty()
        await consumer.close()
    finally:
        await publisher.close()
