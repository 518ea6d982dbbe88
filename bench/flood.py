"""A flooding client against a well-behaved publisher and consumer pair.

One real cluster (3 nodes by default) on this machine. The pair runs on the
leader: the publisher keeps up to ``--window`` publishes outstanding, spread
over ``--names`` event names, and starts at most ``--pair-rate-max`` a second
(well-behaved: far below the node's frame limit per connection); the
consumer, subscribed to all the names, acks every record as it arrives. The
pair's rate is the records it received and acked per second.

Each round measures the pair alone ("unloaded") and while an abusive client
on the same node sends frames as fast as it can ("loaded"), the two in turns
(even rounds start loaded), and the goal is read on the median of the rounds'
own ratios. The abuser's frames: garbage, unknown verbs, requests naming
another client id, PUBs to an app that does not exist, and keep-alive CONNs,
pipelined without waiting for replies, over a bare socket. It runs in a
process of its own, so its own CPU does not come out of the pair's client;
when the node closes it (4008) it connects again, within the same phase.
Every loop is bounded in time and in frames.

    ./scripts/bench-flood [--nodes 3] [--rounds 6] [--phase-s 6] [--names 64]
                          [--pair-rate-max 1500] [--out docs/bench]

Goal (issue #6): loaded / unloaded >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from node.client import Client  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.node import raw_ws  # noqa: E402

RATIO_GOAL = 0.8
PACE_S = 0.005
WARMUP_S = 2.0
ABUSER_READY_S = 15.0
ABUSER_STOP_S = 10.0
ABUSE_FRAMES_MAX = 5_000_000  # per phase, whatever the time
ABUSE_RECONNECTS_MAX = 50
SELECT_S = 0.2
ABUSE_BATCH_REPEAT = 200  # frames per sendall: the abusive set, this many times
PAYLOAD = base64.b64encode(b'{"order": 42, "note": "well-behaved"}').decode()


# -- the well-behaved pair ---------------------------------------------------------


async def pair_phase(url: str, pub_key: dict, con_key: dict, names: list[str],
                     window: int, phase_s: float, rate_max: int) -> dict:
    """Publish and consume for ``phase_s``; the received and acked rate.

    Well-behaved means within the node's limits: the publisher starts at most
    ``rate_max`` publishes a second (below ``client_frames_per_s_max``), so
    the consumer's acks stay below it too."""
    received = 0
    consumer: Client

    def on_record(record: dict) -> None:
        nonlocal received
        received += 1
        ack = consumer.ack(record["idem"], record["block"], record["name"])
        ack.add_done_callback(_consume)

    consumer = Client(url, on_record=on_record)
    publisher = Client(url)
    await consumer.connect(con_key["access_key"])
    await publisher.connect(pub_key["access_key"])
    for name in names:
        await consumer.subscribe(name)

    outstanding: set = set()
    published = failed = 0
    started = time.monotonic()
    deadline = started + phase_s
    received_at_start = received
    while time.monotonic() < deadline:
        allowed = int((time.monotonic() - started) * rate_max) + 1
        while len(outstanding) < window and published < allowed:
            fut = publisher.publish(names[published % len(names)], con_key["app_id"],
                                    PAYLOAD)
            outstanding.add(fut)
            published += 1
        done, outstanding = await asyncio.wait(
            outstanding, timeout=min(PACE_S, max(0.0, deadline - time.monotonic())),
            return_when=asyncio.FIRST_COMPLETED)
        failed += sum(1 for fut in done if fut.exception() is not None)
    elapsed_s = time.monotonic() - started
    got = received - received_at_start

    # Drain what is still on its way, so the next phase starts with empty queues.
    await asyncio.gather(*outstanding, return_exceptions=True)
    drain_deadline = time.monotonic() + 30
    while received < published and time.monotonic() < drain_deadline:
        await asyncio.sleep(0.05)
    await publisher.close()
    await consumer.close()
    return {"seconds": round(elapsed_s, 2), "published": published, "received": got,
            "publish_failures": failed, "events_per_s": round(got / elapsed_s, 1)}


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a late ack of a drained phase may fail; not counted


# -- the abuser (a process of its own) -------------------------------------------------


def abusive_frames(client_id: str, nobody: str) -> list[str]:
    return [
        "\x00\xff garbage",
        "FETCH;CLIENT_ID=:x",
        f"SUB;CLIENT_ID=:not-{client_id};EVENT_NAME=:order/created",
        f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:flood/x;PAYLOAD=:eA==;"
        f"DELIVERY_TO=:{nobody}",
        f"CONN;CLIENT_ID={client_id}",
        "PUB;" + ";".join(f"K{i}=v" for i in range(200)),
    ]


def abuse(port: int, access_key: str, seconds: float) -> dict:
    """Flood one node over a bare socket until ``seconds`` or the frame cap.

    Frames are masked once and sent as one buffer again and again, so the
    abuser outruns any per-connection limit; a reader thread drains (and
    counts) the replies, so the node's only defence is its own limits."""
    stats = {"frames": 0, "rate_limited": 0, "connections": 0, "closed_by_node": 0}
    nobody = base64.b64encode(b"\x03" * 32).decode()
    deadline = time.monotonic() + seconds
    print("ready", flush=True)
    while (time.monotonic() < deadline and stats["frames"] < ABUSE_FRAMES_MAX
           and stats["connections"] < ABUSE_RECONNECTS_MAX):
        sock = raw_ws.open_ws("127.0.0.1", port, 10.0)
        stats["connections"] += 1
        sock.sendall(raw_ws.frame(raw_ws.OP_TEXT,
                                  f"CONN;ACCESS_KEY=:{access_key}".encode()))
        reply = raw_ws.read_frames(sock, 10.0, 4096, stop=bool)[0][1].decode()
        client_id = re.search(r"clientId=([^,]+)", reply)[1]
        frames = abusive_frames(client_id, nobody) * ABUSE_BATCH_REPEAT
        batch = b"".join(raw_ws.frame(raw_ws.OP_TEXT, f.encode()) for f in frames)
        if _flood_one(sock, batch, len(frames), deadline, stats):
            stats["closed_by_node"] += 1
        sock.close()
    return stats


def _flood_one(sock, batch: bytes, batch_frames: int, deadline: float,
               stats: dict) -> bool:
    """Send ``batch`` until time, the cap, or the node closes; True if it did.

    Both threads wait with select(), never with a socket timeout, which the
    two would share."""
    closed = threading.Event()
    sock.settimeout(None)

    def drain() -> None:
        tail = b""
        while not closed.is_set():
            if not select.select([sock], [], [], SELECT_S)[0]:
                continue
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                break
            if not chunk:
                break
            data = tail + chunk
            stats["rate_limited"] += (data.count(b"RATE_LIMITED")
                                      - tail.count(b"RATE_LIMITED"))
            tail = data[-16:]
        closed.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    view, offset = memoryview(batch), 0
    while (time.monotonic() < deadline and stats["frames"] < ABUSE_FRAMES_MAX
           and not closed.is_set()):
        if not select.select([], [sock], [], SELECT_S)[1]:
            continue
        try:
            offset += sock.send(view[offset:])
        except OSError:
            break
        if offset == len(batch):
            stats["frames"] += batch_frames
            offset = 0
    by_node = closed.is_set()
    closed.set()
    reader.join(timeout=2.0)
    return by_node


def start_abuser(port: int, access_key: str, seconds: float) -> subprocess.Popen:
    abuser = subprocess.Popen(
        [sys.executable, __file__, "--abuse", str(port), "--abuse-s", str(seconds)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    abuser.stdin.write(access_key + "\n")  # not on the command line: ps shows it
    abuser.stdin.close()
    abuser.stdin = None  # so communicate() does not touch it again
    line = _readline_within(abuser, ABUSER_READY_S)
    if line.strip() != "ready":
        abuser.kill()
        raise RuntimeError(f"abuser did not start: {line!r}")
    return abuser


def _readline_within(process: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout_s):
        return ""
    return process.stdout.readline()


def stop_abuser(abuser: subprocess.Popen) -> dict:
    try:
        out, _ = abuser.communicate(timeout=ABUSER_STOP_S)
    except subprocess.TimeoutExpired:
        abuser.kill()
        out, _ = abuser.communicate(timeout=ABUSER_STOP_S)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


async def measured_phase(loaded: bool, url: str, port: int, pid: int, pub: dict,
                         con: dict, bad: dict, names: list[str], args) -> dict:
    """One phase of the pair, with the abuser running or not; the leader's
    CPU seconds over it."""
    abuser = start_abuser(port, bad["access_key"], args.phase_s + 1) if loaded else None
    cpu_s = cpu_seconds(pid)
    try:
        result = await pair_phase(url, pub, con, names, args.window, args.phase_s,
                                  args.pair_rate_max)
    finally:
        abuse_stats = stop_abuser(abuser) if abuser is not None else None
    result["node_cpu_s"] = round(cpu_seconds(pid) - cpu_s, 2)
    if abuse_stats is not None:
        result["abuser"] = abuse_stats
    return result


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the run -------------------------------------------------------------------------


async def bench(args) -> dict:
    names = [f"flood/ok/{i}" for i in range(args.names)]
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "nodes": args.nodes, "node_flags": args.node_flag,
               "window": args.window, "names": args.names,
               "pair_rate_max": args.pair_rate_max,
               "phase_s": args.phase_s, "rounds": [], "goal_ratio": RATIO_GOAL}
    with tempfile.TemporaryDirectory(prefix="ensync-flood-") as tmp:
        cluster = Cluster(size=args.nodes, base_dir=Path(tmp),
                          extra_flags=args.node_flag)
        try:
            cluster.start()
            node_id = cluster.leader()
            url = cluster.ws_url(node_id)
            pub = cluster.create_key("flood-publisher", ["*"], [])
            con = cluster.create_key("flood-consumer", [], ["*"])
            bad = cluster.create_key("flood-abuser", ["*"], ["*"])
            await pair_phase(url, pub, con, names, args.window, WARMUP_S,
                             args.pair_rate_max)
            pid = cluster.nodes[node_id].process.pid
            port = cluster.nodes[node_id].http_port
            for round_no in range(1, args.rounds + 1):
                # Alternate which phase goes first, so that a drift in the
                # machine's other load falls on both alike.
                phases = {}
                order = ("unloaded", "loaded")
                for phase in order if round_no % 2 else order[::-1]:
                    print(f"round {round_no}: {phase}", file=sys.stderr)
                    phases[phase] = await measured_phase(
                        phase == "loaded", url, port, pid, pub, con, bad, names, args)
                results["rounds"].append({
                    "unloaded": phases["unloaded"], "loaded": phases["loaded"],
                    "abuser": phases["loaded"].pop("abuser"),
                    "first": "unloaded" if round_no % 2 else "loaded"})
            metrics = cluster.metrics(node_id)
            results["node_counters"] = {
                k: int(metrics.get(f"ensync_{k}", 0)) for k in (
                    "frames_rate_limited_total", "abusive_closes_total",
                    "bad_frames_total", "fresh_read_barriers_total",
                    "fresh_reads_shared_total")}
        finally:
            cluster.stop()

    rounds = results["rounds"]
    for r in rounds:
        u = r["unloaded"]["events_per_s"]
        r["ratio"] = round(r["loaded"]["events_per_s"] / u, 3) if u else 0.0
    results["unloaded_events_per_s"] = statistics.median(
        r["unloaded"]["events_per_s"] for r in rounds)
    results["loaded_events_per_s"] = statistics.median(
        r["loaded"]["events_per_s"] for r in rounds)
    # The median of the rounds' own ratios: each compares two phases a few
    # seconds apart, which a busy machine disturbs less than a whole run.
    results["ratio"] = statistics.median(r["ratio"] for r in rounds)
    return results


def table(results: dict) -> str:
    rows = ["| round | unloaded events/s | loaded events/s | ratio | leader CPU s "
            "unloaded / loaded | abuser frames sent | abuser sockets |",
            "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results["rounds"], 1):
        un, lo, a = r["unloaded"], r["loaded"], r["abuser"]
        u, l_ = un["events_per_s"], lo["events_per_s"]
        rows.append(f"| {i} | {u} | {l_} | {r['ratio']:.2f} | {un.get('node_cpu_s')} / "
                    f"{lo.get('node_cpu_s')} | {a.get('frames', 0)} | "
                    f"{a.get('connections', 0)} |")
    rows.append(f"| median | {results['unloaded_events_per_s']} | "
                f"{results['loaded_events_per_s']} | {results['ratio']:.2f} | | | |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--phase-s", type=float, default=6.0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--pair-rate-max", type=int, default=1500,
                        help="publishes a second at most (the node allows 20 000 "
                             "frames a second per connection by default)")
    parser.add_argument("--names", type=int, default=64)
    parser.add_argument("--node-flag", action="append", default=[], metavar="FLAG",
                        help="extra node flag, e.g. --node-flag=--client-frames-"
                             "per-s-max=2000 (repeatable)")
    parser.add_argument("--out", default=None, help="directory for flood.json")
    parser.add_argument("--abuse", metavar="PORT", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--abuse-s", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.abuse:  # the abuser's process: its access key comes on stdin
        access_key = sys.stdin.readline().strip()
        stats = abuse(args.abuse, access_key, args.abuse_s)
        print(json.dumps(stats), flush=True)
        return 0

    results = asyncio.run(bench(args))
    print(table(results))
    verdict = "meets" if results["ratio"] >= RATIO_GOAL else "MISSES"
    print(f"loaded/unloaded {results['ratio']:.2f}: {verdict} the {RATIO_GOAL} goal")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "flood.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "flood.md").write_text(table(results) + "\n")
    return 0 if results["ratio"] >= RATIO_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
