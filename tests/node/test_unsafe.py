"""The UNSAFE ack-before-commit switch (node/unsafe.py): refused outside test
builds, loud when on, and it really answers before it commits.

The campaign test (tests/jepsen/test_campaign.py) shows what it is for: nodes
started with it lose acknowledged events under kill -9, and the checker says so.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from node import main as node_main
from node import unsafe
from node.errors import Unavailable

ON = {unsafe.ACK_BEFORE_COMMIT_ENV: "1", unsafe.TEST_BUILD_ENV: "1"}


def test_off_unless_asked_for_and_refused_outside_a_test_build():
    assert unsafe.ack_before_commit_requested({}) is False
    assert unsafe.ack_before_commit_requested({unsafe.TEST_BUILD_ENV: "1"}) is False
    assert unsafe.ack_before_commit_requested(ON) is True
    for test_build in ("", "0", "true"):
        with pytest.raises(unsafe.UnsafeRefused, match=unsafe.TEST_BUILD_ENV):
            unsafe.ack_before_commit_requested(
                {unsafe.ACK_BEFORE_COMMIT_ENV: "1", unsafe.TEST_BUILD_ENV: test_build})


def test_the_node_refuses_to_start_with_it_outside_a_test_build(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(unsafe.ACK_BEFORE_COMMIT_ENV, "1")
    monkeypatch.delenv(unsafe.TEST_BUILD_ENV, raising=False)
    code = node_main.main(["--admin-token=t", "--data-dir", str(tmp_path / "d"),
                           "--log-file", str(tmp_path / "node.log")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ensync-node: error: ")
    assert unsafe.ACK_BEFORE_COMMIT_ENV in err and unsafe.TEST_BUILD_ENV in err
    assert not (tmp_path / "d").exists(), "nothing may start"


class _Committer:
    """Records commits; the first ``failures`` raise like a node without quorum."""

    def __init__(self, failures: int = 0) -> None:
        self.ops: list[dict] = []
        self.failures = failures
        self.done = asyncio.Event()

    async def __call__(self, op: dict) -> dict:
        if self.failures:
            self.failures -= 1
            raise Unavailable("no commit within 5000 ms, outcome unknown")
        self.ops.append(op)
        self.done.set()
        return {"ok": True, "idem": f"evt-{len(self.ops)}", "ts": 1}


async def test_a_publish_is_answered_at_once_and_committed_after_the_hold(
        monkeypatch, caplog):
    for name, value in ON.items():
        monkeypatch.setenv(name, value)
    committer, counters = _Committer(), collections.Counter()
    acker = unsafe.EarlyAcker.from_environment(committer, counters)
    assert acker is not None
    assert any(r.levelname == "CRITICAL" and "UNSAFE" in r.getMessage()
               for r in caplog.records)
    acker.hold_ms = 200
    try:
        started = asyncio.get_running_loop().time()
        replies = [acker.publish({"op": "publish", "n": n}) for n in range(3)]
        for reply in replies:
            assert reply.startswith("+PASS:PUBLISHED;TIMESTAMP=")
            assert "IDEM" not in reply  # no offset exists yet
        assert committer.ops == [] and counters["unsafe_early_acks_total"] == 3

        async with asyncio.timeout(5):
            while len(committer.ops) < 3:
                committer.done.clear()
                await committer.done.wait()
        assert asyncio.get_running_loop().time() - started >= 0.2
        assert [op["n"] for op in committer.ops] == [0, 1, 2]
    finally:
        acker.close()


async def test_a_full_hold_takes_the_safe_path_and_close_drops_what_is_held():
    committer, counters = _Committer(), collections.Counter()
    acker = unsafe.EarlyAcker(committer, counters, hold_ms=60_000, held_max=2)
    assert acker.publish({"n": 0}) and acker.publish({"n": 1})
    assert acker.publish({"n": 2}) is None, "beyond the limit: commit first"
    acker.close()  # what a crash would lose
    await asyncio.sleep(0.05)
    assert committer.ops == []


async def test_a_failed_late_commit_is_counted_not_raised():
    committer, counters = _Committer(failures=1), collections.Counter()
    acker = unsafe.EarlyAcker(committer, counters, hold_ms=10)
    try:
        acker.publish({"n": 0})
        acker.publish({"n": 1})
        async with asyncio.timeout(5):
            await committer.done.wait()
        assert [op["n"] for op in committer.ops] == [1]
        assert counters["unsafe_early_acks_failed_total"] == 1
    finally:
        acker.close()
