"""Every ensyncctl command against a real cluster, and the admin API's refusals.

Three parts. First an audit: a table naming, for each command the parser
holds, the test that runs it against real nodes as text and as `--json`; a
new command fails the audit until someone adds it and its tests. Then one
3-node cluster shared by the module: every `/admin` route, taken from the
router so a new route is covered without editing a list, must refuse a
request without the admin credential, and each command the older tests ran in
one form only runs here in both. Last, a cluster of its own with the node's
default election timeouts: kill the leader and time how long `status` takes
to show the new one.

The shared cluster dead-letters an event after one unacknowledged delivery
held for ACK_TIMEOUT_MS, so the `dlq` commands need no long waits. Every
ensyncctl run is a separate process, as an operator would run it, and every
wait has a deadline.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node.ctl import build_parser, command_tree
from node.dashboard import COOKIE_NAME
from node.http import build_app
from node.main import SETTINGS
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
ACK_TIMEOUT_MS = 1000
DELIVERY_LIMIT = 1
CTL_TIMEOUT_S = 60
HTTP_TIMEOUT_S = 5
APPLY_WAIT_S = 10
DEAD_WAIT_S = 10
FAILOVER_DEADLINE_S = 10
POLL_INTERVAL_S = 0.1
POLLS_MAX = 1000
ERROR_PREFIX = "ensyncctl: error: "
DEFAULTS = {name: default for name, _, default, _ in SETTINGS}

T = TypeVar("T")


# -- the audit: which test runs which command ---------------------------------

# Command -> form -> the test that runs it against real nodes, found by name in
# tests/. "text" is the plain run and "json" the run with --json.
COMMAND_TESTS: dict[tuple[str, ...], dict[str, str]] = {
    ("status",): {
        "text": "test_status_shows_a_killed_leader_unreachable_and_a_new_leader",
        "json": "test_status_shows_a_killed_leader_unreachable_and_a_new_leader",
        "watch text": "test_status_watch_with_count_prints_that_many_tables",
        "watch json": "test_status_watch_json_prints_one_view_per_line",
    },
    ("nodes",): {
        "text": "test_nodes_shows_each_nodes_role_and_addresses",
        "json": "test_nodes_shows_each_nodes_role_and_addresses",
    },
    ("apps",): {
        "text": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
        "json": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
    },
    ("keys", "create"): {
        "text": "test_keys_create_prints_the_credentials_and_list_shows_the_key",
        "json": "test_keys_create_json_prints_the_new_credentials",
    },
    ("keys", "list"): {
        "text": "test_keys_create_prints_the_credentials_and_list_shows_the_key",
        "json": "test_keys_create_prints_the_credentials_and_list_shows_the_key",
    },
    ("keys", "disable"): {
        "text": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
        "json": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
    },
    ("keys", "enable"): {
        "text": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
        "json": "test_disabled_key_is_refused_until_enabled_and_apps_says_so",
    },
    ("keys", "rotate"): {
        "text": "test_each_rotation_issues_a_key_that_works_and_retires_the_last",
        "json": "test_each_rotation_issues_a_key_that_works_and_retires_the_last",
    },
    ("sessions",): {
        "text": "test_consumer_with_a_record_in_flight_is_active_then_disconnected",
        "json": "test_consumer_with_a_record_in_flight_is_active_then_disconnected",
    },
    ("queues",): {
        "text": "test_queues_show_the_depth_of_an_app_nobody_consumes",
        "json": "test_queues_show_the_depth_of_an_app_nobody_consumes",
    },
    ("trace",): {
        "text": "test_dead_letters_are_listed_shown_and_requeued",
        "json": "test_dead_letters_are_listed_shown_and_requeued",
    },
    ("dlq", "list"): {
        "text": "test_dead_letters_are_listed_shown_and_requeued",
        "json": "test_dead_letters_are_listed_shown_and_requeued",
    },
    ("dlq", "show"): {
        "text": "test_dead_letters_are_listed_shown_and_requeued",
        "json": "test_dead_letters_are_listed_shown_and_requeued",
    },
    ("dlq", "requeue"): {
        "text": "test_dead_letters_are_listed_shown_and_requeued",
        "json": "test_dead_letters_are_listed_shown_and_requeued",
    },
    ("leader", "transfer"): {
        "text": "test_leader_step_down_and_transfer_say_who_leads_now",
        "json": "test_leader_step_down_and_transfer_say_who_leads_now",
    },
    ("leader", "step-down"): {
        "text": "test_leader_step_down_and_transfer_say_who_leads_now",
        "json": "test_step_down_hands_leadership_to_some_follower",
    },
    ("publish",): {
        "text": "test_publish_and_subscribe_print_one_line_per_event",
        "json": "test_ctl_publish_then_subscribe_round_trip",
    },
    ("subscribe",): {
        "text": "test_publish_and_subscribe_print_one_line_per_event",
        "json": "test_ctl_publish_then_subscribe_round_trip",
    },
    # Needs no cluster: it prints a script built from the parser.
    ("completion",): {"text": "test_completion_script_is_valid_bash"},
}


def test_every_command_has_a_real_cluster_test_for_text_and_json():
    leaves = {
        path: "--json" in words
        for path, words, nested in command_tree(build_parser())
        if path and not nested
    }

    assert set(COMMAND_TESTS) == set(leaves)
    for path, has_json in leaves.items():
        forms = COMMAND_TESTS[path]
        assert "text" in forms, path
        assert ("json" in forms) == has_json, path


def functions_defined_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {node.name for node in ast.walk(tree) if isinstance(node, kinds)}


def test_every_test_the_audit_names_is_defined_in_exactly_one_file():
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    defined = {path: functions_defined_in(path) for path in files}

    for forms in COMMAND_TESTS.values():
        for name in forms.values():
            homes = [path for path, names in defined.items() if name in names]
            assert len(homes) == 1, (name, homes)


# -- the shared cluster and how to run the tool --------------------------------


@pytest.fixture(scope="module")
def ctl_cluster(request, tmp_path_factory) -> Cluster:
    cluster = Cluster(
        3,
        base_dir=tmp_path_factory.mktemp("ctl-commands"),
        extra_flags=["--ack-timeout-ms", str(ACK_TIMEOUT_MS),
                     "--delivery-limit", str(DELIVERY_LIMIT)],
    )
    request.addfinalizer(cluster.stop)
    return cluster.start()


@pytest.fixture(scope="module")
def cluster_file(ctl_cluster, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ctl-commands-file") / "cluster.json"
    return ctl_cluster.write_cluster_file(path)


@pytest.fixture
def key(ctl_cluster, request) -> Callable[[str], dict[str, Any]]:
    """Creates a key named after the test (plus a suffix) that sends and takes all."""

    def make(suffix: str = "") -> dict[str, Any]:
        return ctl_cluster.create_key(f"{request.node.name[:40]}{suffix}", ["*"], ["*"])

    return make


def run_ctl(cluster_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "node.ctl", "--cluster", str(cluster_file), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=CTL_TIMEOUT_S,
        check=False)


def ctl_text(cluster_file: Path, *args: str) -> list[str]:
    """The lines a successful run prints; it must print nothing on stderr."""
    result = run_ctl(cluster_file, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def ctl_json(cluster_file: Path, *args: str) -> Any:
    return json.loads("\n".join(ctl_text(cluster_file, *args, "--json")))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    return lines[0]


def eventually(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """Call ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    for _ in range(POLLS_MAX):
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def row_of(lines: list[str], first: str) -> list[str]:
    """The whitespace-split table row whose first cell is ``first``."""
    rows = [line.split() for line in lines if line.split()[:1] == [first]]
    assert len(rows) == 1, (first, lines)
    return rows[0]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the admin API refuses requests without the credential --------------------

# A sample for each path parameter; a route with a new one needs an entry here.
PATH_SAMPLES = {"idem": "evt-0000-000000000001", "name": "nobody"}
# Bodies that would be acted on if the credential were accepted.
POST_BODIES = {
    "/admin/keys": {"name": "intruder", "send": ["*"], "receive": ["*"]},
    "/admin/leader/transfer": {"node": "n2"},
}


def admin_routes() -> list[tuple[str, str]]:
    """Every (method, path template) under /admin/ that the node's router holds."""
    app = build_app(types.SimpleNamespace())
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/admin/") and route.method != "HEAD":
            routes.add((route.method, path))
    return sorted(routes)


ADMIN_ROUTES = admin_routes()


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_SAMPLES[m.group(1)], template)


def bad_credentials(token: str) -> dict[str, dict[str, str]]:
    return {
        "missing": {},
        "wrong-bearer": {"Authorization": "Bearer wrong"},
        "empty-bearer": {"Authorization": "Bearer "},
        "token-without-bearer": {"Authorization": token},
        "made-up-cookie": {"Cookie": f"{COOKIE_NAME}=made-up"},
    }


def http_call(url: str, method: str, headers: dict[str, str],
              body: dict | None = None) -> tuple[int, dict]:
    """Status and JSON body of one request sent with exactly ``headers``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_route_list_holds_reads_and_writes_with_path_parameters():
    methods = {method for method, _ in ADMIN_ROUTES}
    templated = [path for _, path in ADMIN_ROUTES if "{" in path]

    assert methods == {"GET", "POST"}
    assert ("GET", "/admin/status") in ADMIN_ROUTES
    assert ("POST", "/admin/leader/step-down") in ADMIN_ROUTES
    assert templated, "no route with a path parameter: is the list complete?"
    for path in templated:
        assert "{" not in concrete(path), path


@pytest.mark.parametrize("credential", list(bad_credentials("")))
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES,
                         ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_route_answers_401_to_a_missing_or_wrong_credential(
        ctl_cluster, method, path, credential):
    headers = {**bad_credentials(ctl_cluster.admin_token)[credential],
               "Content-Type": "application/json"}
    body = POST_BODIES.get(path, {}) if method == "POST" else None
    url = ctl_cluster.admin_url("n1") + concrete(path)

    status, answer = http_call(url, method, headers, body)

    assert status == 401, answer
    assert answer == {"error": "UNAUTHORIZED", "message": "admin credential required"}


@pytest.mark.parametrize("path", [p for m, p in ADMIN_ROUTES if m == "GET"])
def test_admin_read_with_the_right_token_is_not_refused(ctl_cluster, path):
    # The other half of the check above: the 401 came from the credential.
    headers = {"Authorization": f"Bearer {ctl_cluster.admin_token}"}

    status, answer = http_call(ctl_cluster.admin_url("n1") + concrete(path), "GET",
                               headers)

    assert status in (200, 404), answer
    assert answer.get("error") != "UNAUTHORIZED"


def test_refused_writes_changed_nothing(ctl_cluster, cluster_file):
    names = [key["name"] for key in ctl_json(cluster_file, "keys", "list")["keys"]]

    assert "intruder" not in names


def test_ctl_with_a_wrong_token_fails_every_command_with_one_line(cluster_file):
    for args in (["status"], ["nodes"], ["apps"], ["keys", "list"], ["queues"],
                 ["keys", "disable", "x"], ["leader", "step-down"]):
        result = run_ctl(cluster_file, "--token", "wrong", *args)

        assert "rejected the admin token (HTTP 401)" in one_line_error(result), args


# -- status --watch, nodes -------------------------------------------------------


def test_status_watch_json_prints_one_view_per_line(ctl_cluster, cluster_file):
    lines = ctl_text(cluster_file, "status", "--watch", "--json", "--count", "2",
                     "--interval-ms", "100")

    assert len(lines) == 2
    for line in lines:
        view = json.loads(line)
        assert view["healthy"] is True
        assert [node["id"] for node in view["nodes"]] == ctl_cluster.node_ids
        leaders = [node["id"] for node in view["nodes"] if node["role"] == "leader"]
        assert leaders == [view["leader"]]


def test_nodes_shows_each_nodes_role_and_addresses(ctl_cluster, cluster_file):
    answer = ctl_json(cluster_file, "nodes")
    lines = ctl_text(cluster_file, "nodes")

    assert [node["id"] for node in answer["nodes"]] == ctl_cluster.node_ids
    for node in answer["nodes"]:
        where = ctl_cluster.nodes[node["id"]]
        assert node["reachable"] is True
        assert (node["admin_url"], node["ws_url"], node["raft_address"]) == (
            where.admin_url, where.ws_url, where.raft_address)
    assert [n["role"] for n in answer["nodes"]].count("leader") == 1
    assert answer["leader"] in ctl_cluster.node_ids

    assert lines[0].split() == ["node", "role", "admin", "url", "websocket", "url",
                                "raft", "address"]
    roles = []
    for node_id, where in ctl_cluster.nodes.items():
        row = row_of(lines[1:], node_id)
        roles.append(row[1])
        assert row[2:] == [where.admin_url, where.ws_url, where.raft_address]
    assert sorted(roles) == ["follower", "follower", "leader"]


# -- keys ------------------------------------------------------------------------


def publish_as(cluster_file: Path, access_key: str, to: str
               ) -> subprocess.CompletedProcess[str]:
    return run_ctl(cluster_file, "publish", "probe/key", "--to", to, "--data", "{}",
                   "--key", access_key)


def test_keys_create_prints_the_credentials_and_list_shows_the_key(cluster_file):
    lines = ctl_text(cluster_file, "keys", "create", "--name", "ctl-text",
                     "--send", "probe/*,b/*", "--receive", "probe/*")

    assert re.fullmatch(r"created key 'ctl-text' via n[123]", lines[0]), lines[0]
    fields = dict(line.rsplit(None, 1) for line in lines[1:6])
    assert fields["access key"].startswith("ensk_")
    assert len(base64.b64decode(fields["app id"], validate=True)) == 32
    assert len(base64.b64decode(fields["secret key"], validate=True)) == 64
    assert (fields["send"], fields["receive"]) == ("probe/*,b/*", "probe/*")
    assert lines[6] == "the secret key is shown only now; store it somewhere safe"
    assert len(lines) == 7
    assert publish_as(cluster_file, fields["access key"], "ctl-text").returncode == 0

    listing = ctl_json(cluster_file, "keys", "list")["keys"]
    entry = next(key for key in listing if key["name"] == "ctl-text")
    table = ctl_text(cluster_file, "keys", "list")

    assert entry["app_id"] == fields["app id"]
    assert (entry["send"], entry["receive"]) == (["probe/*", "b/*"], ["probe/*"])
    assert isinstance(entry["created_ms"], int)
    assert not {"access_key", "secret_key"} & set(entry), "the listing leaks a key"
    assert table[0].split() == ["name", "app", "id", "send", "receive", "created",
                                "(UTC)"]
    assert row_of(table[1:], "ctl-text")[:4] == [
        "ctl-text", fields["app id"], "probe/*,b/*", "probe/*"]
    assert [line.split()[0] for line in table[1:]] == sorted(k["name"] for k in listing)


def test_disabled_key_is_refused_until_enabled_and_apps_says_so(cluster_file, key):
    record = key()
    name = record["name"]

    def apps_row() -> list[str]:
        return row_of(ctl_text(cluster_file, "apps")[1:], name)

    disabled = ctl_json(cluster_file, "keys", "disable", name)
    refused = publish_as(cluster_file, record["access_key"], name)
    row = apps_row()

    assert disabled == {"name": name, "app_id": record["app_id"], "disabled": True}
    assert "refused the access key: UNAUTHORIZED" in one_line_error(refused)
    assert row[:6] == [name, record["app_id"], "*", "*", "0", "yes"]

    enabled = ctl_text(cluster_file, "keys", "enable", name)

    assert enabled == [f"key '{name}' enabled"]
    assert apps_row()[5] == "no"
    assert publish_as(cluster_file, record["access_key"], name).returncode == 0

    disabled_text = ctl_text(cluster_file, "keys", "disable", name)
    enabled_json = ctl_json(cluster_file, "keys", "enable", name)

    assert disabled_text == [f"key '{name}' disabled; its open connections were closed"]
    assert enabled_json == {"name": name, "app_id": record["app_id"], "disabled": False}
    app = next(a for a in ctl_json(cluster_file, "apps")["apps"] if a["name"] == name)
    assert (app["app_id"], app["disabled"]) == (record["app_id"], False)


def test_each_rotation_issues_a_key_that_works_and_retires_the_last(cluster_file,
                                                                   key):
    record = key()
    name = record["name"]

    lines = ctl_text(cluster_file, "keys", "rotate", name)
    fields = dict(line.rsplit(None, 1) for line in lines[1:3])
    rotated = ctl_json(cluster_file, "keys", "rotate", name)

    assert re.fullmatch(rf"rotated key '{re.escape(name)}' via n[123]", lines[0])
    assert fields["app id"] == record["app_id"]
    assert lines[3] == "the old access key no longer works; the secret key is unchanged"
    assert (rotated["name"], rotated["app_id"]) == (name, record["app_id"])
    keys = [record["access_key"], fields["access key"], rotated["access_key"]]
    assert len(set(keys)) == 3
    for retired in keys[:2]:
        refused = publish_as(cluster_file, retired, name)
        assert "refused the access key: UNAUTHORIZED" in one_line_error(refused)
    assert publish_as(cluster_file, keys[2], name).returncode == 0


# -- publish, subscribe, dead letters, trace -----------------------------------


def trace_in_state(cluster_file: Path, idem: str, state: str) -> dict | None:
    trace = ctl_json(cluster_file, "trace", idem)
    return trace if trace["state"] == state else None


def test_publish_and_subscribe_print_one_line_per_event(cluster_file, key):
    sender, receiver = key("-p"), key("-r")

    published = ctl_text(cluster_file, "publish", "order/placed", "--to",
                         receiver["name"], "--data", '{"order": 7}', "--count", "2",
                         "--key", sender["access_key"])
    received = ctl_text(cluster_file, "subscribe", "order/placed", "--count", "2",
                        "--ack", "--timeout-ms", "10000", "--key",
                        receiver["access_key"])

    assert len(published) == 2
    idems = [line.removeprefix("published ") for line in published]
    assert all(re.fullmatch(r"evt-[0-9a-f]+-[0-9a-f]+", idem) for idem in idems)
    assert received == [f'{idem}  order/placed  attempt=1  {{"order":7}}'
                        for idem in idems]
    for idem in idems:
        trace = eventually(lambda i=idem: trace_in_state(cluster_file, i, "acked"),
                           APPLY_WAIT_S, f"{idem} acked")
        assert (trace["name"], trace["to"]) == ("order/placed", receiver["app_id"])


def test_dead_letters_are_listed_shown_and_requeued(cluster_file, key):
    sender, sink = key("-p"), key("-s")
    idems = ctl_json(cluster_file, "publish", "dead/letter", "--to", sink["name"],
                     "--data", '{"poison": true}', "--count", "2", "--key",
                     sender["access_key"])["idems"]
    sent = '{"poison":true}'  # publish sends the JSON compacted
    # Taken without an ack. The first comes back after the ack timeout, which
    # lets the second out; that one comes back when the subscriber leaves (or
    # times out too). With a delivery limit of one, both are dead.
    ctl_text(cluster_file, "subscribe", "dead/letter", "--count", "2",
             "--timeout-ms", "10000", "--key", sink["access_key"])

    def dead_idems() -> set[str]:
        letters = ctl_json(cluster_file, "dlq", "list")["dead_letters"]
        return {letter["idem"] for letter in letters}

    eventually(lambda: set(idems) <= dead_idems(), DEAD_WAIT_S, "two dead letters")
    table = ctl_text(cluster_file, "dlq", "list")
    shown = ctl_text(cluster_file, "dlq", "show", idems[0])
    as_json = ctl_json(cluster_file, "dlq", "show", idems[1])

    assert table[0].split() == ["idem", "name", "to", "attempts", "dead", "since",
                                "(UTC)"]
    for idem in idems:
        assert row_of(table[1:], idem)[:4] == [idem, "dead/letter", sink["app_id"],
                                               "1"]
    assert shown[0] == f"{idems[0]}  dead/letter  state dead, attempts 1"
    assert shown[1:3] == [f"from {sender['app_id']}", f"to   {sink['app_id']}"]
    assert shown[3] == f"payload  {b64(sent)}"
    assert shown[-1].split()[2:] == ["dead-lettered", "attempts=1", "limit=1"]
    assert (as_json["idem"], as_json["state"], as_json["attempts"]) == (
        idems[1], "dead", 1)
    assert as_json["record"]["payload"] == b64(sent)
    assert [row["what"] for row in as_json["history"]][-1] == "dead-lettered"

    requeued_text = ctl_text(cluster_file, "dlq", "requeue", idems[0])
    requeued_json = ctl_json(cluster_file, "dlq", "requeue", idems[1])

    assert requeued_text == [f"requeued {idems[0]}"]
    assert requeued_json == {"idem": idems[1], "requeued": True}
    eventually(lambda: not set(idems) & dead_idems(), APPLY_WAIT_S,
               "the requeued events to leave the dead-letter queue")
    traced = ctl_json(cluster_file, "trace", idems[0])
    trace = ctl_text(cluster_file, "trace", idems[1])
    gone = run_ctl(cluster_file, "dlq", "show", idems[0])
    queues = ctl_json(cluster_file, "queues", "--app", sink["name"])["queues"]

    assert trace[0] == f"{idems[1]}  dead/letter  state pending, attempts 0"
    assert trace[-1].split()[2:] == ["requeued", "from", "the", "dead-letter",
                                     "queue", "by=admin"]
    assert (traced["state"], traced["attempts"]) == ("pending", 0)
    assert [row["what"] for row in traced["history"]] == [
        "published", "committed", "delivered", "timed out", "dead-lettered",
        "requeued from the dead-letter queue"]
    assert "404 NOT_FOUND" in one_line_error(gone)
    assert [(q["name"], q["pending"]) for q in queues] == [("dead/letter", 2)]


# -- leadership ------------------------------------------------------------------


def test_leader_step_down_and_transfer_say_who_leads_now(ctl_cluster, cluster_file):
    first = ctl_cluster.leader()

    stepped = ctl_text(cluster_file, "leader", "step-down")

    match = re.fullmatch(rf"(n[123]) leads now \(was {first}\)", stepped[0])
    assert match and len(stepped) == 1, stepped
    second = match.group(1)
    assert second != first
    assert ctl_cluster.leader() == second

    already_text = ctl_text(cluster_file, "leader", "transfer", second)
    already_json = ctl_json(cluster_file, "leader", "transfer", second)

    assert already_text == [f"{second} leads already"]
    assert already_json == {"leader": second, "previous": second, "moved": False}

    third = next(n for n in ctl_cluster.node_ids if n not in (first, second))
    moved = ctl_text(cluster_file, "leader", "transfer", third)

    assert moved == [f"{third} leads now (was {second})"]
    assert ctl_cluster.leader() == third


# -- failover: status after the leader is killed -------------------------------


def status_json(cluster_file: Path) -> tuple[int, dict]:
    result = run_ctl(cluster_file, "status", "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def node_in(view: dict, node_id: str) -> dict:
    return next(node for node in view["nodes"] if node["id"] == node_id)


def test_status_shows_a_killed_leader_unreachable_and_a_new_leader(
        cluster_factory, tmp_path):
    # The node's own defaults, so the time measured is the one operators see.
    cluster = cluster_factory(
        3,
        raft_min_timeout_ms=DEFAULTS["raft_min_timeout_ms"],
        raft_max_timeout_ms=DEFAULTS["raft_max_timeout_ms"],
    )
    killed = cluster.leader()
    cluster_file = cluster.write_cluster_file(tmp_path / "cluster.json")

    started = time.monotonic()
    cluster.kill(killed, signal.SIGKILL)
    views = []
    for _ in range(POLLS_MAX):
        code, view = status_json(cluster_file)
        views.append((code, view))
        if code == 0 and view["leader"] not in (None, killed):
            break
        assert time.monotonic() - started < FAILOVER_DEADLINE_S, views[-3:]
        time.sleep(POLL_INTERVAL_S)
    took_s = time.monotonic() - started
    table = run_ctl(cluster_file, "status")
    print(f"\nSIGKILL to leader {killed}; status showed {view['leader']} leading "
          f"{took_s:.1f} s later ({len(views)} polls)\n{table.stdout}")

    for _, seen in views:
        assert node_in(seen, killed)["role"] == "unreachable", seen
        assert node_in(seen, killed)["reachable"] is False, seen
        assert seen["leader"] != killed, seen
    new = view["leader"]
    assert view["healthy"] is True
    assert node_in(view, new)["role"] == "leader"
    assert sorted(n["role"] for n in view["nodes"]) == [
        "follower", "leader", "unreachable"]
    assert took_s < FAILOVER_DEADLINE_S

    lines = table.stdout.splitlines()
    assert table.returncode == 0, table.stdout + table.stderr
    assert row_of(lines[1:4], killed)[2:] == ["unreachable"] + ["-"] * 5 + ["no"]
    assert row_of(lines[1:4], new)[2] == "leader"
    assert lines[-1] == f"healthy: leader {new}, 2/3 nodes reachable, quorum ok"
