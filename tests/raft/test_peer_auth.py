"""raft/peer_auth.py and the settings that feed it, without a cluster."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from cryptography.fernet import Fernet, InvalidToken

from node.main import ConfigError, cluster_secret_of, tls_contexts
from raft.peer_auth import (REFUSAL_LOG_INTERVAL_MS, FrameSeal, PeerRefusals,
                            _CheckingEncryptor, check_connection,
                            secret_file_too_open)
from tests.tls import make_test_ca

SECRET = "s" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> int:
        return self.now_ms


class FakeConnection:
    def __init__(self, encryptor) -> None:
        self.encryptor = encryptor


# -- refusals -------------------------------------------------------------------


def test_every_refusal_counts_but_a_burst_logs_one_line(caplog):
    clock = FakeClock()
    refusals = PeerRefusals(clock)
    with caplog.at_level(logging.WARNING, logger="ensync.raft.peers"):
        for _ in range(5):
            refusals.refused("10.9.9.9:4000", "incoming")
        clock.now_ms += REFUSAL_LOG_INTERVAL_MS
        refusals.refused("10.9.9.9:4001", "incoming")

    assert refusals.statistics().refusals_total == 6
    assert refusals.statistics().last_peer == "10.9.9.9:4001"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "peer=10.9.9.9:4000" in lines[0] and "not_logged=0" in lines[0]
    assert "refusals_total=6 not_logged=4" in lines[1]


def test_a_frame_sealed_with_another_key_is_reported_and_still_refused():
    ours = FrameSeal(Fernet(Fernet.generate_key()))
    theirs = FrameSeal(Fernet(Fernet.generate_key()))
    reports = []
    checking = _CheckingEncryptor(ours, lambda: reports.append(1))

    good = ours.encrypt_at_time(b"hello", 7)
    assert checking.extract_timestamp(good) == 7
    assert checking.decrypt(good) == b"hello"
    assert reports == []

    tampered = good[:-1] + bytes([good[-1] ^ 1])
    later = FrameSeal._TIME.pack(8) + good[8:]  # the clear time is authenticated too
    for frame in (theirs.encrypt_at_time(b"hello", 7), tampered, later):
        with pytest.raises(InvalidToken):
            checking.decrypt(frame)
    with pytest.raises(InvalidToken):
        checking.extract_timestamp(b"short")
    assert reports == [1, 1, 1, 1]


def test_the_seal_is_one_key_per_secret_and_a_fresh_nonce_per_frame():
    a, b = FrameSeal.from_secret("s" * 16), FrameSeal.from_secret("s" * 16)
    first, second = a.encrypt_at_time(b"x", 1), a.encrypt_at_time(b"x", 1)
    assert first != second
    assert b.decrypt(first) == b"x"
    with pytest.raises(InvalidToken):
        FrameSeal.from_secret("t" * 16).decrypt(first)


def test_checking_wraps_a_connection_once_and_leaves_plain_links_alone():
    refusals = PeerRefusals(FakeClock())
    plain = FakeConnection(None)
    check_connection(plain, "a:1", "incoming", refusals)
    assert plain.encryptor is None

    sealed = FakeConnection(Fernet(Fernet.generate_key()))
    check_connection(sealed, "a:1", "incoming", refusals)
    first = sealed.encryptor
    check_connection(sealed, "a:1", "incoming", refusals)
    assert isinstance(first, _CheckingEncryptor) and sealed.encryptor is first


# -- settings ---------------------------------------------------------------------


def settings(**given) -> dict:
    base = {"cluster_secret": "", "cluster_secret_file": "", "tls_cert": "",
            "tls_key": "", "tls_ca": ""}
    return {**base, **given}


def test_the_secret_comes_from_the_file_without_its_newline(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert cluster_secret_of(settings(cluster_secret_file=str(path))) == SECRET
    assert cluster_secret_of(settings(cluster_secret=SECRET)) == SECRET
    assert cluster_secret_of(settings()) == ""


@pytest.mark.parametrize("given, message", [
    ({"cluster_secret": SECRET, "cluster_secret_file": "/x"}, "not both"),
    ({"cluster_secret": "short"}, "at least 16"),
    ({"cluster_secret_file": "/nonexistent/secret"}, "cannot read"),
])
def test_a_bad_secret_setting_is_one_config_error(given, message):
    with pytest.raises(ConfigError, match=message):
        cluster_secret_of(settings(**given))


def test_an_empty_secret_file_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        cluster_secret_of(settings(cluster_secret_file=str(path)))


def test_a_secret_file_readable_by_others_is_noticed(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    assert not secret_file_too_open(str(path))
    os.chmod(path, 0o644)
    assert secret_file_too_open(str(path))


def test_tls_needs_cert_and_key_together_and_loadable_files(tmp_path):
    files = make_test_ca(tmp_path / "tls")
    server, client = tls_contexts(settings(tls_cert=str(files.cert),
                                           tls_key=str(files.key),
                                           tls_ca=str(files.ca)))
    assert server is not None and client is not None
    assert tls_contexts(settings())[0] is None

    with pytest.raises(ConfigError, match="set both or neither"):
        tls_contexts(settings(tls_cert=str(files.cert)))
    with pytest.raises(ConfigError, match="cannot load tls_cert"):
        tls_contexts(settings(tls_cert=str(files.ca), tls_key=str(files.ca)))
    with pytest.raises(ConfigError, match="cannot load tls_ca"):
        tls_contexts(settings(tls_ca=str(tmp_path / "missing.pem")))
