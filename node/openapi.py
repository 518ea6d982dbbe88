"""The OpenAPI 3 description of ``/admin/*``, served at ``GET /admin/openapi.json``.

Built from a dict rather than a JSON file so that it ships with the package
like any module. ``tests/node/test_admin_api.py`` checks that every ``/admin``
route the aiohttp router holds is described here, with its method, so a new
route without a description fails the suite. docs/CONTRACT.md stays the prose
reference; this is for tools.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **props: Any) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


def _list_of(key: str, item: dict, **extra: Any) -> dict:
    return _obj((key,), **{key: {"type": "array", "items": item}}, **extra)


def _nullable(kind: str) -> dict:
    return {"type": [kind, "null"]}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
NUM = {"type": "number"}
STRS = {"type": "array", "items": STR}

ERRORS = {
    400: "bad parameter or body (INVALID_PARAMETER)",
    401: "no or wrong admin credential (UNAUTHORIZED)",
    404: "unknown key, app, node or event (NOT_FOUND)",
    409: "conflict; for leadership, NOT_LEADER names the leader",
    503: "no quorum, or the write did not commit in time (UNAVAILABLE)",
    504: "leadership did not move within 10 s (TIMEOUT)",
}


def _op(summary: str, ok: dict, *, errors: tuple[int, ...] = (),
        params: tuple[dict, ...] = (), body: dict | None = None,
        ok_status: int = 200, description: str = "") -> dict:
    responses = {str(ok_status): {"description": "OK",
                                  "content": {JSON: {"schema": ok}}}}
    for status in (401, *errors):
        responses[str(status)] = {"description": ERRORS[status],
                                  "content": {JSON: {"schema": _ref("Error")}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return op


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": STR,
            "description": description}


def _query(name: str, description: str, schema: dict = INT) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


IDEM = _path_param("idem", "event id, evt-<partition:04x>-<offset:012x>")
KEY_NAME = _path_param("name", "key name as given at creation (URL-quoted)")
LIMIT = "rows at most; larger values are clamped"

SCHEMAS = {
    "Error": _obj(("error",), error=STR, message=STR,
                  leader=_nullable("string")),
    "Status": _obj(
        ("id", "role", "term", "commit_index", "applied_index", "leader",
         "has_quorum", "clients"),
        id=STR, role={"enum": ["leader", "follower", "candidate"]}, term=INT,
        commit_index=INT, applied_index=INT, state_applied_index=INT,
        leader=_nullable("string"), has_quorum=BOOL, clients=INT, ws_url=STR,
        raft_address=STR, raft_peers_authenticated=BOOL, raft_partners=INT,
        raft_readonly_peers=INT, log_len=INT, publishes_total=INT,
        deliveries_total=INT, acks_total=INT),
    "Key": _obj(("name", "app_id", "send", "receive"), name=STR, app_id=STR,
                send=STRS, receive=STRS, created_ms=INT,
                expires_ms=_nullable("integer"), expired=BOOL),
    "NewKey": _obj(("name", "send", "receive"), name=STR, send=STRS, receive=STRS,
                   if_absent=BOOL, expires_ms=INT, expires_in_ms=INT),
    "CreatedKey": _obj(("name", "app_id", "send", "receive", "created"),
                       name=STR, app_id=STR, send=STRS, receive=STRS, created=BOOL,
                       access_key=STR, secret_key=STR,
                       expires_ms=_nullable("integer")),
    "KeyState": _obj(("name", "app_id", "disabled"), name=STR, app_id=STR,
                     disabled=BOOL),
    "RotatedKey": _obj(("name", "app_id", "access_key"), name=STR, app_id=STR,
                       access_key=STR, expires_ms=_nullable("integer")),
    "App": _obj(("app_id", "name", "send", "receive", "created_ms", "disabled",
                 "sessions"),
                app_id=STR, name=STR, send=STRS, receive=STRS, created_ms=INT,
                disabled=BOOL, sessions=INT, expires_ms=_nullable("integer"),
                expired=BOOL),
    "Queue": _obj(
        ("app_id", "app_name", "name", "pending", "in_flight", "oldest_age_ms",
         "delivered_per_s"),
        app_id=STR, app=STR, app_name=_nullable("string"), name=STR, pending=INT,
        in_flight=INT, oldest_age_ms=_nullable("integer"), delivered_per_s=NUM),
    "AuditRow": {"type": "object", "required": ["what", "at"],
                 "properties": {"what": STR, "at": INT},
                 "additionalProperties": True},
    "Trace": _obj(("idem", "name", "from", "to", "state", "attempts", "history"),
                  idem=STR, name=STR, to=STR, state=STR, attempts=INT,
                  history={"type": "array", "items": _ref("AuditRow")},
                  record={"type": "object"}, **{"from": STR}),
    "DeadLetter": _obj(("idem", "name", "to", "attempts"), idem=STR, name=STR,
                       to=STR, attempts=INT, dead_since_ms=INT),
    "Session": _obj(
        ("client_id", "app", "node", "status", "in_flight"),
        client_id=STR, app=STR, app_name=_nullable("string"), node=STR,
        status={"enum": ["active", "idle", "disconnected"]}, in_flight=INT,
        opened_ms=INT, last_active_ms=_nullable("integer"), closed_ms=INT,
        reason=STR),
    "ClusterNode": _obj(("id", "reachable", "status"), id=STR,
                        http_url=_nullable("string"), reachable=BOOL,
                        status={"oneOf": [_ref("Status"), {"type": "null"}]},
                        raft_address=_nullable("string"), error=STR,
                        match_index=INT, lag_entries=_nullable("integer")),
    "Leadership": _obj(("leader", "previous", "moved"), leader=STR, previous=STR,
                       moved=BOOL),
}

PATHS = {
    "/admin/status": {"get": _op("this node's Raft role and indexes",
                                 _ref("Status"))},
    "/admin/digest": {"get": _op(
        "sha256 over this node's replicated state",
        _obj(("id", "applied_index", "digest"), id=STR, applied_index=INT,
             digest=STR))},
    "/admin/keys": {
        "get": _op("every key, without secrets", _list_of("keys", _ref("Key"))),
        "post": _op("create a key through Raft; any node takes it",
                    _ref("CreatedKey"), ok_status=201, errors=(400, 409, 503),
                    body=_ref("NewKey"),
                    description="With if_absent and an existing name: 200 and "
                                "the existing record, without secrets. "
                                "expires_ms (ms since the epoch) or expires_in_ms "
                                "gives the key an expiry: then CONN fails with "
                                "UNAUTHORIZED and its sessions close."),
    },
    "/admin/keys/{name}/disable": {"post": _op(
        "disable a key; its open sessions close at once", _ref("KeyState"),
        params=(KEY_NAME,), errors=(404, 503))},
    "/admin/keys/{name}/enable": {"post": _op(
        "enable a disabled key", _ref("KeyState"), params=(KEY_NAME,),
        errors=(404, 503))},
    "/admin/keys/{name}/rotate": {"post": _op(
        "replace a key's access key", _ref("RotatedKey"), params=(KEY_NAME,),
        errors=(404, 409, 503),
        description="The old access key stops working and its sessions close; "
                    "the app id and the secret key stay. An optional JSON body "
                    "{expires_ms} or {expires_in_ms} gives the new key an "
                    "expiry; without one it does not expire.")},
    "/admin/apps": {"get": _op("every app (key) with its live session count",
                               _list_of("apps", _ref("App")))},
    "/admin/queues": {"get": _op(
        "queues by pending events, most first",
        _list_of("queues", _ref("Queue"), total=INT, offset=INT),
        params=(_query("limit", LIMIT + " (default 100, at most 1000)"),
                _query("offset", "rows to skip (dashboard paging)"),
                _query("app", "only this app's queues: key name or app id", STR)),
        errors=(400, 404),
        description="oldest_age_ms is the age of the queue's head when this "
                    "node holds it in memory, else null; delivered_per_s is "
                    "the mean over the last 10 s, counted by this node.")},
    "/admin/sessions": {"get": _op(
        "connected sessions, then recently closed ones",
        _list_of("sessions", _ref("Session"), total=INT),
        params=(_query("limit", LIMIT + " (default 1000, at most 10000)"),),
        errors=(400,))},
    "/admin/trace/{idem}": {"get": _op("an event's delivery state and audit trail",
                                       _ref("Trace"), params=(IDEM,),
                                       errors=(404,))},
    "/admin/dlq": {"get": _op(
        "dead letters in (partition, offset) order",
        _list_of("dead_letters", _ref("DeadLetter"), total=INT),
        params=(_query("limit", LIMIT + " (default 100, at most 1000)"),),
        errors=(400,))},
    "/admin/dlq/{idem}": {"get": _op("a dead letter's trace and record",
                                     _ref("Trace"), params=(IDEM,),
                                     errors=(404,))},
    "/admin/dlq/{idem}/requeue": {"post": _op(
        "put a dead letter back in its queue, attempts reset",
        _obj(("idem", "requeued"), idem=STR, requeued=BOOL), params=(IDEM,),
        errors=(404, 503))},
    "/admin/cluster": {"get": _op(
        "every node's status as this node sees it (dashboard)",
        _list_of("nodes", _ref("ClusterNode"), id=STR,
                 leader=_nullable("string"), term=INT))},
    "/admin/leader/step-down": {"post": _op(
        "leader only: hand leadership to the most caught-up follower",
        _ref("Leadership"), errors=(409, 504),
        description="Answers once this node follows the new leader. A follower "
                    "answers 409 NOT_LEADER with the leader's id.")},
    "/admin/leader/transfer": {"post": _op(
        "leader only: hand leadership to the named node", _ref("Leadership"),
        body=_obj(("node",), node=STR), errors=(400, 404, 409, 504),
        description="Answers once the named node leads. A follower answers 409 "
                    "NOT_LEADER with the leader's id; 409 TRANSFER_DIVERTED if "
                    "another node won the election.")},
    "/admin/openapi.json": {"get": _op("this document", {"type": "object"})},
}

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "ensync-raft node admin API", "version": "1"},
    "security": [{"bearer": []}, {"dashboardCookie": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the node's --admin-token"},
            "dashboardCookie": {"type": "apiKey", "in": "cookie",
                                "name": "ensync_dashboard",
                                "description": "a dashboard login (POST /login)"},
        },
    },
}
