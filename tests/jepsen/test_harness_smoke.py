"""A 45-second seeded jepsen-lite campaign (kill + partition) runs to the end.

Off unless ENSYNC_JEPSEN=1: it needs root (nftables) and takes about a minute
and a half. It checks the harness, not the broker: every output is written, the
nft table is gone, and the checker did not find the run invalid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261204
RUN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    os.environ.get("ENSYNC_JEPSEN") != "1",
    reason="jepsen-lite campaigns run only with ENSYNC_JEPSEN=1 (root, nftables)")


def _our_tables() -> str:
    done = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=False)
    return done.stdout


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_seeded_kill_and_partition_campaign_writes_every_output(tmp_path: Path):
    out = tmp_path / "run"
    # scripts/chaos also installs the chaos extra (matplotlib) and nftables.
    done = subprocess.run(
        [str(ROOT / "scripts" / "chaos"), "--seed", str(SEED), "--minutes", "0.75",
         "--nemesis", "kill,partition", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    report = f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"

    for name in ("history.jsonl", "results.json", "summary.txt", "timeline.png"):
        assert (out / name).is_file(), f"{name} missing\n{report}"
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == SEED, report
    assert results["valid"] is not False, report
    assert {"lost", "duplicated"} <= set(results["counts"]), report

    first = json.loads((out / "history.jsonl").open().readline())
    assert first["f"] == "run" and first["value"]["seed"] == SEED
    assert first["value"]["schedule"], "a 45 s kill+partition run schedules faults"
    summary = (out / "summary.txt").read_text()
    table = re.search(r"table (ensync_jepsen_\d+) gone", summary)
    assert table is not None, report
    assert table.group(1) not in _our_tables(), f"{table.group(1)} was left behind"
