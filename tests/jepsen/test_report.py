"""jepsen-lite's report figures and the run lock (jepsen-lite/report.py, chaos.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

JEPSEN_LITE_DIR = Path(__file__).resolve().parents[2] / "jepsen-lite"
if str(JEPSEN_LITE_DIR) not in sys.path:
    sys.path.insert(0, str(JEPSEN_LITE_DIR))

import chaos  # noqa: E402
import report  # noqa: E402
from options import Family, RunOptions  # noqa: E402


def _nemesis(t: int, action: str, fault: str, targets: list[str]) -> dict:
    return {"type": "info", "f": "nemesis", "process": "nemesis", "time_ms": t,
            "value": {"action": action, "fault": fault, "targets": targets}}


def _op(t: int, kind: str, f: str, process: int) -> dict:
    return {"type": kind, "f": f, "process": process, "time_ms": t, "value": {}}


def test_recovery_counts_only_work_that_began_after_the_heal():
    history = [
        _nemesis(1000, "start", "kill-leader", ["n1"]),
        _op(1500, "invoke", "publish", 0),  # started during the fault
        _op(2900, "ok", "deliver", 5),  # before the heal: not recovery
        _nemesis(3000, "stop", "kill-leader", ["n1"]),
        _op(3100, "ok", "publish", 0),  # began before the heal: proves nothing
        _op(3200, "invoke", "publish", 1),
        _op(3250, "fail", "publish", 1),  # a failure is not service
        _op(3300, "invoke", "publish", 1),
        _op(3400, "ok", "deliver", 5),
        _op(3700, "ok", "publish", 1),
        _nemesis(5000, "start", "pause-leader", ["n2"]),
        _nemesis(6000, "stop", "pause-leader", ["n2"]),
        _op(9000, "invoke", "publish", 2),  # after the next fault began
        _nemesis(8000, "start", "kill-all", ["n1", "n2", "n3"]),
        _nemesis(9500, "stop", "kill-all", ["n1", "n2", "n3"]),
    ]
    history.sort(key=lambda e: e["time_ms"])

    first, second, third = report.recovery_after_heals(history)
    assert (first["fault"], first["heal_ms"]) == ("kill-leader", 3000)
    assert (first["publish_ms"], first["deliver_ms"]) == (700, 400)
    assert first["since_start_publish_ms"] == 2100  # invoked at 1500, ok at 3100
    assert (second["publish_ms"], second["deliver_ms"]) == (None, None)
    assert (third["publish_ms"], third["deliver_ms"]) == (None, None)  # history ends

    figures = report.recovery_figures([first, second, third])
    assert figures["heals"] == 3
    assert figures["publish_ms"] == {"p50": 700, "max": 700, "none": 2}
    assert "recovery after heal: publish p50 700 ms" in "\n".join(
        report._fault_lines(history))


def test_the_rerun_command_keeps_the_unsafe_switch():
    safe = RunOptions(seed=5, duration_ms=30_000, families=(Family.KILL,))
    assert chaos._reproduce(safe) == ("scripts/chaos --seed 5 --minutes 0.5 "
                                      "--nemesis kill")
    unsafe = RunOptions(seed=5, duration_ms=30_000, families=(Family.KILL,),
                        unsafe_ack_before_commit=True)
    assert chaos._reproduce(unsafe).endswith(" --unsafe-ack-before-commit")


def test_a_second_run_waits_for_the_lock_and_gives_up_in_time(tmp_path):
    lock_path = tmp_path / "jepsen.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(lock_path)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert chaos._take_run_lock(lock_path, 0.5) is None
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait(timeout=5)
    lock = chaos._take_run_lock(lock_path, 5)  # the holder is gone: free again
    assert lock is not None
    lock.close()
