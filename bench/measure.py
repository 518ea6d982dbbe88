"""What every bench phase records: CPU per process, latency percentiles, payloads.

CPU comes from the kernel's own accounting: the client's from
``time.process_time()``, each server's from utime + stime in
``/proc/<pid>/stat``, the machine's from ``/proc/stat``. All are given as % of
one core over the phase's wall time (200 % is this whole 2-core machine), so a
client that saturates its core shows up as the client, not as a slow server.
Whatever the machine spent beyond client and servers is ``other_cpu_pct``: other
processes on a shared machine, or kernel work.
"""

from __future__ import annotations

import base64
import os
import statistics
import struct
import time

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Carried at the front of every e2e payload: sequence number, send time (ns,
# monotonic; sender and receiver are one process, so one clock).
STAMP = struct.Struct("<Qq")
# Base64 characters that encode the stamp (18 raw bytes = 24 characters).
STAMP_B64_CHARS = 24


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process in seconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def process_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_s() -> float:
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLOCK_TICKS_PER_S


class CpuMeter:
    """CPU of the client, of each named server process, and of the machine."""

    def __init__(self, server_pids: dict[str, int]) -> None:
        self.server_pids = dict(server_pids)

    def __enter__(self) -> CpuMeter:
        self.wall0 = time.perf_counter()
        self.client0 = time.process_time()
        self.servers0 = {n: process_cpu_s(p) for n, p in self.server_pids.items()}
        self.machine0 = machine_busy_s()
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall_s = max(time.perf_counter() - self.wall0, 1e-9)

        def pct(cpu_s: float) -> float:
            return round(100 * cpu_s / wall_s, 1)

        servers = {n: pct(process_cpu_s(p) - self.servers0[n])
                   for n, p in self.server_pids.items()}
        client = pct(time.process_time() - self.client0)
        machine = pct(machine_busy_s() - self.machine0)
        self.result = {
            "client_cpu_pct": client,
            "server_cpu_pct": servers,
            "servers_cpu_pct": round(sum(servers.values()), 1),
            "machine_cpu_pct": machine,
            "other_cpu_pct": round(machine - client - sum(servers.values()), 1),
        }


def wait_quiet(busy_pct_max: float, wait_s_max: float, window_s: float = 1.0) -> float:
    """Wait (at most ``wait_s_max``) until the machine is below ``busy_pct_max``.

    Returns the last reading. The bench's own clusters are idle between
    phases, so a busy machine here means someone else is using it.
    """
    deadline = time.monotonic() + wait_s_max
    while True:
        before = machine_busy_s()
        time.sleep(window_s)
        busy_pct = 100 * (machine_busy_s() - before) / window_s
        if busy_pct <= busy_pct_max or time.monotonic() >= deadline:
            return round(busy_pct, 1)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..1)."""
    assert sorted_values
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency_summary(latencies_ns: list[int]) -> dict:
    if not latencies_ns:
        return {}
    ordered = sorted(latencies_ns)
    return {"p50_ms": round(percentile(ordered, 0.50) / 1e6, 3),
            "p99_ms": round(percentile(ordered, 0.99) / 1e6, 3),
            "max_ms": round(ordered[-1] / 1e6, 3), "latencies": len(ordered)}


def stamped_payload(seq: int, size: int) -> bytes:
    """``size`` raw bytes starting with the stamp (now)."""
    head = STAMP.pack(seq, time.monotonic_ns())
    return head + b"x" * (size - len(head))


def stamp_age_ns(raw: bytes) -> int:
    return time.monotonic_ns() - STAMP.unpack_from(raw, 0)[1]


def b64_payload(size_chars: int) -> str:
    """A base64 string of exactly ``size_chars`` characters (a multiple of 4)."""
    assert size_chars % 4 == 0

    return base64.b64encode(os.urandom(size_chars // 4 * 3)).decode()


def b64_stamped_payload(seq: int, size_chars: int) -> str:
    return base64.b64encode(stamped_payload(seq, size_chars // 4 * 3)).decode()


def b64_stamp_age_ns(payload: str) -> int:
    return stamp_age_ns(base64.b64decode(payload[:STAMP_B64_CHARS]))


def spread(values: list[float]) -> dict:
    """Median, min and max of the samples of one figure."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}
