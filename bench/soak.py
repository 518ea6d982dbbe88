"""Memory over a long steady run of our cluster: ``./scripts/bench --soak-minutes 10``.

A publisher on the leader sends at a steady rate; a consumer on a follower
takes every event (SUB WINDOW) and acks it, so events are published, delivered
and settled the whole time, as in production. Every ``SAMPLE_S`` the resident
set size of each node is read from /proc. Flat means: over the second half of
the run, no node grows faster than ``FLAT_MB_PER_MIN_MAX``; the warm-up half is
where fixed-size parts (RocksDB memtable, the in-memory Raft journal, dedup
tables) fill up.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from bench import measure
from bench.systems import CONSUMER_WINDOW, DRAIN_S_MAX, Ours, Receiver

SAMPLE_S = 15.0
RATE_PER_S = 500
OUTSTANDING_MAX = 256  # unanswered publishes before the publisher waits
FLAT_MB_PER_MIN_MAX = 2.0


def slope_mb_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (b - mean_b) for t, b in points)
    return round(cov / var * 60 / 1e6, 3)


async def soak(base_dir: Path, minutes: float, log) -> dict:
    ours = Ours(base_dir)
    await ours.start()
    try:
        return await _run(ours, minutes, log)
    finally:
        await ours.stop()


async def _run(ours: Ours, minutes: float, log) -> dict:
    duration_s = minutes * 60
    receiver = Receiver(int(RATE_PER_S * duration_s))
    acks: collections.deque = collections.deque()

    def on_record(record: dict) -> None:
        receiver.got(measure.b64_stamp_age_ns(record["payload"]))
        acks.append(consumer.ack(record["idem"], record["block"], record["name"]))
        while acks and acks[0].done():
            acks.popleft().result()

    consumer = await ours._client(ours.followers[0], ours.sink, on_record)
    await consumer.request(f"SUB;CLIENT_ID=:{consumer.client_id};EVENT_NAME=:soak;"
                           f"WINDOW=:{CONSUMER_WINDOW}")
    publisher = await ours._client(ours.leader, ours.pub)
    pids = ours.server_pids()
    samples: list[dict] = []
    outstanding: collections.deque = collections.deque()
    started = time.perf_counter()
    next_sample = started
    sent = 0
    while sent < receiver.expected and time.perf_counter() - started < duration_s:
        now = time.perf_counter()
        if now >= next_sample:
            samples.append(_sample(now - started, pids, sent, receiver))
            log(f"soak {samples[-1]['t_s']:6.0f} s sent {sent} received "
                f"{receiver.received} rss MB {samples[-1]['rss_mb']}")
            next_sample += SAMPLE_S
        delay_s = started + sent / RATE_PER_S - now
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        while len(outstanding) >= OUTSTANDING_MAX:
            await outstanding.popleft()
        outstanding.append(publisher.send(ours._pub_frame(
            publisher, "soak", measure.b64_stamped_payload(sent, 256))))
        sent += 1
    for fut in outstanding:
        await asyncio.wait_for(fut, DRAIN_S_MAX)
    receiver.expected = sent
    if receiver.received >= sent:
        receiver.done.set()
    await receiver.wait(DRAIN_S_MAX)
    for fut in acks:
        await asyncio.wait_for(fut, DRAIN_S_MAX)
    samples.append(_sample(time.perf_counter() - started, pids, sent, receiver))
    await publisher.close()
    await consumer.close()
    return _verdict(samples, sent, receiver)


def _sample(t_s: float, pids: dict[str, int], sent: int, receiver: Receiver) -> dict:
    return {"t_s": round(t_s, 1), "sent": sent, "received": receiver.received,
            "rss_mb": {n: round(measure.process_rss_bytes(p) / 1e6, 1)
                       for n, p in pids.items()}}


def _verdict(samples: list[dict], sent: int, receiver: Receiver) -> dict:
    half = samples[-1]["t_s"] / 2
    slopes = {}
    for node in samples[0]["rss_mb"]:
        points = [(s["t_s"], s["rss_mb"][node] * 1e6)
                  for s in samples if s["t_s"] >= half]
        slopes[node] = slope_mb_per_min(points)
    return {"rate_per_s": RATE_PER_S, "sent": sent, "received": receiver.received,
            **measure.latency_summary(receiver.ages_ns),
            "second_half_slope_mb_per_min": slopes,
            "flat": all(abs(v) <= FLAT_MB_PER_MIN_MAX for v in slopes.values()),
            "flat_mb_per_min_max": FLAT_MB_PER_MIN_MAX, "samples": samples}
