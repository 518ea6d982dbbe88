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

from node.ctl import (
    Probe,
    Target,
    bash_completion,
    build_parser,
    health_line,
    render_dead_letters,
    render_sessions,
    render_table,
    render_trace,
    summarize,
)

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


TRACE = {
    "idem": "evt-0003-000000000007",
    "name": "order/created",
    "from": "sender-app",
    "to": "receiver-app",
    "state": "acked",
    "attempts": 1,
    "history": [
        {"what": "published", "at": 1_700_000_000_000, "by": "sender-app"},
        {"what": "committed", "at": 1_700_000_000_002, "index": 42},
        {"what": "delivered", "at": 1_700_000_000_010, "sid": "n2.ab.1",
         "node": "n2", "attempt": 1},
        {"what": "acked", "at": 1_700_000_000_250, "sid": "n2.ab.1"},
    ],
}


def test_trace_renders_a_header_then_one_timeline_row_per_audit_row():
    lines = render_trace(TRACE).splitlines()

    assert lines[0] == "evt-0003-000000000007  order/created  state acked, attempts 1"
    assert lines[3].split() == ["time", "(UTC)", "what", "details"]
    assert lines[4].split()[:3] == ["2023-11-14", "22:13:20.000", "published"]
    assert lines[6].split()[2:] == ["delivered", "sid=n2.ab.1", "node=n2", "attempt=1"]
    assert [line.split()[2] for line in lines[4:]] == [
        "published", "committed", "delivered", "acked"]


def test_dead_letter_show_adds_the_payload_and_metadata():
    record = {"payload": "cG9pc29u", "metadata": {"k": "v"}}

    lines = render_trace({**TRACE, "state": "dead", "record": record}).splitlines()

    assert "payload  cG9pc29u" in lines
    assert 'metadata {"k": "v"}' in lines


def test_dead_letter_list_says_when_it_shows_only_part_of_the_queue():
    letter = {"idem": "evt-0001-000000000001", "name": "a/b", "to": "app",
              "attempts": 2, "dead_since_ms": 1_700_000_000_123}

    text = render_dead_letters({"dead_letters": [letter], "total": 5})
    empty = render_dead_letters({"dead_letters": [], "total": 0})

    assert text.splitlines()[1].split() == [
        "evt-0001-000000000001", "a/b", "app", "2", "2023-11-14", "22:13:20.123"]
    assert text.splitlines()[-1] == "showing 1 of 5; raise --limit for more"
    assert empty == "no dead letters"


def test_sessions_table_names_the_app_and_dashes_what_a_live_session_lacks():
    live = {"client_id": "n1.x.1", "app": "id1", "app_name": "billing", "node": "n1",
            "status": "idle", "in_flight": 0, "opened_ms": 0, "last_active_ms": 0}
    gone = {**live, "client_id": "n1.x.2", "status": "disconnected",
            "closed_ms": 1000, "reason": "client closed", "last_active_ms": None}

    lines = render_sessions({"sessions": [live, gone]}).splitlines()

    assert lines[1].split()[:5] == ["n1.x.1", "billing", "n1", "idle", "0"]
    assert lines[1].split()[-2:] == ["-", "-"]
    assert lines[2].split()[-2:] == ["client", "closed"]


def complete(words: list[str]) -> list[str]:
    """Candidates our bash completion offers after ``words`` (last one partial)."""
    script = bash_completion(build_parser())
    line = " ".join(repr(word) for word in ["ensyncctl", *words])
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}\n"
             "_ensyncctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe],
                            capture_output=True, text=True, timeout=CTL_TIMEOUT_S,
                            check=True)
    return sorted(filter(None, result.stdout.splitlines()))


def test_completion_script_is_valid_bash():
    result = run_ctl("completion", "bash")

    assert result.returncode == 0, result.stderr
    check = subprocess.run(["bash", "-n"], input=result.stdout, text=True,
                           capture_output=True, timeout=CTL_TIMEOUT_S, check=False)
    assert check.returncode == 0, check.stderr
    assert result.stdout.rstrip().endswith(
        "complete -F _ensyncctl ensyncctl .venv/bin/ensyncctl ./.venv/bin/ensyncctl")


def test_completion_offers_commands_subcommands_and_flags():
    assert complete([""]) == sorted(
        ["--cacert", "--cluster", "--help", "--timeout-ms", "--token", "--url",
         "apps", "completion", "dlq", "keys", "leader", "nodes", "publish",
         "queues", "sessions", "status", "subscribe", "trace"])
    assert complete(["dlq", ""])[-3:] == ["list", "requeue", "show"]
    assert complete(["keys", ""])[-5:] == [
        "create", "disable", "enable", "list", "rotate"]
    assert complete(["leader", ""])[-2:] == ["step-down", "transfer"]
    assert "--interval-ms" in complete(["status", "--"])
    assert complete(["subscribe", "a/b", "--a"]) == ["--ack", "--as"]
    assert complete(["publish", "--to", ""]) == []
    assert "--limit" in complete(["dlq", "list", "--"])
    assert complete(["--token", "t", "tr"]) == ["trace"]
    assert complete(["trace", "evt-0000-1", "--j"]) == ["--json"]
    assert complete(["--url", ""]) == []


# -- errors that need no cluster -------------------------------------------


def test_missing_cluster_file_is_one_line_error(tmp_path):
    result = run_ctl("--cluster", str(tmp_path / "nope.json"), "status")

    line = assert_one_line_error(result)
    assert "nope.json" in line


def test_an_unreadable_cacert_is_one_line_error(tmp_path):
    result = run_ctl("--url", "https://127.0.0.1:1", "--token", "t",
                     "--cacert", str(tmp_path / "missing.pem"), "status")

    line = assert_one_line_error(result)
    assert "missing.pem" in line


def test_no_reachable_node_is_one_line_error():
    result = run_ctl("--url", "127.0.0.1:1", "--token", "t", "keys", "list")

    line = assert_one_line_error(result)
    assert "no node reachable" in line


def test_bad_arguments_are_one_line_error():
    result = run_ctl("keys", "create", "--name", "x")

    line = assert_one_line_error(result)
    assert "--send" in line


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["dlq"], "action"),
        (["dlq", "list", "--limit", "0"], "--limit"),
        (["trace"], "IDEM"),
        (["completion", "zsh"], "zsh"),
    ],
)
def test_bad_delivery_arguments_are_one_line_error(args, word):
    line = assert_one_line_error(run_ctl(*args))

    assert word in line


@pytest.mark.parametrize(
    "args", [["trace", "evt-0000-1"], ["dlq", "list"], ["dlq", "requeue", "x"],
             ["sessions"]]
)
def test_delivery_commands_with_no_node_reachable_are_one_line_error(args):
    result = run_ctl("--url", "127.0.0.1:1", "--token", "t", *args)

    line = assert_one_line_error(result)
    assert "no node reachable" in line


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
