"""Snapshots as RocksDB checkpoints, checksummed, in pysyncobj's dump file.

The problem: pysyncobj's own snapshot pickles the SyncObj's attributes, which hold
none of our RocksDB data, so a follower that installs it jumps its applied index
without the state. It also streams the dump file to lagging followers in chunks
with no integrity check, and chunks of two transfers can interleave.

The approach: the dump file is ``MAGIC | header length | JSON header | tar``. The
tar is a RocksDB checkpoint taken on the tick thread, where apply also runs, so it
holds exactly the state at pysyncobj's applied index. The header carries that
index, the tar's length and sha256, and pysyncobj's own small tuple (pickled, as
pysyncobj itself does on the same port). On install we verify length and hash,
extract beside the live database, check the applied index inside it, and only
then swap directories. Any mismatch raises, pysyncobj logs it, and the leader
sends the snapshot again.

Rejected: a pointer to an out-of-band transfer (pysyncobj streams the file
itself), and packing in a background thread (simpler first; see the TODO).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import tarfile

from node.errors import BrokerError

MAGIC = b"ENSYNC-SNAPSHOT-1\n"
COPY_CHUNK_BYTES = 1 << 20
log = logging.getLogger("ensync.snapshot")


class SnapshotCorrupt(BrokerError):
    code = "SNAPSHOT_CORRUPT"


def write_snapshot(path: str, checkpoint_dir: str, applied: int, data) -> int:
    """Pack ``checkpoint_dir`` into ``path``; fsync; return the file size.

    The tar streams through a file beside ``path``, never through memory: a
    checkpoint is as large as the database.
    """
    # TODO(#7): pack in a background thread once snapshots grow past a few MB;
    # today the tick thread waits for the tar, which delays heartbeats.
    body_path = path + ".tar"
    with tarfile.open(body_path, mode="w") as tar:
        tar.add(checkpoint_dir, arcname="db")
    tar_bytes, digest = _hash_file(body_path, 0)

    header = json.dumps({
        "applied": applied,
        "tar_bytes": tar_bytes,
        "sha256": digest,
        "raft": base64.b64encode(pickle.dumps(data, 4)).decode(),
    }).encode()
    with open(path, "wb") as f, open(body_path, "rb") as body:
        f.write(MAGIC + struct.pack(">I", len(header)) + header)
        shutil.copyfileobj(body, f, COPY_CHUNK_BYTES)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(body_path)
    return len(MAGIC) + 4 + len(header) + tar_bytes


def _hash_file(path: str, offset: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(COPY_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_header(path: str) -> dict:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SnapshotCorrupt("bad snapshot magic")
        (length,) = struct.unpack(">I", f.read(4))
        header = json.loads(f.read(length))
        header["offset"] = len(MAGIC) + 4 + length
    return header


def raft_data(header: dict):
    return pickle.loads(base64.b64decode(header["raft"]))


def extract(path: str, header: dict, target_dir: str) -> None:
    """Verify the tar against the header and unpack its ``db`` into target_dir."""
    size, digest = _hash_file(path, header["offset"])
    if size != header["tar_bytes"]:
        raise SnapshotCorrupt(
            f"snapshot has {size} bytes, header says {header['tar_bytes']}")
    if digest != header["sha256"]:
        raise SnapshotCorrupt("snapshot checksum mismatch")

    staging = target_dir + ".extract"
    shutil.rmtree(staging, ignore_errors=True)
    with open(path, "rb") as f:
        f.seek(header["offset"])
        with tarfile.open(fileobj=f, mode="r|") as tar:
            tar.extractall(staging, filter="data")
    # pysyncobj renames the received file into place without an fsync, and the
    # journal is cleared right after this returns: make the new state durable first.
    _fsync_tree(os.path.join(staging, "db"))
    shutil.rmtree(target_dir, ignore_errors=True)
    os.rename(os.path.join(staging, "db"), target_dir)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_path(os.path.dirname(os.path.abspath(target_dir)))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)
