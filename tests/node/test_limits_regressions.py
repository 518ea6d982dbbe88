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
import time

import aiohttp

from node.client import Client
from tests.cluster import Cluster

REPLY_BYTES_MAX = 4 << 20
PUBLISHES = 24
PAYLOAD = base64.b64encode(b"x" * 600_000).decode()  # 800 KB once base64
REPLIES_WAIT_S = 60.0


def test_pipelined_large_publishes_pause_reads_and_all_commit(tmp_path):
    with Cluster(1, base_dir=tmp_path, extra_flags=[
            "--reply-bytes-max", str(REPLY_BYTES_MAX)]) as cluster:
        key = cluster.create_key("big-publisher", ["big/*"], ["big/*"])
        before = cluster.metrics("n1").get("ensync_reply_bytes_pauses_total", 0.0)

        async def publish_all() -> list[str]:
            client = Client(cluster.ws_url("n1"))
            await client.connect(key["access_key"])
            try:
                sent = [client.publish("big/x", key["app_id"], PAYLOAD)
                        for _ in range(PUBLISHES)]
                return await asyncio.wait_for(asyncio.gather(*sent), REPLIES_WAIT_S)
            finally:
                await client.close()

        replies = asyncio.run(publish_all())
        after = cluster.metrics("n1").get("ensync_reply_bytes_pauses_total", 0.0)

    assert all("IDEM=" in reply for reply in replies), replies[:3]
    assert len({reply.split("IDEM=")[1].split(";")[0] for reply in replies}) == PUBLISHES
    # 24 x 800 KB in flight is far over 4 MiB: the reader had to wait.
    assert after - before >= 1


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
