"""Publish throughput and latency on a real 3-node cluster on this machine.

Phases (256-byte payloads): one publish at a time, then a window of outstanding
publishes. Every publish counts only when its ``+PASS`` arrived, which the node
sends after the entry is committed and fsynced on a majority and applied.

    ./scripts/bench-publish [--events 20000] [--window 256] [--out docs/bench]
                            [--cluster-secret on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from tests.cluster import Cluster  # noqa: E402


def cpu_ms(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far, in ms (Linux)."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the command name, which may hold spaces: utime is the
            # 12th of them, stime the 13th.
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total * 1000 / ticks_per_s


async def idle_cost(cluster: Cluster, idle_ms: int) -> dict:
    """The nodes' CPU with no client traffic: heartbeats, ticks, probes."""
    assert idle_ms > 0
    pids = [node.process.pid for node in cluster.nodes.values()]
    before_ms = cpu_ms(pids)
    await asyncio.sleep(idle_ms / 1000)
    used_ms = cpu_ms(pids) - before_ms
    return {"ms": idle_ms, "nodes_cpu_ms_per_s": round(used_ms * 1000 / idle_ms, 1)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_phase(url: str, key: dict, to: str, events: int, window: int,
                    payload: str) -> dict:
    client = Client(url)
    await client.connect(key["access_key"])
    latencies_ms: list[float] = []
    sem = asyncio.Semaphore(window)
    done = 0
    started = time.perf_counter()

    async def one() -> None:
        nonlocal done
        t0 = time.perf_counter()
        await client.publish("bench/event", to, payload)
        latencies_ms.append((time.perf_counter() - t0) * 1000)
        done += 1
        sem.release()

    tasks = []
    for _ in range(events):
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one()))
        if len(tasks) % 5000 == 0:
            print(f"  {len(tasks)}/{events} sent", file=sys.stderr)
    await asyncio.gather(*tasks)
    elapsed_s = time.perf_counter() - started
    await client.close()
    return {"events": events, "window": window, "seconds": round(elapsed_s, 3),
            "events_per_s": round(events / elapsed_s),
            "p50_ms": round(percentile(latencies_ms, 0.50), 2),
            "p99_ms": round(percentile(latencies_ms, 0.99), 2),
            "mean_ms": round(statistics.fmean(latencies_ms), 2)}


async def bench(args) -> dict:
    payload = base64.b64encode(os.urandom(args.payload_bytes * 3 // 4)).decode()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "payload_bytes": len(payload),
               "cluster_secret": args.cluster_secret, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="ensync-bench-") as tmp:
        # One pipelined connection is the point here: lift the per-client
        # frame rate limit (client_frames_per_s_max, 2000 by default).
        cluster = Cluster(size=3, base_dir=Path(tmp),
                          extra_flags=["--client-frames-per-s-max", "1000000"],
                          cluster_secret=args.cluster_secret == "on")
        try:
            cluster.start()
            leader = cluster.leader()
            follower = next(n for n in cluster.node_ids if n != leader)
            pub = cluster.create_key("bench-publisher", ["*"], [])
            sink = cluster.create_key("bench-sink", [], ["*"])
            results["idle"] = await idle_cost(cluster, args.idle_ms)
            phases = [("sync_leader", leader, args.sync_events, 1),
                      ("sync_follower", follower, args.sync_events, 1),
                      ("pipelined_leader", leader, args.events, args.window),
                      ("pipelined_follower", follower, args.events, args.window)]
            for name, node_id, events, window in phases:
                print(f"{name}: {events} events, window {window}", file=sys.stderr)
                fsyncs = "ensync_journal_fsync_total"
                before = cluster.metrics(leader)[fsyncs]
                pids = [node.process.pid for node in cluster.nodes.values()]
                cpu_before_ms = cpu_ms(pids)
                r = await run_phase(cluster.ws_url(node_id), pub, sink["app_id"],
                                    events, window, payload)
                r["leader_fsyncs"] = int(cluster.metrics(leader)[fsyncs] - before)
                # All three nodes together: what the cluster spends per event,
                # which contention on a shared machine changes less than rates.
                r["nodes_cpu_ms_per_1k_events"] = round(
                    (cpu_ms(pids) - cpu_before_ms) * 1000 / events, 1)
                results["phases"][name] = r
        finally:
            cluster.stop()
    return results


def table(results: dict) -> str:
    rows = ["| phase | events | window | events/s | p50 ms | p99 ms | leader fsyncs "
            "| nodes' CPU ms per 1k events |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results["phases"].items():
        rows.append(f"| {name} | {r['events']} | {r['window']} | {r['events_per_s']} "
                    f"| {r['p50_ms']} | {r['p99_ms']} | {r['leader_fsyncs']} "
                    f"| {r['nodes_cpu_ms_per_1k_events']} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--sync-events", type=int, default=2000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--idle-ms", type=int, default=5000,
                        help="idle time measured before the phases")
    parser.add_argument("--cluster-secret", choices=["on", "off"], default="on",
                        help="seal Raft peer frames with a cluster secret (default on)")
    parser.add_argument("--out", default=None, help="directory for publish.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(table(results))
    print(f"idle: nodes' CPU {results['idle']['nodes_cpu_ms_per_s']} ms per s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "publish.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "publish.md").write_text(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
