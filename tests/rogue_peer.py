"""A process that is not a cluster member and talks to a node's Raft port anyway.

    python -m tests.rogue_peer --target HOST:PORT --impersonate HOST:PORT
        [--password SECRET] [--term N] [--attempts join,vote,status,readonly]

It speaks pysyncobj's peer protocol (4-byte length, zlib of a pickle, and with a
password a Fernet token and the random-key handshake), one connection per
attempt, and prints one JSON object: per attempt, how many frames it got back,
their kinds, and whether the node closed the connection.

Attempts:
  vote      claim to be member ``--impersonate``, ask for a vote at ``--term``
  append    claim to be that member and send AppendEntries at ``--term``
  status    pysyncobj's utility command ``status`` (answers with the node's state)
  join      the utility command ``add``: ask to be made a member
  readonly  attach as a read-only node, which is sent the leader's log

Every wait is bounded (``--wait-ms`` per attempt); the process ends by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import struct
import sys
import time
import zlib

from raft.peer_auth import FrameSeal

FRAME_BYTES_MAX = 16 << 20
RECV_BYTES = 65536
WAIT_MS_DEFAULT = 2000
ROGUE_ADDRESS = "127.0.0.1:1"  # what a join asks to add; nothing listens there


class PeerLink:
    """One TCP connection speaking pysyncobj's framing, sealed when given a password."""

    def __init__(self, address: str, password: str | None, wait_ms: int) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=wait_ms / 1000)
        self.fernet = FrameSeal.from_secret(password) if password else None
        self.send_key: bytes | None = None  # the node's key, put in our frames
        self.recv_key: bytes | None = None  # ours, which the node must put in its
        self.buffer = b""
        self.closed_by_peer = False

    def send(self, message) -> None:
        if self.send_key is not None:
            message = (self.send_key, message)
        data = zlib.compress(pickle.dumps(message), 3)
        if self.fernet is not None:
            data = self.fernet.encrypt_at_time(data, int(time.monotonic()))
        try:
            self.sock.sendall(struct.pack("i", len(data)) + data)
        except OSError:
            self.closed_by_peer = True

    def receive(self, deadline_s: float) -> list:
        """Frames that arrive before the deadline or the close, decoded if possible."""
        frames = []
        while time.monotonic() < deadline_s and not self.closed_by_peer:
            frame = self._next_frame()
            if frame is not None:
                frames.append(frame)
                continue
            self.sock.settimeout(max(0.01, deadline_s - time.monotonic()))
            try:
                chunk = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_peer = True
            self.buffer += chunk
        while (frame := self._next_frame()) is not None:
            frames.append(frame)
        return frames

    def _next_frame(self):
        if len(self.buffer) < 4:
            return None
        (length,) = struct.unpack("i", self.buffer[:4])
        if not 0 <= length <= FRAME_BYTES_MAX or len(self.buffer) - 4 < length:
            return None
        data, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
        if self.fernet is not None:
            data = self.fernet.decrypt(data)
        message = pickle.loads(zlib.decompress(data))
        if self.recv_key is not None and isinstance(message, tuple):
            message = message[1]
        return message

    def handshake(self, deadline_s: float) -> bool:
        """With a password: swap random keys as pysyncobj does. True when done."""
        if self.fernet is None:
            return True
        self.recv_key = os.urandom(32)
        self.send(self.recv_key)
        frames = self.receive_one(deadline_s)
        if not frames:
            return False
        self.send_key = frames[0]
        return True

    def receive_one(self, deadline_s: float) -> list:
        while time.monotonic() < deadline_s and not self.closed_by_peer:
            frame = self._next_frame()
            if frame is not None:
                return [frame]
            self.sock.settimeout(max(0.01, deadline_s - time.monotonic()))
            try:
                chunk = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                return []
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_peer = True
            self.buffer += chunk
        return []

    def close(self) -> None:
        self.sock.close()


def messages_for(attempt: str, impersonate: str, term: int) -> list:
    if attempt == "vote":
        return [impersonate, {"type": "request_vote", "term": term,
                              "last_log_index": 10**9, "last_log_term": term}]
    if attempt == "append":
        entry = (b"\x00" + pickle.dumps(("apply_batch", ['{"id":"rogue","ops":[]}'])),
                 10**9, term)
        return [impersonate, {"type": "append_entries", "term": term,
                              "commit_index": 10**9, "entries": [entry],
                              "prevLogIdx": 0, "prevLogTerm": 0}]
    if attempt == "status":
        return [["status"]]
    if attempt == "join":
        return [["add", ROGUE_ADDRESS]]
    if attempt == "readonly":
        return ["readonly"]
    raise ValueError(f"unknown attempt {attempt!r}")


def describe(frame) -> str:
    if isinstance(frame, dict):
        return "dict:" + str(frame.get("type") or sorted(frame)[:4])
    return type(frame).__name__ + ":" + str(frame)[:60]


def run_attempt(args, attempt: str) -> dict:
    deadline_s = time.monotonic() + args.wait_ms / 1000
    result = {"attempt": attempt, "connected": False, "handshake": False,
              "frames": 0, "kinds": [], "closed_by_peer": False}
    try:
        link = PeerLink(args.target, args.password, args.wait_ms)
    except OSError as exc:
        result["error"] = str(exc)
        return result
    result["connected"] = True
    try:
        result["handshake"] = link.handshake(deadline_s)
        if result["handshake"]:
            for message in messages_for(attempt, args.impersonate, args.term):
                link.send(message)
            frames = link.receive(deadline_s)
            result["frames"] = len(frames)
            result["kinds"] = sorted({describe(f) for f in frames})
        result["closed_by_peer"] = link.closed_by_peer
    except Exception as exc:  # a frame we could not decode: report, don't die
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["closed_by_peer"] = link.closed_by_peer
    finally:
        link.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rogue_peer")
    parser.add_argument("--target", required=True, help="a member's Raft host:port")
    parser.add_argument("--impersonate", required=True, help="a member's address")
    parser.add_argument("--password", default=None)
    parser.add_argument("--term", type=int, default=10**6)
    parser.add_argument("--attempts", default="vote,append,status,join,readonly")
    parser.add_argument("--wait-ms", type=int, default=WAIT_MS_DEFAULT)
    args = parser.parse_args(argv)

    results = [run_attempt(args, a) for a in args.attempts.split(",") if a]
    json.dump({"attempts": results}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
