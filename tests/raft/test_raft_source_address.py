"""Outgoing Raft connections leave from the node's own address (raft/machine.py).

jepsen-lite cuts links between nodes on 127.0.0.2-4 with one firewall rule per
address pair, which only works if a node's connections to its peers come from
its own address rather than the kernel's default 127.0.0.1.
"""

from __future__ import annotations

import socket

import pysyncobj.tcp_connection
import pytest

from raft.machine import install_raft_source_address, raft_source_host


@pytest.mark.parametrize(("address", "host"), [
    ("127.0.0.1:9081", None),  # the default layout keeps pysyncobj's behaviour
    ("0.0.0.0:9081", None),
    ("node1.internal:9081", None),  # a name: nothing to bind
    ("127.0.0.3:9081", "127.0.0.3"),
    ("192.0.2.11:9081", "192.0.2.11"),
    ("[::1]:9081", "::1"),
])
def test_source_host_is_the_raft_host_unless_default_or_a_name(address, host):
    assert raft_source_host(address) == host


def test_installed_source_address_binds_the_sockets_pysyncobj_connects_with():
    with socket.socket() as server:
        server.bind(("127.0.0.3", 0))
        server.listen(1)
        install_raft_source_address("127.0.0.2")
        try:
            # The same call TcpConnection.connect makes to get its socket.
            sock = pysyncobj.tcp_connection.socket.socket(socket.AF_INET,
                                                          socket.SOCK_STREAM)
            with sock:
                sock.connect(server.getsockname())
                assert sock.getsockname()[0] == "127.0.0.2"
            # Constants and exceptions still come from the socket module.
            assert pysyncobj.tcp_connection.socket.SOL_SOCKET == socket.SOL_SOCKET
        finally:
            install_raft_source_address(None)
    assert pysyncobj.tcp_connection.socket is socket
