"""Proof of possession on CONN (ours): the client signs a nonce of the node's.

The problem: an access key is a bearer secret. Whoever copies it from a config
file or a log can connect as that app. Every app also has an Ed25519 key pair,
and its app id is the public half (spec 5.1), so the node can ask for proof
that the client holds the secret half as well.

The frames (docs/PROTOCOL.md, "Proof of possession"):

    CHALLENGE                          -> +PASS:CHALLENGE;NONCE=<nonce>
    CONN;ACCESS_KEY=:<key>;NONCE=:<nonce>;SIGNATURE=:<signature>

``nonce`` is 32 random bytes in base64, issued to one connection, good for one
CONN within ``NONCE_TTL_MS``; a CONN that names it uses it up whatever the
outcome, so neither a replay nor a second guess gets anywhere. ``signature``
is the base64 Ed25519 signature of ``message(nonce, app_id)``: a context
string, the nonce as sent and the app id, so a signature made for another app
or another purpose does not verify here.

The SDK never sends CHALLENGE; a plain CONN stays valid unless the node is
started with ``conn_proof_required``.

Rejected: signing the access key itself (the secret would then prove nothing
the access key does not), and a nonce in the CONN reply of a first CONN (the
SDK takes any ``+PASS:`` to its CONN as success).

Pure except for ``new_nonce``, which reads the system's random source.
"""

from __future__ import annotations

import base64
import binascii
import os

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

NONCE_BYTES = 32
NONCE_TTL_MS = 30_000
CONTEXT = b"ensync-conn-proof-v1;"


def new_nonce() -> str:
    return base64.b64encode(os.urandom(NONCE_BYTES)).decode()


def message(nonce: str, app_id: str) -> bytes:
    return CONTEXT + nonce.encode() + b";" + app_id.encode()


def sign(secret_key_b64: str, nonce: str) -> str:
    """The client's half: ``secret_key_b64`` is the 64-byte key the admin API
    hands out (seed then public key) or its 32-byte seed; the app id it signs
    for is that key's public half."""
    signing = SigningKey(base64.b64decode(secret_key_b64)[:32])
    app_id = base64.b64encode(bytes(signing.verify_key)).decode()
    return base64.b64encode(signing.sign(message(nonce, app_id)).signature).decode()


def verify(app_id: str, nonce: str, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is the app's signature of this nonce."""
    try:
        public = base64.b64decode(app_id, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
        VerifyKey(public).verify(message(nonce, app_id), signature)
    except (binascii.Error, ValueError, TypeError, BadSignatureError):
        return False
    return True
