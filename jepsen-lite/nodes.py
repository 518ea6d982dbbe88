"""Three node processes, each on a loopback address of its own (127.0.0.2-4).

Why separate addresses: a firewall rule can then name a node by its address, and
cut one link (n1 -> n2) without touching the others or the harness, whose own
connections come from 127.0.0.1. Raft's outgoing connections leave from the
node's address too (``raft.machine.install_raft_source_address``);
``raft_link_sources`` checks that with ``ss``, since a partition of links that
all come from 127.0.0.1 would silently cut nothing.

Processes are ours alone: we start them, keep the ``Popen``, and signal them by
that pid only. Each dies with the harness (``PR_SET_PDEATHSIG``) if the harness
itself is killed, so a crashed run leaves no node behind. Spawning happens on the
asyncio thread: the death signal follows the *thread* that forked.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from options import RunOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.unsafe import ACK_BEFORE_COMMIT_ENV, TEST_BUILD_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATUS_TIMEOUT_MS = 1000
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
READY_TIMEOUT_MS = 30_000
POLL_INTERVAL_MS = 100
PR_SET_PDEATHSIG = 1


class HarnessError(Exception):
    """The harness could not set up or drive the cluster (not a broker verdict)."""


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()


def _die_with_harness() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class NodeProcess:
    node_id: str
    host: str
    http_port: int
    raft_port: int
    data_dir: Path
    process: subprocess.Popen | None = None
    paused: bool = False
    starts_total: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"{self.url}/message"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "node.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Nodes:
    """Start, kill, pause and resume the three nodes of one run."""

    def __init__(self, options: RunOptions, base_dir: Path, admin_token: str) -> None:
        self.options = options
        self.admin_token = admin_token
        self.nodes: dict[str, NodeProcess] = {}
        for index, host in enumerate(options.node_hosts, start=1):
            data_dir = base_dir / f"n{index}"
            data_dir.mkdir(parents=True, exist_ok=True)
            self.nodes[f"n{index}"] = NodeProcess(
                f"n{index}", host, free_port(host), free_port(host), data_dir)
        self._http: aiohttp.ClientSession | None = None

    @property
    def ids(self) -> list[str]:
        return list(self.nodes)

    def hosts(self) -> set[str]:
        return {node.host for node in self.nodes.values()}

    # -- processes ---------------------------------------------------------------

    def _command(self, node: NodeProcess) -> list[str]:
        o = self.options
        peers = ",".join(f"{p.node_id}={p.raft_address}"
                         for p in self.nodes.values() if p is not node)
        return [sys.executable, "-m", "node.main", "--id", node.node_id,
                "--host", node.host, "--port", str(node.http_port),
                "--raft", node.raft_address, "--peers", peers,
                "--data-dir", str(node.data_dir), "--log-file", str(node.log_file),
                f"--admin-token={self.admin_token}",
                "--raft-min-timeout-ms", str(o.raft_min_timeout_ms),
                "--raft-max-timeout-ms", str(o.raft_max_timeout_ms),
                "--leader-fallback-timeout-ms", str(o.leader_fallback_timeout_ms),
                "--write-timeout-ms", str(o.write_timeout_ms),
                "--delivery-limit", str(o.delivery_limit),
                "--compaction-min-entries", str(o.compaction_min_entries),
                "--compaction-min-time-ms", str(o.compaction_min_time_ms)]

    def spawn(self, node_id: str) -> None:
        node = self.nodes[node_id]
        assert not node.running(), f"{node_id} is running"

        # A developer's ENSYNC_* settings must not leak into the run's nodes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")
        if self.options.unsafe_ack_before_commit:
            env.update({ACK_BEFORE_COMMIT_ENV: "1", TEST_BUILD_ENV: "1"})
        with open(node.data_dir / "stdout.log", "ab") as out:
            node.process = subprocess.Popen(
                self._command(node), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_harness)  # noqa: PLW1509 (only calls prctl)
        node.paused = False
        node.starts_total += 1

    def kill(self, node_id: str) -> None:
        """SIGKILL by our own pid, and reap it."""
        node = self.nodes[node_id]
        if not node.running():
            return
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=KILL_TIMEOUT_S)
        node.paused = False

    def pause(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.running():
            node.process.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.running() and node.paused:
            node.process.send_signal(signal.SIGCONT)
        node.paused = False

    def resume_all(self) -> None:
        for node_id in self.nodes:
            self.resume(node_id)

    def dead_ids(self) -> list[str]:
        return [node_id for node_id, node in self.nodes.items() if not node.running()]

    def stop_all(self) -> None:
        """SIGCONT then SIGTERM every node we run, SIGKILL what outlives the wait.

        Synchronous on purpose: it also runs from atexit and signal paths.
        """
        running = [node for node in self.nodes.values() if node.running()]
        for node in running:
            node.process.send_signal(signal.SIGCONT)  # a stopped node holds SIGTERM
            node.process.send_signal(signal.SIGTERM)
            node.paused = False

        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in running:
            try:
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=KILL_TIMEOUT_S)

    def stopped_processes(self) -> list[str]:
        """Our node pids that the kernel shows stopped (state T); should be none."""
        stopped = []
        for node in self.nodes.values():
            if not node.running():
                continue
            try:
                with open(f"/proc/{node.process.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state in ("T", "t"):
                stopped.append(node.node_id)
        return stopped

    # -- HTTP ----------------------------------------------------------------------

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.admin_token}"})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def get(self, node_id: str, path: str,
                  timeout_ms: int = STATUS_TIMEOUT_MS) -> dict | None:
        """The JSON answer of one node, or None when it does not answer in time."""
        node = self.nodes[node_id]
        if not node.running() or node.paused:
            return None
        timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        try:
            async with self._http.get(node.url + path, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                return await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def post(self, node_id: str, path: str, body: dict,
                   timeout_ms: int) -> dict:
        node = self.nodes[node_id]
        timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        async with self._http.post(node.url + path, json=body,
                                   timeout=timeout) as resp:
            data = await resp.json()
            if resp.status not in (200, 201):
                raise HarnessError(f"{node_id} {path}: {resp.status} "
                                   f"{data.get('error')} {data.get('message')}")
            return data

    async def statuses(self) -> dict[str, dict]:
        ids = self.ids
        answers = await asyncio.gather(*(self.get(i, "/admin/status") for i in ids))
        return {i: s for i, s in zip(ids, answers) if s is not None}

    async def agreed_leader(self) -> str | None:
        """The leader with a quorum whom a majority of answering nodes follows."""
        statuses = await self.statuses()
        claimants = [s for s in statuses.values()
                     if s["role"] == "leader" and s["has_quorum"]]
        if not claimants:
            return None
        leader = max(claimants, key=lambda s: s["term"])["id"]
        followers = [s for s in statuses.values() if s.get("leader") == leader]
        return leader if len(followers) > len(self.nodes) // 2 else None

    async def wait_leader(self, timeout_ms: int) -> str | None:
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            leader = await self.agreed_leader()
            if leader is not None:
                return leader
            await asyncio.sleep(POLL_INTERVAL_MS / 1000)
        return None

    async def wait_healthy(self, node_ids: list[str], timeout_ms: int) -> list[str]:
        """Wait until each node answers /health; return the ids that never did."""
        deadline = time.monotonic() + timeout_ms / 1000
        waiting = list(node_ids)
        while waiting and time.monotonic() < deadline:
            answers = await asyncio.gather(*(self.get(i, "/health") for i in waiting))
            waiting = [i for i, a in zip(waiting, answers) if a is None]
            for node_id in waiting:
                if not self.nodes[node_id].running():
                    raise HarnessError(f"{node_id} exited during start; see "
                                       f"{self.nodes[node_id].log_file}")
            if waiting:
                await asyncio.sleep(POLL_INTERVAL_MS / 1000)
        return waiting


def raft_link_sources(nodes: Nodes) -> tuple[int, list[str]]:
    """(links checked, problems): every established connection to a node's Raft
    port must come from one of the node addresses, never from 127.0.0.1."""
    raft_ends = {(n.host, str(n.raft_port)) for n in nodes.nodes.values()}
    try:
        out = subprocess.run(["ss", "-Htn", "state", "established"], check=True,
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return 0, [f"cannot run ss: {exc}"]

    checked, problems = 0, []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, peer = fields[-2], fields[-1]
        peer_host, _, peer_port = peer.rpartition(":")
        if (peer_host, peer_port) not in raft_ends:
            continue
        checked += 1
        local_host = local.rpartition(":")[0]
        if local_host not in nodes.hosts():
            problems.append(f"raft link {local} -> {peer} leaves from {local_host}")
    return checked, problems
