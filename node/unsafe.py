"""UNSAFE, for test builds only: answer a PUB before its event is committed.

Why it exists. jepsen-lite must show that its checker catches a broker that loses
acknowledged events (issue #4). Skipping the journal's ``fdatasync``
(``ENSYNC_UNSAFE_SKIP_FSYNC``) is not enough for that: the harness kills node
processes, not the machine, and a killed process's writes are already in the
kernel's page cache, which survives it. A broken broker has to lose the event
before it reaches any disk, so this switch makes a node reply
``+PASS:PUBLISHED`` at once and propose the publish ``UNSAFE_HOLD_MS`` later. A
node killed inside that window has acknowledged events that no log ever held:
with producers publishing on every node, every kill loses some.

The reply carries ``TIMESTAMP`` and no ``IDEM``, since no offset exists yet;
jepsen-lite's checker then follows the event by its payload.

Two variables, both required, so that one stray variable cannot switch it on:
``ENSYNC_UNSAFE_ACK_BEFORE_COMMIT=1`` asks for it and ``ENSYNC_TEST_BUILD=1``
says this node is a test build. The first without the second is refused at
start (exit 2, one line on stderr). A node running with it logs at CRITICAL at
start and counts every early answer in ``unsafe_early_acks_total``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping

from node import protocol
from node.errors import BrokerError

log = logging.getLogger("ensync.unsafe")

ACK_BEFORE_COMMIT_ENV = "ENSYNC_UNSAFE_ACK_BEFORE_COMMIT"
TEST_BUILD_ENV = "ENSYNC_TEST_BUILD"
# How long an acknowledged publish waits before it is proposed: the loss window.
UNSAFE_HOLD_MS = 2000
# Publishes waiting at once; beyond it a PUB takes the safe path (commit, then reply).
UNSAFE_HELD_OPS_MAX = 10_000


class UnsafeRefused(Exception):
    """An unsafe switch was asked for outside a test build."""


def ack_before_commit_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """True when asked for in a test build; UnsafeRefused when asked for elsewhere."""
    if environ.get(ACK_BEFORE_COMMIT_ENV, "") != "1":
        return False
    if environ.get(TEST_BUILD_ENV, "") != "1":
        raise UnsafeRefused(f"{ACK_BEFORE_COMMIT_ENV}=1 loses acknowledged events "
                            f"and is refused unless {TEST_BUILD_ENV}=1")
    return True


class EarlyAcker:
    """Answers publishes at once and commits them ``hold_ms`` later, in order."""

    def __init__(self, commit: Callable[[dict], Awaitable[dict]],
                 counters: collections.Counter, hold_ms: int = UNSAFE_HOLD_MS,
                 held_max: int = UNSAFE_HELD_OPS_MAX) -> None:
        self._commit = commit
        self._counters = counters
        self.hold_ms = hold_ms
        self.held_max = held_max
        self._held: collections.deque[tuple[float, dict]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def from_environment(cls, commit, counters) -> EarlyAcker | None:
        if not ack_before_commit_requested():
            return None
        log.critical("UNSAFE ack before commit: acked events are lost when this "
                     "node dies; test builds only hold_ms=%d", UNSAFE_HOLD_MS)
        return cls(commit, counters)

    def publish(self, op: dict) -> str | None:
        """The reply to send now, or None when full (the caller commits first)."""
        if len(self._held) >= self.held_max:
            return None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._held.append((time.monotonic() + self.hold_ms / 1000, op))
        self._wake.set()
        self._counters["unsafe_early_acks_total"] += 1
        return protocol.passed("PUBLISHED", TIMESTAMP=time.time_ns() // 1_000_000)

    async def _run(self) -> None:
        while True:
            if not self._held:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, op = self._held[0]
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                continue
            self._held.popleft()
            asyncio.ensure_future(self._propose(op))

    async def _propose(self, op: dict) -> None:
        try:
            await self._commit(op)
        except BrokerError as exc:
            self._counters["unsafe_early_acks_failed_total"] += 1
            log.warning("unsafe early-acked publish failed error=%s", exc)

    def close(self) -> None:
        """Drop what is held: exactly what a crash would lose."""
        if self._task is not None:
            self._task.cancel()
        self._held.clear()
