"""On real nodes, +PASS waits for the journal to reach the disk on a majority.

strace delays every ``fdatasync`` inside chosen followers (the journal's group
commit is the only fdatasync a node makes under this load). If a follower
acknowledged entries before they were on disk, or the leader answered a publisher
before a majority had synced, a publish would come back without waiting out the
delay. n1 gets short election timeouts and the followers long ones, so n1 leads
and a stalled follower never starts an election.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from node.client import Client

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed")

DELAY_MS = 1500
PAYLOAD = base64.b64encode(b'{"k": 1}').decode()
FOLLOWER_TIMEOUTS = ["--raft-min-timeout-ms", "6000", "--raft-max-timeout-ms", "9000"]


def _slow_disk(trace_file: Path) -> list[str]:
    return [STRACE, "-f", "-qq", "-e", "trace=fdatasync",
            "-e", f"inject=fdatasync:delay_enter={DELAY_MS * 1000}",
            "-o", str(trace_file), "--"]


def _tracees(cluster) -> list[int]:
    """PIDs of node processes running under strace (children of the tracer)."""
    pids = []
    for node in cluster.nodes.values():
        if node.process is None or not cluster.wrappers.get(node.node_id):
            continue
        path = f"/proc/{node.process.pid}/task/{node.process.pid}/children"
        if os.path.exists(path):
            pids += [int(p) for p in open(path).read().split()]
    return pids


def _start(cluster_factory, tmp_path: Path, slow: list[str]):
    flags = {"n1": ["--raft-min-timeout-ms", "300", "--raft-max-timeout-ms", "600"],
             "n2": FOLLOWER_TIMEOUTS, "n3": FOLLOWER_TIMEOUTS}
    wrappers = {n: _slow_disk(tmp_path / f"{n}.strace") for n in slow}
    cluster = cluster_factory(3, node_flags=flags, wrappers=wrappers,
                              extra_flags=["--write-timeout-ms", "20000"])
    assert cluster.leader() == "n1"
    return cluster


async def _publish_latency_s(cluster, count: int) -> list[float]:
    key = cluster.create_key("durable", ["*"], ["*"])
    client = Client(cluster.ws_url("n1"))
    await client.connect(key["access_key"])
    try:
        latencies = []
        for _ in range(count):
            started = time.monotonic()
            reply = await client.publish("d/e", key["app_id"], PAYLOAD)
            latencies.append(time.monotonic() - started)
            assert reply.startswith("PUBLISHED;IDEM=")
        return latencies
    finally:
        await client.close()


def _stop_tracees(cluster) -> None:
    for pid in _tracees(cluster):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_pass_waits_for_fdatasync_when_both_followers_are_slow(
        cluster_factory, tmp_path):
    cluster = _start(cluster_factory, tmp_path, slow=["n2", "n3"])
    try:
        latencies = await _publish_latency_s(cluster, 3)
    finally:
        _stop_tracees(cluster)
    assert min(latencies) >= 0.8 * DELAY_MS / 1000, latencies
    syncs = (tmp_path / "n2.strace").read_text().count("fdatasync(")
    assert syncs > 0


async def test_pass_needs_only_the_majority_that_synced_in_time(
        cluster_factory, tmp_path):
    cluster = _start(cluster_factory, tmp_path, slow=["n3"])
    try:
        latencies = await _publish_latency_s(cluster, 5)
    finally:
        _stop_tracees(cluster)
    assert max(latencies) < 0.5 * DELAY_MS / 1000, latencies
