"""Per-client limits: frames per second, and when a client counts as abusive.

The problem: one client that pipelines frames at full speed takes the loop's
time from every other client of the node, and nothing it sends is ever refused,
because each frame costs little on its own.

The approach: a token bucket per connection, refilled at ``rate_per_s`` tokens
a second and holding at most ``burst`` (the same number by default, so a client
may send one second's worth at once). A frame that finds a token is admitted;
one that finds none is refused with ``-FAIL:RATE_LIMITED``, which still keeps
the rule of exactly one reply per request, in order. A client that keeps being
refused for ``abuse_close_ms`` (no quiet second of ``CALM_MS`` in between) is
told to go: the shell closes its socket with 4008.

Rejected: dropping excess frames without a reply (the SDK pairs replies by
order, so one missing reply shifts all later ones), and stalling the reader
instead (an abuser's socket buffer then holds the node's attention forever,
and a well-behaved client sharing nothing with it gains nothing).

Pure: time is passed in as ``now_ms``; nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A refused client that then stays within its rate this long is calm again.
CALM_MS = 1000

# TODO(#6): one frame budget per key (or per client address) across its
# connections; today each connection has its own, so many sockets of one key
# multiply it. Remove when keys share a budget.


class Verdict(enum.Enum):
    ADMIT = "admit"
    REJECT = "reject"
    CLOSE = "close"


@dataclass(frozen=True)
class FrameRateStatistics:
    rate_per_s: int
    burst: int
    tokens: float
    admitted_total: int
    rejected_total: int
    over_since_ms: int | None


class FrameRate:
    """One connection's token bucket and its abuse timer."""

    def __init__(self, rate_per_s: int, abuse_close_ms: int, now_ms: int,
                 burst: int | None = None) -> None:
        assert rate_per_s > 0
        assert abuse_close_ms > 0
        assert burst is None or burst > 0

        self.rate_per_s = rate_per_s
        self.burst = rate_per_s if burst is None else burst
        self.abuse_close_ms = abuse_close_ms
        self._tokens = float(self.burst)
        self._refilled_ms = now_ms
        self._over_since_ms: int | None = None
        self._rejected_ms = 0
        self.admitted_total = 0
        self.rejected_total = 0

    def frame(self, now_ms: int) -> Verdict:
        """Account one frame arriving at ``now_ms``; say what to do with it."""
        self._refill(now_ms)
        if self._tokens >= 1:
            self._tokens -= 1
            self.admitted_total += 1
            calm = now_ms - self._rejected_ms >= CALM_MS
            if self._over_since_ms is not None and calm:
                self._over_since_ms = None
            return Verdict.ADMIT

        self.rejected_total += 1
        self._rejected_ms = now_ms
        if self._over_since_ms is None:
            self._over_since_ms = now_ms
        if now_ms - self._over_since_ms >= self.abuse_close_ms:
            return Verdict.CLOSE
        return Verdict.REJECT

    def wait_ms(self, now_ms: int) -> int:
        """How long until the next frame would find a token."""
        self._refill(now_ms)
        if self._tokens >= 1:
            return 0
        return -int(-(1 - self._tokens) * 1000 // self.rate_per_s)

    def _refill(self, now_ms: int) -> None:
        elapsed_ms = max(0, now_ms - self._refilled_ms)
        self._refilled_ms = max(self._refilled_ms, now_ms)
        self._tokens = min(float(self.burst),
                           self._tokens + elapsed_ms * self.rate_per_s / 1000)

    def statistics(self) -> FrameRateStatistics:
        return FrameRateStatistics(self.rate_per_s, self.burst, self._tokens,
                                   self.admitted_total, self.rejected_total,
                                   self._over_since_ms)


def must_pause(held_bytes: int, total_bytes: int, total_bytes_max: int,
               holders: int) -> bool:
    """Whether a connection holding ``held_bytes`` of the node's reply memory
    should stop reading: only while the node is at ``total_bytes_max``, and only
    a connection holding at least the mean, so the heaviest always pauses and
    the light ones keep going."""
    assert held_bytes >= 0
    assert holders >= 0

    if total_bytes < total_bytes_max or held_bytes == 0:
        return False
    return held_bytes * max(holders, 1) >= total_bytes
