"""Every delivery command on a real 3-node cluster, through our pipelined client.

The SDK's own defer() and discard() raise after a successful +PASS (spec 9.6), so
these tests speak the protocol with node/client.py; test_sdk_delivery.py covers
the SDK paths that work.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from node.client import Client, ClientError
from tests.cluster import Cluster

ACK_TIMEOUT_MS = 1500
DELIVERY_LIMIT = 3
RECORD_WAIT_S = 10


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def delivery_cluster(request, tmp_path_factory) -> Cluster:
    cluster = Cluster(3, base_dir=tmp_path_factory.mktemp("delivery"), extra_flags=[
        "--ack-timeout-ms", str(ACK_TIMEOUT_MS),
        "--delivery-limit", str(DELIVERY_LIMIT)])
    request.addfinalizer(cluster.stop)
    return cluster.start()


@pytest.fixture
async def pair(delivery_cluster, request):
    """A fresh publisher and consumer app each test, connected to different nodes."""
    name = request.node.name[:40]
    pub_key = delivery_cluster.create_key(f"p-{name}", ["*"], ["*"])
    con_key = delivery_cluster.create_key(f"c-{name}", ["*"], ["*"])
    publisher, consumer = Client(delivery_cluster.ws_url("n1")), Client(
        delivery_cluster.ws_url("n2"))
    await publisher.connect(pub_key["access_key"])
    await consumer.connect(con_key["access_key"])
    yield publisher, consumer, con_key, pub_key
    await publisher.close()
    await consumer.close()


async def publish(client, to, text, name="job/run", metadata=None) -> str:
    reply = await client.publish(name, to["app_id"], b64(text), metadata)
    return reply.split("IDEM=")[1].split(";")[0]


async def next_record(client, timeout_s=RECORD_WAIT_S) -> dict:
    return await asyncio.wait_for(client.records.get(), timeout_s)


async def nothing_pushed(client, for_s: float) -> bool:
    try:
        await asyncio.wait_for(client.records.get(), for_s)
    except asyncio.TimeoutError:
        return True
    return False


def text(record) -> str:
    return base64.b64decode(record["payload"]).decode()


async def test_defer_returns_the_event_after_the_delay_with_delivery_time(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    idem = await publish(publisher, to, "e1")
    record = await next_record(consumer)

    before_ms = time.time() * 1000
    reply = await consumer.send(f"DEFER;CLIENT_ID=:{consumer.client_id};"
                                f"EVENT_IDEM=:{idem};DELAY=:1000;REASON=:later")
    due_ms = int(reply.split("DELIVERY_TIME=")[1])
    assert reply.startswith(f"DEFERRED;IDEM={idem};")
    assert before_ms + 900 <= due_ms <= before_ms + 3000

    again = await next_record(consumer)
    assert again["idem"] == record["idem"] and again["attempt"] == 2
    assert time.time() * 1000 >= due_ms - 50


async def test_deferred_events_come_back_by_priority_then_commit_order(
        pair, delivery_cluster):
    publisher, consumer, to, _ = pair
    idems = [await publish(publisher, to, f"e{i}") for i in range(4)]
    await consumer.subscribe("job/run")
    due_ms = 0
    for idem, priority in zip(idems, (1, 5, 3, 5)):
        record = await next_record(consumer)
        assert record["idem"] == idem
        reply = await consumer.send(
            f"DEFER;CLIENT_ID=:{consumer.client_id};EVENT_IDEM=:{idem}"
            f";DELAY=:1000;PRIORITY=:{priority}")
        due_ms = max(due_ms, int(reply.split("DELIVERY_TIME=")[1]))
    await consumer.close()  # nobody holds a slot while they come due

    # Released within 500 ms of being due: then one consumer sees the order.
    await asyncio.sleep(max(0.0, due_ms / 1000 + 0.5 - time.time()))
    late = Client(delivery_cluster.ws_url("n3"))
    await late.connect(to["access_key"])
    try:
        await late.subscribe("job/run")
        order = []
        for _ in idems:
            record = await next_record(late)
            order.append(record["idem"])
            await late.ack(record["idem"], record["block"])
    finally:
        await late.close()
    assert order == [idems[1], idems[3], idems[2], idems[0]]


async def test_discard_is_final_and_replay_still_finds_the_event(pair):
    publisher, consumer, to, pub_key = pair
    await consumer.subscribe("job/run")
    idem = await publish(publisher, to, "bad")
    await next_record(consumer)

    reply = await consumer.send(f"DISCARD;CLIENT_ID=:{consumer.client_id};"
                                f"EVENT_IDEM=:{idem};REASON=:")
    assert reply == f"DISCARDED;IDEM={idem}"
    assert await nothing_pushed(consumer, ACK_TIMEOUT_MS / 1000 + 1)

    replayed = await consumer.send(f"REPLAY;CLIENT_ID=:{consumer.client_id};"
                                   f"EVENT_IDEM=:{idem};EVENT_NAME=:job/run")
    assert replayed.startswith("{") and idem in replayed
    assert '"wasAcknowledged":false' in replayed


async def test_replay_of_another_apps_event_is_not_found(pair, delivery_cluster):
    publisher, consumer, to, _ = pair
    idem = await publish(publisher, to, "private")
    stranger_key = delivery_cluster.create_key("stranger-replay", ["*"], ["*"])
    stranger = Client(delivery_cluster.ws_url("n3"))
    await stranger.connect(stranger_key["access_key"])
    try:
        with pytest.raises(ClientError) as failure:
            await stranger.send(f"REPLAY;CLIENT_ID=:{stranger.client_id};"
                                f"EVENT_IDEM=:{idem};EVENT_NAME=:job/run")
        assert failure.value.code == "NOT_FOUND"
    finally:
        await stranger.close()


async def test_rollback_returns_the_event_at_once_with_a_higher_attempt(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    first = await publish(publisher, to, "a")
    await publish(publisher, to, "b")
    record = await next_record(consumer)
    assert record["idem"] == first and record["attempt"] == 1

    assert await consumer.send(f"ROLLBACK;CLIENT_ID=:{consumer.client_id};"
                               f"EVENT_IDEM=:{first};BLOCK=:1") == f"ROLLED_BACK;IDEM={first}"
    again = await next_record(consumer, timeout_s=3)
    assert again["idem"] == first and again["attempt"] == 2


async def test_ack_timeout_redelivers_and_the_limit_dead_letters(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    idem = await publish(publisher, to, "poison")
    attempts = []
    for _ in range(DELIVERY_LIMIT):
        record = await next_record(consumer, timeout_s=ACK_TIMEOUT_MS / 1000 + 5)
        assert record["idem"] == idem
        attempts.append(record["attempt"])
    assert attempts == list(range(1, DELIVERY_LIMIT + 1))
    assert await nothing_pushed(consumer, ACK_TIMEOUT_MS / 1000 + 1.5)


async def test_pause_holds_pushes_and_continue_resumes_in_order(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    pause = f"PAUSE;CLIENT_ID=:{consumer.client_id};EVENT_NAME=:job/run;REASON=:m"
    assert await consumer.send(pause) == "PAUSED;EVENT_NAME=job/run"
    with pytest.raises(ClientError, match="ALREADY_PAUSED"):
        await consumer.send(pause)
    idems = [await publish(publisher, to, f"p{i}") for i in range(3)]
    assert await nothing_pushed(consumer, 1.0)

    resume = f"CONTINUE;CLIENT_ID=:{consumer.client_id};EVENT_NAME=:job/run"
    assert await consumer.send(resume) == "CONTINUED;EVENT_NAME=job/run"
    with pytest.raises(ClientError, match="NOT_PAUSED"):
        await consumer.send(resume)
    got = []
    for _ in idems:
        record = await next_record(consumer)
        got.append(record["idem"])
        await consumer.ack(record["idem"], record["block"])
    assert got == idems


async def test_an_idempotency_key_repeat_returns_the_first_idem(pair):
    publisher, consumer, to, _ = pair
    meta = {"idempotency_key": "order-42"}
    first = await publish(publisher, to, "once", metadata=meta)
    second = await publish(publisher, to, "once", metadata=meta)
    assert first == second

    await consumer.subscribe("job/run")
    record = await next_record(consumer)
    await consumer.ack(record["idem"], record["block"])
    assert await nothing_pushed(consumer, 1.0)


async def test_a_scheduled_event_is_not_delivered_before_its_time(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    at_ms = int(time.time() * 1000) + 1500
    idem = await publish(publisher, to, "later", metadata={"deliver_at_ms": at_ms})
    record = await next_record(consumer, timeout_s=6)
    assert record["idem"] == idem
    assert time.time() * 1000 >= at_ms - 50


async def test_wildcard_subscription_gets_the_real_event_name(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/*")
    await publish(publisher, to, "w", name="job/deep/er")
    record = await next_record(consumer)
    assert record["name"] == "job/deep/er"


async def test_a_subscription_can_choose_its_own_ack_timeout(pair):
    publisher, consumer, to, _ = pair
    reply = await consumer.send(f"SUB;CLIENT_ID=:{consumer.client_id};"
                                f"EVENT_NAME=:job/run;ACK_TIMEOUT_MS=:30000")
    assert reply == "SUBSCRIBED;EVENT_NAME=job/run"
    idem = await publish(publisher, to, "slow")
    record = await next_record(consumer)
    assert record["idem"] == idem

    # The cluster's default (1.5 s) would have redelivered by now.
    assert await nothing_pushed(consumer, ACK_TIMEOUT_MS / 1000 + 1.5)
    await consumer.ack(record["idem"], record["block"])

    with pytest.raises(ClientError, match="INVALID_PARAMETER"):
        await consumer.send(f"SUB;CLIENT_ID=:{consumer.client_id};"
                            f"EVENT_NAME=:job/x;ACK_TIMEOUT_MS=:5")


async def test_nothing_is_pushed_after_paused_even_right_after_sub(pair):
    publisher, consumer, to, _ = pair
    idem = await publish(publisher, to, "queued")
    frames = []
    original = consumer._on_frame

    def log_frame(text):
        frames.append(text)
        original(text)

    consumer._on_frame = log_frame
    sub = consumer.subscribe("job/run")
    await asyncio.sleep(0.03)  # PAUSE while the record is held after SUB
    paused = await consumer.send(f"PAUSE;CLIENT_ID=:{consumer.client_id};"
                                 f"EVENT_NAME=:job/run")
    await sub
    assert paused == "PAUSED;EVENT_NAME=job/run"
    assert await nothing_pushed(consumer, 0.5) or True  # drain what came before
    pause_at = next(i for i, f in enumerate(frames) if f.startswith("+PASS:PAUSED"))
    assert not any(f.startswith("+RECORD:") for f in frames[pause_at:]), frames
    assert idem


async def test_an_ack_naming_an_old_attempt_is_refused(pair):
    publisher, consumer, to, _ = pair
    await consumer.subscribe("job/run")
    idem = await publish(publisher, to, "twice")
    first = await next_record(consumer)
    second = await next_record(consumer, timeout_s=ACK_TIMEOUT_MS / 1000 + 5)
    assert (first["attempt"], second["attempt"]) == (1, 2)

    with pytest.raises(ClientError, match="NOT_FOUND"):
        await consumer.send(f"ACK;CLIENT_ID=:{consumer.client_id};EVENT_IDEM=:{idem};"
                            f"BLOCK=:{first['block']};ATTEMPT=:1")
    assert await consumer.send(
        f"ACK;CLIENT_ID=:{consumer.client_id};EVENT_IDEM=:{idem};"
        f"BLOCK=:{second['block']};ATTEMPT=:2") == f"ACKNOWLEDGED;IDEM={idem}"
