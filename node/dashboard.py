"""The web dashboard at ``/``: a login, cookie sessions, three static files, and
the two admin reads only the dashboard needs (``/admin/cluster``, ``/admin/queues``).

Login. A browser cannot attach a Bearer header to a page load, so ``POST /login``
trades the admin token for a cookie holding a random session id. The server keeps
only sha256(id) -> expiry, so a dict lookup cannot leak how much of an id matched,
and nothing on disk. The table is bounded (``LOGINS_MAX``): a new login past the
bound drops the oldest, and the count of drops is kept. Logins are not replicated:
a login on one node opens the dashboard of that node only, and a restart logs
everybody out. The cookie is HttpOnly (page scripts never see it) and
SameSite=Strict (another site cannot make the browser send it, which is what keeps
a cookie-authenticated ``POST /admin/...`` from being forged). It is not marked
Secure because the node serves plain HTTP; put TLS in front for anything but a
trusted network.

Cluster view. A node knows its peers' Raft addresses, not their HTTP ones, so
``--peer-http id=http://host:port,...`` names them; ``/admin/cluster`` asks each
for ``/admin/status`` with the admin token, in parallel, each bounded by
``PEER_STATUS_TIMEOUT_MS``. A peer without an address, or that does not answer, is
listed with an ``error`` and whatever Raft-level facts this node has (the leader's
match index for it). Lag is counted in entries against the leader's commit index.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import html
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from raft.machine import now_ms

log = logging.getLogger("ensync.dashboard")

LOGINS_MAX = 1000
LOGIN_TTL_MS = 12 * 3_600_000
LOGIN_FORM_BYTES_MAX = 4096
COOKIE_NAME = "ensync_dashboard"
PEER_STATUS_TIMEOUT_MS = 1000
QUEUES_LIMIT_DEFAULT = 100
QUEUES_LIMIT_MAX = 1000
QUEUES_OFFSET_MAX = 100_000

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# -- logins: pure bookkeeping, time passed in -------------------------------------


@dataclass(frozen=True)
class LoginStatistics:
    open: int
    opened_total: int
    dropped_total: int  # pushed out by newer logins past LOGINS_MAX


class Logins:
    """Open dashboard logins: sha256(session id) -> expiry ms, oldest first."""

    def __init__(self, ttl_ms: int = LOGIN_TTL_MS,
                 logins_max: int = LOGINS_MAX) -> None:
        assert ttl_ms > 0
        assert logins_max > 0

        self.ttl_ms = ttl_ms
        self.logins_max = logins_max
        self._expiry_ms: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._opened_total = 0
        self._dropped_total = 0

    def open(self, now: int) -> str:
        """A new session id, valid for ``ttl_ms`` from ``now``."""
        self._forget_expired(now)
        while len(self._expiry_ms) >= self.logins_max:
            self._expiry_ms.popitem(last=False)
            self._dropped_total += 1

        sid = secrets.token_urlsafe(32)
        self._expiry_ms[_digest(sid)] = now + self.ttl_ms
        self._opened_total += 1
        return sid

    def valid(self, sid: str | None, now: int) -> bool:
        if not sid:
            return False
        expiry = self._expiry_ms.get(_digest(sid))
        if expiry is None:
            return False
        if now >= expiry:
            del self._expiry_ms[_digest(sid)]
            return False
        return True

    def close(self, sid: str | None) -> None:
        if sid:
            self._expiry_ms.pop(_digest(sid), None)

    def _forget_expired(self, now: int) -> None:
        # Every login lives equally long, so insertion order is expiry order.
        while self._expiry_ms:
            oldest = next(iter(self._expiry_ms.values()))
            if oldest > now:
                return
            self._expiry_ms.popitem(last=False)

    def statistics(self) -> LoginStatistics:
        return LoginStatistics(len(self._expiry_ms), self._opened_total,
                               self._dropped_total)


def _digest(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison; an empty configured token matches nothing."""
    if not token:
        return False
    # A header may carry any bytes; one that is not text is simply wrong.
    given_bytes = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given_bytes, token.encode())


# -- cluster view: pure helpers ----------------------------------------------------


def with_lag(nodes: list[dict], leader: str | None) -> list[dict]:
    """Add ``lag_entries`` (leader's commit index - node's applied index) to rows.

    Without a reachable leader the highest commit index seen stands in for it.
    """
    statuses = {n["id"]: n["status"] for n in nodes if n["status"] is not None}
    if leader in statuses:
        reference = statuses[leader]["commit_index"]
    elif statuses:
        reference = max(s["commit_index"] for s in statuses.values())
    else:
        reference = None

    for row in nodes:
        status = row["status"]
        if status is None or reference is None:
            row["lag_entries"] = None
        else:
            row["lag_entries"] = max(0, reference - status["applied_index"])
    return nodes


# -- the aiohttp side ------------------------------------------------------------------


class Dashboard:
    """Routes of the dashboard; one per app, holding the node and the logins."""

    def __init__(self, node) -> None:
        self.node = node
        self.logins = Logins()
        self.files = {name: (STATIC_DIR / name).read_bytes() for name in STATIC_FILES}
        self.page = (STATIC_DIR / "dashboard.html").read_bytes()
        self._client: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/admin/cluster", self.cluster)
        app.router.add_get("/admin/queues", self.queues)
        app.on_cleanup.append(self._close_client)

    def logged_in(self, request: web.Request) -> bool:
        return self.logins.valid(request.cookies.get(COOKIE_NAME), now_ms())

    # -- pages --------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        if not self.logged_in(request):
            return _login_page(self.node.id, "", 200)
        return web.Response(body=self.page, content_type="text/html",
                            charset="utf-8", headers=SECURITY_HEADERS)

    async def login(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > LOGIN_FORM_BYTES_MAX:
            return _login_page(self.node.id, "That is not the admin token.", 401)
        form = await request.post()
        given = form.get("token", "")
        if not isinstance(given, str) or not token_matches(given,
                                                           self.node.cfg.admin_token):
            log.info("dashboard login refused remote=%s", request.remote)
            return _login_page(self.node.id, "That is not the admin token.", 401)

        sid = self.logins.open(now_ms())
        log.info("dashboard login remote=%s open=%d", request.remote,
                 self.logins.statistics().open)
        response = _see_other("/")
        response.set_cookie(COOKIE_NAME, sid, max_age=self.logins.ttl_ms // 1000,
                            path="/", httponly=True, samesite="Strict")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.logins.close(request.cookies.get(COOKIE_NAME))
        response = _see_other("/")
        response.del_cookie(COOKIE_NAME, path="/")
        return response

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], content_type=STATIC_FILES[name],
                            charset="utf-8", headers=SECURITY_HEADERS)

    # -- admin reads (the auth middleware has let these through) --------------------

    async def queues(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", QUEUES_LIMIT_DEFAULT, 1, QUEUES_LIMIT_MAX)
        offset = _int_query(request, "offset", 0, 0, QUEUES_OFFSET_MAX)
        if limit is None or offset is None:
            return _json({"error": "INVALID_PARAMETER",
                          "message": "limit is a positive integer, offset is one "
                                     "or 0"}, 400)
        # ?app= (ensyncctl queues --app): a key name or an app id; the barrier
        # in read_fresh finds an app created through another node a moment ago.
        app = request.query.get("app")
        app_id = None if app is None else await self.node.read_fresh(
            self.node.app_id_of, app)
        if app is not None and app_id is None:
            return _json({"error": "NOT_FOUND", "message": "no such app"}, 404)
        rows, total = self.node.queues_view(limit, offset, app_id)
        return _json({"queues": rows, "total": total, "offset": offset})

    async def cluster(self, request: web.Request) -> web.Response:
        node = self.node
        own = node.status()
        leading = own["role"] == "leader"
        match = node.broker.follower_match() if leading else {}
        peer_ids = sorted(set(node.cfg.raft.peers) | set(node.cfg.peer_http))

        fetched = await asyncio.gather(*(self._peer_row(p) for p in peer_ids))
        rows = [{"id": node.id, "http_url": None, "reachable": True, "status": own}]
        rows += fetched
        for row in rows:
            if row["id"] in match:
                row["match_index"] = match[row["id"]]
        rows.sort(key=lambda r: r["id"])
        return _json({"id": node.id, "leader": own["leader"], "term": own["term"],
                      "nodes": with_lag(rows, own["leader"])})

    async def _peer_row(self, peer_id: str) -> dict:
        url = self.node.cfg.peer_http.get(peer_id)
        row = {"id": peer_id, "http_url": url, "reachable": False, "status": None,
               "raft_address": self.node.cfg.raft.peers.get(peer_id)}
        if url is None:
            row["error"] = "no HTTP address configured (--peer-http)"
            return row
        try:
            row["status"] = await self._fetch_status(url)
            row["reachable"] = True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            row["error"] = _short_error(exc)
        return row

    async def _fetch_status(self, url: str) -> dict:
        if self._client is None:
            timeout = aiohttp.ClientTimeout(total=PEER_STATUS_TIMEOUT_MS / 1000)
            self._client = aiohttp.ClientSession(timeout=timeout)
        headers = {"Authorization": f"Bearer {self.node.cfg.admin_token}"}
        async with self._client.get(url + "/admin/status", headers=headers,
                                    allow_redirects=False,
                                    ssl=self.node.cfg.tls_client or True) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            status = orjson.loads(await response.read())
        if not isinstance(status, dict) or "commit_index" not in status:
            raise ValueError("not a node status")
        return status

    async def _close_client(self, _app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()


def _short_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def _int_query(request: web.Request, name: str, default: int, low: int,
               high: int) -> int | None:
    """``?name=`` clamped to ``high``; None when it is not an integer >= ``low``."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return min(value, high) if value >= low else None


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location,
                                             "Cache-Control": "no-store"})


def _login_page(node_id: str, error: str, status: int) -> web.Response:
    notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _LOGIN_PAGE.format(node=html.escape(node_id), notice=notice)
    return web.Response(text=body, status=status, content_type="text/html",
                        headers=SECURITY_HEADERS)


_LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EnSync node {node}: sign in</title>
<link rel="stylesheet" href="/static/dashboard.css">
</head>
<body class="login">
<main>
<h1>EnSync node <code>{node}</code></h1>
<form id="login" method="post" action="/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password"
 required autofocus>
<button type="submit">Sign in</button>
{notice}
</form>
</main>
</body>
</html>
"""
