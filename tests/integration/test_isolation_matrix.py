"""Permissions and isolation (issue #6), by real clients against a 3-node cluster.

Every test gets its own three apps: A and B may send and receive ``order/*``, P
(the publisher) may send anything and receive nothing. A is connected to n1, B
to n2, P to n3, so every answer crosses nodes through Raft.

The matrix is one table: each command of docs/PROTOCOL.md, sent by A, against
four targets, with the exact reply expected.

- own: an event addressed to A and in flight on A's connection (for name
  commands, a name A subscribed);
- other: an event addressed to B and in flight on B's connection (for name
  commands, a name only B subscribed);
- unknown: an idem never issued (a name nobody used, an app that does not exist);
- forbidden: an event under a name A may not receive (``secret/x``), addressed
  to C, which may (a publish of that name to A itself is refused: it could never
  be delivered), or that name itself.

"Other" and "unknown" must get the same reply, so that A cannot tell whether
someone else's event exists; after each "other" case, B can still answer its
event, which shows A's request changed nothing.

Placeholders in expected replies: ``{idem}``, ``{cid}`` (A's client id),
``{ms}`` (any integer), ``{json}`` (a JSON object).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re

import pytest

from node.client import Client

RECORD_WAIT_S = 15.0
OWN_NAME = "order/created"
FORBIDDEN_NAME = "secret/x"
UNKNOWN_IDEM = "evt-0000-00ffffffffff"
UNKNOWN_APP = base64.b64encode(b"\x01" * 32).decode()
PAYLOAD = base64.b64encode(b'{"n": 1}').decode()

NOT_IN_FLIGHT = "-FAIL:NOT_FOUND;MESSAGE=no such event in flight"
NO_EVENT = "-FAIL:NOT_FOUND;MESSAGE=no such event"
NO_SUB = "-FAIL:NOT_FOUND;MESSAGE=no such subscription"
NOT_SUBSCRIBED = "-FAIL:NOT_SUBSCRIBED;MESSAGE=no such subscription"
WRONG_CLIENT = "-FAIL:CLIENT_NOT_FOUND;MESSAGE=unknown client id for this connection"

# What each command sends; {cid} is the client id the frame carries.
FRAMES = {
    "CONN": "CONN;CLIENT_ID=:{cid}",
    "PUB": ("PUB;CLIENT_ID=:{cid};EVENT_NAME=:{name};PAYLOAD=:" + PAYLOAD
            + ";DELIVERY_TO=:{to};METADATA=:{{}}"),
    "SUB": "SUB;CLIENT_ID=:{cid};EVENT_NAME=:{name}",
    "UNSUB": "UNSUB;CLIENT_ID=:{cid};EVENT_NAME=:{name}",
    "PAUSE": "PAUSE;CLIENT_ID=:{cid};EVENT_NAME=:{name};REASON=:maint",
    "CONTINUE": "CONTINUE;CLIENT_ID=:{cid};EVENT_NAME=:{name}",
    "ACK": "ACK;CLIENT_ID=:{cid};EVENT_IDEM=:{idem};BLOCK=:{block};EVENT_NAME=:{name}",
    "DEFER": "DEFER;CLIENT_ID=:{cid};EVENT_IDEM=:{idem};DELAY=:1000;REASON=:later",
    "DISCARD": "DISCARD;CLIENT_ID=:{cid};EVENT_IDEM=:{idem};REASON=:bad",
    "ROLLBACK": "ROLLBACK;CLIENT_ID=:{cid};EVENT_IDEM=:{idem};BLOCK=:{block}",
    "REPLAY": "REPLAY;CLIENT_ID=:{cid};EVENT_IDEM=:{idem}",
}
IDEM_COMMANDS = ("ACK", "DEFER", "DISCARD", "ROLLBACK", "REPLAY")

# (command, target) -> the exact reply A gets.
MATRIX = {
    ("ACK", "own"): "+PASS:ACKNOWLEDGED;IDEM={idem}",
    ("ACK", "other"): NOT_IN_FLIGHT,
    ("ACK", "unknown"): NOT_IN_FLIGHT,
    ("ACK", "forbidden"): NOT_IN_FLIGHT,
    ("DEFER", "own"): "+PASS:DEFERRED;IDEM={idem};DELIVERY_TIME={ms}",
    ("DEFER", "other"): NOT_IN_FLIGHT,
    ("DEFER", "unknown"): NOT_IN_FLIGHT,
    ("DEFER", "forbidden"): NOT_IN_FLIGHT,
    ("DISCARD", "own"): "+PASS:DISCARDED;IDEM={idem}",
    ("DISCARD", "other"): NOT_IN_FLIGHT,
    ("DISCARD", "unknown"): NOT_IN_FLIGHT,
    ("DISCARD", "forbidden"): NOT_IN_FLIGHT,
    ("ROLLBACK", "own"): "+PASS:ROLLED_BACK;IDEM={idem}",
    ("ROLLBACK", "other"): NOT_IN_FLIGHT,
    ("ROLLBACK", "unknown"): NOT_IN_FLIGHT,
    ("ROLLBACK", "forbidden"): NOT_IN_FLIGHT,
    ("REPLAY", "own"): "+REPLAY:{json}",
    ("REPLAY", "other"): NO_EVENT,
    ("REPLAY", "unknown"): NO_EVENT,
    ("REPLAY", "forbidden"): NO_EVENT,
    # PUB: own = to A itself, other = to B, unknown = to no app.
    ("PUB", "own"): "+PASS:PUBLISHED;IDEM={ms_idem};TIMESTAMP={ms}",
    ("PUB", "other"): "+PASS:PUBLISHED;IDEM={ms_idem};TIMESTAMP={ms}",
    ("PUB", "unknown"):
        "-FAIL:INVALID_RECIPIENT;MESSAGE=DELIVERY_TO names no known app",
    ("PUB", "forbidden"): "-FAIL:PERMISSION_DENIED;MESSAGE=no send permission for "
                          + FORBIDDEN_NAME,
    # SUB reveals nothing: any permitted name may be subscribed.
    ("SUB", "own"): "+PASS:SUBSCRIBED;EVENT_NAME=" + OWN_NAME,
    ("SUB", "other"): "+PASS:SUBSCRIBED;EVENT_NAME=order/for-b",
    ("SUB", "unknown"): "+PASS:SUBSCRIBED;EVENT_NAME=order/never-used",
    ("SUB", "forbidden"): "-FAIL:PERMISSION_DENIED;MESSAGE=no receive permission for "
                          + FORBIDDEN_NAME,
    ("UNSUB", "own"): "+PASS:UNSUBSCRIBED;EVENT_NAME=" + OWN_NAME + ";CLIENT_ID={cid}",
    ("UNSUB", "other"): NO_SUB,
    ("UNSUB", "unknown"): NO_SUB,
    ("UNSUB", "forbidden"): NO_SUB,
    ("PAUSE", "own"): "+PASS:PAUSED;EVENT_NAME=" + OWN_NAME,
    ("PAUSE", "other"): NOT_SUBSCRIBED,
    ("PAUSE", "unknown"): NOT_SUBSCRIBED,
    ("PAUSE", "forbidden"): NOT_SUBSCRIBED,
    ("CONTINUE", "own"): "+PASS:CONTINUED;EVENT_NAME=" + OWN_NAME,
    ("CONTINUE", "other"): NOT_SUBSCRIBED,
    ("CONTINUE", "unknown"): NOT_SUBSCRIBED,
    ("CONTINUE", "forbidden"): NOT_SUBSCRIBED,
    # CONN: own = keep-alive with its own id, other = B's client id,
    # unknown = a key nobody issued, forbidden = B's key on A's connection.
    ("CONN", "own"): "+PASS:CONNECTED;CLIENT_ID={cid}",
    ("CONN", "other"): "-FAIL:CLIENT_NOT_FOUND;MESSAGE=unknown client id",
    ("CONN", "unknown"): "-FAIL:UNAUTHORIZED;MESSAGE=access key is not valid",
    ("CONN", "forbidden"):
        "-FAIL:UNAUTHORIZED;MESSAGE=connection is bound to another key",
}


def expected(template: str, **values: str) -> re.Pattern:
    """The template as an exact pattern; see the module docstring."""
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        name = part[1:-1] if part.startswith("{") and part.endswith("}") else None
        if name == "ms":
            out.append(r"\d+")
        elif name == "ms_idem":
            out.append(r"evt-[0-9a-f]{4}-[0-9a-f]{12}")
        elif name == "json":
            out.append(r"\{.*\}")
        elif name is not None and name in values:
            out.append(re.escape(values[name]))
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z", re.S)


class World:
    """Three apps, their connections, and the events a case needs."""

    def __init__(self, cluster, tag: str) -> None:
        self.cluster = cluster
        self.tag = tag
        self.clients: list[Client] = []

    async def start(self) -> World:
        c = self.cluster
        self.a_key = c.create_key(f"a-{self.tag}", ["order/*"], ["order/*"])
        self.b_key = c.create_key(f"b-{self.tag}", ["order/*"], ["order/*"])
        self.p_key = c.create_key(f"p-{self.tag}", ["*"], [])
        # C only receives the name A may not; nobody connects as C.
        self.c_key = c.create_key(f"c-{self.tag}", [], ["secret/*"])
        self.a = await self.connect(self.a_key, "n1")
        self.b = await self.connect(self.b_key, "n2")
        self.p = await self.connect(self.p_key, "n3")
        return self

    async def connect(self, key: dict, node_id: str) -> Client:
        client = Client(self.cluster.ws_url(node_id))
        self.clients.append(client)
        await client.connect(key["access_key"])
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def publish(self, name: str, to: dict) -> str:
        reply = await self.p.publish(name, to["app_id"], PAYLOAD)
        return re.search(r"IDEM=([^;]+)", reply)[1]

    async def held_by(self, client: Client, name: str, to: dict) -> dict:
        """Publish ``name`` to ``to``; ``client`` subscribes and receives it."""
        await client.subscribe(name)
        idem = await self.publish(name, to)
        record = await client.next_record(RECORD_WAIT_S)
        assert record is not None and record["idem"] == idem, record
        return record

    def trace(self, idem: str) -> dict:
        return self.cluster.request(self.cluster.leader(), f"/admin/trace/{idem}")


@pytest.fixture
async def world(cluster, request):
    tag = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-48:]
    started = await World(cluster, tag).start()
    yield started
    await started.close()


async def target_of(world: World, command: str, target: str) -> dict:
    """The values the command's frame and reply template need for ``target``."""
    a_cid, b_cid = world.a.client_id, world.b.client_id
    if command in IDEM_COMMANDS:
        if target == "own":
            record = await world.held_by(world.a, OWN_NAME, world.a_key)
            return {"idem": record["idem"], "block": str(record["block"])}
        if target == "other":
            record = await world.held_by(world.b, OWN_NAME, world.b_key)
            return {"idem": record["idem"], "block": str(record["block"])}
        if target == "unknown":
            return {"idem": UNKNOWN_IDEM, "block": "1"}
        idem = await world.publish(FORBIDDEN_NAME, world.c_key)
        return {"idem": idem, "block": "1"}

    if command == "PUB":
        to = {"own": world.a_key["app_id"], "other": world.b_key["app_id"],
              "unknown": UNKNOWN_APP, "forbidden": world.b_key["app_id"]}[target]
        name = FORBIDDEN_NAME if target == "forbidden" else OWN_NAME
        return {"name": name, "to": to}
    if command == "CONN":
        return {"cid": {"own": a_cid, "other": b_cid}.get(target, a_cid)}

    names = {"own": OWN_NAME, "other": "order/for-b", "unknown": "order/never-used",
             "forbidden": FORBIDDEN_NAME}
    if command in ("UNSUB", "PAUSE", "CONTINUE"):
        # B subscribes (and pauses) the "other" name; A does so for its own.
        await world.b.request(FRAMES["SUB"].format(cid=b_cid, name=names["other"]))
        if target == "own":
            await world.a.request(FRAMES["SUB"].format(cid=a_cid, name=OWN_NAME))
        if command == "CONTINUE":
            await world.b.request(FRAMES["PAUSE"].format(cid=b_cid,
                                                         name=names["other"]))
            if target == "own":
                await world.a.request(FRAMES["PAUSE"].format(cid=a_cid, name=OWN_NAME))
    return {"name": names[target]}


def frame_of(world: World, command: str, target: str, values: dict) -> str:
    if command == "CONN" and target == "unknown":
        return "CONN;ACCESS_KEY=:ensk_nobody_issued_this"
    if command == "CONN" and target == "forbidden":
        return f"CONN;ACCESS_KEY=:{world.b_key['access_key']}"
    fields = {"cid": world.a.client_id, "name": OWN_NAME, **values}
    return FRAMES[command].format(**fields)


@pytest.mark.parametrize(("command", "target"), list(MATRIX))
async def test_matrix(world, command, target):
    values = await target_of(world, command, target)
    reply = await world.a.exchange(frame_of(world, command, target, values))

    template = MATRIX[(command, target)]
    pattern = expected(template, cid=world.a.client_id, idem=values.get("idem", ""))
    assert pattern.match(reply), f"{command} {target}: {reply!r} !~ {template!r}"
    if reply.startswith("+REPLAY:"):
        assert json.loads(reply[8:])["idem"] == values["idem"]
    if command in IDEM_COMMANDS and target == "other":
        # A's request changed nothing: the event is still B's to answer.
        ack = FRAMES["ACK"].format(cid=world.b.client_id, name=OWN_NAME, **values)
        acked = await world.b.exchange(ack)
        assert acked == f"+PASS:ACKNOWLEDGED;IDEM={values['idem']}"
    if command in IDEM_COMMANDS and target == "forbidden":
        trace = world.trace(values["idem"])
        assert (trace["state"], trace["attempts"]) == ("pending", 0)


@pytest.mark.parametrize("command", IDEM_COMMANDS)
async def test_another_apps_event_and_an_unknown_idem_get_the_same_reply(
    world, command
):
    other = await target_of(world, command, "other")
    about_other = await world.a.exchange(frame_of(world, command, "other", other))
    unknown = {"idem": UNKNOWN_IDEM, "block": other["block"]}
    about_unknown = await world.a.exchange(frame_of(world, command, "unknown", unknown))
    assert about_other == about_unknown
    assert about_other.startswith("-FAIL:NOT_FOUND;")


@pytest.mark.parametrize("command", [c for c in FRAMES if c != "CONN"])
async def test_a_frame_naming_another_connections_client_id_is_client_not_found(
    world, command
):
    values = await target_of(world, command, "other")
    fields = {"name": OWN_NAME, "to": world.b_key["app_id"], **values,
              "cid": world.b.client_id}
    reply = await world.a.exchange(FRAMES[command].format(**fields))
    assert reply == WRONG_CLIENT
    if command in IDEM_COMMANDS:
        ack = FRAMES["ACK"].format(cid=world.b.client_id, name=OWN_NAME, **values)
        acked = await world.b.exchange(ack)
        assert acked == f"+PASS:ACKNOWLEDGED;IDEM={values['idem']}"


@pytest.mark.parametrize("command", ["ACK", "DEFER", "DISCARD", "ROLLBACK"])
async def test_an_event_held_by_another_connection_of_the_same_app_is_unauthorized(
    world, command
):
    record = await world.held_by(world.a, OWN_NAME, world.a_key)
    sibling = await world.connect(world.a_key, "n2")
    values = {"idem": record["idem"], "block": str(record["block"]),
              "cid": sibling.client_id, "name": OWN_NAME}
    reply = await sibling.exchange(FRAMES[command].format(**values))
    assert reply == "-FAIL:UNAUTHORIZED;MESSAGE=event is held by another client"


async def test_a_publish_its_recipient_may_never_receive_is_refused(world):
    """Else it would sit in A's queue, counted against A's limit, until it expired."""
    frame = FRAMES["PUB"].format(cid=world.p.client_id, name=FORBIDDEN_NAME,
                                 to=world.a_key["app_id"])
    reply = await world.p.exchange(frame)
    assert reply == ("-FAIL:PERMISSION_DENIED;MESSAGE=the recipient may not "
                     f"receive {FORBIDDEN_NAME}")


async def test_the_recipient_and_the_sender_replay_only_under_the_event_s_name(world):
    idem = await world.publish(OWN_NAME, world.a_key)
    replay = FRAMES["REPLAY"]
    as_recipient = await world.a.exchange(replay.format(cid=world.a.client_id,
                                                        idem=idem))
    as_sender = await world.p.exchange(replay.format(cid=world.p.client_id, idem=idem))
    wrong_name = await world.p.exchange(
        replay.format(cid=world.p.client_id, idem=idem) + ";EVENT_NAME=:order/other")
    assert as_recipient.startswith("+REPLAY:")
    assert as_sender.startswith("+REPLAY:")
    assert json.loads(as_sender[8:])["idem"] == idem
    assert wrong_name == NO_EVENT


async def test_delivery_needs_permission_subscription_name_and_recipient_to_agree(
    world,
):
    a, a_cid = world.a, world.a.client_id
    await a.subscribe(OWN_NAME)
    await a.subscribe("order/paused")
    await a.request(FRAMES["PAUSE"].format(cid=a_cid, name="order/paused"))
    negatives = {
        "no subscription": await world.publish("order/updated", world.a_key),
        "subscription paused": await world.publish("order/paused", world.a_key),
        "name does not match": await world.publish("order/created2", world.a_key),
        "another recipient": await world.publish(OWN_NAME, world.b_key),
    }
    control = await world.publish(OWN_NAME, world.a_key)

    # The control, published last to the one queue A may drain, is what A gets.
    record = await a.next_record(RECORD_WAIT_S)
    assert record is not None and record["idem"] == control
    await a.ack(record["idem"], record["block"], OWN_NAME)
    for why, idem in negatives.items():
        trace = world.trace(idem)
        assert (trace["state"], trace["attempts"]) == ("pending", 0), why

    # The event meant for B reaches B once it subscribes: it was deliverable.
    await world.b.subscribe(OWN_NAME)
    record = await world.b.next_record(RECORD_WAIT_S)
    assert record is not None and record["idem"] == negatives["another recipient"]
    assert a.records.empty()
