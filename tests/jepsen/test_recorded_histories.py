"""Histories recorded by real jepsen-lite runs that found broker bugs.

Each file in ``histories/`` is a whole ``history.jsonl`` (gzip) of a run that was
INVALID, kept as a regression case for the checker: replaying it must give the
same verdict, the same anomalies and the same examples, whatever the checker
learns later. The broker fixes have their own tests, named in each case.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

JEPSEN_LITE_DIR = Path(__file__).resolve().parents[2] / "jepsen-lite"
if str(JEPSEN_LITE_DIR) not in sys.path:
    sys.path.insert(0, str(JEPSEN_LITE_DIR))

import checker  # noqa: E402

HISTORIES = Path(__file__).resolve().parent / "histories"


def _load(name: str) -> list[dict]:
    with gzip.open(HISTORIES / name, "rt") as f:
        return [json.loads(line) for line in f]


def test_seed_31_partition_snapshot_commit_is_caught():
    """``scripts/chaos --seed 31 --minutes 1 --nemesis partition``, before the fix
    in raft/commit_guard.py (tested in tests/raft/test_commit_guard.py).

    n3 led term 18 behind a one-way partition; n1 took over in term 23 without
    n3's last entries and sent n3 a snapshot. While it arrived, n3 committed and
    applied its own stale entries: it told producer 2 that pid 2-251 got the idem
    the cluster gave to pid 3-79, and told consumer 5 its ack of attempt 1 passed,
    after which the event came again as attempt 2.
    """
    history = _load("seed31-partition-snapshot-commit.jsonl.gz")
    result = checker.check(history, {"delivery_limit": 4})

    assert result["valid"] is False
    assert result["seed"] == 31
    counts = result["counts"]
    assert counts["lost"] == 0
    assert counts["inconsistent_idem"] == 1
    assert counts["redelivered_after_ack"] == 2
    failing = {name for name, a in result["anomalies"].items() if a["valid"] is False}
    assert failing == {"inconsistent_idem", "redelivered_after_ack"}

    [wrong_reply] = result["anomalies"]["inconsistent_idem"]["examples"]
    assert wrong_reply["kind"] == "reply_names_other_event"
    assert (wrong_reply["pid"], wrong_reply["idem"]) == ("2-251",
                                                         "evt-0021-0000000000cd")
    redelivered = {(e["idem"], e["attempt"]) for e in
                   result["anomalies"]["redelivered_after_ack"]["examples"]}
    assert ("evt-0026-0000000000d2", 2) in redelivered
