"""jepsen-lite's checkers on synthetic histories (jepsen-lite/checker.py).

Clean histories come from a small simulated broker that follows the delivery
state machine of docs/ARCHITECTURE.md: it stores, assigns in rank order, lets
acks time out, defers, dead-letters and expires, and its consumers see pushes
after a random latency each, so arrivals across consumers interleave. Each
planted-anomaly test takes such a run, adds one anomaly through the builder,
and expects that checker, and only that one, to fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import json
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

JEPSEN_LITE_DIR = Path(__file__).resolve().parents[2] / "jepsen-lite"
if str(JEPSEN_LITE_DIR) not in sys.path:
    sys.path.insert(0, str(JEPSEN_LITE_DIR))

import checker  # noqa: E402

EPOCH_AT_START_MS = 1_760_000_000_000
LIMIT = 3  # delivery_limit of the simulated runs
RETENTION_MS = 4000
ACK_TIMEOUT_MS = 800
NODES = ("n1", "n2", "n3")
QUEUES = {"app1/orders": (101, 102), "app1/refunds": (103,), "app2/orders": (104, 105)}
SILENT_QUEUE = "app3/audit"  # nobody subscribes: its events expire
PLANT_CONSUMER = 900  # planted deliveries get a stream of their own
SIM_STEPS_MAX = 200_000


# -- the builder ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stored:
    """An event the broker stored: what its deliveries carry."""

    pid: str
    idem: str
    block: int
    queue: str


class HistoryBuilder:
    """Writes history lines at chosen times; ``build`` orders them by time."""

    def __init__(self, seed: int = 1, **run_options) -> None:
        self.seed = seed
        self.run_options = {"delivery_limit": LIMIT, "retention_ms": RETENTION_MS,
                            **run_options}
        self.lines: list[tuple[int, int, dict]] = []
        self.next_offset: dict[int, int] = {}
        self.finals: dict[str, dict] = {}
        self.final_ms: int | None = None  # None: just after the last line
        self._pids = itertools.count(1)

    def line(self, time_ms: int, type_: str, f: str, process, value: dict) -> None:
        event = {"type": type_, "f": f, "process": process, "time_ms": time_ms,
                 "value": value}
        self.lines.append((time_ms, len(self.lines), event))

    def new_pid(self) -> str:
        return f"pid-{next(self._pids)}"

    def store(self, queue: str, pid: str) -> Stored:
        partition = zlib.crc32(queue.split("/")[0].encode()) % 64
        offset = self.next_offset.get(partition, 1)
        self.next_offset[partition] = offset + 1
        return Stored(pid, "evt-%04x-%012x" % (partition, offset), offset, queue)

    def publish(self, at_ms: int, queue: str, *, process=1, outcome: str | None = "ok",
                pid: str | None = None, key: str | None = None,
                scheduled_ms: int | None = None, poison: bool = False,
                commit: bool | None = None, reuse: Stored | None = None,
                reply_ms: int = 5) -> Stored | None:
        """outcome None: the invoke never completes. ``reuse``: a dedup hit."""
        pid = pid or self.new_pid()
        value = {"queue": queue, "pid": pid}
        if key is not None:
            value["key"] = key
        if scheduled_ms is not None:
            value["deliver_at_ms"] = EPOCH_AT_START_MS + scheduled_ms
            value["deliver_at_time_ms"] = scheduled_ms
        if poison:
            value["poison"] = True
        self.line(at_ms, "invoke", "publish", process, value)

        commit = outcome != "fail" if commit is None else commit
        stored = reuse or (self.store(queue, pid) if commit else None)
        if outcome is not None:
            done = {**value, "idem": stored.idem} if outcome == "ok" else dict(value)
            self.line(at_ms + reply_ms, outcome, "publish", process, done)
        return stored

    def deliver(self, at_ms: int, consumer, ev: Stored, attempt: int | None,
                queue: str | None = None, block: int | None = None) -> None:
        value = {"idem": ev.idem, "pid": ev.pid, "queue": queue or ev.queue,
                 "attempt": attempt, "consumer": consumer,
                 "block": ev.block if block is None else block}
        self.line(at_ms, "ok", "deliver", consumer, value)

    def ack(self, at_ms: int, process, ev: Stored, attempt: int,
            outcome: str | None = "ok", reply_ms: int = 4) -> None:
        value = {"idem": ev.idem, "attempt": attempt}
        self.line(at_ms, "invoke", "ack", process, value)
        if outcome is not None:
            self.line(at_ms + reply_ms, outcome, "ack", process, dict(value))

    def defer(self, at_ms: int, process, ev: Stored, attempt: int, delay_ms: int,
              priority: int = 1, outcome: str = "ok", reply_ms: int = 4) -> int:
        """The due time on the run clock: applied 2 ms after the invoke."""
        value = {"idem": ev.idem, "delay_ms": delay_ms, "priority": priority}
        self.line(at_ms, "invoke", "defer", process, value)
        due_time_ms = at_ms + 2 + delay_ms
        done = dict(value)
        if outcome == "ok":
            done.update(due_ms=EPOCH_AT_START_MS + due_time_ms, due_time_ms=due_time_ms)
        self.line(at_ms + reply_ms, outcome, "defer", process, done)
        return due_time_ms

    def nemesis(self, start_ms: int, stop_ms: int, fault: str = "partition") -> None:
        for action, time_ms in (("start", start_ms), ("stop", stop_ms)):
            value = {"action": action, "fault": fault, "targets": ["n1"],
                     "seed": self.seed}
            self.line(time_ms, "info", "nemesis", "nemesis", value)

    def final(self, dlq: list[str], expired: list[str], applied_index: int) -> None:
        digest = hashlib.sha256(repr((sorted(dlq), sorted(expired))).encode())
        for node in NODES:
            self.finals[node] = {"node": node, "digest": digest.hexdigest(),
                                 "applied_index": applied_index, "dlq": list(dlq),
                                 "expired": list(expired)}

    @property
    def last_ms(self) -> int:
        return max((time_ms for time_ms, _, _ in self.lines), default=0)

    def build(self) -> list[dict]:
        run = {"type": "info", "f": "run", "process": "harness", "time_ms": 0,
               "value": {"seed": self.seed, "schedule": [],
                         "options": self.run_options,
                         "start_unix_ms": EPOCH_AT_START_MS}}
        final_ms = self.final_ms if self.final_ms is not None else self.last_ms + 500
        finals = [{"type": "info", "f": "final", "process": "checker",
                   "time_ms": final_ms, "value": value}
                  for value in self.finals.values()]
        return [run, *(event for _, _, event in sorted(self.lines)), *finals]


# -- a simulated broker that keeps every promise -------------------------------


@dataclasses.dataclass(frozen=True)
class Knobs:
    publishes: int = 240
    info_probability: float = 0.08
    fail_probability: float = 0.04
    scheduled_probability: float = 0.08
    poison_probability: float = 0.02
    timeout_probability: float = 0.06
    defer_probability: float = 0.06
    ack_info_probability: float = 0.05
    silent_publishes: int = 3
    nemesis_windows: int = 3


@dataclasses.dataclass
class Sim:
    b: HistoryBuilder
    heal_ms: int
    plant_ms: int  # a quiet moment in the middle of the run for planted events


def simulate(seed: int, knobs: Knobs = Knobs()) -> Sim:
    """A clean run: every checker must accept what this writes."""
    rng = random.Random(f"sim:{seed}")
    b = HistoryBuilder(seed=seed)
    arrivals: dict[str, list] = {queue: [] for queue in QUEUES}
    expired: list[str] = []
    expire_ms = 0

    for plan in sorted(_publish_plans(rng, knobs), key=lambda plan: plan["at_ms"]):
        reuse = plan.pop("reuse_of", None)
        if reuse is not None:
            plan["reuse"] = reuse.get("stored")
        ready_ms = max(plan["at_ms"] + 1, plan.get("scheduled_ms") or 0)
        stored = b.publish(**{k: v for k, v in plan.items() if k != "stored_box"})
        plan["stored_box"]["stored"] = stored
        if stored is None or plan.get("reuse") is not None:
            continue
        if plan["queue"] == SILENT_QUEUE:
            expired.append(stored.idem)
            expire_ms = max(expire_ms, plan["at_ms"] + RETENTION_MS + 100)
            continue
        arrivals[plan["queue"]].append((ready_ms, stored.block, stored,
                                        plan.get("poison", False)))

    dead: list[str] = []
    for queue, consumers in QUEUES.items():
        dead += _serve_queue(b, rng, consumers, arrivals[queue], knobs)

    heal_ms = _nemesis_windows(b, rng, knobs)
    b.final(dead, expired, applied_index=10_000 + len(b.lines))
    b.final_ms = max(b.last_ms + 500, expire_ms)
    return Sim(b, heal_ms=heal_ms, plant_ms=heal_ms // 2)


def _publish_plans(rng: random.Random, knobs: Knobs) -> list[dict]:
    """Publishes from four processes, one operation at a time each."""
    plans: list[dict] = []
    free_ms = {process: 0 for process in (1, 2, 3, 4)}
    now_ms = 1000
    for i in range(knobs.publishes):
        now_ms += rng.randint(2, 20)
        process = min(free_ms, key=free_ms.get)
        at_ms = max(now_ms, free_ms[process])
        queue = SILENT_QUEUE if i < knobs.silent_publishes else rng.choice(list(QUEUES))
        plan = {"at_ms": at_ms, "queue": queue, "process": process,
                "stored_box": {}, "reply_ms": rng.randint(1, 15)}
        if queue != SILENT_QUEUE and rng.random() < knobs.scheduled_probability:
            plan["scheduled_ms"] = at_ms + rng.randint(300, 2000)
        if queue != SILENT_QUEUE and rng.random() < knobs.poison_probability:
            plan["poison"] = True

        roll = rng.random()
        retry = None
        if roll < knobs.info_probability:
            plan.update(outcome="info", commit=rng.random() < 0.5, reply_ms=600,
                        pid=f"pid-{process}-{i}")
            if rng.random() < 0.5:
                plan["key"] = f"key-{i}"
            retry = _retry_plan(rng, plan)
        elif roll < knobs.info_probability + knobs.fail_probability:
            plan["outcome"] = "fail"
        plans += [plan] if retry is None else [plan, retry]
        last = plans[-1]
        free_ms[process] = last["at_ms"] + last["reply_ms"]
    return plans


def _retry_plan(rng: random.Random, first: dict) -> dict | None:
    """Half the unknown outcomes are retried: same pid, same key (if any)."""
    if rng.random() < 0.5:
        return None
    retry = {k: v for k, v in first.items() if k not in ("outcome", "commit")}
    retry.update(at_ms=first["at_ms"] + first["reply_ms"] + 10, reply_ms=5,
                 stored_box={})
    if "key" in first and first["commit"]:
        retry["reuse_of"] = first["stored_box"]  # the broker's dedup answers
    return retry


def _serve_queue(b: HistoryBuilder, rng: random.Random, consumers: tuple,
                 arrivals: list, knobs: Knobs) -> list[str]:
    """Assign in rank order to free consumers; returns the dead-lettered idems."""
    incoming = [(ready_ms, 1, block, stored, poison)
                for ready_ms, block, stored, poison in arrivals]
    heapq.heapify(incoming)
    pending: list = []
    attempts: Counter = Counter()
    free_ms = {consumer: 0 for consumer in consumers}
    dead: list[str] = []
    now_ms = 0

    for _ in range(SIM_STEPS_MAX):
        while incoming and incoming[0][0] <= now_ms:
            _, priority, block, stored, poison = heapq.heappop(incoming)
            heapq.heappush(pending, (-priority, block, stored, poison))
        idle = [c for c in consumers if free_ms[c] <= now_ms]
        if pending and idle:
            for consumer in idle[: len(pending)]:
                rank, block, stored, poison = heapq.heappop(pending)
                attempts[stored.idem] += 1
                attempt = attempts[stored.idem]
                back = _deliver_and_answer(b, rng, consumer, stored, poison, attempt,
                                           now_ms, free_ms, knobs)
                if back == "dead":
                    dead.append(stored.idem)
                elif back is not None:
                    ready_ms, priority = back
                    entry = (ready_ms, priority, block, stored, poison)
                    heapq.heappush(incoming, entry)
            continue
        if not incoming and not pending:
            return dead
        later = [incoming[0][0]] if incoming else []
        later += [free_ms[c] for c in consumers if pending and free_ms[c] > now_ms]
        now_ms = max(now_ms + 1, min(later))
    raise AssertionError("simulation did not drain")


def _deliver_and_answer(b, rng, consumer, stored, poison, attempt, now_ms,
                        free_ms, knobs):
    """One push and the consumer's answer; returns None, "dead" or (ready, priority)."""
    seen_ms = now_ms + rng.randint(0, 40)  # push latency differs per delivery
    b.deliver(seen_ms, consumer, stored, attempt)
    answer_ms = seen_ms + rng.randint(1, 100)
    roll = 1.0 if poison else rng.random()  # poison: never answered
    defer_below = knobs.defer_probability
    ack_info_below = defer_below + knobs.ack_info_probability
    silent_below = ack_info_below + knobs.timeout_probability

    if roll < defer_below and attempt < LIMIT:
        priority = rng.randint(1, 5)
        due_ms = b.defer(answer_ms, consumer, stored, attempt,
                         rng.randint(200, 1500), priority=priority)
        free_ms[consumer] = answer_ms + 2
        return due_ms, priority
    if roll < ack_info_below:
        b.ack(answer_ms, consumer, stored, attempt, outcome="info", reply_ms=300)
        if rng.random() < 0.5:  # it applied after all
            free_ms[consumer] = answer_ms + 2
            return None
    elif not poison and roll >= silent_below:
        b.ack(answer_ms, consumer, stored, attempt, reply_ms=rng.randint(1, 10))
        free_ms[consumer] = answer_ms + 2
        return None

    # No answer, or an answer that never applied: the ack timeout returns it.
    timeout_ms = now_ms + ACK_TIMEOUT_MS
    free_ms[consumer] = timeout_ms
    return "dead" if attempt >= LIMIT else (timeout_ms, 1)


def _nemesis_windows(b: HistoryBuilder, rng: random.Random, knobs: Knobs) -> int:
    """Windows spread over the publishing phase; returns the last heal."""
    publishes = [time_ms for time_ms, _, event in b.lines
                 if event["f"] == "publish" and event["type"] == "invoke"]
    first_ms, last_ms = min(publishes), max(publishes)
    span_ms = max(1, (last_ms - first_ms) // max(1, knobs.nemesis_windows))
    heal_ms = first_ms
    for i in range(knobs.nemesis_windows):
        start_ms = first_ms + i * span_ms + rng.randint(0, span_ms // 4)
        heal_ms = start_ms + rng.randint(span_ms // 4, span_ms // 2)
        b.nemesis(start_ms, heal_ms, fault=rng.choice(["partition", "kill", "pause"]))
    return heal_ms


# -- helpers -------------------------------------------------------------------


def failing(result: dict) -> set[str]:
    return {name for name, outcome in result["anomalies"].items()
            if outcome["valid"] is False}


def undecided(result: dict) -> set[str]:
    return {name for name, outcome in result["anomalies"].items()
            if outcome["valid"] == checker.UNKNOWN}


LOW_MINIMUMS = {"publishes_ok_min": 0, "deliveries_min": 0, "nemesis_windows_min": 0}


@pytest.fixture(scope="module")
def clean_history() -> list[dict]:
    return simulate(seed=11).b.build()


# -- clean histories pass ------------------------------------------------------


def test_clean_simulated_run_is_valid_and_exercises_the_hard_cases(clean_history):
    result = checker.check(clean_history)

    assert result["valid"] is True, checker.summary_text(result)
    stats, counts = result["stats"], result["counts"]
    assert stats["publishes_by_outcome"]["info"] > 0
    assert stats["publishes_by_outcome"]["fail"] > 0
    assert counts["unknown_outcome"] > 0
    assert counts["duplicated"] > 0
    assert result["anomalies"]["lost"]["recovered"] > 0
    assert stats["defers_ok"] > 0
    finals = [e["value"] for e in clean_history if e["f"] == "final"]
    assert finals[0]["dlq"] and finals[0]["expired"]
    assert any("deliver_at_ms" in e["value"] for e in clean_history
               if e["f"] == "publish")


def test_clean_run_has_cross_consumer_arrivals_out_of_block_order(clean_history):
    # The reason FIFO is checked per consumer: this must not count.
    by_queue: dict[str, list[int]] = {}
    for event in clean_history:
        value = event["value"]
        if event["f"] == "deliver" and value["attempt"] == 1:
            by_queue.setdefault(value["queue"], []).append(value["block"])
    assert any(blocks != sorted(blocks) for blocks in by_queue.values())
    assert checker.check(clean_history)["anomalies"]["fifo"]["valid"] is True


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       info_probability=st.floats(0.0, 0.3),
       timeout_probability=st.floats(0.0, 0.2),
       defer_probability=st.floats(0.0, 0.2),
       publishes=st.integers(230, 300))
def test_any_clean_simulated_run_is_valid(seed, info_probability, timeout_probability,
                                          defer_probability, publishes):
    knobs = Knobs(publishes=publishes, info_probability=info_probability,
                  timeout_probability=timeout_probability,
                  defer_probability=defer_probability)
    result = checker.check(simulate(seed, knobs).b.build(),
                           {"publishes_ok_min": 150, "deliveries_min": 150})
    assert result["valid"] is True, checker.summary_text(result)


# -- one planted anomaly, one failing checker ----------------------------------


def plant_lost(sim: Sim) -> None:
    sim.b.publish(sim.plant_ms, "app1/orders", process=50)


def plant_unexpected(sim: Sim) -> None:
    ghost = sim.b.store("app1/orders", "pid-ghost")
    sim.b.deliver(sim.plant_ms, PLANT_CONSUMER, ghost, attempt=1)


def plant_misrouted(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    sim.b.deliver(sim.plant_ms + 10, PLANT_CONSUMER, ev, 1, queue="app2/orders")
    sim.b.ack(sim.plant_ms + 20, PLANT_CONSUMER, ev, 1)


def plant_failed_publish_visible(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50, outcome="fail",
                       commit=True)
    sim.b.deliver(sim.plant_ms + 10, PLANT_CONSUMER, ev, 1)
    sim.b.ack(sim.plant_ms + 20, PLANT_CONSUMER, ev, 1)


def plant_fifo(sim: Sim) -> None:
    older = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    newer = sim.b.publish(sim.plant_ms + 10, "app1/orders", process=50)
    sim.b.deliver(sim.plant_ms + 20, PLANT_CONSUMER, newer, 1)
    sim.b.ack(sim.plant_ms + 25, PLANT_CONSUMER, newer, 1)
    sim.b.deliver(sim.plant_ms + 40, PLANT_CONSUMER, older, 1)
    sim.b.ack(sim.plant_ms + 45, PLANT_CONSUMER, older, 1)


def plant_redelivered_after_ack(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    sim.b.deliver(sim.plant_ms + 10, PLANT_CONSUMER, ev, 1)
    sim.b.ack(sim.plant_ms + 20, PLANT_CONSUMER, ev, 1)  # ok at +24
    sim.b.deliver(sim.plant_ms + 900, PLANT_CONSUMER + 1, ev, 2)


def plant_early_deferred(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    sim.b.deliver(sim.plant_ms + 10, PLANT_CONSUMER, ev, 1)
    due_ms = sim.b.defer(sim.plant_ms + 20, PLANT_CONSUMER, ev, 1, delay_ms=2000)
    sim.b.deliver(due_ms - 500, PLANT_CONSUMER, ev, 2)
    sim.b.ack(due_ms - 490, PLANT_CONSUMER, ev, 2)


def plant_early_scheduled(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50,
                       scheduled_ms=sim.plant_ms + 3000)
    sim.b.deliver(sim.plant_ms + 100, PLANT_CONSUMER, ev, 1)
    sim.b.ack(sim.plant_ms + 110, PLANT_CONSUMER, ev, 1)


def plant_over_delivery_limit(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    for attempt in range(1, LIMIT + 2):
        sim.b.deliver(sim.plant_ms + attempt * ACK_TIMEOUT_MS, PLANT_CONSUMER, ev,
                      attempt)
    sim.b.ack(sim.plant_ms + (LIMIT + 1) * ACK_TIMEOUT_MS + 10, PLANT_CONSUMER, ev,
              LIMIT + 1)


def plant_missing_from_dlq(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    for attempt in range(1, LIMIT + 1):
        sim.b.deliver(sim.plant_ms + attempt * ACK_TIMEOUT_MS, PLANT_CONSUMER, ev,
                      attempt)


def plant_inconsistent_idem(sim: Sim) -> None:
    ev = sim.b.publish(sim.plant_ms, "app1/orders", process=50)
    sim.b.deliver(sim.plant_ms + 10, PLANT_CONSUMER, ev, 1, block=ev.block + 10_000)
    sim.b.ack(sim.plant_ms + 20, PLANT_CONSUMER, ev, 1)


def plant_dedup(sim: Sim) -> None:
    first = sim.b.publish(sim.plant_ms, "app1/orders", process=50, pid="pid-keyed",
                          key="key-planted")
    again = sim.b.publish(sim.plant_ms + 20, "app1/orders", process=50,
                          pid="pid-keyed", key="key-planted")  # stored twice
    for n, ev in enumerate((first, again)):
        sim.b.deliver(sim.plant_ms + 40 + 20 * n, PLANT_CONSUMER, ev, 1)
        sim.b.ack(sim.plant_ms + 45 + 20 * n, PLANT_CONSUMER, ev, 1)


def plant_early_expired(sim: Sim) -> None:
    ev = sim.b.publish(sim.b.last_ms - 100, SILENT_QUEUE, process=50)
    for value in sim.b.finals.values():
        value["expired"].append(ev.idem)


def plant_divergence(sim: Sim) -> None:
    sim.b.finals["n3"]["digest"] = "0" * 64


def plant_stuck(sim: Sim) -> None:
    end_ms = sim.b.last_ms
    sim.b.nemesis(end_ms + 1000, end_ms + 5000, fault="partition")
    sim.b.publish(end_ms + 6000, "app1/orders", process=50, outcome=None)
    sim.b.final_ms = end_ms + 40_000


@pytest.mark.parametrize(("plant", "expected", "kind"), [
    (plant_lost, "lost", None),
    (plant_unexpected, "unexpected", None),
    (plant_misrouted, "misrouted", None),
    (plant_failed_publish_visible, "failed_publish_visible", None),
    (plant_fifo, "fifo", None),
    (plant_redelivered_after_ack, "redelivered_after_ack", None),
    (plant_early_deferred, "early_deferred", "deferred"),
    (plant_early_scheduled, "early_deferred", "scheduled"),
    (plant_over_delivery_limit, "delivery_limit", "over_limit"),
    (plant_missing_from_dlq, "delivery_limit", "missing_from_dlq"),
    (plant_inconsistent_idem, "inconsistent_idem", "block_not_offset"),
    (plant_dedup, "dedup", None),
    (plant_early_expired, "early_expired", None),
    (plant_divergence, "divergence", None),
    (plant_stuck, "stuck", None),
], ids=lambda value: getattr(value, "__name__", None) or value)
def test_planted_anomaly_is_caught_by_exactly_its_checker(plant, expected, kind):
    sim = simulate(seed=5)
    plant(sim)
    result = checker.check(sim.b.build())

    assert failing(result) == {expected}, checker.summary_text(result)
    outcome = result["anomalies"][expected]
    assert outcome["count"] == 1
    if kind is not None:
        assert outcome["examples"][0]["kind"] == kind
    assert result["valid"] is False
    assert "seed=5" in checker.summary_text(result)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       plant=st.sampled_from([plant_lost, plant_fifo, plant_redelivered_after_ack,
                              plant_missing_from_dlq, plant_early_deferred]))
def test_planted_anomaly_is_caught_in_any_clean_run(seed, plant):
    sim = simulate(seed)
    plant(sim)
    result = checker.check(sim.b.build())
    assert len(failing(result)) == 1, checker.summary_text(result)


def test_too_small_a_run_is_unknown_not_valid():
    result = checker.check(simulate(3, Knobs(publishes=60)).b.build())

    assert result["valid"] == checker.UNKNOWN
    assert failing(result) == set()
    assert undecided(result) == {"vacuous"}
    assert "publishes ok" in result["anomalies"]["vacuous"]["examples"][0]


def test_run_without_nemesis_is_unknown_unless_the_minimum_is_zero():
    sim = simulate(4, Knobs(nemesis_windows=0))
    history = [e for e in sim.b.build() if e["f"] != "nemesis"]

    assert checker.check(history)["valid"] == checker.UNKNOWN
    assert checker.check(history, {"nemesis_windows_min": 0})["valid"] is True


# -- the Jepsen total-queue cases, and other edges -----------------------------


def small_builder() -> HistoryBuilder:
    b = HistoryBuilder(seed=99)
    b.final([], [], applied_index=7)
    return b


def test_info_publish_never_delivered_is_unknown_not_lost():
    b = small_builder()
    b.publish(100, "app1/orders", outcome="info", commit=False)
    b.publish(110, "app1/orders", outcome="fail")  # known: not done, not unknown
    b.publish(120, "app1/orders", outcome=None)  # never completed
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert result["valid"] is True
    assert result["counts"]["lost"] == 0
    assert result["counts"]["unknown_outcome"] == 2


def test_info_publish_delivered_is_recovered():
    b = small_builder()
    ev = b.publish(100, "app1/orders", outcome="info", commit=True)
    b.deliver(200, 101, ev, 1)
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert result["valid"] is True
    assert result["anomalies"]["lost"]["recovered"] == 1


def test_ok_publish_delivered_twice_is_a_duplicate_not_lost():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    b.deliver(200, 101, ev, 1)
    b.deliver(1200, 102, ev, 2)
    b.ack(1210, 102, ev, 2)
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert result["valid"] is True
    assert result["counts"]["duplicated"] == 1
    assert result["anomalies"]["duplicates"]["redeliveries"] == 1


def test_lost_names_a_hole_when_a_later_event_came_out():
    b = small_builder()
    b.publish(100, "app1/orders")
    later = b.publish(120, "app1/orders")
    b.deliver(200, 101, later, 1)
    example = checker.check(b.build(), LOW_MINIMUMS)["anomalies"]["lost"]["examples"][0]
    assert example["where"] == "hole"


def test_second_store_of_a_retried_publish_must_come_out_too():
    b = small_builder()
    first = b.publish(100, "app1/orders", pid="p", outcome="info", commit=True)
    b.publish(800, "app1/orders", pid="p")  # no key: stored again, never delivered
    b.deliver(900, 101, first, 1)
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert failing(result) == {"lost"}


def test_same_key_outside_the_dedup_window_may_store_again():
    b = small_builder()
    first = b.publish(100, "app1/orders", pid="p", key="k")
    again = b.publish(200_000, "app1/orders", pid="p", key="k")
    b.deliver(300, 101, first, 1)
    b.deliver(200_100, 101, again, 1)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True
    narrow = checker.check(b.build(), {**LOW_MINIMUMS, "dedup_window_ms": 300_000})
    assert failing(narrow) == {"dedup"}


def test_retry_of_a_failed_publish_may_be_delivered():
    b = small_builder()
    b.publish(100, "app1/orders", pid="p", outcome="fail")
    ev = b.publish(200, "app1/orders", pid="p")
    b.deliver(300, 101, ev, 1)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_first_push_lost_in_transit_is_not_a_fifo_inversion():
    b = small_builder()
    older, newer = b.publish(100, "app1/orders"), b.publish(110, "app1/orders")
    b.deliver(200, 101, newer, 1)  # older's attempt 1 went to a dead connection
    b.deliver(1200, 101, older, 2)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_fifo_without_attempt_numbers_uses_first_sighting():
    b = small_builder()
    older, newer = b.publish(100, "app1/orders"), b.publish(110, "app1/orders")
    b.deliver(200, 101, newer, None)
    b.deliver(300, 101, older, None)
    assert failing(checker.check(b.build(), LOW_MINIMUMS)) == {"fifo"}


def test_redelivery_after_an_ack_of_unknown_outcome_is_allowed():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    b.deliver(200, 101, ev, 1)
    b.ack(210, 101, ev, 1, outcome="info", reply_ms=300)
    b.deliver(1200, 101, ev, 2)
    b.ack(1210, 101, ev, 2)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_deferred_delivery_within_the_tolerance_is_on_time():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    b.deliver(200, 101, ev, 1)
    due_ms = b.defer(210, 101, ev, 1, delay_ms=1000)
    b.deliver(due_ms - 30, 101, ev, 2)
    b.ack(due_ms, 101, ev, 2)
    history = b.build()

    assert checker.check(history, LOW_MINIMUMS)["valid"] is True
    strict = checker.check(history, {**LOW_MINIMUMS, "defer_tolerance_ms": 0})
    assert failing(strict) == {"early_deferred"}


def test_epoch_deliver_at_is_put_on_the_run_clock():
    b = small_builder()
    ev = b.publish(100, "app1/orders", scheduled_ms=2000)
    b.deliver(500, 101, ev, 1)
    history = b.build()
    for event in history:
        event["value"].pop("deliver_at_time_ms", None)  # as if only epoch was written

    result = checker.check(history, LOW_MINIMUMS)
    assert failing(result) == {"early_deferred"}
    example = result["anomalies"]["early_deferred"]["examples"][0]
    assert example["deliver_at_time_ms"] == 2000


def test_limit_reached_with_an_ack_of_unknown_outcome_need_not_be_in_the_dlq():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    for attempt in range(1, LIMIT + 1):
        b.deliver(attempt * 1000, 101, ev, attempt)
    b.ack(LIMIT * 1000 + 10, 101, ev, LIMIT, outcome="info")
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_limit_reached_then_a_failed_defer_must_still_be_in_the_dlq():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    for attempt in range(1, LIMIT + 1):
        b.deliver(attempt * 1000, 101, ev, attempt)
    b.defer(LIMIT * 1000 + 10, 101, ev, LIMIT, delay_ms=500, outcome="fail")
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert failing(result) == {"delivery_limit"}
    example = result["anomalies"]["delivery_limit"]["examples"][0]
    assert example["kind"] == "missing_from_dlq"


def test_limit_reached_and_in_the_dlq_is_fine():
    b = HistoryBuilder(seed=99)
    ev = b.publish(100, "app1/orders", poison=True)
    for attempt in range(1, LIMIT + 1):
        b.deliver(attempt * 1000, 101, ev, attempt)
    b.final([ev.idem], [], applied_index=9)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_delivery_limit_comes_from_options_then_run_line_then_default():
    b = small_builder()
    ev = b.publish(100, "app1/orders")
    for attempt in range(1, 5):
        b.deliver(attempt * 1000, 101, ev, attempt)
    b.ack(5000, 101, ev, 4)
    history = b.build()

    assert failing(checker.check(history, LOW_MINIMUMS)) == {"delivery_limit"}
    raised = checker.check(history, {**LOW_MINIMUMS, "delivery_limit": 4})
    assert raised["valid"] is True
    del history[0]["value"]["options"]["delivery_limit"]
    result = checker.check(history, LOW_MINIMUMS)
    assert result["valid"] is True
    assert result["options"]["delivery_limit"] == checker.DELIVERY_LIMIT_DEFAULT


def test_stuck_is_unknown_when_the_history_ends_inside_the_window():
    b = small_builder()
    b.nemesis(100, 200)
    b.publish(300, "app1/orders", outcome=None)
    b.final_ms = 5000
    result = checker.check(b.build(), LOW_MINIMUMS)

    assert result["anomalies"]["stuck"]["valid"] == checker.UNKNOWN
    assert result["valid"] == checker.UNKNOWN


def test_no_final_states_make_divergence_unknown():
    b = HistoryBuilder(seed=99)
    b.publish(100, "app1/orders", outcome="info", commit=False)
    result = checker.check(b.build(), LOW_MINIMUMS)
    assert undecided(result) == {"divergence"}


def test_node_without_a_final_digest_makes_divergence_unknown_not_failed():
    b = small_builder()
    b.finals["n2"]["digest"] = b.finals["n2"]["applied_index"] = None
    result = checker.check(b.build(), LOW_MINIMUMS)
    assert undecided(result) == {"divergence"}
    assert result["anomalies"]["divergence"]["silent_nodes"] == ["n2"]

    b.finals["n3"]["applied_index"] = 6  # and the other two disagree
    assert failing(checker.check(b.build(), LOW_MINIMUMS)) == {"divergence"}


def test_completion_carrying_only_the_new_fields_is_merged_with_its_invoke():
    b = small_builder()
    b.line(100, "invoke", "publish", 7, {"queue": "app1/orders", "pid": "p"})
    b.line(105, "ok", "publish", 7, {"idem": "evt-0001-000000000001"})
    result = checker.check(b.build(), LOW_MINIMUMS)
    assert result["anomalies"]["lost"]["examples"][0]["pid"] == "p"


def test_concurrent_publishes_of_one_process_are_paired_by_pid():
    b = small_builder()
    one, two = b.store("app1/orders", "p1"), b.store("app2/orders", "p2")
    b.line(100, "invoke", "publish", 7, {"queue": "app1/orders", "pid": "p1"})
    b.line(101, "invoke", "publish", 7, {"queue": "app2/orders", "pid": "p2"})
    b.line(105, "ok", "publish", 7, {"pid": "p2", "idem": two.idem})
    b.line(106, "ok", "publish", 7, {"pid": "p1", "idem": one.idem})
    b.deliver(200, 101, one, 1)
    b.deliver(210, 104, two, 1)
    assert checker.check(b.build(), LOW_MINIMUMS)["valid"] is True


def test_malformed_line_is_reported_with_its_number():
    with pytest.raises(checker.HistoryError) as caught:
        checker.check([{"type": "ok", "f": "deliver", "process": 1, "time_ms": "x"}])
    assert caught.value.line == 1


# -- summary and command line --------------------------------------------------


def test_summary_fits_one_screen_and_names_the_seed():
    sim = simulate(seed=5)
    for plant in (plant_lost, plant_fifo, plant_divergence, plant_misrouted):
        plant(sim)
    text = checker.summary_text(checker.check(sim.b.build()))

    assert text.startswith("jepsen-lite check: INVALID  seed=5")
    assert "reproduce with seed 5" in text
    assert len(text.splitlines()) <= 40
    assert max(len(line) for line in text.splitlines()) <= 130


def write_jsonl(path: Path, history: list[dict]) -> Path:
    path.write_text("".join(json.dumps(event) + "\n" for event in history))
    return path


def test_cli_exit_codes_and_results_file(tmp_path, clean_history, capsys):
    (tmp_path / "clean").mkdir()
    clean = write_jsonl(tmp_path / "clean" / "history.jsonl", clean_history)
    assert checker.main([str(clean)]) == 0
    results = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert results["valid"] is True and results["seed"] == 11

    sim = simulate(seed=5)
    plant_lost(sim)
    (tmp_path / "bad").mkdir()
    bad = write_jsonl(tmp_path / "bad" / "history.jsonl", sim.b.build())
    assert checker.main([str(bad)]) == 1
    assert "seed=5" in capsys.readouterr().out

    (tmp_path / "small").mkdir()
    small = write_jsonl(tmp_path / "small" / "history.jsonl",
                        simulate(3, Knobs(publishes=60)).b.build())
    assert checker.main([str(small), "--delivery-limit", "3"]) == 2


def test_cli_runs_as_a_script(tmp_path, clean_history):
    history = write_jsonl(tmp_path / "history.jsonl", clean_history)
    done = subprocess.run([sys.executable, str(JEPSEN_LITE_DIR / "checker.py"),
                           str(history)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VALID  seed=11" in done.stdout


def test_torn_last_line_is_dropped_but_a_torn_middle_line_is_an_error(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"type": "info", "f": "run", "process": "harness", '
                    '"time_ms": 0, "value": {"seed": 1}}\n{"type": "in')
    assert len(checker.load_history(path)) == 1

    path.write_text('{"type": "in\n{"type": "info", "f": "run", "process": "h", '
                    '"time_ms": 0, "value": {}}\n')
    with pytest.raises(checker.HistoryError) as caught:
        checker.load_history(path)
    assert caught.value.line == 1
