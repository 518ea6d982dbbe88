"""Thin helpers around the unmodified ensync-sdk-ws 0.4.3 client, for tests.

They step around the SDK defects listed in the spec (section 9): ``subscribe()``
never sends SUB, so we call ``_ensure_subscription()``; handlers only queue the
message, and every SDK call (ack included) is made from the test coroutine.
"""

from __future__ import annotations

import asyncio
import time

from ensync_sdk_ws import EnSyncEngine


def http_base(ws_url: str) -> str:
    """The SDK wants the base URL (it turns http into ws, https into wss) and
    appends /message itself."""
    scheme, rest = ws_url.split("://", 1)
    return {"ws": "http", "wss": "https"}[scheme] + "://" + rest.removesuffix("/message")


async def connect(ws_url: str, key: dict):
    engine = EnSyncEngine(http_base(ws_url))
    return await engine.create_client(key["access_key"],
                                      {"appSecretKey": key["secret_key"]})


async def subscribe(client, name: str):
    """Subscribe without auto-ack; returns (subscription, queue of messages)."""
    inbox: asyncio.Queue = asyncio.Queue()
    sub = client.subscribe(name, auto_ack=False)

    @sub.handler
    async def _collect(message):
        inbox.put_nowait(message)

    ws_sub = await sub._ensure_subscription()
    return ws_sub, inbox


async def receive_and_ack(ws_sub, inbox: asyncio.Queue, count: int,
                          timeout_s: float) -> list[dict]:
    """Take ``count`` messages, acking each one; fail if the deadline passes."""
    deadline = time.monotonic() + timeout_s
    got = []
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"received {len(got)} of {count} before the deadline")
        message = await asyncio.wait_for(inbox.get(), left)
        got.append(message)
        await ws_sub.ack(message["idem"], message["block"])
    return got
