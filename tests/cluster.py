"""Real N-node clusters for integration tests.

Each node is a `python -m node.main` subprocess (the interpreter running the
tests) bound to 127.0.0.1 on free ephemeral ports, with its data dir and log
under one temporary directory. Ports are found by binding port 0 and closing
the socket again, so another process may grab one before the node binds it;
a node that then exits complaining about the address makes the whole cluster
start again on fresh ports, a bounded number of times.

Everything waits on conditions with deadlines: the node's `ready` log line,
then a leader with a quorum that a majority agrees on. Every timeout raises
ClusterError carrying the tail of each node's log, because the log is where
the reason is.

Nodes are stopped by pid, SIGTERM then SIGKILL, from the fixture finalizer,
from atexit, and (on Linux) by the kernel if the test process dies first.

Like ./scripts/start-cluster, a cluster gets a fresh Raft secret in a 0600 file
(``cluster_secret=False`` runs without one) and the admin token through the
environment, so neither shows in ``ps``. ``tls`` (tests/tls.py) makes every
node serve wss:// and https:// with a test certificate.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self, TypeVar

from node.ctl import CtlError, request_json
from tests.tls import TlsFiles

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

READY_TIMEOUT_S = 30.0
LEADER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05
START_ATTEMPTS_MAX = 3
HTTP_TIMEOUT_MS = 2000
WRITE_TIMEOUT_MS = 15_000
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES_MAX = 32_768
PORT_IN_USE_MARKERS = ("Address already in use", "Errno 98")
PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ClusterError(Exception):
    """The cluster did not reach a state a test waited for."""


class PortCollision(ClusterError):
    """A node lost its port to another process between probing and binding."""


@dataclass
class Node:
    node_id: str
    http_port: int
    raft_port: int
    data_dir: Path
    log_file: Path
    flags: list[str]
    process: subprocess.Popen | None = None
    log_handle: IO[bytes] | None = None
    log_offset: int = 0
    tls: bool = False

    @property
    def admin_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.http_port}/message"

    @property
    def raft_address(self) -> str:
        return f"{HOST}:{self.raft_port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


_live_clusters: set[Cluster] = set()


@atexit.register
def _stop_live_clusters() -> None:
    for cluster in list(_live_clusters):
        cluster.stop()


def free_ports(count: int) -> list[int]:
    """Distinct ports the kernel had free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _find_prctl() -> Callable[..., int] | None:
    # Resolved here, not in the forked child, where loading could deadlock.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the test process dies."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES_MAX))
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """A real cluster of node processes; see the module docstring."""

    def __init__(
        self,
        size: int = 3,
        base_dir: Path | None = None,
        raft_min_timeout_ms: int = 600,
        raft_max_timeout_ms: int = 1200,
        admin_token: str | None = None,
        node_flags: dict[str, list[str]] | None = None,
        extra_flags: Iterable[str] = (),
        wrappers: dict[str, list[str]] | None = None,
        cluster_secret: bool = True,
        tls: TlsFiles | None = None,
    ) -> None:
        assert size >= 1
        assert 0 < raft_min_timeout_ms < raft_max_timeout_ms

        self.size = size
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="ensync-cluster-"))
        self.raft_min_timeout_ms = raft_min_timeout_ms
        self.raft_max_timeout_ms = raft_max_timeout_ms
        self.admin_token = admin_token or secrets.token_urlsafe(16)
        self.node_flags = dict(node_flags or {})
        self.extra_flags = list(extra_flags)
        # Per node, a command line that runs the node (e.g. strace ... --).
        self.wrappers = dict(wrappers or {})
        self.nodes: dict[str, Node] = {}
        self.tls = tls
        self.tls_context = None if tls is None else tls.client_context()
        self.cluster_secret: str | None = None
        self.cluster_secret_file = self.base_dir / "cluster_secret"
        if cluster_secret:
            self.cluster_secret = secrets.token_urlsafe(32)
            self.base_dir.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            fd = os.open(self.cluster_secret_file, flags, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.cluster_secret + "\n")

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Cluster:
        _live_clusters.add(self)
        for attempt in range(1, START_ATTEMPTS_MAX + 1):
            self._plan_nodes()
            try:
                for node in self.nodes.values():
                    self._spawn(node)
                for node in self.nodes.values():
                    self._wait_ready(node)
                break
            except PortCollision:
                self._stop_processes()
                self._close_logs()
                if attempt == START_ATTEMPTS_MAX:
                    raise
        self.leader()
        return self

    def _plan_nodes(self) -> None:
        ports = free_ports(2 * self.size)
        self.nodes = {}
        for index in range(1, self.size + 1):
            node_id = f"n{index}"
            data_dir = self.base_dir / node_id
            data_dir.mkdir(parents=True, exist_ok=True)
            self.nodes[node_id] = Node(
                node_id=node_id,
                http_port=ports[2 * index - 2],
                raft_port=ports[2 * index - 1],
                data_dir=data_dir,
                log_file=data_dir / "node.log",
                flags=self.node_flags.get(node_id, []),
                tls=self.tls is not None,
            )

    def _command(self, node: Node) -> list[str]:
        peers = ",".join(
            f"{peer.node_id}={peer.raft_address}"
            for peer in self.nodes.values()
            if peer is not node
        )
        command = [sys.executable, "-m", "node.main", "--id", node.node_id]
        command += ["--host", HOST, "--port", str(node.http_port)]
        command += ["--raft", node.raft_address, "--data-dir", str(node.data_dir)]
        command += ["--raft-min-timeout-ms", str(self.raft_min_timeout_ms)]
        command += ["--raft-max-timeout-ms", str(self.raft_max_timeout_ms)]
        if peers:
            command += ["--peers", peers]
            command += ["--peer-http", self._peer_http(node)]
        if self.cluster_secret is not None:
            command += ["--cluster-secret-file", str(self.cluster_secret_file)]
        if self.tls is not None:
            command += ["--tls-cert", str(self.tls.cert)]
            command += ["--tls-key", str(self.tls.key), "--tls-ca", str(self.tls.ca)]
        wrapper = self.wrappers.get(node.node_id, [])
        return wrapper + command + self.extra_flags + node.flags

    def _peer_http(self, node: Node) -> str:
        return ",".join(
            f"{peer.node_id}={peer.admin_url}"
            for peer in self.nodes.values()
            if peer is not node
        )

    def _spawn(self, node: Node) -> None:
        # A developer's ENSYNC_* settings must not leak into test nodes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["ENSYNC_ADMIN_TOKEN"] = self.admin_token  # not on the command line

        # The handle outlives this call: restarts append to the same log.
        if node.log_handle is None:
            node.log_handle = open(node.log_file, "ab")  # noqa: SIM115
        node.log_offset = node.log_file.stat().st_size
        node.process = subprocess.Popen(
            self._command(node),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=node.log_handle,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (only calls prctl)
        )

    def _wait_ready(self, node: Node) -> None:
        pattern = re.compile(rf"\bready id={re.escape(node.node_id)}\b")

        def ready() -> bool:
            if node.process.poll() is not None:
                self._raise_exited(node)
            return bool(pattern.search(self._log_since_start(node)))

        self.wait_for(ready, READY_TIMEOUT_S, f"{node.node_id} to log ready")

    def _raise_exited(self, node: Node) -> None:
        code = node.process.returncode
        text = self._log_since_start(node)
        if any(marker in text for marker in PORT_IN_USE_MARKERS):
            raise PortCollision(f"{node.node_id} lost its port; retrying")
        raise ClusterError(
            f"{node.node_id} exited with code {code} before ready\n" + self.log_tails()
        )

    def _log_since_start(self, node: Node) -> str:
        with open(node.log_file, "rb") as log:
            log.seek(node.log_offset)
            return log.read().decode(errors="replace")

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Signal one node; wait for it to exit unless sig pauses or resumes it."""
        node = self.nodes[node_id]
        assert node.process is not None
        if node.process.poll() is not None:
            return
        node.process.send_signal(sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self._wait_exit(node, STOP_TIMEOUT_S)

    def restart(self, node_id: str) -> None:
        """Start a stopped node again on its old ports and data dir."""
        node = self.nodes[node_id]
        assert not node.running(), f"{node_id} is still running"
        self._spawn(node)
        self._wait_ready(node)

    def stop(self) -> None:
        """Stop every node: SIGTERM, then SIGKILL what outlives the deadline."""
        self._stop_processes()
        self._close_logs()
        _live_clusters.discard(self)

    def _close_logs(self) -> None:
        for node in self.nodes.values():
            if node.log_handle is not None:
                node.log_handle.close()
                node.log_handle = None

    def _stop_processes(self) -> None:
        running = [node for node in self.nodes.values() if node.running()]
        for node in running:
            # A paused node would hold SIGTERM until it is resumed.
            node.process.send_signal(signal.SIGCONT)
            node.process.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in running:
            self._wait_exit(node, max(0.0, deadline - time.monotonic()))

    def _wait_exit(self, node: Node, timeout_s: float) -> None:
        try:
            node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=KILL_TIMEOUT_S)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes)

    def running_ids(self) -> list[str]:
        return [node_id for node_id, node in self.nodes.items() if node.running()]

    def admin_url(self, node_id: str) -> str:
        return self.nodes[node_id].admin_url

    def ws_url(self, node_id: str) -> str:
        return self.nodes[node_id].ws_url

    def request(
        self,
        node_id: str,
        path: str,
        method: str = "GET",
        body: dict[str, Any] | None = None,
        timeout_ms: int = HTTP_TIMEOUT_MS,
    ) -> dict[str, Any]:
        url = self.admin_url(node_id) + path
        return request_json(
            url, self.admin_token, timeout_ms, method, body, self.tls_context)

    def status(self, node_id: str) -> dict[str, Any]:
        return self.request(node_id, "/admin/status")

    def digest(self, node_id: str) -> dict[str, Any]:
        return self.request(node_id, "/admin/digest")

    def metrics(self, node_id: str) -> dict[str, float]:
        """The unlabelled samples of a node's ``/metrics``, name -> value."""
        url = self.admin_url(node_id) + "/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_MS / 1000,
                                    context=self.tls_context) as resp:
            text = resp.read().decode()
        pairs = (line.split() for line in text.splitlines() if line[:1] not in ("", "#"))
        return {p[0]: float(p[1]) for p in pairs if len(p) == 2 and "{" not in p[0]}

    def create_key(
        self, name: str, send: list[str], receive: list[str]
    ) -> dict[str, Any]:
        body = {"name": name, "send": send, "receive": receive}
        return self.request(
            self.leader(), "/admin/keys", "POST", body, WRITE_TIMEOUT_MS
        )

    def leader(self, timeout_s: float = LEADER_TIMEOUT_S) -> str:
        """The id of the leader that has a quorum and that a majority follows."""
        return self.wait_for(self._agreed_leader, timeout_s, "an agreed leader")

    def _agreed_leader(self) -> str | None:
        statuses = {}
        for node_id in self.running_ids():
            try:
                statuses[node_id] = self.status(node_id)
            except CtlError:
                continue

        claimants = [
            s for s in statuses.values() if s["role"] == "leader" and s["has_quorum"]
        ]
        if not claimants:
            return None
        leader = max(claimants, key=lambda status: status["term"])["id"]
        followers = [s for s in statuses.values() if s.get("leader") == leader]
        return leader if len(followers) > self.size // 2 else None

    # -- waiting and diagnostics ----------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout_s: float, what: str) -> T:
        """Poll until predicate returns something truthy; return that value."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (CtlError, OSError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)

        detail = f"; last error: {last_error}" if last_error else ""
        raise ClusterError(
            f"timed out after {timeout_s:g} s waiting for {what}{detail}\n"
            + self.log_tails()
        )

    def log_tail(self, node_id: str, lines: int = LOG_TAIL_LINES) -> str:
        return read_tail(self.nodes[node_id].log_file, lines)

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [
            f"--- {node.node_id} ({node.log_file}) ---\n{read_tail(node.log_file, lines)}"
            for node in self.nodes.values()
        ]
        return "\n".join(parts)

    def write_cluster_file(self, path: Path) -> Path:
        """Write a cluster.json as ./scripts/start-cluster would, for ensyncctl."""
        nodes = [
            {
                "id": node.node_id,
                "pid": node.process.pid if node.process else None,
                "ws_url": node.ws_url,
                "admin_url": node.admin_url,
                "raft_address": node.raft_address,
                "data_dir": str(node.data_dir),
                "log_file": str(node.log_file),
            }
            for node in self.nodes.values()
        ]
        cluster = {"nodes": nodes, "admin_token": self.admin_token}
        path.write_text(json.dumps(cluster, indent=2))
        return path
