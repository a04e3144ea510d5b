"""
The one error type of the SIP parser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmq_bus.sip.message import Headers


class SIPParseError(ValueError):
    """
    Bytes that are not a SIP message we can accept.

    @ivar reason: what is wrong, in words fit for a SIP reason phrase.
    @ivar offset: byte offset in the input where the problem was found.
    @ivar headers: for a request whose start line and header block parsed
        but which is still unacceptable (bad Content-Length, bad URI, body
        truncated), its headers, so that the receiver can answer it;
        otherwise None.
    @ivar status: the SIP status code that answers the problem when
        C{headers} is set: 400, or 413 when a size limit is exceeded.
    """

    def __init__(
        self,
        reason: str,
        offset: int = 0,
        headers: Headers | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(reason, offset)
        self.reason = reason
        self.offset = offset
        self.headers = headers
        self.status = status

    def __str__(self) -> str:
        return f"{self.reason} (at byte {self.offset})"
