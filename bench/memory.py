"""Resident memory of each node with a large backlog: N events over Q queues.

Starts a real 3-node cluster, publishes ``--events`` events spread round-robin over
``--queues`` event names addressed to one app with no subscriber (so every event
stays queued), and reports each node's RSS (VmRSS) before, after, and after a
restart of one follower (which reloads its state from RocksDB).

    ./scripts/bench-memory [--events 1000000] [--queues 1000] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

WINDOW = 512  # publishes outstanding at once


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def all_rss(cluster: Cluster) -> dict[str, float]:
    return {n: rss_mb(node.process.pid) for n, node in cluster.nodes.items()
            if node.running()}


async def fill(cluster: Cluster, node_id: str, key: dict, to: str, events: int,
               queues: int) -> float:
    client = Client(cluster.ws_url(node_id))
    await client.connect(key["access_key"])
    payload = base64.b64encode(os.urandom(192)).decode()  # 256 bytes of base64
    started = time.monotonic()
    window: list[asyncio.Future] = []
    for i in range(events):
        window.append(client.publish(f"mem/q{i % queues}", to, payload))
        if len(window) >= WINDOW:
            await window.pop(0)
        if i and i % 50_000 == 0:
            rate = i / (time.monotonic() - started)
            print(f"  {i}/{events} published, {rate:.0f}/s, rss {all_rss(cluster)}",
                  file=sys.stderr)
    for fut in window:
        await fut
    await client.close()
    return time.monotonic() - started


def applied_everywhere(cluster: Cluster) -> bool:
    indexes = {cluster.status(n)["applied_index"] for n in cluster.running_ids()}
    return len(indexes) == 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ensync-mem-") as tmp:
        # One pipelined publisher: lift the per-client frame rate limit.
        cluster = Cluster(size=3, base_dir=Path(tmp),
                          extra_flags=["--compaction-min-entries", "50000",
                                       "--client-frames-per-s-max", "1000000"])
        try:
            cluster.start()
            leader = cluster.leader()
            pub = cluster.create_key("mem-publisher", ["*"], [])
            sink = cluster.create_key("mem-sink", [], ["*"])
            before = all_rss(cluster)
            seconds = asyncio.run(fill(cluster, leader, pub, sink["app_id"],
                                       args.events, args.queues))
            cluster.wait_for(lambda: applied_everywhere(cluster), 300, "replicas")
            after = all_rss(cluster)
            scrape = cluster.metrics(leader)
            pending = scrape["ensync_pending_events"]
            resident = scrape["ensync_resident_events"]
            follower = next(n for n in cluster.node_ids if n != leader)
            cluster.kill(follower)
            cluster.restart(follower)
            cluster.wait_for(lambda: applied_everywhere(cluster), 300, "restart")
            restarted = rss_mb(cluster.nodes[follower].process.pid)
        finally:
            cluster.stop()

    result = {"events": args.events, "queues": args.queues,
              "publish_seconds": round(seconds, 1), "pending_events": pending,
              "resident_events_leader": resident, "rss_mb_before": before,
              "rss_mb_after": after, "rss_mb_follower_after_restart": restarted}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
