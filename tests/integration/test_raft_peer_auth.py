"""Raft peers: a process without the cluster secret cannot join, vote or inject.

The rogue (tests/rogue_peer.py) is a separate process speaking pysyncobj's peer
protocol at a member's Raft port. Against a cluster without a secret it moves the
term and is answered, which shows the probe is real; against a cluster with a
secret, neither a rogue without one nor one with a wrong one gets a frame
accepted, and the cluster's state does not move.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.cluster import ROOT, Cluster

ROGUE_TIMEOUT_S = 60
ROGUE_TERM = 1_000_000
SETTLE_TIMEOUT_S = 15
ALL_ATTEMPTS = "vote,append,status,join,readonly"
REFUSAL_LINE = re.compile(r"raft peer refused: .* direction=incoming")


def run_rogue(cluster: Cluster, target: str, password: str | None,
              attempts: str = ALL_ATTEMPTS) -> list[dict]:
    """Run the rogue against ``target``'s Raft port, impersonating another member."""
    impersonated = next(n for n in cluster.node_ids if n != target)
    command = [sys.executable, "-m", "tests.rogue_peer",
               "--target", cluster.nodes[target].raft_address,
               "--impersonate", cluster.nodes[impersonated].raft_address,
               "--term", str(ROGUE_TERM), "--attempts", attempts]
    if password is not None:
        command += ["--password", password]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=ROGUE_TIMEOUT_S, check=True)
    return json.loads(done.stdout)["attempts"]


def settled_view(cluster: Cluster) -> dict:
    """Per node: term, leader, indexes, read-only peers and state digest, once all
    nodes have applied the same index (so digests compare)."""

    def same_applied():
        digests = {n: cluster.digest(n) for n in cluster.node_ids}
        if len({d["applied_index"] for d in digests.values()}) != 1:
            return None
        return digests

    digests = cluster.wait_for(same_applied, SETTLE_TIMEOUT_S, "equal applied indexes")
    view = {}
    for node_id in cluster.node_ids:
        status = cluster.status(node_id)
        view[node_id] = {key: status[key] for key in (
            "term", "leader", "role", "commit_index", "applied_index",
            "state_applied_index", "raft_partners", "raft_readonly_peers")}
        view[node_id]["digest"] = digests[node_id]["digest"]
    return view


def refusal_lines(cluster: Cluster, node_id: str) -> int:
    return len(REFUSAL_LINE.findall(cluster.nodes[node_id].log_file.read_text()))


def test_a_process_without_the_secret_cannot_join_vote_or_inject(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.leader()
    follower = next(n for n in cluster.node_ids if n != leader)
    assert cluster.status(leader)["raft_peers_authenticated"] is True
    before = settled_view(cluster)
    wrong = "not-the-cluster-secret-" + "x" * 16

    for password in (None, wrong):
        for target in (leader, follower):
            for attempt in run_rogue(cluster, target, password):
                assert attempt["connected"], attempt
                assert attempt["frames"] == 0, attempt  # not one answer
                assert attempt["closed_by_peer"], attempt

    # Nothing moved: no term change (a vote request at term 10**6 would have
    # deposed the leader), no entry, no read-only listener, same data.
    assert settled_view(cluster) == before
    for target in (leader, follower):
        assert refusal_lines(cluster, target) >= 1
        refused = cluster.metrics(target)["ensync_raft_peer_refusals_total"]
        assert refused == 2 * len(ALL_ATTEMPTS.split(","))
    assert sorted(cluster.running_ids()) == cluster.node_ids

    # Still a working cluster.
    cluster.create_key("after-the-rogue", ["*"], ["*"])


def test_the_rogue_is_answered_when_it_holds_the_secret(cluster_factory):
    # The positive control: the rogue's sealed framing is right, so the refusals
    # above come from the secret, not from a broken client.
    cluster = cluster_factory(3)
    leader = cluster.leader()
    [status] = run_rogue(cluster, leader, cluster.cluster_secret, "status")
    assert status["frames"] == 1 and not status["closed_by_peer"], status
    assert refusal_lines(cluster, leader) == 0


def test_without_a_secret_the_same_rogue_moves_the_term_and_reads_the_log(
        cluster_factory):
    cluster = cluster_factory(3, cluster_secret=False)
    leader = cluster.leader()
    follower = next(n for n in cluster.node_ids if n != leader)
    assert cluster.status(leader)["raft_peers_authenticated"] is False

    [readonly] = run_rogue(cluster, leader, None, "readonly")
    assert "dict:append_entries" in readonly["kinds"], readonly
    [vote] = run_rogue(cluster, follower, None, "vote")
    assert vote["frames"] > 0, vote
    cluster.wait_for(lambda: cluster.status(follower)["term"] >= ROGUE_TERM,
                     SETTLE_TIMEOUT_S, "the rogue's term on the follower")
