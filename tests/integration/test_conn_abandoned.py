"""A CONN whose client left before the session op committed leaves no session.

Both followers of n1 run under strace with every ``fdatasync`` delayed, so each
commit takes about DELAY_MS. The client sends CONN on a bare socket and closes
it at once: the node sees the socket close while ``session_open`` is still
waiting for a majority. When the open commits, nobody is left to close the
session, so the node must close it itself; before the fix it stayed ``active``
in ``/admin/sessions`` and held a slot of connections_per_key_max until the
node restarted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.integration.test_durability_nodes import (
    FOLLOWER_TIMEOUTS,
    _slow_disk,
    _stop_tracees,
)
from tests.node.raw_ws import OP_TEXT, frame, open_ws

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace is not installed")

WAIT_S = 30


def _sessions_of(cluster, app: str) -> list[dict]:
    rows = cluster.request("n1", "/admin/sessions")["sessions"]
    return [row for row in rows if row.get("app") == app]


def test_conn_abandoned_while_committing_closes_its_session(cluster_factory,
                                                              tmp_path: Path):
    flags = {"n1": ["--raft-min-timeout-ms", "300", "--raft-max-timeout-ms", "600"],
             "n2": FOLLOWER_TIMEOUTS, "n3": FOLLOWER_TIMEOUTS}
    wrappers = {n: _slow_disk(tmp_path / f"{n}.strace") for n in ("n2", "n3")}
    cluster = cluster_factory(3, node_flags=flags, wrappers=wrappers,
                              extra_flags=["--write-timeout-ms", "20000",
                                           "--connections-per-key-max", "1"])
    try:
        assert cluster.leader() == "n1"
        key = cluster.create_key("leaver", ["*"], ["*"])
        port = int(cluster.admin_url("n1").rsplit(":", 1)[1])

        sock = open_ws("127.0.0.1", port, timeout_s=5)
        conn = f"CONN;ACCESS_KEY={key['access_key']}".encode()
        sock.sendall(frame(OP_TEXT, conn))
        sock.close()  # gone long before the open can commit

        def closed_again() -> dict | None:
            rows = _sessions_of(cluster, key["app_id"])
            done = [row for row in rows if row.get("status") == "disconnected"]
            live = [row for row in rows if row.get("status") != "disconnected"]
            return done[0] if done and not live else None

        row = cluster.wait_for(closed_again, WAIT_S, "the abandoned session to close")
        # The key's only slot (connections_per_key_max=1) is free again.
        reply = _conn_reply(port, conn)
    finally:
        _stop_tracees(cluster)
    assert b"+PASS:{clientId=" in reply, reply
    # The CONN did commit (a session opened, then closed), so the race happened.
    assert row.get("reason") == "client left during CONN", row
    metrics = cluster.metrics("n1")
    assert metrics.get("ensync_abandoned_sessions_total", 0) >= 1, metrics


def _conn_reply(port: int, conn: bytes) -> bytes:
    sock = open_ws("127.0.0.1", port, timeout_s=WAIT_S)
    try:
        sock.sendall(frame(OP_TEXT, conn))
        deadline = time.monotonic() + WAIT_S
        reply = b""
        while b"+PASS" not in reply and b"-FAIL" not in reply:
            assert time.monotonic() < deadline, reply
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
        return reply
    finally:
        sock.close()
