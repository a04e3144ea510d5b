"""
SIP requests and responses as frozen values, with an ordered,
case-insensitive header store and exact serialization.

Header names and values are ``str`` decoded from the wire as UTF-8 with
``surrogateescape`` (lossless: any byte survives a round trip); bodies are
``bytes``. ``Content-Length`` is always counted in bytes and written by the
serializer from the body itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

from dmq_bus.sip.uri import SIPURI, NameAddr, Via, splitCommaValues

COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}
"""RFC 3261 §7.3.3 (and later RFCs) compact header names, to the full name."""

ENCODING = "utf-8"
ERRORS = "surrogateescape"

_canonicalCache: dict[str, str] = {}


def canonicalName(name: str) -> str:
    """The lookup key of a header name: lower case, compact forms expanded."""
    key = _canonicalCache.get(name)
    if key is None:
        lower = name.lower()
        key = COMPACT_FORMS.get(lower, lower)
        if len(_canonicalCache) < 4096:
            _canonicalCache[name] = key
    return key


def _buildIndex(fields: tuple[tuple[str, str], ...]) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    cached = _canonicalCache.get
    for i, (name, _) in enumerate(fields):
        key = cached(name) or canonicalName(name)
        slot = index.get(key)
        if slot is None:
            index[key] = [i]
        else:
            slot.append(i)
    return index


@attrs.frozen
class Headers:
    """
    Header fields in the order received (or built), names as written.
    Lookups ignore case and accept compact forms (C{v} for C{Via}).
    """

    fields: tuple[tuple[str, str], ...] = ()
    _index: dict[str, list[int]] = attrs.field(init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_index", _buildIndex(self.fields))

    @classmethod
    def _prebuilt(cls, fields: tuple[tuple[str, str], ...], index: dict[str, list[int]]) -> Headers:
        """
        Headers from C{fields} and their index, built by the caller (the
        parser builds it while reading the lines; this saves a second pass).
        """
        headers = object.__new__(cls)
        object.__setattr__(headers, "fields", fields)
        object.__setattr__(headers, "_index", index)
        return headers

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        """Headers from C{(name, value)} pairs."""
        return cls(tuple(pairs))

    def get(self, name: str) -> str | None:
        """The first value of header C{name}, or None."""
        # the index's keys are canonical names, so a hit with C{name} as
        # given (the usual lower-case full name) is the right one
        slot = self._index.get(name) or self._index.get(canonicalName(name))
        return None if slot is None else self.fields[slot[0]][1]

    def getAll(self, name: str) -> list[str]:
        """Every value of header C{name}, in order (comma-joined values not split)."""
        slot = self._index.get(canonicalName(name))
        return [] if slot is None else [self.fields[i][1] for i in slot]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonicalName(name) in self._index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def appending(self, name: str, value: str) -> Headers:
        """A copy with C{name: value} added last."""
        return Headers((*self.fields, (name, value)))

    def prepending(self, name: str, value: str) -> Headers:
        """A copy with C{name: value} added first."""
        return Headers(((name, value), *self.fields))

    def replacing(self, name: str, value: str) -> Headers:
        """
        A copy where the first C{name} field takes C{value} (keeping its
        place and spelling) and later ones are dropped; appended if absent.
        """
        slot = self._index.get(canonicalName(name))
        if slot is None:
            return self.appending(name, value)
        first = slot[0]
        drop = set(slot[1:])
        out = []
        for i, field in enumerate(self.fields):
            if i == first:
                out.append((field[0], value))
            elif i not in drop:
                out.append(field)
        return Headers(tuple(out))

    def without(self, name: str) -> Headers:
        """A copy without any C{name} field."""
        slot = self._index.get(canonicalName(name))
        if slot is None:
            return self
        drop = set(slot)
        return Headers(tuple(f for i, f in enumerate(self.fields) if i not in drop))

    # Typed accessors of the headers every transaction needs.

    def vias(self) -> list[Via]:
        """Every Via value, top first (comma-joined values split)."""
        return [Via.parse(v) for raw in self.getAll("via") for v in splitCommaValues(raw)]

    def topVia(self) -> Via | None:
        """The first Via value, or None when there is no Via header."""
        raw = self.get("via")
        if raw is None:
            return None
        if "," in raw:
            raw = splitCommaValues(raw)[0]
        return Via.parse(raw)

    def cseq(self) -> tuple[int, str] | None:
        """C{(number, method)} from CSeq, or None when absent or malformed."""
        raw = self.get("cseq")
        if raw is None:
            return None
        parts = raw.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
            return None
        return int(parts[0]), parts[1]

    def maxForwards(self) -> int | None:
        """Max-Forwards as an integer, or None when absent or malformed."""
        raw = self.get("max-forwards")
        if raw is None:
            return None
        raw = raw.strip()
        if not raw.isdigit() or not raw.isascii() or len(raw) > 9:
            return None
        return int(raw)

    def nameAddr(self, name: str) -> NameAddr | None:
        """The first C{name} header (To, From, ...) parsed, or None if absent."""
        raw = self.get(name)
        return None if raw is None else NameAddr.parse(raw)


def _serializeHeaders(parts: list[str], headers: Headers, bodyLength: int) -> None:
    """
    Append the header lines and the blank line to C{parts}: the first
    Content-Length field says C{bodyLength}, later ones are left out, and
    one is added last when there is none.
    """
    lines = [f"{name}: {value}\r\n" for name, value in headers.fields]
    slot = headers._index.get("content-length")
    if slot is None:
        parts.extend(lines)
        parts.append(f"Content-Length: {bodyLength}\r\n\r\n")
        return
    first = slot[0]
    lines[first] = f"{headers.fields[first][0]}: {bodyLength}\r\n"
    for i in reversed(slot[1:]):
        del lines[i]
    parts.extend(lines)
    parts.append("\r\n")


@attrs.frozen
class Request:
    """A SIP request."""

    method: str
    uri: SIPURI
    headers: Headers = Headers()
    body: bytes = b""
    version: str = "SIP/2.0"

    def toBytes(self) -> bytes:
        """
        The request on the wire: start line, headers in order (one
        C{Content-Length} with the body's byte count, in place or last),
        blank line, body.
        """
        return self.headBytes() + self.body

    def headBytes(self) -> bytes:
        """L{toBytes} without the body: the start line, headers and blank line."""
        parts = [f"{self.method} {self.uri} {self.version}\r\n"]
        _serializeHeaders(parts, self.headers, len(self.body))
        return "".join(parts).encode(ENCODING, ERRORS)

    def withHeaders(self, headers: Headers) -> Request:
        """A copy with other headers."""
        return attrs.evolve(self, headers=headers)


@attrs.frozen
class Response:
    """A SIP response."""

    code: int
    reason: str
    headers: Headers = Headers()
    body: bytes = b""
    version: str = "SIP/2.0"

    def toBytes(self) -> bytes:
        """The response on the wire (see L{Request.toBytes})."""
        parts = [f"{self.version} {self.code} {self.reason}\r\n"]
        _serializeHeaders(parts, self.headers, len(self.body))
        return "".join(parts).encode(ENCODING, ERRORS) + self.body

    @property
    def isFinal(self) -> bool:
        """Whether this is a final (non-1xx) response."""
        return self.code >= 200


Message = Request | Response

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
}
"""Default reason phrases (RFC 3261 §21)."""


def _hasTag(nameAddr: str) -> bool:
    """Whether a To/From value carries a header C{tag} parameter."""
    paramsAt = nameAddr.rfind(">") + 1
    return ";tag=" in nameAddr[paramsAt:].lower().replace(" ", "").replace("\t", "")


def makeResponse(
    requestHeaders: Headers,
    code: int,
    reason: str | None = None,
    *,
    toTag: str | None = None,
    body: bytes = b"",
    contentType: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> Response:
    """
    A response to a request with C{requestHeaders} (RFC 3261 §8.2.6): Via
    fields copied in order, To (with C{toTag} added when it has no tag and
    the response is not 100), From, CSeq, Call-ID, then Content-Type (when
    there is a body), C{extra}, Content-Length — the order Kamailio uses.
    """
    fields = requestHeaders.fields
    index = requestHeaders._index
    out = [fields[i] for i in index.get("via", ())]
    # the response's own index, built along (its names are canonical keys)
    outIndex: dict[str, list[int]] = {"via": list(range(len(out)))} if out else {}
    for key in ("to", "from", "cseq", "call-id"):
        slot = index.get(key)
        if slot is not None:
            name, value = fields[slot[0]]
            if key == "to" and toTag is not None and code != 100 and not _hasTag(value):
                value = f"{value};tag={toTag}"
            outIndex[key] = [len(out)]
            out.append((name, value))
    if contentType is not None and body:
        outIndex["content-type"] = [len(out)]
        out.append(("Content-Type", contentType))
    for name, value in extra:
        key = canonicalName(name)
        slot = outIndex.get(key)
        if slot is None:
            outIndex[key] = [len(out)]
        else:
            slot.append(len(out))
        out.append((name, value))
    slot = outIndex.get("content-length")
    if slot is None:
        outIndex["content-length"] = [len(out)]
    else:
        slot.append(len(out))
    out.append(("Content-Length", str(len(body))))
    return Response(
        code=code,
        reason=reason if reason is not None else REASON_PHRASES.get(code, "Unknown"),
        headers=Headers._prebuilt(tuple(out), outIndex),
        body=body,
    )
