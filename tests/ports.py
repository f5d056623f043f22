"""Loopback ports for the servers tests must tell their port in advance (the entrypoint's
`PORT`, the BigQuery emulator's flags), rather than let them bind port 0."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Where Linux says its ephemeral ports begin (when it cannot be read: its default).
_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range. The servers other
    tests start on port 0, and every outgoing connection, get their ports from that range,
    so none of them can take this one between this probe and its server's bind (a port
    the kernel chose for the probe could be handed out again meanwhile)."""
    start = _ephemeral_start()
    for _ in range(1000):
        port = random.randrange(10000, start)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in 10000-{start}")
