"""One pysyncobj node for the durability tests, driven by JSON lines on stdin.

Each request is one JSON object per line; each answer is one JSON object per line
on stdout. The first line out is ``{"event": "started", "pid": ...}``, so a test
that runs the node under strace learns the node's own pid. End of stdin stops the
node, so a crashed test never leaves it running for long.

Requests:
    {"op": "status"}
    {"op": "incr", "count": N, "concurrency": C, "timeout_ms": T}
    {"op": "quit"}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from raft.durability import (
    SyncingTCPTransport,
    durable_journal_of,
    install_durable_journal,
)

INCR_COUNT_MAX = 10_000
INCR_CONCURRENCY_MAX = 200


class Counter(SyncObj):
    def __init__(self, self_address: str, partners: list[str], conf: SyncObjConf):
        super().__init__(
            self_address, partners, conf, transportClass=SyncingTCPTransport
        )
        self.value = 0

    @replicated
    def incr(self) -> int:
        self.value += 1
        return self.value


def _conf(args: argparse.Namespace) -> SyncObjConf:
    raft_max_timeout_s = args.raft_max_timeout_ms / 1000
    return SyncObjConf(
        journalFile=args.journal,
        bindAddress=args.self_address,
        autoTickPeriod=args.tick_period_ms / 1000,
        appendEntriesUseBatch=not args.no_batch,
        appendEntriesPeriod=args.append_entries_period_ms / 1000,
        raftMinTimeout=args.raft_min_timeout_ms / 1000,
        raftMaxTimeout=raft_max_timeout_s,
        connectionTimeout=max(3.5, raft_max_timeout_s * 1.5),
        connectionRetryTime=0.2,
        # No snapshots in these tests: a journal without a dump file must not compact.
        logCompactionMinEntries=1_000_000,
        logCompactionMinTime=3600,
        password=args.password,  # sealed peer frames, as with cluster_secret
    )


def _status(node: Counter) -> dict:
    leader = node._getLeader()
    return {
        "is_leader": node._isLeader(),
        "leader": None if leader is None else leader.id,
        "term": node._getTerm(),
        "value": node.value,
        "journal": dataclasses.asdict(durable_journal_of(node).statistics()),
    }


def _incr(node: Counter, count: int, concurrency: int, timeout_ms: int) -> dict:
    assert 0 < count <= INCR_COUNT_MAX
    assert 0 < concurrency <= INCR_CONCURRENCY_MAX
    slots = threading.Semaphore(concurrency)
    lock = threading.Lock()
    finished = threading.Event()
    outcome = {"done": 0, "errors": {}, "latencies_ms": []}
    deadline = time.monotonic() + timeout_ms / 1000

    def on_result(started: float, _result, error) -> None:
        with lock:
            outcome["latencies_ms"].append((time.monotonic() - started) * 1000)
            if error == FAIL_REASON.SUCCESS:
                outcome["done"] += 1
            else:
                outcome["errors"][str(error)] = outcome["errors"].get(str(error), 0) + 1
            if len(outcome["latencies_ms"]) == count:
                finished.set()
        slots.release()

    started = time.monotonic()
    for _ in range(count):
        if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
        call_started = time.monotonic()
        node.incr(callback=lambda r, e, s=call_started: on_result(s, r, e))
    finished.wait(timeout=max(0.0, deadline - time.monotonic()))

    with lock:
        latencies_ms = sorted(outcome["latencies_ms"])
        return {
            "done": outcome["done"],
            "errors": dict(outcome["errors"]),
            "answered": len(latencies_ms),
            "elapsed_ms": (time.monotonic() - started) * 1000,
            "max_latency_ms": latencies_ms[-1] if latencies_ms else None,
        }


def _serve(node: Counter) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "status":
            answer = _status(node)
        elif op == "incr":
            answer = _incr(
                node, request["count"], request["concurrency"], request["timeout_ms"]
            )
        elif op == "quit":
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--self-address", required=True)
    parser.add_argument("--partner", action="append", default=[])
    parser.add_argument("--journal", required=True)
    parser.add_argument("--raft-min-timeout-ms", type=int, required=True)
    parser.add_argument("--raft-max-timeout-ms", type=int, required=True)
    parser.add_argument("--append-entries-period-ms", type=int, default=20)
    parser.add_argument("--tick-period-ms", type=int, default=5)
    parser.add_argument(
        "--no-batch", action="store_true", help="AppendEntries per entry"
    )
    parser.add_argument("--password", default=None, help="pysyncobj's password")
    args = parser.parse_args()

    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.self_address} %(levelname)s %(name)s %(message)s",
    )
    install_durable_journal()
    node = Counter(args.self_address, args.partner, _conf(args))
    print(json.dumps({"event": "started", "pid": os.getpid()}), flush=True)

    try:
        _serve(node)
    finally:
        node.destroy_synchronous()
        print(json.dumps({"event": "stopped"}), flush=True)


if __name__ == "__main__":
    main()
