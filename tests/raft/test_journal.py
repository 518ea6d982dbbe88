"""DurableJournal against real files in a temp directory.

A "crash" here is a copy of the journal's files taken while the journal is still
open: it holds what the process had handed to the kernel, and nothing that was
still buffered in memory. Power loss (losing the page cache) cannot be staged in a
test; the strace tests show where the flushes happen instead.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raft.journal import (
    FILE_MAGIC,
    UNSAFE_SKIP_FSYNC_ENV,
    DurableJournal,
    JournalFormatError,
    JournalIOError,
    encode_record,
    scan_records,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _safe_by_default(monkeypatch):
    monkeypatch.delenv(UNSAFE_SKIP_FSYNC_ENV, raising=False)


def _fill(journal: DurableJournal, first_idx: int, count: int, term: int = 1) -> None:
    # pysyncobj always records a term before it appends entries of that term.
    if term > journal.getCurrentTerm():
        journal.setCurrentTerm(term, None)
    for idx in range(first_idx, first_idx + count):
        journal.add(b"cmd-%d" % idx, idx, term)


def _crash_copy(journal: DurableJournal, into: Path) -> str:
    """The files as a crash would leave them, copied to a fresh directory."""
    into.mkdir()
    for suffix in ("", ".meta"):
        if os.path.exists(journal.path + suffix):
            shutil.copy(journal.path + suffix, into / ("journal" + suffix))
    return str(into / "journal")


def _indexes(journal: DurableJournal) -> list[int]:
    return [entry[1] for entry in journal[:]]


# -- round trip ---------------------------------------------------------------------


def test_synced_entries_come_back_after_reopen(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 5)
    journal.sync()
    journal._destroy()

    reopened = DurableJournal(path)
    assert len(reopened) == 5
    assert reopened[0] == (b"cmd-1", 1, 1)
    assert reopened[-1] == (b"cmd-5", 5, 1)
    assert reopened[1:3] == [(b"cmd-2", 2, 1), (b"cmd-3", 3, 1)]
    assert reopened[-2:] == [(b"cmd-4", 4, 1), (b"cmd-5", 5, 1)]
    assert reopened.statistics().last_index == 5
    reopened._destroy()


def test_entries_never_synced_are_lost_in_a_crash_and_synced_ones_are_not(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 3)
    journal.sync()
    _fill(journal, 4, 2)

    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert _indexes(recovered) == [1, 2, 3]


def test_a_new_journal_file_starts_with_the_magic(tmp_path):
    path = tmp_path / "journal"
    DurableJournal(path)._destroy()
    assert path.read_bytes() == FILE_MAGIC


def test_a_file_that_is_not_ours_is_refused_not_truncated(tmp_path):
    path = tmp_path / "journal"
    foreign = b"PYSYNCOBJ\0" + b"\0" * 64
    path.write_bytes(foreign)

    with pytest.raises(JournalFormatError):
        DurableJournal(path)
    assert path.read_bytes() == foreign


# -- suffix truncation (pysyncobj's follower does this often) ------------------------


def test_suffix_truncation_survives_reopen(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 6)
    journal.sync()

    journal.deleteEntriesFrom(3)
    _fill(journal, 4, 2, term=2)
    journal.sync()
    journal._destroy()

    reopened = DurableJournal(path)
    assert [(e[1], e[2]) for e in reopened[:]] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 2),
        (5, 2),
    ]


def test_truncation_with_nothing_re_added_is_cut_by_the_next_sync(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 6)
    journal.sync()
    before = journal.statistics().fsync_total

    journal.deleteEntriesFrom(2)
    assert _indexes(journal) == [1, 2]
    assert journal.dirty  # the file still holds more than the list
    untouched = DurableJournal(_crash_copy(journal, tmp_path / "before-sync"))
    assert _indexes(untouched) == [1, 2, 3, 4, 5, 6]

    assert journal.sync() is True
    assert not journal.dirty
    assert journal.statistics().fsync_total == before + 1
    recovered = DurableJournal(_crash_copy(journal, tmp_path / "after-sync"))
    assert _indexes(recovered) == [1, 2]


def test_truncation_of_unsynced_entries_touches_no_file(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 2)
    journal.sync()
    _fill(journal, 3, 4)
    before = journal.statistics()

    journal.deleteEntriesFrom(3)
    assert journal.statistics().fsync_total == before.fsync_total
    assert journal.statistics().file_bytes == before.file_bytes

    journal.sync()
    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert _indexes(recovered) == [1, 2, 3]


def test_clear_then_add_survives_reopen(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 4)
    journal.sync()

    journal.clear()
    journal.setCurrentTerm(3, None)
    journal.add(b"snap-a", 40, 3)
    journal.add(b"snap-b", 41, 3)
    journal._destroy()

    assert _indexes(DurableJournal(path)) == [40, 41]


# -- lazy suffix truncation (pysyncobj re-adds what it just deleted) ----------------


def _record_offset(idx: int) -> int:
    """Where ``_fill``'s record for ``idx`` starts, all earlier entries in term 1."""
    sizes = (len(encode_record(b"cmd-%d" % i, i, 1)) for i in range(1, idx))
    return len(FILE_MAGIC) + sum(sizes)


def _forbid_file_changes(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the journal touched its file")

    for name in ("pwrite", "ftruncate", "fdatasync", "fsync"):
        monkeypatch.setattr(os, name, refuse)


def test_identical_re_append_after_truncation_writes_and_flushes_nothing(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 6)
    journal.sync()
    before = journal.statistics()
    file_before = Path(path).read_bytes()

    _forbid_file_changes(monkeypatch)
    journal.deleteEntriesFrom(2)
    _fill(journal, 3, 4)
    assert not journal.dirty
    assert journal.sync() is False
    monkeypatch.undo()

    after = journal.statistics()
    assert after.fsync_total == before.fsync_total
    assert after.truncations_avoided_total == before.truncations_avoided_total + 1
    assert after.last_index == 6
    assert Path(path).read_bytes() == file_before
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [1, 2, 3, 4, 5, 6]


def test_appends_after_an_identical_re_append_follow_the_old_records(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 4)
    journal.sync()
    before = journal.statistics().fsync_total

    journal.deleteEntriesFrom(1)
    _fill(journal, 2, 5)  # 2..4 come back, 5 and 6 are new
    assert journal.dirty
    journal.sync()

    assert journal.statistics().fsync_total == before + 1
    assert journal.statistics().truncations_avoided_total == 1
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [1, 2, 3, 4, 5, 6]


def test_different_entry_after_truncation_cuts_the_file_there(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 6)
    journal.sync()
    journal.setCurrentTerm(2, None)
    before = journal.statistics().fsync_total

    journal.deleteEntriesFrom(3)
    journal.add(b"new-4", 4, 2)
    assert os.path.getsize(path) == _record_offset(4)
    journal.sync()

    after = journal.statistics()
    assert after.fsync_total == before + 1  # one flush for the cut and the append
    assert after.truncations_avoided_total == 0
    journal._destroy()
    reopened = DurableJournal(path)
    assert _indexes(reopened) == [1, 2, 3, 4]
    assert reopened[2:] == [(b"cmd-3", 3, 1), (b"new-4", 4, 2)]


def test_partial_match_keeps_identical_records_and_cuts_at_the_first_difference(
    tmp_path,
):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 6)
    journal.sync()
    kept_prefix = Path(path).read_bytes()[: _record_offset(4)]

    journal.deleteEntriesFrom(1)
    _fill(journal, 2, 2)  # idx 2 and 3, as before
    journal.setCurrentTerm(2, None)
    journal.add(b"new-4", 4, 2)
    journal.add(b"new-5", 5, 2)
    journal.sync()

    assert journal.statistics().truncations_avoided_total == 0
    assert Path(path).read_bytes().startswith(kept_prefix)
    journal._destroy()
    reopened = DurableJournal(path)
    assert reopened[1:] == [(b"cmd-2", 2, 1), (b"cmd-3", 3, 1)] + [
        (b"new-4", 4, 2),
        (b"new-5", 5, 2),
    ]


def test_truncation_that_reaches_past_the_file_drops_the_unwritten_entries(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 4)
    journal.sync()
    _fill(journal, 5, 2)  # still pending
    file_bytes = journal.statistics().file_bytes

    journal.deleteEntriesFrom(2)
    _fill(journal, 3, 2)
    assert journal.statistics().file_bytes == file_bytes
    journal.add(b"other-5", 5, 1)
    journal.sync()
    journal._destroy()

    reopened = DurableJournal(path)
    assert _indexes(reopened) == [1, 2, 3, 4, 5]
    assert reopened[-1][0] == b"other-5"


def test_a_second_truncation_makes_the_first_real(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 8)
    journal.sync()

    journal.deleteEntriesFrom(6)  # idx 7 and 8 wait in the shadow
    journal.deleteEntriesFrom(3)
    assert os.path.getsize(path) == _record_offset(7)
    _fill(journal, 4, 3)  # idx 4..6 come back unchanged
    assert journal.statistics().truncations_avoided_total == 1
    assert journal.dirty  # the cut of 7 and 8 is not flushed yet

    journal.sync()
    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert _indexes(recovered) == [1, 2, 3, 4, 5, 6]


def test_compaction_during_a_pending_truncation_keeps_only_the_list(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 10)
    journal.sync()

    journal.deleteEntriesFrom(6)  # idx 7..10 wait in the shadow
    journal.deleteEntriesTo(2)
    assert _indexes(journal) == [3, 4, 5, 6]
    assert not journal.dirty
    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert _indexes(recovered) == [3, 4, 5, 6]

    # The shadow is gone with the old file: idx 7 is written again.
    _fill(journal, 7, 1)
    assert journal.dirty
    journal.sync()
    assert journal.statistics().truncations_avoided_total == 0
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [3, 4, 5, 6, 7]


def test_truncation_after_compaction_uses_the_new_offsets(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 10)
    journal.deleteEntriesTo(4)  # idx 5..10 in the new file

    _forbid_file_changes(monkeypatch)
    journal.deleteEntriesFrom(2)
    _fill(journal, 7, 4)
    monkeypatch.undo()

    assert not journal.dirty
    assert journal.statistics().truncations_avoided_total == 1
    journal.deleteEntriesFrom(3)
    journal.sync()
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [5, 6, 7]


def test_clear_during_a_pending_truncation_then_new_entries(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 6)
    journal.sync()

    journal.deleteEntriesFrom(3)
    _fill(journal, 4, 1)  # idx 4 back; 5 and 6 still in the shadow
    journal.clear()
    assert os.path.getsize(path) == _record_offset(5)
    assert len(journal) == 0

    journal.setCurrentTerm(3, None)
    journal.add(b"snap-a", 40, 3)
    journal.sync()
    journal._destroy()
    assert DurableJournal(path)[:] == [(b"snap-a", 40, 3)]


def test_clear_then_the_same_entries_again_writes_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 3)
    journal.sync()

    _forbid_file_changes(monkeypatch)
    journal.clear()
    _fill(journal, 1, 3)
    assert journal.sync() is False
    monkeypatch.undo()

    assert journal.statistics().truncations_avoided_total == 1
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [1, 2, 3]


def test_destroy_cuts_a_pending_truncation(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 5)
    journal.sync()

    journal.deleteEntriesFrom(1)
    journal._destroy()
    assert _indexes(DurableJournal(path)) == [1]


def test_a_failed_journal_refuses_to_truncate_into_its_file(tmp_path, monkeypatch):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 2)
    journal.sync()
    _fill(journal, 3, 1)

    def broken_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
    with pytest.raises(JournalIOError):
        journal.sync()
    monkeypatch.undo()

    with pytest.raises(JournalIOError):
        journal.deleteEntriesFrom(1)
    assert _indexes(journal) == [1, 2, 3]


# -- compaction ---------------------------------------------------------------------


def test_compaction_keeps_the_suffix_across_reopen(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 10)
    journal.sync()
    _fill(journal, 11, 2)  # still pending: compaction must keep these too

    journal.deleteEntriesTo(7)
    assert _indexes(journal) == [8, 9, 10, 11, 12]
    assert not journal.dirty
    assert not os.path.exists(path + ".tmp")

    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert _indexes(recovered) == [8, 9, 10, 11, 12]


def test_appends_and_truncation_after_compaction_use_the_new_file(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 10)
    journal.deleteEntriesTo(5)

    _fill(journal, 11, 3)
    journal.deleteEntriesFrom(6)  # cuts idx 12 and 13
    journal.sync()
    journal._destroy()

    assert _indexes(DurableJournal(path)) == [6, 7, 8, 9, 10, 11]


# -- torn and corrupt tails ---------------------------------------------------------


def _synced_file(tmp_path: Path, count: int) -> tuple[str, int]:
    """A closed journal of ``count`` entries and the offset of its last record."""
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, count)
    journal._destroy()
    last_bytes = len(encode_record(b"cmd-%d" % count, count, 1))
    return path, os.path.getsize(path) - last_bytes


def test_torn_last_record_is_dropped_and_appends_continue(tmp_path, caplog):
    path, last_offset = _synced_file(tmp_path, 5)
    os.truncate(path, os.path.getsize(path) - 3)

    with caplog.at_level(logging.WARNING, logger="raft.journal"):
        journal = DurableJournal(path)
    assert _indexes(journal) == [1, 2, 3, 4]
    assert os.path.getsize(path) == last_offset
    assert "entries_kept=4" in caplog.text

    journal.add(b"again", 5, 1)
    journal.sync()
    journal._destroy()
    assert DurableJournal(path)[-1] == (b"again", 5, 1)


def test_flipped_byte_drops_that_record_and_everything_after(tmp_path, caplog):
    path, _ = _synced_file(tmp_path, 5)
    data = bytearray(Path(path).read_bytes())
    third = len(FILE_MAGIC) + 2 * len(encode_record(b"cmd-1", 1, 1))
    data[third + 26] ^= 0x01  # inside the command of idx 3
    Path(path).write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="raft.journal"):
        journal = DurableJournal(path)
    assert _indexes(journal) == [1, 2]
    assert "crc mismatch" in caplog.text


def test_impossible_length_is_treated_as_a_torn_tail(tmp_path):
    path, _ = _synced_file(tmp_path, 3)
    with open(path, "ab") as f:
        f.write(b"\xff" * 40)

    assert _indexes(DurableJournal(path)) == [1, 2, 3]


def test_scan_stops_at_an_index_gap_or_a_falling_term():
    good = encode_record(b"a", 1, 2) + encode_record(b"b", 2, 2)

    gap = scan_records(good + encode_record(b"c", 4, 2), 0)
    assert [e[1] for e in gap.entries] == [1, 2]
    assert gap.stop_reason == "index gap"

    falling = scan_records(good + encode_record(b"c", 3, 1), 0)
    assert falling.stop_reason == "term regression"
    assert falling.end_offset == len(good)


# -- term, vote and commit index ----------------------------------------------------


def test_term_and_vote_are_on_disk_when_set_current_term_returns(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    journal.setCurrentTerm(7, "127.0.0.1:4001")

    recovered = DurableJournal(_crash_copy(journal, tmp_path / "crash"))
    assert recovered.getCurrentTerm() == 7
    assert recovered.getVotedForNodeId() == "127.0.0.1:4001"


def test_commit_index_is_saved_by_the_one_second_timer(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 9)
    journal.setRaftCommitIndex(9)
    assert (
        DurableJournal(_crash_copy(journal, tmp_path / "a")).getRaftCommitIndex() == 1
    )

    journal.onOneSecondTimer()
    assert not journal.dirty  # entries flushed before the index that covers them
    assert (
        DurableJournal(_crash_copy(journal, tmp_path / "b")).getRaftCommitIndex() == 9
    )


def test_missing_meta_next_to_entries_of_later_terms_is_refused(tmp_path):
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    journal.setCurrentTerm(2, None)
    journal.add(b"x", 1, 2)
    journal._destroy()
    os.remove(path + ".meta")

    with pytest.raises(JournalFormatError):
        DurableJournal(path)


def test_unreadable_meta_is_refused(tmp_path):
    path = str(tmp_path / "journal")
    DurableJournal(path)._destroy()
    Path(path + ".meta").write_bytes(b"{not json")

    with pytest.raises(JournalFormatError):
        DurableJournal(path)


# -- group commit -------------------------------------------------------------------


def test_sync_on_a_clean_journal_does_nothing(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    before = journal.statistics()

    assert not journal.dirty
    assert journal.sync() is False
    assert journal.statistics() == before


def test_one_fdatasync_covers_many_adds(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    journal.setCurrentTerm(1, None)
    before = journal.statistics()

    _fill(journal, 1, 100)
    assert journal.dirty
    assert journal.statistics().file_bytes == before.file_bytes  # no write yet

    assert journal.sync() is True
    after = journal.statistics()
    assert after.fsync_total == before.fsync_total + 1
    assert after.last_sync_entries == 100
    assert not journal.dirty
    assert journal.sync() is False


def test_a_failed_fdatasync_makes_every_later_sync_refuse(tmp_path, monkeypatch):
    journal = DurableJournal(tmp_path / "journal")
    _fill(journal, 1, 2)

    def broken_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", broken_fdatasync)
    with pytest.raises(JournalIOError):
        journal.sync()
    monkeypatch.undo()  # the disk "recovers": a retry could now falsely succeed

    assert journal.failed
    assert journal.dirty
    with pytest.raises(JournalIOError):
        journal.sync()


# -- the unsafe test switch ---------------------------------------------------------


def test_unsafe_switch_writes_but_skips_fdatasync(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(UNSAFE_SKIP_FSYNC_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="raft.journal"):
        journal = DurableJournal(tmp_path / "journal")
    assert "unsafe_skip_fsync=1" in caplog.text
    journal.setCurrentTerm(1, None)  # meta is still fsynced: only the log skips
    before = journal.statistics()

    _fill(journal, 1, 10)
    assert journal.sync() is True

    after = journal.statistics()
    assert after.fsync_total == before.fsync_total
    assert after.file_bytes > before.file_bytes
    assert not journal.dirty


def test_unsafe_switch_still_cuts_a_pending_truncation(tmp_path, monkeypatch):
    monkeypatch.setenv(UNSAFE_SKIP_FSYNC_ENV, "1")
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 1, 4)
    journal.sync()
    before = journal.statistics()

    journal.deleteEntriesFrom(2)
    assert journal.sync() is True

    assert journal.statistics().fsync_total == before.fsync_total
    assert os.path.getsize(path) == _record_offset(3)
    assert not journal.dirty


_SYNC_ONE_ENTRY = """
import sys
from raft.journal import DurableJournal
journal = DurableJournal(sys.argv[1])
journal.add(b"x", 1, 0)
journal.sync()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not found")
@pytest.mark.parametrize(("unsafe", "expected"), [(False, 1), (True, 0)])
def test_strace_sees_fdatasync_only_without_the_unsafe_switch(
    tmp_path, unsafe, expected
):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop(UNSAFE_SKIP_FSYNC_ENV, None)
    if unsafe:
        env[UNSAFE_SKIP_FSYNC_ENV] = "1"
    trace = tmp_path / "trace.txt"
    argv = [
        shutil.which("strace"),
        "-f",
        "-qq",
        "-e",
        "trace=fdatasync",
        "-o",
        str(trace),
    ]
    argv += [sys.executable, "-c", _SYNC_ONE_ENTRY, str(tmp_path / "journal")]

    subprocess.run(argv, env=env, check=True, timeout=30)

    calls = [line for line in trace.read_text().splitlines() if "fdatasync(" in line]
    assert len(calls) == expected, calls
