"""ensyncctl: inspect and administer a running EnSync Raft cluster.

The tool talks to each node's `/admin/*` HTTP API with the standard library
only, so it runs on any machine with Python and needs none of the node's
dependencies. Nodes come from the `cluster.json` that `./scripts/start-cluster`
writes, or from `--url` for a cluster started some other way.

`status` asks every node at once and folds the answers into one view. Nodes
speak for themselves, so the view has to settle disagreements: a node that
does not answer is `unreachable` whatever it last claimed, and when two nodes
claim leadership the one with the higher term wins while the other is shown as
a stale leader (it has not yet heard of the newer term). Lag is measured
against the highest commit index any reachable node reports.

Exit codes: 0 when the command did its work (for `status`: the cluster is
healthy), 1 when `status` found the cluster unhealthy (it still prints the
table, even with no node answering), and 2 for a failure of the world (no
cluster file, refused token, bad arguments, no node answering any other
command, an unknown event), which ends the command with one line on stderr.

`trace`, `dlq`, `sessions`, `apps` and `queues` read from the first node that
answers, which serves them from its own applied state; `dlq requeue` and the
`keys` actions are writes and go through Raft from whichever node takes them.
`leader transfer` must reach the leader: it asks the node the status view
names, and follows one `NOT_LEADER` answer to the leader that node names.
`publish` and `subscribe` speak the EnSync protocol and so need aiohttp
(`node/ctl_events.py`, imported only for them). `completion bash` prints a
script generated from the argument parser, so it never lists a stale command.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PROG = "ensyncctl"
CLUSTER_FILE_DEFAULT = "./.ensync/cluster.json"
TOKEN_ENV = "ENSYNC_ADMIN_TOKEN"
CACERT_ENV = "ENSYNC_CACERT"
UNTRUSTED_CERTIFICATE = "its TLS certificate is not trusted"
ACCESS_KEY_ENV = "ENSYNC_ACCESS_KEY"
DEMO_KEYS_FILE = "demo-keys.json"  # next to cluster.json
TIMEOUT_MS_DEFAULT = 2000
# Keys are created through Raft. Giving up before the node's own write
# timeout (10 s by default) could abandon a write that still lands.
WRITE_TIMEOUT_MS_MIN = 10_000
STATUS_THREADS_MAX = 32
ERROR_BODY_CHARS_MAX = 200
STATUS_KEYS_REQUIRED = ("term", "commit_index", "applied_index")
WATCH_INTERVAL_MS_DEFAULT = 2000
# status --watch without --count still ends after this many rounds.
WATCH_ROUNDS_MAX = 1_000_000
QUEUES_LIMIT_DEFAULT = 100
# The node answers at most this many dead letters per request (node/http.py).
DLQ_LIMIT_MAX = 1000
# The node waits up to 10 s for leadership to move; wait a little longer.
LEADER_TIMEOUT_MS_MIN = 15_000
# NOT_LEADER answers followed before giving up (leadership may move meanwhile).
LEADER_HOPS_MAX = 3
CLEAR_SCREEN = "\x1b[H\x1b[2J"

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell reports a piped-to-head death


class CtlError(Exception):
    """A failure of the world; main() prints it as one line and exits."""


class Unreachable(CtlError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url} is unreachable: {reason}")


class HttpFailure(CtlError):
    def __init__(
        self, url: str, status: int, code: str, detail: str, leader: str | None = None
    ) -> None:
        self.url = url
        self.status = status
        self.code = code
        self.detail = detail
        self.leader = leader  # named by a NOT_LEADER answer
        super().__init__(describe_http_failure(url, status, code, detail))


def describe_http_failure(url: str, status: int, code: str, detail: str) -> str:
    if status == 401:
        return f"{url} rejected the admin token (HTTP 401)"
    text = f"{url} answered HTTP {status}"
    if code:
        text += f" {code}"
    if detail:
        text += f": {detail}"
    return text


@dataclass(frozen=True)
class Target:
    """A node to ask: its id when a cluster file names it, and its admin URL."""

    node_id: str | None
    admin_url: str

    @property
    def address(self) -> str:
        return self.admin_url.split("://", 1)[-1]


@dataclass(frozen=True)
class Probe:
    """One node's answer to /admin/status, or why there was none."""

    target: Target
    status: dict[str, Any] | None
    error: str | None = None


# ---------------------------------------------------------------------------
# HTTP

# How https:// nodes are verified; main() sets it from --cacert. None: the
# system's CAs (and $SSL_CERT_FILE), hostname checked. Never unverified.
_tls_context: ssl.SSLContext | None = None


def configure_tls(cacert: str | None) -> None:
    """Trust the CA certificates in ``cacert`` (PEM) for https:// nodes."""
    global _tls_context
    if not cacert:
        _tls_context = None
        return
    try:
        _tls_context = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise CtlError(f"cannot load CA file {cacert}: {exc}") from exc


def request_json(
    url: str,
    token: str,
    timeout_ms: int,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")

    context = tls_context or _tls_context
    try:
        with urllib.request.urlopen(
            request, timeout=timeout_ms / 1000, context=context
        ) as response:
            return decode_json(url, response.read())
    except urllib.error.HTTPError as exc:
        raise http_failure(url, exc) from exc
    except urllib.error.URLError as exc:
        raise Unreachable(url, reason_text(exc.reason, timeout_ms)) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(url, reason_text(exc, timeout_ms)) from exc


def reason_text(reason: object, timeout_ms: int) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"{UNTRUSTED_CERTIFICATE} ({reason.verify_message}); "
            f"pass --cacert or set {CACERT_ENV}"
        )
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_ms} ms"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def decode_json(url: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CtlError(f"{url} answered with something that is not JSON") from exc
    if not isinstance(value, dict):
        raise CtlError(f"{url} answered with JSON that is not an object")
    return value


def http_failure(url: str, exc: urllib.error.HTTPError) -> HttpFailure:
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error", ""))
    detail = str(body.get("message", ""))[:ERROR_BODY_CHARS_MAX]
    leader = body.get("leader") if isinstance(body.get("leader"), str) else None
    return HttpFailure(url, exc.code, code, detail, leader)


# ---------------------------------------------------------------------------
# Finding the cluster


def resolve_targets(
    args: argparse.Namespace, token_required: bool = True
) -> tuple[list[Target], str]:
    """Nodes and token from --url/--token, the environment, or the cluster file.

    Without ``token_required`` a missing token comes back as "" (publish and
    subscribe need one only to look an app up by name).
    """
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is not None and not (token.isascii() and token.isprintable()):
        # It goes into an HTTP header, which takes neither newlines nor bytes
        # that are not ASCII; no token we issue holds any.
        raise CtlError("the admin token must be printable ASCII")
    if args.url:
        urls = split_urls(args.url)
        token = token or token_for_urls(args, urls)
        if not token and token_required:
            raise CtlError(f"no admin token: pass --token or set {TOKEN_ENV}")
        return [Target(None, url) for url in urls], token or ""

    path = cluster_path(args)
    cluster = load_cluster_file(path)
    targets = [Target(node["id"], node["admin_url"]) for node in cluster["nodes"]]
    token = token or cluster.get("admin_token")
    if not token and token_required:
        raise CtlError(f"{path} holds no admin_token; pass --token")
    return targets, token or ""


def cluster_path(args: argparse.Namespace) -> Path:
    """--cluster as given, else the nearest .ensync/cluster.json upwards.

    Searching the parents lets ensyncctl run from any directory of the
    checkout (docs/, tests/) as git does. Not found, it is ./.ensync/... as
    an absolute path, so the error names where it looked.
    """
    if "cluster" in getattr(args, "given", {"cluster"}):
        return Path(args.cluster).absolute()
    here = Path.cwd()
    for directory in (here, *here.parents):
        candidate = directory / CLUSTER_FILE_DEFAULT
        if candidate.is_file():
            return candidate
    return here / CLUSTER_FILE_DEFAULT


def token_for_urls(args: argparse.Namespace, urls: list[str]) -> str | None:
    """The cluster file's token, when the file lists every node --url names.

    Only then: the local cluster's token must not travel to a node of some
    other cluster that --url happens to name.
    """
    try:
        cluster = load_cluster_file(cluster_path(args))
    except CtlError:
        return None
    listed = {str(node["admin_url"]).rstrip("/") for node in cluster["nodes"]}
    token = cluster.get("admin_token")
    if isinstance(token, str) and set(urls) <= listed:
        return token
    return None


def load_cluster_file(path: Path) -> dict[str, Any]:
    try:
        cluster = json.loads(path.read_text())
    except FileNotFoundError:
        raise CtlError(
            f"cluster file {path} not found (nor in a parent directory); start "
            "a cluster with ./scripts/start-cluster, or pass --cluster or --url"
        ) from None
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read cluster file {path}: {exc}") from exc

    nodes = cluster.get("nodes") if isinstance(cluster, dict) else None
    if not nodes or not all(is_node_entry(node) for node in nodes):
        raise CtlError(f"cluster file {path} has no usable node list")
    return cluster


def is_node_entry(node: object) -> bool:
    return isinstance(node, dict) and "id" in node and "admin_url" in node


def split_urls(values: list[str]) -> list[str]:
    urls = [part.strip() for value in values for part in value.split(",")]
    urls = [normalize_url(url) for url in urls if url]
    if not urls:
        raise CtlError("--url names no node")
    return urls


def normalize_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise CtlError(f"--url {url}: only http:// and https:// are supported")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise CtlError(f"--url {url}: {exc}") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise CtlError(f"--url {url}: not a URL (want http://host:port)")
    return url.rstrip("/")


# ---------------------------------------------------------------------------
# status


def probe_all(targets: list[Target], token: str, timeout_ms: int) -> list[Probe]:
    threads = min(len(targets), STATUS_THREADS_MAX)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [
            pool.submit(probe_one, target, token, timeout_ms) for target in targets
        ]
        return [future.result() for future in futures]


def probe_one(target: Target, token: str, timeout_ms: int) -> Probe:
    url = target.admin_url + "/admin/status"
    try:
        status = request_json(url, token, timeout_ms)
    except Unreachable as exc:
        return Probe(target, None, exc.reason)
    except HttpFailure as exc:
        # A refused token is the operator's mistake, not a node being down.
        if exc.status in (401, 403):
            raise
        return Probe(target, None, str(exc))

    return checked_probe(target, status)


def checked_probe(target: Target, status: dict[str, Any]) -> Probe:
    missing = [
        key for key in STATUS_KEYS_REQUIRED if not isinstance(status.get(key), int)
    ]
    if status.get("role") is None or missing:
        return Probe(target, None, f"status answer lacks {missing or ['role']}")
    return Probe(target, status)


def learn_cluster(probes: list[Probe], token: str, timeout_ms: int) -> list[Probe]:
    """--url may name only some nodes: ask one that answers for the others.

    A node's ``/admin/cluster`` lists every node it knows with the status it
    fetched from it (``--peer-http``), so one URL is enough to see the whole
    cluster. Nodes it lists that --url did not name are added; a node that
    cannot be asked (an older node, or none answering) changes nothing.
    """
    known = {node_id(probe) for probe in probes if probe.status is not None}
    for probe in probes:
        if probe.status is None:
            continue
        try:
            url = probe.target.admin_url + "/admin/cluster"
            rows = request_json(url, token, timeout_ms).get("nodes")
        except HttpFailure as exc:
            if exc.status in (401, 403):
                raise
            continue
        except CtlError:
            continue
        if isinstance(rows, list):
            learned = [peer_probe(row) for row in rows
                       if isinstance(row, dict) and row.get("id") not in known]
            return sorted(probes + learned, key=node_id)
    return probes


def probe_cluster(args: argparse.Namespace, targets: list[Target],
                  token: str) -> list[Probe]:
    """Every node's status: those named, and with --url those they know."""
    probes = probe_all(targets, token, args.timeout_ms)
    if args.url:
        probes = learn_cluster(probes, token, args.timeout_ms)
    return probes


def peer_probe(row: dict[str, Any]) -> Probe:
    """A node as another node saw it (one row of /admin/cluster)."""
    where = row.get("http_url") or row.get("raft_address") or "?"
    target = Target(str(row["id"]), str(where))
    if not isinstance(row.get("status"), dict):
        return Probe(target, None, str(row.get("error") or "not reachable"))
    return checked_probe(target, dict(row["status"], id=row["id"]))


@dataclass(frozen=True)
class ClusterView:
    leader: str | None
    healthy: bool
    reachable: int
    total: int
    quorum_ok: bool
    rows: list[dict[str, Any]]
    notes: list[str]


def summarize(probes: list[Probe], trust_reports: bool = False) -> ClusterView:
    """Fold per-node answers into one view; pure, so tests can feed it fakes.

    With ``trust_reports`` (--url, which may name only part of the cluster)
    a leader that no probe reached still counts when a node that answered
    names it and reports a quorum: that node is in touch with it.
    """
    answered = [probe for probe in probes if probe.status is not None]
    leader = pick_leader(answered)
    commit_max = max((int(p.status["commit_index"]) for p in answered), default=0)
    rows = [node_row(probe, leader, commit_max) for probe in probes]

    quorum = len(probes) // 2 + 1
    quorum_ok = len(answered) >= quorum
    if leader is not None:
        quorum_ok = quorum_ok and bool(leader.status.get("has_quorum", True))
    leader_id = None if leader is None else node_id(leader)
    if leader is None and trust_reports:
        vouching = [p.status for p in answered
                    if p.status.get("leader") and p.status.get("has_quorum")]
        if vouching:
            leader_id, quorum_ok = str(vouching[0]["leader"]), True

    notes = [stale_leader_note(row, leader) for row in rows if row["stale_leader"]]
    # "unreachable" alone would hide a setup mistake the operator can fix.
    notes += [
        f"{row['id']}: {row['error']}"
        for row in rows
        if UNTRUSTED_CERTIFICATE in (row.get("error") or "")
    ]
    healthy = leader_id is not None and quorum_ok
    return ClusterView(
        leader_id, healthy, len(answered), len(probes), quorum_ok, rows, notes
    )


def pick_leader(answered: list[Probe]) -> Probe | None:
    claimants = [probe for probe in answered if probe.status.get("role") == "leader"]
    if not claimants:
        return None
    return max(claimants, key=leader_rank)


def leader_rank(probe: Probe) -> tuple[int, int, str]:
    status = probe.status
    return int(status["term"]), int(status["commit_index"]), node_id(probe)


def node_id(probe: Probe) -> str:
    if probe.status is not None and probe.status.get("id"):
        return str(probe.status["id"])
    return probe.target.node_id or probe.target.address


def node_row(probe: Probe, leader: Probe | None, commit_max: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": node_id(probe), "address": probe.target.address}
    if probe.status is None:
        fields = ("term", "commit_index", "applied_index", "lag", "clients")
        row.update(role="unreachable", reachable=False, stale_leader=False)
        row.update({field: None for field in fields}, error=probe.error)
        return row

    status = probe.status
    stale = status.get("role") == "leader" and probe is not leader
    row.update(
        role="follower" if stale else status.get("role"),
        reachable=True,
        stale_leader=stale,
        term=status.get("term"),
        commit_index=status.get("commit_index"),
        applied_index=status.get("applied_index"),
        lag=commit_max - int(status.get("applied_index", 0)),
        clients=status.get("clients"),
    )
    return row


def stale_leader_note(row: dict[str, Any], leader: Probe | None) -> str:
    assert leader is not None
    return (
        f"* {row['id']} still claims leader at term {row['term']}; "
        f"{node_id(leader)} leads at term {leader.status['term']}"
    )


STATUS_COLUMNS = (
    ("node", "id"),
    ("address", "address"),
    ("role", "role"),
    ("term", "term"),
    ("commit", "commit_index"),
    ("applied", "applied_index"),
    ("lag", "lag"),
    ("clients", "clients"),
    ("reachable", "reachable"),
)


def render_status(view: ClusterView) -> str:
    headers = [title for title, _ in STATUS_COLUMNS]
    rows = [status_cells(row) for row in view.rows]
    lines = [render_table(headers, rows), *view.notes, health_line(view)]
    return "\n".join(lines)


def status_cells(row: dict[str, Any]) -> list[str]:
    cells = [cell_text(row[key]) for _, key in STATUS_COLUMNS]
    if row["stale_leader"]:
        cells[2] += "*"
    return cells


def cell_text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart; pure text in, text out."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
        for line in lines
    )


def health_line(view: ClusterView) -> str:
    """One line: the verdict first, then why.

    Without a leader "quorum ok" would read as reassurance, so that case says
    instead that an election may be under way when a majority answers.
    """
    verdict = "healthy" if view.healthy else "unhealthy"
    reach = f"{view.reachable}/{view.total} nodes reachable"
    if view.leader is None and view.quorum_ok:
        return f"{verdict}: no leader (election in progress?), {reach}"
    leader = f"leader {view.leader}" if view.leader else "no leader"
    quorum = "quorum ok" if view.quorum_ok else "no quorum"
    return f"{verdict}: {leader}, {reach}, {quorum}"


def status_json(view: ClusterView) -> dict[str, Any]:
    keys = ("id", "address", "role", "reachable", "term", "commit_index")
    keys += ("applied_index", "lag", "clients")
    nodes = []
    for row in view.rows:
        node = {key: row[key] for key in keys}
        if row["stale_leader"]:
            node["stale_leader"] = True
        if row.get("error"):
            node["error"] = row["error"]
        nodes.append(node)
    return {"leader": view.leader, "healthy": view.healthy, "nodes": nodes}


def cmd_status(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)
    if not args.watch:
        return show_status(args, targets, token)
    return watch_status(args, targets, token)


def show_status(
    args: argparse.Namespace, targets: list[Target], token: str, watching: bool = False
) -> int:
    probes = probe_cluster(args, targets, token)
    view = summarize(probes, trust_reports=bool(args.url))
    if args.json:
        # Watching, one document per line (JSON Lines) so a reader can follow.
        print(json.dumps(status_json(view), indent=None if watching else 2))
    elif watching and sys.stdout.isatty():
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        every = f"every {args.interval_ms} ms, Ctrl-C stops"
        print(f"{CLEAR_SCREEN}{stamp} UTC ({every})\n{render_status(view)}")
    else:
        print(render_status(view) + ("\n" if watching else ""))
    sys.stdout.flush()
    return EXIT_HEALTHY if view.healthy else EXIT_UNHEALTHY


def watch_status(args: argparse.Namespace, targets: list[Target], token: str) -> int:
    """Redraw every --interval-ms; --count rounds, or until Ctrl-C."""
    code = EXIT_HEALTHY
    try:
        for done in range(args.count or WATCH_ROUNDS_MAX):
            if done:
                time.sleep(args.interval_ms / 1000)
            code = show_status(args, targets, token, watching=True)
    except KeyboardInterrupt:
        pass  # the usual way to stop watching; exit with the last verdict
    return code


# ---------------------------------------------------------------------------
# keys


def first_answer(
    targets: list[Target], call: Callable[[Target], dict[str, Any]]
) -> tuple[Target, dict[str, Any]]:
    """Run `call` against the first node that answers at all."""
    failures = []
    for target in targets:
        try:
            return target, call(target)
        except Unreachable as exc:
            failures.append(f"{target.node_id or target.address} ({exc.reason})")
    raise CtlError("no node reachable: " + ", ".join(failures))


def split_patterns(values: list[str], flag: str) -> list[str]:
    patterns = [part.strip() for value in values for part in value.split(",")]
    patterns = [pattern for pattern in patterns if pattern]
    if not patterns:
        raise CtlError(f"{flag} needs at least one pattern")
    return patterns


def cmd_keys_create(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)
    body = {
        "name": args.name,
        "send": split_patterns(args.send, "--send"),
        "receive": split_patterns(args.receive, "--receive"),
    }
    if args.expires_in_ms is not None:
        body["expires_in_ms"] = args.expires_in_ms
    timeout_ms = max(args.timeout_ms, WRITE_TIMEOUT_MS_MIN)

    def create(target: Target) -> dict[str, Any]:
        url = target.admin_url + "/admin/keys"
        return request_json(url, token, timeout_ms, "POST", body)

    try:
        target, record = first_answer(targets, create)
    except HttpFailure as exc:
        if exc.status != 503:
            raise
        raise CtlError(f"{exc}; {unknown_create_advice(args.name)}") from exc
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(render_created_key(record, target))
    return EXIT_HEALTHY


def unknown_create_advice(name: str) -> str:
    """What to do after a create whose outcome is unknown (503).

    The key may still commit, and its secret was shown to nobody; the cluster
    cannot show it again (it keeps only the public half), so such a key is of
    no use and must not be mistaken for a working one.
    """
    # TODO(#6): `keys delete NAME`, so the name can be reused; until then a
    # key created blind is disabled and the key made again under a new name.
    return (f"the key may exist even so, with a secret nobody saw: run "
            f"`ensyncctl keys list`; if {name!r} is not there, create it again; "
            f"if it is, run `ensyncctl keys disable {name}` and create the key "
            "under another name")


def render_created_key(record: dict[str, Any], target: Target) -> str:
    extra = [
        ["secret key", str(record.get("secret_key", "-"))],
        ["send", ",".join(record.get("send", []))],
        ["receive", ",".join(record.get("receive", []))],
    ]
    return render_key(record, target, "created", extra,
                      "the secret key is shown only now; store it somewhere safe")


def render_key(record: dict[str, Any], target: Target, verb: str,
               extra: list[list[str]], footer: str) -> str:
    """A created or rotated key: access key, app id, ``extra`` rows, expiry."""
    where = target.node_id or target.address
    rows = [
        ["access key", str(record.get("access_key", "-"))],
        ["app id", str(record.get("app_id", "-"))],
        *extra,
    ]
    if record.get("expires_ms"):
        rows.append(["expires", format_ms(record["expires_ms"]) + " UTC"])
    lines = [f"{verb} key {record.get('name', '?')!r} via {where}"]
    lines += ["  ".join((label.ljust(10), value)) for label, value in rows]
    lines.append(footer)
    return "\n".join(lines)


def cmd_keys_list(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)

    def fetch(target: Target) -> dict[str, Any]:
        return request_json(target.admin_url + "/admin/keys", token, args.timeout_ms)

    _, answer = first_answer(targets, fetch)
    keys = answer.get("keys", [])
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render_keys(keys))
    return EXIT_HEALTHY


def render_keys(keys: list[dict[str, Any]]) -> str:
    headers = ["name", "app id", "send", "receive", "created (UTC)"]
    rows = [
        [
            str(key.get("name", "-")),
            str(key.get("app_id", "-")),
            ",".join(key.get("send", [])),
            ",".join(key.get("receive", [])),
            format_ms(key.get("created_ms")),
        ]
        for key in keys
    ]
    # The expiry column shows only when some key has one.
    if any(key.get("expires_ms") for key in keys):
        headers.append("expires (UTC)")
        for row, key in zip(rows, keys):
            row.append(format_ms(key.get("expires_ms"))
                       + (" expired" if key.get("expired") else ""))
    return render_table(headers, rows) if rows else "no keys"


def format_ms(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value / 1000))


# ---------------------------------------------------------------------------
# Delivery inspection: trace, dlq, sessions
#
# Each asks the first node that answers. Nodes answer from their own applied
# state, so a node that lags may not know an event another node just took.


def event_path(prefix: str, idem: str, suffix: str = "") -> str:
    return f"{prefix}/{urllib.parse.quote(idem, safe='')}{suffix}"


def get_first(args: argparse.Namespace, path: str) -> dict[str, Any]:
    targets, token = resolve_targets(args)

    def fetch(target: Target) -> dict[str, Any]:
        return request_json(target.admin_url + path, token, args.timeout_ms)

    return first_answer(targets, fetch)[1]


def print_answer(args: argparse.Namespace, answer: dict[str, Any], text: str) -> None:
    print(json.dumps(answer, indent=2) if args.json else text)


def format_ms_precise(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    return f"{format_ms(value)}.{value % 1000:03d}"


def audit_details(row: dict[str, Any]) -> str:
    pairs = [(key, value) for key, value in row.items() if key not in ("what", "at")]
    return " ".join(f"{key}={value}" for key, value in pairs if value is not None)


def render_trace(trace: dict[str, Any]) -> str:
    """A header naming the event, then its audit trail as a timeline table."""
    lines = [
        f"{trace.get('idem', '?')}  {trace.get('name', '?')}  "
        f"state {trace.get('state', '?')}, attempts {trace.get('attempts', '?')}",
        f"from {trace.get('from', '?')}",
        f"to   {trace.get('to', '?')}",
    ]
    record = trace.get("record")
    if isinstance(record, dict):
        lines.append(f"payload  {record.get('payload', '')}")
        lines.append(f"metadata {json.dumps(record.get('metadata', {}))}")
    history = trace.get("history", [])
    rows = [
        [
            format_ms_precise(row.get("at")),
            str(row.get("what", "?")),
            audit_details(row),
        ]
        for row in history
    ]
    headers = ["time (UTC)", "what", "details"]
    lines.append(render_table(headers, rows) if rows else "no audit rows")
    return "\n".join(lines)


def cmd_trace(args: argparse.Namespace) -> int:
    trace = get_first(args, event_path("/admin/trace", args.idem))
    print_answer(args, trace, render_trace(trace))
    return EXIT_HEALTHY


def cmd_dlq_list(args: argparse.Namespace) -> int:
    answer = get_first(args, f"/admin/dlq?limit={args.limit}")
    print_answer(args, answer, render_dead_letters(answer))
    return EXIT_HEALTHY


def render_dead_letters(answer: dict[str, Any]) -> str:
    letters = answer.get("dead_letters", [])
    if not letters:
        return "no dead letters"
    headers = ["idem", "name", "to", "attempts", "dead since (UTC)"]
    rows = [
        [
            str(letter.get("idem", "-")),
            str(letter.get("name", "-")),
            str(letter.get("to", "-")),
            cell_text(letter.get("attempts")),
            format_ms_precise(letter.get("dead_since_ms")),
        ]
        for letter in letters
    ]
    lines = [render_table(headers, rows)]
    total = answer.get("total", len(letters))
    if isinstance(total, int) and total > len(letters):
        lines.append(f"showing {len(letters)} of {total}; raise --limit for more")
    return "\n".join(lines)


def cmd_dlq_show(args: argparse.Namespace) -> int:
    trace = get_first(args, event_path("/admin/dlq", args.idem))
    print_answer(args, trace, render_trace(trace))
    return EXIT_HEALTHY


def cmd_dlq_requeue(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)
    path = event_path("/admin/dlq", args.idem, "/requeue")
    timeout_ms = max(args.timeout_ms, WRITE_TIMEOUT_MS_MIN)

    def requeue(target: Target) -> dict[str, Any]:
        return request_json(target.admin_url + path, token, timeout_ms, "POST", {})

    _, answer = first_answer(targets, requeue)
    print_answer(args, answer, f"requeued {answer.get('idem', args.idem)}")
    return EXIT_HEALTHY


SESSION_COLUMNS = ("client id", "app", "node", "status", "in flight", "opened (UTC)")
SESSION_COLUMNS += ("last active (UTC)", "closed (UTC)", "reason")


def session_cells(session: dict[str, Any]) -> list[str]:
    app = session.get("app_name") or session.get("app")
    return [
        str(session.get("client_id", "-")),
        cell_text(app),
        cell_text(session.get("node")),
        cell_text(session.get("status")),
        cell_text(session.get("in_flight")),
        format_ms(session.get("opened_ms")),
        format_ms(session.get("last_active_ms")),
        format_ms(session.get("closed_ms")),
        cell_text(session.get("reason")),
    ]


def render_sessions(answer: dict[str, Any]) -> str:
    sessions = answer.get("sessions", [])
    if not sessions:
        return "no sessions"
    rows = [session_cells(session) for session in sessions]
    return render_table(list(SESSION_COLUMNS), rows)


def cmd_sessions(args: argparse.Namespace) -> int:
    answer = get_first(args, "/admin/sessions")
    print_answer(args, answer, render_sessions(answer))
    return EXIT_HEALTHY


# ---------------------------------------------------------------------------
# nodes, apps, queues


def cmd_nodes(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)
    probes = probe_cluster(args, targets, token)
    view = summarize(probes, trust_reports=bool(args.url))
    nodes = [node_info(probe, row) for probe, row in zip(probes, view.rows)]
    print_answer(args, {"leader": view.leader, "nodes": nodes}, render_nodes(nodes))
    return EXIT_HEALTHY


def node_info(probe: Probe, row: dict[str, Any]) -> dict[str, Any]:
    """Where a node is: from its own answer, else from the cluster file."""
    status = probe.status or {}
    info = {
        "id": row["id"],
        "role": row["role"],
        "admin_url": probe.target.admin_url,
        "ws_url": status.get("ws_url"),
        "raft_address": status.get("raft_address"),
        "reachable": row["reachable"],
    }
    if row.get("error"):
        info["error"] = row["error"]
    return info


def render_nodes(nodes: list[dict[str, Any]]) -> str:
    headers = ["node", "role", "admin url", "websocket url", "raft address"]
    keys = ("id", "role", "admin_url", "ws_url", "raft_address")
    rows = [[cell_text(node.get(key)) for key in keys] for node in nodes]
    return render_table(headers, rows)


def cmd_apps(args: argparse.Namespace) -> int:
    answer = get_first(args, "/admin/apps")
    print_answer(args, answer, render_apps(answer.get("apps", [])))
    return EXIT_HEALTHY


def render_apps(apps: list[dict[str, Any]]) -> str:
    if not apps:
        return "no apps"
    headers = ["name", "app id", "send", "receive", "sessions", "disabled"]
    headers.append("created (UTC)")
    rows = [
        [
            str(app.get("name", "-")),
            str(app.get("app_id", "-")),
            ",".join(app.get("send", [])),
            ",".join(app.get("receive", [])),
            cell_text(app.get("sessions")),
            cell_text(app.get("disabled")),
            format_ms(app.get("created_ms")),
        ]
        for app in apps
    ]
    return render_table(headers, rows)


def cmd_queues(args: argparse.Namespace) -> int:
    query = {"limit": args.limit}
    if args.app:
        query["app"] = args.app
    answer = get_first(args, "/admin/queues?" + urllib.parse.urlencode(query))
    print_answer(args, answer, render_queues(answer))
    return EXIT_HEALTHY


QUEUE_COLUMNS = ("app", "queue", "pending", "in flight", "oldest", "delivered/s")


def render_queues(answer: dict[str, Any]) -> str:
    queues = answer.get("queues", [])
    if not queues:
        return "no queues"
    rows = [
        [
            cell_text(queue.get("app_name") or queue.get("app_id")),
            str(queue.get("name", "-")),
            cell_text(queue.get("pending")),
            cell_text(queue.get("in_flight")),
            format_age_ms(queue.get("oldest_age_ms")),
            cell_text(queue.get("delivered_per_s")),
        ]
        for queue in queues
    ]
    lines = [render_table(list(QUEUE_COLUMNS), rows)]
    total = answer.get("total", len(queues))
    if isinstance(total, int) and total > len(queues):
        lines.append(f"showing {len(queues)} of {total}; raise --limit for more")
    return "\n".join(lines)


def format_age_ms(value: object) -> str:
    """A short age: 850ms, 42s, 17m, 5h, 3d."""
    if not isinstance(value, int):
        return "-"
    for unit, size_ms in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if value >= 2 * size_ms:
            return f"{value // size_ms}{unit}"
    return f"{value // 1000}s" if value >= 1000 else f"{value}ms"


# ---------------------------------------------------------------------------
# keys disable, enable, rotate


def cmd_keys_action(args: argparse.Namespace) -> int:
    targets, token = resolve_targets(args)
    action = args.keys_command
    path = f"/admin/keys/{urllib.parse.quote(args.name, safe='')}/{action}"
    timeout_ms = max(args.timeout_ms, WRITE_TIMEOUT_MS_MIN)

    body: dict[str, Any] = {}
    if getattr(args, "expires_in_ms", None) is not None:
        body["expires_in_ms"] = args.expires_in_ms

    def act(target: Target) -> dict[str, Any]:
        return request_json(target.admin_url + path, token, timeout_ms, "POST", body)

    target, answer = first_answer(targets, act)
    if action == "rotate":
        text = render_rotated_key(answer, target)
    else:
        text = f"key {args.name!r} {action}d"
        if action == "disable":
            text += "; its open connections were closed"
    print_answer(args, answer, text)
    return EXIT_HEALTHY


def render_rotated_key(record: dict[str, Any], target: Target) -> str:
    return render_key(record, target, "rotated", [],
                      "the old access key no longer works; the secret key is unchanged")


# ---------------------------------------------------------------------------
# leader


def cmd_leader(args: argparse.Namespace) -> int:
    """Ask the leader to hand over; follow NOT_LEADER to the node it names."""
    targets, token = resolve_targets(args)
    probes = probe_cluster(args, targets, token)
    urls = {node_id(p): p.target.admin_url for p in probes
            if "://" in p.target.admin_url}
    urls.update({t.node_id: t.admin_url for t in targets if t.node_id})
    leader = summarize(probes, trust_reports=bool(args.url)).leader
    if leader is None:
        raise CtlError("no node leads right now; try again after the election")

    target = getattr(args, "node", None)
    path, body = "/admin/leader/step-down", {}
    if target is not None:
        path, body = "/admin/leader/transfer", {"node": target}
    answer = post_to_leader(urls, leader, path, body, token, args.timeout_ms)
    text = f"{answer.get('leader')} leads now (was {answer.get('previous')})"
    if answer.get("moved") is False:
        text = f"{answer.get('leader')} leads already"
    print_answer(args, answer, text)
    return EXIT_HEALTHY


def post_to_leader(
    urls: dict[str, str],
    leader: str,
    path: str,
    body: dict[str, Any],
    token: str,
    timeout_ms: int,
) -> dict[str, Any]:
    timeout_ms = max(timeout_ms, LEADER_TIMEOUT_MS_MIN)
    for _ in range(LEADER_HOPS_MAX):
        if leader not in urls:
            raise CtlError(f"the leader is {leader}, whose admin URL is unknown here")
        try:
            return request_json(urls[leader] + path, token, timeout_ms, "POST", body)
        except HttpFailure as exc:
            if exc.code != "NOT_LEADER" or not exc.leader or exc.leader == leader:
                raise
            leader = exc.leader
    raise CtlError(f"leadership kept moving; gave up after {LEADER_HOPS_MAX} tries")


# ---------------------------------------------------------------------------
# publish, subscribe (node/ctl_events.py, imported only here)


def load_events_module():
    try:
        from node import ctl_events
    except ImportError as exc:
        raise CtlError(
            f"publish and subscribe need aiohttp and orjson ({exc.name} is missing)"
        ) from exc
    return ctl_events


def ws_url_of(admin_url: str) -> str:
    scheme, rest = admin_url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "/message"


def access_key_of(args: argparse.Namespace) -> str:
    """--key, then $ENSYNC_ACCESS_KEY, then --as NAME from demo-keys.json."""
    if args.key:
        return args.key
    if args.as_name is None and os.environ.get(ACCESS_KEY_ENV):
        return os.environ[ACCESS_KEY_ENV]
    if args.as_name is None:
        raise CtlError(
            f"no access key: pass --key, set {ACCESS_KEY_ENV}, or --as NAME "
            f"for a key in {DEMO_KEYS_FILE} next to the cluster file"
        )
    path = cluster_path(args).parent / DEMO_KEYS_FILE
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read {path}: {exc}") from exc
    entry = keys.get(args.as_name) if isinstance(keys, dict) else None
    if not isinstance(entry, dict) or not entry.get("access_key"):
        raise CtlError(f"{path} holds no access key named {args.as_name!r}")
    return str(entry["access_key"])


def recipient_of(args: argparse.Namespace, targets: list[Target], token: str) -> str:
    """--to as an app id: a key name is looked up, anything else is taken as is."""
    if not token:
        return args.to

    def fetch(target: Target) -> dict[str, Any]:
        return request_json(target.admin_url + "/admin/apps", token, args.timeout_ms)

    apps = first_answer(targets, fetch)[1].get("apps", [])
    named = [app["app_id"] for app in apps if app.get("name") == args.to]
    return named[0] if named else args.to


def cmd_publish(args: argparse.Namespace) -> int:
    events = load_events_module()
    targets, token = resolve_targets(args, token_required=False)
    try:
        data = json.loads(read_data(args.data))
    except ValueError as exc:
        raise CtlError(f"--data is not JSON: {exc}") from exc
    access_key = access_key_of(args)
    to = recipient_of(args, targets, token)

    payload = events.encode_payload(json.dumps(data, separators=(",", ":")))
    urls = [ws_url_of(target.admin_url) for target in targets]
    timeout_ms = max(args.timeout_ms, WRITE_TIMEOUT_MS_MIN)
    try:
        idems = asyncio.run(events.publish(urls, access_key, args.name, to, payload,
                                           args.count, timeout_ms, _tls_context))
    except events.EventsError as exc:
        raise CtlError(str(exc)) from exc

    answer = {"name": args.name, "to": to, "idems": idems}
    print_answer(args, answer, "\n".join(f"published {idem}" for idem in idems))
    return EXIT_HEALTHY


def read_data(value: str) -> str:
    """--data as given, or from @FILE, or from stdin for -."""
    if value == "-":
        return sys.stdin.read()
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"--data {value}: cannot read the file: {exc}") from exc


def cmd_subscribe(args: argparse.Namespace) -> int:
    events = load_events_module()
    targets, _ = resolve_targets(args, token_required=False)
    access_key = access_key_of(args)
    # --timeout-ms bounds the whole wait here, and only when given.
    wait_ms = args.timeout_ms if "timeout_ms" in args.given else None
    sub = events.Subscription(args.name, args.count, wait_ms, args.ack)
    urls = [ws_url_of(target.admin_url) for target in targets]

    def show(record: dict[str, Any]) -> None:
        print(record_line(args, record, events.decode_payload), flush=True)

    try:
        asyncio.run(
            events.subscribe(urls, access_key, sub, WRITE_TIMEOUT_MS_MIN, show,
                             _tls_context)
        )
    except events.EventsError as exc:
        raise CtlError(str(exc)) from exc
    return EXIT_HEALTHY


def record_line(args: argparse.Namespace, record: dict[str, Any], decode) -> str:
    fields = {
        "idem": record.get("idem"),
        "name": record.get("name"),
        "attempt": record.get("attempt"),
        "payload": decode(str(record.get("payload", ""))),
    }
    if args.json:
        return json.dumps(fields)
    return "  ".join(
        [str(fields["idem"]), str(fields["name"]), f"attempt={fields['attempt']}",
         fields["payload"]]
    )


# ---------------------------------------------------------------------------
# Shell completion
#
# The script is generated from the parser itself, so a new command or flag is
# completed without anyone remembering to edit a second list.


def command_tree(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], list[str], bool]]:
    """(command path, words that may follow it, whether it takes subcommands)."""
    words: list[str] = []
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children += list(action.choices.items())
        elif action.option_strings:
            words += [o for o in action.option_strings if o.startswith("--")]
        elif action.choices:
            words += [str(choice) for choice in action.choices]
    words += [name for name, _ in children]
    tree = [(path, sorted(set(words)), bool(children))]
    for name, child in children:
        tree += command_tree(child, (*path, name))
    return tree


def options_with_values(parser: argparse.ArgumentParser) -> list[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.update(options_with_values(child))
        elif action.option_strings and action.nargs != 0:
            found.update(o for o in action.option_strings if o.startswith("--"))
    return sorted(found)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    valued = options_with_values(parser)
    cases = []
    for path, words, nested in command_tree(parser):
        joined = " ".join(path)
        # A command without subcommands keeps its flags after its arguments.
        pattern = f'"{joined}"' if nested or not path else f'"{joined}"|"{joined} "*'
        cases.append(f'        {pattern}) words="{" ".join(words)}" ;;')
    return BASH_TEMPLATE.format(
        prog=PROG,
        func="_" + PROG,
        valued="|".join(valued),
        opaque="|".join(option for option in valued if option != "--cluster"),
        cases="\n".join(cases),
    )


BASH_TEMPLATE = """\
# bash completion for {prog}; load with: source <({prog} completion bash)
{func}() {{
    local cur prev word path words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
        --cluster) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        {opaque}) COMPREPLY=(); return ;;
    esac
    path=""
    i=1
    while [ "$i" -lt "$COMP_CWORD" ]; do
        word="${{COMP_WORDS[i]}}"
        case "$word" in
            {valued}) i=$((i + 1)) ;;
            -*) ;;
            *) path="${{path:+$path }}$word" ;;
        esac
        i=$((i + 1))
    done
    words=""
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F {func} {prog} .venv/bin/{prog} ./.venv/bin/{prog}
"""


def cmd_completion(args: argparse.Namespace) -> int:
    print(bash_completion(build_parser()), end="")
    return EXIT_HEALTHY


# ---------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """Reports bad arguments as one line instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(EXIT_ERROR)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def limit_int(most: int) -> Callable[[str], int]:
    """A positive integer no larger than ``most`` (the node's own cap)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"at most {most}: {value}")
        return value

    return parse


def common_options() -> argparse.ArgumentParser:
    # SUPPRESS lets the options appear before or after the subcommand
    # without the subcommand's parser resetting values given earlier.
    common = argparse.ArgumentParser(add_help=False)
    hide = argparse.SUPPRESS
    common.add_argument(
        "--cluster", default=hide, help=f"cluster file [{CLUSTER_FILE_DEFAULT}]"
    )
    common.add_argument(
        "--url", action="append", default=hide, help="node admin URL (repeatable)"
    )
    common.add_argument("--token", default=hide, help=f"admin token [${TOKEN_ENV}]")
    common.add_argument(
        "--cacert",
        default=hide,
        metavar="PEM",
        help=f"CA file that https:// nodes are verified with [${CACERT_ENV}]",
    )
    common.add_argument(
        "--timeout-ms", type=positive_int, default=hide, help="per request"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = OneLineParser(
        prog=PROG, parents=[common], description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    status = commands.add_parser("status", parents=[common], help="cluster health")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument(
        "--interval-ms",
        type=positive_int,
        default=WATCH_INTERVAL_MS_DEFAULT,
        help=f"between redraws [{WATCH_INTERVAL_MS_DEFAULT}]",
    )
    status.add_argument(
        "--count", type=positive_int, help="with --watch: stop after N tables"
    )
    status.set_defaults(handler=cmd_status)

    keys = commands.add_parser("keys", parents=[common], help="access keys")
    key_commands = keys.add_subparsers(
        dest="keys_command", required=True, metavar="action"
    )
    create = key_commands.add_parser("create", parents=[common], help="create a key")
    create.add_argument("--name", required=True)
    create.add_argument("--send", action="append", required=True, metavar="PATTERN")
    create.add_argument("--receive", action="append", required=True, metavar="PATTERN")
    create.add_argument("--json", action="store_true")
    create.add_argument("--expires-in-ms", type=positive_int, metavar="MS",
                        help="the key expires this long after creation")
    create.set_defaults(handler=cmd_keys_create)

    listing = key_commands.add_parser("list", parents=[common], help="list keys")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_keys_list)

    for action, text in (
        ("disable", "refuse a key and close its connections"),
        ("enable", "accept a disabled key again"),
        ("rotate", "replace a key's access key"),
    ):
        command = key_commands.add_parser(action, parents=[common], help=text)
        command.add_argument("name", metavar="NAME")
        command.add_argument("--json", action="store_true")
        if action == "rotate":
            command.add_argument("--expires-in-ms", type=positive_int, metavar="MS",
                                 help="the new key expires this long after now")
        command.set_defaults(handler=cmd_keys_action)

    add_delivery_commands(commands, common)
    add_operator_commands(commands, common)
    add_event_commands(commands, common)
    completion = commands.add_parser(
        "completion", help="print a shell completion script"
    )
    completion.add_argument("shell", choices=["bash"])
    completion.set_defaults(handler=cmd_completion)
    return parser


def add_delivery_commands(commands, common: argparse.ArgumentParser) -> None:
    trace = commands.add_parser("trace", parents=[common], help="an event's history")
    trace.add_argument("idem", metavar="IDEM")
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(handler=cmd_trace)

    dlq = commands.add_parser("dlq", parents=[common], help="dead-letter queue")
    dlq_commands = dlq.add_subparsers(
        dest="dlq_command", required=True, metavar="action"
    )
    listing = dlq_commands.add_parser("list", parents=[common], help="dead letters")
    listing.add_argument("--limit", type=limit_int(DLQ_LIMIT_MAX), default=100,
                         help=f"at most {DLQ_LIMIT_MAX} [100]")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_dlq_list)

    show = dlq_commands.add_parser("show", parents=[common], help="one dead letter")
    show.add_argument("idem", metavar="IDEM")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_dlq_show)

    requeue = dlq_commands.add_parser(
        "requeue", parents=[common], help="deliver a dead letter again"
    )
    requeue.add_argument("idem", metavar="IDEM")
    requeue.add_argument("--json", action="store_true")
    requeue.set_defaults(handler=cmd_dlq_requeue)

    sessions = commands.add_parser("sessions", parents=[common], help="client sessions")
    sessions.add_argument("--json", action="store_true")
    sessions.set_defaults(handler=cmd_sessions)


def add_operator_commands(commands, common: argparse.ArgumentParser) -> None:
    nodes = commands.add_parser("nodes", parents=[common], help="where each node is")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(handler=cmd_nodes)

    apps = commands.add_parser("apps", parents=[common], help="apps and sessions")
    apps.add_argument("--json", action="store_true")
    apps.set_defaults(handler=cmd_apps)

    queues = commands.add_parser("queues", parents=[common], help="queue depths")
    queues.add_argument("--app", metavar="NAME", help="one app's queues")
    queues.add_argument(
        "--limit",
        type=positive_int,
        default=QUEUES_LIMIT_DEFAULT,
        help=f"[{QUEUES_LIMIT_DEFAULT}]",
    )
    queues.add_argument("--json", action="store_true")
    queues.set_defaults(handler=cmd_queues)

    leader = commands.add_parser("leader", parents=[common], help="Raft leadership")
    leader_commands = leader.add_subparsers(
        dest="leader_command", required=True, metavar="action"
    )
    transfer = leader_commands.add_parser(
        "transfer", parents=[common], help="hand leadership to NODE"
    )
    transfer.add_argument("node", metavar="NODE")
    step_down = leader_commands.add_parser(
        "step-down", parents=[common], help="hand leadership to any follower"
    )
    for command in (transfer, step_down):
        command.add_argument("--json", action="store_true")
        command.set_defaults(handler=cmd_leader)


def add_event_commands(commands, common: argparse.ArgumentParser) -> None:
    credentials = argparse.ArgumentParser(add_help=False)
    credentials.add_argument("--key", help=f"access key [${ACCESS_KEY_ENV}]")
    credentials.add_argument(
        "--as", dest="as_name", metavar="NAME", help=f"a key from {DEMO_KEYS_FILE}"
    )

    publish = commands.add_parser(
        "publish", parents=[common, credentials], help="publish an event"
    )
    publish.add_argument("name", metavar="NAME")
    publish.add_argument("--to", required=True, metavar="APP", help="name or id")
    publish.add_argument("--data", required=True, metavar="JSON",
                         help="the payload; @FILE reads a file, - stdin")
    publish.add_argument("--count", type=positive_int, default=1, help="[1]")
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(handler=cmd_publish)

    subscribe = commands.add_parser(
        "subscribe", parents=[common, credentials], help="print events as they come"
    )
    subscribe.add_argument("name", metavar="NAME")
    subscribe.add_argument("--count", type=positive_int, help="stop after N")
    subscribe.add_argument("--ack", action="store_true", help="acknowledge each")
    subscribe.add_argument("--json", action="store_true")
    subscribe.set_defaults(handler=cmd_subscribe)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = {
        "cluster": CLUSTER_FILE_DEFAULT,
        "url": None,
        "token": None,
        "cacert": None,
        "timeout_ms": TIMEOUT_MS_DEFAULT,
    }
    # Options given on the command line (subscribe reads --timeout-ms only then).
    args.given = {name for name in defaults if hasattr(args, name)}
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (ensyncctl status >&-)
        sys.stdout = open(os.devnull, "w")
    args = parse_args(argv)
    try:
        configure_tls(args.cacert or os.environ.get(CACERT_ENV))
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except CtlError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()
    except OSError as exc:  # stdout on a full disk, say
        fail(str(exc.strerror or exc).lower())


def quiet_broken_pipe() -> int:
    """The reader of stdout left (``ensyncctl sessions | head``): stop quietly.

    Whoever closed the pipe has what they wanted, so no message; the exit
    code is the shell's for a process killed by SIGPIPE. stdout is pointed at
    /dev/null so the flush at interpreter exit does not fail a second time.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
