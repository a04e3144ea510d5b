"""
Bytes to SIP messages. Pure functions, no I/O; every failure is one
L{SIPParseError} with a byte offset.
"""

from __future__ import annotations

from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import ENCODING, ERRORS, Headers, Message, Request, Response
from dmq_bus.sip.uri import SIPURI

MAX_HEADERS = 256
"""Header fields one message may carry; more is a parse error (400)."""

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


def _isToken(text: str) -> bool:
    return bool(text) and all(c in _TOKEN_CHARS for c in text)


def findHeaderEnd(data: bytes, start: int = 0) -> tuple[int, int]:
    """
    C{(end of header block, start of body)} in C{data}, or C{(-1, -1)}
    when no blank line is there yet. Accepts CRLF CRLF and, leniently, LF LF.
    """
    end = data.find(b"\r\n\r\n", start)
    if end >= 0:
        lf = data.find(b"\n\n", start, end)
        if lf < 0:
            return end, end + 4
        return lf, lf + 2
    end = data.find(b"\n\n", start)
    if end >= 0:
        return end, end + 2
    return -1, -1


def parseContentLength(value: str | None) -> int | None:
    """A Content-Length value as an integer; None if absent; raises if malformed."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii() or len(value) > 9:
        raise ValueError(value)
    return int(value)


def parseHead(head: bytes, offset: int = 0) -> tuple[str, Headers]:
    """
    Parse a header block (start line and header lines, no blank line) into
    the start line and L{Headers}. Folded lines are joined with one space.
    """
    text = head.decode(ENCODING, ERRORS)
    lines = text.split("\n")
    startLine = lines[0].rstrip("\r")
    fields: list[tuple[str, str]] = []
    pos = offset + len(lines[0]) + 1
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith("\r") else raw
        if line and line[0] in " \t":
            if not fields:
                raise SIPParseError("continuation line before any header", pos)
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}".strip())
        else:
            name, colon, value = line.partition(":")
            name = name.rstrip(" \t")
            if not colon or not _isToken(name):
                raise SIPParseError(f"malformed header line {line[:60]!r}", pos)
            fields.append((name, value.strip(" \t")))
            if len(fields) > MAX_HEADERS:
                raise SIPParseError(f"more than {MAX_HEADERS} header fields", pos)
        pos += len(raw) + 1
    return startLine, Headers(tuple(fields))


def parseMessage(data: bytes, *, stream: bool = False) -> Message:
    """
    Parse one whole SIP message.

    For a datagram (C{stream=False}) a missing Content-Length means the body
    is the rest of the datagram, and bytes beyond Content-Length are
    ignored. For a stream message C{data} must hold exactly one message and
    Content-Length is mandatory.

    @raise SIPParseError: the bytes are not an acceptable SIP message; its
        C{headers} is set when a request got far enough to be answered.
    """
    # tolerate leading CRLFs (RFC 3261 §7.5)
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end, bodyStart = findHeaderEnd(data, start)
    if end < 0:
        if stream:
            raise SIPParseError("no end of headers", len(data))
        # a datagram without the blank line: headers only, empty body
        end = bodyStart = len(data)
    startLine, headers = parseHead(data[start:end], start)
    isRequest = not startLine.startswith("SIP/")
    answerable = headers if isRequest else None

    try:
        length = parseContentLength(headers.get("content-length"))
    except ValueError:
        raise SIPParseError("bad Content-Length", start, answerable) from None
    available = len(data) - bodyStart
    if length is None:
        if stream:
            raise SIPParseError("missing Content-Length on a stream", start, answerable)
        body = data[bodyStart:]
    elif length > available:
        raise SIPParseError(
            f"Content-Length {length} exceeds the {available} body bytes received",
            bodyStart,
            answerable,
        )
    else:
        body = data[bodyStart : bodyStart + length]

    if isRequest:
        return _parseRequestLine(startLine, headers, body, start)
    return _parseStatusLine(startLine, headers, body, start)


def _parseRequestLine(line: str, headers: Headers, body: bytes, offset: int) -> Request:
    parts = line.split(" ")
    if len(parts) != 3:
        parts = line.split()
        if len(parts) != 3:
            raise SIPParseError(f"malformed request line {line[:80]!r}", offset)
    method, uriText, version = parts
    if not _isToken(method):
        raise SIPParseError(f"bad method {method[:40]!r}", offset)
    if not version.upper().startswith("SIP/"):
        raise SIPParseError(f"bad protocol version {version[:20]!r}", offset)
    try:
        uri = SIPURI.parse(uriText, offset + len(method) + 1)
    except SIPParseError as e:
        raise SIPParseError(
            f"bad Request-URI: {e.reason}",
            e.offset,
            headers,
            status=416
            if ":" in uriText and not uriText.lower().startswith(("sip:", "sips:"))
            else 400,
        ) from None
    return Request(method=method, uri=uri, headers=headers, body=body, version=version)


def _parseStatusLine(line: str, headers: Headers, body: bytes, offset: int) -> Response:
    version, sp, rest = line.partition(" ")
    codeText, _, reason = rest.partition(" ")
    if not sp or len(codeText) != 3 or not codeText.isdigit() or not codeText.isascii():
        raise SIPParseError(f"malformed status line {line[:80]!r}", offset)
    code = int(codeText)
    if not 100 <= code <= 699:
        raise SIPParseError(f"status code out of range: {code}", offset)
    return Response(code=code, reason=reason, headers=headers, body=body, version=version)
