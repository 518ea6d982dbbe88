"""``ensync-node``: run one node from flags, ``ENSYNC_*`` variables or a TOML file.

Precedence: a flag given on the command line, then the environment variable, then
the TOML file named by ``--config``, then the default below.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tomllib

from aiohttp import web

from node.http import build_app
from node.server import Node, NodeConfig
from raft.machine import RaftConfig

# (name, type, default, help); every name is also ENSYNC_<NAME> and a TOML key.
SETTINGS = [
    ("id", str, "n1", "node id shown by status"),
    ("host", str, "127.0.0.1", "HTTP and WebSocket bind host"),
    ("port", int, 8081, "HTTP and WebSocket port"),
    ("raft", str, "127.0.0.1:9081", "this node's Raft address (bound exactly)"),
    ("peers", str, "", "other nodes as id=host:port, comma separated"),
    ("data_dir", str, ".ensync/n1", "journal, snapshots and RocksDB"),
    ("admin_token", str, "", "bearer token for /admin/*"),
    ("raft_min_timeout_ms", int, 1000, "election timeout, lower bound"),
    ("raft_max_timeout_ms", int, 2500, "election timeout, upper bound"),
    ("leader_fallback_timeout_ms", int, 3000, "a leader without a majority steps down"),
    ("compaction_min_entries", int, 20000, "log entries before a snapshot"),
    ("compaction_min_time_ms", int, 600_000, "time between snapshots at most"),
    ("write_timeout_ms", int, 10000, "a write without quorum fails after this"),
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
]


class ConfigError(Exception):
    pass


def load_settings(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="ensync-node", description=__doc__)
    parser.add_argument("--config", help="TOML file with the settings below")
    for name, kind, default, help_text in SETTINGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
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
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}") from None


def parse_peers(text: str) -> dict[str, str]:
    peers = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        node_id, sep, address = item.partition("=")
        if not sep or ":" not in address:
            raise ConfigError(f"peer {item!r} is not id=host:port")
        peers[node_id] = address
    return peers


def build_config(s: dict) -> NodeConfig:
    if not s["admin_token"]:
        raise ConfigError("admin_token is required (--admin-token or ENSYNC_ADMIN_TOKEN)")
    raft = RaftConfig(
        node_id=s["id"], raft_address=s["raft"], peers=parse_peers(s["peers"]),
        data_dir=s["data_dir"], raft_min_timeout_ms=s["raft_min_timeout_ms"],
        raft_max_timeout_ms=s["raft_max_timeout_ms"],
        leader_fallback_timeout_ms=s["leader_fallback_timeout_ms"],
        compaction_min_entries=s["compaction_min_entries"],
        compaction_min_time_ms=s["compaction_min_time_ms"],
        write_timeout_ms=s["write_timeout_ms"], batch_ops_max=s["batch_ops_max"],
        batch_bytes_max=s["batch_bytes_max"],
        batches_in_flight_max=s["batches_in_flight_max"])
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
                      idle_after_ms=s["idle_after_ms"])


class _NodeIdFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


def setup_logging(node_id: str, log_file: str, level: str) -> None:
    if log_file:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise ConfigError(f"cannot open log file {log_file}: {exc}") from exc
    else:
        handler = logging.StreamHandler()
    handler.addFilter(_NodeIdFilter(node_id))
    handler.setFormatter(logging.Formatter(
        "%(node)s %(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(cfg: NodeConfig) -> None:
    node = Node(cfg)
    runner = web.AppRunner(build_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    node.start()
    logging.getLogger("ensync.node").info(
        "ready id=%s ws=ws://%s:%d/message raft=%s pid=%d", cfg.id, cfg.host,
        cfg.port, cfg.raft.raft_address, os.getpid())

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
        setup_logging(cfg.id, settings["log_file"], settings["log_level"])
    except ConfigError as exc:
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
