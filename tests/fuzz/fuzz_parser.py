"""An atheris (libFuzzer) harness for the request parser; a script, not a test.

    .venv/bin/python tests/fuzz/fuzz_parser.py -max_total_time=60 \
        -dict=tests/fuzz/protocol.dict

Each input is decoded as UTF-8 with surrogates let through, as a TEXT frame's
text could never be but a bug elsewhere might produce, and handed to
``protocol.parse_request``. Anything but a Request or a ProtocolError whose
wire form is one clean ``-FAIL:`` line is a crash. libFuzzer exits without
running atexit hooks, so the count of inputs tried is its ``Done <n> runs``
line, and ours is printed every ``REPORT_EVERY`` inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from node import protocol
    from node.errors import ProtocolError

REPORT_EVERY = 1_000_000
inputs_total = 0


def test_one_input(data: bytes) -> None:
    global inputs_total
    inputs_total += 1
    if inputs_total % REPORT_EVERY == 0:
        print(f"fuzz_parser: {inputs_total} inputs tried", file=sys.stderr)
    frame = data.decode("utf-8", "surrogateescape")
    try:
        request = protocol.parse_request(frame)
    except ProtocolError as exc:
        wire = exc.wire()
        assert wire.startswith(f"-FAIL:{exc.code};MESSAGE="), wire
        assert "Traceback" not in wire, wire
        return
    assert request.verb in protocol.REQUIRED
    assert all(request.get(k) for k in protocol.REQUIRED[request.verb])


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
