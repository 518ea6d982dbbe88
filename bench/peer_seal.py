"""What sealing one Raft peer frame costs (cluster_secret on), by frame size.

pysyncobj seals a frame once on send (``encrypt_at_time``) and checks it twice
on receipt (``extract_timestamp`` then ``decrypt``, each verifying the HMAC).
This times exactly those calls on zlib-compressed frames like the ones it sends,
in one process, with no network.

    .venv/bin/python bench/peer_seal.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import zlib

from pysyncobj.encryptor import getEncryptor

from raft.peer_auth import FrameSeal

# (label, bytes of payload inside the frame before compression)
FRAME_SIZES = (("heartbeat", 0), ("1 publish", 400), ("64 publishes", 64 * 400),
               ("512 publishes", 512 * 400))


def frame(payload_bytes: int) -> bytes:
    # Half random, half repeated, like base64 payloads inside JSON batches.
    body = os.urandom(payload_bytes // 2).hex()[: payload_bytes // 2]
    body += "x" * (payload_bytes - len(body))
    message = {"type": "append_entries", "term": 3, "commit_index": 10,
               "entries": [(body.encode(), 11, 3)], "prevLogIdx": 10, "prevLogTerm": 3}
    return zlib.compress(pickle.dumps(message), 3)


def time_one(fernet, data: bytes, rounds: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    for _ in range(rounds):
        token = fernet.encrypt_at_time(data, 1)
    sealed_s = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(rounds):
        fernet.extract_timestamp(token)
        fernet.decrypt(token)
    opened_s = time.perf_counter() - started
    return sealed_s / rounds * 1e6, opened_s / rounds * 1e6, len(token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--fernet", action="store_true",
                        help="time pysyncobj's Fernet tokens instead")
    args = parser.parse_args()
    assert args.rounds > 0

    # What the nodes use (FrameSeal, AES-256-GCM); --fernet: pysyncobj's own.
    fernet = getEncryptor("bench-secret-" + "x" * 20)
    if not args.fernet:
        fernet = FrameSeal(fernet)
    print("| frame | bytes on the wire plain | sealed | seal µs | check µs |")
    print("|---|---|---|---|---|")
    for label, size in FRAME_SIZES:
        data = frame(size)
        seal_us, check_us, sealed_bytes = time_one(fernet, data, args.rounds)
        print(f"| {label} | {len(data)} | {sealed_bytes} | {seal_us:.1f} "
              f"| {check_us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
