"""The two systems under the bench, each driving the same phases its own way.

``Ours`` is our 3-node cluster (tests/cluster.py) driven by ``node/client.py``:
one WebSocket per connection, requests pipelined in a FIFO of futures, pushed
records taken by a callback, and an ACK per record. ``Nats`` is a 3-node
JetStream cluster (bench/nats_cluster.py) driven by nats-py, the method of
``../shared/reference/peer-benchmarks.md``: PubAck per publish, a pull consumer
with ``fetch(256)`` and an ack per message, push consumers for the e2e phases.

Both publish to the node that leads the stream (ours: the Raft leader; NATS: the
stream leader, moved to n1), and both consume the e2e phases on a second node.
Every loop stops at its count or at its time cap, whichever comes first.

Payload sizes are sizes on the wire: NATS carries raw bytes; our protocol
carries base64 text (EnSync's PAYLOAD field), so our 256-byte payload is 256
base64 characters (192 bytes before encoding).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench import measure
from bench.nats_cluster import NatsCluster
from node.client import Client
from tests.cluster import Cluster

# How long a phase may wait for the tail of its acks or deliveries after its
# loop ended, on top of its own time cap.
DRAIN_S_MAX = 30.0
# Pushed records a consumer of ours may hold unacknowledged per subscription
# (the SUB extension WINDOW); NATS's max_ack_pending for its consumers.
CONSUMER_WINDOW = 256
NATS_MAX_ACK_PENDING = 1000
NATS_FETCH_BATCH = 256
NATS_STREAM = "BENCH"
NATS_LEADER = "n1"
NATS_STEPDOWNS_MAX = 15
NATS_LEADER_POLLS_MAX = 20
NATS_LEADER_POLL_S = 0.25
NATS_CREATE_ATTEMPTS_MAX = 10
NATS_CREATE_TIMEOUT_S = 3.0
NATS_CREATE_RETRY_S = 0.5
# Our nodes run with the defaults a user gets (client_frames_per_s_max is
# 20 000 a second per connection, above what one bench connection sends).
OUR_NODE_FLAGS: list[str] = []
RAFT_MIN_TIMEOUT_MS = 1000
RAFT_MAX_TIMEOUT_MS = 2500
# Let a fresh subscription settle before the publisher starts (our node holds
# pushes for 200 ms after +PASS:SUBSCRIBED, spec 9.4).
SUB_SETTLE_S = 0.3


@dataclass(frozen=True)
class Plan:
    """Counts and time caps of every phase (full and quick runs differ)."""

    sync_events: int
    pipelined_events: int
    consume_events: int
    e2e_s: float
    large_events: dict[int, int]  # payload bytes -> events
    publishers_s: float
    cross_events: int
    phase_s_max: float
    window: int = 256
    payload_bytes: int = 256
    e2e_rates: tuple[int, ...] = (200, 1000)
    publishers: tuple[int, ...] = (1, 10, 100)


def phase_groups(plan: Plan) -> list[list[str]]:
    """Phases by the cluster they run on: each group gets a fresh one.

    Large payloads fill our Raft journal fastest; on a cluster of their own
    they stay below ``journal_bytes_max`` (64 MiB), which would force a
    snapshot (see docs/PERFORMANCE.md on what that costs).
    """
    main = ["sync_publish", "pipelined_publish", "consume"]
    main += [f"e2e_{rate}" for rate in plan.e2e_rates]
    main += [f"publishers_{count}" for count in plan.publishers]
    main += ["cross_node"]
    return [main, [f"payload_{size // 1024}k" for size in plan.large_events]]


def phase_names(plan: Plan) -> list[str]:
    return [name for group in phase_groups(plan) for name in group]


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


async def pipeline(send, count: int, window: int, deadline: float) -> int:
    """``send(i)`` up to ``count`` times with at most ``window`` unanswered.

    Replies come in request order, so waiting for the oldest is enough.
    Returns how many were sent (and answered).
    """
    outstanding: collections.deque = collections.deque()
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        if len(outstanding) >= window:
            await outstanding.popleft()
            continue
        outstanding.append(send(sent))
        sent += 1
    while outstanding:
        await asyncio.wait_for(outstanding.popleft(), DRAIN_S_MAX)
    return sent


async def paced(send, rate_per_s: int, seconds: float) -> list:
    """Call ``send(i)`` at a steady rate; returns what each call returned (awaited
    first when it is a coroutine, as nats-py's ``publish_async`` is)."""
    results = []
    count = int(rate_per_s * seconds)
    started = time.perf_counter()
    for i in range(count):
        delay_s = started + i / rate_per_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        result = send(i)
        results.append(await result if inspect.iscoroutine(result) else result)
    return results


class Receiver:
    """Counts deliveries and their ages; ``done`` once ``expected`` arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.first_s: float | None = None
        self.last_s = 0.0
        self.ages_ns: list[int] = []
        self.done = asyncio.Event()

    def got(self, age_ns: int | None = None) -> None:
        now = time.perf_counter()
        if self.first_s is None:
            self.first_s = now
        self.last_s = now
        self.received += 1
        if age_ns is not None:
            self.ages_ns.append(age_ns)
        if self.received >= self.expected:
            self.done.set()

    async def wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------
# ours


class Ours:
    label = "ours"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.cluster: Cluster | None = None
        self.batching: dict = {}

    async def start(self) -> None:
        # The product's election timeouts, not the shorter ones tests use.
        self.cluster = Cluster(size=3, base_dir=self.base_dir,
                               raft_min_timeout_ms=RAFT_MIN_TIMEOUT_MS,
                               raft_max_timeout_ms=RAFT_MAX_TIMEOUT_MS,
                               extra_flags=OUR_NODE_FLAGS)
        await asyncio.to_thread(self.cluster.start)
        self.leader = await asyncio.to_thread(self.cluster.leader)
        self.followers = [n for n in self.cluster.node_ids if n != self.leader]
        self.pub = await asyncio.to_thread(self.cluster.create_key, "bench-pub",
                                           ["*"], [])
        self.sink = await asyncio.to_thread(self.cluster.create_key, "bench-sink",
                                            [], ["*"])

    async def stop(self) -> None:
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)

    def server_pids(self) -> dict[str, int]:
        roles = {self.leader: "leader"}
        return {f"{n}-{roles.get(n, 'follower')}": node.process.pid
                for n, node in self.cluster.nodes.items()}

    def describe(self) -> dict:
        return {"leader": self.leader, "followers": self.followers}

    async def _client(self, node: str, key: dict, on_record=None) -> Client:
        client = Client(self.cluster.ws_url(node), on_record)
        await client.connect(key["access_key"])
        return client

    def _pub_frame(self, client: Client, name: str, payload: str) -> str:
        return (f"PUB;CLIENT_ID=:{client.client_id};EVENT_NAME=:{name};"
                f"PAYLOAD=:{payload};DELIVERY_TO=:{self.sink['app_id']};METADATA=:{{}}")

    async def _subscribe(self, client: Client, name: str) -> None:
        await client.request(f"SUB;CLIENT_ID=:{client.client_id};EVENT_NAME=:{name};"
                             f"WINDOW=:{CONSUMER_WINDOW}")

    def _batches(self, node: str) -> tuple[float, float]:
        m = self.cluster.metrics(node)
        return m["ensync_raft_batches_total"], m["ensync_raft_batched_ops_total"]

    # -- phases -----------------------------------------------------------------

    async def sync_publish(self, plan: Plan, meter_factory) -> dict:
        client = await self._client(self.leader, self.pub)
        frame = self._pub_frame(client, "bench/sync", measure.b64_payload(
            plan.payload_bytes))
        latencies = []
        with meter_factory() as meter:
            started = time.perf_counter()
            deadline = started + plan.phase_s_max
            while len(latencies) < plan.sync_events and time.perf_counter() < deadline:
                t0 = time.perf_counter_ns()
                await client.send(frame)
                latencies.append(time.perf_counter_ns() - t0)
            seconds = time.perf_counter() - started
        await client.close()
        return {"count": len(latencies), "seconds": seconds,
                **measure.latency_summary(latencies), **meter.result}

    async def pipelined_publish(self, plan: Plan, meter_factory, size: int = 0,
                                count: int = 0) -> dict:
        size, count = size or plan.payload_bytes, count or plan.pipelined_events
        client = await self._client(self.leader, self.pub)
        frame = self._pub_frame(client, f"bench/pipelined{size}",
                                measure.b64_payload(size))
        batches0, ops0 = await asyncio.to_thread(self._batches, self.leader)
        with meter_factory() as meter:
            started = time.perf_counter()
            sent = await pipeline(lambda i: client.send(frame), count, plan.window,
                                  started + plan.phase_s_max)
            seconds = time.perf_counter() - started
        batches1, ops1 = await asyncio.to_thread(self._batches, self.leader)
        await client.close()
        entries = batches1 - batches0
        return {"count": sent, "seconds": seconds, "payload_bytes": size,
                "raft_entries": int(entries),
                "events_per_raft_entry": round((ops1 - ops0) / entries, 2)
                if entries else 0.0, **meter.result}

    async def consume(self, plan: Plan, meter_factory) -> dict:
        name = "bench/consume"
        publisher = await self._client(self.leader, self.pub)
        payload = measure.b64_payload(plan.payload_bytes)
        frame = self._pub_frame(publisher, name, payload)
        stored = await pipeline(lambda i: publisher.send(frame), plan.consume_events,
                                plan.window, time.perf_counter() + plan.phase_s_max)
        await publisher.close()

        receiver = Receiver(stored)
        acks = []

        def on_record(record: dict) -> None:
            acks.append(consumer.ack(record["idem"], record["block"], record["name"]))
            receiver.got()

        consumer = await self._client(self.leader, self.sink, on_record)
        with meter_factory() as meter:
            await self._subscribe(consumer, name)
            await receiver.wait(plan.phase_s_max)
            if acks:
                await asyncio.wait_for(asyncio.gather(*acks), DRAIN_S_MAX)
            ended = time.perf_counter()
        await consumer.close()
        seconds = ended - (receiver.first_s or ended)
        return {"count": receiver.received, "stored": stored, "seconds": seconds,
                "acked": len(acks), **meter.result}

    async def _acking_consumer(self, node: str, name: str, receiver) -> tuple:
        """A consumer on ``node`` subscribed to ``name`` that records each
        record's age in ``receiver`` and acks it; (client, the ack futures)."""
        acks = []

        def on_record(record: dict) -> None:
            receiver.got(measure.b64_stamp_age_ns(record["payload"]))
            acks.append(consumer.ack(record["idem"], record["block"], record["name"]))

        consumer = await self._client(node, self.sink, on_record)
        await self._subscribe(consumer, name)
        await asyncio.sleep(SUB_SETTLE_S)
        return consumer, acks

    async def e2e(self, plan: Plan, meter_factory, rate_per_s: int) -> dict:
        name = f"bench/e2e{rate_per_s}"
        count = int(rate_per_s * plan.e2e_s)
        receiver = Receiver(count)
        consumer, acks = await self._acking_consumer(self.followers[0], name, receiver)
        publisher = await self._client(self.leader, self.pub)
        with meter_factory() as meter:
            started = time.perf_counter()
            sent = await paced(lambda i: publisher.send(self._pub_frame(
                publisher, name, measure.b64_stamped_payload(i, plan.payload_bytes))),
                rate_per_s, plan.e2e_s)
            await asyncio.wait_for(asyncio.gather(*sent), DRAIN_S_MAX)
            await receiver.wait(DRAIN_S_MAX)
            if acks:
                await asyncio.wait_for(asyncio.gather(*acks), DRAIN_S_MAX)
            seconds = time.perf_counter() - started
        await publisher.close()
        await consumer.close()
        return {"count": receiver.received, "sent": len(sent), "seconds": seconds,
                "rate_per_s": rate_per_s, **measure.latency_summary(receiver.ages_ns),
                **meter.result}

    async def publishers(self, plan: Plan, meter_factory, connections: int) -> dict:
        clients = await asyncio.gather(*(self._client(self.leader, self.pub)
                                         for _ in range(connections)))
        payload = measure.b64_payload(plan.payload_bytes)
        latencies: list[int] = []
        with meter_factory() as meter:
            started = time.perf_counter()
            deadline = started + plan.publishers_s

            async def one(client: Client) -> None:
                frame = self._pub_frame(client, "bench/publishers", payload)
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter_ns()
                    await client.send(frame)
                    latencies.append(time.perf_counter_ns() - t0)

            await asyncio.gather(*(one(c) for c in clients))
            seconds = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in clients))
        return {"count": len(latencies), "seconds": seconds,
                "connections": connections, **measure.latency_summary(latencies),
                **meter.result}

    async def cross_node(self, plan: Plan, meter_factory) -> dict:
        """Publisher on one follower, consumer on the other: both go through
        a node that is not the leader."""
        name = "bench/cross"
        receiver = Receiver(plan.cross_events)
        consumer, acks = await self._acking_consumer(self.followers[1], name, receiver)
        publisher = await self._client(self.followers[0], self.pub)
        with meter_factory() as meter:
            started = time.perf_counter()
            sent = await pipeline(lambda i: publisher.send(self._pub_frame(
                publisher, name, measure.b64_stamped_payload(i, plan.payload_bytes))),
                plan.cross_events, plan.window, started + plan.phase_s_max)
            receiver.expected = sent
            if receiver.received >= sent:
                receiver.done.set()
            await receiver.wait(DRAIN_S_MAX)
            if acks:
                await asyncio.wait_for(asyncio.gather(*acks), DRAIN_S_MAX)
            seconds = time.perf_counter() - started
        await publisher.close()
        await consumer.close()
        return {"count": receiver.received, "sent": sent, "seconds": seconds,
                **measure.latency_summary(receiver.ages_ns), **meter.result}


# ---------------------------------------------------------------------------
# NATS JetStream


class Nats:
    label = "nats"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.cluster: NatsCluster | None = None
        self._connections: list = []
        self._consumers = 0

    async def start(self) -> None:
        import nats  # the bench extra; imported here so ours runs without it
        from nats.js.api import StorageType, StreamConfig

        self._nats = nats
        self.cluster = NatsCluster(self.base_dir)
        await asyncio.to_thread(self.cluster.start)
        self.nc = await self._connect("n1")
        self.js = self.nc.jetstream(timeout=10)
        config = StreamConfig(name=NATS_STREAM, subjects=["bench.>"],
                              storage=StorageType.FILE, num_replicas=3)
        # healthz can say ok before the JetStream meta group has a leader.
        for attempt in range(1, NATS_CREATE_ATTEMPTS_MAX + 1):
            try:
                js = self.nc.jetstream(timeout=NATS_CREATE_TIMEOUT_S)
                await js.add_stream(config)
                break
            except Exception:  # noqa: BLE001 (timeout or "no meta leader yet")
                if attempt == NATS_CREATE_ATTEMPTS_MAX:
                    raise
                await asyncio.sleep(NATS_CREATE_RETRY_S)
        self.stream_leader = await self._move_leader(NATS_LEADER)

    async def _connect(self, node: str):
        nc = await self._nats.connect(servers=[self.cluster.url(node)],
                                      max_reconnect_attempts=2)
        self._connections.append(nc)
        return nc

    async def _move_leader(self, wanted: str) -> str | None:
        """Step the stream leader down until ``wanted`` leads (bounded)."""
        leader = await asyncio.to_thread(self.cluster.stream_leader, NATS_STREAM)
        request = json.dumps({"placement": {"preferred": wanted}}).encode()
        for _ in range(NATS_STEPDOWNS_MAX):
            if leader == wanted:
                break
            try:
                await self.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{NATS_STREAM}",
                                      request, timeout=5)
            except Exception:  # noqa: BLE001 (a refused stepdown: look and retry)
                pass
            leader = None
            for _ in range(NATS_LEADER_POLLS_MAX):
                await asyncio.sleep(NATS_LEADER_POLL_S)
                leader = await asyncio.to_thread(self.cluster.stream_leader,
                                                 NATS_STREAM)
                if leader:
                    break
        return leader

    async def stop(self) -> None:
        for nc in self._connections:
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception:  # noqa: BLE001 (closing a cluster we stop next)
                pass
        self._connections = []
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)

    def server_pids(self) -> dict[str, int]:
        return {f"{n}-{'leader' if n == self.stream_leader else 'follower'}": pid
                for n, pid in self.cluster.pids().items()}

    def describe(self) -> dict:
        return {"stream_leader": self.stream_leader,
                "nats_server": self.cluster.version()}

    async def _durable(self, js, subject: str, cb=None):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._consumers += 1
        durable = f"bench{self._consumers}"
        config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL,
                                max_ack_pending=NATS_MAX_ACK_PENDING,
                                filter_subject=subject)
        if cb is None:
            await js.add_consumer(NATS_STREAM, config)
            return durable, await js.pull_subscribe_bind(durable, NATS_STREAM)
        sub = await js.subscribe(subject, durable=durable, manual_ack=True, cb=cb,
                                 config=config)
        return durable, sub

    async def _publish_window(self, js, subject: str, payload_of, count: int,
                              window: int, deadline: float) -> int:
        futures: collections.deque = collections.deque()
        sent = 0
        while sent < count and time.perf_counter() < deadline:
            if len(futures) >= window:
                await futures.popleft()
                continue
            futures.append(await js.publish_async(subject, payload_of(sent),
                                                  wait_stall=DRAIN_S_MAX))
            sent += 1
        while futures:
            await asyncio.wait_for(futures.popleft(), DRAIN_S_MAX)
        return sent

    # -- phases -----------------------------------------------------------------

    async def sync_publish(self, plan: Plan, meter_factory) -> dict:
        payload = b"x" * plan.payload_bytes
        latencies = []
        with meter_factory() as meter:
            started = time.perf_counter()
            deadline = started + plan.phase_s_max
            while len(latencies) < plan.sync_events and time.perf_counter() < deadline:
                t0 = time.perf_counter_ns()
                await self.js.publish("bench.sync", payload)
                latencies.append(time.perf_counter_ns() - t0)
            seconds = time.perf_counter() - started
        return {"count": len(latencies), "seconds": seconds,
                **measure.latency_summary(latencies), **meter.result}

    async def pipelined_publish(self, plan: Plan, meter_factory, size: int = 0,
                                count: int = 0) -> dict:
        size, count = size or plan.payload_bytes, count or plan.pipelined_events
        js = self.nc.jetstream(timeout=10, publish_async_max_pending=plan.window)
        payload = b"x" * size
        with meter_factory() as meter:
            started = time.perf_counter()
            sent = await self._publish_window(js, f"bench.pipelined{size}",
                                              lambda i: payload, count, plan.window,
                                              started + plan.phase_s_max)
            seconds = time.perf_counter() - started
        return {"count": sent, "seconds": seconds, "payload_bytes": size,
                **meter.result}

    async def consume(self, plan: Plan, meter_factory) -> dict:
        subject = "bench.consume"
        js = self.nc.jetstream(timeout=10, publish_async_max_pending=plan.window)
        payload = b"x" * plan.payload_bytes
        stored = await self._publish_window(js, subject, lambda i: payload,
                                            plan.consume_events, plan.window,
                                            time.perf_counter() + plan.phase_s_max)
        durable, psub = await self._durable(self.js, subject)
        got, first_s = 0, None
        with meter_factory() as meter:
            deadline = time.perf_counter() + plan.phase_s_max
            while got < stored and time.perf_counter() < deadline:
                try:
                    msgs = await psub.fetch(NATS_FETCH_BATCH, timeout=2)
                except asyncio.TimeoutError:
                    continue
                if first_s is None:
                    first_s = time.perf_counter()
                for msg in msgs:
                    await msg.ack()
                got += len(msgs)
            await self.nc.flush()
            pending = await self._ack_pending_drained(durable)
            ended = time.perf_counter()
        await psub.unsubscribe()
        seconds = ended - (first_s or ended)
        return {"count": got, "stored": stored, "seconds": seconds,
                "ack_pending_left": pending, **meter.result}

    async def _ack_pending_drained(self, durable: str) -> int:
        """Wait (bounded) until the server has every ack; the count left."""
        pending = -1
        for _ in range(int(DRAIN_S_MAX / 0.05)):
            info = await self.js.consumer_info(NATS_STREAM, durable)
            pending = info.num_ack_pending
            if pending == 0:
                break
            await asyncio.sleep(0.05)
        return pending

    async def _consumer_on(self, node: str, subject: str, receiver: Receiver):
        nc = await self._connect(node)
        js = nc.jetstream(timeout=10)

        async def cb(msg) -> None:
            receiver.got(measure.stamp_age_ns(msg.data))
            await msg.ack()

        _, sub = await self._durable(js, subject, cb)
        return nc, sub

    async def e2e(self, plan: Plan, meter_factory, rate_per_s: int) -> dict:
        subject = f"bench.e2e{rate_per_s}"
        count = int(rate_per_s * plan.e2e_s)
        receiver = Receiver(count)
        nc2, sub = await self._consumer_on("n2", subject, receiver)
        await asyncio.sleep(SUB_SETTLE_S)
        js = self.nc.jetstream(timeout=10, publish_async_max_pending=4 * count + 1)
        with meter_factory() as meter:
            started = time.perf_counter()
            futures = await paced(
                lambda i: js.publish_async(subject, measure.stamped_payload(
                    i, plan.payload_bytes), wait_stall=DRAIN_S_MAX),
                rate_per_s, plan.e2e_s)
            await asyncio.wait_for(asyncio.gather(*futures), DRAIN_S_MAX)
            await receiver.wait(DRAIN_S_MAX)
            await nc2.flush()
            seconds = time.perf_counter() - started
        await sub.unsubscribe()
        return {"count": receiver.received, "sent": len(futures), "seconds": seconds,
                "rate_per_s": rate_per_s, **measure.latency_summary(receiver.ages_ns),
                **meter.result}

    async def publishers(self, plan: Plan, meter_factory, connections: int) -> dict:
        conns = await asyncio.gather(*(self._nats.connect(
            servers=[self.cluster.url(NATS_LEADER)], max_reconnect_attempts=2)
            for _ in range(connections)))
        payload = b"x" * plan.payload_bytes
        latencies: list[int] = []
        with meter_factory() as meter:
            started = time.perf_counter()
            deadline = started + plan.publishers_s

            async def one(nc) -> None:
                js = nc.jetstream(timeout=10)
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter_ns()
                    await js.publish("bench.publishers", payload)
                    latencies.append(time.perf_counter_ns() - t0)

            await asyncio.gather(*(one(nc) for nc in conns))
            seconds = time.perf_counter() - started
        await asyncio.gather(*(nc.close() for nc in conns), return_exceptions=True)
        return {"count": len(latencies), "seconds": seconds,
                "connections": connections, **measure.latency_summary(latencies),
                **meter.result}

    async def cross_node(self, plan: Plan, meter_factory) -> dict:
        subject = "bench.cross"
        receiver = Receiver(plan.cross_events)
        nc3, sub = await self._consumer_on("n3", subject, receiver)
        await asyncio.sleep(SUB_SETTLE_S)
        publisher = await self._connect("n2")
        js = publisher.jetstream(timeout=10, publish_async_max_pending=plan.window)
        with meter_factory() as meter:
            started = time.perf_counter()
            sent = await self._publish_window(
                js, subject, lambda i: measure.stamped_payload(i, plan.payload_bytes),
                plan.cross_events, plan.window, started + plan.phase_s_max)
            receiver.expected = sent
            if receiver.received >= sent:
                receiver.done.set()
            await receiver.wait(DRAIN_S_MAX)
            await nc3.flush()
            seconds = time.perf_counter() - started
        await sub.unsubscribe()
        return {"count": receiver.received, "sent": sent, "seconds": seconds,
                **measure.latency_summary(receiver.ages_ns), **meter.result}
