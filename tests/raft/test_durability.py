"""A real three-process cluster proves that a commit waits for followers' fdatasync.

strace's fault injection delays ``fdatasync`` inside chosen followers. If the leader
counted a follower before that follower's log reached the disk, a replicated call
would finish without waiting for the delay. Node 0 gets a short election timeout and
the followers long ones (well above the delay), so node 0 leads and a stalled
fdatasync never causes an election.

The in-process tests above them check the wiring: the journal factory, the outbox
that holds messages until one flush covers them, and the one-node cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pysyncobj.syncobj
import pysyncobj.transport
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated

from raft.durability import (
    OUTBOX_MESSAGES_MAX,
    Outbox,
    SyncingTCPTransport,
    durable_journal_of,
    install_durable_journal,
)
from raft.journal import UNSAFE_SKIP_FSYNC_ENV, DurableJournal

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace not found: the tests inject fdatasync delays with it"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_SCRIPT = Path(__file__).with_name("cluster_node.py")

FDATASYNC_DELAY_MS = 1500
LEADER_TIMEOUTS_MS = (300, 600)
FOLLOWER_TIMEOUTS_MS = (6000, 8000)  # far above the delay: no elections
START_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class NodePlan:
    traced: bool = False
    fdatasync_delay_ms: int = 0
    unsafe_skip_fsync: bool = False


class NodeProcess:
    """One node, maybe under strace, spoken to with JSON lines."""

    def __init__(self, argv: list[str], log_path: Path, plan: NodePlan) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        env.pop(UNSAFE_SKIP_FSYNC_ENV, None)
        if plan.unsafe_skip_fsync:
            env[UNSAFE_SKIP_FSYNC_ENV] = "1"
        self._log_file = open(log_path, "wb")
        self.log_path = log_path
        self.traced = plan.traced
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            cwd=REPO_ROOT,
        )
        self._lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        self.pid: int | None = None  # the node itself, not strace

    def _read_lines(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def next_line(self, timeout_s: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            message = f"node silent for {timeout_s}s, log {self.log_path}"
            raise AssertionError(message) from None
        if line is None:
            raise AssertionError(f"node exited, log {self.log_path}")
        return line

    def wait_started(self, timeout_s: float) -> None:
        line = self.next_line(timeout_s)
        assert line.get("event") == "started", line
        self.pid = line["pid"]

    def request(self, timeout_s: float = REQUEST_TIMEOUT_S, **request) -> dict:
        self.popen.stdin.write(json.dumps(request).encode() + b"\n")
        self.popen.stdin.flush()
        return self.next_line(timeout_s)

    def stop(self) -> None:
        """Ask the node to quit; kill it (by pid) if it does not within the limit."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.popen.stdin.write(b'{"op": "quit"}\n')
                self.popen.stdin.close()
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def kill(self) -> None:
        # Under strace the node is strace's child: kill it first, by its own pid,
        # and only if it still is our child (pids can be reused).
        if (
            self.traced
            and self.pid is not None
            and _parent_pid(self.pid) == self.popen.pid
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT_S)


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _argv(
    index: int,
    addresses: list[str],
    data_dir: Path,
    plan: NodePlan,
    batch: bool,
    password: str | None = None,
) -> list[str]:
    timeouts_ms = LEADER_TIMEOUTS_MS if index == 0 else FOLLOWER_TIMEOUTS_MS
    argv = [
        sys.executable,
        str(NODE_SCRIPT),
        f"--self-address={addresses[index]}",
        f"--journal={data_dir / f'journal-{index}'}",
        f"--raft-min-timeout-ms={timeouts_ms[0]}",
        f"--raft-max-timeout-ms={timeouts_ms[1]}",
    ]
    argv += [f"--partner={a}" for i, a in enumerate(addresses) if i != index]
    if not batch:
        argv.append("--no-batch")
    if password is not None:
        argv.append(f"--password={password}")
    if not plan.traced:
        return argv

    strace = [STRACE, "-f", "--seccomp-bpf", "-qq", "-e", "trace=fdatasync,fsync"]
    if plan.fdatasync_delay_ms:
        delay_us = plan.fdatasync_delay_ms * 1000
        strace += ["-e", f"inject=fdatasync:delay_enter={delay_us}"]
    return strace + ["-o", str(data_dir / f"strace-{index}.txt")] + argv


@contextlib.contextmanager
def running_cluster(
    data_dir: Path,
    plans: list[NodePlan],
    batch: bool = False,
    password: str | None = None,
) -> Iterator[list[NodeProcess]]:
    """Start one node per plan; node 0 leads. ``batch`` is appendEntriesUseBatch,
    ``password`` seals peer frames (a node's ``cluster_secret``).

    The default, unbatched AppendEntries, is what raft/machine.py runs.
    """
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(len(plans))]
    nodes: list[NodeProcess] = []
    try:
        for index, plan in enumerate(plans):
            argv = _argv(index, addresses, data_dir, plan, batch, password)
            nodes.append(NodeProcess(argv, data_dir / f"node-{index}.log", plan))
        for node in nodes:
            node.wait_started(START_TIMEOUT_S)
        _wait_for_leader(nodes, addresses[0])
        yield nodes
    finally:
        for node in nodes:
            try:
                node.stop()
            except (OSError, subprocess.SubprocessError):
                node.kill()


def _wait_for_leader(nodes: list[NodeProcess], leader_address: str) -> None:
    """Wait until node 0 leads, everyone knows it, and one call went through."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = [node.request(op="status") for node in nodes]
        if statuses[0]["is_leader"] and all(
            s["leader"] == leader_address for s in statuses
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"node 0 did not become leader: {statuses}")

    result = nodes[0].request(op="incr", count=1, concurrency=1, timeout_ms=10_000)
    assert result["done"] == 1, result
    _wait_until_caught_up(nodes)


def _wait_until_caught_up(nodes: list[NodeProcess]) -> None:
    """Wait until every node holds and applied the leader's whole log.

    A delayed follower works through a backlog after startup (vote requests from
    the elections it slept through, repeated AppendEntries), each one paying the
    injected delay. Measuring before it drains would measure that backlog.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = [node.request(op="status") for node in nodes]
        progress = {(s["value"], s["journal"]["last_index"]) for s in statuses}
        if len(progress) == 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"followers did not catch up: {statuses}")


def _incr_once_ms(leader: NodeProcess) -> float:
    result = leader.request(op="incr", count=1, concurrency=1, timeout_ms=10_000)
    assert result["done"] == 1, result
    return result["elapsed_ms"]


def _count_fdatasync(trace_path: Path) -> int:
    return sum("fdatasync(" in line for line in trace_path.read_text().splitlines())


# -- wiring, in one process ------------------------------------------------------------


@pytest.fixture
def durable_journal_installed(monkeypatch):
    # monkeypatch restores pysyncobj's own factory after the test.
    monkeypatch.setattr(
        pysyncobj.syncobj, "createJournal", pysyncobj.syncobj.createJournal
    )
    install_durable_journal()
    install_durable_journal()  # idempotent


def test_installed_factory_builds_durable_journals_and_refuses_memory_ones(
    durable_journal_installed, tmp_path
):
    journal = pysyncobj.syncobj.createJournal(str(tmp_path / "journal"))
    assert isinstance(journal, DurableJournal)
    journal._destroy()

    with pytest.raises(ValueError):
        pysyncobj.syncobj.createJournal(None)


def test_reaching_the_journal_of_a_syncobj_without_one_is_a_type_error():
    with pytest.raises(TypeError):
        durable_journal_of(object())


def _recording_outbox(journal: DurableJournal, sent: list) -> Outbox:
    def send_now(node, message) -> bool:
        sent.append((message["type"], journal.dirty))
        return True

    return Outbox(journal, send_now)


def test_outbox_sends_at_once_while_the_journal_is_clean(tmp_path):
    sent = []
    outbox = _recording_outbox(DurableJournal(tmp_path / "journal"), sent)

    outbox.send("peer", {"type": "append_entries"})
    assert sent == [("append_entries", False)]
    assert outbox.statistics().held_messages == 0


def test_outbox_holds_raft_messages_until_one_flush_covers_them(tmp_path):
    sent = []
    journal = DurableJournal(tmp_path / "journal")
    outbox = _recording_outbox(journal, sent)
    journal.add(b"x", 1, 0)

    outbox.send("peer", {"type": "apply_command_response"})  # exempt: goes now
    outbox.send("peer", {"type": "next_node_idx"})
    outbox.send("peer", {"type": "apply_command"})  # queues behind: keeps order
    journal.add(b"y", 2, 0)
    outbox.send("peer", {"type": "next_node_idx"})
    assert outbox.statistics().held_messages == 3
    before = journal.statistics().fsync_total

    outbox.flush()
    assert journal.statistics().fsync_total == before + 1
    assert sent == [
        ("apply_command_response", True),
        ("next_node_idx", False),
        ("apply_command", False),
        ("next_node_idx", False),
    ]


class _Counter(SyncObj):
    def __init__(self, address: str, conf: SyncObjConf, transport_class) -> None:
        super().__init__(address, [], conf, transportClass=transport_class)
        self.value = 0

    @replicated
    def incr(self) -> int:
        self.value += 1
        return self.value


def _single_node(tmp_path: Path, transport_class) -> _Counter:
    address = f"127.0.0.1:{_free_ports(1)[0]}"
    conf = SyncObjConf(
        journalFile=str(tmp_path / "journal"),
        bindAddress=address,
        autoTickPeriod=0.005,
        appendEntriesPeriod=0.02,
        raftMinTimeout=0.1,
        raftMaxTimeout=0.2,
    )
    return _Counter(address, conf, transport_class)


def test_single_node_commit_finds_the_entry_already_on_disk(
    durable_journal_installed, tmp_path
):
    node = _single_node(tmp_path, SyncingTCPTransport)
    try:
        journal = durable_journal_of(node)
        for expected in range(1, 4):
            assert node.incr(sync=True, timeout=10) == expected
            # Nothing is sent in a one-node cluster: the end-of-tick sync did this.
            assert not journal.dirty
        assert journal.statistics().last_sync_entries == 1
    finally:
        node.destroy_synchronous()

    assert DurableJournal(tmp_path / "journal").statistics().last_index >= 4


def test_without_the_syncing_transport_a_single_node_commits_unsynced_entries(
    durable_journal_installed, tmp_path
):
    # The control for the test above: the journal alone never decides to flush.
    node = _single_node(tmp_path, pysyncobj.transport.TCPTransport)
    try:
        assert node.incr(sync=True, timeout=10) == 1
        assert durable_journal_of(node).dirty
    finally:
        node.destroy_synchronous()


# -- Raft §5.3: an entry commits once stored on a majority --------------------------


@needs_strace
def test_commit_waits_for_fdatasync_when_both_followers_are_slow(tmp_path):
    delayed = NodePlan(traced=True, fdatasync_delay_ms=FDATASYNC_DELAY_MS)
    with running_cluster(tmp_path, [NodePlan(), delayed, delayed]) as nodes:
        elapsed_ms = [_incr_once_ms(nodes[0]) for _ in range(2)]

    for one_ms in elapsed_ms:
        assert one_ms >= FDATASYNC_DELAY_MS * 0.8, elapsed_ms
        assert one_ms < FDATASYNC_DELAY_MS * 3, elapsed_ms


@needs_strace
def test_sealed_peer_frames_still_wait_for_the_followers_fdatasync(tmp_path):
    # With a cluster secret pysyncobj seals frames inside TcpConnection.send,
    # below our Outbox: holding a message until the flush works the same.
    delayed = NodePlan(traced=True, fdatasync_delay_ms=FDATASYNC_DELAY_MS)
    plans = [NodePlan(), delayed, delayed]
    with running_cluster(tmp_path, plans, password="s" * 32) as nodes:
        elapsed_ms = [_incr_once_ms(nodes[0]) for _ in range(2)]

    for one_ms in elapsed_ms:
        assert one_ms >= FDATASYNC_DELAY_MS * 0.8, elapsed_ms
        assert one_ms < FDATASYNC_DELAY_MS * 3, elapsed_ms


@needs_strace
def test_commit_needs_only_the_fast_majority_and_followers_group_commit(tmp_path):
    delayed = NodePlan(traced=True, fdatasync_delay_ms=FDATASYNC_DELAY_MS)
    counted = NodePlan(traced=True)
    with running_cluster(tmp_path, [NodePlan(), delayed, counted]) as nodes:
        elapsed_ms = [_incr_once_ms(nodes[0]) for _ in range(3)]
        assert max(elapsed_ms) < FDATASYNC_DELAY_MS * 0.5, elapsed_ms
        _assert_follower_group_commits(nodes, tmp_path / "strace-2.txt")


@needs_strace
def test_followers_group_commit_with_batched_append_entries_too(tmp_path):
    counted = NodePlan(traced=True)
    with running_cluster(
        tmp_path, [NodePlan(), NodePlan(), counted], batch=True
    ) as nodes:
        _assert_follower_group_commits(nodes, tmp_path / "strace-2.txt")


def _assert_follower_group_commits(nodes: list[NodeProcess], trace_path: Path) -> None:
    calls = 400
    load = nodes[0].request(op="incr", count=calls, concurrency=40, timeout_ms=20_000)
    assert load["done"] == calls, load
    _wait_until_caught_up([nodes[0], nodes[2]])
    journal = nodes[2].request(op="status")["journal"]
    nodes[2].stop()  # strace writes out its trace file when the node exits

    fdatasync_total = _count_fdatasync(trace_path)
    assert journal["last_index"] > calls
    assert fdatasync_total >= 1
    assert fdatasync_total <= calls // 5, (fdatasync_total, journal)


@needs_strace
def test_skipping_fsync_lets_commit_outrun_the_delayed_disk(tmp_path):
    # The control for the tests above: with the unsafe switch the followers never
    # call fdatasync, so the injected delay cannot hold the commit back.
    unsafe = NodePlan(
        traced=True, fdatasync_delay_ms=FDATASYNC_DELAY_MS, unsafe_skip_fsync=True
    )
    with running_cluster(tmp_path, [NodePlan(), unsafe, unsafe]) as nodes:
        elapsed_ms = [_incr_once_ms(nodes[0]) for _ in range(2)]

    assert max(elapsed_ms) < FDATASYNC_DELAY_MS * 0.5, elapsed_ms
    assert _count_fdatasync(tmp_path / "strace-1.txt") == 0


def test_outbox_drops_held_messages_once_the_journal_failed(tmp_path, monkeypatch):
    sent = []
    journal = DurableJournal(tmp_path / "journal")
    outbox = _recording_outbox(journal, sent)
    journal.add(b"x", 1, 0)
    outbox.send("peer", {"type": "next_node_idx"})

    def broken_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
    outbox.flush()  # no exception: the tick thread must not fail every tick
    outbox.send("peer", {"type": "append_entries"})
    outbox.flush()

    assert sent == []
    assert outbox.statistics().dropped_messages_total == 2


def test_a_full_outbox_flushes_early_instead_of_growing(tmp_path):
    sent = []
    journal = DurableJournal(tmp_path / "journal")
    outbox = _recording_outbox(journal, sent)
    journal.add(b"x", 1, 0)

    for _ in range(OUTBOX_MESSAGES_MAX):
        outbox.send("peer", {"type": "next_node_idx"})

    assert len(sent) == OUTBOX_MESSAGES_MAX
    assert outbox.statistics().held_messages == 0
    assert outbox.statistics().early_flushes_total == 1
