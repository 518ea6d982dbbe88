"""./scripts/start-cluster and stop-cluster, run as a user runs them.

The cluster here is started by the real script (its own venv step included)
on ports probed free and a temporary --data-dir, and always stopped with the
real stop-cluster. The pure install-stamp rule is checked on its own first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
HOST = "127.0.0.1"
NODES = 3
RAFT_PORT_OFFSET = 100
# Below Linux's ephemeral range (32768+), so no client socket takes them.
BASE_PORT_RANGE = (20_000, 30_000)
BASE_PORT_ATTEMPTS = 50
SCRIPT_TIMEOUT_S = 90
CTL_TIMEOUT_S = 30
GONE_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05


def load_cluster_script():
    path = SCRIPTS / "cluster.py"
    spec = importlib.util.spec_from_file_location("cluster_script", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up by name while the module executes.
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


# -- the install stamp ------------------------------------------------------


DECLARED = {
    "sdk": ["ensync-sdk-ws==0.4.3"],
    "test": ["pytest>=8", "ensync-sdk-ws == 0.4.3"],
    "other": ["hypothesis"],
}


def test_an_extra_is_covered_by_one_that_lists_all_its_requirements():
    covered = load_cluster_script().extras_covered

    assert covered({"sdk"}, {"test"}, DECLARED)
    assert covered({"sdk", "test"}, {"test"}, DECLARED)
    assert covered(set(), set(), DECLARED)
    assert not covered({"test"}, {"sdk"}, DECLARED)
    assert not covered({"other"}, {"sdk", "test"}, DECLARED)
    # An extra the stamp names but pyproject.toml no longer declares covers nothing.
    assert not covered({"sdk"}, {"gone"}, DECLARED)


# -- a real cluster from the real scripts -----------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    for _ in range(BASE_PORT_ATTEMPTS):
        base = random.randrange(*BASE_PORT_RANGE)
        ports = [base + i for i in range(1, NODES + 1)]
        ports += [port + RAFT_PORT_OFFSET for port in ports]
        if all(port_is_free(port) for port in ports):
            return base
    pytest.fail(f"no free base port in {BASE_PORT_RANGE}, {BASE_PORT_ATTEMPTS} tries")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENSYNC_ADMIN_TOKEN"}
    return subprocess.run(
        [str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def recorded_pids(cluster_file: Path) -> dict[str, int]:
    nodes = json.loads(cluster_file.read_text())["nodes"]
    return {node["id"]: node["pid"] for node in nodes}


def runs_node(pid: int, data_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return False
    return "node.main" in args and str(data_dir) in args


def wait_gone(pid: int, data_dir: Path) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while runs_node(pid, data_dir):
        if time.monotonic() >= deadline:
            pytest.fail(f"pid {pid} still runs {GONE_TIMEOUT_S} s after SIGKILL")
        time.sleep(POLL_INTERVAL_S)


def status_json(cluster_file: Path) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "ENSYNC_ADMIN_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "node.ctl", "--cluster", str(cluster_file)]
        + ["status", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=CTL_TIMEOUT_S,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def leader_seen_by(cluster_file: Path, node_id: str) -> str | None:
    """The leader ``node_id`` follows, asked over its admin API; None if none yet."""
    from node.ctl import CtlError, request_json

    cluster = json.loads(cluster_file.read_text())
    node = next(n for n in cluster["nodes"] if n["id"] == node_id)
    try:
        status = request_json(node["admin_url"] + "/admin/status",
                              cluster["admin_token"], 2000)
    except CtlError:
        return None
    return status["leader"] if status["raft_peers_authenticated"] else None


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.mark.timeout(240)
def test_start_cluster_brings_back_only_the_dead_node(tmp_path):
    data_dir = (tmp_path / "data").resolve()
    cluster_file = data_dir / "cluster.json"
    start_args = ("--base-port", str(free_base_port()), "--data-dir", str(data_dir))
    try:
        first = run_script("start-cluster", *start_args)
        assert first.returncode == 0, output(first)
        before = recorded_pids(cluster_file)
        assert sorted(before) == ["n1", "n2", "n3"]
        # The Raft peers share a secret made for this data dir, kept out of ps.
        secret_file = data_dir / "cluster_secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        for pid in before.values():
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert str(secret_file) in args and secret not in args

        victim = "n2"
        victim_dir = data_dir / victim
        assert runs_node(before[victim], victim_dir)
        os.kill(before[victim], signal.SIGKILL)
        wait_gone(before[victim], victim_dir)

        again = run_script("start-cluster", *start_args)

        assert again.returncode == 0, output(again)
        assert f"{victim} was not running; started it" in again.stdout
        after = recorded_pids(cluster_file)
        assert after[victim] != before[victim]
        assert runs_node(after[victim], victim_dir)
        for node_id in ("n1", "n3"):
            assert after[node_id] == before[node_id], node_id
            assert f"{node_id} was not running" not in again.stdout
        code, view = status_json(cluster_file)
        assert code == 0, view
        assert all(node["reachable"] for node in view["nodes"]), view
        # The restarted node got the same secret: it hears the leader over Raft.
        deadline = time.monotonic() + SCRIPT_TIMEOUT_S
        while leader_seen_by(cluster_file, victim) is None:
            assert time.monotonic() < deadline, f"{victim} hears no leader"
            time.sleep(POLL_INTERVAL_S)

        third = run_script("start-cluster", *start_args)
        assert third.returncode != 0, output(third)
        assert "already running" in third.stderr
        assert recorded_pids(cluster_file) == after
    finally:
        stopped = run_script("stop-cluster", "--data-dir", str(data_dir))
        assert stopped.returncode == 0, output(stopped)


def node_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    pairs = (item.partition("=") for item in raw.split("\0") if item)
    return {name: value for name, _, value in pairs}


@pytest.mark.timeout(240)
def test_restarted_node_gets_the_settings_the_cluster_was_created_with(tmp_path):
    """Output cut short (`| head`) still starts the cluster, without a traceback;
    a node restarted later runs with the ENSYNC_* of the first start, and the
    script says in one line that the environment now differs."""
    data_dir = (tmp_path / "data").resolve()
    cluster_file = data_dir / "cluster.json"
    start_args = ("--base-port", str(free_base_port()), "--data-dir", str(data_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    try:
        first = subprocess.run(
            [str(SCRIPTS / "start-cluster"), *start_args], stdout=write_end,
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(env, ENSYNC_ACK_TIMEOUT_MS="7777"), timeout=SCRIPT_TIMEOUT_S,
            check=False)
        os.close(write_end)
        assert first.returncode == 141, first.stderr
        assert "Traceback" not in first.stderr, first.stderr
        record = json.loads(cluster_file.read_text())
        assert record["settings"] == {"ENSYNC_ACK_TIMEOUT_MS": "7777"}, record
        assert (data_dir / "demo-keys.json").exists()

        before = recorded_pids(cluster_file)
        os.kill(before["n2"], signal.SIGKILL)
        wait_gone(before["n2"], data_dir / "n2")
        again = subprocess.run(
            [str(SCRIPTS / "start-cluster"), *start_args], capture_output=True,
            text=True, cwd=ROOT, env=env, timeout=SCRIPT_TIMEOUT_S, check=False)

        assert again.returncode == 0, output(again)
        warnings = [line for line in again.stdout.splitlines() if "warning" in line]
        assert len(warnings) == 1, output(again)
        assert "ENSYNC_ACK_TIMEOUT_MS differs" in warnings[0], output(again)
        restarted = recorded_pids(cluster_file)["n2"]
        assert node_environ(restarted).get("ENSYNC_ACK_TIMEOUT_MS") == "7777"
        assert json.loads(cluster_file.read_text())["settings"] == record["settings"]
    finally:
        stopped = run_script("stop-cluster", "--data-dir", str(data_dir))
        assert stopped.returncode == 0, output(stopped)


def test_even_node_count_warns_and_busy_ports_are_named_in_the_plural(tmp_path):
    base = free_base_port()
    taken = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock, port in zip(taken, (base + 1, base + RAFT_PORT_OFFSET + 1)):
            sock.bind((HOST, port))
            sock.listen()
        result = run_script("start-cluster", "--nodes", "2", "--base-port", str(base),
                            "--data-dir", str(tmp_path / "data"))
    finally:
        for sock in taken:
            sock.close()
    assert result.returncode != 0, output(result)
    assert "warning: 2 nodes survive no more failures than 1" in result.stdout
    error = result.stderr.strip().splitlines()
    assert len(error) == 1, output(result)
    assert f"ports {base + 1}, {base + RAFT_PORT_OFFSET + 1} on {HOST} are busy" \
        in error[0], error
    assert not (tmp_path / "data" / "cluster.json").exists()


def test_default_data_dir_is_the_repository_roots_from_any_directory(
        monkeypatch, tmp_path):
    script = load_cluster_script()
    monkeypatch.chdir(tmp_path)
    for command in ("start", "stop"):
        args = script.build_parser("start-cluster").parse_args([command])
        assert Path(args.data_dir).resolve() == ROOT / ".ensync", command

    data_dir = ROOT / ".ensync"
    nodes = script.plan_nodes(3, 8080, data_dir)
    lines = dict(script.summary_lines(nodes, data_dir, data_dir / "demo-keys.json"))
    assert lines["stop"] == str(ROOT / "scripts" / "stop-cluster")
    # From outside the checkout ensyncctl cannot find the file by itself.
    assert f"--cluster {data_dir / 'cluster.json'}" in lines["status"]

    monkeypatch.chdir(ROOT / "docs")
    lines = dict(script.summary_lines(nodes, data_dir, data_dir / "demo-keys.json"))
    assert "--cluster" not in lines["status"]
