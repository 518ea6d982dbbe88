"""Local cluster lifecycle behind ./scripts/start-cluster, stop-cluster, run-tests.

    ensure-venv [--extras test]   run by the system python3: make .venv, install
    start [--nodes N] ...         run by .venv/bin/python: start N nodes, wait
    stop [--data-dir DIR]         run by .venv/bin/python: stop what start began

The install step is keyed on a stamp in .venv holding pyproject.toml's hash
and the extras installed under it, so a second run costs nothing until the
dependencies change or an extra is wanted that nothing installed covers.

`start` on a data dir whose cluster.json shows some nodes running and some not
starts only the missing ones, with the ports, data dirs and token on record.

The admin token and the Raft cluster secret are made once per data dir (mode
0600). Nodes get the token through the environment and the secret as a file
path, so neither shows in `ps`.

`start` launches each node detached (own session, stdin from /dev/null, output
appended to its node.log) so the nodes outlive the shell that started them.
cluster.json is written as soon as the processes exist, which lets
stop-cluster clean up even after an interrupted start. The pid recorded is the
node process itself, and `stop` signals a pid only while /proc still shows it
running node.main on that node's data dir, so a recycled pid is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".ensync-install.json"
PYTHON_VERSION_MIN = (3, 11)

HOST = "127.0.0.1"
NODES_DEFAULT = 3
BASE_PORT_DEFAULT = 8080
# Relative to the repository, not the current directory: ensyncctl finds it
# from anywhere inside the checkout. A --data-dir given is taken as typed.
DATA_DIR_DEFAULT = ROOT / ".ensync"
# Settings the nodes read from the environment; recorded in cluster.json at
# creation so that a node restarted later runs as its peers do. Secrets stay
# out: the token is recorded on its own and the Raft secret lives in its file.
SETTINGS_PREFIX = "ENSYNC_"
SETTINGS_NOT_RECORDED = ("ENSYNC_ADMIN_TOKEN", "ENSYNC_CLUSTER_SECRET")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
RAFT_PORT_OFFSET = 100
PORT_MAX = 65535
NODES_MAX = 9
LEADER_WAIT_MS = 60_000
POLL_INTERVAL_MS = 250
DOT_INTERVAL_MS = 1000
STATUS_TIMEOUT_MS = 1000
KEY_TIMEOUT_MS = 15_000
STOP_WAIT_MS = 15_000
KILL_WAIT_MS = 5_000
LOG_TAIL_LINES = 15
LOG_TAIL_BYTES_MAX = 16_384
TOKEN_BYTES = 32
# The Raft peers' shared secret (raft/peer_auth.py), one per cluster data dir.
CLUSTER_SECRET_FILE = "cluster_secret"
CLUSTER_SECRET_BYTES = 32

DEMO_KEYS = (
    ("demo-publisher", ["*"], ["*"]),
    ("demo-consumer", ["*"], ["*"]),
)


class ScriptError(Exception):
    """A failure the user can act on; printed as one line."""


def fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(1)


class OneLineParser(argparse.ArgumentParser):
    """Reports bad arguments as one line instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


_stdout_gone = False


def say(text: str = "", end: str = "\n") -> None:
    """Print for the user; when they stopped reading (`| head`), carry on quietly.

    The work goes on: a start half done because its output was cut off would
    leave nodes without demo keys or a summary on record.
    """
    global _stdout_gone
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        _stdout_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def shown(path: Path) -> str:
    """A path as the user would type it from the current directory."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# ensure-venv


def declared_extras() -> dict[str, list[str]]:
    """pyproject.toml's optional-dependency groups, by name."""
    import tomllib  # after the version check: 3.11+

    try:
        with open(ROOT / "pyproject.toml", "rb") as handle:
            project = tomllib.load(handle).get("project", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScriptError(f"cannot read pyproject.toml: {exc}") from exc
    groups = project.get("optional-dependencies", {})
    return {name: list(requirements) for name, requirements in groups.items()}


def requirement_key(requirement: str) -> str:
    return "".join(requirement.split()).lower()


def read_stamp() -> tuple[str | None, set[str]]:
    """The pyproject.toml hash the stamp was made for, and its extras."""
    try:
        have = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None, set()
    if not isinstance(have, dict):
        return None, set()
    extras = have.get("extras")
    extras = extras if isinstance(extras, list) else []
    digest = have.get("pyproject_sha256")
    return (digest if isinstance(digest, str) else None), {
        extra for extra in extras if isinstance(extra, str)
    }


def extras_covered(
    wanted: set[str], installed: set[str], declared: dict[str, list[str]]
) -> bool:
    """True when what is installed already satisfies every wanted extra.

    An extra counts as covered when it was installed itself or when the extras
    that were installed already list all of its requirements (the `test`
    extra includes everything `sdk` asks for).
    """
    provided = {
        requirement_key(requirement)
        for extra in installed & declared.keys()
        for requirement in declared[extra]
    }
    return all(
        extra in installed or {requirement_key(r) for r in declared[extra]} <= provided
        for extra in wanted
    )


def venv_python_works() -> bool:
    if not VENV_PYTHON.exists():
        return False
    probe = subprocess.run(
        [VENV_PYTHON, "-c", "pass"], check=False, capture_output=True
    )
    return probe.returncode == 0


def ensure_venv(extras: list[str]) -> None:
    """Make .venv and install the project with `extras`, unless already done.

    The stamp in .venv records pyproject.toml's hash and every extra installed
    under it. A reinstall keeps the extras installed before, so alternating
    between start-cluster (sdk) and run-tests (test) installs at most once.
    """
    if sys.version_info < PYTHON_VERSION_MIN:
        wanted = ".".join(map(str, PYTHON_VERSION_MIN))
        raise ScriptError(f"{sys.executable} is too old; the project needs {wanted}+")

    declared = declared_extras()
    wanted = {part.strip() for extra in extras for part in extra.split(",")}
    wanted.discard("")
    unknown = sorted(wanted - declared.keys())
    if unknown:
        raise ScriptError(f"pyproject.toml declares no extra {', '.join(unknown)}")

    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    works = venv_python_works()
    stamped_digest, before = read_stamp() if works else (None, set())
    if stamped_digest == digest and extras_covered(wanted, before, declared):
        return
    if not works:
        say(f"creating {shown(VENV)} ...")
        run_quietly([sys.executable, "-m", "venv", "--clear", str(VENV)], "venv")
    # Keep what an earlier install brought in, as long as it still exists.
    extras_now = sorted(wanted | (before & declared.keys()))

    spec = f".[{','.join(extras_now)}]" if extras_now else "."
    say(f"installing the project into {shown(VENV)} ({spec}) ...")
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "-qq"]
    pip += ["--disable-pip-version-check", "-e", spec]
    run_quietly(pip, "pip install")
    stamp = {"pyproject_sha256": digest, "extras": extras_now}
    STAMP.write_text(json.dumps(stamp) + "\n")


def run_quietly(command: list[str], what: str) -> None:
    # pip's own errors still reach the terminal through stderr.
    result = subprocess.run(command, check=False, cwd=ROOT, stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ScriptError(f"{what} failed with exit code {result.returncode}")


# ---------------------------------------------------------------------------
# Node processes


@dataclass(frozen=True)
class NodePlan:
    node_id: str
    http_port: int
    raft_port: int
    data_dir: Path

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.http_port}/message"

    @property
    def raft_address(self) -> str:
        return f"{HOST}:{self.raft_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "node.log"


def plan_nodes(count: int, base_port: int, data_dir: Path) -> list[NodePlan]:
    if not 1 <= count <= NODES_MAX:
        raise ScriptError(f"--nodes must be between 1 and {NODES_MAX}")
    if not 0 < base_port <= PORT_MAX - RAFT_PORT_OFFSET - count:
        raise ScriptError(f"--base-port {base_port} leaves no room for {count} nodes")
    return [
        NodePlan(
            f"n{index}",
            base_port + index,
            base_port + RAFT_PORT_OFFSET + index,
            data_dir / f"n{index}",
        )
        for index in range(1, count + 1)
    ]


def node_command(
    node: NodePlan, nodes: list[NodePlan], secret_file: Path | None = None
) -> list[str]:
    peers = ",".join(
        f"{peer.node_id}={peer.raft_address}" for peer in nodes if peer is not node
    )
    command = [str(VENV_PYTHON), "-m", "node.main", "--id", node.node_id]
    command += ["--host", HOST, "--port", str(node.http_port)]
    command += ["--raft", node.raft_address, "--data-dir", str(node.data_dir)]
    if secret_file is not None:
        # The path, not the secret, so `ps` does not show it.
        command += ["--cluster-secret-file", str(secret_file)]
    if not peers:
        return command
    # The dashboard's cluster view asks the peers' /admin/status over HTTP.
    peer_http = ",".join(
        f"{peer.node_id}={peer.admin_url}" for peer in nodes if peer is not node
    )
    return command + ["--peers", peers, "--peer-http", peer_http]


def spawn(
    node: NodePlan,
    nodes: list[NodePlan],
    token: str,
    secret_file: Path | None,
    settings: dict[str, str] | None = None,
) -> int:
    """Start one node; ``settings`` replaces the ENSYNC_* of this environment."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if settings is not None:
        env = {k: v for k, v in env.items() if k not in current_settings()}
        env.update(settings)
    # The token travels in the environment so `ps` does not show it.
    env.update(ENSYNC_ADMIN_TOKEN=token, PYTHONUNBUFFERED="1")

    with open(node.log_file, "ab") as log:
        process = subprocess.Popen(
            node_command(node, nodes, secret_file),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def is_node_process(pid: int, data_dir: str) -> bool:
    """True while `pid` runs node.main on `data_dir` (pids get recycled)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.decode(errors="replace").split("\0")
    return "node.main" in args and data_dir in args


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Match the server: a port left in TIME_WAIT by a stopped node is usable.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES_MAX))
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


# ---------------------------------------------------------------------------
# cluster.json and secrets


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ScriptError(f"cannot read {shown(path)}: {exc}") from exc
    if not isinstance(value, dict):
        raise ScriptError(f"{shown(path)} does not hold a JSON object")
    return value


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: these files hold secrets."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(partial, path)


def load_or_create_token(data_dir: Path) -> str:
    path = data_dir / "admin_token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    write_private(path, token + "\n")
    return token


def create_cluster_secret(data_dir: Path) -> Path:
    """The cluster's secret file, made (mode 0600) on the cluster's first start."""
    path = data_dir / CLUSTER_SECRET_FILE
    if not path.exists() or not path.read_text().strip():
        write_private(path, secrets.token_urlsafe(CLUSTER_SECRET_BYTES) + "\n")
    return path


def existing_cluster_secret(data_dir: Path) -> Path | None:
    """The secret file the running nodes were given; None if they got none
    (a cluster started before secrets existed keeps running without)."""
    path = data_dir / CLUSTER_SECRET_FILE
    return path if path.exists() else None


def current_settings() -> dict[str, str]:
    """The ENSYNC_* variables of this environment that cluster.json records."""
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(SETTINGS_PREFIX) and name not in SETTINGS_NOT_RECORDED
    }


def recorded_settings(cluster: dict[str, Any]) -> dict[str, str] | None:
    """The settings the cluster was created with; None in an older cluster.json."""
    settings = cluster.get("settings")
    if not isinstance(settings, dict):
        return None
    return {str(name): str(value) for name, value in settings.items()}


def settings_drift(recorded: dict[str, str]) -> str | None:
    """One line naming the ENSYNC_* variables that differ from the recorded ones."""
    now = current_settings()
    names = sorted(n for n in set(now) | set(recorded) if now.get(n) != recorded.get(n))
    if not names:
        return None
    verb = "differs" if len(names) == 1 else "differ"
    return (
        f"warning: {', '.join(names)} {verb} from the cluster's first start; "
        "restarted nodes get the settings recorded in cluster.json"
    )


def cluster_record(
    nodes: list[NodePlan],
    pids: list[int],
    token: str,
    settings: dict[str, str] | None = None,
) -> dict:
    entries = [
        {
            "id": node.node_id,
            "pid": pid,
            "ws_url": node.ws_url,
            "admin_url": node.admin_url,
            "raft_address": node.raft_address,
            "data_dir": str(node.data_dir),
            "log_file": str(node.log_file),
        }
        for node, pid in zip(nodes, pids)
    ]
    record: dict[str, Any] = {"nodes": entries, "admin_token": token}
    if settings is not None:
        record["settings"] = settings
    return record


# ---------------------------------------------------------------------------
# start


def check_ports(nodes: list[NodePlan], hint: str) -> None:
    ports = [port for node in nodes for port in (node.http_port, node.raft_port)]
    busy = [str(port) for port in ports if not port_is_free(port)]
    if len(busy) == 1:
        raise ScriptError(f"port {busy[0]} on {HOST} is busy; {hint}")
    if busy:
        raise ScriptError(f"ports {', '.join(busy)} on {HOST} are busy; {hint}")


def start(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir).resolve()
    cluster_file = data_dir / "cluster.json"
    cluster = read_json(cluster_file)
    if cluster is not None:
        nodes, pids = recorded_nodes(cluster, cluster_file)
        if any(is_running(node, pid) for node, pid in zip(nodes, pids)):
            start_missing(args, data_dir, nodes, pids, recorded_token(cluster),
                          recorded_settings(cluster))
            return

    nodes = plan_nodes(
        NODES_DEFAULT if args.nodes is None else args.nodes,
        BASE_PORT_DEFAULT if args.base_port is None else args.base_port,
        data_dir,
    )
    if len(nodes) % 2 == 0:
        say(f"warning: {len(nodes)} nodes survive no more failures than "
            f"{len(nodes) - 1} (a majority of {len(nodes) // 2 + 1} is needed); "
            "prefer an odd --nodes")
    check_ports(nodes, "pick another --base-port")
    data_dir.mkdir(parents=True, exist_ok=True)
    token = load_or_create_token(data_dir)
    secret_file = create_cluster_secret(data_dir)
    settings = current_settings()
    pids = [spawn(node, nodes, token, secret_file) for node in nodes]
    launched(data_dir, nodes, pids, token, list(range(len(nodes))), settings)


def start_missing(
    args: argparse.Namespace,
    data_dir: Path,
    nodes: list[NodePlan],
    pids: list[int],
    token: str,
    settings: dict[str, str] | None,
) -> None:
    """Some nodes of the recorded cluster run: start the others as they were,
    with the ENSYNC_* settings the cluster was created with when on record."""
    check_same_layout(args, nodes, data_dir)
    dead = [i for i, node in enumerate(nodes) if not is_running(node, pids[i])]
    if not dead:
        running = ", ".join(f"{node.node_id}={pid}" for node, pid in zip(nodes, pids))
        raise ScriptError(
            f"already running ({running}); stop it first with {stop_command(data_dir)}"
        )

    missing = [nodes[i] for i in dead]
    check_ports(missing, "cannot start the missing nodes on their recorded ports")
    drift = None if settings is None else settings_drift(settings)
    if drift:
        say(drift)
    pids = list(pids)
    for i in dead:
        pids[i] = spawn(nodes[i], nodes, token, existing_cluster_secret(data_dir),
                        settings)
        say(f"{nodes[i].node_id} was not running; started it (pid {pids[i]})")
    launched(data_dir, nodes, pids, token, dead, settings)


def launched(
    data_dir: Path,
    nodes: list[NodePlan],
    pids: list[int],
    token: str,
    spawned: list[int],
    settings: dict[str, str] | None = None,
) -> None:
    """Record the pids, wait for a leader, make the demo keys, print a summary.

    `spawned` holds the indexes of the nodes this run started; only those are
    stopped again if the cluster does not come up.
    """
    record = cluster_record(nodes, pids, token, settings)
    write_private(data_dir / "cluster.json", json.dumps(record, indent=2))
    try:
        leader = wait_for_leader(nodes, pids, token, spawned)
        keys_file = provision_demo_keys(data_dir, leader, token)
    except (ScriptError, KeyboardInterrupt):
        say("\nstartup failed; stopping the nodes it started")
        stop_nodes([record["nodes"][i] for i in spawned])
        raise
    print_summary(nodes, pids, leader, data_dir, keys_file)


def recorded_nodes(
    cluster: dict[str, Any], cluster_file: Path
) -> tuple[list[NodePlan], list[int]]:
    """The nodes and pids a cluster.json written by `start` describes."""
    try:
        entries = cluster["nodes"]
        nodes = [
            NodePlan(
                str(entry["id"]),
                port_of(entry["admin_url"]),
                port_of(entry["raft_address"]),
                Path(entry["data_dir"]),
            )
            for entry in entries
        ]
        pids = [int(entry["pid"]) for entry in entries]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ScriptError(
            f"{shown(cluster_file)} is not as start-cluster writes it ({exc!r}); "
            "stop its nodes and remove it"
        ) from exc
    if not nodes:
        raise ScriptError(f"{shown(cluster_file)} lists no nodes; remove it")
    return nodes, pids


def port_of(address: str) -> int:
    """The port of `http://host:port` or `host:port`."""
    return int(str(address).rstrip("/").rsplit(":", 1)[1])


def recorded_token(cluster: dict[str, Any]) -> str:
    token = cluster.get("admin_token")
    if not isinstance(token, str) or not token:
        raise ScriptError("cluster.json holds no admin_token; stop the cluster first")
    return token


def check_same_layout(
    args: argparse.Namespace, nodes: list[NodePlan], data_dir: Path
) -> None:
    """Refuse flags that contradict the cluster that is partly running."""
    stop = stop_command(data_dir)
    base_port = nodes[0].http_port - 1
    if args.nodes is not None and args.nodes != len(nodes):
        raise ScriptError(
            f"the cluster in {shown(data_dir)} has {len(nodes)} nodes, some running; "
            f"stop it first ({stop}) to change --nodes"
        )
    if args.base_port is not None and args.base_port != base_port:
        raise ScriptError(
            f"the cluster in {shown(data_dir)} uses --base-port {base_port}, some "
            f"nodes running; stop it first ({stop}) to change --base-port"
        )


def is_running(node: NodePlan, pid: int) -> bool:
    return is_node_process(pid, str(node.data_dir))


def wait_for_leader(
    nodes: list[NodePlan], pids: list[int], token: str, spawned: list[int]
) -> dict:
    """Wait until every node answers and one leads with a quorum."""
    say(f"waiting for {len(nodes)} nodes and a leader ", end="")
    deadline_ms = monotonic_ms() + LEADER_WAIT_MS
    next_dot_ms = monotonic_ms() + DOT_INTERVAL_MS
    children = [(nodes[i], pids[i]) for i in spawned]

    while monotonic_ms() < deadline_ms:
        check_alive(children)
        statuses = [fetch_status(node, token) for node in nodes]
        leader = settled_leader(statuses)
        if leader is not None:
            say(f" {leader['id']} leads (term {leader['term']})")
            return leader
        if monotonic_ms() >= next_dot_ms:
            say(".", end="")
            next_dot_ms += DOT_INTERVAL_MS
        time.sleep(POLL_INTERVAL_MS / 1000)

    say()
    for node in nodes:
        say(f"--- {shown(node.log_file)} ends:\n{log_tail(node.log_file)}")
    raise ScriptError(f"no leader within {LEADER_WAIT_MS} ms; log tails above")


def check_alive(children: list[tuple[NodePlan, int]]) -> None:
    """Fail fast when a node this run started has exited (only children reap)."""
    for node, pid in children:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            say(f"\n--- {shown(node.log_file)} ends:\n{log_tail(node.log_file)}")
            raise ScriptError(f"{node.node_id} exited during startup; log tail above")


def fetch_status(node: NodePlan, token: str) -> dict | None:
    from node.ctl import CtlError, request_json

    try:
        status = request_json(
            node.admin_url + "/admin/status", token, STATUS_TIMEOUT_MS
        )
    except CtlError:
        return None
    return dict(status, admin_url=node.admin_url)


def settled_leader(statuses: list[dict | None]) -> dict | None:
    if any(status is None for status in statuses):
        return None
    leaders = [s for s in statuses if s.get("role") == "leader" and s.get("has_quorum")]
    if not leaders:
        return None
    return max(leaders, key=lambda status: status.get("term", 0))


# ---------------------------------------------------------------------------
# Demo keys


def provision_demo_keys(data_dir: Path, leader: dict, token: str) -> Path:
    """Create the demo keys once; later runs keep the secrets already saved."""
    path = data_dir / "demo-keys.json"
    saved = read_json(path) or {}
    for name, send, receive in DEMO_KEYS:
        record = create_key(leader["admin_url"], token, name, send, receive)
        if record.get("secret_key"):
            saved[name] = {
                field: record.get(field)
                for field in ("access_key", "app_id", "secret_key", "send", "receive")
            }
        elif name not in saved:
            say(
                f"warning: key {name} exists but its secret is not in "
                f"{shown(path)}; remove {shown(data_dir)} to start afresh"
            )
    write_private(path, json.dumps(saved, indent=2) + "\n")
    return path


def create_key(url: str, token: str, name: str, send: list, receive: list) -> dict:
    from node.ctl import CtlError, request_json

    body = {"name": name, "send": send, "receive": receive, "if_absent": True}
    try:
        return request_json(url + "/admin/keys", token, KEY_TIMEOUT_MS, "POST", body)
    except CtlError as exc:
        raise ScriptError(f"creating demo key {name} failed: {exc}") from exc


# ---------------------------------------------------------------------------
# Summary


def print_summary(
    nodes: list[NodePlan], pids: list[int], leader: dict, data_dir: Path, keys: Path
) -> None:
    from node.ctl import render_table

    headers = ["node", "pid", "role", "websocket", "admin", "raft", "log"]
    rows = [
        [
            node.node_id,
            str(pid),
            "leader" if node.node_id == leader["id"] else "follower",
            node.ws_url,
            node.admin_url,
            node.raft_address,
            shown(node.log_file),
        ]
        for node, pid in zip(nodes, pids)
    ]
    say()
    say(render_table(headers, rows))
    say()
    for label, value in summary_lines(nodes, data_dir, keys):
        say(f"{label:<12} {value}")


def summary_lines(nodes: list[NodePlan], data_dir: Path, keys: Path) -> list:
    ctl = shown(VENV / "bin" / "ensyncctl")
    cluster_file = data_dir / "cluster.json"
    # ensyncctl looks for .ensync/cluster.json here and in every parent.
    if not Path.cwd().is_relative_to(data_dir.parent) or data_dir.name != ".ensync":
        ctl += f" --cluster {shown(cluster_file)}"
    first = nodes[0]
    return [
        ("demo keys", f"{shown(keys)} (demo-publisher, demo-consumer)"),
        ("admin token", shown(data_dir / "admin_token")),
        ("raft secret", shown(data_dir / CLUSTER_SECRET_FILE)),
        ("connect", f'{first.ws_url}  (SDK: EnSyncEngine("{first.admin_url}"))'),
        ("status", f"{ctl} status"),
        ("stop", stop_command(data_dir)),
    ]


def stop_command(data_dir: Path) -> str:
    command = shown(ROOT / "scripts" / "stop-cluster")
    if not command.startswith("/"):
        command = "./" + command
    if data_dir != DATA_DIR_DEFAULT:
        command += f" --data-dir {shown(data_dir)}"
    return command


# ---------------------------------------------------------------------------
# stop


def stop(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir).resolve()
    cluster = read_json(data_dir / "cluster.json")
    if cluster is None:
        say(f"no cluster.json in {shown(data_dir)}; nothing to stop")
        return
    if not stop_nodes(cluster.get("nodes", [])):
        raise ScriptError("some nodes are still running")


def stop_nodes(nodes: list[dict[str, Any]]) -> bool:
    """SIGTERM, wait, SIGKILL what is left; report per node. True if all gone."""
    running = [node for node in nodes if alive(node)]
    for node in nodes:
        if node not in running:
            say(f"{node['id']}: not running")
    signal_nodes(running, signal.SIGTERM)

    lingering = wait_gone(running, STOP_WAIT_MS)
    report(running, lingering, "stopped (SIGTERM)")
    signal_nodes(lingering, signal.SIGKILL)

    stuck = wait_gone(lingering, KILL_WAIT_MS)
    report(lingering, stuck, "killed (SIGKILL)")
    for node in stuck:
        say(f"{node['id']}: pid {node['pid']} still running")
    return not stuck


def alive(node: dict[str, Any]) -> bool:
    return is_node_process(int(node["pid"]), str(node["data_dir"]))


def signal_nodes(nodes: list[dict[str, Any]], signum: signal.Signals) -> None:
    for node in nodes:
        # Re-check right before signalling: the pid may have been recycled.
        if not alive(node):
            continue
        try:
            os.kill(int(node["pid"]), signum)
        except ProcessLookupError:
            pass


def wait_gone(nodes: list[dict[str, Any]], wait_ms: int) -> list[dict[str, Any]]:
    deadline_ms = monotonic_ms() + wait_ms
    while True:
        reap_children()
        left = [node for node in nodes if alive(node)]
        if not left or monotonic_ms() >= deadline_ms:
            return left
        time.sleep(POLL_INTERVAL_MS / 1000)


def reap_children() -> None:
    # Only a failed start stops its own children; reap them so they vanish.
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def report(nodes: list, lingering: list, how: str) -> None:
    for node in nodes:
        if node not in lingering:
            say(f"{node['id']}: pid {node['pid']} {how}")


# ---------------------------------------------------------------------------
# Command line


PROGS = {"ensure-venv": "ensure-venv", "start": "start-cluster", "stop": "stop-cluster"}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser

    venv = add(
        "ensure-venv",
        prog=PROGS["ensure-venv"],
        help="make .venv",
        description="Create .venv if needed and install the project into it "
        "with the given extras, unless the stamp in .venv shows that is done.",
    )
    venv.add_argument(
        "--extras",
        action="append",
        default=[],
        metavar="NAME",
        help="an optional-dependency group of pyproject.toml to install too "
        "(repeatable or a comma list; default: none)",
    )

    start_cmd = add(
        "start",
        prog=PROGS["start"],
        help="start a local cluster",
        description="Start a local cluster on 127.0.0.1 in the background, wait "
        "for a leader, create the demo keys and print a summary. If some nodes "
        "of the cluster recorded in DIR/cluster.json are running and others are "
        "not, start only the missing ones, on their recorded ports and data "
        "dirs, with the same admin token.",
    )
    start_cmd.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help=f"how many nodes to start, 1 to {NODES_MAX} (default: {NODES_DEFAULT})",
    )
    start_cmd.add_argument(
        "--base-port",
        type=int,
        metavar="PORT",
        help="node i serves HTTP and WebSocket on PORT+i and Raft on "
        f"PORT+{RAFT_PORT_OFFSET}+i (default: {BASE_PORT_DEFAULT})",
    )
    start_cmd.add_argument(
        "--data-dir",
        default=DATA_DIR_DEFAULT,
        metavar="DIR",
        help="where cluster.json, the admin token, the demo keys and each "
        "node's data and log live (default: .ensync in the repository root)",
    )

    stop_cmd = add(
        "stop",
        prog=PROGS["stop"],
        help="stop the local cluster",
        description="Stop the nodes listed in DIR/cluster.json: SIGTERM, then "
        f"SIGKILL after {STOP_WAIT_MS // 1000} s. The data stays.",
    )
    stop_cmd.add_argument(
        "--data-dir",
        default=DATA_DIR_DEFAULT,
        metavar="DIR",
        help="the data dir start-cluster used (default: .ensync in the "
        "repository root)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Name errors after the script the user ran, even for unknown flags.
    prog = PROGS.get(argv[0], "cluster.py") if argv else "cluster.py"
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "ensure-venv":
            ensure_venv(args.extras)
        elif args.command == "start":
            start(args)
        else:
            stop(args)
    except ScriptError as exc:
        fail(PROGS[args.command], str(exc))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    # The work is done, its output cut short. ensure-venv exits 0 all the same:
    # start-cluster runs `start` after it either way.
    if _stdout_gone and args.command != "ensure-venv":
        raise SystemExit(EXIT_BROKEN_PIPE)


if __name__ == "__main__":
    main()
