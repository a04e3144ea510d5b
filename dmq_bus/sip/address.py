"""
Where SIP messages come from and go to.
"""

from __future__ import annotations

from typing import Any

import attrs

TRANSPORTS = ("udp", "tcp", "tls")


def printable(text: str) -> str:
    """
    C{text} safe to log and to encode as UTF-8: bytes that arrived as
    invalid UTF-8 (kept as lone surrogates by the parser) become C{\\xNN}.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        return printable(f"{self.transport}:{host}:{self.port}")

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
