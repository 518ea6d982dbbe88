"""Every delivery command made by the unmodified ensync-sdk-ws 0.4.3, on a real cluster.

test_delivery_commands.py drives these commands with our own client; here the SDK
makes each call, using the workarounds of spec section 9: handlers only queue the
message, SUB is sent by ``_ensure_subscription()``, every SDK call comes from the
test coroutine, ``defer()``/``discard()`` raising the ``get_message_loop`` error
means the server replied +PASS, and replay goes through the WebSocketSubscription.

The publisher is connected to n1, consumers to n2 (a second one to n3). Each
consumer logs the frames it sends and receives, so a test can check what was on
the wire, e.g. the record's ``attempt``, which the SDK leaves out of the message.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from ensync_core import EnSyncError

from tests import sdk
from tests.cluster import Cluster

ACK_TIMEOUT_MS = 2000
ACK_TIMEOUT_S = ACK_TIMEOUT_MS / 1000
EVENT = "job/run"
PUBLISHER_NODE, CONSUMER_NODE, OTHER_CONSUMER_NODE = "n1", "n2", "n3"
RECORD_WAIT_S = 10.0
CLOCK_SLACK_S = 0.05
UNKNOWN_IDEM = "evt-0000-0000ffffffff"


@pytest.fixture(scope="module")
def sdk_cluster(request, tmp_path_factory) -> Cluster:
    cluster = Cluster(3, base_dir=tmp_path_factory.mktemp("sdk-commands"),
                      extra_flags=["--ack-timeout-ms", str(ACK_TIMEOUT_MS)])
    request.addfinalizer(cluster.stop)
    return cluster.start()


@dataclass
class Consumer:
    client: Any
    sub: Any      # the SubscriptionDecorator
    ws_sub: Any   # the WebSocketSubscription from _ensure_subscription()
    inbox: asyncio.Queue
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)

    @property
    def client_id(self) -> str:
        return self.client._EnSyncEngine__config["clientId"]

    def pushes(self, idem: str) -> list[dict]:
        """Raw records of ``idem`` pushed to this connection, in arrival order."""
        records = [json.loads(frame[len("+RECORD:"):]) for frame in self.received
                   if frame.startswith("+RECORD:")]
        return [record for record in records if record["idem"] == idem]


class Apps:
    """A fresh publisher app and consumer app per test; closes what it opened."""

    def __init__(self, cluster: Cluster, tag: str) -> None:
        self.cluster = cluster
        self.pub_key = cluster.create_key(f"p-{tag}", ["*"], [])
        self.con_key = cluster.create_key(f"c-{tag}", [], ["*"])
        self.publisher = None
        self.clients: list[Any] = []

    async def start(self) -> Apps:
        self.publisher = await sdk.connect(self.cluster.ws_url(PUBLISHER_NODE),
                                           self.pub_key)
        self.clients.append(self.publisher)
        return self

    async def consumer(self, node_id: str = CONSUMER_NODE) -> Consumer:
        client = await sdk.connect(self.cluster.ws_url(node_id), self.con_key)
        self.clients.append(client)
        inbox: asyncio.Queue = asyncio.Queue()
        consumer = Consumer(client, None, None, inbox)
        _log_frames(client, consumer.sent, consumer.received)

        sub = client.subscribe(EVENT, auto_ack=False)

        @sub.handler
        async def _collect(message):
            inbox.put_nowait(message)

        consumer.sub = sub
        consumer.ws_sub = await sub._ensure_subscription()
        return consumer

    async def publish(self, payload: dict, metadata: dict | None = None) -> str:
        reply = await self.publisher.publish(EVENT, [self.con_key["app_id"]],
                                             payload, metadata)
        assert reply.startswith("+PASS:PUBLISHED;IDEM="), reply
        return reply.split("IDEM=")[1].split(";")[0]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _log_frames(client, sent: list[str], received: list[str]) -> None:
    """Record every frame the SDK sends or reads, without changing what it does."""
    send, handle = client._ws.send, client._handle_message

    async def logged_send(frame):
        sent.append(frame)
        return await send(frame)

    async def logged_handle(frame):
        received.append(frame)
        return await handle(frame)

    client._ws.send = logged_send
    client._handle_message = logged_handle


@pytest.fixture
async def apps(sdk_cluster, request):
    opened = await Apps(sdk_cluster, request.node.name[:40]).start()
    try:
        yield opened
    finally:
        await opened.close()


async def next_message(inbox: asyncio.Queue, timeout_s: float = RECORD_WAIT_S) -> dict:
    return await asyncio.wait_for(inbox.get(), timeout_s)


async def nothing_arrives(inbox: asyncio.Queue, for_s: float) -> bool:
    try:
        message = await asyncio.wait_for(inbox.get(), for_s)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message {message['idem']}")


def trace(cluster: Cluster, idem: str, node_id: str = CONSUMER_NODE) -> dict:
    return cluster.request(node_id, f"/admin/trace/{idem}")


def whats(trace_body: dict) -> list[str]:
    return [row["what"] for row in trace_body["history"]]


async def test_ack_confirms_and_the_event_does_not_come_back(apps, sdk_cluster):
    con = await apps.consumer()
    idem = await apps.publish({"orderId": "o1"}, {"source": "t"})

    message = await next_message(con.inbox)
    assert message["idem"] == idem and message["messageName"] == EVENT
    assert message["payload"] == {"orderId": "o1"}
    assert message["metadata"] == {"source": "t"}
    assert message["sender"] == apps.pub_key["app_id"]

    reply = await con.ws_sub.ack(idem, message["block"])
    assert reply == f"+PASS:ACKNOWLEDGED;IDEM={idem}"
    assert con.sent[-1] == (f"ACK;CLIENT_ID=:{con.client_id};EVENT_IDEM=:{idem};"
                            f"BLOCK=:{message['block']};EVENT_NAME=:{EVENT}")
    assert await nothing_arrives(con.inbox, ACK_TIMEOUT_S + 1.0)

    with pytest.raises(EnSyncError, match="NOT_FOUND"):
        await con.ws_sub.ack(idem, message["block"])
    assert trace(sdk_cluster, idem)["state"] == "acked"
    assert len(con.pushes(idem)) == 1


async def test_rollback_sends_the_same_event_again_with_attempt_2(apps, sdk_cluster):
    con = await apps.consumer()
    first = await apps.publish({"n": 1})
    second = await apps.publish({"n": 2})

    message = await next_message(con.inbox)
    assert message["idem"] == first
    reply = await con.ws_sub.rollback(first, message["block"])
    assert reply == f"+PASS:ROLLED_BACK;IDEM={first}"

    # A rolled-back event keeps its rank: it comes back before `second`.
    again = await next_message(con.inbox, ACK_TIMEOUT_S + 3)
    assert again["idem"] == first and again["payload"] == {"n": 1}
    # The SDK drops `attempt` from the message it hands over; the frame has it.
    assert again.get("attempt", 2) == 2
    assert [r["attempt"] for r in con.pushes(first)] == [1, 2]
    history = whats(trace(sdk_cluster, first))
    assert "rolled back" in history and "timed out" not in history

    await con.ws_sub.ack(first, again["block"])
    [got] = await sdk.receive_and_ack(con.ws_sub, con.inbox, 1, RECORD_WAIT_S)
    assert got["idem"] == second


async def test_defer_returns_the_event_after_the_delay(apps, sdk_cluster):
    con = await apps.consumer()
    deferred = await apps.publish({"n": 1})
    queued = await apps.publish({"n": 2})
    message = await next_message(con.inbox)
    assert message["idem"] == deferred

    # Under 1000 ms the SDK refuses locally and sends nothing.
    frames_before = len(con.sent)
    with pytest.raises(EnSyncError) as refused:
        await con.ws_sub.defer(deferred, 500)
    assert refused.value.error_type == "EnSyncValidationError"
    assert len(con.sent) == frames_before
    assert trace(sdk_cluster, deferred)["state"] == "inflight"

    # The SDK raises after the server's +PASS (spec 9.6): that means it worked.
    started = time.monotonic()
    with pytest.raises(EnSyncError, match="get_message_loop") as done:
        await con.ws_sub.defer(deferred, 1000, "r")
    assert done.value.error_type == "EnSyncDeferError"
    assert con.sent[-1] == (f"DEFER;CLIENT_ID=:{con.client_id};EVENT_IDEM=:{deferred};"
                            f"EVENT_NAME=:{EVENT};DELAY=:1000;REASON=:r")
    assert any(f.startswith(f"+PASS:DEFERRED;IDEM={deferred};DELIVERY_TIME=")
               for f in con.received)

    # The slot is free at once, so the queued event comes first.
    [got] = await sdk.receive_and_ack(con.ws_sub, con.inbox, 1, RECORD_WAIT_S)
    assert got["idem"] == queued

    again = await next_message(con.inbox, 1.0 + 5)
    waited_s = time.monotonic() - started
    assert again["idem"] == deferred
    assert waited_s >= 1.0 - CLOCK_SLACK_S, f"came back after {waited_s:.3f} s"
    assert [r["attempt"] for r in con.pushes(deferred)] == [1, 2]
    assert {"deferred", "released"} <= set(whats(trace(sdk_cluster, deferred)))
    assert await con.ws_sub.ack(deferred, again["block"]) == (
        f"+PASS:ACKNOWLEDGED;IDEM={deferred}")


async def test_discard_is_final(apps, sdk_cluster):
    con = await apps.consumer()
    idem = await apps.publish({"n": 1})
    await next_message(con.inbox)

    with pytest.raises(EnSyncError, match="get_message_loop") as done:
        await con.ws_sub.discard(idem, "bad")
    assert done.value.error_type == "EnSyncDiscardError"
    assert con.sent[-1] == (f"DISCARD;CLIENT_ID=:{con.client_id};EVENT_IDEM=:{idem};"
                            f"EVENT_NAME=:{EVENT};REASON=:bad")
    assert f"+PASS:DISCARDED;IDEM={idem}" in con.received

    assert await nothing_arrives(con.inbox, ACK_TIMEOUT_S + 1.5)
    assert len(con.pushes(idem)) == 1
    body = trace(sdk_cluster, idem)
    assert body["state"] == "discarded" and whats(body)[-1] == "discarded"

    # A server failure is a plain EnSyncError with the code first (spec 11).
    with pytest.raises(EnSyncError) as failed:
        await con.ws_sub.discard(UNKNOWN_IDEM, "bad")
    assert failed.value.error_type == "EnSyncError"
    assert failed.value.message.startswith("NOT_FOUND")


async def test_replay_after_ack_returns_the_decrypted_event(apps, sdk_cluster):
    con = await apps.consumer()
    idem = await apps.publish({"orderId": "o7"}, {"source": "t"})
    [message] = await sdk.receive_and_ack(con.ws_sub, con.inbox, 1, RECORD_WAIT_S)
    assert message["idem"] == idem

    replayed = await con.ws_sub.replay(idem)
    assert con.sent[-1] == (f"REPLAY;CLIENT_ID=:{con.client_id};EVENT_IDEM=:{idem};"
                            f"EVENT_NAME=:{EVENT}")
    assert replayed["idem"] == idem and replayed["messageName"] == EVENT
    assert replayed["payload"] == {"orderId": "o7"}
    assert replayed["sender"] == apps.pub_key["app_id"]
    assert replayed["metadata"]["source"] == "t"
    info = replayed["metadata"]["$internal"]["replay_info"]
    assert info["isReplayed"] is True and info["wasAcknowledged"] is True

    # Replay pushes nothing and requeues nothing.
    assert await nothing_arrives(con.inbox, 1.0)
    assert len(con.pushes(idem)) == 1
    assert trace(sdk_cluster, idem)["state"] == "acked"

    with pytest.raises(EnSyncError, match="NOT_FOUND"):
        await con.ws_sub.replay(UNKNOWN_IDEM)


async def test_pause_holds_pushes_and_resume_delivers_in_order(apps):
    con = await apps.consumer()
    paused = await con.sub.pause("m")
    assert paused["status"] == "success" and paused["action"] == "paused"
    assert con.sent[-1] == f"PAUSE;CLIENT_ID=:{con.client_id};EVENT_NAME=:{EVENT};REASON=:m"
    assert f"+PASS:PAUSED;EVENT_NAME={EVENT}" in con.received
    with pytest.raises(EnSyncError, match="ALREADY_PAUSED"):
        await con.ws_sub.pause("again")

    idems = [await apps.publish({"n": n}) for n in range(2)]
    assert await nothing_arrives(con.inbox, 1.5)

    resumed = await con.sub.resume()
    assert resumed["status"] == "success" and resumed["action"] == "continued"
    assert con.sent[-1] == f"CONTINUE;CLIENT_ID=:{con.client_id};EVENT_NAME=:{EVENT}"
    got = await sdk.receive_and_ack(con.ws_sub, con.inbox, 2, RECORD_WAIT_S)
    assert [m["idem"] for m in got] == idems
    with pytest.raises(EnSyncError, match="NOT_PAUSED"):
        await con.ws_sub.resume()


async def test_unsubscribe_hands_the_record_in_flight_to_another_consumer(
        apps, sdk_cluster):
    first = await apps.consumer(CONSUMER_NODE)
    idem = await apps.publish({"n": 1})
    message = await next_message(first.inbox)
    assert message["idem"] == idem
    second = await apps.consumer(OTHER_CONSUMER_NODE)

    assert await first.ws_sub.unsubscribe() is None
    assert first.sent[-1] == f"UNSUB;CLIENT_ID=:{first.client_id};EVENT_NAME=:{EVENT}"
    assert (f"+PASS:UNSUBSCRIBED;EVENT_NAME={EVENT};CLIENT_ID={first.client_id}"
            in first.received)

    # Returned by the UNSUB itself, well before the ack timeout would.
    handed = await next_message(second.inbox, ACK_TIMEOUT_S)
    assert handed["idem"] == idem and handed["payload"] == {"n": 1}
    history = whats(trace(sdk_cluster, idem, OTHER_CONSUMER_NODE))
    assert "returned" in history and "timed out" not in history
    assert await second.ws_sub.ack(idem, handed["block"]) == (
        f"+PASS:ACKNOWLEDGED;IDEM={idem}")

    assert len(first.pushes(idem)) == 1
    with pytest.raises(EnSyncError, match="NOT_FOUND"):
        await first.ws_sub.unsubscribe()
