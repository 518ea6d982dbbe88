"""Everything a jepsen-lite run depends on, in one declarative options object.

A run is a function of ``RunOptions``: the same options (seed included) give the
same cluster layout, the same nemesis schedule and the same workload choices.
Timing on a real machine is not deterministic, so "the same run" means the same
faults at the same offsets against the same workload, not the same history.

Every random choice draws from ``rng(seed, name)``, a stream of its own per
purpose (the schedule, each client), so adding a client does not shift the
schedule and vice versa.
"""

from __future__ import annotations

import dataclasses
import enum
import random

NODE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Family(enum.Enum):
    """What ``--nemesis`` names; each family expands into fault kinds."""

    KILL = "kill"
    PAUSE = "pause"
    PARTITION = "partition"
    LOSS = "loss"


class PartitionMode(enum.Enum):
    ISOLATE_LEADER = "isolate-leader"  # {leader} | {the other two}
    ISOLATE_RANDOM = "isolate-random"  # {one node} | {the other two}
    BRIDGE = "bridge"  # the two ends cannot talk; the middle node sees both
    ONE_WAY = "one-way"  # packets from one node to another are dropped, not back
    NO_MAJORITY = "no-majority"  # every node alone


class Fault(enum.Enum):
    KILL_RANDOM = "kill-random"  # SIGKILL, restart after a while
    KILL_LEADER = "kill-leader"
    KILL_FAST_RESTART = "kill-fast-restart"  # restart in under a second
    KILL_ALL = "kill-all"  # every node at once, then all restart
    PAUSE_LEADER = "pause-leader"  # SIGSTOP longer than the election timeout
    PAUSE_RANDOM = "pause-random"
    PARTITION_ISOLATE_LEADER = "partition-isolate-leader"
    PARTITION_ISOLATE_RANDOM = "partition-isolate-random"
    PARTITION_BRIDGE = "partition-bridge"
    PARTITION_ONE_WAY = "partition-one-way"
    PARTITION_NO_MAJORITY = "partition-no-majority"
    LOSS = "loss"  # random packet loss on every link of one node

    @property
    def partition_mode(self) -> PartitionMode | None:
        if not self.value.startswith("partition-"):
            return None
        return PartitionMode(self.value[len("partition-"):])


# Relative weights within a family; the rare whole-cluster faults weigh less.
FAULT_WEIGHTS: dict[Family, dict[Fault, int]] = {
    Family.KILL: {Fault.KILL_RANDOM: 3, Fault.KILL_LEADER: 3,
                  Fault.KILL_FAST_RESTART: 2, Fault.KILL_ALL: 1},
    Family.PAUSE: {Fault.PAUSE_LEADER: 2, Fault.PAUSE_RANDOM: 1},
    Family.PARTITION: {Fault.PARTITION_ISOLATE_LEADER: 3,
                       Fault.PARTITION_ISOLATE_RANDOM: 2, Fault.PARTITION_BRIDGE: 2,
                       Fault.PARTITION_ONE_WAY: 2, Fault.PARTITION_NO_MAJORITY: 1},
    Family.LOSS: {Fault.LOSS: 1},
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    seed: int
    duration_ms: int = 60_000  # workload time; the final phase comes on top
    families: tuple[Family, ...] = (Family.KILL, Family.PARTITION)  # () = no faults

    # Nodes (one loopback address each) and their settings.
    node_hosts: tuple[str, ...] = NODE_HOSTS
    raft_min_timeout_ms: int = 1000
    raft_max_timeout_ms: int = 2000
    leader_fallback_timeout_ms: int = 3000
    write_timeout_ms: int = 5000
    delivery_limit: int = 4
    compaction_min_entries: int = 300  # so snapshots and installs happen
    compaction_min_time_ms: int = 20_000
    # UNSAFE: nodes answer PUB before commit (node/unsafe.py), to show that the
    # checker catches lost events. Never on unless asked for.
    unsafe_ack_before_commit: bool = False

    # Workload shape.
    producers: int = 4
    recipients: int = 3
    main_consumers_per_recipient: int = 2
    publish_rate_per_s: int = 40  # all producers together
    deferred_probability: float = 0.15  # publish with deliver_at_ms
    deliver_at_delay_ms: tuple[int, int] = (500, 5000)
    keyed_probability: float = 0.10  # publish with an idempotency_key
    dedup_resend_probability: float = 0.30  # keyed and ok: send it once more
    poison_probability: float = 0.01  # never acked, must end in the DLQ
    never_ack_probability: float = 0.03  # a delivery left to time out
    defer_probability: float = 0.03  # a delivery answered with DEFER
    defer_delay_ms: tuple[int, int] = (200, 2000)
    ack_delay_ms: tuple[int, int] = (0, 150)
    sub_ack_timeout_ms: int = 1500  # ACK_TIMEOUT_MS on every SUB
    publish_retries_max: int = 3  # keyed publish retried after an info outcome
    op_timeout_ms: int = 8000  # client side; above write_timeout_ms
    connect_timeout_ms: int = 3000
    reconnect_backoff_ms: tuple[int, int] = (100, 2000)
    reconnects_max: int = 500  # per client and run

    # Nemesis cadence: a quiet start, then one fault at a time.
    quiet_start_ms: int = 5000
    fault_gap_ms: tuple[int, int] = (2000, 6000)
    fault_duration_ms: tuple[int, int] = (3000, 10_000)
    kill_restart_ms: tuple[int, int] = (1000, 5000)
    fast_restart_ms: tuple[int, int] = (50, 900)
    pause_ms: tuple[int, int] = (3000, 8000)  # above raft_max_timeout_ms
    loss_percent: tuple[int, int] = (10, 30)

    # Final phase.
    leader_wait_ms: int = 30_000
    drain_quiet_ms: int = 3000  # no delivery and empty queues this long
    drain_max_ms: int = 45_000
    converge_max_ms: int = 15_000

    def __post_init__(self) -> None:
        assert self.duration_ms > 0
        assert len(self.node_hosts) == 3
        assert self.pause_ms[0] > self.raft_max_timeout_ms
        assert self.op_timeout_ms > self.write_timeout_ms

    def as_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["families"] = [family.value for family in self.families]
        return data


def rng(seed: int, name: str) -> random.Random:
    """A random stream of its own for one purpose of one run."""
    return random.Random(f"{seed}:{name}")


def parse_families(text: str) -> tuple[Family, ...]:
    """``kill,partition`` -> families; ``none`` or empty -> no faults at all."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names in ([], ["none"]):
        return ()
    try:
        return tuple(dict.fromkeys(Family(name) for name in names))
    except ValueError:
        known = ", ".join(family.value for family in Family)
        raise ValueError(f"unknown nemesis in {text!r}; known: {known}, none") from None
