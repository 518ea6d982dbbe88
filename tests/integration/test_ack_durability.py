"""An ack the server confirmed with +PASS is never undone by a crash.

A consumer on a follower receives and acks events through the unmodified SDK,
each ack answered +PASS. Then nodes are killed with SIGKILL: first the leader
alone, then, on another cluster, all three at once (data dirs kept). After the
restart every node's trace of every acked event still ends in ``acked``, and a
new connection of the same app, subscribed on a surviving node, receives exactly
the events published afterwards and none of the acked ones, even after waiting
past the ack timeout, which is when a wrongly in-flight event would come back.
"""

from __future__ import annotations

import asyncio
import time

from tests import sdk
from tests.cluster import Cluster

ACK_TIMEOUT_MS = 2000
ACK_TIMEOUT_S = ACK_TIMEOUT_MS / 1000
EVENT = "job/run"
ACKED_COUNT = 50
LATER_COUNT = 5
RECEIVE_TIMEOUT_S = 60.0
QUIET_S = ACK_TIMEOUT_S + 2.0
CATCH_UP_TIMEOUT_S = 30.0


def _start(cluster_factory) -> tuple[Cluster, dict, dict]:
    cluster = cluster_factory(3, extra_flags=["--ack-timeout-ms", str(ACK_TIMEOUT_MS)])
    publisher = cluster.create_key("dur-publisher", ["job/*"], [])
    consumer = cluster.create_key("dur-consumer", [], ["job/*"])
    return cluster, publisher, consumer


async def _publish(client, to_app: str, first_seq: int, count: int) -> list[str]:
    idems = []
    for seq in range(first_seq, first_seq + count):
        reply = await client.publish(EVENT, [to_app], {"seq": seq})
        assert reply.startswith("+PASS:PUBLISHED;IDEM="), reply
        idems.append(reply.split("IDEM=")[1].split(";")[0])
    return idems


async def _ack_all(cluster, pub_node: str, con_node: str, publisher: dict,
                   consumer: dict) -> tuple[list[str], list]:
    """Publish and ack ACKED_COUNT events, each ack answered +PASS.

    Returns the acked idems and the two clients, still open: the caller kills
    nodes right after the last +PASS and closes the clients afterwards.
    """
    sub_client = await sdk.connect(cluster.ws_url(con_node), consumer)
    pub_client = await sdk.connect(cluster.ws_url(pub_node), publisher)
    clients = [pub_client, sub_client]
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, EVENT)
        published = await _publish(pub_client, consumer["app_id"], 0, ACKED_COUNT)
        acked = []
        deadline = time.monotonic() + RECEIVE_TIMEOUT_S
        for _ in range(ACKED_COUNT):
            message = await asyncio.wait_for(inbox.get(), deadline - time.monotonic())
            reply = await ws_sub.ack(message["idem"], message["block"])
            assert reply == f"+PASS:ACKNOWLEDGED;IDEM={message['idem']}"
            acked.append(message["idem"])
        assert acked == published
        return acked, clients
    except BaseException:
        await _close(clients)
        raise


async def _close(clients: list) -> None:
    for client in clients:
        await client.close()


def _acked_everywhere(cluster, idems: list[str]) -> bool:
    """Every running node's trace of every idem is acked, last row included."""
    for node_id in cluster.running_ids():
        for idem in idems:
            body = cluster.request(node_id, f"/admin/trace/{idem}")
            if body["state"] != "acked" or body["history"][-1]["what"] != "acked":
                return False
    return True


def _not_acked(cluster, idems: list[str]) -> dict[str, list]:
    """For a failure message: (node, state, last row) of every idem not acked."""
    found: dict[str, list] = {}
    for node_id in cluster.running_ids():
        for idem in idems:
            body = cluster.request(node_id, f"/admin/trace/{idem}")
            if body["state"] != "acked" or body["history"][-1]["what"] != "acked":
                found.setdefault(idem, []).append(
                    (node_id, body["state"], body["history"][-1]["what"]))
    return found


async def _only_new_events_arrive(cluster, pub_node: str, con_node: str,
                                  publisher: dict, consumer: dict,
                                  acked: list[str]) -> None:
    """A new connection of the consumer app gets exactly the later events."""
    sub_client = await sdk.connect(cluster.ws_url(con_node), consumer)
    pub_client = await sdk.connect(cluster.ws_url(pub_node), publisher)
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, EVENT)
        later = await _publish(pub_client, consumer["app_id"], ACKED_COUNT, LATER_COUNT)
        got, again, ack_errors = [], [], []

        async def take(until: float) -> bool:
            left = until - time.monotonic()
            if left <= 0:
                return False
            try:
                message = await asyncio.wait_for(inbox.get(), left)
            except TimeoutError:
                return False
            (again if message["idem"] in acked else got).append(message["idem"])
            try:
                await ws_sub.ack(message["idem"], message["block"])
            except Exception as exc:  # keep draining; reported below
                ack_errors.append((message["idem"], str(exc)))
            return True

        deadline = time.monotonic() + RECEIVE_TIMEOUT_S
        for _ in range(LATER_COUNT + ACKED_COUNT):
            if len(got) >= LATER_COUNT or not await take(deadline):
                break
        # Past the ack timeout: anything wrongly pending or in flight shows up.
        quiet_until = time.monotonic() + QUIET_S
        for _ in range(LATER_COUNT + ACKED_COUNT):
            if not await take(quiet_until):
                break
    finally:
        await pub_client.close()
        await sub_client.close()

    assert again == [], f"acked events delivered again: {again}"
    assert got == later, f"expected {later}, got {got}"
    assert ack_errors == []


async def test_no_redelivery_after_a_confirmed_ack_across_a_leader_kill(cluster_factory):
    cluster, publisher, consumer = _start(cluster_factory)
    leader = cluster.leader()
    first, second = [n for n in cluster.node_ids if n != leader]
    assert cluster.status(first)["role"] == "follower"

    acked, clients = await _ack_all(cluster, second, first, publisher, consumer)
    cluster.kill(leader)
    new_leader = cluster.leader()
    assert new_leader != leader
    await _close(clients)
    cluster.restart(leader)
    cluster.leader()

    try:
        cluster.wait_for(lambda: _acked_everywhere(cluster, acked), CATCH_UP_TIMEOUT_S,
                         "every node to show every acked event as acked")
    except Exception as exc:
        raise AssertionError(f"{_not_acked(cluster, acked)}\n{exc}") from None
    await _only_new_events_arrive(cluster, first, second, publisher, consumer, acked)


async def test_no_redelivery_after_a_confirmed_ack_across_a_full_cluster_kill(
        cluster_factory):
    cluster, publisher, consumer = _start(cluster_factory)
    leader = cluster.leader()
    first, second = [n for n in cluster.node_ids if n != leader]

    acked, clients = await _ack_all(cluster, second, first, publisher, consumer)
    for node_id in [leader, first, second]:
        cluster.kill(node_id)
    await _close(clients)
    for node_id in cluster.node_ids:
        cluster.restart(node_id)
    cluster.leader()

    try:
        cluster.wait_for(lambda: _acked_everywhere(cluster, acked), CATCH_UP_TIMEOUT_S,
                         "every node to show every acked event as acked")
    except Exception as exc:
        raise AssertionError(f"{_not_acked(cluster, acked)}\n{exc}") from None
    await _only_new_events_arrive(cluster, first, second, publisher, consumer, acked)
