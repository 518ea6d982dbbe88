"""A WebSocket client on a bare socket, for what aiohttp's client will not do.

It sends any frame (invalid UTF-8 as TEXT, fragments with control frames in
between, truncated headers) and reads only when told to, so a test can be a
client that never reads. Client frames are masked, as RFC 6455 5.3 requires.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
HANDSHAKE_BYTES_MAX = 16_384


def open_ws(host: str, port: int, timeout_s: float, rcvbuf: int | None = None
            ) -> socket.socket:
    """A socket past the HTTP upgrade of ``/message``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout_s)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /message HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk and len(head) < HANDSHAKE_BYTES_MAX, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = os.urandom(4)
    return header + mask + _masked(payload, mask)


def _masked(payload: bytes, mask: bytes) -> bytes:
    # One big-integer XOR: fast enough for frames of a few MiB.
    if not payload:
        return b""
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(len(payload), "big")


def read_frames(sock: socket.socket, timeout_s: float, bytes_max: int,
                stop=None) -> list[tuple[int, bytes]]:
    """Frames until a close frame, EOF, ``timeout_s``, ``bytes_max`` read, or
    ``stop(frames)`` holds."""
    deadline = time.monotonic() + timeout_s
    buf, frames, total = b"", [], 0
    while time.monotonic() < deadline and total < bytes_max:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        total += len(chunk)
        buf += chunk
        buf = _split(buf, frames)
        if frames and frames[-1][0] == OP_CLOSE:
            break
        if stop is not None and stop(frames):
            break
    return frames


def _split(buf: bytes, frames: list) -> bytes:
    """Move whole server frames (never masked) from ``buf`` into ``frames``."""
    while len(buf) >= 2:
        opcode, size, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if size == 126:
            if len(buf) < 4:
                break
            size, start = struct.unpack("!H", buf[2:4])[0], 4
        elif size == 127:
            if len(buf) < 10:
                break
            size, start = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < start + size:
            break
        frames.append((opcode, buf[start:start + size]))
        buf = buf[start + size:]
    return buf


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
