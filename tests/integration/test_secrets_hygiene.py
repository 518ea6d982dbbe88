"""Secrets stay where they belong: never in logs, metrics, admin answers or ``ps``.

A cluster runs at DEBUG with a Raft secret. The test uses every secret the way
an operator or an app would (access keys in CONN, the app's secret key in the
SDK, the admin token in HTTP and in the dashboard login, a wrong token and a
wrong access key too), then looks for each one in every node log, every
``/metrics``, every admin GET answer, ``ensyncctl status``, the nodes' command
lines and every file of their data dirs. The only place a secret may appear is
the one answer that hands it out: key creation and rotation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from node.client import Client, ClientError
from tests import sdk
from tests.cluster import HTTP_TIMEOUT_MS, ROOT, Cluster

CTL_TIMEOUT_S = 30
WRONG_TOKEN = "wrong-admin-token-" + "q" * 20
WRONG_ACCESS_KEY = "ensk_not-a-key-of-this-cluster-" + "z" * 20
ADMIN_GETS = ("/admin/status", "/admin/digest", "/admin/keys", "/admin/apps",
              "/admin/sessions", "/admin/dlq", "/admin/cluster", "/admin/queues",
              "/admin/openapi.json", "/health", "/ready", "/metrics")


def http_get(url: str, token: str | None) -> str:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_MS / 1000) as resp:
            return resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace")


def dashboard_login(admin_url: str, token: str) -> str:
    body = urllib.parse.urlencode({"token": token}).encode()
    request = urllib.request.Request(admin_url + "/login", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_MS / 1000) as resp:
            return resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace")


def run_ctl(args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    done = subprocess.run([sys.executable, "-m", "node.ctl", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=CTL_TIMEOUT_S, check=False)
    return done.stdout + done.stderr


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def use_every_secret(cluster: Cluster, publisher: dict, consumer: dict) -> None:
    sub_client = await sdk.connect(cluster.ws_url("n2"), consumer)
    pub_client = await sdk.connect(cluster.ws_url("n1"), publisher)
    try:
        ws_sub, inbox = await sdk.subscribe(sub_client, "secret/event")
        await pub_client.publish("secret/event", [consumer["app_id"]], {"n": 1})
        await sdk.receive_and_ack(ws_sub, inbox, 1, timeout_s=30)
    finally:
        await pub_client.close()
        await sub_client.close()

    stranger = Client(cluster.ws_url("n3"))
    try:
        with pytest.raises(ClientError):
            await stranger.connect(WRONG_ACCESS_KEY)
    finally:
        await stranger.close()


async def test_no_secret_reaches_logs_metrics_admin_answers_ctl_or_ps(
        cluster_factory, tmp_path):
    cluster = cluster_factory(3, extra_flags=["--log-level", "DEBUG"])
    publisher = cluster.create_key("secret-publisher", ["secret/*"], [])
    consumer = cluster.create_key("secret-consumer", [], ["secret/*"])
    rotated = cluster.request(cluster.leader(), "/admin/keys/secret-publisher/rotate",
                              "POST", {}, 15_000)
    retired_access_key = publisher["access_key"]
    publisher = {**publisher, "access_key": rotated["access_key"]}
    await use_every_secret(cluster, publisher, consumer)

    secrets = {
        "admin token": cluster.admin_token,
        "cluster secret": cluster.cluster_secret,
        "cluster secret file": cluster.cluster_secret_file.read_text().strip(),
        "wrong admin token": WRONG_TOKEN,
        "wrong access key": WRONG_ACCESS_KEY,
        "rotated-out access key": retired_access_key,
    }
    for label, key in (("publisher", publisher), ("consumer", consumer)):
        secrets[f"{label} access key"] = key["access_key"]
        secrets[f"{label} secret key"] = key["secret_key"]
    assert all(secrets.values())

    seen: dict[str, str] = {}
    for node_id in cluster.node_ids:
        url = cluster.admin_url(node_id)
        dashboard_login(url, WRONG_TOKEN)
        dashboard_login(url, cluster.admin_token)
        http_get(url + "/admin/status", WRONG_TOKEN)
        for path in ADMIN_GETS:
            seen[f"{node_id} {path}"] = http_get(url + path, cluster.admin_token)
        seen[f"{node_id} ps"] = command_line(cluster.nodes[node_id].process.pid)

    cluster_file = cluster.write_cluster_file(tmp_path / "cluster.json")
    seen["ensyncctl status"] = run_ctl(["--cluster", str(cluster_file), "status"])
    seen["ensyncctl status --json"] = run_ctl(
        ["--cluster", str(cluster_file), "status", "--json"])
    seen["ensyncctl keys list"] = run_ctl(["--cluster", str(cluster_file), "keys",
                                           "list"])

    cluster.stop()  # flush and close every log and database before reading them
    for node_id in cluster.node_ids:
        text = cluster.nodes[node_id].log_file.read_text(errors="replace")
        assert "DEBUG" in text, "the nodes did not log at DEBUG"
        seen[f"{node_id} log"] = text
        # Keys are stored as hashes only: not in the journal, RocksDB or snapshot.
        for path in cluster.nodes[node_id].data_dir.rglob("*"):
            if path.is_file() and path.name != "node.log":
                seen[f"{node_id} {path.name}"] = path.read_bytes().decode("latin-1")

    leaks = [f"{label} in {where}" for label, secret in secrets.items()
             for where, text in seen.items() if secret in text]
    assert leaks == []
    # The search itself works: what is public is found where it belongs.
    assert all(consumer["app_id"] in seen[f"{n} /admin/keys"] for n in cluster.node_ids)
