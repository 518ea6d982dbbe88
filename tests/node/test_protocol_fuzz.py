"""Fuzzing the protocol: the parser alone, then one live node over a bare socket.

What must hold for any input: the parser returns a Request or raises
ProtocolError and nothing else; a reply never carries a traceback or a Python
exception's name that the client did not send itself; every complete data
frame but ``PONG`` gets exactly one reply, in order (a sentinel request after
each batch must get its own reply last); a frame the WebSocket layer rejects
(invalid UTF-8 in TEXT, a stray continuation, a message over 2 MiB) closes that
connection only; and a well-behaved client on another socket is answered after
every batch. Inputs are counted and the counts printed.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import protocol
from node.errors import ProtocolError
from tests.cluster import Cluster
from tests.node import raw_ws

HOST = "127.0.0.1"
REPLY_WAIT_S = 10.0
READ_BYTES_MAX = 8 << 20
# FUZZ_SCALE=10 (say) runs ten times the examples: a longer hunt than CI's.
FUZZ_SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
PARSER_EXAMPLES = 3000 * FUZZ_SCALE
LIVE_EXAMPLES = 300 * FUZZ_SCALE
BATCH_FRAMES_MAX = 12
# Exception class names that must never reach a client unless it sent them.
LEAK = re.compile(r"Traceback|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|File \"")

counts = {"parser_inputs": 0, "live_batches": 0, "live_frames": 0, "live_closed": 0}

VERBS = [*protocol.REQUIRED, "PING", "PONG", "FETCH", "pub", "", "CONNX"]
KEYS = ["CLIENT_ID", "EVENT_NAME", "PAYLOAD", "DELIVERY_TO", "METADATA",
        "EVENT_IDEM", "ACCESS_KEY", "DELAY", "PRIORITY", "REASON", "ATTEMPT",
        "ACK_TIMEOUT_MS", "BLOCK", "lower", "A" * 41]
any_char = st.characters(codec=None, exclude_categories=())
values = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(["{", "}", '{"a":', '{"a":[1,{"b":"};{"}]}', "[" * 200,
                     "=:", ";", "-1", "99999999999999999999", "*", "a/*", "\x00"]),
    st.integers(-(1 << 40), 1 << 40).map(str))


@st.composite
def requests(draw) -> str:
    """A frame shaped like a request: a verb, then KEY=value pieces."""
    verb = draw(st.sampled_from(VERBS))
    pieces = draw(st.lists(st.tuples(st.sampled_from(KEYS),
                                     st.sampled_from(["=", "=:", "", ":"]), values),
                           max_size=8))
    frame = verb + "".join(f";{k}{eq}{v}" for k, eq, v in pieces)
    cut = draw(st.integers(0, len(frame)))
    return frame[:cut] if draw(st.booleans()) else frame


frames_text = st.one_of(requests(), st.text(any_char, max_size=200))


# -- the parser, pure ---------------------------------------------------------


def _no_leak(text: str, sent: str) -> None:
    for found in LEAK.findall(text):
        assert found in sent, f"leaked {found!r} in {text!r}"


@settings(max_examples=PARSER_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames_text)
def test_the_parser_returns_a_request_or_one_protocol_error(frame):
    counts["parser_inputs"] += 1
    try:
        request = protocol.parse_request(frame)
    except ProtocolError as exc:
        wire = exc.wire()
        assert wire.startswith(f"-FAIL:{exc.code};MESSAGE=")
        assert ";" not in wire[len(f"-FAIL:{exc.code};"):]
        _no_leak(wire, frame)
        return
    assert request.verb in protocol.REQUIRED
    assert all(request.get(k) for k in protocol.REQUIRED[request.verb])


def test_the_parser_refuses_an_oversize_frame_without_reading_it_all():
    counts["parser_inputs"] += 1
    with pytest.raises(ProtocolError) as refused:
        protocol.parse_request("SUB;EVENT_NAME=" + "x" * protocol.FRAME_BYTES_MAX)
    assert refused.value.code == "PAYLOAD_TOO_LARGE"


# -- a live node ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    cluster = Cluster(1, base_dir=tmp_path_factory.mktemp("fuzz"))
    request.addfinalizer(cluster.stop)
    cluster.start()
    key = cluster.create_key("fuzz", ["*"], ["*"])
    port = cluster.nodes["n1"].http_port
    good = raw_ws.open_ws(HOST, port, REPLY_WAIT_S)
    good_id = _conn(good, key["access_key"])
    request.addfinalizer(good.close)
    return {"cluster": cluster, "port": port, "key": key, "good": good,
            "good_id": good_id}


def _conn(sock, access_key: str) -> str:
    sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, f"CONN;ACCESS_KEY=:{access_key}"
                              .encode()))
    frames = raw_ws.read_frames(sock, REPLY_WAIT_S, 4096, stop=_texts)
    reply = _texts(frames)[0]
    return re.search(r"clientId=([^,]+)", reply)[1]


def _texts(frames) -> list[str]:
    return [p.decode() for op, p in frames if op == raw_ws.OP_TEXT
            and p != b"PING" and not p.startswith(b"+RECORD:")]


def _read_until(sock, sentinel: str) -> tuple[list[str], bool]:
    """Replies up to and including ``sentinel``; True if the socket closed."""
    def answered(frames) -> bool:
        texts = _texts(frames)
        return bool(texts) and texts[-1] == sentinel

    frames = raw_ws.read_frames(sock, REPLY_WAIT_S, READ_BYTES_MAX, stop=answered)
    closed = not frames or frames[-1][0] == raw_ws.OP_CLOSE or not answered(frames)
    return _texts(frames), closed


CLOSING_KINDS = ("surrogates", "bad_utf8", "stray_continuation", "too_large_to_read")


@st.composite
def items(draw) -> tuple[str, bytes | str]:
    """One thing a client may send: (kind, content)."""
    kind = draw(st.sampled_from(
        ["text"] * 6 + ["binary", "fragments", "fragments"] + ["too_large"]))
    if kind in ("text", "fragments"):
        return kind, draw(frames_text)
    if kind == "binary":
        return kind, draw(st.binary(max_size=200))
    return kind, b""


@st.composite
def closers(draw) -> tuple[str, bytes | str]:
    """Something the WebSocket layer refuses: the node closes that socket."""
    kind = draw(st.sampled_from(CLOSING_KINDS))
    if kind == "surrogates":
        return kind, draw(frames_text) + "\ud800" + draw(st.text(max_size=5))
    if kind == "bad_utf8":
        return kind, draw(st.binary(max_size=20)) + b"\xff\xfe"
    return kind, b""


def _send(sock, kind: str, content) -> tuple[int, bool]:
    """Send one item; (replies it should get, whether the node must close)."""
    if kind in ("text", "fragments") and _has_surrogates(content):
        kind = "surrogates"  # not UTF-8 once encoded: the node closes (1007)
    if kind == "text":
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, content.encode()))
        return (0 if content == "PONG" else 1), False
    if kind == "binary":
        sock.sendall(raw_ws.frame(raw_ws.OP_BINARY, content))
        return 1, False
    if kind == "surrogates":
        data = content.encode("utf-8", "surrogatepass")
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, data))
        return 0, True
    if kind == "bad_utf8":
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, content))
        return 0, True
    if kind == "fragments":  # a ping between the pieces is allowed (RFC 6455 5.4)
        data = content.encode()
        half = len(data) // 2
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, data[:half], fin=False)
                     + raw_ws.frame(raw_ws.OP_PING, b"p")
                     + raw_ws.frame(raw_ws.OP_CONT, data[half:]))
        return (0 if content == "PONG" else 1), False
    if kind == "stray_continuation":
        sock.sendall(raw_ws.frame(raw_ws.OP_CONT, b"x"))
        return 0, True
    if kind == "too_large":
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                                  b"PUB;X=" + b"x" * protocol.FRAME_BYTES_MAX))
        return 1, False
    sock.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                              b"x" * (protocol.WS_MESSAGE_BYTES_MAX + 1)))
    return 0, True


def _has_surrogates(content) -> bool:
    return isinstance(content, str) and any(
        "\ud800" <= c <= "\udfff" for c in content)


def _check_served(live) -> None:
    good, good_id = live["good"], live["good_id"]
    sentinel = f"+PASS:CONNECTED;CLIENT_ID={good_id}"
    good.sendall(raw_ws.frame(raw_ws.OP_TEXT, f"CONN;CLIENT_ID={good_id}".encode()))
    replies, closed = _read_until(good, sentinel)
    assert not closed and replies == [sentinel]


@settings(max_examples=LIVE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(batch=st.lists(items(), min_size=1, max_size=BATCH_FRAMES_MAX),
       closer=st.one_of(st.none(), st.none(), closers()),
       truncate=st.booleans())
def test_a_live_node_answers_any_batch_in_order_or_closes_that_socket_only(
    live, batch, closer, truncate
):
    if closer is not None:
        batch = [*batch, closer]
    sock = raw_ws.open_ws(HOST, live["port"], REPLY_WAIT_S)
    try:
        client_id = _conn(sock, live["key"]["access_key"])
        expected, must_close, sent = 0, False, ""
        for kind, content in batch:
            try:
                replies, closes = _send(sock, kind, content)
            except ConnectionError:  # the node closed the socket mid-frame
                replies, closes = 0, True
                assert kind in CLOSING_KINDS or _has_surrogates(content), kind
            counts["live_frames"] += 1
            sent += content if isinstance(content, str) else ""
            if closes:
                must_close = True
                break
            expected += replies
        if truncate and not must_close:
            # Half a frame header, then the socket closes under the node.
            sock.sendall(raw_ws.frame(raw_ws.OP_TEXT, b"CONN")[:3])
            sock.close()
        else:
            sentinel = f"+PASS:CONNECTED;CLIENT_ID={client_id}"
            try:
                sock.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                                          f"CONN;CLIENT_ID={client_id}".encode()))
            except ConnectionError:
                assert must_close
            replies, closed = _read_until(sock, sentinel)
            for reply in replies:
                assert reply.startswith(("+PASS:", "-FAIL:", "+REPLAY:")), reply
                _no_leak(reply, sent)
            if must_close:
                assert closed
                counts["live_closed"] += 1
            else:
                assert not closed
                assert len(replies) == expected + 1, (batch, replies)
                assert replies[-1] == sentinel
    finally:
        sock.close()
    counts["live_batches"] += 1
    _check_served(live)


def test_zz_the_fuzzers_tried_inputs(live):
    print(f"\nfuzz inputs: {counts}")
    assert counts["parser_inputs"] >= PARSER_EXAMPLES // 2
    assert counts["live_batches"] >= LIVE_EXAMPLES // 2
    _check_served(live)
