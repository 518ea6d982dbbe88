"""Deliveries per queue over the last few seconds, for ``GET /admin/queues``.

Every node applies every ``assign``, so every node sees every delivery as a Push
effect, whichever node serves the session. Counting them here gives each node
the same cluster-wide rate without any traffic between nodes. The counts live
only in memory: a restarted node starts from zero and shows the true rate again
once a window has passed.

Each queue keeps at most ``window_s + 1`` (second, count) pairs, newest last, and
the table keeps at most ``queues_max`` queues: the queue delivered to least
recently is forgotten first, and forgetting is counted. Time is passed in, in
whole seconds of a monotonic clock, so tests move it by hand.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

DELIVERY_RATE_WINDOW_S = 10
DELIVERY_RATE_QUEUES_MAX = 10_000

QueueKey = tuple[str, str]  # (app id, event name)


@dataclass(frozen=True)
class RateStatistics:
    queues: int
    queues_max: int
    forgotten_total: int  # queues dropped to stay within queues_max


class DeliveryRates:
    def __init__(self, window_s: int = DELIVERY_RATE_WINDOW_S,
                 queues_max: int = DELIVERY_RATE_QUEUES_MAX) -> None:
        assert window_s > 0
        assert queues_max > 0

        self.window_s = window_s
        self.queues_max = queues_max
        self._seconds: collections.OrderedDict[QueueKey, collections.deque] = (
            collections.OrderedDict())
        self.forgotten_total = 0

    def record(self, queue: QueueKey, now_s: int) -> None:
        seconds = self._seconds.get(queue)
        if seconds is None:
            if len(self._seconds) >= self.queues_max:
                self._seconds.popitem(last=False)
                self.forgotten_total += 1
            # The current, partial second is kept but not yet counted.
            window = collections.deque(maxlen=self.window_s + 1)
            seconds = self._seconds[queue] = window
        else:
            self._seconds.move_to_end(queue)

        if seconds and seconds[-1][0] == now_s:
            seconds[-1][1] += 1
        else:
            seconds.append([now_s, 1])

    def per_second(self, queue: QueueKey, now_s: int) -> float:
        """Mean deliveries per second over the last ``window_s`` whole seconds."""
        seconds = self._seconds.get(queue)
        if not seconds:
            return 0.0
        since_s = now_s - self.window_s
        count = sum(n for second, n in seconds if since_s <= second < now_s)
        return round(count / self.window_s, 2)

    def statistics(self) -> RateStatistics:
        return RateStatistics(len(self._seconds), self.queues_max, self.forgotten_total)
