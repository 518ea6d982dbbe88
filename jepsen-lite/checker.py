"""Checkers for a jepsen-lite history: did the broker keep its delivery promises?

The problem. A run leaves a history (HISTORY.md): what each client asked, what it
was told, every record a consumer received, when faults began and ended, and each
node's state after the final heal. From that alone we must say whether the broker
kept what docs/PROTOCOL.md and docs/ARCHITECTURE.md promise: at-least-once
delivery, first deliveries in commit order per queue, no delivery after a
confirmed ack, no deferred or scheduled event before its time, at most
``delivery_limit`` deliveries and then the dead-letter queue, expiry only after
``retention_ms``, identical replicas, and progress once the faults stop.

The approach. ``index_history`` pairs each invoke with its completion once; then
one pure function per anomaly reads that index and returns
``{"valid", "count", "examples"}``. ``check`` runs them all and folds the
verdicts: any failing checker makes the run invalid; otherwise a checker that
could not decide (too little happened, no final states) makes it "unknown".
Nothing here knows about nemeses beyond their start and stop lines, and nothing
reads a clock: the same history always gives the same result.

Outcomes follow Jepsen's three-valued model. An ``info`` publish may have
happened or not, so it is never lost, and a delivery of it is a recovery rather
than a surprise; a ``fail`` publish definitely did not happen, so a delivery of
it is an anomaly (the Kafka checker's G1a).

What we rejected:

- Comparing first deliveries across consumers by arrival time. Two consumers of
  one queue are served by different nodes; the push for the older event can
  arrive later (its node is slow, or applies the log late after a partition)
  without the broker having assigned anything out of order. We check commit
  order within each (queue, consumer) stream, where it must hold, and only for
  attempt 1: an event whose first push was lost in a dropped connection is
  first seen at attempt 2, and that is a redelivery, not a reordering.
- A model-based queue checker that replays every operation against a FIFO.
  Under concurrency it reports order violations that are only races between
  clients, as Jepsen's own notes warn; the block numbers in each record give us
  the commit order directly, so no model is needed.
- Counting duplicates as failures. At-least-once allows them; we count them.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"

DELIVERY_LIMIT_DEFAULT = 20  # docs/PROTOCOL.md
RETENTION_MS_DEFAULT = 30 * 24 * 3600 * 1000  # docs/PROTOCOL.md: 30 days
DEDUP_WINDOW_MS_DEFAULT = 120_000  # docs/PROTOCOL.md: idempotency_key, 2 min
# An instant below this is on the run's clock already; epoch milliseconds have
# been far above it since 1973.
EPOCH_MS_MIN = 10**11
SUMMARY_COLUMNS_MAX = 120  # one example line in the summary
SUMMARY_EXAMPLES_PER_CHECKER = 3
SUMMARY_DETAILS_MAX = 16  # example and note lines: the summary fits one screen

OP_FUNCTIONS = ("publish", "ack", "defer")
COMPLETIONS = ("ok", "fail", "info")
# The key that tells two concurrent operations of one process apart.
MATCH_FIELD = {"publish": "pid", "ack": "idem", "defer": "idem"}


class HistoryError(Exception):
    """A history line we cannot read; ``line`` is 1-based."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"history line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    """What the checkers need to know about the run; None means "from the run line"."""

    delivery_limit: int | None = None  # run options, else DELIVERY_LIMIT_DEFAULT
    retention_ms: int | None = None  # run options, else RETENTION_MS_DEFAULT
    dedup_window_ms: int | None = None  # run options, else DEDUP_WINDOW_MS_DEFAULT
    stuck_after_heal_ms: int = 30_000
    # Slack for "not before its time". Times are whole milliseconds; the harness
    # maps the broker's epoch instants onto the run clock through one offset read
    # at the start, so any drift of the wall clock against the monotonic one
    # during the run (NTP may slew by up to 0.5 ms per second) shifts due times.
    # 50 ms covers that for runs of a few minutes and still catches a release
    # that ignores the due time, which is early by the whole delay (>= 200 ms).
    defer_tolerance_ms: int = 50
    clock_skew_ms: int = 0  # largest clock offset a nemesis injected
    publishes_ok_min: int = 200
    deliveries_min: int = 200
    nemesis_windows_min: int = 1
    examples_max: int = 10

    def __post_init__(self) -> None:
        assert self.delivery_limit is None or self.delivery_limit >= 1
        assert self.retention_ms is None or self.retention_ms >= 0
        assert self.dedup_window_ms is None or self.dedup_window_ms >= 0
        assert self.stuck_after_heal_ms > 0
        assert self.defer_tolerance_ms >= 0
        assert self.clock_skew_ms >= 0
        assert self.examples_max >= 1

    @property
    def early_tolerance_ms(self) -> int:
        return self.defer_tolerance_ms + self.clock_skew_ms


# -- the indexed history -------------------------------------------------------


@dataclasses.dataclass
class Op:
    """One client operation: an invoke and its completion, values merged."""

    f: str
    process: Any
    value: dict
    invoke_line: int | None  # None: a completion we could not pair
    invoke_ms: int | None
    outcome: str | None = None  # ok, fail, info; None: never completed
    done_line: int | None = None
    done_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class Delivery:
    line: int
    time_ms: int
    consumer: Any
    idem: str | None
    pid: str | None
    queue: str | None
    attempt: int | None
    block: int | None


@dataclasses.dataclass(frozen=True)
class Mark:
    """A line of the history that only has a time: a nemesis or an ok."""

    line: int
    time_ms: int
    value: dict


@dataclasses.dataclass
class History:
    run: dict
    publishes: list[Op]
    acks: list[Op]
    defers: list[Op]
    deliveries: list[Delivery]
    nemesis: list[Mark]
    finals: dict[Any, Mark]  # node -> its last final line
    oks: list[Mark]  # every ok completion and delivery, in line order
    lines_total: int
    end_ms: int
    unpaired_total: int
    ignored_total: int

    def __post_init__(self) -> None:
        self.publishes_by_pid: dict[Any, list[Op]] = defaultdict(list)
        for op in self.publishes:
            self.publishes_by_pid[op.value.get("pid")].append(op)
        self.deliveries_by_idem: dict[Any, list[Delivery]] = defaultdict(list)
        self.deliveries_by_pid: dict[Any, list[Delivery]] = defaultdict(list)
        for delivery in self.deliveries:
            self.deliveries_by_idem[delivery.idem].append(delivery)
            self.deliveries_by_pid[delivery.pid].append(delivery)

    @property
    def seed(self) -> Any:
        return self.run.get("seed")

    @property
    def run_options(self) -> dict:
        options = self.run.get("options")
        return options if isinstance(options, dict) else {}


def index_history(history: Iterable[dict]) -> History:
    """Pair invokes with completions and sort every line into its kind.

    A completion belongs to the oldest open invoke of the same process and f. A
    process should have one open operation at a time, but if it has several we
    pick the one whose pid (publish) or idem (ack, defer) the completion names.
    """
    indexer = _Indexer()
    for line, event in enumerate(history, start=1):
        indexer.add(line, event)
    return indexer.finish()


class _Indexer:
    def __init__(self) -> None:
        self.run: dict = {}
        self.ops: dict[str, list[Op]] = {f: [] for f in OP_FUNCTIONS}
        self.open_ops: dict[tuple, list[Op]] = defaultdict(list)
        self.deliveries: list[Delivery] = []
        self.nemesis: list[Mark] = []
        self.finals: dict[Any, Mark] = {}
        self.oks: list[Mark] = []
        self.lines_total = 0
        self.end_ms = 0
        self.unpaired_total = 0
        self.ignored_total = 0

    def add(self, line: int, event: Any) -> None:
        type_, f, time_ms, value = _fields(line, event)
        self.lines_total = line
        self.end_ms = max(self.end_ms, time_ms)
        process = event.get("process")

        if f in OP_FUNCTIONS and type_ == "invoke":
            op = Op(f, process, dict(value), line, time_ms)
            self.ops[f].append(op)
            self.open_ops[(_hashable(process), f)].append(op)
        elif f in OP_FUNCTIONS and type_ in COMPLETIONS:
            self._complete(line, type_, f, time_ms, value, process)
        elif f in OP_FUNCTIONS:
            raise HistoryError(line, f"unknown type {type_!r} for {f}")
        elif f == "run":
            self.run = value
        elif f == "deliver" and type_ == "ok":
            self.deliveries.append(_delivery(line, time_ms, value, process))
            self.oks.append(Mark(line, time_ms, {"f": f}))
        elif f == "nemesis":
            self.nemesis.append(Mark(line, time_ms, value))
        elif f == "final":
            self.finals[_hashable(value.get("node"))] = Mark(line, time_ms, value)
        else:
            self.ignored_total += 1  # a kind of line this checker does not know

    def _complete(self, line: int, type_: str, f: str, time_ms: int, value: dict,
                  process: Any) -> None:
        candidates = self.open_ops[(_hashable(process), f)]
        op = _take_open(candidates, value.get(MATCH_FIELD[f]))
        if op is None:
            # A completion without an invoke: keep what it says, count the gap.
            self.unpaired_total += 1
            op = Op(f, process, {}, None, None)
            self.ops[f].append(op)

        op.value.update(value)
        op.outcome, op.done_line, op.done_ms = type_, line, time_ms
        if type_ == "ok":
            self.oks.append(Mark(line, time_ms, {"f": f}))

    def finish(self) -> History:
        return History(run=self.run, publishes=self.ops["publish"],
                       acks=self.ops["ack"], defers=self.ops["defer"],
                       deliveries=self.deliveries, nemesis=self.nemesis,
                       finals=self.finals, oks=self.oks,
                       lines_total=self.lines_total, end_ms=self.end_ms,
                       unpaired_total=self.unpaired_total,
                       ignored_total=self.ignored_total)


def _fields(line: int, event: Any) -> tuple[str, str, int, dict]:
    if not isinstance(event, dict):
        raise HistoryError(line, "not a JSON object")
    type_, f, time_ms = event.get("type"), event.get("f"), event.get("time_ms")
    if not isinstance(type_, str) or not isinstance(f, str):
        raise HistoryError(line, "type and f must be strings")
    if _int_or_none(time_ms) is None:
        raise HistoryError(line, "time_ms must be an integer")
    value = event.get("value")
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise HistoryError(line, "value must be an object")
    return type_, f, time_ms, value


def _take_open(candidates: list[Op], match: Any) -> Op | None:
    if not candidates:
        return None
    chosen = 0
    if match is not None and len(candidates) > 1:
        for i, op in enumerate(candidates):
            if op.value.get(MATCH_FIELD[op.f]) == match:
                chosen = i
                break
    return candidates.pop(chosen)


def _delivery(line: int, time_ms: int, value: dict, process: Any) -> Delivery:
    consumer = value.get("consumer")
    return Delivery(line=line, time_ms=time_ms,
                    consumer=process if consumer is None else consumer,
                    idem=value.get("idem"), pid=value.get("pid"),
                    queue=value.get("queue"),
                    attempt=_int_or_none(value.get("attempt")),
                    block=_int_or_none(value.get("block")))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- shared helpers ------------------------------------------------------------


def parse_idem(idem: Any) -> tuple[int, int] | None:
    """``evt-<partition hex>-<offset hex>`` -> (partition, offset), else None."""
    if not isinstance(idem, str):
        return None
    parts = idem.split("-")
    if len(parts) != 3 or parts[0] != "evt":
        return None
    try:
        return int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None


def _verdict(findings: list[dict], o: CheckOptions, **extra: Any) -> dict:
    return {"valid": not findings, "count": len(findings),
            "examples": findings[: o.examples_max], **extra}


def _undecided(reason: str, **extra: Any) -> dict:
    return {"valid": UNKNOWN, "count": 0, "examples": [], "note": reason, **extra}


def _delivery_limit(h: History, o: CheckOptions) -> int:
    if o.delivery_limit is not None:
        return o.delivery_limit
    return int(h.run_options.get("delivery_limit", DELIVERY_LIMIT_DEFAULT))


def _retention_ms(h: History, o: CheckOptions) -> int:
    if o.retention_ms is not None:
        return o.retention_ms
    return int(h.run_options.get("retention_ms", RETENTION_MS_DEFAULT))


def _dedup_window_ms(h: History, o: CheckOptions) -> int:
    if o.dedup_window_ms is not None:
        return o.dedup_window_ms
    return int(h.run_options.get("dedup_window_ms", DEDUP_WINDOW_MS_DEFAULT))


def _parked_idems(h: History, field: str | None = None) -> set:
    """Idems in any node's final ``dlq`` or ``expired`` list (or just ``field``)."""
    fields = (field,) if field else ("dlq", "expired")
    parked: set = set()
    for mark in h.finals.values():
        for name in fields:
            parked.update(mark.value.get(name) or ())
    return parked


def _epoch_offset_ms(h: History) -> int | None:
    """Epoch ms at run time 0: from the run line, else from any defer reply."""
    for source in (h.run, h.run_options):
        start = _int_or_none(source.get("start_unix_ms"))
        if start is not None:
            return start
    for op in h.defers:
        due_ms, due_time_ms = op.value.get("due_ms"), op.value.get("due_time_ms")
        if _int_or_none(due_ms) is not None and _int_or_none(due_time_ms) is not None:
            return due_ms - due_time_ms
    return None


def _scheduled_run_ms(value: dict, offset_ms: int | None) -> int | None:
    """A publish's ``deliver_at`` on the run's clock, or None if it has none."""
    run_ms = _int_or_none(value.get("deliver_at_time_ms"))
    if run_ms is not None:
        return run_ms
    at_ms = _int_or_none(value.get("deliver_at_ms"))
    if at_ms is None or at_ms < EPOCH_MS_MIN:
        return at_ms
    return None if offset_ms is None else at_ms - offset_ms


def _scheduled_pids(h: History) -> dict[Any, int | None]:
    """pid -> earliest deliver_at on the run clock (None: cannot convert)."""
    offset_ms = _epoch_offset_ms(h)
    scheduled: dict[Any, int | None] = {}
    for op in h.publishes:
        if "deliver_at_ms" not in op.value and "deliver_at_time_ms" not in op.value:
            continue
        pid = op.value.get("pid")
        instants = [at for at in (scheduled.get(pid),
                                  _scheduled_run_ms(op.value, offset_ms))
                    if at is not None]
        scheduled[pid] = min(instants, default=None)
    return scheduled


def _first_ack_ok(h: History) -> dict[Any, Op]:
    """idem -> the ack ok that completed first."""
    first: dict[Any, Op] = {}
    for op in h.acks:
        if op.outcome != "ok":
            continue
        idem = op.value.get("idem")
        if idem not in first or op.done_line < first[idem].done_line:
            first[idem] = op
    return first


def _publish_born_ms(h: History) -> dict[Any, int]:
    """idem -> the earliest invoke of the publish that stored it, where known."""
    by_pid = {pid: min((op.invoke_ms for op in ops if op.invoke_ms is not None),
                       default=None)
              for pid, ops in h.publishes_by_pid.items()}
    born: dict[Any, int] = {}
    for op in h.publishes:
        idem = op.value.get("idem")
        if idem is not None and by_pid.get(op.value.get("pid")) is not None:
            born[idem] = by_pid[op.value.get("pid")]
    for idem, deliveries in h.deliveries_by_idem.items():
        pid_ms = by_pid.get(deliveries[0].pid)
        if idem not in born and pid_ms is not None:
            born[idem] = pid_ms
    return born


def _where(delivery: Delivery) -> dict:
    return {"idem": delivery.idem, "pid": delivery.pid, "queue": delivery.queue,
            "consumer": delivery.consumer, "attempt": delivery.attempt,
            "block": delivery.block, "time_ms": delivery.time_ms,
            "line": delivery.line}


# -- the checkers --------------------------------------------------------------


def check_lost(h: History, o: CheckOptions) -> dict:
    """An ok publish whose event never came out, was not dead-lettered or expired.

    An ok reply names the stored event's idem, so we look for that idem: a
    retry without a key may store the same payload twice, and each stored copy
    must come out. Publishes whose outcome is unknown are counted, not judged;
    ones scheduled for after the end of the history are excused.
    """
    parked = _parked_idems(h)
    offset_ms = _epoch_offset_ms(h)
    top_offset = _top_delivered_offsets(h)
    findings, seen = [], set()
    tallies = Counter()

    for pid, ops in h.publishes_by_pid.items():
        came_out = pid in h.deliveries_by_pid
        oks = [op for op in ops if op.outcome == "ok"]
        if not oks:
            unsure = any(op.outcome in ("info", None) for op in ops)
            tallies["recovered" if came_out else "unknown_outcome"] += unsure
            continue

        for op in oks:
            idem = op.value.get("idem")
            if idem in seen and idem is not None:
                continue
            seen.add(idem)
            out = came_out if idem is None else idem in h.deliveries_by_idem
            if out or idem in parked:
                continue
            due_ms = _scheduled_run_ms(op.value, offset_ms)
            if due_ms is not None and due_ms > h.end_ms:
                tallies["not_due"] += 1
                continue
            findings.append(_lost_example(op, top_offset))

    return _verdict(findings, o, unknown_outcome=tallies["unknown_outcome"],
                    recovered=tallies["recovered"], not_due=tallies["not_due"])


def _top_delivered_offsets(h: History) -> dict[int, int]:
    top: dict[int, int] = {}
    for idem in h.deliveries_by_idem:
        parsed = parse_idem(idem)
        if parsed:
            top[parsed[0]] = max(top.get(parsed[0], 0), parsed[1])
    return top


def _lost_example(op: Op, top_offset: dict[int, int]) -> dict:
    # "hole": a later event of the same partition came out, so this is not just
    # a drain that ended too soon.
    parsed = parse_idem(op.value.get("idem"))
    hole = parsed is not None and top_offset.get(parsed[0], 0) > parsed[1]
    return {"pid": op.value.get("pid"), "idem": op.value.get("idem"),
            "queue": op.value.get("queue"), "where": "hole" if hole else "tail",
            "time_ms": op.done_ms, "line": op.done_line}


def check_unexpected(h: History, o: CheckOptions) -> dict:
    """A delivered pid that no publish ever invoked."""
    findings = [_where(deliveries[0]) for pid, deliveries in
                h.deliveries_by_pid.items() if pid not in h.publishes_by_pid]
    return _verdict(findings, o)


def check_misrouted(h: History, o: CheckOptions) -> dict:
    """A delivery to a queue that no publish of its pid named."""
    findings = []
    for delivery in h.deliveries:
        ops = h.publishes_by_pid.get(delivery.pid)
        if not ops:
            continue  # unexpected, reported there
        queues = {op.value.get("queue") for op in ops}
        if delivery.queue not in queues:
            findings.append({**_where(delivery),
                             "published_to": sorted(map(str, queues))})
    return _verdict(findings, o)


def check_failed_publish_visible(h: History, o: CheckOptions) -> dict:
    """A pid delivered although every publish of it definitely failed."""
    findings = []
    for pid, deliveries in h.deliveries_by_pid.items():
        ops = h.publishes_by_pid.get(pid)
        if ops and all(op.outcome == "fail" for op in ops):
            findings.append({**_where(deliveries[0]), "fail_line": ops[-1].done_line})
    return _verdict(findings, o)


def check_fifo(h: History, o: CheckOptions) -> dict:
    """Per (queue, consumer), first deliveries must come in increasing block order.

    A first delivery is attempt 1 (the first sighting of an idem when a record
    carries no attempt). Scheduled publishes wait in DEFERRED and join the queue
    at their rank when due, so they are left out.
    """
    scheduled = _scheduled_pids(h)
    tops: dict[tuple, Delivery] = {}
    seen: set = set()
    findings = []

    for delivery in h.deliveries:
        first = (delivery.attempt == 1 if delivery.attempt is not None
                 else delivery.idem not in seen)
        seen.add(delivery.idem)
        if not first or delivery.block is None or delivery.pid in scheduled:
            continue

        stream = (delivery.queue, _hashable(delivery.consumer))
        top = tops.get(stream)
        if top is not None and delivery.block < top.block:
            findings.append({**_where(delivery), "after_idem": top.idem,
                             "after_block": top.block, "after_line": top.line})
        elif top is None or delivery.block > top.block:
            tops[stream] = delivery
    return _verdict(findings, o)


def check_redelivered_after_ack(h: History, o: CheckOptions) -> dict:
    """A delivery observed after an ack of the same idem returned ok.

    Once an ack is confirmed the event is ACKED for good. The history is in the
    order the harness observed things, so "after" is a later line.
    """
    acked = _first_ack_ok(h)
    findings = []
    for delivery in h.deliveries:
        ack = acked.get(delivery.idem)
        if ack is not None and delivery.line > ack.done_line:
            findings.append({**_where(delivery), "ack_ok_ms": ack.done_ms,
                             "ack_line": ack.done_line})
    return _verdict(findings, o)


def check_early_deferred(h: History, o: CheckOptions) -> dict:
    """A delivery before the due time of a confirmed defer, or before deliver_at."""
    tolerance_ms = o.early_tolerance_ms
    dues = _defer_dues(h)
    scheduled = _scheduled_pids(h)
    findings = []

    for delivery in h.deliveries:
        due = _due_before(dues.get(delivery.idem), delivery.line)
        if due is not None and delivery.time_ms < due[1] - tolerance_ms:
            findings.append({**_where(delivery), "kind": "deferred",
                             "due_time_ms": due[1], "defer_line": due[0]})
            continue
        at_ms = scheduled.get(delivery.pid)
        if at_ms is not None and delivery.time_ms < at_ms - tolerance_ms:
            findings.append({**_where(delivery), "kind": "scheduled",
                             "deliver_at_time_ms": at_ms})

    unchecked = sum(at_ms is None for at_ms in scheduled.values())
    return _verdict(findings, o, unchecked_scheduled=unchecked)


def _defer_dues(h: History) -> dict[Any, list[tuple[int, int]]]:
    """idem -> [(line of the defer ok, due on the run clock)], in line order."""
    offset_ms = _epoch_offset_ms(h)
    dues: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for op in h.defers:
        if op.outcome != "ok":
            continue
        due_ms = _int_or_none(op.value.get("due_time_ms"))
        if due_ms is None and offset_ms is not None:
            epoch_ms = _int_or_none(op.value.get("due_ms"))
            due_ms = None if epoch_ms is None else epoch_ms - offset_ms
        if due_ms is not None:
            dues[op.value.get("idem")].append((op.done_line, due_ms))
    for entries in dues.values():
        entries.sort()
    return dues


def _due_before(entries: list[tuple[int, int]] | None,
                line: int) -> tuple[int, int] | None:
    """The latest defer that completed before ``line``."""
    if not entries:
        return None
    i = bisect.bisect_left(entries, (line, -1)) - 1
    return entries[i] if i >= 0 else None


def check_delivery_limit(h: History, o: CheckOptions) -> dict:
    """At most ``delivery_limit`` deliveries, and then the dead-letter queue.

    Deliveries after a confirmed ack belong to redelivered_after_ack. The count
    of an idem's deliveries is its highest ``attempt`` (the broker's own count,
    which includes pushes that never arrived). An event that reached the limit
    without an answer must be in some node's final DLQ, unless an ack or defer
    of unknown outcome, or a defer after its last delivery, may have settled it.
    """
    limit = _delivery_limit(h, o)
    acked = _first_ack_ok(h)
    dlq = _parked_idems(h, "dlq")
    settling = _settling_lines(h)
    findings = []

    for idem, deliveries in h.deliveries_by_idem.items():
        ack = acked.get(idem)
        live = [d for d in deliveries if ack is None or d.line < ack.done_line]
        count = _delivery_count(live)
        if count > limit:
            findings.append({**_where(live[min(limit, len(live) - 1)]),
                             "kind": "over_limit", "deliveries": count, "limit": limit})
        elif (count == limit and ack is None and idem not in dlq
              and max(settling.get(idem, ()), default=0) <= live[-1].line):
            findings.append({**_where(live[-1]), "kind": "missing_from_dlq",
                             "deliveries": count, "limit": limit})
    return _verdict(findings, o, limit=limit)


def _delivery_count(deliveries: list[Delivery]) -> int:
    attempts = [d.attempt for d in deliveries if d.attempt is not None]
    unnumbered = len(deliveries) - len(attempts)
    return max(max(attempts, default=0), len(deliveries) if unnumbered else 0)


def _settling_lines(h: History) -> dict[Any, list[int]]:
    """idem -> lines of answers that may have kept it out of the DLQ.

    An ack of unknown outcome may have applied whenever it was sent, so it
    counts from anywhere (line infinity); a defer that did not fail counts from
    its invoke: after the last delivery it may have parked the event in DEFERRED.
    """
    lines: dict[Any, list[int]] = defaultdict(list)
    for op in h.acks:
        if op.outcome in ("info", None):
            lines[op.value.get("idem")].append(sys.maxsize)
    for op in h.defers:
        if op.outcome != "fail":
            lines[op.value.get("idem")].append(op.invoke_line or op.done_line or 0)
    return lines


def check_inconsistent_idem(h: History, o: CheckOptions) -> dict:
    """Identity: one idem, one block, one payload; one block, one idem.

    The block of a record is the offset its idem encodes, and offsets are unique
    per partition. A publish reply must name an idem that carries its own pid.
    """
    blocks, pids, slots = defaultdict(set), defaultdict(set), defaultdict(set)
    findings = []
    for delivery in h.deliveries:
        parsed = parse_idem(delivery.idem)
        if delivery.block is not None and parsed and parsed[1] != delivery.block:
            findings.append({**_where(delivery), "kind": "block_not_offset"})
        if delivery.block is not None:
            blocks[delivery.idem].add(delivery.block)
            slot = parsed[0] if parsed else delivery.queue
            slots[(slot, delivery.block)].add(delivery.idem)
        pids[delivery.idem].add(_hashable(delivery.pid))

    findings += _conflicts("idem_two_blocks", blocks)
    findings += _conflicts("idem_two_pids", pids)
    findings += _conflicts("block_two_idems", slots)
    findings += _reply_mismatches(h, pids)
    return _verdict(findings, o)


def _conflicts(kind: str, table: dict) -> list[dict]:
    return [{"kind": kind, "key": str(key), "values": sorted(map(str, values))}
            for key, values in table.items() if len(values) > 1]


def _reply_mismatches(h: History, pids: dict) -> list[dict]:
    findings = []
    for op in h.publishes:
        idem = op.value.get("idem")
        delivered = pids.get(idem)
        if op.outcome == "ok" and delivered and op.value.get("pid") not in delivered:
            findings.append({"kind": "reply_names_other_event", "idem": idem,
                             "pid": op.value.get("pid"), "line": op.done_line})
    return findings


def check_dedup(h: History, o: CheckOptions) -> dict:
    """Publishes with one idempotency key, within the window, store one event.

    All publishes that carry a key (a retry repeats pid and key) must end up
    naming one idem: the idems of their ok replies and of their pids'
    deliveries. Only groups whose invokes span less than the window, minus the
    tolerance, are judged: the broker measures the window on its own clock.
    """
    window_ms = _dedup_window_ms(h, o) - o.early_tolerance_ms
    groups: dict[Any, list[Op]] = defaultdict(list)
    for op in h.publishes:
        if op.value.get("key") is not None and op.invoke_ms is not None:
            groups[_hashable(op.value["key"])].append(op)

    findings = []
    for key, ops in groups.items():
        span_ms = max(op.invoke_ms for op in ops) - min(op.invoke_ms for op in ops)
        idems = {op.value.get("idem") for op in ops if op.outcome == "ok"}
        for pid in {op.value.get("pid") for op in ops}:
            idems.update(d.idem for d in h.deliveries_by_pid.get(pid, ()))
        idems.discard(None)
        if len(idems) > 1 and span_ms <= window_ms:
            findings.append({"key": key, "idems": sorted(map(str, idems)),
                             "span_ms": span_ms, "line": ops[-1].invoke_line})
    return _verdict(findings, o, window_ms=window_ms + o.early_tolerance_ms)


def check_early_expired(h: History, o: CheckOptions) -> dict:
    """An idem in a final ``expired`` list that cannot be ``retention_ms`` old.

    The broker expires an event retention_ms after it was committed, which is
    after its publish was invoked; the node reported it expired by the time of
    its final line. So that gap must be at least retention_ms.
    """
    retention_ms = _retention_ms(h, o)
    born = _publish_born_ms(h)
    findings, seen = [], set()
    for node, mark in h.finals.items():
        for idem in mark.value.get("expired") or ():
            if idem in seen or idem not in born:
                continue
            age_ms = mark.time_ms - born[idem]
            if age_ms < retention_ms - o.early_tolerance_ms:
                seen.add(idem)
                findings.append({"idem": idem, "node": node, "age_ms": age_ms,
                                 "retention_ms": retention_ms, "line": mark.line})
    return _verdict(findings, o, retention_ms=retention_ms)


def check_divergence(h: History, o: CheckOptions) -> dict:
    """After the final heal every node must hold the same state.

    Nodes are compared on digest, applied index, DLQ and expired lists; each node
    that differs from the most common state is one finding. A node that gave no
    digest (it never answered) proves nothing either way: if the others agree,
    the verdict is "unknown".
    """
    silent = sorted(str(node) for node, mark in h.finals.items()
                    if mark.value.get("digest") is None)
    states = {node: _final_state(mark.value) for node, mark in h.finals.items()
              if mark.value.get("digest") is not None}
    if len(states) < 2:
        return _undecided(f"{len(states)} final states with a digest, need two",
                          silent_nodes=silent)

    common, _ = Counter(states.values()).most_common(1)[0]
    findings = []
    for node, state in states.items():
        if state != common:
            differs = [name for name, mine, theirs in
                       zip(("digest", "applied_index", "dlq", "expired"), state, common)
                       if mine != theirs]
            findings.append({"node": node, "differs": differs,
                             "digest": state[0], "applied_index": state[1],
                             "common_digest": common[0],
                             "common_applied_index": common[1],
                             "line": h.finals[node].line})
    if silent and not findings:
        return _undecided(f"no final digest from {', '.join(silent)}",
                          silent_nodes=silent)
    return _verdict(findings, o, silent_nodes=silent)


def _final_state(value: dict) -> tuple:
    return (_hashable(value.get("digest")), _hashable(value.get("applied_index")),
            tuple(sorted(map(str, value.get("dlq") or ()))),
            tuple(sorted(map(str, value.get("expired") or ()))))


def check_stuck(h: History, o: CheckOptions) -> dict:
    """Some ok within ``stuck_after_heal_ms`` of the last heal, if work was waiting.

    Work is waiting if an operation was open at the heal or opened within the
    window, or an ok publish had not come out by the heal.
    """
    stops = [mark for mark in h.nemesis if mark.value.get("action") == "stop"]
    if not stops:
        return _verdict([], o, note="no nemesis stop")
    heal = stops[-1]
    if any(mark.value.get("action") == "start" and mark.line > heal.line
           for mark in h.nemesis):
        return _undecided("a fault started after the last stop and never ended")

    deadline_ms = heal.time_ms + o.stuck_after_heal_ms
    recovery = _first_ok_after(h, heal.line)
    recovery_ms = None if recovery is None else recovery.time_ms - heal.time_ms
    if recovery is not None and recovery.time_ms <= deadline_ms:
        return _verdict([], o, recovery_ms=recovery_ms)

    waiting_ops, undelivered = _work_waiting(h, heal, deadline_ms)
    if not waiting_ops and not undelivered:
        return _verdict([], o, recovery_ms=recovery_ms)
    if recovery is None and h.end_ms < deadline_ms:
        return _undecided("the history ends before the window after the heal")
    finding = {"heal_ms": heal.time_ms, "window_ms": o.stuck_after_heal_ms,
               "first_ok_ms": None if recovery is None else recovery.time_ms,
               "open_ops": waiting_ops, "undelivered_publishes": undelivered,
               "line": heal.line}
    return _verdict([finding], o, recovery_ms=recovery_ms)


def _first_ok_after(h: History, line: int) -> Mark | None:
    i = bisect.bisect_right([mark.line for mark in h.oks], line)
    return h.oks[i] if i < len(h.oks) else None


def _work_waiting(h: History, heal: Mark, deadline_ms: int) -> tuple[int, int]:
    open_total = 0
    for op in (*h.publishes, *h.acks, *h.defers):
        if op.invoke_ms is None or op.invoke_ms > deadline_ms:
            continue
        if op.done_line is None or op.done_line > heal.line:
            open_total += 1

    parked = _parked_idems(h)
    undelivered = 0
    for op in h.publishes:
        if op.outcome != "ok" or op.done_line > heal.line:
            continue
        idem = op.value.get("idem")
        found = (h.deliveries_by_idem.get(idem) if idem is not None
                 else h.deliveries_by_pid.get(op.value.get("pid")))
        if idem not in parked and (not found or found[0].line > heal.line):
            undelivered += 1
    return open_total, undelivered


def check_vacuous(h: History, o: CheckOptions) -> dict:
    """Too little happened for a pass to mean anything."""
    publishes_ok = sum(any(op.outcome == "ok" for op in ops)
                       for ops in h.publishes_by_pid.values())
    windows = sum(mark.value.get("action") == "start" for mark in h.nemesis)
    reasons = []
    if publishes_ok < o.publishes_ok_min:
        reasons.append(f"{publishes_ok} publishes ok, want {o.publishes_ok_min}")
    if len(h.deliveries) < o.deliveries_min:
        reasons.append(f"{len(h.deliveries)} deliveries, want {o.deliveries_min}")
    if windows < o.nemesis_windows_min:
        reasons.append(f"{windows} nemesis windows, want {o.nemesis_windows_min}")
    return {"valid": UNKNOWN if reasons else True, "count": len(reasons),
            "examples": reasons}


def check_duplicates(h: History, o: CheckOptions) -> dict:
    """Idems delivered more than once: allowed by at-least-once, only counted."""
    findings = [{"idem": idem, "deliveries": len(deliveries),
                 "attempts": [d.attempt for d in deliveries][: o.examples_max],
                 "line": deliveries[1].line}
                for idem, deliveries in h.deliveries_by_idem.items()
                if len(deliveries) > 1]
    stores = sum(len({d.idem for d in deliveries}) > 1
                 for deliveries in h.deliveries_by_pid.values())
    redeliveries = len(h.deliveries) - len(h.deliveries_by_idem)
    return {"valid": True, "count": len(findings),
            "examples": findings[: o.examples_max], "redeliveries": redeliveries,
            "duplicate_stores": stores}


Checker = Callable[[History, CheckOptions], dict]

# Checkers whose findings make a run invalid, in the order the summary lists them.
FAILING: dict[str, Checker] = {
    "lost": check_lost,
    "unexpected": check_unexpected,
    "misrouted": check_misrouted,
    "failed_publish_visible": check_failed_publish_visible,
    "fifo": check_fifo,
    "redelivered_after_ack": check_redelivered_after_ack,
    "early_deferred": check_early_deferred,
    "delivery_limit": check_delivery_limit,
    "inconsistent_idem": check_inconsistent_idem,
    "dedup": check_dedup,
    "early_expired": check_early_expired,
    "divergence": check_divergence,
    "stuck": check_stuck,
}
# Reported only: vacuous can make a run "unknown", duplicates never fail it.
REPORTING: dict[str, Checker] = {
    "vacuous": check_vacuous,
    "duplicates": check_duplicates,
}
CHECKERS: dict[str, Checker] = {**FAILING, **REPORTING}
COUNT_NAMES = {"duplicates": "duplicated"}


# -- the whole check -----------------------------------------------------------


def check(history: Iterable[dict] | History,
          options: CheckOptions | dict | None = None) -> dict:
    """Run every checker; valid is False, "unknown" or True, in that precedence."""
    o = _as_options(options)
    h = history if isinstance(history, History) else index_history(history)
    anomalies = {name: checker(h, o) for name, checker in CHECKERS.items()}

    verdicts = [result["valid"] for result in anomalies.values()]
    valid: bool | str = True
    if any(verdict is False for verdict in verdicts):
        valid = False
    elif UNKNOWN in verdicts:
        valid = UNKNOWN

    counts = {COUNT_NAMES.get(name, name): result["count"]
              for name, result in anomalies.items()}
    counts["unknown_outcome"] = anomalies["lost"]["unknown_outcome"]
    return {"valid": valid, "counts": counts, "anomalies": anomalies,
            "stats": _stats(h), "seed": h.seed,
            "options": {**dataclasses.asdict(o),
                        "delivery_limit": _delivery_limit(h, o),
                        "retention_ms": _retention_ms(h, o),
                        "dedup_window_ms": _dedup_window_ms(h, o)}}


def _as_options(options: CheckOptions | dict | None) -> CheckOptions:
    if options is None:
        return CheckOptions()
    if isinstance(options, CheckOptions):
        return options
    return CheckOptions(**options)


def _stats(h: History) -> dict:
    outcomes = Counter(op.outcome or "pending" for op in h.publishes)
    return {"lines": h.lines_total, "duration_ms": h.end_ms,
            "publishes": len(h.publishes),
            "publishes_by_outcome": {key: outcomes.get(key, 0)
                                     for key in ("ok", "info", "fail", "pending")},
            "deliveries": len(h.deliveries),
            "idems_delivered": len(h.deliveries_by_idem),
            "acks_ok": sum(op.outcome == "ok" for op in h.acks),
            "defers_ok": sum(op.outcome == "ok" for op in h.defers),
            "nemesis_windows": sum(m.value.get("action") == "start" for m in h.nemesis),
            "final_nodes": len(h.finals),
            "unpaired_completions": h.unpaired_total,
            "ignored_lines": h.ignored_total}


def summary_text(result: dict) -> str:
    """One screen: the verdict with the seed, one row per checker, a few examples."""
    verdict = {True: "VALID", False: "INVALID"}.get(result["valid"], "UNKNOWN")
    stats = result["stats"]
    outcomes = stats["publishes_by_outcome"]
    lines = [f"jepsen-lite check: {verdict}  seed={result['seed']}",
             f"{stats['publishes']} publishes (ok {outcomes['ok']}, info "
             f"{outcomes['info']}, fail {outcomes['fail']}, pending "
             f"{outcomes['pending']}), {stats['deliveries']} deliveries, "
             f"{stats['nemesis_windows']} nemesis windows, {stats['lines']} lines", ""]

    for name, outcome in result["anomalies"].items():
        mark = {True: "ok", False: "FAIL"}.get(outcome["valid"], "unknown")
        if name in REPORTING and outcome["valid"] is True:
            mark = "note"
        label = COUNT_NAMES.get(name, name)
        lines.append(f"  {mark:<8} {label:<24} {outcome['count']}")
    lines.append(f"  {'note':<8} {'unknown_outcome':<24} "
                 f"{result['counts']['unknown_outcome']}")

    details = _summary_details(result["anomalies"])
    if details:
        lines += ["", *details]
    if result["valid"] is not True:
        lines.append(f"\nreproduce with seed {result['seed']}")
    return "\n".join(lines)


def _summary_details(anomalies: dict) -> list[str]:
    """Why each checker that did not pass did not: a note or a few examples."""
    details = []
    for name, outcome in anomalies.items():
        if outcome["valid"] is True:
            continue
        if "note" in outcome:
            details.append(f"  {name}: {outcome['note']}")
        for example in outcome["examples"][:SUMMARY_EXAMPLES_PER_CHECKER]:
            text = example if isinstance(example, str) else json.dumps(example)
            details.append(_clip(f"  {name}: {text}"))
    if len(details) > SUMMARY_DETAILS_MAX:
        left_out = len(details) - SUMMARY_DETAILS_MAX
        details = [*details[:SUMMARY_DETAILS_MAX],
                   f"  ... {left_out} more in results.json"]
    return details


def _clip(text: str) -> str:
    if len(text) <= SUMMARY_COLUMNS_MAX:
        return text
    return text[: SUMMARY_COLUMNS_MAX - 3] + "..."


# -- reading files and the command line ----------------------------------------


def load_history(path: Path) -> list[dict]:
    """Read JSON Lines. A torn last line (the harness died mid-write) is dropped."""
    raw = [(n, text) for n, text in
           enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1)
           if text.strip()]
    history = []
    for i, (n, text) in enumerate(raw):
        try:
            history.append(json.loads(text))
        except json.JSONDecodeError as exc:
            if i == len(raw) - 1:
                break
            raise HistoryError(n, f"not JSON: {exc.msg}") from exc
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a jepsen-lite history; exit 0 valid, 1 invalid, 2 unknown.")
    parser.add_argument("history", type=Path, help="HISTORY.jsonl")
    parser.add_argument("--delivery-limit", type=int)
    parser.add_argument("--retention-ms", type=int)
    parser.add_argument("--stuck-after-heal-ms", type=int, default=30_000)
    parser.add_argument("--defer-tolerance-ms", type=int, default=50)
    parser.add_argument("--clock-skew-ms", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        history = load_history(args.history)
    except (OSError, HistoryError) as exc:
        print(f"jepsen-lite check: UNKNOWN, cannot read the history: {exc}")
        return 2
    options = CheckOptions(delivery_limit=args.delivery_limit,
                           retention_ms=args.retention_ms,
                           stuck_after_heal_ms=args.stuck_after_heal_ms,
                           defer_tolerance_ms=args.defer_tolerance_ms,
                           clock_skew_ms=args.clock_skew_ms)
    try:
        result = check(history, options)
    except HistoryError as exc:
        print(f"jepsen-lite check: UNKNOWN, cannot read the history: {exc}")
        return 2

    results_path = args.history.parent / "results.json"
    results_path.write_text(json.dumps(result, indent=2, default=str) + "\n",
                            encoding="utf-8")
    print(summary_text(result))
    print(f"results: {results_path}")
    return {True: 0, False: 1}.get(result["valid"], 2)


if __name__ == "__main__":
    sys.exit(main())
