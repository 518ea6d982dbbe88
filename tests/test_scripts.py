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

        third = run_script("start-cluster", *start_args)
        assert third.returncode != 0, output(third)
        assert "already running" in third.stderr
        assert recorded_pids(cluster_file) == after
    finally:
        stopped = run_script("stop-cluster", "--data-dir", str(data_dir))
        assert stopped.returncode == 0, output(stopped)
