"""What a first-time user of ensyncctl tripped over, fixed and kept fixed.

One follower's URL is enough for `status`; --url borrows the cluster file's
token only for nodes that file lists; the cluster file is found from any
directory below it; a reader that closes the pipe early gets no traceback;
a key creation with an unknown outcome says what to do next; and a few
arguments that used to be taken silently are refused or read from a file.
The pure helpers come first, then real clusters (tests/cluster.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.ctl import Probe, Target, bash_completion, build_parser, summarize

ROOT = Path(__file__).resolve().parents[2]
CTL_TIMEOUT_S = 60
ERROR_PREFIX = "ensyncctl: error: "
EXIT_BROKEN_PIPE = 141


def run_ctl(*args: str, cwd: Path = ROOT, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "ENSYNC_ADMIN_TOKEN"}
    # From another directory the checkout must still be importable.
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "node.ctl", *args],
        capture_output=True, text=True, cwd=cwd, env=dict(base, **(env or {})),
        input=stdin, timeout=CTL_TIMEOUT_S, check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    return lines[0]


def follower(node_id: str, leader: str | None, has_quorum: bool = True) -> Probe:
    status = {"id": node_id, "role": "follower", "term": 2, "commit_index": 9,
              "applied_index": 9, "clients": 0, "leader": leader,
              "has_quorum": has_quorum}
    return Probe(Target(None, f"http://127.0.0.1:1/{node_id}"), status)


# -- pure helpers -----------------------------------------------------------


def test_a_follower_reporting_a_leader_with_quorum_vouches_for_it_under_url():
    view = summarize([follower("n2", "n1")], trust_reports=True)
    assert view.healthy and view.leader == "n1" and view.quorum_ok
    # From a cluster file every node is asked, and the follower's word is not
    # enough: the leader itself must answer.
    assert not summarize([follower("n2", "n1")]).healthy


def test_a_follower_without_quorum_or_leader_vouches_for_nothing():
    assert not summarize([follower("n2", "n1", has_quorum=False)],
                         trust_reports=True).healthy
    assert not summarize([follower("n2", None)], trust_reports=True).healthy


def test_completion_also_completes_the_venv_path_the_readme_uses():
    script = bash_completion(build_parser())
    complete_line = script.strip().splitlines()[-1].split()
    assert complete_line[:3] == ["complete", "-F", "_ensyncctl"]
    assert {"ensyncctl", ".venv/bin/ensyncctl"} <= set(complete_line[3:])


def test_dlq_list_limit_above_the_nodes_cap_is_one_line_error():
    line = one_line_error(run_ctl("--url", "http://127.0.0.1:1", "--token", "t",
                                  "dlq", "list", "--limit", "5000"))
    assert "1000" in line


def test_missing_cluster_file_error_names_where_it_looked(tmp_path):
    line = one_line_error(run_ctl("status", cwd=tmp_path))
    assert str(tmp_path / ".ensync" / "cluster.json") in line, line


def test_publish_data_from_a_missing_file_is_one_line_error(tmp_path):
    line = one_line_error(run_ctl("--url", "http://127.0.0.1:1", "publish", "a/b",
                                  "--to", "x", "--key", "k", "--data",
                                  f"@{tmp_path / 'absent.json'}"))
    assert "absent.json" in line


def test_a_bad_int_setting_names_the_variable_and_the_unit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    env["ENSYNC_ACK_TIMEOUT_MS"] = "1s"
    result = subprocess.run(
        [sys.executable, "-m", "node.main", "--admin-token", "t",
         "--data-dir", str(tmp_path / "n1")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=CTL_TIMEOUT_S,
        check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "ENSYNC_ACK_TIMEOUT_MS='1s'" in result.stderr, result.stderr
    assert "milliseconds" in result.stderr, result.stderr


# -- against a real cluster -------------------------------------------------


@pytest.fixture(scope="module")
def checkout(cluster, tmp_path_factory) -> Path:
    """A directory holding .ensync/cluster.json, as start-cluster leaves it."""
    root = tmp_path_factory.mktemp("checkout")
    (root / ".ensync").mkdir()
    (root / "docs").mkdir()
    cluster.write_cluster_file(root / ".ensync" / "cluster.json")
    return root


def a_follower(cluster) -> str:
    leader = cluster.leader()
    return next(node for node in cluster.node_ids if node != leader)


def test_status_with_one_follower_url_sees_the_whole_cluster(cluster):
    leader = cluster.leader()
    url = cluster.admin_url(a_follower(cluster))
    result = run_ctl("--url", url, "--token", cluster.admin_token, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"healthy: leader {leader}, 3/3 nodes reachable, quorum ok", last

    view = json.loads(run_ctl("--url", url, "--token", cluster.admin_token,
                              "status", "--json").stdout)
    assert sorted(node["id"] for node in view["nodes"]) == ["n1", "n2", "n3"]
    assert view["leader"] == leader and view["healthy"]


def test_ctl_finds_the_cluster_file_from_a_subdirectory(cluster, checkout):
    result = run_ctl("status", cwd=checkout / "docs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("healthy: leader")


def test_url_without_token_borrows_the_cluster_files_token_for_its_nodes(
        cluster, checkout):
    url = cluster.admin_url(a_follower(cluster))
    result = run_ctl("--url", url, "keys", "list", cwd=checkout)
    assert result.returncode == 0, result.stderr

    # A node the cluster file does not list never gets that token.
    line = one_line_error(run_ctl("--url", "http://127.0.0.1:1", "keys", "list",
                                  cwd=checkout))
    assert "no admin token" in line


def test_output_cut_short_by_the_reader_exits_quietly(cluster, checkout):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "node.ctl", "sessions"], stdout=write_end,
            stderr=subprocess.PIPE, text=True, cwd=checkout,
            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=CTL_TIMEOUT_S,
            check=False)
    finally:
        os.close(write_end)
    assert result.returncode == EXIT_BROKEN_PIPE, result.stderr
    assert result.stderr == "", result.stderr


def test_publish_reads_data_from_a_file_and_from_stdin(cluster, tmp_path):
    key = cluster.create_key("newcomer-data", ["*"], ["*"])
    payload = tmp_path / "big.json"
    payload.write_text(json.dumps({"rows": list(range(2000))}))
    common = ("--url", cluster.admin_url("n1"), "publish", "newcomer/data",
              "--to", key["app_id"], "--key", key["access_key"])

    from_file = run_ctl(*common, "--data", f"@{payload}")
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.startswith("published evt-"), from_file.stdout
    from_stdin = run_ctl(*common, "--data", "-", stdin='{"order": 42}')
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.startswith("published evt-"), from_stdin.stdout


def test_key_create_with_unknown_outcome_says_what_to_do_next(cluster_factory):
    short = cluster_factory(3, extra_flags=["--write-timeout-ms", "1000"])
    survivor = short.leader()
    for node_id in short.node_ids:
        if node_id != survivor:
            short.kill(node_id)

    line = one_line_error(run_ctl("--url", short.admin_url(survivor), "--token",
                                  short.admin_token, "keys", "create", "--name",
                                  "blind", "--send", "*", "--receive", "*"))
    assert "503" in line and "keys list" in line, line
    assert "keys disable blind" in line, line


@pytest.mark.parametrize("args, says", [
    (["--url", "http://[::1", "--token", "t", "status"], "Invalid IPv6 URL"),
    (["--url", "not a url", "--token", "t", "status"], "not a URL"),
    (["--url", "http://127.0.0.1:1", "--token", "\xff", "status"], "printable ASCII"),
    (["--url", "http://127.0.0.1:1", "--token", "a\nb", "status"], "printable ASCII"),
])
def test_a_bad_url_or_token_is_one_line_and_exit_2(args, says):
    """These were tracebacks (breaker run, finding 8)."""
    done = subprocess.run([sys.executable, "-m", "node.ctl", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_output_to_a_full_disk_is_one_line_and_exit_2():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "node.ctl", "completion", "bash"], cwd=ROOT,
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no space left" in done.stderr
