"""``ensync-node``: run one node from flags, ``ENSYNC_*`` variables or a TOML file.

Precedence: a flag given on the command line, then the environment variable, then
the TOML file named by ``--config``, then the default below.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import re
import signal
import ssl
import sys
import tomllib

import orjson
from aiohttp import web

from node import tls, unsafe
from node.http import build_app
from node.server import Node, NodeConfig
from raft.machine import RaftConfig
from raft.peer_auth import (CLUSTER_SECRET_CHARS_MIN, read_secret_file,
                            secret_file_too_open)

# (name, type, default, help); every name is also ENSYNC_<NAME> and a TOML key.
# A bool is a switch: --name turns it on; ENSYNC_<NAME>=1 (or true, yes, on) too.
# The README's settings table is made from this list (scripts/settings-table).
SETTINGS = [
    ("id", str, "n1", "node id shown by status (n1, n2, ...)"),
    ("host", str, "127.0.0.1", "HTTP and WebSocket bind host"),
    ("port", int, 8081,
     "HTTP and WebSocket port: /message, /health, /ready, /metrics, /admin/..."),
    ("raft", str, "127.0.0.1:9081",
     "this node's Raft address; the Raft socket binds to this host only"),
    ("peers", str, "", "other nodes as id=host:port, comma separated"),
    ("peer_http", str, "",
     "other nodes' HTTP as id=http://host:port, comma separated (dashboard)"),
    ("data_dir", str, ".ensync/n1", "journal, snapshots and RocksDB"),
    ("admin_token", str, "", "bearer token for /admin/*"),
    ("cluster_secret", str, "",
     "shared by all nodes: seals and authenticates every Raft peer frame; "
     "prefer cluster_secret_file"),
    ("cluster_secret_file", str, "",
     "file holding the cluster secret (mode 0600); keeps it out of ps"),
    ("tls_cert", str, "",
     "PEM certificate chain: the port serves wss:// and https:// only"),
    ("tls_key", str, "", "PEM private key for tls_cert"),
    ("tls_ca", str, "",
     "CA file this node trusts for its own https calls to peers; "
     "default the system's"),
    ("raft_min_timeout_ms", int, 1000, "election timeout, lower bound"),
    ("raft_max_timeout_ms", int, 2500, "election timeout, upper bound"),
    ("leader_fallback_timeout_ms", int, 3000, "a leader without a majority steps down"),
    ("compaction_min_entries", int, 20000, "log entries before a snapshot"),
    ("compaction_min_time_ms", int, 600_000, "time between snapshots at most"),
    ("write_timeout_ms", int, 10000,
     "a write without quorum fails with -FAIL:UNAVAILABLE after this"),
    ("ack_timeout_ms", int, 60000, "unacked records return to the queue after this"),
    ("node_down_ms", int, 5000, "sessions of an unreachable node close after this"),
    ("batch_ops_max", int, 512, "operations per Raft entry"),
    ("batch_bytes_max", int, 2 << 20, "bytes per Raft entry"),
    ("batches_in_flight_max", int, 32, "Raft entries proposed and not yet applied"),
    ("stuck_follower_ms", int, 10_000, "force a snapshot for a follower stuck this long"),
    ("ping_interval_ms", int, 30_000, "text PING to every client this often"),
    ("delivery_limit", int, 20, "deliveries of one event before it is dead-lettered"),
    ("dedup_window_ms", int, 120_000, "how long a publish idempotency key is remembered"),
    ("idle_after_ms", int, 60_000, "admin: a session quiet this long is shown idle"),
    ("retention_ms", int, 30 * 86_400_000, "an undelivered event expires after this"),
    ("finished_retention_ms", int, 7 * 86_400_000,
     "acked, discarded and expired records are compacted after this"),
    ("history_retention_ms", int, 30 * 86_400_000, "audit trails are kept this long"),
    ("journal_bytes_max", int, 64 << 20, "journal size that forces a snapshot"),
    ("log_file", str, "", "log to this file instead of stderr"),
    ("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("log_json", bool, False, "log one JSON object per line instead of text"),
    ("ready_lag_entries_max", int, 100,
     "/ready fails while applied trails commit by more entries than this"),
    ("client_frames_per_s_max", int, 20_000,
     "frames per second per client connection (burst the same); more get "
     "-FAIL:RATE_LIMITED"),
    ("client_abuse_close_ms", int, 5000,
     "a client over its frame rate this long is closed with 4008"),
    ("connections_per_key_max", int, 256,
     "connections per access key on this node; CONN beyond gets -FAIL:RATE_LIMITED"),
    ("reply_bytes_max", int, 64 << 20,
     "requests being handled, replies and pushes not yet written, per node; "
     "then the heaviest clients pause"),
    ("client_write_buffer_bytes_max", int, 4 << 20,
     "unwritten bytes to one client; a push beyond closes it with 4009"),
    ("client_pending_requests_max", int, 1024,
     "requests read and not yet answered per connection; then its reads pause"),
    ("recipient_events_max", int, 1_000_000,
     "undelivered events per recipient app; a PUB beyond gets -FAIL:QUEUE_FULL"),
    ("conn_proof_required", bool, False,
     "CONN must sign a CHALLENGE nonce with the app's Ed25519 secret key"),
]


class ConfigError(Exception):
    pass


def load_settings(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="ensync-node", description=__doc__)
    parser.add_argument("--config", help="TOML file with the settings below")
    for name, kind, default, help_text in SETTINGS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_const", const=True,
                                default=None, help=f"{help_text} (default off)")
            continue
        parser.add_argument(flag, dest=name, type=kind,
                            default=None, help=f"{help_text} (default {default!r})")
    args = parser.parse_args(argv)

    from_file = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                from_file = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {args.config}: {exc}") from exc
    return {name: _pick(name, kind, default, getattr(args, name), from_file)
            for name, kind, default, _ in SETTINGS}


def _pick(name, kind, default, flag, from_file):
    if flag is not None:
        return flag
    env = os.environ.get("ENSYNC_" + name.upper())
    raw = env if env is not None else from_file.get(name, default)
    try:
        return _switch(raw) if kind is bool else kind(raw)
    except (TypeError, ValueError):
        source = f"ENSYNC_{name.upper()}" if env is not None else f"{name} in --config"
        raise ConfigError(f"{source}={raw!r}: {_wanted(name, kind)}") from None


def _wanted(name: str, kind) -> str:
    """What a setting takes, with its unit: 'a whole number of milliseconds'."""
    if kind is bool:
        return "must be one of " + ", ".join(sorted(w for w in _SWITCH_WORDS if w))
    if kind is not int:
        return f"must be {kind.__name__}"
    units = {"_ms": "milliseconds", "_bytes_max": "bytes", "_s_max": "per second"}
    for suffix, unit in units.items():
        if name.endswith(suffix):
            return f"must be a whole number ({unit}, no unit suffix)"
    return "must be a whole number"


_SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False, "": False}


def _switch(raw) -> bool:
    """A bool from TOML as is; from the environment, one of ``_SWITCH_WORDS``."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word not in _SWITCH_WORDS:
        raise ValueError(word)
    return _SWITCH_WORDS[word]


def parse_peers(text: str) -> dict[str, str]:
    peers = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        node_id, sep, address = item.partition("=")
        if not sep or ":" not in address:
            raise ConfigError(f"peer {item!r} is not id=host:port")
        peers[node_id] = address
    return peers


def parse_peer_http(text: str) -> dict[str, str]:
    urls = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        node_id, sep, url = item.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ConfigError(f"peer HTTP address {item!r} is not id=http://host:port")
        urls[node_id] = url.rstrip("/")
    return urls


def cluster_secret_of(s: dict) -> str:
    """The secret from cluster_secret or cluster_secret_file (one of them), or ""."""
    secret, path = s["cluster_secret"], s["cluster_secret_file"]
    if secret and path:
        raise ConfigError("set cluster_secret or cluster_secret_file, not both")
    if path:
        try:
            secret = read_secret_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read cluster_secret_file {path}: {exc}") from exc
        if not secret:
            raise ConfigError(f"cluster_secret_file {path} is empty")
    if secret and len(secret) < CLUSTER_SECRET_CHARS_MIN:
        raise ConfigError("the cluster secret must have at least "
                          f"{CLUSTER_SECRET_CHARS_MIN} characters")
    return secret


def tls_contexts(s: dict) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context or None for plain, client context for calls to peers)."""
    if bool(s["tls_cert"]) != bool(s["tls_key"]):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    try:
        client = tls.client_context(s["tls_ca"] or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_ca {s['tls_ca']}: {exc}") from exc
    if not s["tls_cert"]:
        return None, client
    try:
        server = tls.server_context(s["tls_cert"], s["tls_key"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_cert/tls_key: {exc}") from exc
    return server, client


def build_config(s: dict) -> NodeConfig:
    if not s["admin_token"]:
        raise ConfigError("admin_token is required (--admin-token or ENSYNC_ADMIN_TOKEN)")
    tls_server, tls_client = tls_contexts(s)
    raft = RaftConfig(
        node_id=s["id"], raft_address=s["raft"], peers=parse_peers(s["peers"]),
        data_dir=s["data_dir"], raft_min_timeout_ms=s["raft_min_timeout_ms"],
        raft_max_timeout_ms=s["raft_max_timeout_ms"],
        leader_fallback_timeout_ms=s["leader_fallback_timeout_ms"],
        compaction_min_entries=s["compaction_min_entries"],
        compaction_min_time_ms=s["compaction_min_time_ms"],
        write_timeout_ms=s["write_timeout_ms"], batch_ops_max=s["batch_ops_max"],
        batch_bytes_max=s["batch_bytes_max"],
        batches_in_flight_max=s["batches_in_flight_max"],
        cluster_secret=cluster_secret_of(s))
    return NodeConfig(raft=raft, host=s["host"], port=s["port"],
                      admin_token=s["admin_token"], ack_timeout_ms=s["ack_timeout_ms"],
                      node_down_ms=s["node_down_ms"],
                      stuck_follower_ms=s["stuck_follower_ms"],
                      ping_interval_ms=s["ping_interval_ms"],
                      delivery_limit=s["delivery_limit"],
                      dedup_window_ms=s["dedup_window_ms"],
                      retention_ms=s["retention_ms"],
                      finished_retention_ms=s["finished_retention_ms"],
                      history_retention_ms=s["history_retention_ms"],
                      journal_bytes_max=s["journal_bytes_max"],
                      idle_after_ms=s["idle_after_ms"],
                      ready_lag_entries_max=s["ready_lag_entries_max"],
                      client_frames_per_s_max=s["client_frames_per_s_max"],
                      client_abuse_close_ms=s["client_abuse_close_ms"],
                      connections_per_key_max=s["connections_per_key_max"],
                      reply_bytes_max=s["reply_bytes_max"],
                      client_write_buffer_bytes_max=s["client_write_buffer_bytes_max"],
                      client_pending_requests_max=s["client_pending_requests_max"],
                      recipient_events_max=s["recipient_events_max"],
                      conn_proof_required=s["conn_proof_required"],
                      peer_http=parse_peer_http(s["peer_http"]),
                      tls_server=tls_server, tls_client=tls_client)


class _NodeIdFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


# key=value in a log message: the key starts a word, the value runs to a space.
_LOG_FIELD = re.compile(r"(?<!\S)([A-Za-z_][\w.]*)=(\S+)")
_INT = re.compile(r"-?\d+\Z")
_JSON_LOG_KEYS = ("node", "ts", "level", "logger", "msg")


class _JsonLineFormatter(logging.Formatter):
    """One JSON object per record: node, ts, level, logger, msg, then the fields.

    Fields are the message's ``key=value`` pairs (STYLE.md 10), integers as
    numbers. A field named like one of the fixed keys (``node=n2`` names a peer)
    is kept as ``msg_<key>``.
    """

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {"node": getattr(record, "node", None),
                 "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "logger": record.name, "msg": msg}
        for key, value in _LOG_FIELD.findall(msg):
            if key in _JSON_LOG_KEYS:
                key = "msg_" + key
            entry.setdefault(key, int(value) if _INT.match(value) else value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(node_id: str, log_file: str, level: str,
                  json_lines: bool = False) -> None:
    if log_file:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc}") from exc
    else:
        handler = logging.StreamHandler()
    handler.addFilter(_NodeIdFilter(node_id))
    if json_lines:
        handler.setFormatter(_JsonLineFormatter())
        logging.captureWarnings(True)  # a bare warning would break the format
    else:
        handler.setFormatter(logging.Formatter(
            "%(node)s %(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def warn_open_secret_file(path: str) -> None:
    if path and secret_file_too_open(path):
        logging.getLogger("ensync.node").warning(
            "cluster_secret_file is readable by other users; chmod 600 it path=%s",
            path)


async def serve(cfg: NodeConfig) -> None:
    node = Node(cfg)
    runner = web.AppRunner(build_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=cfg.tls_server)
    await site.start()
    node.start()
    logging.getLogger("ensync.node").info(
        "ready id=%s ws=%s raft=%s pid=%d", cfg.id, cfg.ws_url,
        cfg.raft.raft_address, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("ensync.node").info("stopping")
    await node.stop()
    await runner.cleanup()
    node.close_storage()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        cfg = build_config(settings)
        unsafe.ack_before_commit_requested()  # refused outside test builds
        setup_logging(cfg.id, settings["log_file"], settings["log_level"],
                      settings["log_json"])
        warn_open_secret_file(settings["cluster_secret_file"])
    except (ConfigError, unsafe.UnsafeRefused) as exc:
        print(f"ensync-node: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        logging.getLogger("ensync.node").error("cannot start: %s", exc)
        print(f"ensync-node: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
