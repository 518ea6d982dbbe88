"""``ensyncctl publish`` and ``subscribe``: the WebSocket half of the tool.

Everything else in ensyncctl speaks plain HTTP with the standard library; these
two commands speak the EnSync protocol through ``node/client.py``, which needs
aiohttp and orjson. So ``node/ctl.py`` imports this module only when one of
them runs, and a machine without those packages can still use the rest.

Our client does not encrypt: a payload is the base64 of the JSON text given,
and a subscriber decodes base64 and prints the text. An EnSync SDK subscriber
would try to decrypt it and fail; these commands are for trying a cluster out
and for tests, not for talking to SDK applications.

Both functions map every failure of the world to ``EventsError`` with a short
message; ``node/ctl.py`` prints it as its usual one-line error.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from node.client import Client, ClientError

# Publishes outstanding on the connection at once.
PUBLISH_WINDOW_MAX = 256
# Publishes started per second at most: below the node's default frame limit
# (client_frames_per_s_max, 20 000), so a long --count is not refused midway.
PUBLISH_RATE_MAX_PER_S = 15_000


class EventsError(Exception):
    """A failure of the world; ensyncctl prints it as one line."""


@dataclass(frozen=True)
class Subscription:
    name: str
    count: int | None  # stop after this many records; None: only the deadline
    wait_ms: int | None  # stop after this long; None: only the count or Ctrl-C
    ack: bool


def encode_payload(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decode_payload(payload: str) -> str:
    try:
        return base64.b64decode(payload, validate=True).decode("utf-8", "replace")
    except ValueError:
        return payload  # not ours: show it as it came


async def _connect(ws_urls: list[str], access_key: str, timeout_ms: int,
                   tls_context=None) -> Client:
    """A client logged in on the first node that takes the connection."""
    failures = []
    for url in ws_urls:
        client = Client(url, tls_context=tls_context)
        try:
            await asyncio.wait_for(client.connect(access_key), timeout_ms / 1000)
            return client
        except ClientError as exc:
            await client.close()
            raise EventsError(f"{url} refused the access key: {exc.code}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            await client.close()
            failures.append(f"{url} ({type(exc).__name__})")
    raise EventsError("no node took the connection: " + ", ".join(failures))


async def publish(ws_urls: list[str], access_key: str, name: str, to: str,
                  payload_b64: str, count: int, timeout_ms: int,
                  tls_context=None) -> list[str]:
    """Publish ``count`` copies; the idems in order. One connection, a window."""
    assert count > 0

    client = await _connect(ws_urls, access_key, timeout_ms, tls_context)
    replies = []
    loop = asyncio.get_running_loop()
    began_s = loop.time()
    try:
        for start in range(0, count, PUBLISH_WINDOW_MAX):
            await asyncio.sleep(max(0.0, began_s + start / PUBLISH_RATE_MAX_PER_S
                                    - loop.time()))
            window = min(PUBLISH_WINDOW_MAX, count - start)
            futures = [client.publish(name, to, payload_b64) for _ in range(window)]
            replies += await asyncio.wait_for(asyncio.gather(*futures),
                                              timeout_ms / 1000)
    except ClientError as exc:
        raise EventsError(f"publish failed after {len(replies)} of {count}: "
                          f"{exc.code} {exc.message}".rstrip()) from exc
    except asyncio.TimeoutError as exc:
        raise EventsError(f"no answer within {timeout_ms} ms after "
                          f"{len(replies)} of {count} published") from exc
    finally:
        await client.close()
    return [_reply_field(reply, "IDEM") for reply in replies]


def _reply_field(reply: str, key: str) -> str:
    """``PUBLISHED;IDEM=evt-...;TIMESTAMP=...`` -> the value of ``key``."""
    for part in reply.split(";")[1:]:
        field, _, value = part.partition("=")
        if field == key:
            return value
    return "?"


async def subscribe(ws_urls: list[str], access_key: str, sub: Subscription,
                    timeout_ms: int, show: Callable[[dict], None],
                    tls_context=None) -> int:
    """Subscribe and hand each record to ``show``; the number received.

    Stops at ``sub.count`` records or after ``sub.wait_ms``, whichever comes
    first. Falling short of a count before the deadline is an error.
    """
    assert sub.count is None or sub.count > 0

    client = await _connect(ws_urls, access_key, timeout_ms, tls_context)
    try:
        await asyncio.wait_for(client.subscribe(sub.name), timeout_ms / 1000)
        return await _receive(client, sub, timeout_ms, show)
    except ClientError as exc:
        raise EventsError(f"{exc.code} {exc.message}".rstrip()) from exc
    except asyncio.TimeoutError as exc:
        raise EventsError(f"no answer within {timeout_ms} ms") from exc
    finally:
        await client.close()


# Polls of the record queue between checks of the deadline.
RECORD_POLL_MS = 500
# Without --count or a deadline, the loop still ends after this many records.
RECORDS_MAX = 1_000_000_000


async def _receive(client: Client, sub: Subscription, timeout_ms: int,
                   show: Callable[[dict], None]) -> int:
    deadline = None if sub.wait_ms is None else time.monotonic() + sub.wait_ms / 1000
    received = 0
    while received < (sub.count or RECORDS_MAX):
        left_s = RECORD_POLL_MS / 1000
        if deadline is not None:
            left_s = min(left_s, deadline - time.monotonic())
            if left_s <= 0:
                break
        record = await client.next_record(left_s)
        if record is None:
            continue
        received += 1
        show(record)
        if sub.ack:
            await asyncio.wait_for(
                client.ack(record["idem"], record["block"], record["name"]),
                timeout_ms / 1000)

    if sub.count is not None and received < sub.count:
        raise EventsError(f"received {received} of {sub.count} records within "
                          f"{sub.wait_ms} ms")
    return received
