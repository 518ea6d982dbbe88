"""Operator routes of the admin API: apps, key actions, leadership, OpenAPI.

Reads answer from this node's applied state under the broker lock. Writes are
ops through Raft (``Node.commit``), so any node takes them; a key created a
moment ago through another node is found after one barrier (``read_fresh``).

Leadership is the exception. pysyncobj can only hand leadership on from the
leader, and a follower knows the leader's Raft address, not its HTTP one, so
it cannot forward the call. A follower answers ``409 NOT_LEADER`` with the
leader's id, and the caller (``ensyncctl leader``) asks that node instead.
Forwarding through ``--peer-http`` was rejected: it would make this route
depend on a setting that only the dashboard needs.

The auth middleware in ``node/http.py`` guards every route here. The queue
listing, ``GET /admin/queues``, is registered by ``node/dashboard.py`` and
served by ``Node.queues_view``, which holds the fields both callers need.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from node import openapi
from node.errors import BrokerError, NotLeader, Unavailable
from raft import schema
from raft.machine import now_ms

log = logging.getLogger("ensync.admin")

NODE = web.AppKey("admin_node", object)
_OPENAPI_BODY = orjson.dumps(openapi.DOCUMENT)


def add_routes(app: web.Application, node) -> None:
    app[NODE] = node
    app.router.add_get("/admin/apps", _list_apps)
    app.router.add_post("/admin/keys/{name}/disable", _disable_key)
    app.router.add_post("/admin/keys/{name}/enable", _enable_key)
    app.router.add_post("/admin/keys/{name}/rotate", _rotate_key)
    app.router.add_post("/admin/leader/step-down", _step_down)
    app.router.add_post("/admin/leader/transfer", _transfer_leader)
    app.router.add_get("/admin/openapi.json", _openapi)


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def _error(code: str, message: str, status: int, **fields) -> web.Response:
    return _json({"error": code, "message": message, **fields}, status)


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=_OPENAPI_BODY, content_type="application/json")


async def _list_apps(request: web.Request) -> web.Response:
    return _json({"apps": request.app[NODE].apps_view()})


# -- key actions ------------------------------------------------------------------


KEY_EXPIRY_HELP = ("expires_ms is a time in ms since the epoch and expires_in_ms a "
                   "positive duration in ms; give at most one")


def key_expiry_ms(body) -> int | None | bool:
    """A key's expiry from a request body: ``expires_ms`` (ms since the epoch)
    or ``expires_in_ms`` (from now, by this node's clock); None for none, False
    when the body gets it wrong."""
    if not isinstance(body, dict):
        return None
    at, within = body.get("expires_ms"), body.get("expires_in_ms")
    if at is not None and within is not None:
        return False
    for value in (at, within):
        if value is not None and (not isinstance(value, int)
                                  or isinstance(value, bool) or value <= 0):
            return False
    if within is not None:
        return now_ms() + within
    return at


async def _key_named(request: web.Request) -> tuple[str, str | None]:
    node = request.app[NODE]
    name = request.match_info["name"]
    return name, await node.read_fresh(_app_named, node, name)


def _app_named(node, name: str) -> str | None:
    with node.broker.lock:
        return node.broker.state.app_names.get(name)


async def _disable_key(request: web.Request) -> web.Response:
    return await _set_disabled(request, True)


async def _enable_key(request: web.Request) -> web.Response:
    return await _set_disabled(request, False)


async def _set_disabled(request: web.Request, disabled: bool) -> web.Response:
    """Apply closes the key's open sessions in the same step as disabling it."""
    name, app_id = await _key_named(request)
    if app_id is None:
        return _error("NOT_FOUND", "no such key", 404)

    op = {"op": "key_disable", "app_id": app_id, "disabled": disabled}
    failed = await _commit_key_op(request.app[NODE], op)
    if failed is not None:
        return failed
    log.info("key %s name=%s", "disabled" if disabled else "enabled", name)
    return _json({"name": name, "app_id": app_id, "disabled": disabled})


async def _rotate_key(request: web.Request) -> web.Response:
    """A new access key; the old one stops working and its sessions close.

    The app id and secret key stay, so recipients and decryption are unchanged.
    An optional JSON body gives the new key an expiry (``expires_ms`` or
    ``expires_in_ms``); without one the new key does not expire.
    """
    name, app_id = await _key_named(request)
    if app_id is None:
        return _error("NOT_FOUND", "no such key", 404)

    node = request.app[NODE]
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        body = False
    expires_ms = False if body is False else key_expiry_ms(body)
    if expires_ms is False:
        return _error("INVALID_PARAMETER", KEY_EXPIRY_HELP, 400)

    access_key = node.create_key_material()["access_key"]
    op = {"op": "key_rotate", "app_id": app_id,
          "key_hash": schema.hash_access_key(access_key)}
    if expires_ms:
        op["expires_ms"] = expires_ms
    failed = await _commit_key_op(node, op)
    if failed is not None:
        return failed
    log.info("key rotated name=%s expires_ms=%s", name, expires_ms)
    return _json({"name": name, "app_id": app_id, "access_key": access_key,
                  "expires_ms": expires_ms})


async def _commit_key_op(node, op: dict) -> web.Response | None:
    """None once committed; the error response otherwise (503 by the middleware)."""
    try:
        await node.commit(op)
    except Unavailable:
        raise
    except BrokerError as exc:
        status = {"NOT_FOUND": 404, "KEY_EXISTS": 409}.get(exc.code, 400)
        return _error(exc.code, exc.message, status)
    return None


# -- leadership -------------------------------------------------------------------


async def _step_down(request: web.Request) -> web.Response:
    return await _hand_over(request.app[NODE], None)


async def _transfer_leader(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    target = body.get("node") if isinstance(body, dict) else None
    if not isinstance(target, str):
        return _error("INVALID_PARAMETER", 'body needs {"node": id}', 400)
    if target != node.id and target not in node.cfg.raft.peers:
        return _error("NOT_FOUND", f"no node {target} in this cluster", 404)

    if target == node.id and node.broker._isLeader():
        return _json({"leader": node.id, "previous": node.id, "moved": False})
    return await _hand_over(node, target)


async def _hand_over(node, target: str | None) -> web.Response:
    try:
        leader = await node.transfer_leadership(target)
    except NotLeader as exc:
        return _error(exc.code, f"{node.id} does not lead; ask the leader",
                      409, leader=exc.leader)
    except Unavailable as exc:
        if exc.code != "TIMEOUT":
            raise
        return _error("TIMEOUT", exc.message, 504)

    if target is not None and leader != target:
        return _error("TRANSFER_DIVERTED", f"{leader} took over, not {target}",
                      409, leader=leader)
    return _json({"leader": leader, "previous": node.id, "moved": True})
