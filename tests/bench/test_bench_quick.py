"""./scripts/bench --quick, run as CI runs it: the instrument keeps working.

The script installs its own extra (nats-server, nats-py, matplotlib), starts a
3-node cluster of ours and a 3-node NATS JetStream cluster in turn, and runs
every phase once with small counts. What is asserted is that every phase
completed on both systems, that the outputs exist, and that group commit
batched events under pipelined load. Never a time: this machine is shared.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH_TIMEOUT_S = 480
SYSTEMS = ("ours", "nats")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    command = [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=BENCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "latest.json").read_text())
    result["_out"] = out
    result["_stderr"] = done.stderr
    return result


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_every_phase_completes_on_both_systems(quick_run):
    failed = [(round_["system"], name, sample["error"])
              for round_ in quick_run["rounds"]
              for name, sample in round_["phases"].items() if "error" in sample]
    assert failed == []

    for name, by_system in quick_run["summary"].items():
        for system in SYSTEMS:
            row = by_system[system]
            assert row["samples"] == 1 and row["errors"] == 0, (name, system, row)
            assert row["events_per_s"]["median"] > 0, (name, system)


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_progress_is_shown_for_every_phase(quick_run):
    for name in quick_run["summary"]:
        for system in SYSTEMS:
            assert f" {system:4} {name} " in quick_run["_stderr"], (system, name)


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_group_commit_puts_many_events_in_one_raft_entry_under_load(quick_run):
    [ours] = [r for r in quick_run["rounds"]
              if r["system"] == "ours" and "pipelined_publish" in r["phases"]]

    assert ours["phases"]["pipelined_publish"]["events_per_raft_entry"] > 1


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_the_outputs_hold_the_four_named_ratios_a_table_and_a_chart(quick_run):
    ratios = quick_run["ratios"]
    for key in ("pipelined_publish", "sync_publish_p50", "consume", "e2e_p99_1000"):
        assert isinstance(ratios[key], float) and ratios[key] > 0, key

    out = quick_run["_out"]
    assert "| pipelined_publish | ours" in (out / "latest.md").read_text()
    assert (out / "latest.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_cpu_is_recorded_per_server_process_and_for_the_client(quick_run):
    for round_ in quick_run["rounds"]:
        sample = next(iter(round_["phases"].values()))
        assert len(sample["server_cpu_pct"]) == 3, round_["system"]
        assert sample["client_cpu_pct"] > 0
