"""Client limits against one real node (docs/PROTOCOL.md, "Limits").

One node from tests/cluster.py, shared by the module; each test uses its own
keys and event names. Every load loop here is bounded in frames and in time.
The node runs with a small connections-per-key limit and a shorter abuse time
so the tests stay short; the other limits keep their defaults.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time

import aiohttp
import pytest

from node.client import Client, ClientError
from tests.cluster import Cluster
from tests.node import raw_ws

HOST = "127.0.0.1"
CONNECTIONS_PER_KEY_MAX = 4
ABUSE_CLOSE_MS = 2000

FLOOD_FRAMES_MAX = 500_000  # about 10 s at the rate one node reads them
FLOOD_TIME_S = 10.0
PAIR_PUBLISHES = 100
PAIR_GAP_S = 0.02
PAIR_P99_S = 2.0
RECORD_WAIT_S = 15.0
CLOSE_WAIT_S = 10.0

SLOW_SUBSCRIPTIONS = 12
SLOW_PAYLOAD_BYTES = 640_000  # 853 KB once base64: about 10 MB in all
SLOW_RSS_GROWTH_BYTES_MAX = 150 << 20
SLOW_CLOSE_WAIT_S = 20.0
SLOW_READ_BYTES_MAX = 64 << 20
POLL_S = 0.05


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Cluster:
    started = Cluster(1, base_dir=tmp_path_factory.mktemp("limits"), extra_flags=[
        "--connections-per-key-max", str(CONNECTIONS_PER_KEY_MAX),
        "--client-abuse-close-ms", str(ABUSE_CLOSE_MS)])
    request.addfinalizer(started.stop)
    return started.start()


def make_key(cluster: Cluster, name: str) -> dict:
    return cluster.create_key(name, ["*"], ["*"])


def metric(cluster: Cluster, name: str) -> float:
    return cluster.metrics("n1").get(name, 0.0)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- frames per second ---------------------------------------------------------


async def _abuse(url: str, access_key: str) -> dict:
    """Pipeline frames at full speed, read every reply; stop when closed."""
    seen = {"sent": 0, "rate_limited": 0, "other": 0, "close_code": None}
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        await ws.send_str(f"CONN;ACCESS_KEY=:{access_key}")
        client_id = re.search(r"clientId=([^,]+)", (await ws.receive()).data)[1]
        frames = ["\x00garbage", "FETCH;X=1", f"CONN;CLIENT_ID={client_id}",
                  "SUB;CLIENT_ID=:nobody;EVENT_NAME=:x"]

        async def read() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                if msg.data.startswith("-FAIL:RATE_LIMITED;MESSAGE="):
                    seen["rate_limited"] += 1
                else:
                    seen["other"] += 1

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + FLOOD_TIME_S
        while seen["sent"] < FLOOD_FRAMES_MAX and time.monotonic() < deadline:
            if ws.closed or reader.done():
                break
            try:
                await ws.send_str(frames[seen["sent"] % len(frames)])
            except ConnectionError:
                break
            seen["sent"] += 1
        await asyncio.wait_for(reader, CLOSE_WAIT_S)
        seen["close_code"] = ws.close_code
    return seen


async def _well_behaved_pair(url: str, pub_key: dict, sub_key: dict) -> list[float]:
    publisher, consumer = Client(url), Client(url)
    await publisher.connect(pub_key["access_key"])
    await consumer.connect(sub_key["access_key"])
    name = "flood/ok"
    await consumer.subscribe(name)

    latencies, published = [], set()
    for i in range(PAIR_PUBLISHES):
        started = time.monotonic()
        reply = await publisher.publish(name, sub_key["app_id"], b64(b"#%d" % i))
        latencies.append(time.monotonic() - started)
        published.add(re.search(r"IDEM=([^;]+)", reply)[1])
        await asyncio.sleep(PAIR_GAP_S)

    delivered = set()
    for _ in range(PAIR_PUBLISHES * 2):
        if delivered >= published:
            break
        record = await consumer.next_record(RECORD_WAIT_S)
        assert record is not None, f"delivered {len(delivered)} of {len(published)}"
        delivered.add(record["idem"])
        await consumer.ack(record["idem"], record["block"], name)
    await publisher.close()
    await consumer.close()
    assert delivered == published
    return latencies


async def test_a_flooding_client_is_rate_limited_and_closed_while_others_are_served(
    cluster,
):
    url = cluster.ws_url("n1")
    abuser, pub_key, sub_key = (make_key(cluster, n) for n in ("fl-a", "fl-p", "fl-s"))

    flood = asyncio.create_task(_abuse(url, abuser["access_key"]))
    latencies = await _well_behaved_pair(url, pub_key, sub_key)
    seen = await flood

    latencies.sort()
    p99_s = latencies[int(len(latencies) * 0.99) - 1]
    print(f"flood: {seen}, pair p99 {p99_s * 1000:.0f} ms")
    assert p99_s < PAIR_P99_S
    assert seen["rate_limited"] > 0
    assert seen["close_code"] == 4008
    assert metric(cluster, "ensync_frames_rate_limited_total") >= seen["rate_limited"]
    assert metric(cluster, "ensync_abusive_closes_total") >= 1
    assert cluster.log_tail("n1", 400).count("client over its frame rate") == 1


# -- connections per key ---------------------------------------------------------


async def test_a_conn_beyond_the_connections_per_key_limit_is_rate_limited(cluster):
    url = cluster.ws_url("n1")
    key, other = make_key(cluster, "per-key"), make_key(cluster, "per-key-other")
    clients = [Client(url) for _ in range(CONNECTIONS_PER_KEY_MAX)]
    for client in clients:
        await client.connect(key["access_key"])

    extra = Client(url)
    with pytest.raises(ClientError) as refused:
        await extra.connect(key["access_key"])
    another_key = Client(url)
    await another_key.connect(other["access_key"])
    await clients[0].close()
    again = Client(url)
    for _ in range(int(CLOSE_WAIT_S / POLL_S)):  # the slot frees once it closed
        try:
            await again.connect(key["access_key"])
            break
        except ClientError:
            await again.close()
            again = Client(url)
            await asyncio.sleep(POLL_S)

    assert refused.value.code == "RATE_LIMITED"
    assert refused.value.message == "too many connections for this key"
    assert again.client_id is not None
    assert metric(cluster, "ensync_connections_per_key_rejected_total") >= 1
    for client in [*clients[1:], extra, another_key, again]:
        await client.close()


# -- slow consumers ----------------------------------------------------------------


async def test_a_consumer_that_never_reads_is_closed_and_its_records_go_to_another(
    cluster,
):
    url = cluster.ws_url("n1")
    pid = cluster.nodes["n1"].process.pid
    sender, receiver = make_key(cluster, "slow-p"), make_key(cluster, "slow-s")
    names = [f"slow/{i}" for i in range(SLOW_SUBSCRIPTIONS)]

    slow = raw_ws.open_ws(HOST, cluster.nodes["n1"].http_port, 10.0, rcvbuf=16_384)
    slow.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                              f"CONN;ACCESS_KEY=:{receiver['access_key']}".encode()))
    conn_reply = raw_ws.read_frames(slow, 10.0, 4096, stop=bool)[0][1].decode()
    client_id = re.search(r"clientId=([^,]+)", conn_reply)[1]
    for name in names:
        slow.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                                  f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name}"
                                  .encode()))
    await asyncio.sleep(0.5)  # subscribed; from here on it reads nothing
    rss_before = rss_bytes(pid)

    publisher = Client(url)
    await publisher.connect(sender["access_key"])
    idems = set()
    for name in names:
        reply = await publisher.publish(name, receiver["app_id"],
                                        b64(os.urandom(SLOW_PAYLOAD_BYTES)))
        idems.add(re.search(r"IDEM=([^;]+)", reply)[1])

    rss_peak = rss_before
    for _ in range(int(SLOW_CLOSE_WAIT_S / POLL_S)):
        rss_peak = max(rss_peak, rss_bytes(pid))
        if metric(cluster, "ensync_slow_consumer_closes_total") >= 1:
            break
        await asyncio.sleep(POLL_S)
    frames = raw_ws.read_frames(slow, 10.0, SLOW_READ_BYTES_MAX)
    slow.close()

    second = Client(url)
    await second.connect(receiver["access_key"])
    for name in names:
        await second.subscribe(name)
    received = set()
    for _ in range(SLOW_SUBSCRIPTIONS * 2):
        if received >= idems:
            break
        record = await second.next_record(RECORD_WAIT_S)
        assert record is not None, f"received {len(received)} of {len(idems)}"
        received.add(record["idem"])
        await second.ack(record["idem"], record["block"], record["name"])
    await second.close()
    await publisher.close()

    print(f"slow consumer: rss before {rss_before >> 20} MiB, peak "
          f"{rss_peak >> 20} MiB, frames read after close {len(frames)}")
    assert frames and frames[-1][0] == raw_ws.OP_CLOSE
    assert raw_ws.close_code(frames[-1][1]) == 4009
    assert received == idems
    assert rss_peak - rss_before < SLOW_RSS_GROWTH_BYTES_MAX
    assert "slow consumer, closing" in cluster.log_tail("n1", 400)


# -- reply memory per node --------------------------------------------------------

REPLY_BYTES_MAX = 2 << 20
REPLAYS = 30


@pytest.fixture(scope="module")
def small_memory_cluster(request, tmp_path_factory) -> Cluster:
    started = Cluster(1, base_dir=tmp_path_factory.mktemp("reply-memory"),
                      extra_flags=["--reply-bytes-max", str(REPLY_BYTES_MAX)])
    request.addfinalizer(started.stop)
    return started.start()


async def test_full_reply_memory_pauses_the_heaviest_reader_and_serves_the_rest(
    small_memory_cluster,
):
    cluster = small_memory_cluster
    url = cluster.ws_url("n1")
    key = make_key(cluster, "memory")
    publisher = Client(url)
    await publisher.connect(key["access_key"])
    reply = await publisher.publish("memory/big", key["app_id"],
                                    b64(os.urandom(SLOW_PAYLOAD_BYTES)))
    idem = re.search(r"IDEM=([^;]+)", reply)[1]

    # Asks for ~25 MB of replays and reads nothing until the node has paused it.
    heavy = raw_ws.open_ws(HOST, cluster.nodes["n1"].http_port, 10.0, rcvbuf=16_384)
    heavy.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                               f"CONN;ACCESS_KEY=:{key['access_key']}".encode()))
    conn_reply = raw_ws.read_frames(heavy, 10.0, 4096, stop=bool)[0][1].decode()
    client_id = re.search(r"clientId=([^,]+)", conn_reply)[1]
    replay = f"REPLAY;CLIENT_ID=:{client_id};EVENT_IDEM=:{idem}".encode()
    heavy.sendall(b"".join(raw_ws.frame(raw_ws.OP_TEXT, replay)
                           for _ in range(REPLAYS)))
    held, paused_polls = 0.0, 0
    for _ in range(int(CLOSE_WAIT_S / POLL_S)):  # until paused for 10 polls
        held = max(held, metric(cluster, "ensync_reply_bytes"))
        if metric(cluster, "ensync_reply_bytes_pauses_total") >= 1:
            paused_polls += 1
            if paused_polls >= 10:
                break
        await asyncio.sleep(POLL_S)
    light = await publisher.publish("memory/small", key["app_id"], b64(b"x"))

    sentinel = f"+PASS:CONNECTED;CLIENT_ID={client_id}"
    heavy.sendall(raw_ws.frame(raw_ws.OP_TEXT, f"CONN;CLIENT_ID={client_id}".encode()))
    frames = raw_ws.read_frames(
        heavy, 30.0, 64 << 20,
        stop=lambda fs: bool(fs) and fs[-1][1] == sentinel.encode())
    heavy.close()
    await publisher.close()

    texts = [p.decode() for op, p in frames if op == raw_ws.OP_TEXT]
    print(f"reply memory: at most {int(held) >> 10} KiB held")
    assert metric(cluster, "ensync_reply_bytes_pauses_total") >= 1
    assert 0 < held <= REPLY_BYTES_MAX + (2 << 20)
    assert light.startswith("PUBLISHED;")
    assert [t[:8] for t in texts[:-1]] == ["+REPLAY:"] * REPLAYS
    assert texts[-1] == sentinel
