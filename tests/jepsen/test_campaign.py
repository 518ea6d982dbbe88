"""The seeded jepsen-lite campaign CI runs: real 3-node clusters under faults.

Each segment is one ``scripts/chaos`` run with a fixed seed, so a failure
reproduces with the printed command; together they take about 6.5 minutes.
Seeds were picked for their schedules (jepsen-lite/nemesis.py draws them from
the seed alone), and two are regression cases:

- partitions, seed 31: before raft/commit_guard.py an old leader applied its own
  uncommitted entries while a snapshot reached it (inconsistent_idem,
  redelivered_after_ack); tests/jepsen/histories/ keeps that run's history.
- pauses, seed 31: before raft/freshness.py (and the push hold of commit
  7d76ed9) a resumed node pushed attempts already acked elsewhere.

The last test runs a crash segment against nodes started with the UNSAFE
ack-before-commit switch (node/unsafe.py) and expects the checker to find lost
events: the harness must catch a broken broker, not only pass a good one.

Partitions and packet loss need root and nftables (./scripts/run-tests installs
nftables as root, as CI runs); without root those segments skip. Outputs go to
pytest's temporary directory (it keeps the last three sessions), or to
``$ENSYNC_JEPSEN_OUT/<segment>/`` when that is set; a failing segment's message
has the seed, the command that reruns it, that directory and the run's summary.
Runs from two pytest sessions at once take turns: scripts/chaos holds a lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUT_ENV = "ENSYNC_JEPSEN_OUT"
# The final phase (heal, drain, converge) adds at most ~65 s on top of the
# workload; the rest covers start and checking.
RUN_OVERHEAD_S = 150
# Another pytest session's runs go first (scripts/chaos holds a lock): waiting
# for them is bounded by this, on top of the run's own bound. CI never waits.
LOCK_WAIT_S = 420
EXIT_VALID, EXIT_INVALID = 0, 1
STDERR_TAIL_CHARS = 3000


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str
    seed: int
    nemesis: str
    minutes: float
    unsafe: bool = False

    @property
    def needs_nft(self) -> bool:
        return bool({"partition", "loss"} & set(self.nemesis.split(",")))

    @property
    def timeout_s(self) -> int:
        return int(self.minutes * 60) + RUN_OVERHEAD_S + LOCK_WAIT_S

    def argv(self, out: Path) -> list[str]:
        argv = [str(ROOT / "scripts" / "chaos"), "--seed", str(self.seed),
                "--minutes", f"{self.minutes:g}", "--nemesis", self.nemesis,
                "--out", str(out)]
        return argv + (["--unsafe-ack-before-commit"] if self.unsafe else [])

    def rerun(self) -> str:
        return " ".join(["./scripts/chaos"] + self.argv(Path("DIR"))[1:])


SEGMENTS = [
    # No faults: the control. Anything the checker finds here is a false alarm
    # or a plain bug.
    Segment("smoke", 2026, "none", 0.33),
    # no-majority, isolate a follower (three times), one-way.
    Segment("partitions", 31, "partition", 1.0),
    # kill -9: the leader four times, fast restarts, all nodes, a random node.
    Segment("crashes", 3, "kill", 0.75),
    # SIGSTOP beyond the election timeout: a random node, the leader.
    Segment("pauses", 31, "pause", 0.75),
    # kill-leader, loss, pauses, kill-all, isolate the leader.
    Segment("mixed", 62, "kill,pause,partition,loss", 1.0),
]
UNSAFE_SEGMENT = Segment("unsafe-crashes", 3, "kill", 0.5, unsafe=True)


def _out_dir(segment: Segment, tmp_path_factory) -> Path:
    chosen = os.environ.get(OUT_ENV)
    if not chosen:
        return tmp_path_factory.mktemp(f"jepsen-{segment.name}") / "run"
    out = Path(chosen) / segment.name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _run(segment: Segment, tmp_path_factory) -> tuple[subprocess.CompletedProcess,
                                                      Path, str]:
    if segment.needs_nft and os.geteuid() != 0:
        pytest.skip(f"{segment.name}: partitions and loss need root and nftables")
    out = _out_dir(segment, tmp_path_factory)
    argv = segment.argv(out) + ["--lock-wait-s", str(LOCK_WAIT_S)]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=segment.timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr or ""
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        pytest.fail(_report(segment, out, f"no end after {segment.timeout_s} s",
                            "", stderr))
    return done, out, _report(segment, out, f"exit {done.returncode}",
                              done.stdout, done.stderr)


def _report(segment: Segment, out: Path, outcome: str, stdout: str,
            stderr: str) -> str:
    """What a failing segment says: seed, rerun command, where the logs are."""
    summary = out / "summary.txt"
    return (f"segment {segment.name}: seed {segment.seed}, {outcome}\n"
            f"rerun: {segment.rerun()}\nlogs and data: {out}\n\n"
            f"{summary.read_text() if summary.is_file() else stdout}\n"
            f"{stderr[-STDERR_TAIL_CHARS:]}")


def _results(out: Path, report: str) -> dict:
    path = out / "results.json"
    assert path.is_file(), f"results.json missing\n{report}"
    return json.loads(path.read_text())


def _assert_cleaned_up(out: Path, report: str) -> None:
    summary = (out / "summary.txt").read_text()
    assert re.search(r"cleanup: table ensync_jepsen_\d+ gone; nodes running none; "
                     r"stopped none", summary), report
    tables = ""
    if shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True,
                                text=True, check=False).stdout
    table = re.search(r"table (ensync_jepsen_\d+) gone", summary).group(1)
    assert table not in tables, f"{table} was left behind\n{report}"


def _param(segment: Segment):
    return pytest.param(segment, id=segment.name,
                        marks=pytest.mark.timeout(segment.timeout_s + 30))


@pytest.mark.parametrize("segment", [_param(s) for s in SEGMENTS])
def test_campaign_segment_is_valid(segment: Segment, tmp_path_factory):
    done, out, report = _run(segment, tmp_path_factory)

    assert done.returncode == EXIT_VALID, report
    results = _results(out, report)
    assert results["valid"] is True and results["seed"] == segment.seed, report
    assert results["counts"]["lost"] == 0, report
    for name in ("history.jsonl", "summary.txt", "timeline.png"):
        assert (out / name).is_file(), f"{name} missing\n{report}"
    first = json.loads((out / "history.jsonl").open().readline())
    assert first["value"]["seed"] == segment.seed
    if segment.nemesis != "none":
        assert results["faults_injected"] >= 3, report
        assert len(results["recovery_after_heal"]) == results["faults_injected"]
    _assert_cleaned_up(out, report)


@pytest.mark.timeout(UNSAFE_SEGMENT.timeout_s + 30)
def test_the_checker_finds_the_events_an_unsafe_broker_loses(tmp_path_factory):
    segment = UNSAFE_SEGMENT
    done, out, report = _run(segment, tmp_path_factory)

    assert done.returncode == EXIT_INVALID, report
    results = _results(out, report)
    assert results["valid"] is False and results["unsafe_ack_before_commit"], report
    assert results["counts"]["lost"] > 0, report
    # Seed 3 kills the leader twice and then all nodes: each kill drops what
    # the killed nodes had answered and not yet proposed. The nodes said so.
    assert results["faults_injected"] >= 3, report
    for node_log in sorted((out / "nodes").glob("n*/node.log")):
        assert "UNSAFE" in node_log.read_text(), f"{node_log} has no warning"
    _assert_cleaned_up(out, report)
