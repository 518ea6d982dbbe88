"""A small pipelined client for our own tools (benchmarks, chaos tests, ensyncctl).

The EnSync SDK awaits every reply inside its socket listener, which stalls on
acks (spec 9.2). This client keeps requests outstanding in a FIFO of futures and
resolves them in arrival order, the same pairing rule the server follows, so
hundreds of requests can be in flight on one connection with no task each.
Payloads are sent as given: this client does not encrypt.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson


class ClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id: str | None = None
        self.records: asyncio.Queue = asyncio.Queue()
        self._pending: collections.deque = collections.deque()
        self._session: aiohttp.ClientSession | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None

    async def connect(self, access_key: str) -> str:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url, max_msg_size=(2 << 20))
        self._reader = asyncio.create_task(self._read())
        reply = await self.request(f"CONN;ACCESS_KEY=:{access_key}")
        fields = dict(item.strip().split("=", 1) for item in reply.strip("{}").split(","))
        self.client_id = fields["clientId"]
        return self.client_id

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
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

    def send(self, frame: str) -> asyncio.Future:
        """Send without waiting; the future resolves with the reply, in order.

        The caller bounds how many are outstanding (its window)."""
        fut = asyncio.get_running_loop().create_future()
        if self._ws is None or self._ws.closed or (
                self._reader is not None and self._reader.done()):
            # Nobody would ever read the reply: fail now, not at the caller's timeout.
            fut.set_exception(ClientError("DISCONNECTED", "connection closed"))
            return fut
        self._pending.append(fut)
        asyncio.ensure_future(self._send_or_fail(frame))
        return fut

    async def _send_or_fail(self, frame: str) -> None:
        try:
            await self._ws.send_str(frame)
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
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(ClientError("DISCONNECTED", "connection closed"))

    def _on_frame(self, text: str) -> None:
        if text.startswith("+RECORD:"):
            self.records.put_nowait(orjson.loads(text[8:]))
        elif text == "PING":
            asyncio.ensure_future(self._ws.send_str("PONG"))
        elif text.startswith(("+PASS:", "+REPLAY:", "-FAIL:")) and self._pending:
            fut = self._pending.popleft()
            if fut.done():
                return
            if text.startswith("-FAIL:"):
                code, _, message = text[6:].partition(";MESSAGE=")
                fut.set_exception(ClientError(code, message))
            else:
                fut.set_result(text[6:] if text[0] == "+" and text[1] == "P" else text[8:])
