"""TLS on the client and admin port: the real SDK over wss://, ensyncctl over https.

The certificate comes from a CA made for the test (tests/tls.py). The SDK has no
TLS option of its own: ``websockets.connect`` builds a default context for a
wss:// URL, which reads the CA bundle named by ``SSL_CERT_FILE`` when it is made.
So the test points ``SSL_CERT_FILE`` at the test CA for the SDK tests only, and
verification stays on: without it the SDK refuses the node.
"""

from __future__ import annotations

import os
import subprocess
import sys

import aiohttp
import pytest

from node.ctl import CtlError, request_json
from tests import sdk
from tests.cluster import ROOT, Cluster
from tests.tls import make_test_ca

EVENTS_COUNT = 20
CTL_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def tls_cluster(request, tmp_path_factory) -> Cluster:
    files = make_test_ca(tmp_path_factory.mktemp("tls"))
    cluster = Cluster(3, base_dir=tmp_path_factory.mktemp("tls-cluster"), tls=files)
    request.addfinalizer(cluster.stop)
    return cluster.start()


async def test_the_sdk_publishes_and_consumes_over_wss(tls_cluster, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cluster.tls.ca))
    publisher = tls_cluster.create_key("tls-publisher", ["tls/*"], [])
    consumer = tls_cluster.create_key("tls-consumer", [], ["tls/*"])
    assert tls_cluster.ws_url("n2").startswith("wss://")

    sub_client = await sdk.connect(tls_cluster.ws_url("n2"), consumer)
    pub_client = await sdk.connect(tls_cluster.ws_url("n1"), publisher)
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, "tls/event")
        for i in range(EVENTS_COUNT):
            reply = await pub_client.publish(
                "tls/event", [consumer["app_id"]], {"i": i})
            assert reply.startswith("+PASS:PUBLISHED;IDEM=")
        got = await sdk.receive_and_ack(ws_sub, inbox, EVENTS_COUNT, timeout_s=60)
        assert [m["payload"]["i"] for m in got] == list(range(EVENTS_COUNT))
    finally:
        await pub_client.close()
        await sub_client.close()


async def test_the_sdk_refuses_a_node_whose_certificate_it_does_not_trust(
        tls_cluster, monkeypatch, tmp_path):
    # A bundle with another CA: the node's certificate chains to nothing in it.
    other = make_test_ca(tmp_path / "other", ca_name="some other CA")
    monkeypatch.setenv("SSL_CERT_FILE", str(other.ca))
    key = tls_cluster.create_key("tls-untrusting", ["*"], ["*"])
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        client = await sdk.connect(tls_cluster.ws_url("n1"), key)
        await client.close()


async def test_a_plain_ws_client_cannot_talk_to_a_tls_node(tls_cluster):
    plain_url = tls_cluster.ws_url("n1").replace("wss://", "ws://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.ws_connect(plain_url, timeout=aiohttp.ClientWSTimeout(
                    ws_close=5)) as ws:
                await ws.send_str("CONN;ACCESS_KEY=:anything")
                await ws.receive(timeout=5)


def test_plain_http_gets_no_admin_answer_from_a_tls_node(tls_cluster):
    plain_url = tls_cluster.admin_url("n1").replace("https://", "http://")
    with pytest.raises(CtlError):
        request_json(plain_url + "/admin/status", tls_cluster.admin_token, 2000)


def run_ctl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("ENSYNC_") and k != "SSL_CERT_FILE"}
    return subprocess.run([sys.executable, "-m", "node.ctl", *args], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True,
                          timeout=CTL_TIMEOUT_S, check=False)


def test_ensyncctl_status_over_https_trusts_the_ca_given_with_cacert(tls_cluster):
    urls = [f"--url={tls_cluster.admin_url(n)}" for n in tls_cluster.node_ids]
    env = {"ENSYNC_ADMIN_TOKEN": tls_cluster.admin_token}

    done = run_ctl([*urls, "--cacert", str(tls_cluster.tls.ca), "status"], env)
    assert done.returncode == 0, done.stderr
    assert "healthy" in done.stdout.lower()

    by_env = run_ctl([*urls, "status", "--json"],
                     {**env, "ENSYNC_CACERT": str(tls_cluster.tls.ca)})
    assert by_env.returncode == 0, by_env.stderr

    # Verification is on by default: without the CA, one clear line and exit 2.
    refused = run_ctl([*urls, "status"], env)
    assert refused.returncode != 0
    assert "not trusted" in refused.stdout + refused.stderr
    assert "--cacert" in refused.stdout + refused.stderr


def test_the_dashboard_reaches_its_peers_over_https(tls_cluster):
    cluster_view = tls_cluster.request("n1", "/admin/cluster")
    assert [row["reachable"] for row in cluster_view["nodes"]] == [True] * 3
    assert tls_cluster.status("n1")["ws_url"].startswith("wss://")


def test_ensyncctl_publishes_and_subscribes_over_wss_with_cacert(tls_cluster):
    """publish and subscribe verify the node with --cacert, like the admin calls."""
    publisher = tls_cluster.create_key("ctl-tls-pub", ["ctl/*"], [])
    consumer = tls_cluster.create_key("ctl-tls-sub", [], ["ctl/*"])
    urls = [f"--url={tls_cluster.admin_url(n)}" for n in tls_cluster.node_ids]
    env = {"ENSYNC_ADMIN_TOKEN": tls_cluster.admin_token}
    cacert = ["--cacert", str(tls_cluster.tls.ca)]

    published = run_ctl([*urls, *cacert, "publish", "ctl/hello", "--to",
                         consumer["app_id"], "--data", '{"n": 1}', "--key",
                         publisher["access_key"]], env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.startswith("published evt-")

    received = run_ctl([*urls, *cacert, "subscribe", "ctl/hello", "--count", "1",
                        "--ack", "--timeout-ms", "20000", "--key",
                        consumer["access_key"]], env)
    assert received.returncode == 0, received.stderr
    assert '{"n":1}' in received.stdout

    # Without the CA the same publish is refused, in one line.
    refused = run_ctl([*urls, "publish", "ctl/hello", "--to", consumer["app_id"],
                       "--data", "1", "--key", consumer["access_key"]], env)
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
