"""
Where SIP messages come from and go to.
"""

from __future__ import annotations

from typing import Any

import attrs

TRANSPORTS = ("udp", "tcp", "tls")


@attrs.frozen
class Address:
    """
    A transport address: C{transport} is C{"udp"}, C{"tcp"} or C{"tls"};
    C{host} is an IP literal without brackets.
    """

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"

    @property
    def reliable(self) -> bool:
        """Whether the transport is a stream (no retransmissions needed)."""
        return self.transport != "udp"


@attrs.frozen
class Origin:
    """
    Where a received message came from: the remote L{Address} and, for
    stream transports, the connection (an opaque object owned by the
    transport) that carried it, so that responses can go back on it.
    """

    address: Address
    connection: Any = attrs.field(default=None, eq=False)
