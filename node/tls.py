"""TLS contexts for the client and admin listener and for this node's own HTTPS calls.

One listener serves WebSocket clients (``/message``) and the HTTP API; with
``tls_cert`` and ``tls_key`` it speaks only TLS, so ``wss://`` and ``https://``
on the same port. Plain ``ws://`` stays the default because the EnSync SDK and
local clusters use it. Client certificates are not asked for: clients prove who
they are with their access key (and optionally a signature), not at TLS level.
"""

from __future__ import annotations

import ssl

TLS_VERSION_MIN = ssl.TLSVersion.TLSv1_2


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context from PEM files; OSError or ssl.SSLError when they won't load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSION_MIN
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` if given, else the system's CAs."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = TLS_VERSION_MIN
    return context
