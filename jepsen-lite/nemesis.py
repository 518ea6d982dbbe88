"""The nemesis: a fault schedule made up front from the seed, and its executor.

``make_schedule`` is pure: options in, a list of ``Step`` out. The run writes the
whole list into the history's first line before the first fault, so a failing
seed's faults can be read, and replayed, without running anything. One fault is
active at a time: a quiet start, then fault, heal, gap, fault, ...

Only one thing is left to run time: who leads. A step aimed at the leader names
``"leader"`` and carries a seeded ``fallback`` node for when no leader is agreed
at that moment; the history's ``nemesis`` start event records whom it really hit.

``Nemesis.run`` carries the steps out against ``Nodes`` (kill, pause) and
``NftTable`` (partitions, loss). Each fault is undone in a ``finally``, so a run
cancelled mid-fault (end of the workload phase, Ctrl-C) still restarts, resumes
or heals what that fault did. ``heal_all`` is the blunt version for the final
phase: no rules, nothing paused, every node running.
"""

from __future__ import annotations

import asyncio
import dataclasses

from netfault import Drop, NftTable
from nodes import Nodes
from options import FAULT_WEIGHTS, Fault, PartitionMode, RunOptions, rng
from recorder import Recorder

LEADER = "leader"
LEADER_LOOKUP_MS = 1500
KILL_FAULTS = {Fault.KILL_RANDOM, Fault.KILL_LEADER, Fault.KILL_FAST_RESTART,
               Fault.KILL_ALL}
PAUSE_FAULTS = {Fault.PAUSE_LEADER, Fault.PAUSE_RANDOM}
LEADER_FAULTS = {Fault.KILL_LEADER, Fault.PAUSE_LEADER,
                 Fault.PARTITION_ISOLATE_LEADER}


@dataclasses.dataclass(frozen=True)
class Step:
    at_ms: int  # planned start on the run's clock
    fault: Fault
    duration_ms: int  # how long it holds; for a kill, the time until restart
    target: str  # a node id, "leader", or "all"
    fallback: str | None = None  # for "leader" when none is agreed
    peer: str | None = None  # one-way: the node whose inbound packets drop
    percent: int | None = None  # loss

    def as_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["fault"] = self.fault.value
        return {k: v for k, v in data.items() if v is not None}


def make_schedule(options: RunOptions, node_ids: list[str]) -> list[Step]:
    """The run's faults, from ``options.seed`` alone."""
    assert len(node_ids) == 3

    if not options.families:
        return []
    r = rng(options.seed, "schedule")

    steps, at_ms = [], options.quiet_start_ms
    while True:
        # A family first, evenly, then a fault by its weight in the family.
        weights = FAULT_WEIGHTS[r.choice(options.families)]
        fault = r.choices(list(weights), list(weights.values()))[0]
        duration_ms = r.randint(*_duration_range(options, fault))
        if at_ms + duration_ms > options.duration_ms:
            break
        steps.append(_aim(r, Step(at_ms, fault, duration_ms, "all"), node_ids,
                          options))
        at_ms += duration_ms + r.randint(*options.fault_gap_ms)
    return steps


def _duration_range(options: RunOptions, fault: Fault) -> tuple[int, int]:
    if fault is Fault.KILL_FAST_RESTART:
        return options.fast_restart_ms
    if fault in KILL_FAULTS:
        return options.kill_restart_ms
    if fault in PAUSE_FAULTS:
        return options.pause_ms
    return options.fault_duration_ms


def _aim(r, step: Step, node_ids: list[str], options: RunOptions) -> Step:
    """Fill in the step's target (and peer, percent) with seeded choices."""
    one = r.choice(node_ids)
    if step.fault in (Fault.KILL_ALL, Fault.PARTITION_NO_MAJORITY):
        return step
    if step.fault in LEADER_FAULTS:
        return dataclasses.replace(step, target=LEADER, fallback=one)
    if step.fault is Fault.KILL_FAST_RESTART:
        # Aimed at the vote-persistence bug: half the time at the leader.
        if r.random() < 0.5:
            return dataclasses.replace(step, target=LEADER, fallback=one)
        return dataclasses.replace(step, target=one)
    if step.fault is Fault.PARTITION_ONE_WAY:
        peer = r.choice([n for n in node_ids if n != one])
        return dataclasses.replace(step, target=one, peer=peer)
    if step.fault is Fault.LOSS:
        return dataclasses.replace(step, target=one,
                                   percent=r.randint(*options.loss_percent))
    return dataclasses.replace(step, target=one)


def partition_drops(mode: PartitionMode, hosts: dict[str, str], target: str,
                    peer: str | None = None) -> list[Drop]:
    """The drops of one partition; ``hosts`` maps node id -> address."""
    ids = sorted(hosts)
    others = [n for n in ids if n != target]
    if mode in (PartitionMode.ISOLATE_LEADER, PartitionMode.ISOLATE_RANDOM):
        return _both_ways(hosts, [(target, other) for other in others])
    if mode is PartitionMode.BRIDGE:
        return _both_ways(hosts, [(others[0], others[1])])
    if mode is PartitionMode.ONE_WAY:
        assert peer is not None and peer != target
        return [Drop(hosts[target], hosts[peer])]
    assert mode is PartitionMode.NO_MAJORITY
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    return _both_ways(hosts, pairs)


def loss_drops(hosts: dict[str, str], target: str, percent: int) -> list[Drop]:
    pairs = [(target, other) for other in sorted(hosts) if other != target]
    return _both_ways(hosts, pairs, percent)


def _both_ways(hosts: dict[str, str], pairs, percent: int = 100) -> list[Drop]:
    drops = []
    for a, b in pairs:
        drops.append(Drop(hosts[a], hosts[b], percent))
        drops.append(Drop(hosts[b], hosts[a], percent))
    return drops


class Nemesis:
    def __init__(self, options: RunOptions, schedule: list[Step], nodes: Nodes,
                 table: NftTable, recorder: Recorder) -> None:
        self.options = options
        self.schedule = schedule
        self.nodes = nodes
        self.table = table
        self.recorder = recorder
        self.current: str | None = None  # the active fault's name, for progress
        self.executed_total = 0

    async def run(self) -> None:
        """Carry out the schedule in order; cancel to stop (the active fault heals)."""
        for step in self.schedule:
            wait_ms = step.at_ms - self.recorder.now_ms()
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
            await self._execute(step)

    async def _execute(self, step: Step) -> None:
        targets = await self._targets(step)
        self._record("start", step, targets)
        self.current = step.fault.value
        try:
            self._start(step, targets)
            await asyncio.sleep(step.duration_ms / 1000)
        finally:
            # Synchronous, so it completes even when the sleep was cancelled.
            self._stop(step, targets)
            self.current = None
            self.executed_total += 1
            self._record("stop", step, targets)

    async def _targets(self, step: Step) -> list[str]:
        if step.target == "all":
            return list(self.nodes.ids)
        if step.target != LEADER:
            return [step.target]
        try:
            leader = await asyncio.wait_for(self.nodes.agreed_leader(),
                                            LEADER_LOOKUP_MS / 1000)
        except asyncio.TimeoutError:
            leader = None
        return [leader or step.fallback]

    def _start(self, step: Step, targets: list[str]) -> None:
        fault = step.fault
        if fault in KILL_FAULTS:
            for node_id in targets:
                self.nodes.kill(node_id)
        elif fault in PAUSE_FAULTS:
            for node_id in targets:
                self.nodes.pause(node_id)
        elif fault is Fault.LOSS:
            self.table.apply(loss_drops(self._hosts(), targets[0], step.percent))
        else:
            mode = fault.partition_mode
            target = targets[0] if len(targets) == 1 else self.nodes.ids[0]
            self.table.apply(partition_drops(mode, self._hosts(), target, step.peer))

    def _stop(self, step: Step, targets: list[str]) -> None:
        fault = step.fault
        if fault in KILL_FAULTS:
            for node_id in targets:
                if not self.nodes.nodes[node_id].running():
                    self.nodes.spawn(node_id)
        elif fault in PAUSE_FAULTS:
            for node_id in targets:
                self.nodes.resume(node_id)
        else:
            self.table.heal()

    def _record(self, action: str, step: Step, targets: list[str]) -> None:
        self.recorder.write("info", "nemesis", "nemesis", {
            "action": action, "fault": step.fault.value, "targets": targets,
            "seed": self.options.seed})

    def _hosts(self) -> dict[str, str]:
        return {node_id: node.host for node_id, node in self.nodes.nodes.items()}

    def heal_all(self) -> list[str]:
        """No rules, nothing paused, every node running; the ids restarted."""
        self.table.heal()
        self.nodes.resume_all()
        restarted = self.nodes.dead_ids()
        for node_id in restarted:
            self.nodes.spawn(node_id)
        return restarted
