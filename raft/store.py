"""RocksDB through rocksdict: the applied state, one write batch per Raft entry.

Every batch carries ``m/applied`` with the entry's index, so after a crash the
database is exactly the state of some prefix of the log, and the apply step can
skip entries it already holds (pysyncobj replays the whole journal at start).

Writes are not synced: the Raft journal is, and every entry after the last
snapshot is still in it. A snapshot is a RocksDB checkpoint, whose SST files
RocksDB syncs when it writes them.

All calls happen on pysyncobj's tick thread or under the broker lock; ``reopen``
exists for the snapshot install, which swaps the directory under a closed handle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct

from rocksdict import AccessType, Checkpoint, Options, Rdict, WriteBatch

from raft import schema

_LOADED_PREFIXES = (b"a/", b"b/", b"k/", b"m/", b"r/", b"s/", b"u/", b"x/")


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return opts


def encode_index(index: int) -> bytes:
    return struct.pack(">Q", index)


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db: Rdict | None = None
        self.applied_index = 0
        self.open()

    def open(self) -> None:
        assert self.db is None
        self.db = Rdict(self.path, _options())
        raw = self.db.get(schema.APPLIED)
        self.applied_index = struct.unpack(">Q", raw)[0] if raw else 0

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def write(self, writes: dict[bytes, bytes | None], index: int) -> None:
        assert index > self.applied_index

        batch = WriteBatch(raw_mode=True)
        for key, value in writes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(schema.APPLIED, encode_index(index))
        self.db.write(batch)
        self.applied_index = index

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def scan_prefix(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with ``prefix``, in key order."""
        assert prefix

        rows = []
        for key, value in self.db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            rows.append((key, value))
        return rows

    def state_rows(self):
        """What ``BrokerState.load`` reads: every row but the per-event ones
        (records, delivery states, history, queue index), in key order."""
        for prefix in _LOADED_PREFIXES:
            for key, value in self.db.items(from_key=prefix):
                if not key.startswith(prefix):
                    break
                yield key, value

    def scan(self, prefix: bytes, start: bytes, limit: int | None) -> list[bytes]:
        """Keys under ``prefix`` from ``start`` on, at most ``limit`` of them."""
        found = []
        for key in self.db.keys(from_key=start):
            if not key.startswith(prefix) or (limit is not None and len(found) >= limit):
                break
            found.append(key)
        return found

    def digest(self) -> str:
        h = hashlib.sha256()
        for key, value in self.db.items():
            h.update(struct.pack(">II", len(key), len(value)))
            h.update(key)
            h.update(value)
        return h.hexdigest()

    def checkpoint(self, target: str) -> None:
        if os.path.exists(target):
            shutil.rmtree(target)
        Checkpoint(self.db).create_checkpoint(target)


def applied_index_of(path: str) -> int:
    """The applied index stored in a closed database directory, read-only."""
    db = Rdict(path, _options(), access_type=AccessType.read_only())
    try:
        raw = db.get(schema.APPLIED)
        return struct.unpack(">Q", raw)[0] if raw else 0
    finally:
        db.close()
