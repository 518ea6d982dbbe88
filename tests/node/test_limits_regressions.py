"""Limits that an adversarial run found a way around, each on a real node.

- Requests in flight count against reply_bytes_max, not only replies. The run
  pipelined 1 MiB publishes on one connection: replies were bounded, but the
  requests behind them were not, and one node grew past 2 GB. A request's text
  is now held in the node's reply memory until its reply is written, so reads
  pause at ``reply_bytes_max`` whatever the reply's size.
- WebSocket pings count as frames. aiohttp answered them itself, outside the
  frame-rate limit, so a ping flood was neither refused nor closed, and slowed
  every other client of the node.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time

import aiohttp

from node.client import Client
from tests.cluster import Cluster

REPLY_BYTES_MAX = 4 << 20
PUBLISHES = 24
PAYLOAD = base64.b64encode(b"x" * 600_000).decode()  # 800 KB once base64
PAUSE_WAIT_S = 20.0
REPLIES_WAIT_S = 60.0
POLL_S = 0.02


def test_pipelined_large_publishes_pause_reads_and_all_commit(tmp_path):
    """The followers are stopped, so nothing commits and every request stays
    unanswered: the leader must stop reading once they fill reply_bytes_max.
    Then the followers go on, and every publish commits."""
    with Cluster(3, base_dir=tmp_path, extra_flags=[
            "--reply-bytes-max", str(REPLY_BYTES_MAX),
            "--write-timeout-ms", "30000"]) as cluster:
        key = cluster.create_key("big-publisher", ["big/*"], ["big/*"])
        leader = cluster.leader()
        followers = [n for n in cluster.node_ids if n != leader]

        def pauses() -> float:
            return cluster.metrics(leader).get("ensync_reply_bytes_pauses_total", 0.0)

        async def publish_all() -> tuple[list[str], float]:
            client = Client(cluster.ws_url(leader))
            await client.connect(key["access_key"])
            before = pauses()
            for node_id in followers:
                cluster.kill(node_id, signal.SIGSTOP)
            try:
                sent = [client.publish("big/x", key["app_id"], PAYLOAD)
                        for _ in range(PUBLISHES)]
                deadline = time.monotonic() + PAUSE_WAIT_S
                while (paused := await asyncio.to_thread(pauses) - before) < 1:
                    assert time.monotonic() < deadline, "reads never paused"
                    await asyncio.sleep(POLL_S)
            finally:
                for node_id in followers:
                    cluster.kill(node_id, signal.SIGCONT)
            try:
                replies = await asyncio.wait_for(asyncio.gather(*sent), REPLIES_WAIT_S)
            finally:
                await client.close()
            return replies, paused

        replies, paused = asyncio.run(publish_all())

    assert paused >= 1
    assert all("IDEM=" in reply for reply in replies), replies[:3]
    assert len({reply.split("IDEM=")[1].split(";")[0] for reply in replies}) == PUBLISHES


FRAMES_PER_S_MAX = 200
ABUSE_CLOSE_MS = 1000
PINGS_MAX = 200_000
PING_FLOOD_S = 15.0
CLOSE_ABUSIVE = 4008


def test_a_ping_flood_is_closed_as_abusive(tmp_path):
    with Cluster(1, base_dir=tmp_path, extra_flags=[
            "--client-frames-per-s-max", str(FRAMES_PER_S_MAX),
            "--client-abuse-close-ms", str(ABUSE_CLOSE_MS)]) as cluster:

        async def flood() -> int | None:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(cluster.ws_url("n1"), autoping=False) as ws:
                    deadline = time.monotonic() + PING_FLOOD_S
                    for i in range(PINGS_MAX):
                        if ws.closed or time.monotonic() > deadline:
                            break
                        try:
                            await ws.ping(b"x")
                        except ConnectionError:
                            break
                        if i % 100 == 0:  # let the close frame in
                            try:
                                msg = await ws.receive(timeout=0.001)
                            except asyncio.TimeoutError:
                                continue
                            if msg.type in (aiohttp.WSMsgType.CLOSE,
                                            aiohttp.WSMsgType.CLOSED,
                                            aiohttp.WSMsgType.CLOSING):
                                break
                    return ws.close_code

        code = asyncio.run(flood())
        closes = cluster.metrics("n1").get("ensync_abusive_closes_total", 0.0)

    assert code == CLOSE_ABUSIVE
    assert closes >= 1
