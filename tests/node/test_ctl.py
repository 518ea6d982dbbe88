"""ensyncctl, first through its pure helpers, then against real clusters.

Integration tests run the tool as a separate process, exactly as an operator
would, so they also check that a failure prints one line and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.ctl import Probe, Target, health_line, render_table, summarize

ROOT = Path(__file__).resolve().parents[2]
CTL_TIMEOUT_S = 60
ERROR_PREFIX = "ensyncctl: error: "


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENSYNC_ADMIN_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "node.ctl", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=CTL_TIMEOUT_S,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    return lines[0]


def status_json(cluster_file: Path) -> tuple[int, dict]:
    result = run_ctl("--cluster", str(cluster_file), "status", "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def probe(node_id: str, role: str = "follower", term: int = 1, **fields) -> Probe:
    status = {"id": node_id, "role": role, "term": term, "commit_index": 10}
    status.update(applied_index=10, clients=0, has_quorum=True)
    status.update(fields)
    return Probe(Target(node_id, f"http://127.0.0.1:1/{node_id}"), status)


def down(node_id: str) -> Probe:
    return Probe(Target(node_id, f"http://127.0.0.1:1/{node_id}"), None, "refused")


# -- pure helpers -----------------------------------------------------------


def test_summary_names_the_leader_and_is_healthy_with_all_nodes_up():
    view = summarize([probe("n1", "leader"), probe("n2"), probe("n3")])

    assert view.leader == "n1"
    assert view.healthy
    assert (view.reachable, view.total) == (3, 3)


def test_higher_term_wins_when_two_nodes_claim_leadership():
    view = summarize([probe("n1", "leader", 3), probe("n2", "leader", 4), probe("n3")])

    assert view.leader == "n2"
    stale = next(row for row in view.rows if row["id"] == "n1")
    assert stale["role"] == "follower"
    assert stale["stale_leader"]
    assert any("n1 still claims leader" in note for note in view.notes)


def test_unreachable_node_is_never_leader_and_has_no_numbers():
    view = summarize([down("n1"), probe("n2", "leader", 2), probe("n3")])

    row = view.rows[0]
    assert row["role"] == "unreachable"
    assert row["reachable"] is False
    assert row["lag"] is None
    assert view.leader == "n2"
    assert view.healthy


def test_lag_is_measured_against_the_highest_reachable_commit_index():
    view = summarize(
        [
            probe("n1", "leader", commit_index=50, applied_index=48),
            probe("n2", commit_index=45, applied_index=40),
        ]
    )

    assert [row["lag"] for row in view.rows] == [2, 10]


def test_cluster_without_a_reachable_majority_is_unhealthy():
    view = summarize([probe("n1", "leader"), down("n2"), down("n3")])

    assert view.leader == "n1"
    assert not view.quorum_ok
    assert not view.healthy


def test_leader_reporting_no_quorum_makes_the_cluster_unhealthy():
    view = summarize([probe("n1", "leader", has_quorum=False), probe("n2")])

    assert not view.healthy


def test_health_line_without_a_leader_never_says_quorum_ok():
    electing = summarize([probe("n1", "candidate"), probe("n2"), down("n3")])
    alone = summarize([probe("n1", "candidate"), down("n2"), down("n3")])
    silent = summarize([down("n1"), down("n2"), down("n3")])

    assert health_line(electing) == (
        "unhealthy: no leader (election in progress?), 2/3 nodes reachable"
    )
    assert health_line(alone) == "unhealthy: no leader, 1/3 nodes reachable, no quorum"
    assert health_line(silent) == "unhealthy: no leader, 0/3 nodes reachable, no quorum"


def test_status_with_no_node_answering_prints_the_table_and_exits_1():
    result = run_ctl("--url", "127.0.0.1:1,127.0.0.1:2", "--token", "t", "status")

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "node"
    assert [line.split()[2] for line in lines[1:3]] == ["unreachable"] * 2
    assert lines[-1] == "unhealthy: no leader, 0/2 nodes reachable, no quorum"


def test_table_columns_line_up():
    text = render_table(["node", "role"], [["n1", "leader"], ["n10", "-"]])

    assert text.splitlines() == ["node  role", "n1    leader", "n10   -"]


# -- errors that need no cluster -------------------------------------------


def test_missing_cluster_file_is_one_line_error(tmp_path):
    result = run_ctl("--cluster", str(tmp_path / "nope.json"), "status")

    line = assert_one_line_error(result)
    assert "nope.json" in line


def test_no_reachable_node_is_one_line_error():
    result = run_ctl("--url", "127.0.0.1:1", "--token", "t", "keys", "list")

    line = assert_one_line_error(result)
    assert "no node reachable" in line


def test_bad_arguments_are_one_line_error():
    result = run_ctl("keys", "create", "--name", "x")

    line = assert_one_line_error(result)
    assert "--send" in line


# -- against a real cluster -------------------------------------------------


@pytest.fixture(scope="module")
def cluster_file(cluster, tmp_path_factory) -> Path:
    return cluster.write_cluster_file(tmp_path_factory.mktemp("ctl") / "cluster.json")


def test_status_prints_one_table_and_a_healthy_line(cluster, cluster_file):
    result = run_ctl("--cluster", str(cluster_file), "status")

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "node",
        "address",
        "role",
        "term",
        "commit",
        "applied",
        "lag",
        "clients",
        "reachable",
    ]
    rows = [line.split() for line in lines[1:4]]
    assert sorted(row[0] for row in rows) == ["n1", "n2", "n3"]
    assert sorted(row[2] for row in rows) == ["follower", "follower", "leader"]
    leader = cluster.leader()
    assert lines[4] == f"healthy: leader {leader}, 3/3 nodes reachable, quorum ok"


def test_status_json_lists_every_node_with_its_indexes(cluster, cluster_file):
    code, view = status_json(cluster_file)

    assert code == 0
    assert view["healthy"] is True
    assert view["leader"] == cluster.leader()
    assert [node["id"] for node in view["nodes"]] == ["n1", "n2", "n3"]
    for node in view["nodes"]:
        assert node["reachable"] is True
        assert node["lag"] >= 0
        for field in ("term", "commit_index", "applied_index", "clients"):
            assert isinstance(node[field], int), (field, node)


def test_keys_create_json_prints_the_new_credentials(cluster, cluster_file):
    create = run_ctl(
        "--cluster",
        str(cluster_file),
        "keys",
        "create",
        "--name",
        "ctl-test",
        "--send",
        "orders.*",
        "--receive",
        "a.*,b.*",
        "--receive",
        "c",
        "--json",
    )

    assert create.returncode == 0, create.stderr
    record = json.loads(create.stdout)
    for field in ("access_key", "app_id", "secret_key"):
        assert isinstance(record[field], str) and record[field], field
    assert record["name"] == "ctl-test"
    assert record["send"] == ["orders.*"]
    assert record["receive"] == ["a.*", "b.*", "c"]

    listing = run_ctl("--cluster", str(cluster_file), "keys", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    names = [key["name"] for key in json.loads(listing.stdout)["keys"]]
    assert "ctl-test" in names


def test_bad_token_is_one_line_error(cluster, cluster_file):
    result = run_ctl("--cluster", str(cluster_file), "--token", "wrong", "status")

    line = assert_one_line_error(result)
    assert "401" in line


def test_status_stays_healthy_with_one_follower_killed(cluster_factory, tmp_path):
    cluster = cluster_factory(3)
    leader = cluster.leader()
    follower = next(n for n in cluster.node_ids if n != leader)
    cluster.kill(follower, signal.SIGKILL)
    cluster_file = cluster.write_cluster_file(tmp_path / "cluster.json")

    code, view = status_json(cluster_file)

    assert code == 0, view
    assert view["healthy"] is True
    assert view["leader"] == leader
    dead = next(node for node in view["nodes"] if node["id"] == follower)
    assert dead["role"] == "unreachable"
    assert dead["reachable"] is False


def test_status_fails_once_two_of_three_nodes_are_dead(cluster_factory, tmp_path):
    cluster = cluster_factory(3)
    leader = cluster.leader()
    for node_id in [n for n in cluster.node_ids if n != leader]:
        cluster.kill(node_id, signal.SIGKILL)
    cluster_file = cluster.write_cluster_file(tmp_path / "cluster.json")

    code, view = status_json(cluster_file)
    table = run_ctl("--cluster", str(cluster_file), "status")

    assert code != 0
    assert view["healthy"] is False
    assert table.returncode != 0
    assert "1/3 nodes reachable" in table.stdout
    assert table.stdout.splitlines()[-1].startswith("unhealthy: ")
