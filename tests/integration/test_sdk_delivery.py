"""The unmodified SDK publishes through one node and consumes through a follower."""

from __future__ import annotations

import base64

import pytest
from nacl.signing import SigningKey

from tests import sdk

EVENTS_COUNT = 200


def _follower_other_than(cluster, *excluded: str) -> str:
    leader = cluster.leader()
    for node_id in reversed(cluster.node_ids):
        if node_id != leader and node_id not in excluded:
            return node_id
    raise AssertionError("no follower to pick")


async def test_200_events_reach_a_consumer_on_a_follower_in_order(cluster):
    publisher = cluster.create_key("it-publisher", ["order/*"], [])
    consumer = cluster.create_key("it-consumer", [], ["order/*"])
    consumer_node = _follower_other_than(cluster, "n1")
    assert cluster.status(consumer_node)["role"] == "follower"

    sub_client = await sdk.connect(cluster.ws_url(consumer_node), consumer)
    pub_client = await sdk.connect(cluster.ws_url("n1"), publisher)
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, "order/created")
        replies = []
        for i in range(EVENTS_COUNT):
            replies.append(await pub_client.publish(
                "order/created", [consumer["app_id"]], {"seq": i}, {"source": "it"}))
        assert all(r.startswith("+PASS:PUBLISHED;IDEM=") for r in replies)

        got = await sdk.receive_and_ack(ws_sub, inbox, EVENTS_COUNT, timeout_s=60)
        assert [m["payload"]["seq"] for m in got] == list(range(EVENTS_COUNT))
        assert {m["sender"] for m in got} == {publisher["app_id"]}
        assert all(m["metadata"] == {"source": "it"} for m in got)
        assert inbox.empty()
    finally:
        await pub_client.close()
        await sub_client.close()


async def test_a_publish_to_an_unknown_app_fails_with_invalid_recipient(cluster):
    # It may receive too: the second publish goes to itself.
    publisher = cluster.create_key("it-publisher-2", ["*"], ["*"])
    client = await sdk.connect(cluster.ws_url("n2"), publisher)
    try:
        stranger = SigningKey.generate().verify_key
        nobody = base64.b64encode(bytes(stranger)).decode()
        with pytest.raises(Exception, match="INVALID_RECIPIENT"):
            await client.publish("order/created", [nobody], {"x": 1})
        # The connection still pairs replies correctly afterwards.
        reply = await client.publish("order/created", [publisher["app_id"]], {"x": 2})
        assert reply.startswith("+PASS:PUBLISHED")
    finally:
        await client.close()
