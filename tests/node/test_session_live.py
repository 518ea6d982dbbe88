"""One real node, spoken to over a raw WebSocket: pairing, framing, pushes.

The node is ``python -m node.main`` on free 127.0.0.1 ports with its own data
dir, started once for the module. Startup waits on conditions with deadlines:
the ``ready`` log line, then ``/admin/status`` reporting a leader. The
finalizer stops it by PID whatever the outcome. Each test opens its own
connections and uses its own event names, so tests do not see each other's
events. Sections refer to reference/ensync-wire-protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TOKEN = "t"
FRAME_BYTES_MAX = 1 << 20

READY_TIMEOUT_S = 20.0
LEADER_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05
HTTP_TIMEOUT_S = 2.0
START_ATTEMPTS_MAX = 3
FRAMES_PER_READ_MAX = 200  # pushes and PINGs skipped while waiting for one frame
PORT_IN_USE_MARKERS = ("Address already in use", "Errno 98")
PR_SET_PDEATHSIG = 1

CONN_REPLY = re.compile(r"\+PASS:\{clientId=([^,;= ]+), clientHash=([^,; ]+)\}\Z")


@dataclass(frozen=True)
class Key:
    access_key: str
    app_id: str


@dataclass(frozen=True)
class LiveNode:
    ws_url: str
    alpha: Key
    beta: Key


# -- the node process ---------------------------------------------------------------


def free_port() -> int:
    # Another process may take the port before the node binds it; a node that
    # then fails to bind is started again on fresh ports.
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(condition, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"node: no {what} within {timeout_s} s\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def admin(port: int, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def is_leader(port: int) -> bool:
    try:
        return admin(port, "GET", "/admin/status")["role"] == "leader"
    except OSError:
        return False


def start_node(data_dir: Path, log: Path, stop_later) -> int:
    """Start the node; its HTTP port once it logged ``ready``."""
    http_port, raft_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "node.main",
        "--id",
        "n1",
        "--port",
        str(http_port),
        "--raft",
        f"{HOST}:{raft_port}",
        "--data-dir",
        str(data_dir),
        "--admin-token",
        TOKEN,
        "--raft-min-timeout-ms",
        "300",
        "--raft-max-timeout-ms",
        "600",
        "--log-file",
        str(log),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    with open(log.with_suffix(".stderr"), "wb") as stderr:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (only calls prctl)
        )
    stop_later(proc)

    def ready_or_exited():
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(r" ready id=n1 ", text):
            return "ready"
        return "exited" if proc.poll() is not None else None

    if wait_until(ready_or_exited, READY_TIMEOUT_S, "ready line", log) == "ready":
        return http_port
    died = tail(log) + tail(log.with_suffix(".stderr"))
    if any(marker in died for marker in PORT_IN_USE_MARKERS):
        return 0
    pytest.fail(f"node exited with {proc.returncode} before ready\n{died}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, tmp_path_factory) -> LiveNode:
    base = tmp_path_factory.mktemp("live-node")

    def stop_later(proc: subprocess.Popen) -> None:
        request.addfinalizer(lambda: stop(proc))

    port = 0
    for attempt in range(START_ATTEMPTS_MAX):
        log = base / f"n1-{attempt}.log"
        port = start_node(base / f"data-{attempt}", log, stop_later)
        if port:
            break
    assert port, f"no free ports after {START_ATTEMPTS_MAX} attempts"
    wait_until(lambda: is_leader(port), LEADER_TIMEOUT_S, "leader", log)

    keys = []
    for name in ("alpha", "beta"):
        made = admin(
            port, "POST", "/admin/keys", {"name": name, "send": ["*"], "receive": ["*"]}
        )
        keys.append(Key(made["access_key"], made["app_id"]))
    return LiveNode(f"ws://{HOST}:{port}/message", *keys)


# -- a raw client -------------------------------------------------------------------


class Raw:
    """A WebSocket that sorts incoming frames into replies and pushed records."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replies: collections.deque[str] = collections.deque()
        self.records: collections.deque[str] = collections.deque()
        self.client_id: str | None = None

    async def send(self, *frames: str) -> None:
        for frame in frames:
            await self.ws.send_str(frame)

    async def reply(self, timeout_s: float = REPLY_TIMEOUT_S) -> str:
        return await self._next(self.replies, timeout_s)

    async def record(self, timeout_s: float = REPLY_TIMEOUT_S) -> str:
        return await self._next(self.records, timeout_s)

    async def request(self, frame: str) -> str:
        await self.send(frame)
        return await self.reply()

    async def conn(self, key: Key) -> str:
        reply = await self.request(f"CONN;ACCESS_KEY=:{key.access_key}")
        match = CONN_REPLY.match(reply)
        assert match, reply
        self.client_id = match.group(1)
        return self.client_id

    async def _next(self, queue: collections.deque, timeout_s: float) -> str:
        deadline = asyncio.get_running_loop().time() + timeout_s
        for _ in range(FRAMES_PER_READ_MAX):
            if queue:
                return queue.popleft()
            left_s = deadline - asyncio.get_running_loop().time()
            msg = await asyncio.wait_for(self.ws.receive(), max(left_s, 0.001))
            assert msg.type == aiohttp.WSMsgType.TEXT, f"socket gave {msg.type!r}"
            if msg.data.startswith("+RECORD:"):
                self.records.append(msg.data)
            elif msg.data != "PING":
                self.replies.append(msg.data)
        pytest.fail(f"no frame for this queue among {FRAMES_PER_READ_MAX} frames")


@pytest.fixture
async def connect(node: LiveNode):
    async with aiohttp.ClientSession() as http:
        sockets = []

        async def open_raw() -> Raw:
            ws = await http.ws_connect(node.ws_url, max_msg_size=4 * FRAME_BYTES_MAX)
            sockets.append(ws)
            return Raw(ws)

        yield open_raw
        for ws in sockets:
            await ws.close()


def sdk_record(frame: str) -> dict:
    """The record as ensync-sdk-ws decodes it: both prefixes stripped anywhere."""
    return json.loads(frame.replace("+RECORD:", "").replace("+REPLAY:", ""))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pub(client_id: str, name: str, to: str, payload: str, metadata: str = "{}") -> str:
    return (
        f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name};PAYLOAD=:{payload}"
        f";DELIVERY_TO=:{to};METADATA=:{metadata}"
    )


# -- 3.1 CONN ----------------------------------------------------------------------


async def test_conn_reply_has_the_shape_the_sdk_parses(node, connect):
    raw = await connect()

    reply = await raw.request(f"CONN;ACCESS_KEY=:{node.alpha.access_key}")

    client_id, client_hash = CONN_REPLY.match(reply).groups()
    assert base64.b64decode(client_hash, validate=True)
    again = await raw.request(f"CONN;ACCESS_KEY=:{node.alpha.access_key}")
    assert CONN_REPLY.match(again).group(1) == client_id
    keepalive = await raw.request(f"CONN;CLIENT_ID={client_id}")
    assert keepalive == f"+PASS:CONNECTED;CLIENT_ID={client_id}"


async def test_a_bad_access_key_is_unauthorized_and_the_socket_stays_open(
    node, connect
):
    raw = await connect()

    reply = await raw.request("CONN;ACCESS_KEY=:ensk_not-a-key")

    assert reply.startswith("-FAIL:UNAUTHORIZED;MESSAGE=")
    assert await raw.conn(node.alpha)


async def test_a_command_before_conn_or_with_a_wrong_client_id_is_client_not_found(
    node, connect
):
    raw = await connect()

    early = await raw.request("SUB;CLIENT_ID=:nobody;EVENT_NAME=:live/conn")
    client_id = await raw.conn(node.alpha)
    wrong = await raw.request(f"SUB;CLIENT_ID=:{client_id}x;EVENT_NAME=:live/conn")
    right = await raw.request(f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:live/conn")

    assert early.startswith("-FAIL:CLIENT_NOT_FOUND;MESSAGE=")
    assert wrong.startswith("-FAIL:CLIENT_NOT_FOUND;MESSAGE=")
    assert right == "+PASS:SUBSCRIBED;EVENT_NAME=live/conn"


# -- 1.2 / 2.1 Frames the node refuses, one reply each ---------------------------------


async def test_a_frame_of_exactly_one_mebibyte_reaches_the_parser(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    head = f"FETCH;CLIENT_ID=:{client_id};PAD=:"
    largest = head + "x" * (FRAME_BYTES_MAX - len(head))

    reply = await raw.request(largest)
    after = await raw.request(f"CONN;CLIENT_ID={client_id}")

    assert reply == "-FAIL:UNKNOWN_COMMAND;MESSAGE=unknown command FETCH"
    assert after == f"+PASS:CONNECTED;CLIENT_ID={client_id}"


async def test_an_oversize_frame_is_payload_too_large_and_the_connection_keeps_working(
    node, connect
):
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    head = f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:"
    oversize = head + "x" * (FRAME_BYTES_MAX + 1 - len(head))
    assert len(oversize.encode()) == FRAME_BYTES_MAX + 1

    reply = await raw.request(oversize)
    after = await raw.request(f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:live/big")

    assert reply.startswith("-FAIL:PAYLOAD_TOO_LARGE;MESSAGE=")
    assert after == "+PASS:SUBSCRIBED;EVENT_NAME=live/big"


async def test_an_unknown_command_gets_exactly_one_reply(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)

    await raw.send(f"FETCH;CLIENT_ID=:{client_id}", f"CONN;CLIENT_ID={client_id}")

    assert await raw.reply() == "-FAIL:UNKNOWN_COMMAND;MESSAGE=unknown command FETCH"
    assert await raw.reply() == f"+PASS:CONNECTED;CLIENT_ID={client_id}"


async def test_a_binary_frame_gets_one_fail_reply(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)

    await raw.ws.send_bytes(f"CONN;CLIENT_ID={client_id}".encode())
    await raw.send(f"CONN;CLIENT_ID={client_id}")

    assert (await raw.reply()).startswith("-FAIL:")
    assert await raw.reply() == f"+PASS:CONNECTED;CLIENT_ID={client_id}"


async def test_deeply_nested_metadata_gets_one_fail_reply(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    nested = '{"a":' + "[" * 100_000
    frame = pub(client_id, "live/deep", node.alpha.app_id, b64("{}"), nested)

    await raw.send(frame, f"CONN;CLIENT_ID={client_id}")

    assert (await raw.reply(timeout_s=5.0)).startswith("-FAIL:")
    assert await raw.reply(timeout_s=5.0) == f"+PASS:CONNECTED;CLIENT_ID={client_id}"


# -- 1.4 Strict FIFO per connection ---------------------------------------------------


async def test_replies_come_back_in_request_order(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    name = "live/fifo"
    frames = [pub(client_id, name, node.alpha.app_id, b64(f"#{i}")) for i in range(20)]
    frames += [
        f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name}",
        f"FETCH;CLIENT_ID=:{client_id}",
    ]

    await raw.send(*frames)  # back to back, no reply awaited in between
    replies = [await raw.reply() for _ in frames]

    published = [
        re.fullmatch(r"\+PASS:PUBLISHED;IDEM=(\S+);TIMESTAMP=\d+", r)
        for r in replies[:20]
    ]
    assert all(published), replies[:20]
    assert replies[20] == f"+PASS:SUBSCRIBED;EVENT_NAME={name}"
    assert replies[21].startswith("-FAIL:UNKNOWN_COMMAND;")

    # Which PUB each reply answered: the pushed records carry idem and payload.
    payload_of = {}
    for _ in range(20):
        record = sdk_record(await raw.record())
        payload_of[record["idem"]] = record["payload"]
        acked = await raw.request(
            f"ACK;CLIENT_ID=:{client_id};EVENT_IDEM=:"
            f"{record['idem']};BLOCK=:{record['block']}"
        )
        assert acked == f"+PASS:ACKNOWLEDGED;IDEM={record['idem']}"
    assert [payload_of[m.group(1)] for m in published] == [
        b64(f"#{i}") for i in range(20)
    ]


# -- 4.1 Pushed records ----------------------------------------------------------------


async def test_metadata_with_semicolons_reaches_the_pushed_record(node, connect):
    publisher, subscriber = await connect(), await connect()
    sender_id = await publisher.conn(node.alpha)
    receiver_id = await subscriber.conn(node.beta)
    name = "live/meta"
    metadata = {
        "source": "test;x",
        "trap": ";EVENT_NAME=:evil;DELIVERY_TO=x",
        "nested": {"a": [1, {"b": "};{"}]},
        "text": "+RECORD: and +REPLAY:",
    }
    payload = b64('{"n": 1}')

    subscribed = await subscriber.request(
        f"SUB;CLIENT_ID=:{receiver_id};EVENT_NAME=:{name}"
    )
    published = await publisher.request(
        pub(sender_id, name, node.beta.app_id, payload, json.dumps(metadata))
    )
    frame = await subscriber.record()

    assert subscribed == f"+PASS:SUBSCRIBED;EVENT_NAME={name}"
    idem = re.fullmatch(r"\+PASS:PUBLISHED;IDEM=(\S+);TIMESTAMP=\d+", published)[1]
    assert frame.startswith("+RECORD:{")
    record = sdk_record(frame)
    assert record["metadata"] == metadata
    assert (record["idem"], record["id"], record["name"]) == (idem, idem, name)
    assert (record["payload"], record["sender"]) == (payload, node.alpha.app_id)
    assert record["block"] >= 1
    acked = await subscriber.request(
        f"ACK;CLIENT_ID=:{receiver_id};EVENT_IDEM=:{idem};BLOCK=:{record['block']}"
    )
    assert acked == f"+PASS:ACKNOWLEDGED;IDEM={idem}"


# -- regressions from the adversarial run ------------------------------------------


async def test_two_pipelined_conns_share_one_session_or_refuse_another_key(
    node, connect
):
    raw = await connect()
    await raw.send(
        f"CONN;ACCESS_KEY=:{node.alpha.access_key}",
        f"CONN;ACCESS_KEY=:{node.alpha.access_key}",
        f"CONN;ACCESS_KEY=:{node.beta.access_key}",
    )
    first, second, third = [await raw.reply() for _ in range(3)]

    assert CONN_REPLY.match(first).group(1) == CONN_REPLY.match(second).group(1)
    assert third.startswith("-FAIL:UNAUTHORIZED;")


async def test_a_payload_that_is_not_base64_is_rejected_before_it_is_stored(
    node, connect
):
    raw = await connect()
    client_id = await raw.conn(node.alpha)

    # Control characters would grow 6x when the record is serialized as JSON.
    reply = await raw.request(pub(client_id, "big/x", node.alpha.app_id, "\x01" * 1000))

    assert reply.startswith("-FAIL:INVALID_PARAMETER;MESSAGE=PAYLOAD must be base64")


async def test_metadata_whose_serialized_record_exceeds_the_frame_limit_is_too_large(
    node, connect
):
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    metadata = json.dumps({"x": "\x01" * 200_000})  # 1.2 MB once escaped by orjson

    reply = await raw.request(pub(client_id, "big/x", node.alpha.app_id, b64("{}"), metadata))

    assert reply.startswith("-FAIL:PAYLOAD_TOO_LARGE;")
    assert (await raw.request("SUB;CLIENT_ID=:" + client_id + ";EVENT_NAME=:a")).startswith(
        "+PASS:SUBSCRIBED")


async def test_an_event_name_over_the_limit_is_an_invalid_parameter(node, connect):
    raw = await connect()
    client_id = await raw.conn(node.alpha)

    reply = await raw.request(pub(client_id, "n/" + "x" * 300, node.alpha.app_id, b64("{}")))

    assert reply.startswith("-FAIL:INVALID_PARAMETER;MESSAGE=EVENT_NAME must be")


async def test_a_replay_works_whatever_the_publisher_put_in_internal_metadata(
    node, connect
):
    """$internal is the publisher's JSON: a number there made every REPLAY of the
    event an INTERNAL_ERROR with a traceback in the log (breaker run, finding 6)."""
    raw = await connect()
    client_id = await raw.conn(node.alpha)
    for internal in (5, [1], "s", {"replay_info": "forged", "keep": 1}):
        published = await raw.request(pub(client_id, "live/internal", node.alpha.app_id,
                                          b64("{}"), json.dumps({"$internal": internal})))
        idem = re.fullmatch(r"\+PASS:PUBLISHED;IDEM=(\S+);TIMESTAMP=\d+", published)[1]
        for _ in range(2):  # the second sees the stored record unchanged by the first
            replayed = await raw.request(
                f"REPLAY;CLIENT_ID=:{client_id};EVENT_IDEM=:{idem}")
            assert replayed.startswith("+REPLAY:{"), replayed
            got = json.loads(replayed[len("+REPLAY:"):])["metadata"]["$internal"]
            assert got["replay_info"]["isReplayed"] is True
            assert got.get("keep") == (1 if isinstance(internal, dict) else None)
