"""Free loopback ports for servers that tests start on fixed ports (to restart them on
the same address, or to point a client at an address before anything listens there)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
