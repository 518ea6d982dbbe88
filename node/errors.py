"""Every exception the broker raises on purpose, in one tree.

    BrokerError                  base; carries a wire ``code`` and a short message
    ├── ProtocolError            a frame we cannot parse or that lacks parameters
    ├── RequestRejected          a well-formed request the state machine refuses
    │   └── NotLeader            an action only the Raft leader can take
    ├── Unavailable              no quorum, or the write did not commit in time
    └── JournalError             the Raft journal's files cannot be trusted or written
        ├── JournalFormatError   not our file, or its meta file is unreadable
        └── JournalIOError       a write or flush failed; no sync is trusted after it

``code`` is the token that follows ``-FAIL:`` on the wire (spec section 3.13).
Messages are short, lowercase, and never contain exception text from a library:
foreign errors are mapped at the I/O edge with ``raise ... from exc``.
"""

from __future__ import annotations


class BrokerError(Exception):
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def wire(self) -> str:
        """The ``-FAIL:`` frame for this error; ``;`` never leaks into MESSAGE."""
        return f"-FAIL:{self.code};MESSAGE={self.message.replace(';', ',')}"


class ProtocolError(BrokerError):
    code = "INVALID_PARAMETER"


class RequestRejected(BrokerError):
    code = "NOT_FOUND"


class Unavailable(BrokerError):
    code = "UNAVAILABLE"


class NotLeader(RequestRejected):
    code = "NOT_LEADER"

    def __init__(self, leader: str | None) -> None:
        super().__init__("only the leader can do this")
        self.leader = leader


class JournalError(BrokerError):
    """The Raft journal's files cannot be trusted or written."""

    code = "JOURNAL_ERROR"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"journal {path}: {reason}")
        self.path = path
        self.reason = reason


class JournalFormatError(JournalError):
    """The file is not ours, or its meta file is unreadable."""


class JournalIOError(JournalError):
    """A write or flush failed. The journal refuses further syncs after this."""
