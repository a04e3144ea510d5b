"""
Bytes to SIP messages. Pure functions, no I/O; every failure is one
L{SIPParseError} with a byte offset.
"""

from __future__ import annotations

from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import (
    ENCODING,
    ERRORS,
    Headers,
    Message,
    Request,
    Response,
    canonicalName,
)
from dmq_bus.sip.uri import SIPURI

MAX_HEADERS = 256
"""
Header fields one message may carry. More is a parse error raised before
the headers are complete, so the message cannot be answered: it is dropped
and counted as a parse error of its transport.
"""

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


def _isToken(text: str) -> bool:
    return bool(text) and _TOKEN_CHARS.issuperset(text)


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


_KNOWN_NAMES: dict[str, str] = {}
"""
Header names met before, exactly as written (so valid tokens), to their
lookup key; lets L{parseHead} read a usual header line with one dict lookup.
"""

_KNOWN_NAMES_LIMIT = 4096
"""Most names L{_KNOWN_NAMES} remembers (a peer cannot grow it without end)."""

_KNOWN_LINES: dict[str, tuple[tuple[str, str], str]] = {}
"""
Whole header lines met before (C{CSeq: 10 KDMQ}, C{Content-Type:
application/json}, ...) to their parsed field and lookup key: a line that
repeats from message to message is read with one dict lookup. Lines that
differ in every message (L{_UNIQUE_KEYS}) are never remembered.
"""

_KNOWN_LINES_LIMIT = 4096
"""
Most lines L{_KNOWN_LINES} remembers; past it no new line is remembered
(lines are still parsed, just not looked up).
"""

_UNIQUE_KEYS = frozenset({"via", "from", "call-id"})
"""Headers whose lines hold a per-message value (branch, tag, Call-ID)."""


def parseHead(head: bytes, offset: int = 0) -> tuple[str, Headers]:
    """
    Parse a header block (start line and header lines, no blank line) into
    the start line and L{Headers}. Folded lines are joined with one space.
    """
    text = head.decode(ENCODING, ERRORS)
    if text.count("\n") == text.count("\r\n"):
        lines = text.split("\r\n")  # the usual case: every line ends in CRLF
    else:
        lines = [line[:-1] if line[-1:] == "\r" else line for line in text.split("\n")]
    startLine = lines[0].rstrip("\r")
    if len(lines) <= MAX_HEADERS + 1:
        # Fast path: every line is "Name: value" with a name met before;
        # the index is built on the way. Anything else takes the slow path.
        fields: list[tuple[str, str]] = []
        index: dict[str, list[int]] = {}
        knownKey = _KNOWN_NAMES.get
        knownLine = _KNOWN_LINES.get
        for line in lines[1:]:
            known = knownLine(line)
            if known is None:
                name, colon, value = line.partition(":")
                key = knownKey(name)
                if key is None or not colon:
                    break
                field = (name, value.strip(" \t"))
                if (
                    key not in _UNIQUE_KEYS
                    and len(_KNOWN_LINES) < _KNOWN_LINES_LIMIT
                    and (key != "to" or "tag" not in value.lower())
                ):
                    _KNOWN_LINES[line] = (field, key)
            else:
                field, key = known
            slot = index.get(key)
            if slot is None:
                index[key] = [len(fields)]
            else:
                slot.append(len(fields))
            fields.append(field)
        else:
            return startLine, Headers._prebuilt(tuple(fields), index)
    headerStart = text.find("\n") + 1
    return startLine, Headers(tuple(_parseHeaderLines(text, headerStart, offset)))


def _parseHeaderLines(text: str, pos: int, offset: int) -> list[tuple[str, str]]:
    """
    Read the header lines of C{text} from character C{pos} on, one by one,
    joining folded lines; raise L{SIPParseError} at the first bad line.
    """
    fields: list[tuple[str, str]] = []
    for raw in text[pos:].split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line and line[0] in " \t":
            if not fields:
                raise _errorAt("continuation line before any header", text, pos, offset)
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}".strip())
        else:
            name, colon, value = line.partition(":")
            name = name.rstrip(" \t")
            if not colon or not _isToken(name):
                raise _errorAt(f"malformed header line {line[:60]!r}", text, pos, offset)
            fields.append((name, value.strip(" \t")))
            if name not in _KNOWN_NAMES and len(_KNOWN_NAMES) < _KNOWN_NAMES_LIMIT:
                _KNOWN_NAMES[name] = canonicalName(name)
            if len(fields) > MAX_HEADERS:
                raise _errorAt(f"more than {MAX_HEADERS} header fields", text, pos, offset)
        pos += len(raw) + 1
    return fields


def _errorAt(reason: str, text: str, pos: int, offset: int) -> SIPParseError:
    """An error at character C{pos} of C{text}, its offset counted in bytes."""
    return SIPParseError(reason, offset + len(text[:pos].encode(ENCODING, ERRORS)))


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
        if data.endswith(b"\n"):  # the line end of the last header line
            end = max(start, end - (2 if data.endswith(b"\r\n") else 1))
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
    if len(parts) != 3 or not (parts[0] and parts[1]):
        parts = line.split()  # leniently, any blanks between the parts
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
