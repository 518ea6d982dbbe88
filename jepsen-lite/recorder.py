"""Writes the run's history as JSON Lines, in the format of HISTORY.md.

One writer per run, used from the asyncio thread only, so the file order is the
order in which the harness observed things. Times are integer milliseconds since
the run started, from ``time.monotonic_ns``. Each line is flushed as written (a
crash of the harness keeps everything before it); the file is fsynced on close.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Any

import orjson

OP_TYPES = ("invoke", "ok", "fail", "info")


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._start_ns = time.monotonic_ns()
        # The wall clock at time_ms 0, for the run line. Conversions use the
        # offset of the moment instead (see ``unix_offset_ms``).
        self.start_unix_ms = time.time_ns() // 1_000_000
        self.events: list[dict] = []  # kept for the summary and the timeline
        self.lines_total = 0

    def now_ms(self) -> int:
        return (time.monotonic_ns() - self._start_ns) // 1_000_000

    def unix_offset_ms(self) -> int:
        """Wall clock minus run clock, now.

        Not a constant: on the VM this was built on, the wall clock gains 5 ms per
        second on the monotonic one, so an offset read at the start would put a
        due time 0.4 s early after 80 s. The nodes keep time by the wall clock, so
        an epoch instant the broker reports (or is given) is placed on the run's
        clock with the offset of the moment it is sent or received; what remains
        is the drift over the delay itself (at most 25 ms for 5 s).
        """
        return time.time_ns() // 1_000_000 - self.now_ms()

    def unix_to_run_ms(self, unix_ms: int) -> int:
        return unix_ms - self.unix_offset_ms()

    def run_to_unix_ms(self, run_ms: int) -> int:
        return run_ms + self.unix_offset_ms()

    def write(self, type_: str, f: str, process: int | str, value: dict[str, Any],
              time_ms: int | None = None) -> dict:
        assert type_ in OP_TYPES
        assert self._file is not None, "history already closed"

        event = {"type": type_, "f": f, "process": process,
                 "time_ms": self.now_ms() if time_ms is None else time_ms,
                 "value": value}
        self._file.write(orjson.dumps(event) + b"\n")
        self._file.flush()
        self.events.append(event)
        self.lines_total += 1
        return event

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None


def read_history(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
