"""node/proof.py: the signature a CONN carries as proof of possession."""

from __future__ import annotations

import base64

import pytest
from nacl.signing import SigningKey

from node import proof


def app_keys() -> tuple[str, str, str]:
    """(app id, 64-byte secret as the admin API hands it out, 32-byte seed)."""
    signing = SigningKey.generate()
    public = bytes(signing.verify_key)
    return (base64.b64encode(public).decode(),
            base64.b64encode(bytes(signing) + public).decode(),
            base64.b64encode(bytes(signing)).decode())


def test_a_signature_by_the_apps_secret_key_verifies():
    app_id, secret, seed = app_keys()
    nonce = proof.new_nonce()

    assert proof.verify(app_id, nonce, proof.sign(secret, nonce))
    assert proof.verify(app_id, nonce, proof.sign(seed, nonce))


def test_nonces_are_32_random_bytes_each_time():
    nonces = {proof.new_nonce() for _ in range(100)}

    assert len(nonces) == 100
    assert all(len(base64.b64decode(n)) == proof.NONCE_BYTES for n in nonces)


@pytest.mark.parametrize("what", ["other nonce", "other app", "other key",
                                  "not base64", "short", "bad app id"])
def test_a_signature_for_anything_else_does_not_verify(what):
    app_id, secret, _ = app_keys()
    other_app, other_secret, _ = app_keys()
    nonce = proof.new_nonce()
    signature = proof.sign(secret, nonce)
    cases = {
        "other nonce": (app_id, proof.new_nonce(), signature),
        "other app": (other_app, nonce, signature),
        "other key": (app_id, nonce, proof.sign(other_secret, nonce)),
        "not base64": (app_id, nonce, "not base64!"),
        "short": (app_id, nonce, base64.b64encode(b"x" * 10).decode()),
        "bad app id": ("AAAA", nonce, signature),
    }

    assert proof.verify(*cases[what]) is False


def test_the_signed_message_names_the_context_the_nonce_and_the_app():
    assert proof.message("bm9uY2U=", "YXBw") == b"ensync-conn-proof-v1;bm9uY2U=;YXBw"
