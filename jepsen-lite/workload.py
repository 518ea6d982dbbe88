"""Producers and consumers that drive the cluster and record every operation.

Each client process (an integer id) does one operation at a time, so an
``invoke`` and its completion pair up by ``(process, f)`` as HISTORY.md wants.
Deliveries are pushes and are recorded as a single ``ok`` each.

Outcomes. A reply ``+PASS`` is ``ok``. ``-FAIL`` is ``fail`` (definitely not
done), except ``UNAVAILABLE`` whose message says the outcome is unknown, which is
``info``, as is anything without a reply: a client timeout, a connection that
closed under the request. Never the other way round: an unknown outcome is never
recorded as a failure.

Producers publish to random recipients through the node they are bound to; some
publishes are deferred (``deliver_at_ms``), some carry an ``idempotency_key``
(retried with the same key and pid after an ``info``, and sometimes re-sent on
purpose after an ``ok`` to exercise dedup), a few are poison. Consumers of each
recipient sit on other nodes, ack after a random delay, leave a share of
deliveries unanswered (redelivery after ``sub_ack_timeout_ms``), and answer some
with ``DEFER``. Poison goes to its own event name, whose consumers never ack, so
that poison reaches the DLQ after ``delivery_limit`` deliveries without
blocking the main queues.

Reconnect: a client whose socket closed (its node died) or that timed out twice
in a row opens a new connection to the same node and subscribes again, backing
off from ``reconnect_backoff_ms[0]`` to ``[1]``, at most ``reconnects_max`` times.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.client import Client, ClientError  # noqa: E402

from nodes import Nodes  # noqa: E402
from options import RunOptions, rng  # noqa: E402
from recorder import Recorder  # noqa: E402

MAIN_EVENT = "main"
POISON_EVENT = "poison"
PRODUCER_APP = "jl-producer"
CLOSE_TIMEOUT_S = 1.0
RECORD_WAIT_S = 0.5
TIMEOUTS_BEFORE_RECONNECT = 2
# Per process and run: bounds on loops that the clock bounds already.
PUBLISHES_PER_PRODUCER_MAX = 100_000
RECORDS_PER_CONSUMER_MAX = 200_000


@dataclasses.dataclass(frozen=True)
class AppKey:
    name: str
    access_key: str
    app_id: str


@dataclasses.dataclass
class Stats:
    """Running counts for the progress line."""

    publish_ok: int = 0
    publish_info: int = 0
    publish_fail: int = 0
    deliveries: int = 0
    acks_ok: int = 0
    reconnects: int = 0
    last_delivery_ms: int = 0


def recipient_name(index: int) -> str:
    return f"jl-r{index + 1}"


async def create_keys(nodes: Nodes, node_id: str, options: RunOptions,
                      timeout_ms: int) -> tuple[AppKey, list[AppKey]]:
    """One producer key that may send anything, one key per recipient app."""
    async def create(name: str, send: list[str], receive: list[str]) -> AppKey:
        body = {"name": name, "send": send, "receive": receive}
        data = await nodes.post(node_id, "/admin/keys", body, timeout_ms)
        return AppKey(name, data["access_key"], data["app_id"])

    producer = await create(PRODUCER_APP, ["*"], [])
    recipients = [await create(recipient_name(i), [], [MAIN_EVENT, POISON_EVENT])
                  for i in range(options.recipients)]
    return producer, recipients


def classify(exc: BaseException) -> str:
    """``fail`` or ``info`` for a request that did not pass."""
    if isinstance(exc, ClientError):
        if exc.code == "UNAVAILABLE":
            return "info" if "outcome unknown" in exc.message else "fail"
        if exc.code == "DISCONNECTED":
            return "info"
        return "fail"
    return "info"  # a timeout, a socket error: we cannot know


def error_text(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{exc.code}: {exc.message}"[:200]
    return type(exc).__name__


async def close_quietly(client: Client | None) -> None:
    """Close a client without waiting on a node that may be paused."""
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), CLOSE_TIMEOUT_S)
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
        pass
    # If the close handshake timed out, the session and reader may still be open.
    reader, session = client._reader, client._session
    if reader is not None:
        reader.cancel()
    if session is not None and not session.closed:
        await session.close()


class RecordingClient(Client):
    """Our client, telling ``on_record`` about each pushed record as it arrives.

    A consumer handles one record at a time, so a record may wait in ``records``
    while the one before is acked; the history must show when it came.
    """

    def __init__(self, url: str, on_record: Callable[[Client, dict], None]) -> None:
        super().__init__(url)
        self._on_record = on_record

    def _on_frame(self, text: str) -> None:
        if not text.startswith("+RECORD:"):
            super()._on_frame(text)
            return
        record = orjson.loads(text[8:])
        self._on_record(self, record)
        self.records.put_nowait(record)


class Connection:
    """One logical client bound to one node: reconnects and re-subscribes."""

    def __init__(self, url: str, key: AppKey, subscribe: list[str],
                 options: RunOptions, r: random.Random, stop: asyncio.Event,
                 stats: Stats,
                 make_client: Callable[[str], Client] = Client) -> None:
        self.make_client = make_client
        self.url = url
        self.key = key
        self.subscribe = subscribe
        self.options = options
        self.r = r
        self.stop = stop
        self.stats = stats
        self.client: Client | None = None
        self.failures_in_row = 0
        self.connects_total = 0
        self.timeouts_in_row = 0

    async def ensure(self) -> Client | None:
        """A connected, subscribed client; None once stopped or out of attempts."""
        if self.client is not None and await self.client.wait_closed(0):
            # Our client leaves a request sent on a closed socket unanswered
            # until the op timeout; find out before sending, not after.
            await self.drop()
        while self.client is None:
            if self.stop.is_set() or self.connects_total >= self.options.reconnects_max:
                return None
            if self.failures_in_row:
                if await self._backoff():
                    return None
            self.connects_total += 1
            self.stats.reconnects += self.connects_total > 1
            client = await self._open()
            if client is None:
                self.failures_in_row += 1
                continue
            self.client, self.failures_in_row, self.timeouts_in_row = client, 0, 0
        return self.client

    async def _backoff(self) -> bool:
        """Sleep before the next attempt; True if stopped meanwhile."""
        low, high = self.options.reconnect_backoff_ms
        wait_ms = min(high, low * 2 ** (self.failures_in_row - 1))
        wait_ms = wait_ms * (0.5 + self.r.random() / 2)
        try:
            await asyncio.wait_for(self.stop.wait(), wait_ms / 1000)
            return True
        except asyncio.TimeoutError:
            return False

    async def _open(self) -> Client | None:
        o = self.options
        client = self.make_client(self.url)
        try:
            await asyncio.wait_for(client.connect(self.key.access_key),
                                   o.connect_timeout_ms / 1000)
            for name in self.subscribe:
                frame = (f"SUB;CLIENT_ID=:{client.client_id};EVENT_NAME=:{name};"
                         f"ACK_TIMEOUT_MS=:{o.sub_ack_timeout_ms}")
                await asyncio.wait_for(client.request(frame), o.op_timeout_ms / 1000)
        except (ClientError, OSError, aiohttp.ClientError, asyncio.TimeoutError,
                ValueError, KeyError):
            await close_quietly(client)
            return None
        return client

    async def drop(self) -> None:
        client, self.client = self.client, None
        await close_quietly(client)

    async def note(self, outcome: str, exc: BaseException | None) -> None:
        """After each request: reconnect when the socket is gone or stays silent."""
        if outcome == "ok" or exc is None:
            self.timeouts_in_row = 0
            return
        if isinstance(exc, ClientError) and exc.code == "DISCONNECTED":
            await self.drop()
        elif isinstance(exc, asyncio.TimeoutError):
            self.timeouts_in_row += 1
            if self.timeouts_in_row >= TIMEOUTS_BEFORE_RECONNECT:
                await self.drop()


async def request(conn: Connection, frame: str) -> tuple[str, str | None,
                                                         BaseException | None]:
    """(outcome, reply text, error) of one request on ``conn``'s client."""
    client = await conn.ensure()
    if client is None:
        return "fail", None, ClientError("NOT_CONNECTED", "no connection")
    try:
        reply = await asyncio.wait_for(client.send(frame),
                                       conn.options.op_timeout_ms / 1000)
    except (ClientError, asyncio.TimeoutError, OSError, aiohttp.ClientError) as exc:
        outcome = classify(exc)
        await conn.note(outcome, exc)
        return outcome, None, exc
    await conn.note("ok", None)
    return "ok", reply, None


def reply_fields(reply: str) -> dict[str, str]:
    """``PUBLISHED;IDEM=x;TIMESTAMP=y`` -> {"IDEM": "x", "TIMESTAMP": "y"}."""
    fields = {}
    for part in reply.split(";")[1:]:
        key, _, value = part.partition("=")
        fields[key] = value.lstrip(":")
    return fields


class Producer:
    def __init__(self, process: int, url: str, key: AppKey, recipients: list[AppKey],
                 options: RunOptions, recorder: Recorder, stop: asyncio.Event,
                 stats: Stats) -> None:
        self.process = process
        self.recipients = recipients
        self.options = options
        self.recorder = recorder
        self.stop = stop
        self.stats = stats
        self.r = rng(options.seed, f"producer-{process}")
        self.conn = Connection(url, key, [], options, self.r, stop, stats)
        self.counter = 0

    async def run(self) -> None:
        o = self.options
        interval_s = o.producers / o.publish_rate_per_s
        loop = asyncio.get_running_loop()
        next_s = loop.time() + self.r.random() * interval_s
        try:
            while not self.stop.is_set() and self.counter < PUBLISHES_PER_PRODUCER_MAX:
                delay_s = next_s - loop.time()
                if delay_s > 0 and await self._stopped_within(delay_s):
                    break
                next_s = max(next_s + interval_s, loop.time())
                if await self.conn.ensure() is None:
                    break
                await self.publish_one()
        finally:
            await self.conn.drop()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def publish_one(self) -> None:
        o, r = self.options, self.r
        self.counter += 1
        pid = f"{self.process}-{self.counter}"
        recipient = r.choice(self.recipients)
        poison = r.random() < o.poison_probability
        event = POISON_EVENT if poison else MAIN_EVENT
        value = {"queue": f"{recipient.name}/{event}", "pid": pid}
        metadata = {}

        if r.random() < o.keyed_probability:
            value["key"] = metadata["idempotency_key"] = f"k-{o.seed}-{pid}"
        if not poison and r.random() < o.deferred_probability:
            at_run_ms = self.recorder.now_ms() + r.randint(*o.deliver_at_delay_ms)
            at_unix_ms = self.recorder.run_to_unix_ms(at_run_ms)
            value["deliver_at_ms"] = metadata["deliver_at_ms"] = at_unix_ms
            value["deliver_at_time_ms"] = at_run_ms  # the same instant, run clock
        if poison:
            value["poison"] = True
        payload = base64.b64encode(orjson.dumps({"pid": pid, "poison": poison}))
        frame = self._frame(event, recipient.app_id, payload.decode(), metadata)

        outcome = await self._attempt(frame, value)
        retries = 0
        while ("key" in value and outcome == "info" and retries < o.publish_retries_max
               and not self.stop.is_set()):
            retries += 1
            outcome = await self._attempt(frame, value)
        resend = r.random() < o.dedup_resend_probability
        if "key" in value and outcome == "ok" and resend:
            await self._attempt(frame, value)

    def _frame(self, event: str, to: str, payload_b64: str, metadata: dict) -> str:
        meta = orjson.dumps(metadata).decode()
        return (f"PUB;CLIENT_ID=:{{cid}};EVENT_NAME=:{event};PAYLOAD=:{payload_b64};"
                f"DELIVERY_TO=:{to};METADATA=:{meta}")

    async def _attempt(self, frame_template: str, value: dict) -> str:
        """One invoke and its completion; the connection may change between tries."""
        client = await self.conn.ensure()
        if client is None:
            return "fail"  # stopped: no invoke was written
        self.recorder.write("invoke", "publish", self.process, value)
        frame = frame_template.replace("{cid}", client.client_id, 1)
        outcome, reply, exc = await request(self.conn, frame)
        done = dict(value)
        if outcome == "ok":
            done["idem"] = reply_fields(reply).get("IDEM")
            self.stats.publish_ok += 1
        else:
            done["error"] = error_text(exc)
            if outcome == "info":
                self.stats.publish_info += 1
            else:
                self.stats.publish_fail += 1
        self.recorder.write(outcome, "publish", self.process, done)
        return outcome


class Consumer:
    def __init__(self, process: int, url: str, key: AppKey, event: str,
                 options: RunOptions, recorder: Recorder, stop: asyncio.Event,
                 stats: Stats) -> None:
        self.process = process
        self.key = key
        self.event = event
        self.options = options
        self.recorder = recorder
        self.stop = stop
        self.stats = stats
        self.r = rng(options.seed, f"consumer-{process}")
        self.conn = Connection(url, key, [event], options, self.r, stop, stats,
                               lambda url: RecordingClient(url, self._observe))
        self.records_total = 0

    async def run(self) -> None:
        try:
            while (not self.stop.is_set()
                   and self.records_total < RECORDS_PER_CONSUMER_MAX):
                client = await self.conn.ensure()
                if client is None:
                    break
                try:
                    record = await client.next_record(RECORD_WAIT_S)
                except ClientError:
                    await self.conn.drop()
                    continue
                if record is not None:
                    await self._handle(client, record)
        finally:
            await self.conn.drop()

    def _observe(self, client: Client, record: dict) -> None:
        """Called from the client's reader as each record arrives."""
        self.stats.deliveries += 1
        self.stats.last_delivery_ms = self.recorder.now_ms()
        self.recorder.write("ok", "deliver", self.process, {
            "idem": record.get("idem"), "pid": _pid_of(record),
            "queue": f"{self.key.name}/{record.get('name')}",
            "attempt": record.get("attempt"), "consumer": client.client_id,
            "block": record.get("block")})

    async def _handle(self, client: Client, record: dict) -> None:
        o, r = self.options, self.r
        self.records_total += 1
        idem, attempt = record.get("idem"), record.get("attempt")
        if self.event == POISON_EVENT:
            return  # poison is never answered: it must end in the DLQ
        choice = r.random()
        if choice < o.never_ack_probability:
            return
        await asyncio.sleep(r.randint(*o.ack_delay_ms) / 1000)
        if self.conn.client is not client or await client.wait_closed(0):
            return  # the delivery's connection is gone, and its record returned
        if choice < o.never_ack_probability + o.defer_probability:
            await self._defer(client, idem, attempt)
        else:
            await self._ack(client, idem, attempt, record)

    async def _ack(self, client: Client, idem: str, attempt: int, record: dict) -> None:
        self.recorder.write("invoke", "ack", self.process,
                            {"idem": idem, "attempt": attempt})
        frame = (f"ACK;CLIENT_ID=:{client.client_id};EVENT_IDEM=:{idem};"
                 f"BLOCK=:{record.get('block')};EVENT_NAME=:{record.get('name')};"
                 f"ATTEMPT=:{attempt}")
        outcome, _, exc = await request(self.conn, frame)
        value = {"idem": idem, "attempt": attempt}
        if exc is not None:
            value["error"] = error_text(exc)
        self.stats.acks_ok += outcome == "ok"
        self.recorder.write(outcome, "ack", self.process, value)

    async def _defer(self, client: Client, idem: str, attempt: int) -> None:
        o, r = self.options, self.r
        value = {"idem": idem, "delay_ms": r.randint(*o.defer_delay_ms),
                 "priority": r.randint(1, 5)}
        self.recorder.write("invoke", "defer", self.process, value)
        frame = (f"DEFER;CLIENT_ID=:{client.client_id};EVENT_IDEM=:{idem};"
                 f"DELAY=:{value['delay_ms']};PRIORITY=:{value['priority']};"
                 f"ATTEMPT=:{attempt}")
        outcome, reply, exc = await request(self.conn, frame)
        done = dict(value)
        if outcome == "ok":
            due_ms = int(reply_fields(reply).get("DELIVERY_TIME", 0))
            done.update(due_ms=due_ms, due_time_ms=self.recorder.unix_to_run_ms(due_ms))
        else:
            done["error"] = error_text(exc)
        self.recorder.write(outcome, "defer", self.process, done)


def _pid_of(record: dict) -> str | None:
    try:
        return orjson.loads(base64.b64decode(record.get("payload", "")))["pid"]
    except (ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass
class Workload:
    producers: list[Producer]
    consumers: list[Consumer]
    stats: Stats
    producer_stop: asyncio.Event
    consumer_stop: asyncio.Event


def build(options: RunOptions, nodes: Nodes, producer_key: AppKey,
          recipient_keys: list[AppKey], recorder: Recorder) -> Workload:
    """Producers round-robin over the nodes; each recipient's consumers on the
    nodes after the one its index maps to, so most traffic crosses nodes."""
    ids, stats = nodes.ids, Stats()
    producer_stop, consumer_stop = asyncio.Event(), asyncio.Event()
    producers = [Producer(p, nodes.nodes[ids[p % len(ids)]].ws_url, producer_key,
                          recipient_keys, options, recorder, producer_stop, stats)
                 for p in range(options.producers)]

    consumers, process = [], options.producers
    for index, key in enumerate(recipient_keys):
        homes = [ids[(index + 1 + k) % len(ids)]
                 for k in range(options.main_consumers_per_recipient)]
        for node_id in homes:
            consumers.append(Consumer(process, nodes.nodes[node_id].ws_url, key,
                                      MAIN_EVENT, options, recorder, consumer_stop,
                                      stats))
            process += 1
        poison_home = ids[index % len(ids)]
        consumers.append(Consumer(process, nodes.nodes[poison_home].ws_url, key,
                                  POISON_EVENT, options, recorder, consumer_stop,
                                  stats))
        process += 1
    return Workload(producers, consumers, stats, producer_stop, consumer_stop)
