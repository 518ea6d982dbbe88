"""A Raft log for pysyncobj that reaches the disk before anyone is told about it.

The problem. Raft's safety argument (Figure 2 of the paper, "persistent state on all
servers") assumes that a server has put an entry, its current term and its vote on
stable storage before it answers an RPC. pysyncobj 0.3.17's ``FileJournal`` writes
entries into an mmap and its ``.meta`` file through a plain rename, and never calls
fsync or msync (upstream issue #84). A follower acknowledges as soon as the bytes sit
in its page cache, and the leader counts itself the moment the entry is in its own
mmap. A power cut on a majority can therefore lose an entry that clients were told
is committed.

The approach. ``DurableJournal`` keeps the whole log in a Python list, as pysyncobj's
journals do, and mirrors it into an append-only file of self-checking records::

    length u32 | crc32 u32 | idx u64 | term u64 | command (length bytes)

little-endian, after an 8-byte magic that carries the format version. The crc covers
length, idx, term and command. ``add()`` encodes the record into a pending buffer and
makes no system call. ``sync()`` writes the buffer and calls ``fdatasync`` once, so
every entry added since the last sync shares one flush (group commit). The caller
decides when: ``raft.durability`` holds outgoing Raft messages while the journal is
``dirty`` and releases them after one ``sync()`` per burst of work. Nothing that
reflects an entry is sent before the entry is durable, which is the property Raft
needs, and a burst of entries costs one flush rather than one per entry.

Recovery trusts nothing after the first bad record. On open we read records until one
is torn (short head, impossible length, data past the end of the file) or corrupt
(crc mismatch, index gap, falling term), truncate the file there and log a warning.
A record that never finished its sync was never acknowledged, so dropping it is what
Raft expects of a crash.

Suffix truncation is lazy. pysyncobj 0.3.17's follower calls ``deleteEntriesFrom``
for everything after ``prevLogIdx`` on every AppendEntries and then adds the
received entries again, even when they are the ones it already had; Raft (section
5.3) deletes only on a conflict. Cutting the file at once would leave a window in
which a follower's disk lacks entries it has acknowledged, and a crash of it and
the leader there can lose a committed entry; it also costs a flush. So the removed
entries leave the list, as pysyncobj expects, but stay in the file and in a
"shadow" list. An ``add()`` identical to the shadow's first entry takes it back
without writing a byte. The first add that differs, a ``clear``, a compaction or
another ``deleteEntriesFrom`` makes the cut real: the file is truncated where the
first unmatched shadow entry starts. ``sync()`` does the same with whatever is left
in the shadow, because a sync promises that the file holds exactly the list. The
truncation and the appends after it share that sync's one flush; until then
nothing that reflects them has been sent, and the scan on open rejects old records
left behind new ones. Compaction writes the kept suffix to a temporary file, fsyncs
it, renames it over the log and fsyncs the directory.

Term and vote live in ``<path>.meta`` (JSON), replaced atomically and fsynced before
``setCurrentTerm`` returns, because a vote that is forgotten after a crash lets a
server vote twice in one term. The commit index shares the file but is saved lazily
on the one-second timer: losing it only means replaying entries the state machine
already guards against.

Rejected options:

* msync of pysyncobj's own mmap after each add: one flush per entry, and its format
  updates a header offset in place, so a torn write is not detectable.
* O_DSYNC writes, or fdatasync inside ``add()``: correct, but one flush per entry.
  400 concurrent calls cost a follower 406 flushes that way and 28 to 49 with group
  commit (tests/raft/test_durability.py, unbatched AppendEntries).
* Keeping the log in RocksDB next to the state machine: suffix truncation and
  compaction become range deletes in a second write-ahead log, and the group-commit
  point would still have to be the message send.
* Truncating and flushing inside ``deleteEntriesFrom`` (this journal's first
  version): the window above, and two flushes where one or none would do.
* Teaching pysyncobj to skip matching entries: it means patching name-mangled
  methods of the library, which ``raft.durability`` avoids on purpose.

Setting ``ENSYNC_UNSAFE_SKIP_FSYNC=1`` makes the log's flushes skip ``fdatasync``
(the bytes are still written). It exists only so the chaos tests can show that their
checker catches a broker that loses acknowledged writes.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence

import orjson
from pysyncobj.journal import Journal

from node.errors import JournalError, JournalFormatError, JournalIOError

logger = logging.getLogger(__name__)

UNSAFE_SKIP_FSYNC_ENV = "ENSYNC_UNSAFE_SKIP_FSYNC"

# Commands are kept far below this (pysyncobj chunks anything over 64 KiB badly); a
# length beyond it on disk can only be a torn or corrupt record.
COMMAND_BYTES_MAX = 64 * 1024 * 1024

# Appends wait in memory until the next sync. Past this size they are written to the
# page cache early (still without a flush) so memory stays bounded.
PENDING_BYTES_MAX = 8 * 1024 * 1024

FILE_MAGIC = b"ENSJRNL\x01"  # name and format version 1
META_FORMAT_VERSION = 1

_RECORD_HEAD = struct.Struct("<IIQQ")  # length, crc32, idx, term
_CRC_HEAD = struct.Struct("<IQQ")  # length, idx, term: what the crc covers
_HEADER_BYTES = len(FILE_MAGIC)

Entry = tuple[bytes, int, int]  # (command, idx, term), the shape pysyncobj expects


@dataclasses.dataclass(frozen=True)
class JournalStatistics:
    entries: int
    file_bytes: int  # bytes in the log file; appends still in memory not counted
    fsync_total: int  # every fsync and fdatasync the journal issued
    fsync_seconds_total: float
    last_sync_entries: int  # entries made durable by the most recent sync()
    last_index: int  # Raft index of the last entry, 0 when empty
    truncations_avoided_total: int  # suffix cuts whose entries all came back unchanged


@dataclasses.dataclass(frozen=True)
class RecordScan:
    entries: list[Entry]
    offsets: list[int]  # file offset of each entry's record
    end_offset: int  # where the last good record ends
    stop_reason: str | None  # why scanning stopped before the end; None if clean


# ---------------------------------------------------------------------------------
# Record codec: pure functions over bytes.


def encode_record(command: bytes, idx: int, term: int) -> bytes:
    length = len(command)
    crc = zlib.crc32(command, zlib.crc32(_CRC_HEAD.pack(length, idx, term)))
    return _RECORD_HEAD.pack(length, crc, idx, term) + command


def scan_records(data: bytes, start_offset: int) -> RecordScan:
    """Decode records from ``start_offset`` until the end or the first bad one."""
    entries: list[Entry] = []
    offsets: list[int] = []
    offset = start_offset
    reason = None

    while offset < len(data):
        reason, entry, next_offset = _decode_one(data, offset, entries)
        if reason is not None:
            break
        entries.append(entry)
        offsets.append(offset)
        offset = next_offset

    return RecordScan(entries, offsets, offset, reason)


def _decode_one(
    data: bytes, offset: int, previous: Sequence[Entry]
) -> tuple[str | None, Entry | None, int]:
    body_offset = offset + _RECORD_HEAD.size
    if body_offset > len(data):
        return "torn record head", None, offset

    length, crc, idx, term = _RECORD_HEAD.unpack_from(data, offset)
    if length > COMMAND_BYTES_MAX:
        return "impossible length", None, offset
    end_offset = body_offset + length
    if end_offset > len(data):
        return "record past end of file", None, offset

    command = data[body_offset:end_offset]
    if zlib.crc32(command, zlib.crc32(_CRC_HEAD.pack(length, idx, term))) != crc:
        return "crc mismatch", None, offset
    # A crash between a truncation and the next flush could in principle leave old
    # records behind new ones; Raft logs never have index gaps or falling terms.
    if previous and idx != previous[-1][1] + 1:
        return "index gap", None, offset
    if previous and term < previous[-1][2]:
        return "term regression", None, offset

    return None, (command, idx, term), end_offset


# ---------------------------------------------------------------------------------
# Small file helpers. Each one maps OSError to JournalIOError at the call site.


def _read_all(fd: int) -> bytes:
    size_bytes = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size_bytes:
        chunk = os.pread(fd, size_bytes - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _skip_fsync_requested() -> bool:
    return os.environ.get(UNSAFE_SKIP_FSYNC_ENV, "") == "1"


# ---------------------------------------------------------------------------------


class DurableJournal(Journal):
    """pysyncobj journal whose entries, term and vote are flushed before they count.

    All mutating methods run on pysyncobj's tick thread. ``statistics()`` may be read
    from any thread; it returns a snapshot of plain counters without locking.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._dir_path = os.path.dirname(os.path.abspath(self._path))
        self._skip_fsync = _skip_fsync_requested()
        if self._skip_fsync:
            logger.warning(
                "journal=%s unsafe_skip_fsync=1 log flushes are disabled, "
                "acknowledged entries can be lost",
                self._path,
            )

        self._entries: list[Entry] = []
        self._offsets: list[int] = []
        # Entries removed by the last deleteEntriesFrom whose records are still in
        # the file, right after the list's, each with its offset. See the essay.
        self._shadow: deque[tuple[Entry, int]] = deque()
        self._pending = bytearray()
        self._written_bytes = 0  # size of the file; pending bytes start here
        self._needs_fdatasync = False  # written bytes not yet flushed
        self._unsynced_entries = 0
        self._last_index = 0
        self._failure: JournalIOError | None = None

        self._fsync_total = 0
        self._fsync_seconds_total = 0.0
        # Called with the seconds of each fsync, on the thread that issued it;
        # the node hangs its latency histogram here. It must not raise.
        self.fsync_observer: Callable[[float], None] | None = None
        self._last_sync_entries = 0
        self._truncations_avoided_total = 0

        self._current_term = 0
        self._voted_for_node_id: str | None = None
        self._commit_index = 1
        self._commit_index_saved = True

        self._fd = self._open_log()
        meta_found = self._load_meta()
        if not meta_found and self._entries and self._entries[-1][2] > 0:
            os.close(self._fd)
            # Terms above 0 are only appended after the meta was written. Without
            # it we would not know whom we voted for, and could vote twice.
            raise JournalFormatError(self._path, "meta file missing")

    # -- pysyncobj's Journal interface ----------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)  # no copy for bytes; freezes a bytearray
        if len(command) > COMMAND_BYTES_MAX:
            raise ValueError(f"command of {len(command)} bytes exceeds journal limit")
        assert idx > 0
        assert not self._entries or idx == self._entries[-1][1] + 1
        assert not self._entries or term >= self._entries[-1][2]

        # pysyncobj re-adds what it just deleted; those bytes are still in the file.
        if self._shadow:
            if self._shadow[0][0] == (command, idx, term):
                self._take_back_shadow_head()
                return
            self._cut_shadow()

        self._offsets.append(self._written_bytes + len(self._pending))
        self._pending += encode_record(command, idx, term)
        self._entries.append((command, idx, term))
        self._unsynced_entries += 1
        self._last_index = idx

        if len(self._pending) >= PENDING_BYTES_MAX:
            self._write_pending()

    def clear(self) -> None:
        self.deleteEntriesFrom(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries from position ``entryFrom`` (not a Raft index) to the end.

        Records already in the file stay there, in the shadow, until an add differs
        from them or the next sync; see the module essay.
        """
        assert entryFrom >= 0
        if entryFrom >= len(self._entries):
            return

        cut_offset = self._offsets[entryFrom]
        if cut_offset < self._written_bytes:
            # An older shadow would no longer sit right after the list in the file.
            self._cut_shadow()
            self._shadow_file_entries(entryFrom)

        # Entries that never left memory are simply forgotten.
        del self._pending[max(0, cut_offset - self._written_bytes) :]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        self._last_index = self._entries[-1][1] if self._entries else 0
        self._unsynced_entries = min(self._unsynced_entries, len(self._entries))

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries before position ``entryTo`` (compaction after a snapshot)."""
        assert entryTo >= 0
        if entryTo == 0:
            return

        # The new file holds only the list, so it also makes any shadow cut real.
        kept = self._entries[entryTo:]
        image, offsets = self._encode_file(kept)
        self._replace_log(image)
        self._shadow.clear()

        self._entries = kept
        self._offsets = offsets
        self._last_index = kept[-1][1] if kept else 0
        self._unsynced_entries = 0

    def __getitem__(self, item):  # int or slice, negative allowed, like a list
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._failure is None:
                self.sync()
                self._save_commit_index()
        finally:
            os.close(self._fd)
            self._fd = -1

    def flush(self) -> None:
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex != self._commit_index:
            self._commit_index = raftCommitIndex
            self._commit_index_saved = False

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Record term and vote; both are on disk when this returns."""
        assert votedForNodeId is None or isinstance(votedForNodeId, str)
        assert term >= self._current_term
        if (term, votedForNodeId) == (self._current_term, self._voted_for_node_id):
            return

        self._current_term = term
        self._voted_for_node_id = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return self._current_term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for_node_id

    def onOneSecondTimer(self) -> None:
        self._save_commit_index()

    # -- group commit ------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """True when some entry is not known to be on stable storage.

        A shadow not yet cut also counts: the file holds more than the list. A
        failed journal stays dirty for good: it can promise nothing.
        """
        return (
            bool(self._pending)
            or self._needs_fdatasync
            or bool(self._shadow)
            or self.failed
        )

    @property
    def failed(self) -> bool:
        """True after a write or flush failed; the process should then stop."""
        return self._failure is not None

    def sync(self) -> bool:
        """Make every added entry durable with one flush. False if nothing to do."""
        if self._failure is not None:
            raise self._failure
        if not self.dirty:
            return False

        # The cut comes first so new records land where the list ends; one flush
        # then covers both.
        self._cut_shadow()
        self._write_pending()
        self._fdatasync_log()

        self._last_sync_entries = self._unsynced_entries
        self._unsynced_entries = 0
        return True

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            entries=len(self._entries),
            file_bytes=self._written_bytes,
            fsync_total=self._fsync_total,
            fsync_seconds_total=self._fsync_seconds_total,
            last_sync_entries=self._last_sync_entries,
            last_index=self._last_index,
            truncations_avoided_total=self._truncations_avoided_total,
        )

    @property
    def path(self) -> str:
        return self._path

    # -- opening and recovery ----------------------------------------------------------

    def _open_log(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self._path, flags, 0o644)
        except OSError as exc:
            raise JournalIOError(self._path, f"open failed: {exc}") from exc

        try:
            self._recover(fd, _read_all(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _recover(self, fd: int, data: bytes) -> None:
        # A file shorter than the magic is a creation that never finished.
        if len(data) < _HEADER_BYTES:
            if not FILE_MAGIC.startswith(data):
                raise JournalFormatError(self._path, "not an ensync journal")
            self._initialise_file(fd)
            return
        if data[:_HEADER_BYTES] != FILE_MAGIC:
            raise JournalFormatError(self._path, "not an ensync journal")

        scan = scan_records(data, _HEADER_BYTES)
        self._entries = scan.entries
        self._offsets = scan.offsets
        self._written_bytes = scan.end_offset
        self._last_index = scan.entries[-1][1] if scan.entries else 0

        if scan.end_offset < len(data):
            self._drop_bad_tail(fd, scan, len(data))

    def _initialise_file(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, FILE_MAGIC, 0)
            self._timed_fsync(os.fsync, fd)
            self._fsync_dir()
        except OSError as exc:
            raise JournalIOError(self._path, f"create failed: {exc}") from exc
        self._written_bytes = _HEADER_BYTES

    def _drop_bad_tail(self, fd: int, scan: RecordScan, size_bytes: int) -> None:
        logger.warning(
            "journal=%s dropped bad tail reason=%r entries_kept=%d "
            "bytes_dropped=%d last_index=%d",
            self._path,
            scan.stop_reason,
            len(scan.entries),
            size_bytes - scan.end_offset,
            self._last_index,
        )
        try:
            os.ftruncate(fd, scan.end_offset)
            self._timed_fsync(os.fdatasync, fd)
        except OSError as exc:
            raise JournalIOError(self._path, f"truncate failed: {exc}") from exc

    # -- writing the log ---------------------------------------------------------------

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._failure is not None:
            raise self._failure

        # Consume the buffer as it is written, so a failed write leaves the journal
        # knowing exactly which bytes reached the file.
        try:
            while self._pending:
                written = os.pwrite(self._fd, self._pending, self._written_bytes)
                del self._pending[:written]
                self._written_bytes += written
                self._needs_fdatasync = True
        except OSError as exc:
            self._fail(f"write failed: {exc}", exc)

    def _fdatasync_log(self) -> None:
        if self._skip_fsync:
            self._needs_fdatasync = False
            return
        try:
            self._timed_fsync(os.fdatasync, self._fd)
        except OSError as exc:
            self._fail(f"fdatasync failed: {exc}", exc)
        self._needs_fdatasync = False

    # -- lazy suffix truncation -------------------------------------------------------

    def _shadow_file_entries(self, entryFrom: int) -> None:
        """Keep the entries from ``entryFrom`` whose records are in the file."""
        assert not self._shadow
        if self._failure is not None:
            raise self._failure

        # Records past the file's end are pending bytes, dropped by the caller.
        file_end = bisect.bisect_left(self._offsets, self._written_bytes, entryFrom)
        self._shadow.extend(
            zip(self._entries[entryFrom:file_end], self._offsets[entryFrom:file_end])
        )

    def _take_back_shadow_head(self) -> None:
        assert not self._pending
        entry, offset = self._shadow.popleft()
        assert offset == self._list_end_offset()

        self._entries.append(entry)
        self._offsets.append(offset)
        self._last_index = entry[1]
        if not self._shadow:
            self._truncations_avoided_total += 1

    def _cut_shadow(self) -> None:
        """Truncate the file where the list ends; the next sync makes it durable."""
        if not self._shadow:
            return
        assert not self._pending

        cut_offset = self._shadow[0][1]
        self._truncate_file(cut_offset)
        self._shadow.clear()

    def _list_end_offset(self) -> int:
        if not self._entries:
            return _HEADER_BYTES
        return self._offsets[-1] + _RECORD_HEAD.size + len(self._entries[-1][0])

    def _truncate_file(self, cut_offset: int) -> None:
        assert _HEADER_BYTES <= cut_offset <= self._written_bytes
        if self._failure is not None:
            raise self._failure

        try:
            os.ftruncate(self._fd, cut_offset)
        except OSError as exc:
            self._fail(f"truncate failed: {exc}", exc)
        self._written_bytes = cut_offset
        self._needs_fdatasync = True

    def _encode_file(self, entries: list[Entry]) -> tuple[bytearray, list[int]]:
        image = bytearray(FILE_MAGIC)
        offsets = []
        for command, idx, term in entries:
            offsets.append(len(image))
            image += encode_record(command, idx, term)
        return image, offsets

    def _replace_log(self, image: bytearray) -> None:
        """Swap in a new log file atomically; the old descriptor is closed."""
        if self._failure is not None:
            raise self._failure

        # Until the rename the old log is untouched, so a failure here only skips
        # this compaction.
        tmp_path = self._path + ".tmp"
        try:
            self._write_durable_file(tmp_path, image)
            new_fd = os.open(tmp_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalIOError(self._path, f"compaction failed: {exc}") from exc
        try:
            os.replace(tmp_path, self._path)
        except OSError as exc:
            os.close(new_fd)
            raise JournalIOError(self._path, f"compaction failed: {exc}") from exc

        os.close(self._fd)
        self._fd = new_fd
        self._pending.clear()
        self._written_bytes = len(image)
        self._needs_fdatasync = False

        # If the rename is not durable, a crash would bring back the old file
        # without the entries appended from now on.
        try:
            self._fsync_dir()
        except OSError as exc:
            self._fail(f"directory fsync failed: {exc}", exc)

    def _fail(self, reason: str, exc: OSError) -> None:
        # After a failed flush Linux may drop the dirty pages and report success on
        # the next try, so a later sync() could lie. Refuse them all instead.
        self._failure = JournalIOError(self._path, reason)
        logger.error("journal=%s failed reason=%r refusing syncs", self._path, reason)
        raise self._failure from exc

    # -- meta: term, vote and commit index ---------------------------------------------

    def _load_meta(self) -> bool:
        """Load term, vote and commit index. False if there is no meta file yet."""
        try:
            with open(self._meta_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise JournalIOError(self._path, f"meta read failed: {exc}") from exc

        try:
            meta = orjson.loads(raw)
            _check_meta_shape(meta)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            # Guessing term 0 here could let this server vote twice in one term.
            raise JournalFormatError(self._path, f"meta unreadable: {exc}") from exc

        self._current_term = meta["current_term"]
        self._voted_for_node_id = meta["voted_for_node_id"]
        self._commit_index = meta["raft_commit_index"]
        return True

    def _save_commit_index(self) -> None:
        if self._commit_index_saved:
            return
        # Never let the saved commit index run ahead of the entries on disk.
        self.sync()
        self._store_meta()

    def _store_meta(self) -> None:
        meta = {
            "format": META_FORMAT_VERSION,
            "current_term": self._current_term,
            "voted_for_node_id": self._voted_for_node_id,
            "raft_commit_index": self._commit_index,
        }
        if self._failure is not None:
            raise self._failure

        tmp_path = self._meta_path + ".tmp"
        try:
            self._write_durable_file(tmp_path, orjson.dumps(meta))
            os.replace(tmp_path, self._meta_path)
            self._fsync_dir()
        except OSError as exc:
            self._fail(f"meta write failed: {exc}", exc)
        self._commit_index_saved = True

    @property
    def _meta_path(self) -> str:
        return self._path + ".meta"

    # -- flushing helpers --------------------------------------------------------------

    def _write_durable_file(self, path: str, data: bytes | bytearray) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            _write_all(fd, data, 0)
            self._timed_fsync(os.fsync, fd)
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._timed_fsync(os.fsync, fd)
        finally:
            os.close(fd)

    def _timed_fsync(self, flush: Callable[[int], None], fd: int) -> None:
        started = time.monotonic()
        try:
            flush(fd)
        finally:
            elapsed_s = time.monotonic() - started
            self._fsync_total += 1
            self._fsync_seconds_total += elapsed_s
            if self.fsync_observer is not None:
                self.fsync_observer(elapsed_s)


def _check_meta_shape(meta: object) -> None:
    """Raise TypeError or ValueError unless this version can read ``meta``."""
    if not isinstance(meta, dict):
        raise TypeError("meta is not an object")
    if meta.get("format") != META_FORMAT_VERSION:
        raise ValueError(f"unknown meta format {meta.get('format')!r}")
    if not isinstance(meta.get("current_term"), int):
        raise TypeError("current_term missing")
    if not isinstance(meta.get("raft_commit_index"), int):
        raise TypeError("raft_commit_index missing")
    voted = meta.get("voted_for_node_id")
    if voted is not None and not isinstance(voted, str):
        raise TypeError("voted_for_node_id is not a string")
