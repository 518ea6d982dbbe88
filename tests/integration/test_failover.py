"""Leader loss, restart, and snapshot catch-up on a real 3-node cluster."""

from __future__ import annotations

import time

from tests import sdk

DIGEST_TIMEOUT_S = 60


def _converged(cluster):
    """All running nodes hold the same state at the same applied index."""
    digests = {n: cluster.digest(n) for n in cluster.running_ids()}
    applied = {d["applied_index"] for d in digests.values()}
    states = {d["digest"] for d in digests.values()}
    return digests if len(applied) == 1 and len(states) == 1 else None


async def _publish_all(client, to_app: str, count: int, on_pass, between=None):
    """Publish seq 0..count-1 once each; collect what got +PASS, count failures."""
    passed, failed = {}, 0
    for seq in range(count):
        if between is not None:
            between(seq)
        try:
            reply = await client.publish("job/run", [to_app], {"seq": seq})
        except Exception:  # the SDK raises EnSyncError subclasses on -FAIL
            failed += 1
            continue
        passed[seq] = reply
        on_pass(seq)
    return passed, failed


async def test_kill_9_of_the_leader_loses_no_acknowledged_event(cluster_factory):
    cluster = cluster_factory(3, extra_flags=["--write-timeout-ms", "3000"])
    leader = cluster.leader()
    pub_node, con_node = [n for n in cluster.node_ids if n != leader]
    publisher = cluster.create_key("fo-publisher", ["job/*"], [])
    consumer = cluster.create_key("fo-consumer", [], ["job/*"])

    sub_client = await sdk.connect(cluster.ws_url(con_node), consumer)
    pub_client = await sdk.connect(cluster.ws_url(pub_node), publisher)
    killed_at, first_pass_after_kill = None, None

    def kill_midstream(seq):
        nonlocal killed_at
        if seq == 100:
            cluster.kill(leader)
            killed_at = time.monotonic()

    def note_pass(seq):
        nonlocal first_pass_after_kill
        if killed_at is not None and first_pass_after_kill is None:
            first_pass_after_kill = time.monotonic()

    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, "job/run")
        passed, failed = await _publish_all(pub_client, consumer["app_id"], 300,
                                            note_pass, kill_midstream)
        assert first_pass_after_kill is not None, "publishing never resumed"
        assert first_pass_after_kill - killed_at < 15
        assert len(passed) >= 290, f"only {len(passed)} passed, {failed} failed"

        # Every +PASS reaches the consumer; duplicates are allowed, loss is not.
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while not set(passed) <= seen:
            assert time.monotonic() < deadline, f"missing {sorted(set(passed) - seen)[:10]}"
            got = await sdk.receive_and_ack(ws_sub, inbox, 1, deadline - time.monotonic())
            seen.add(got[0]["payload"]["seq"])
    finally:
        await pub_client.close()
        await sub_client.close()

    cluster.restart(leader)
    digests = cluster.wait_for(lambda: _converged(cluster), DIGEST_TIMEOUT_S,
                               "the restarted node to converge")
    assert set(digests) == set(cluster.node_ids)


async def test_a_node_that_missed_a_snapshot_installs_it_and_converges(cluster_factory):
    cluster = cluster_factory(3, extra_flags=["--compaction-min-entries", "64"])
    leader = cluster.leader()
    lagging, other = [n for n in cluster.node_ids if n != leader]
    publisher = cluster.create_key("snap-publisher", ["job/*"], [])
    consumer = cluster.create_key("snap-consumer", [], ["job/*"])
    cluster.kill(lagging)

    pub_client = await sdk.connect(cluster.ws_url(other), publisher)
    try:
        passed, failed = await _publish_all(pub_client, consumer["app_id"], 300,
                                            lambda seq: None)
    finally:
        await pub_client.close()
    assert (len(passed), failed) == (300, 0)
    cluster.wait_for(lambda: cluster.metrics(leader)["ensync_raft_log_entries"] < 200,
                     30, "the leader to compact its log")

    cluster.restart(lagging)
    cluster.wait_for(
        lambda: cluster.metrics(lagging)["ensync_snapshot_installs_total"] >= 1,
        60, "the restarted node to install a snapshot")
    cluster.wait_for(lambda: _converged(cluster), DIGEST_TIMEOUT_S,
                     "the restarted node to converge")

    # The caught-up node serves the backlog: all 300 events, in order.
    sub_client = await sdk.connect(cluster.ws_url(lagging), consumer)
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, "job/run")
        got = await sdk.receive_and_ack(ws_sub, inbox, 300, timeout_s=90)
        assert [m["payload"]["seq"] for m in got] == list(range(300))
    finally:
        await sub_client.close()

    # The leader restarts from its own snapshot plus the journal after it, and
    # applies nothing twice: it converges to the same digest.
    cluster.kill(leader)
    cluster.restart(leader)
    cluster.wait_for(lambda: _converged(cluster), DIGEST_TIMEOUT_S,
                     "the restarted leader to converge")
