"""HTTP routes on the node port: the WebSocket endpoint, health, metrics, admin."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from node import admin, dashboard
from node.errors import BrokerError, Unavailable
from node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from node.metrics import NodeMetrics, ready_reason
from node.protocol import WS_MESSAGE_BYTES_MAX
from node.session import Connection
from raft import schema
from raft.machine import now_ms
from raft.state import DEAD

log = logging.getLogger("ensync.http")

ADMIN_BODY_BYTES_MAX = 64 * 1024
NODE_KEY = web.AppKey("node", object)
METRICS_KEY = web.AppKey("metrics", NodeMetrics)
DASHBOARD_KEY = web.AppKey("dashboard", dashboard.Dashboard)


def build_app(node) -> web.Application:
    app = web.Application(client_max_size=ADMIN_BODY_BYTES_MAX,
                          middlewares=[_admin_auth])
    app[NODE_KEY] = node
    app.router.add_get("/message", _websocket)
    app.router.add_get("//message", _websocket)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app[METRICS_KEY] = NodeMetrics(node)
    app.on_startup.append(_start_metrics)
    app.on_cleanup.append(_stop_metrics)
    app.router.add_get("/admin/status", _status)
    app.router.add_get("/admin/digest", _digest)
    app.router.add_get("/admin/keys", _list_keys)
    app.router.add_post("/admin/keys", _create_key)
    app.router.add_get("/admin/trace/{idem}", _trace)
    app.router.add_get("/admin/dlq", _list_dead_letters)
    app.router.add_get("/admin/dlq/{idem}", _show_dead_letter)
    app.router.add_post("/admin/dlq/{idem}/requeue", _requeue_dead_letter)
    app.router.add_get("/admin/sessions", _list_sessions)
    # The web dashboard: /, /login, /logout, /static/*, /admin/cluster, /admin/queues
    app[DASHBOARD_KEY] = dashboard.Dashboard(node)
    app[DASHBOARD_KEY].add_routes(app)
    # Operator actions: /admin/apps, /admin/keys/{name}/disable|enable|rotate,
    # /admin/leader/step-down|transfer, /admin/openapi.json (node/admin.py).
    admin.add_routes(app, node)
    return app


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def _error(code: str, message: str, status: int) -> web.Response:
    return _json({"error": code, "message": message}, status)


@web.middleware
async def _admin_auth(request: web.Request, handler):
    if request.path.startswith("/admin/") and not _admin_allowed(request):
        return _error("UNAUTHORIZED", "admin credential required", 401)
    try:
        return await handler(request)
    except Unavailable as exc:
        return _error(exc.code, exc.message, 503)
    except BrokerError as exc:
        return _error(exc.code, exc.message, 400)


def _admin_allowed(request: web.Request) -> bool:
    """The Bearer token, or a dashboard login cookie (node/dashboard.py)."""
    token = request.app[NODE_KEY].cfg.admin_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # The scheme is case-insensitive (RFC 9110, section 11.1).
    if scheme.lower() == "bearer" and dashboard.token_matches(given.strip(), token):
        return True
    return request.app[DASHBOARD_KEY].logged_in(request)


async def _websocket(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    # autoping off: the session answers pings itself, through the frame-rate
    # limit, so a ping flood is refused and closed like any other.
    ws = web.WebSocketResponse(heartbeat=node.cfg.ws_heartbeat_ms / 1000,
                               max_msg_size=WS_MESSAGE_BYTES_MAX, compress=False,
                               autoping=False)
    await ws.prepare(request)
    conn = Connection(node, ws, request.remote or "?", request.transport)
    await conn.run()
    return ws


async def _health(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.broker.journal().failed:
        return _json({"status": "failing", "id": node.id,
                      "reason": "journal write failed"}, 503)
    return _json({"status": "ok", "id": node.id})


async def _ready(request: web.Request) -> web.Response:
    """200 while this node is in a majority and caught up; see node/metrics.py."""
    node = request.app[NODE_KEY]
    reason = ready_reason(node.broker.statistics(), node.broker.journal().failed,
                          node.cfg.ready_lag_entries_max)
    if reason is not None:
        return _json({"ready": False, "id": node.id, "reason": reason}, 503)
    return _json({"ready": True, "id": node.id})


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[NODE_KEY].status())


async def _digest(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    with node.broker.lock:
        applied = node.broker.store.applied_index
        digest = node.broker.store.digest()
    return _json({"id": node.id, "applied_index": applied, "digest": digest})


async def _list_keys(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    with node.broker.lock:
        apps = dict(node.broker.state.apps)
    keys = [{"name": a["name"], "app_id": app_id, "send": a["send"],
             "receive": a["receive"], "created_ms": a["created_ms"],
             "expires_ms": a.get("expires_ms"), "expired": bool(a.get("expired"))}
            for app_id, a in sorted(apps.items(), key=lambda kv: kv[1]["name"])]
    return _json({"keys": keys})


async def _create_key(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    try:
        body = orjson.loads(await request.read())
        name, send, receive = body["name"], body["send"], body["receive"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _error("INVALID_PARAMETER", "body needs name, send and receive", 400)
    if not _valid_key_request(name, send, receive):
        return _error("INVALID_PARAMETER",
                      "name is 1-64 characters; send and receive are lists of "
                      "patterns", 400)

    expires_ms = admin.key_expiry_ms(body)
    if expires_ms is False:
        return _error("INVALID_PARAMETER", admin.KEY_EXPIRY_HELP, 400)

    material = node.create_key_material()
    op = {"op": "key_create", "name": name, "send": send, "receive": receive,
          "app_id": material["app_id"],
          "key_hash": schema.hash_access_key(material["access_key"])}
    if expires_ms:
        op["expires_ms"] = expires_ms
    try:
        await node.commit(op)
    except Unavailable:
        raise  # the middleware answers 503
    except BrokerError as exc:
        if exc.code == "NAME_TAKEN" and body.get("if_absent"):
            existing = node.app_record(_app_by_name(node, name))
            return _json({"name": name, "app_id": _app_by_name(node, name),
                          "send": existing["send"], "receive": existing["receive"],
                          "created": False})
        status = 409 if exc.code in ("NAME_TAKEN", "KEY_EXISTS") else 400
        return _error(exc.code, exc.message, status)
    log.info("key created name=%s expires_ms=%s", name, expires_ms)
    return _json({**material, "name": name, "send": send, "receive": receive,
                  "expires_ms": expires_ms, "created": True}, 201)


# -- delivery inspection: reads answer from this node's applied state -----------

DEAD_LETTERS_LIMIT_DEFAULT = 100
DEAD_LETTERS_LIMIT_MAX = 1000
SESSIONS_LIMIT_DEFAULT = 1000
SESSIONS_LIMIT_MAX = 10_000


def _not_found(what: str) -> web.Response:
    return _error("NOT_FOUND", what, 404)


def _limit_param(request: web.Request, default: int, most: int) -> int | None:
    """``?limit=`` clamped to ``most``; None when it is not a positive integer."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        return None
    return min(limit, most) if limit > 0 else None


async def _trace(request: web.Request) -> web.Response:
    trace = request.app[NODE_KEY].trace(request.match_info["idem"])
    if trace is None:
        return _not_found("no such event")
    return _json(trace)


async def _list_dead_letters(request: web.Request) -> web.Response:
    limit = _limit_param(request, DEAD_LETTERS_LIMIT_DEFAULT, DEAD_LETTERS_LIMIT_MAX)
    if limit is None:
        return _error("INVALID_PARAMETER", "limit is a positive integer", 400)
    rows, total = request.app[NODE_KEY].dead_letters(limit)
    return _json({"dead_letters": rows, "total": total})


async def _show_dead_letter(request: web.Request) -> web.Response:
    trace = request.app[NODE_KEY].trace(request.match_info["idem"], with_record=True)
    if trace is None or trace["state"] != DEAD:
        return _not_found("no such dead letter")
    return _json(trace)


async def _requeue_dead_letter(request: web.Request) -> web.Response:
    # No local check first: this node may lag, and apply decides anyway.
    parsed = schema.parse_idem(request.match_info["idem"])
    if parsed is None:
        return _not_found("no such dead letter")
    op = {"op": "dlq_requeue", "p": parsed[0], "off": parsed[1], "by": "admin"}
    try:
        result = await request.app[NODE_KEY].commit(op)
    except Unavailable:
        raise  # the middleware answers 503
    except BrokerError as exc:
        if exc.code == "NOT_FOUND":
            return _not_found("no such dead letter")
        raise
    log.info("dead letter requeued idem=%s", result["idem"])
    return _json({"idem": result["idem"], "requeued": True})


async def _list_sessions(request: web.Request) -> web.Response:
    limit = _limit_param(request, SESSIONS_LIMIT_DEFAULT, SESSIONS_LIMIT_MAX)
    if limit is None:
        return _error("INVALID_PARAMETER", "limit is a positive integer", 400)
    rows, total = request.app[NODE_KEY].sessions_view(now_ms(), limit)
    return _json({"sessions": rows, "total": total})


def _app_by_name(node, name: str) -> str | None:
    with node.broker.lock:
        return node.broker.state.app_names.get(name)


def _valid_key_request(name, send, receive) -> bool:
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        return False
    for patterns in (send, receive):
        if not isinstance(patterns, list) or len(patterns) > 64:
            return False
        if not all(isinstance(p, str) and 0 < len(p) <= 256 and ";" not in p
                   for p in patterns):
            return False
    return True


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _start_metrics(app: web.Application) -> None:
    app[METRICS_KEY].start()


async def _stop_metrics(app: web.Application) -> None:
    app[METRICS_KEY].stop()
