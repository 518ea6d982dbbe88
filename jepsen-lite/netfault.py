"""Network faults between the nodes, as nftables rules in a table of our own.

The table is ``inet ensync_jepsen_<harness pid>``: one per run, so two runs never
touch each other's rules and a leftover table names the run that left it. It has
one chain on the ``input`` hook, where a loopback packet arrives at the node it is
addressed to; a drop there looks to the sender like a lost packet, not like the
local error a drop on ``output`` would return to it.

Every rule matches a source *and* a destination among the node addresses, which
``_check_address`` holds to 127.0.0.0/8 and the run's own nodes. The harness's
client and admin traffic comes from 127.0.0.1 and so is never cut: a partition
separates nodes, not the observer.

A fault replaces the chain's rules in one ``nft -f`` transaction, and a heal
flushes the chain. ``destroy`` deletes the whole table and is safe to call more
than once, from ``finally``, ``atexit`` and signal handlers alike.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import subprocess

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
TABLE_PREFIX = "ensync_jepsen_"
NFT_TIMEOUT_S = 10


class NetFaultError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Drop:
    """Drop packets from ``src`` to ``dst``: all, or ``percent`` of them at random."""

    src: str
    dst: str
    percent: int = 100

    def rule(self) -> str:
        assert 0 < self.percent <= 100
        match = f"ip saddr {self.src} ip daddr {self.dst}"
        if self.percent == 100:
            return f"{match} drop"
        return f"{match} numgen random mod 100 < {self.percent} drop"


def nft_available() -> bool:
    return shutil.which("nft") is not None


def _nft(script: str | None, *args: str) -> str:
    command = ["nft", *args] + (["-f", "-"] if script is not None else [])
    try:
        done = subprocess.run(command, input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetFaultError(f"nft failed: {exc}") from exc
    if done.returncode != 0:
        raise NetFaultError(f"nft {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class NftTable:
    def __init__(self, node_hosts: set[str], pid: int | None = None) -> None:
        for host in node_hosts:
            assert ipaddress.ip_address(host) in LOOPBACK, host
        self.node_hosts = frozenset(node_hosts)
        self.name = f"{TABLE_PREFIX}{os.getpid() if pid is None else pid}"
        self.created = False
        self.rules: tuple[Drop, ...] = ()

    def create(self) -> None:
        _nft(f"table inet {self.name} {{\n"
             "  chain input {\n"
             "    type filter hook input priority filter; policy accept;\n"
             "  }\n"
             "}\n")
        self.created = True

    def apply(self, drops: list[Drop]) -> None:
        """Replace every rule with ``drops``, atomically."""
        assert self.created
        for drop in drops:
            self._check_address(drop.src)
            self._check_address(drop.dst)
            assert drop.src != drop.dst

        lines = [f"flush chain inet {self.name} input"]
        lines += [f"add rule inet {self.name} input {drop.rule()}" for drop in drops]
        _nft("\n".join(lines) + "\n")
        self.rules = tuple(drops)

    def heal(self) -> None:
        if self.created:
            _nft(None, "flush", "chain", "inet", self.name, "input")
        self.rules = ()

    def destroy(self) -> None:
        """Delete the table if it exists. Never raises: it runs on the way out."""
        try:
            _nft(None, "delete", "table", "inet", self.name)
        except NetFaultError:
            pass  # not there (already deleted or never made), or nft is gone
        self.created = False
        self.rules = ()

    def exists(self) -> bool:
        return self.name in list_our_tables()

    def _check_address(self, host: str) -> None:
        # Not an assert: this guard must hold even under python -O.
        if ipaddress.ip_address(host) not in LOOPBACK or host not in self.node_hosts:
            raise NetFaultError(f"refusing a rule for {host}: not one of our nodes")


def list_our_tables() -> list[str]:
    """Names of every jepsen-lite table on this machine (any run's)."""
    try:
        out = _nft(None, "list", "tables")
    except NetFaultError:
        return []
    names = []
    for line in out.splitlines():
        parts = line.split()  # "table inet ensync_jepsen_123"
        if len(parts) == 3 and parts[2].startswith(TABLE_PREFIX):
            names.append(parts[2])
    return names


def remove_stale_tables() -> list[str]:
    """Delete tables left by jepsen-lite runs whose harness process is gone."""
    removed = []
    for name in list_our_tables():
        pid_text = name[len(TABLE_PREFIX):]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            _nft(None, "delete", "table", "inet", name)
            removed.append(name)
        except NetFaultError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
