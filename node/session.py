"""One client WebSocket: requests in, replies out in request order, pushes.

The problem: the SDK pairs replies with requests purely by arrival order and has
several requests outstanding at once (spec 1.4). A PUB waits for a Raft commit
while a later request may be answered at once; answering the later one first
would shift every reply onto the wrong request for the rest of the connection.

The approach: each request becomes an awaitable appended to a bounded queue, and
one writer task awaits them strictly in order and sends exactly one reply per
request. Pushed ``+RECORD:`` frames do not consume a reply slot on the client, so
they go out as soon as the assignment is applied here. When the reply queue is
full the reader stops reading: backpressure lands on the client's socket.

Every failure a client can cause becomes one ``-FAIL:`` reply; nothing a client
sends can raise out of this module.

Limits a client can hit (docs/PROTOCOL.md, "Limits"), each counted in /metrics
and warned about once per connection or key:

- frames per second (node/limits.py): an excess frame gets ``RATE_LIMITED``;
  one refused for ``client_abuse_close_ms`` closes the socket with 4008.
- connections per access key on this node: the CONN beyond it is refused.
- unanswered requests per connection (``client_pending_requests_max``): the
  reader stops until the oldest is answered; nothing is refused.
- reply memory per node (``reply_bytes_max``): replies and pushes built but not
  yet written. When full, the connections holding at least the mean pause their
  readers, the existing backpressure path. Chosen over refusing new requests:
  the SDK reports any ``-FAIL`` to the application and never retries, while a
  pause costs the heavy holders latency and leaves light clients untouched.
- the socket's write buffer (``client_write_buffer_bytes_max``): a client that
  does not read its pushes is closed with 4009; its in-flight records go back
  to their queues through the usual session close.
"""

from __future__ import annotations

import asyncio
import logging
import re

import orjson
from aiohttp import WSMsgType, web

from node import proof, protocol
from node.errors import BrokerError, ProtocolError, RequestRejected, Unavailable
from node.limits import FrameRate, Verdict, must_pause
from raft import schema
from raft.machine import now_ms
from raft.state import key_expired

log = logging.getLogger("ensync.session")

# Closing a client that hit a limit: how long its close handshake may take before
# the socket is dropped with whatever it still had buffered.
LIMIT_CLOSE_TIMEOUT_MS = 5000
CLOSE_ABUSIVE = 4008
CLOSE_SLOW_CONSUMER = 4009
# How often a reader paused by reply_bytes_max looks again.
REPLY_PAUSE_CHECK_MS = 20
# Reply memory a request holds from when it is read until it is answered: most
# replies are one short line; a REPLAY carries a whole record.
REPLY_BYTES_RESERVED = 256
REPLY_BYTES_RESERVED_LARGE = protocol.FRAME_BYTES_MAX + protocol.RECORD_OVERHEAD_BYTES
LARGE_REPLY_VERBS = frozenset({"REPLAY"})
# Spec 9.4: the SDK may drop a record pushed right after +PASS:SUBSCRIBED.
PUSH_HOLD_AFTER_SUB_MS = 200
# Event names and subscription patterns: printable ASCII, no spaces or ';'.
EVENT_NAME_BYTES_MAX = 256
_EVENT_NAME = re.compile(r"[!-:<-~]{1,%d}\Z" % EVENT_NAME_BYTES_MAX)
# SUB ... ;ACK_TIMEOUT_MS=<ms> (ours): at most a day.
ACK_TIMEOUT_MS_MAX = 86_400_000
# SUB ... ;WINDOW=<n> (ours): records one subscription may hold unacknowledged
# at once. The SDK never sends it and gets one at a time (need-based push).
SUB_WINDOW_MAX = 1024
# DEFER (spec 3.8): DELAY defaults to 60 s; at most a day.
DEFER_DELAY_MS_DEFAULT = 60_000
DEFER_DELAY_MS_MAX = 86_400_000
# METADATA fields the broker reads (docs/PROTOCOL.md).
IDEMPOTENCY_KEY_FIELD = "idempotency_key"
IDEMPOTENCY_KEY_BYTES_MAX = 128
DELIVER_AT_FIELD = "deliver_at_ms"
# PAYLOAD is base64 (spec 3.2); it needs no escaping inside a JSON record.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


def covers(granted: str, wanted: str) -> bool:
    """Whether permission pattern ``granted`` covers subscription ``wanted``."""
    if granted == "*" or granted == wanted:
        return True
    if granted.endswith("/*"):
        return wanted.startswith(granted[:-1])
    return False


class Connection:
    def __init__(self, node, ws: web.WebSocketResponse, peer: str,
                 transport=None) -> None:
        self.node = node
        self.ws = ws
        self.peer = peer
        # asyncio.Transport of the socket: its write buffer size shows a client
        # that does not read (None in tests without a socket).
        self.transport = transport
        self.sid: str | None = None
        self.app: str | None = None
        # Requests read and not yet answered; the reader waits while it is full
        # (client_pending_requests_max): backpressure on the client's socket.
        self.replies: asyncio.Queue = asyncio.Queue(
            node.cfg.client_pending_requests_max)
        self.sub_ready_at: dict[str, float] = {}
        # pattern -> pushes held back right after SUB: (timer, push arguments)
        self._held: dict[str, list] = {}
        self.requests_total = 0
        self.pushes_total = 0
        self.bad_frames_total = 0
        # CONN waits on CONN: a second one pipelined behind the first must see
        # the session the first one opened.
        self._conn_lock = asyncio.Lock()
        cfg = node.cfg
        self.rate = FrameRate(cfg.client_frames_per_s_max, cfg.client_abuse_close_ms,
                              _monotonic_ms())
        # Reply and push text built and not yet written (node.reply_bytes' share).
        self.held_bytes = 0
        self._gone = False
        self._closing = False
        self._key_slot: str | None = None
        self._warned: set[str] = set()
        # Proof of possession (node/proof.py): the one nonce this connection
        # holds, and when it was issued (loop time, ms).
        self._nonce: tuple[str, int] | None = None

    # -- reading ----------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_replies())
        self.node.live_connections += 1
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type not in _COUNTED_FRAMES:
                    continue
                if not await self._admit(msg):
                    break
        finally:
            writer.cancel()
            self._gone = True
            self._drop_unsent_replies()
            self._forget_held_bytes()
            self.node.live_connections -= 1
            if self._key_slot is not None:
                self.node.release_key_slot(self._key_slot)
            await self.node.on_disconnect(self)

    async def _admit(self, msg) -> bool:
        """One frame through the rate limit; False once the socket must close."""
        verdict = self.rate.frame(_monotonic_ms())
        if verdict is Verdict.CLOSE:
            self.node.counters["abusive_closes_total"] += 1
            log.warning("closing abusive client peer=%s sid=%s rejected=%d",
                        self.peer, self.sid, self.rate.rejected_total)
            await self._close_for_limit(CLOSE_ABUSIVE, b"frame rate limit exceeded")
            return False
        if verdict is Verdict.REJECT:
            self._count_rate_limited()
            if msg.type is WSMsgType.BINARY or (msg.type is WSMsgType.TEXT
                                                and msg.data != "PONG"):
                await self._enqueue(_failed(RequestRejected(
                    f"more than {self.rate.rate_per_s} frames per second",
                    "RATE_LIMITED")))
            # Read the next frame no sooner than a token is due: refusals cost
            # the node too, so a flooding socket is read at the limit's pace
            # and the rest waits in the kernel (TCP backpressure).
            await asyncio.sleep(self.rate.wait_ms(_monotonic_ms()) / 1000)
            return True

        if msg.type is WSMsgType.PING:
            try:
                await self.ws.pong(msg.data)
            except ConnectionError:  # the client left mid-flood
                return False
            return True
        if msg.type is WSMsgType.PONG:
            return True
        await self._wait_for_reply_memory()
        if msg.type == WSMsgType.TEXT:
            await self._on_text(msg.data)
        else:
            await self._enqueue(_failed(ProtocolError(
                "binary frames are not part of the protocol")))
        return True

    def _count_rate_limited(self) -> None:
        self.node.counters["frames_rate_limited_total"] += 1
        self._warn_once("rate", "client over its frame rate peer=%s sid=%s "
                        "frames_per_s_max=%d", self.peer, self.sid,
                        self.rate.rate_per_s)

    def _warn_once(self, what: str, message: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    async def _wait_for_reply_memory(self) -> None:
        """Backpressure while the node's reply memory is full (reply_bytes_max)."""
        node = self.node
        paused = False
        while not self.ws.closed and must_pause(
                self.held_bytes, node.reply_bytes, node.cfg.reply_bytes_max,
                node.live_connections):
            if not paused:
                paused = True
                node.counters["reply_bytes_pauses_total"] += 1
                self._warn_once("memory", "reply memory full, pausing reads "
                                "peer=%s sid=%s held_bytes=%d node_bytes=%d",
                                self.peer, self.sid, self.held_bytes,
                                node.reply_bytes)
            await asyncio.sleep(REPLY_PAUSE_CHECK_MS / 1000)

    def _hold(self, size: int) -> None:
        if not self._gone:
            self.held_bytes += size
            self.node.reply_bytes += size

    def _release(self, size: int) -> None:
        if not self._gone:
            self.held_bytes -= size
            self.node.reply_bytes -= size

    def _forget_held_bytes(self) -> None:
        """The socket is gone: what it held is garbage now, or soon."""
        self.node.reply_bytes -= self.held_bytes
        self.held_bytes = 0

    async def _close_for_limit(self, code: int, reason: bytes) -> None:
        """Close with ``code`` without spending more on the client.

        A client closed for a limit is not trusted to answer the close frame:
        one that does not read never will, and one that floods goes on
        sending, which aiohttp's close handshake would parse and drop at full
        speed. So once the close frame is written, the socket's reads go to
        a protocol that drops them unparsed, and our side of the connection
        is shut for writing; the socket closes when the client closes its
        side, or is dropped after ``LIMIT_CLOSE_TIMEOUT_MS``. Reads go on
        (unparsed) rather than stop: closing a socket with unread bytes in
        its buffer sends a reset, and the client's kernel may then drop the
        close frame before the client reads it.
        """
        self._closing = True
        closing = asyncio.ensure_future(self.ws.close(code=code, message=reason,
                                                      drain=False))
        await asyncio.sleep(0)  # ws.close writes the close frame on its first step
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.set_protocol(_DropReads(transport.get_protocol()))
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
            asyncio.get_running_loop().call_later(LIMIT_CLOSE_TIMEOUT_MS / 1000,
                                                  transport.abort)
        try:
            await asyncio.wait_for(closing, LIMIT_CLOSE_TIMEOUT_MS / 1000)
        except (asyncio.TimeoutError, ConnectionError):
            if transport is not None:
                transport.abort()

    def _drop_unsent_replies(self) -> None:
        """The socket is gone: nobody will read these replies, or their errors."""
        while not self.replies.empty():
            task = self.replies.get_nowait()
            task.add_done_callback(_consume_outcome)

    async def _on_text(self, text: str) -> None:
        if text == "PONG":
            return
        self.requests_total += 1
        try:
            request = protocol.parse_request(text)
        except ProtocolError as exc:
            self._count_bad_frame(exc)
            await self._enqueue(_failed(exc))
            return
        reserved = (REPLY_BYTES_RESERVED_LARGE if request.verb in LARGE_REPLY_VERBS
                    else REPLY_BYTES_RESERVED)
        # The request's own text counts too, until it is answered: pipelined
        # 1 MiB publishes are bounded by reply_bytes_max like replies are.
        await self._enqueue(self._handle(request), max(reserved, len(text)))

    def _count_bad_frame(self, exc: ProtocolError) -> None:
        # INFO for the first one only: a client looping on a bad frame must not
        # flood the log; the rest are counted (STYLE.md 11).
        self.bad_frames_total += 1
        self.node.counters["bad_frames_total"] += 1
        level = logging.INFO if self.bad_frames_total == 1 else logging.DEBUG
        log.log(level, "bad frame peer=%s code=%s count=%d", self.peer, exc.code,
                self.bad_frames_total)

    async def _enqueue(self, awaitable, reserved: int = REPLY_BYTES_RESERVED) -> None:
        # Counted at its largest before it runs: requests already read run
        # before the reader looks at reply memory again.
        self._hold(reserved)
        task = asyncio.ensure_future(self._accounted(awaitable, reserved))
        if self.replies.full():
            self.node.counters["pending_requests_pauses_total"] += 1
            self._warn_once("pending", "client at its unanswered request limit, "
                            "pausing reads peer=%s sid=%s pending_max=%d", self.peer,
                            self.sid, self.replies.maxsize)
        await self.replies.put(task)

    async def _accounted(self, awaitable, reserved: int) -> str:
        """The reply, counted in reply memory until it is written."""
        try:
            reply = await awaitable
        except BaseException:
            self._release(reserved)
            raise
        self._hold(len(reply) - reserved)
        return reply

    async def _write_replies(self) -> None:
        while True:
            task = await self.replies.get()
            held = 0
            try:
                reply = await task
                held = len(reply)
            except BrokerError as exc:
                reply = exc.wire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("request failed unexpectedly")
                reply = "-FAIL:INTERNAL_ERROR;MESSAGE=internal error"

            try:
                if not self.ws.closed:
                    await self.ws.send_str(reply)
            except ConnectionError:
                return
            finally:
                self._release(held)

    # -- requests ----------------------------------------------------------------

    async def _handle(self, req: protocol.Request) -> str:
        if req.verb == "CONN":
            return await self._conn(req)
        if req.verb == "CHALLENGE":
            self._nonce = (proof.new_nonce(), _monotonic_ms())
            return protocol.passed("CHALLENGE", NONCE=self._nonce[0])
        if self.sid is None or req.get("CLIENT_ID") != self.sid:
            raise RequestRejected("unknown client id for this connection",
                                  "CLIENT_NOT_FOUND")
        handler = getattr(self, "_" + req.verb.lower())
        return await handler(req)

    async def _conn(self, req: protocol.Request) -> str:
        async with self._conn_lock:
            return await self._conn_locked(req)

    async def _conn_locked(self, req: protocol.Request) -> str:
        key = req.get("ACCESS_KEY")
        if not key:
            client_id = req.get("CLIENT_ID")
            if client_id and client_id == self.sid:
                return protocol.passed("CONNECTED", CLIENT_ID=self.sid)
            if client_id:
                raise RequestRejected("unknown client id", "CLIENT_NOT_FOUND")
            raise ProtocolError("missing ACCESS_KEY", "MISSING_PARAMETERS")

        nonce, self._nonce = self._nonce, None  # used up by this CONN, whatever
        app = await self.node.read_fresh(self.node.app_for_key, key)
        if app is None:
            raise RequestRejected("access key is not valid", "UNAUTHORIZED")
        if key_expired(self.node.app_record(app), now_ms()):
            raise RequestRejected("access key has expired", "UNAUTHORIZED")
        self._check_proof(req, app, nonce)
        if self.sid is not None and app == self.app:
            return protocol.conn_passed(self.sid, app)
        if self.sid is not None:
            raise RequestRejected("connection is bound to another key", "UNAUTHORIZED")

        # Take the slot before the commit: CONNs racing on other sockets of
        # the same key must see it taken (STYLE.md 8).
        if not self.node.take_key_slot(app):
            raise RequestRejected("too many connections for this key", "RATE_LIMITED")
        sid = self.node.new_session_id()
        try:
            await self.node.commit({"op": "session_open", "sid": sid, "app": app,
                                    "node": self.node.id, "boot": self.node.boot})
        except BaseException as exc:
            self.node.release_key_slot(app)
            # Cancelled (the writer awaiting this reply is cancelled when the
            # socket closes) or timed out: the open may still commit, unowned.
            if isinstance(exc, Unavailable) or not isinstance(exc, BrokerError):
                self.node.abandon_session(sid, "client left during CONN")
            raise
        if self._gone:
            # The socket closed while the CONN committed: on_disconnect found no
            # session to close, so close the one that just opened. Nobody reads
            # the reply.
            self.node.release_key_slot(app)
            self.node.abandon_session(sid, "client left during CONN")
            return protocol.conn_passed(sid, app)
        self._key_slot = app
        self.sid, self.app = sid, app
        self.node.connections[sid] = self
        return protocol.conn_passed(sid, app)

    def _check_proof(self, req: protocol.Request, app: str,
                     nonce: tuple[str, int] | None) -> None:
        """A CONN's proof of possession, when it carries one or the node
        requires one (node/proof.py)."""
        try:
            self._verify_proof(req, app, nonce)
        except RequestRejected:
            self.node.counters["conn_proof_failures_total"] += 1
            raise

    def _verify_proof(self, req: protocol.Request, app: str,
                      nonce: tuple[str, int] | None) -> None:
        signature = req.get("SIGNATURE")
        if not signature and not req.get("NONCE"):
            if self.node.cfg.conn_proof_required:
                raise RequestRejected("this node requires proof of possession: "
                                      "CHALLENGE, then CONN with NONCE and SIGNATURE",
                                      "UNAUTHORIZED")
            return
        if nonce is None or req.get("NONCE") != nonce[0]:
            raise RequestRejected("NONCE was not issued to this connection or "
                                  "is used up", "UNAUTHORIZED")
        if _monotonic_ms() - nonce[1] > proof.NONCE_TTL_MS:
            raise RequestRejected("NONCE has expired", "UNAUTHORIZED")
        if not signature or not proof.verify(app, nonce[0], signature):
            raise RequestRejected("SIGNATURE does not prove the app's secret key",
                                  "UNAUTHORIZED")

    async def _pub(self, req: protocol.Request) -> str:
        name = _event_name(req)
        app = self.node.app_record(self.app)
        if not any(schema.matches(p, name) for p in app["send"]):
            raise RequestRejected(f"no send permission for {name}", "PERMISSION_DENIED")
        if "*" in name:
            raise ProtocolError("EVENT_NAME of a PUB must not hold a wildcard")
        to = req.get("DELIVERY_TO")
        recipient = await self.node.read_fresh(self.node.app_record, to)
        if recipient is None:
            raise RequestRejected("DELIVERY_TO names no known app", "INVALID_RECIPIENT")
        # An event its recipient may never receive would sit in its queue, and
        # count against its recipient_events_max, until it expired.
        if not any(schema.matches(p, name) for p in recipient["receive"]):
            raise RequestRejected(f"the recipient may not receive {name}",
                                  "PERMISSION_DENIED")

        payload = req.get("PAYLOAD")
        if not _BASE64.match(payload):
            raise ProtocolError("PAYLOAD must be base64")
        metadata = _metadata(req.get("METADATA"))
        # Sizes as the record will be serialized: escaping can grow JSON text.
        record_bytes = (len(payload) + len(orjson.dumps(metadata)) + len(name)
                        + len(self.app) + protocol.RECORD_OVERHEAD_BYTES)
        if record_bytes > protocol.FRAME_BYTES_MAX:
            raise ProtocolError("the record would exceed 1048576 bytes",
                                "PAYLOAD_TOO_LARGE")

        op = {"op": "publish", "from": self.app, "to": to, "name": name,
              "payload": payload, "metadata": metadata, "node": self.node.id,
              "sid": self.sid, "dedup_window_ms": self.node.cfg.dedup_window_ms}
        op.update(_publish_options(metadata))
        if self.node.early_acker is not None:  # UNSAFE test builds (node/unsafe.py)
            early = self.node.early_acker.publish(op)
            if early is not None:
                return early
        result = await self.node.commit(op)
        return protocol.passed("PUBLISHED", IDEM=result["idem"], TIMESTAMP=result["ts"])

    async def _sub(self, req: protocol.Request) -> str:
        pattern = _event_name(req)
        app = self.node.app_record(self.app)
        if not any(covers(p, pattern) for p in app["receive"]):
            raise RequestRejected(f"no receive permission for {pattern}",
                                  "PERMISSION_DENIED")
        loop = asyncio.get_running_loop()
        self.sub_ready_at[pattern] = loop.time() + PUSH_HOLD_AFTER_SUB_MS / 1000
        op = {"op": "sub", "sid": self.sid, "pattern": pattern}
        # Ours: a per-subscription ack timeout; the SDK never sends it.
        ack_timeout_ms = _int_param(req, "ACK_TIMEOUT_MS", 0, 1000, ACK_TIMEOUT_MS_MAX)
        if ack_timeout_ms:
            op["ack_timeout_ms"] = ack_timeout_ms
        window = _int_param(req, "WINDOW", 1, 1, SUB_WINDOW_MAX)
        if window > 1:
            op["window"] = window
        await self.node.commit(op)
        self.sub_ready_at[pattern] = loop.time() + PUSH_HOLD_AFTER_SUB_MS / 1000
        return protocol.passed("SUBSCRIBED", EVENT_NAME=pattern)

    async def _unsub(self, req: protocol.Request) -> str:
        pattern = req.get("EVENT_NAME")
        await self.node.commit({"op": "unsub", "sid": self.sid, "pattern": pattern})
        return protocol.passed("UNSUBSCRIBED", EVENT_NAME=pattern, CLIENT_ID=self.sid)

    def _answer(self, op: str, req: protocol.Request, **fields) -> dict:
        """An op answering one delivery; ATTEMPT (ours) names which one."""
        answer = {"op": op, "sid": self.sid, "idem": req.get("EVENT_IDEM"), **fields}
        attempt = _int_param(req, "ATTEMPT", 0, 1, 1 << 31)
        if attempt:
            answer["attempt"] = attempt
        return answer

    async def _ack(self, req: protocol.Request) -> str:
        idem = req.get("EVENT_IDEM")
        await self.node.commit(self._answer("ack", req))
        return protocol.passed("ACKNOWLEDGED", IDEM=idem)

    async def _defer(self, req: protocol.Request) -> str:
        idem = req.get("EVENT_IDEM")
        delay_ms = _int_param(req, "DELAY", DEFER_DELAY_MS_DEFAULT, 0, DEFER_DELAY_MS_MAX)
        priority = _int_param(req, "PRIORITY", 1, 1, 5)
        result = await self.node.commit(self._answer(
            "defer", req, delay_ms=delay_ms, priority=priority,
            reason=(req.get("REASON") or "")[:256]))
        return protocol.passed("DEFERRED", IDEM=idem, DELIVERY_TIME=result["due_ms"])

    async def _discard(self, req: protocol.Request) -> str:
        idem = req.get("EVENT_IDEM")
        if req.get("REASON") is None:
            raise ProtocolError("DISCARD needs a REASON key (it may be empty)",
                                "MISSING_REASON")
        await self.node.commit(self._answer("discard", req,
                                            reason=req.get("REASON")[:256]))
        return protocol.passed("DISCARDED", IDEM=idem)

    async def _rollback(self, req: protocol.Request) -> str:
        idem = req.get("EVENT_IDEM")
        await self.node.commit(self._answer("rollback", req))
        return protocol.passed("ROLLED_BACK", IDEM=idem)

    async def _pause(self, req: protocol.Request) -> str:
        pattern = _event_name(req)
        await self.node.commit({"op": "pause", "sid": self.sid, "pattern": pattern,
                                "paused": True})
        # A record assigned before the pause was delivered before it: send one
        # still held back after SUB now, so it cannot follow +PASS:PAUSED.
        self.sub_ready_at.pop(pattern, None)
        for handle, args in self._held.pop(pattern, []):
            handle.cancel()
            self.push(*args)
        return protocol.passed("PAUSED", EVENT_NAME=pattern)

    async def _continue(self, req: protocol.Request) -> str:
        pattern = _event_name(req)
        await self.node.commit({"op": "pause", "sid": self.sid, "pattern": pattern,
                                "paused": False})
        return protocol.passed("CONTINUED", EVENT_NAME=pattern)

    async def _replay(self, req: protocol.Request) -> str:
        idem = req.get("EVENT_IDEM")
        if not idem:
            # TODO(#3): range replay by FROM_POSITION (docs only; no SDK sends it).
            raise ProtocolError("REPLAY needs EVENT_IDEM", "MISSING_PARAMETERS")
        # One answer for every event the caller may not see, so none can tell
        # whether it exists: unknown, another app's, or one addressed to the
        # caller under a name its receive permission does not cover. Each of
        # them waits for the same Raft barrier too, so neither can the time.
        name = req.get("EVENT_NAME")
        found = self.node.stored_event(idem)
        if found is None or not self._may_replay(*found, name):
            await self.node.fresh_barrier()
            found = self.node.stored_event(idem)
        if found is None or not self._may_replay(*found, name):
            raise RequestRejected("no such event", "NOT_FOUND")
        record, delivery = found
        # A copy: the stored record is shared, and its $internal is whatever the
        # publisher put there (any JSON), so it is replaced, not written into.
        internal = record["metadata"].get("$internal")
        internal = dict(internal) if isinstance(internal, dict) else {}
        internal["replay_info"] = {
            "isReplayed": True, "replayTimestamp": now_ms(),
            "wasAcknowledged": delivery["state"] == "acked"}
        record = {**record, "metadata": {**record["metadata"], "$internal": internal}}
        return protocol.record_frame(record, prefix="+REPLAY:")

    def _may_replay(self, record: dict, delivery: dict, name: str | None) -> bool:
        """Its sender may replay an event; so may its recipient, if the name is
        one it may receive. An EVENT_NAME given must match the event's name."""
        if name and not schema.matches(name, record["name"]):
            return False
        if record["sender"] == self.app:
            return True
        app = self.node.app_record(self.app)
        return delivery["to"] == self.app and app is not None and any(
            schema.matches(p, record["name"]) for p in app["receive"])

    # -- pushes ------------------------------------------------------------------

    def push(self, pattern: str, body: bytes, attempt: int) -> None:
        """Send one record; called on the loop thread once its assign is applied."""
        loop = asyncio.get_running_loop()
        hold_s = self.sub_ready_at.get(pattern, 0) - loop.time()
        if hold_s > 0:
            args = (pattern, body, attempt)
            handle = loop.call_later(hold_s, self._release_held, args)
            self._held.setdefault(pattern, []).append((handle, args))
            return
        if self.ws.closed or self._closing:
            return  # the record goes back to its queue when the session closes
        waiting = self.held_bytes + self._write_buffer_bytes()
        if waiting > self.node.cfg.client_write_buffer_bytes_max:
            self._close_slow_consumer(waiting)
            return

        self.pushes_total += 1
        record = orjson.loads(body)
        record["attempt"] = attempt
        frame = protocol.record_frame(record)
        self._hold(len(frame))
        asyncio.ensure_future(self._send_push(frame))

    def _write_buffer_bytes(self) -> int:
        if self.transport is None:
            return 0
        return self.transport.get_write_buffer_size()

    def _close_slow_consumer(self, waiting_bytes: int) -> None:
        self.node.counters["slow_consumer_closes_total"] += 1
        log.warning("slow consumer, closing peer=%s sid=%s waiting_bytes=%d",
                    self.peer, self.sid, waiting_bytes)
        self._closing = True
        asyncio.ensure_future(self._close_for_limit(CLOSE_SLOW_CONSUMER,
                                                    b"slow consumer"))

    def _release_held(self, args: tuple) -> None:
        held = self._held.get(args[0], [])
        self._held[args[0]] = [h for h in held if h[1] is not args]
        self.push(*args)

    async def _send_push(self, frame: str) -> None:
        try:
            if not self.ws.closed:
                await self.ws.send_str(frame)
        except ConnectionError:
            pass  # the disconnect path hands the record on
        finally:
            self._release(len(frame))


class _DropReads(asyncio.Protocol):
    """What a socket closed for a limit still sends: read and dropped unparsed.
    Its end is handed to aiohttp's protocol, which then finishes the socket."""

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


def _int_param(req: protocol.Request, key: str, default: int, low: int,
               high: int) -> int:
    raw = req.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProtocolError(f"{key} must be an integer") from None
    if not low <= value <= high:
        raise ProtocolError(f"{key} must be between {low} and {high}")
    return value


def _publish_options(metadata: dict) -> dict:
    """Broker options a publisher sets in METADATA (docs/PROTOCOL.md)."""
    options = {}
    key = metadata.get(IDEMPOTENCY_KEY_FIELD)
    if key is not None:
        if not isinstance(key, str) or not 0 < len(key) <= IDEMPOTENCY_KEY_BYTES_MAX:
            raise ProtocolError(f"{IDEMPOTENCY_KEY_FIELD} must be a string of 1-"
                                f"{IDEMPOTENCY_KEY_BYTES_MAX} characters")
        options["dedup_key"] = key
    at = metadata.get(DELIVER_AT_FIELD)
    if at is not None:
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            raise ProtocolError(f"{DELIVER_AT_FIELD} must be ms since the epoch")
        options["deliver_at_ms"] = at
    return options


def _event_name(req: protocol.Request) -> str:
    name = req.get("EVENT_NAME")
    if not _EVENT_NAME.match(name):
        raise ProtocolError(f"EVENT_NAME must be 1-{EVENT_NAME_BYTES_MAX} printable "
                            "ASCII characters without spaces or semicolons")
    return name


# Frames the rate limit counts: control frames too (a ping costs a pong). The
# fragments of one message count once, as the message aiohttp assembles.
# TODO(#6): a flood of tiny fragments costs the node parsing before its
# message is counted; count fragments once aiohttp exposes them.
_COUNTED_FRAMES = (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG)


def _consume_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _metadata(raw: str | None) -> dict:
    if raw is None or raw == "":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError("METADATA is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("METADATA must be a JSON object")
    return value


async def _failed(exc: BrokerError) -> str:
    return exc.wire()


def _monotonic_ms() -> int:
    return int(asyncio.get_running_loop().time() * 1000)
