"""jepsen-lite: one seeded chaos run against a real 3-node cluster.

    scripts/chaos [--seed S] [--minutes M] [--nemesis kill,pause,partition,loss]
                  [--out DIR] [--keep-data] [--unsafe-ack-before-commit] [--clean]

A run, in order:

1. Start three nodes on 127.0.0.2-4, wait for a leader, check that Raft links
   leave from the node addresses (else partitions would cut nothing), create keys.
2. Write the history's first line: the seed, the whole fault schedule, the options.
3. Workload and nemesis together for ``--minutes``.
4. Final phase: stop producers, undo the active fault, heal everything (no rules,
   nothing paused, every node running), wait for a leader, let consumers drain
   until the queues stay empty and quiet (bounded), stop them, wait until every
   node has applied the same index (bounded), and record each node's ``final``.
5. Stop the nodes and delete the nft table, then check and report: history.jsonl,
   results.json (from checker.py, when it exists), summary.txt, timeline.png.

Cleanup never depends on getting that far: nodes are stopped and the table is
deleted from ``finally``, from ``atexit`` and on SIGTERM/SIGHUP (turned into
SystemExit), and each node dies with the harness via ``PR_SET_PDEATHSIG``.
``--clean`` deletes tables left by runs whose harness process is gone.

Exit status: 0 valid, 1 invalid, 3 unknown (no checker, or it could not decide),
2 the harness itself failed. Every outcome but 0 prints the seed and keeps the
nodes' data dirs.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import fcntl
import importlib
import logging
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nemesis as nemesis_mod  # noqa: E402
import report  # noqa: E402
import workload as workload_mod  # noqa: E402
from netfault import (  # noqa: E402
    NetFaultError,
    NftTable,
    nft_available,
    remove_stale_tables,
)
from nodes import HarnessError, Nodes, raft_link_sources  # noqa: E402
from options import Family, RunOptions, parse_families  # noqa: E402
from recorder import Recorder, read_history  # noqa: E402

log = logging.getLogger("jepsen-lite")

EXIT_VALID, EXIT_INVALID, EXIT_HARNESS, EXIT_UNKNOWN = 0, 1, 2, 3
START_TIMEOUT_MS = 30_000
KEY_TIMEOUT_MS = 15_000
PRODUCER_STOP_MS = 30_000
CONSUMER_STOP_MS = 15_000
POLL_MS = 250
LINK_CHECK_MS = 5000
DEFERRED_SLACK_MS = 1000
PROGRESS_TTY_MS = 500
PROGRESS_PLAIN_MS = 10_000
NODE_DATA_KEEP = ("node.log", "stdout.log")
# One run at a time per machine: every run uses 127.0.0.2-4 and cuts links by
# address. A second run waits for the first, at most --lock-wait-s.
RUN_LOCK_PATH = Path("/tmp/ensync-jepsen-lite.lock")
RUN_LOCK_WAIT_S = 900
RUN_LOCK_POLL_S = 1.0


class Run:
    """One run's state; ``cleanup`` is synchronous and safe to call many times."""

    def __init__(self, options: RunOptions, out: Path, keep_data: bool) -> None:
        self.options = options
        self.out = out
        self.keep_data = keep_data
        self.nodes = Nodes(options, out / "nodes", secrets.token_urlsafe(16))
        self.table = NftTable(self.nodes.hosts())
        self.recorder: Recorder | None = None
        self.phase = "start"
        self.facts: dict = {"seed": options.seed, "out": str(out)}
        self.nemesis: nemesis_mod.Nemesis | None = None
        self.workload: workload_mod.Workload | None = None
        self._tasks: list[asyncio.Task] = []
        self._consumer_tasks: list[asyncio.Task] = []
        self.cleaned = False

    def needs_nft(self) -> bool:
        return bool({Family.PARTITION, Family.LOSS} & set(self.options.families))

    # -- the run ---------------------------------------------------------------

    async def run(self) -> None:
        await self.nodes.open()
        progress = asyncio.create_task(self._progress())
        try:
            await self._start_cluster()
            producer_key, recipient_keys = await self._create_keys()
            self._begin_history()
            await self._main_phase(producer_key, recipient_keys)
            await self._final_phase()
        finally:
            progress.cancel()
            if self.workload is not None:
                self.workload.producer_stop.set()
                self.workload.consumer_stop.set()
            # On an interruption, clients and admin requests are mid-flight: end
            # them while the loop still runs, so their sockets close cleanly.
            await _bounded(self._tasks + [progress], 0)
            await self.nodes.close()
            if self.recorder is not None:
                self.recorder.close()
            _progress_end()

    async def _start_cluster(self) -> None:
        if self.needs_nft():
            if not nft_available():
                raise HarnessError("nft is not installed (apt-get install nftables)")
            self.table.create()
        for node_id in self.nodes.ids:
            self.nodes.spawn(node_id)
        silent = await self.nodes.wait_healthy(self.nodes.ids, START_TIMEOUT_MS)
        if silent:
            raise HarnessError(f"nodes never answered /health: {silent}")
        leader = await self.nodes.wait_leader(START_TIMEOUT_MS)
        if leader is None:
            raise HarnessError("no leader after start")
        await self._check_links()

    async def _check_links(self) -> None:
        # Each pair of nodes keeps one Raft connection: 3 links once all are up.
        deadline = time.monotonic() + LINK_CHECK_MS / 1000
        while True:
            checked, problems = raft_link_sources(self.nodes)
            if problems or checked >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_MS / 1000)
        self.facts["links"] = (f"{checked} checked, ok" if not problems
                               else "; ".join(problems))
        if problems and self.needs_nft():
            raise HarnessError("Raft links do not leave from the node addresses, "
                               "so partitions would cut nothing: " + problems[0])

    async def _create_keys(self):
        leader = await self.nodes.wait_leader(START_TIMEOUT_MS)
        if leader is None:
            raise HarnessError("no leader to create keys on")
        return await workload_mod.create_keys(self.nodes, leader, self.options,
                                              KEY_TIMEOUT_MS)

    def _begin_history(self) -> None:
        schedule = nemesis_mod.make_schedule(self.options, self.nodes.ids)
        self.recorder = Recorder(self.out / "history.jsonl")
        options = self.options.as_json()
        options["nodes"] = {i: {"host": n.host, "http_port": n.http_port,
                                "raft_port": n.raft_port}
                            for i, n in self.nodes.nodes.items()}
        self.recorder.write("info", "run", "harness", {
            "seed": self.options.seed, "schedule": [s.as_json() for s in schedule],
            "options": options, "start_unix_ms": self.recorder.start_unix_ms},
            time_ms=0)
        self.nemesis = nemesis_mod.Nemesis(self.options, schedule, self.nodes,
                                           self.table, self.recorder)

    async def _main_phase(self, producer_key, recipient_keys) -> None:
        self.phase = "workload"
        w = self.workload = workload_mod.build(self.options, self.nodes, producer_key,
                                               recipient_keys, self.recorder)
        consumers = [asyncio.create_task(c.run()) for c in w.consumers]
        producers = [asyncio.create_task(p.run()) for p in w.producers]
        self._consumer_tasks = consumers
        faults = asyncio.create_task(self.nemesis.run())
        self._tasks += consumers + producers + [faults]

        remaining_ms = self.options.duration_ms - self.recorder.now_ms()
        done, _ = await asyncio.wait({faults}, timeout=max(0, remaining_ms) / 1000)
        if faults in done and faults.exception() is not None:
            raise faults.exception()
        remaining_ms = self.options.duration_ms - self.recorder.now_ms()
        if remaining_ms > 0:
            await asyncio.sleep(remaining_ms / 1000)

        self.phase = "stopping producers"
        w.producer_stop.set()
        faults.cancel()
        await asyncio.gather(faults, return_exceptions=True)
        await _bounded(producers, PRODUCER_STOP_MS)

    async def _final_phase(self) -> None:
        self.phase = "heal"
        self.facts["restarted_at_heal"] = self.nemesis.heal_all()
        await self.nodes.wait_healthy(self.nodes.ids, START_TIMEOUT_MS)
        leader = await self.nodes.wait_leader(self.options.leader_wait_ms)
        self.facts["leader_after_heal"] = leader

        self.phase = "drain"
        started = time.monotonic()
        self.facts["drain_timed_out"] = not await self._drain(leader)
        self.facts["drain_s"] = time.monotonic() - started
        self.workload.consumer_stop.set()
        await _bounded(self._consumer_tasks, CONSUMER_STOP_MS)

        self.phase = "converge"
        await self._record_finals()

    async def _drain(self, leader: str | None) -> bool:
        """True once queues are empty and no delivery came for drain_quiet_ms."""
        o, stats = self.options, self.workload.stats
        deadline = time.monotonic() + o.drain_max_ms / 1000
        due_ms = self._last_due_ms() + DEFERRED_SLACK_MS
        while time.monotonic() < deadline:
            now_ms = self.recorder.now_ms()
            quiet = now_ms - stats.last_delivery_ms >= o.drain_quiet_ms
            if quiet and now_ms >= due_ms and await self._queues_empty(leader):
                return True
            await asyncio.sleep(POLL_MS / 1000)
            if leader is None:
                leader = await self.nodes.agreed_leader()
        return False

    def _last_due_ms(self) -> int:
        due = [e["value"].get("deliver_at_time_ms") or e["value"].get("due_time_ms")
               or 0 for e in self.recorder.events if e["f"] in ("publish", "defer")]
        return max(due, default=0)

    async def _queues_empty(self, leader: str | None) -> bool:
        if leader is None:
            return False
        data = await self.nodes.get(leader, "/admin/queues?limit=1000")
        if data is None:
            return False
        return all(row["pending"] == 0 and row["in_flight"] == 0
                   for row in data["queues"])

    async def _record_finals(self) -> None:
        """Each node's digest at one common applied index, if reached in time."""
        deadline = time.monotonic() + self.options.converge_max_ms / 1000
        digests = {}
        while time.monotonic() < deadline:
            answers = await asyncio.gather(*(self.nodes.get(i, "/admin/digest")
                                             for i in self.nodes.ids))
            digests = {i: a for i, a in zip(self.nodes.ids, answers) if a is not None}
            indexes = {a["applied_index"] for a in digests.values()}
            if len(digests) == len(self.nodes.ids) and len(indexes) == 1:
                break
            await asyncio.sleep(POLL_MS / 1000)
        indexes = {a["applied_index"] for a in digests.values()}
        self.facts["converged"] = len(indexes) == 1

        for node_id in self.nodes.ids:
            answer = digests.get(node_id)
            dlq = await self.nodes.get(node_id, "/admin/dlq?limit=1000")
            dead = [] if dlq is None else [row["idem"] for row in dlq["dead_letters"]]
            self.recorder.write("info", "final", "checker", {
                "node": node_id,
                "digest": None if answer is None else answer["digest"],
                "applied_index": None if answer is None else answer["applied_index"],
                "dlq": dead,
                "expired": []})  # retention is not in play in these runs

    # -- progress (stderr) ------------------------------------------------------

    async def _progress(self) -> None:
        tty = sys.stderr.isatty()
        period_ms = PROGRESS_TTY_MS if tty else PROGRESS_PLAIN_MS
        while True:
            await asyncio.sleep(period_ms / 1000)
            line = self._progress_line()
            if tty:
                sys.stderr.write("\r\x1b[K" + line)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _progress_line(self) -> str:
        seed = self.options.seed
        if self.recorder is None or self.workload is None:
            return f"chaos seed={seed} {self.phase}..."
        now_ms, total_ms = self.recorder.now_ms(), self.options.duration_ms
        done = min(1.0, now_ms / total_ms)
        bar = "#" * int(done * 24) + "-" * (24 - int(done * 24))
        s = self.workload.stats
        fault = self.nemesis.current if self.nemesis else None
        return (f"chaos seed={seed} [{bar}] {now_ms / 1000:.0f}/{total_ms / 1000:.0f}s "
                f"{self.phase}  pub {s.publish_ok} ok {s.publish_info} info  "
                f"dlv {s.deliveries}  ack {s.acks_ok}  reconn {s.reconnects}"
                + (f"  fault {fault}" if fault else ""))

    # -- the way out -------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop our nodes and delete our table. Idempotent, never raises."""
        if self.cleaned:
            return
        self.cleaned = True
        try:
            self.nodes.resume_all()
            self.nodes.stop_all()
        except Exception as exc:  # noqa: BLE001 (cleanup must go on)
            log.error("stopping nodes failed: %s", exc)
        self.table.destroy()
        left = self.table.exists()
        stopped = self.nodes.stopped_processes()
        running = [i for i, n in self.nodes.nodes.items() if n.running()]
        self.facts["cleanup"] = (
            f"table {self.table.name} {'LEFT BEHIND' if left else 'gone'}; "
            f"nodes running {running or 'none'}; stopped {stopped or 'none'}")

    def discard_data(self) -> None:
        """After a valid run: keep the node logs, drop journals and databases."""
        for node in self.nodes.nodes.values():
            for path in node.data_dir.iterdir():
                if path.name in NODE_DATA_KEEP:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


async def _bounded(tasks: list[asyncio.Task], timeout_ms: int) -> None:
    """Let ``tasks`` finish for up to ``timeout_ms``, then cancel what is left.

    A cancelled task's ``finally`` may await a bounded close; that is waited for
    (CLOSE_TIMEOUT_S per client, so at most a few seconds).
    """
    if not tasks:
        return
    pending = tasks
    if timeout_ms > 0:
        _, pending = await asyncio.wait(tasks, timeout=timeout_ms / 1000)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _progress_end() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")
        sys.stderr.flush()


# -- checking and reporting -------------------------------------------------------


def check(history: list[dict], options: RunOptions) -> tuple[dict | None, str | None]:
    """(result, summary text) from checker.py, or (None, why not)."""
    try:
        checker = importlib.import_module("checker")
    except ImportError as exc:
        if getattr(exc, "name", None) != "checker":
            raise
        return None, "checker skipped: jepsen-lite/checker.py does not exist yet"
    result = checker.check(history, _checker_options(checker, options))
    text = checker.summary_text(result) if hasattr(checker, "summary_text") else None
    return result, text


def _checker_options(checker, options: RunOptions) -> dict:
    """What the harness knows that the checker asks about; the rest it reads from
    the history's run line. Only names its ``CheckOptions`` declares are passed."""
    wanted = {"delivery_limit": options.delivery_limit}
    if not options.families:
        wanted["nemesis_windows_min"] = 0  # a fault-free run is a control, not vacuous
    declared = getattr(checker, "CheckOptions", None)
    if declared is None or not dataclasses.is_dataclass(declared):
        return wanted
    names = {field.name for field in dataclasses.fields(declared)}
    return {k: v for k, v in wanted.items() if k in names}


def write_outputs(run: Run, started_s: float, error: str | None) -> int:
    out, options = run.out, run.options
    path = out / "history.jsonl"
    history = read_history(path) if path.exists() else []
    run.facts.update(error=error, wall_s=time.monotonic() - started_s,
                     nemesis=",".join(f.value for f in options.families),
                     reproduce=_reproduce(options))

    result, checker_text = (None, None)
    if history and error is None:
        result, checker_text = check(history, options)
    if result is None:
        result_json = {"valid": "unknown", "counts": _plain_counts(history),
                       "anomalies": {}, "seed": options.seed,
                       "note": error or checker_text}
    else:
        result_json = dict(result, seed=options.seed)
    # Figures for the closing note (README "Figures"): not part of the verdict.
    recovery = report.recovery_after_heals(history)
    result_json.update(
        nemesis=run.facts["nemesis"] or "none",
        unsafe_ack_before_commit=options.unsafe_ack_before_commit,
        faults_injected=len(recovery), recovery_after_heal=recovery,
        recovery=report.recovery_figures(recovery),
        operations={f: dict(c) for f, c in report.op_counts(history).items()})
    (out / "results.json").write_bytes(
        orjson.dumps(result_json, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
                     default=str))

    summary = report.summary_text(history, run.facts, result,
                                  checker_text if result is not None else None)
    if result is None and checker_text:
        summary += checker_text + "\n"
    if history:
        why_not = report.timeline_png(history, out / "timeline.png",
                                      f"seed {options.seed}  nemesis "
                                      f"{run.facts['nemesis'] or 'none'}")
        if why_not:
            summary += f"timeline.png not written: {why_not}\n"
    (out / "summary.txt").write_text(summary)
    print(summary, end="")

    valid = result_json.get("valid")
    code = {True: EXIT_VALID, False: EXIT_INVALID}.get(valid, EXIT_UNKNOWN)
    return EXIT_HARNESS if error else code


def _plain_counts(history: list[dict]) -> dict:
    """Without a checker: op tallies, and null for what only a checker can say."""
    counts = {"lost": None, "duplicated": None}
    for f, by_type in report.op_counts(history).items():
        for kind, n in by_type.items():
            counts[f"{f}_{kind}"] = n
    return counts


def _reproduce(options: RunOptions) -> str:
    families = ",".join(f.value for f in options.families) or "none"
    unsafe = " --unsafe-ack-before-commit" if options.unsafe_ack_before_commit else ""
    return (f"scripts/chaos --seed {options.seed} "
            f"--minutes {options.duration_ms / 60_000:g} --nemesis {families}{unsafe}")


# -- command line --------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int,
                        help="master seed (default: random, printed)")
    parser.add_argument("--minutes", type=float, default=1.0,
                        help="workload time under faults (default 1)")
    parser.add_argument("--nemesis", default="kill,partition",
                        help="comma list of kill, pause, partition, loss; or none "
                             "(default kill,partition)")
    parser.add_argument("--out", type=Path, help="output dir (default: a new temp dir)")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the nodes' data dirs after a valid run too")
    parser.add_argument("--unsafe-ack-before-commit", action="store_true",
                        help="UNSAFE: nodes answer PUB before commit and lose "
                             "acknowledged events when killed; shows the checker "
                             "catches that (expect INVALID, lost > 0)")
    parser.add_argument("--lock-wait-s", type=float, default=RUN_LOCK_WAIT_S,
                        help="how long to wait for another run on this machine "
                             f"(default {RUN_LOCK_WAIT_S})")
    parser.add_argument("--clean", action="store_true",
                        help="only delete nft tables left by dead runs, then exit")
    return parser.parse_args(argv)


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clean:
        removed = remove_stale_tables()
        print(f"chaos: removed {len(removed)} stale table(s) {' '.join(removed)}")
        return 0
    try:
        families = parse_families(args.nemesis)
    except ValueError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    seed = args.seed
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    options = RunOptions(seed=seed, duration_ms=int(args.minutes * 60_000),
                         families=families,
                         unsafe_ack_before_commit=args.unsafe_ack_before_commit)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"ensync-chaos-s{seed}-"))
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "harness.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(f"chaos: seed={seed} nemesis={args.nemesis} minutes={args.minutes:g} "
          f"out={out}", file=sys.stderr)
    if options.unsafe_ack_before_commit:
        print("chaos: UNSAFE run: nodes answer PUB before commit; a valid broker "
              "is not expected", file=sys.stderr)

    lock = _take_run_lock(RUN_LOCK_PATH, args.lock_wait_s)
    if lock is None:
        print(f"chaos: error: another run held {RUN_LOCK_PATH} for "
              f"{args.lock_wait_s:g} s", file=sys.stderr)
        return EXIT_HARNESS
    stale = remove_stale_tables()  # left by runs that were SIGKILLed
    if stale:
        print(f"chaos: removed stale table(s) {' '.join(stale)}", file=sys.stderr)
    run = Run(options, out, args.keep_data)
    atexit.register(run.cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)

    started_s, error = time.monotonic(), None
    try:
        asyncio.run(_run_with_handler(run))
    except (HarnessError, NetFaultError, OSError) as exc:
        error = str(exc)
    except (KeyboardInterrupt, SystemExit) as exc:
        error = f"interrupted ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 (report the seed, whatever broke)
        log.exception("harness failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        run.cleanup()

    code = write_outputs(run, started_s, error)
    if code == EXIT_VALID and not args.keep_data:
        run.discard_data()
    else:
        print(f"chaos: seed={seed} NOT VALID (exit {code}); data kept in {out}; "
              f"rerun: {_reproduce(options)}", file=sys.stderr)
    return code


def _take_run_lock(path: Path, wait_s: float):
    """The open, flock-ed lock file (held until exit), or None after ``wait_s``."""
    lock = open(path, "a")  # noqa: SIM115 (held for the life of the process)
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                return None
            if not waited:
                waited = True
                print(f"chaos: another run holds {path}; waiting (at most "
                      f"{wait_s:.0f} s)", file=sys.stderr)
            time.sleep(RUN_LOCK_POLL_S)


async def _run_with_handler(run: Run) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_exceptions)
    await run.run()


def _quiet_exceptions(loop, context) -> None:
    # Sends on a socket that just closed fail in fire-and-forget tasks of the
    # client; the request's own future already reports the outcome.
    log.info("background: %s %s", context.get("message"), context.get("exception"))


if __name__ == "__main__":
    sys.exit(main())
