"""A small pipelined client for our own tools (benchmarks, chaos tests, ensyncctl).

The EnSync SDK awaits every reply inside its socket listener, which stalls on
acks (spec 9.2). This client keeps requests outstanding in a FIFO of futures and
resolves them in arrival order, the same pairing rule the server follows, so
hundreds of requests can be in flight on one connection with no task each:
frames wait in an outbox that one writer task sends in order, and a subscriber
may take pushed records through a plain callback instead of the queue.
Payloads are sent as given: this client does not encrypt.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson

from node import proof

# Requests sent and not yet answered on one connection; the caller's window
# should stay far below it. Beyond it, send() fails the request at once.
PENDING_REQUESTS_MAX = 65_536


class ClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    def __init__(self, url: str, on_record=None, tls_context=None) -> None:
        """``on_record(record)``, when given, takes every pushed record on the
        reader's turn of the loop (it must not block); else they queue up in
        ``records`` for ``next_record``. ``tls_context`` (an ``ssl.SSLContext``)
        verifies a wss:// node; None means the system's CAs."""
        self.url = url
        self.tls_context = tls_context
        self.client_id: str | None = None
        self.records: asyncio.Queue = asyncio.Queue()
        self.on_record = on_record
        self._pending: collections.deque = collections.deque()
        self._outbox: collections.deque[str] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None

    async def connect(self, access_key: str, secret_key: str | None = None) -> str:
        """CONN with ``access_key``; with the app's ``secret_key`` (base64) as
        well, prove possession of it first (CHALLENGE, then a signed CONN)."""
        await self.open()
        frame = f"CONN;ACCESS_KEY=:{access_key}"
        if secret_key is not None:
            # Proof of possession (node/proof.py): sign the node's nonce.
            nonce = (await self.request("CHALLENGE")).split("NONCE=", 1)[1]
            signature = proof.sign(secret_key, nonce)
            frame += f";NONCE=:{nonce};SIGNATURE=:{signature}"
        reply = await self.request(frame)
        fields = dict(item.strip().split("=", 1) for item in reply.strip("{}").split(","))
        self.client_id = fields["clientId"]
        return self.client_id

    async def open(self) -> None:
        """Open the socket and start reading, without a CONN."""
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            self.url, max_msg_size=(2 << 20), ssl=self.tls_context or True)
        self._reader = asyncio.create_task(self._read())
        self._writer = asyncio.create_task(self._write())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._writer is not None:
            self._writer.cancel()
        if self._session is not None:
            await self._session.close()

    @property
    def close_code(self) -> int | None:
        """The server's close code once the socket is closed, else None."""
        return None if self._ws is None else self._ws.close_code

    async def wait_closed(self, timeout_s: float) -> bool:
        """True once the socket is closed, False if it is still open after timeout_s."""
        done, _ = await asyncio.wait({self._reader}, timeout=timeout_s)
        return bool(done)

    async def next_record(self, timeout_s: float) -> dict | None:
        """The next pushed record, or None when none arrives within ``timeout_s``.

        Raises ClientError(DISCONNECTED) once the socket is gone and every record
        that arrived before has been taken.
        """
        if not self.records.empty():
            return self.records.get_nowait()
        getter = asyncio.ensure_future(self.records.get())
        done, _ = await asyncio.wait({getter, self._reader}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._reader.done() and self.records.empty():
            raise ClientError("DISCONNECTED", "connection closed")
        return None

    async def request(self, frame: str) -> str:
        """Send one frame and return the text after ``+PASS:``; raise on -FAIL."""
        fut = self.send(frame)
        return await fut

    async def exchange(self, frame: str) -> str:
        """Send one frame and return its whole reply frame, ``-FAIL:`` included."""
        return await self.send(frame, whole=True)

    def send(self, frame: str, whole: bool = False) -> asyncio.Future:
        """Send without waiting; the future resolves with the reply, in order.

        The caller bounds how many are outstanding (its window). ``whole``: the
        future gets the reply frame as it came, and a ``-FAIL:`` does not raise."""
        fut = asyncio.get_running_loop().create_future()
        if self._ws is None or self._ws.closed or (
                self._reader is not None and self._reader.done()):
            # Nobody would ever read the reply: fail now, not at the caller's timeout.
            fut.set_exception(ClientError("DISCONNECTED", "connection closed"))
            return fut
        if len(self._pending) >= PENDING_REQUESTS_MAX:
            fut.set_exception(ClientError(
                "TOO_MANY_PENDING", f"{PENDING_REQUESTS_MAX} requests unanswered"))
            return fut
        self._pending.append((fut, whole))
        self._queue_frame(frame)
        return fut

    def _queue_frame(self, frame: str) -> None:
        self._outbox.append(frame)
        self._outbox_ready.set()

    async def _write(self) -> None:
        """The one task that writes: frames leave in the order they were sent."""
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while self._outbox:
                    await self._ws.send_str(self._outbox.popleft())
        except (ConnectionError, RuntimeError):
            pass  # the reader ends and fails every pending reply

    def publish(self, name: str, to: str, payload_b64: str, metadata: dict | None = None):
        meta = orjson.dumps(metadata or {}).decode()
        return self.send(f"PUB;CLIENT_ID=:{self.client_id};EVENT_NAME=:{name};"
                         f"PAYLOAD=:{payload_b64};DELIVERY_TO=:{to};METADATA=:{meta}")

    def subscribe(self, name: str):
        return self.send(f"SUB;CLIENT_ID=:{self.client_id};EVENT_NAME=:{name}")

    def ack(self, idem: str, block: int, name: str = ""):
        return self.send(f"ACK;CLIENT_ID=:{self.client_id};EVENT_IDEM=:{idem};"
                         f"BLOCK=:{block};EVENT_NAME=:{name}")

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                self._on_frame(msg.data)
        finally:
            while self._pending:
                fut, _ = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(ClientError("DISCONNECTED", "connection closed"))

    def _on_frame(self, text: str) -> None:
        if text.startswith("+RECORD:"):
            record = orjson.loads(text[8:])
            if self.on_record is not None:
                self.on_record(record)
            else:
                self.records.put_nowait(record)
        elif text == "PING":
            self._queue_frame("PONG")
        elif text.startswith(("+PASS:", "+REPLAY:", "-FAIL:")) and self._pending:
            fut, whole = self._pending.popleft()
            if fut.done():
                return
            if whole:
                fut.set_result(text)
            elif text.startswith("-FAIL:"):
                code, _, message = text[6:].partition(";MESSAGE=")
                fut.set_exception(ClientError(code, message))
            else:
                fut.set_result(text[6:] if text[0] == "+" and text[1] == "P" else text[8:])
