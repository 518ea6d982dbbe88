"""EnSync's text protocol: parse request frames, build reply and push frames.

The problem: a request is ``VERB;KEY=:value;KEY=value...`` with no escaping, the SDK
writes the ``KEY=:value`` form while the docs write ``KEY=value``, and the METADATA
value is user JSON that may itself contain ``;`` and ``KEY=``-looking text. Replies
carry no request id; the client pairs them with requests purely by order (spec 1.4).

The approach: split only at a ``;`` that is followed by ``UPPER_KEY=``, but read
METADATA with an incremental JSON decoder first, so whatever the JSON holds stays
inside it. One leading ``:`` after ``=`` is dropped, which accepts both forms.
Everything here is pure: bytes in, a ``Request`` or a ``ProtocolError`` out.

Rejected: a general tokenizer with quoting (the SDK does not quote), and a strict
key order (the spec says order is not significant and unknown keys are ignored).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import orjson

from node.errors import ProtocolError

# The Python SDK's own incoming frame limit is websockets' default, 1 MiB. A
# request above it gets -FAIL:PAYLOAD_TOO_LARGE; so does a PUB whose record would
# exceed it, since the SDK would close its socket on that push.
FRAME_BYTES_MAX = 1 << 20
# Frames above this are not read at all: the socket closes with 1009.
WS_MESSAGE_BYTES_MAX = 2 << 20
# What a record adds around payload, metadata, name and sender (idem, block, ...).
RECORD_OVERHEAD_BYTES = 256

_VERB = re.compile(r"[A-Z]{2,16}\Z")
_KEY_START = re.compile(r";(?=[A-Z_]{1,40}=)")
_JSON = json.JSONDecoder()

# Required parameters per verb; optional ones are read where they are used.
REQUIRED = {
    "CONN": (),
    "CHALLENGE": (),  # ours: proof of possession (node/proof.py)
    "PUB": ("CLIENT_ID", "EVENT_NAME", "PAYLOAD", "DELIVERY_TO"),
    "SUB": ("CLIENT_ID", "EVENT_NAME"),
    "UNSUB": ("CLIENT_ID", "EVENT_NAME"),
    "ACK": ("CLIENT_ID", "EVENT_IDEM"),
    "PAUSE": ("CLIENT_ID", "EVENT_NAME"),
    "CONTINUE": ("CLIENT_ID", "EVENT_NAME"),
    "DEFER": ("CLIENT_ID", "EVENT_IDEM"),
    "DISCARD": ("CLIENT_ID", "EVENT_IDEM"),
    "REPLAY": ("CLIENT_ID",),
    "ROLLBACK": ("CLIENT_ID", "EVENT_IDEM"),
}


@dataclass(frozen=True)
class Request:
    verb: str
    params: dict[str, str]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)


def parse_request(frame: str) -> Request:
    """Parse one text frame; raise ProtocolError with the wire code on bad input."""
    if len(frame) > FRAME_BYTES_MAX // 4 and len(frame.encode()) > FRAME_BYTES_MAX:
        raise ProtocolError("frame exceeds 1048576 bytes", "PAYLOAD_TOO_LARGE")

    verb, _, rest = frame.partition(";")
    if not _VERB.match(verb):
        shown = verb[:32].encode("ascii", "replace").decode()
        raise ProtocolError(f"unknown command {shown!r}", "UNKNOWN_COMMAND")
    if verb not in REQUIRED:
        raise ProtocolError(f"unknown command {verb}", "UNKNOWN_COMMAND")

    params = _parse_params(rest) if rest else {}
    missing = [k for k in REQUIRED[verb] if not params.get(k)]
    if missing:
        raise ProtocolError(f"missing {', '.join(missing)}", "MISSING_PARAMETERS")
    return Request(verb, params)


def _parse_params(rest: str) -> dict[str, str]:
    params: dict[str, str] = {}
    text = ";" + rest
    pos = 0
    while pos < len(text):
        match = _KEY_START.match(text, pos)
        if match is None:
            raise ProtocolError("malformed parameter list", "INVALID_PARAMETER")

        key_start = match.end()
        eq = text.index("=", key_start)
        key = text[key_start:eq]
        value_start = eq + 1
        if text.startswith(":", value_start):
            value_start += 1

        value_end = _value_end(text, key, value_start)
        params.setdefault(key, text[value_start:value_end])
        pos = value_end
    return params


def _value_end(text: str, key: str, start: int) -> int:
    """Where a value ends: the next ``;KEY=``, or the end of a METADATA JSON value."""
    if key in ("METADATA", "PAYLOAD_METADATA") and text.startswith("{", start):
        try:
            _, end = _JSON.raw_decode(text, start)
        except (ValueError, RecursionError):
            end = None  # fall back to the next ;KEY= below
        if end is not None and (end == len(text) or _KEY_START.match(text, end)):
            return end

    match = _KEY_START.search(text, start)
    return match.start() if match else len(text)


def passed(result: str, **fields: object) -> str:
    """A ``+PASS:`` reply in the docs form: ``+PASS:RESULT;KEY=value``."""
    tail = "".join(f";{k}={v}" for k, v in fields.items())
    return f"+PASS:{result}{tail}"


def conn_passed(client_id: str, client_hash: str) -> str:
    """The CONN reply shape the SDK's parser needs (spec 3.1)."""
    return f"+PASS:{{clientId={client_id}, clientHash={client_hash}}}"


def record_frame(record: dict, prefix: str = "+RECORD:") -> str:
    """A pushed record. The SDK strips the two prefixes anywhere in the frame, so
    they are escaped where they occur inside JSON strings (spec 4.1)."""
    body = orjson.dumps(record)
    if b"+RE" in body:
        body = body.replace(b"+RECORD:", b"\\u002bRECORD:")
        body = body.replace(b"+REPLAY:", b"\\u002bREPLAY:")
    return prefix + body.decode()
