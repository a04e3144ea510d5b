"""
SIP URIs, name-addr values (To/From) and Via values: frozen values with
parsers and exact serializers.

Strings here are header text (``str``); the parser in L{dmq_bus.sip.parser}
decodes header bytes losslessly, so serializing what was parsed gives the
received bytes back.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from dmq_bus.sip.errors import SIPParseError

Params = tuple[tuple[str, str | None], ...]
"""URI or header parameters in received order: C{(name, value or None)}."""

_DEFAULT_PORTS = {"sip": 5060, "sips": 5061}


def _paramValue(params: Params, name: str) -> str | None:
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return value if value is not None else ""
    return None


def _hasParam(params: Params, name: str) -> bool:
    lname = name.lower()
    return any(key.lower() == lname for key, _ in params)


def _withParam(params: Params, name: str, value: str | None) -> Params:
    lname = name.lower()
    out = [(k, v) for k, v in params if k.lower() != lname]
    out.append((name, value))
    return tuple(out)


def _formatParams(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def _parseParams(text: str, offset: int) -> Params:
    """
    Parse C{;a=b;c} (leading semicolon optional) into L{Params}.
    Quoted values keep their quotes.
    """
    if not text:
        return ()
    out: list[tuple[str, str | None]] = []
    text = text.lstrip(";")
    # the usual parameters (branch=..., tag=...) hold no quotes or brackets
    parts = (
        text.split(";") if '"' not in text and "<" not in text else _splitOutsideQuotes(text, ";")
    )
    for part in parts:
        part = part.strip()
        if not part:
            raise SIPParseError("empty parameter", offset)
        name, sep, value = part.partition("=")
        name = name.strip()
        if not name:
            raise SIPParseError(f"parameter without a name: {part!r}", offset)
        out.append((name, value.strip() if sep else None))
    return tuple(out)


def _splitOutsideQuotes(text: str, sep: str) -> Iterator[str]:
    """Split on C{sep} except inside double quotes or angle brackets."""
    if '"' not in text and "<" not in text:
        yield from text.split(sep)
        return
    start = 0
    inQuote = False
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if inQuote:
            if c == "\\":
                i += 1
            elif c == '"':
                inQuote = False
        elif c == '"':
            inQuote = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == sep and depth == 0:
            yield text[start:i]
            start = i + 1
        i += 1
    yield text[start:]


def findOutsideQuotes(text: str, char: str) -> int:
    """The index of the first C{char} not inside a quoted string, or -1."""
    at = text.find(char)
    if at < 0 or '"' not in text[:at]:
        return at
    inQuote = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if inQuote:
            if c == "\\":
                i += 1
            elif c == '"':
                inQuote = False
        elif c == '"':
            inQuote = True
        elif c == char:
            return i
        i += 1
    return -1


def splitHostPort(text: str, offset: int = 0) -> tuple[str, int | None]:
    """
    Split C{host[:port]}; IPv6 references keep their brackets
    (C{[::1]:5060} gives C{("[::1]", 5060)}).
    """
    if not text:
        raise SIPParseError("empty host", offset)
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            raise SIPParseError(f"unterminated IPv6 reference: {text!r}", offset)
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise SIPParseError(f"junk after IPv6 reference: {text!r}", offset)
        portText = rest[1:]
    else:
        host, sep, portText = text.partition(":")
        if not sep:
            portText = ""
            if not _validHost(host):
                raise SIPParseError(f"bad host: {text!r}", offset)
            return host, None
        if not _validHost(host):
            raise SIPParseError(f"bad host: {text!r}", offset)
    if not portText.isdigit() or not portText.isascii() or len(portText) > 5:
        raise SIPParseError(f"bad port in {text!r}", offset)
    port = int(portText)
    if port > 65535:
        raise SIPParseError(f"port out of range in {text!r}", offset)
    return host, port


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _validHost(host: str) -> bool:
    return bool(host) and len(host) <= 254 and _HOST_CHARS.issuperset(host)


def stripBrackets(host: str) -> str:
    """C{[::1]} -> C{::1}; other hosts unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


_PARSED_URIS_LIMIT = 1024
"""
Most URIs L{SIPURI.parse} remembers. A DMQ node meets few distinct URIs
(one per channel and node) and URIs are frozen values, so a parsed URI is
shared by every message that carries the same text.
"""

_parsedURIs: dict[str, SIPURI] = {}


@attrs.frozen
class SIPURI:
    """
    A C{sip:} or C{sips:} URI:
    C{scheme:[user[:password]@]host[:port][;params][?headers]}.

    C{host} is kept as written (IPv6 with brackets); C{port} is None when
    the URI has none.
    """

    host: str
    port: int | None = None
    user: str | None = None
    password: str | None = None
    params: Params = ()
    headers: str | None = None
    scheme: str = "sip"

    def __str__(self) -> str:
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(self.user)
            if self.password is not None:
                parts.append(":")
                parts.append(self.password)
            parts.append("@")
        parts.append(self.host)
        if self.port is not None:
            parts.append(f":{self.port}")
        if self.params:
            parts.append(_formatParams(self.params))
        if self.headers is not None:
            parts.append("?")
            parts.append(self.headers)
        return "".join(parts)

    def param(self, name: str) -> str | None:
        """The value of parameter C{name} (C{""} for a flag), or None."""
        return _paramValue(self.params, name)

    def withParam(self, name: str, value: str | None) -> SIPURI:
        """A copy with C{name} set (replacing any earlier value)."""
        return attrs.evolve(self, params=_withParam(self.params, name, value))

    @property
    def transport(self) -> str:
        """The lower-case C{;transport=} value; C{"tls"} for C{sips:}, else C{"udp"}."""
        value = self.param("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme.lower() == "sips" else "udp"

    @property
    def defaultedPort(self) -> int:
        """The port, or the scheme's default (5060, or 5061 for C{sips:})."""
        if self.port is not None:
            return self.port
        return _DEFAULT_PORTS.get(self.scheme.lower(), 5060)

    @classmethod
    def parse(cls, text: str, offset: int = 0) -> SIPURI:
        """Parse a SIP URI, raising L{SIPParseError} if it is not one."""
        uri = _parsedURIs.get(text)
        if uri is None:
            uri = cls._parse(text, offset)
            if len(_parsedURIs) < _PARSED_URIS_LIMIT:
                _parsedURIs[text] = uri
        return uri

    @classmethod
    def _parse(cls, text: str, offset: int) -> SIPURI:
        scheme, sep, rest = text.partition(":")
        lscheme = scheme.lower()
        if not sep or lscheme not in _DEFAULT_PORTS:
            raise SIPParseError(f"not a sip/sips URI: {text[:80]!r}", offset)
        if not rest:
            raise SIPParseError("URI without host", offset)
        headers: str | None = None
        if "?" in rest:
            rest, _, headers = rest.partition("?")
        user: str | None = None
        password: str | None = None
        at = rest.rfind("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            user, psep, pw = userinfo.partition(":")
            if psep:
                password = pw
        hostport, semi, paramText = rest.partition(";")
        host, port = splitHostPort(hostport, offset)
        params = _parseParams(paramText, offset) if semi else ()
        return cls(
            host=host,
            port=port,
            user=user,
            password=password,
            params=params,
            headers=headers,
            scheme=scheme,
        )


@attrs.frozen
class NameAddr:
    """
    A To/From/Contact-style value: an optional display name, a URI and
    header parameters (C{tag} among them). C{bracketed} records whether the
    URI was written in angle brackets, so serialization gives it back.
    """

    uri: SIPURI
    display: str | None = None
    params: Params = ()
    bracketed: bool = True

    def __str__(self) -> str:
        if self.bracketed or self.display is not None:
            head = f"{self.display} <{self.uri}>" if self.display else f"<{self.uri}>"
        else:
            head = str(self.uri)
        return head + _formatParams(self.params)

    @property
    def tag(self) -> str | None:
        """The C{tag} parameter, or None."""
        return _paramValue(self.params, "tag")

    def withTag(self, tag: str) -> NameAddr:
        """A copy with C{;tag=tag}."""
        return attrs.evolve(self, params=_withParam(self.params, "tag", tag))

    @classmethod
    def parse(cls, text: str, offset: int = 0) -> NameAddr:
        """Parse C{["Name"] <uri>;params} or C{uri;params}."""
        text = text.strip()
        lt = findOutsideQuotes(text, "<")
        if lt >= 0:
            gt = text.find(">", lt)
            if gt < 0:
                raise SIPParseError(f"unterminated '<' in {text[:80]!r}", offset)
            display = text[:lt].strip() or None
            uri = SIPURI.parse(text[lt + 1 : gt].strip(), offset)
            params = _parseParams(text[gt + 1 :].strip(), offset)
            return cls(uri=uri, display=display, params=params, bracketed=True)
        # addr-spec form: every ';' parameter belongs to the header, not the URI
        uriText, semi, paramText = text.partition(";")
        uri = SIPURI.parse(uriText.strip(), offset)
        params = _parseParams(paramText, offset) if semi else ()
        return cls(uri=uri, params=params, bracketed=False)


@attrs.frozen
class Via:
    """
    One Via value: C{SIP/2.0/UDP host[:port];params}.
    """

    transport: str
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP/2.0"

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.protocol}/{self.transport} {self.host}{port}{_formatParams(self.params)}"

    @property
    def branch(self) -> str | None:
        """The C{branch} parameter, or None."""
        return _paramValue(self.params, "branch")

    @property
    def sentBy(self) -> tuple[str, int]:
        """C{(host, port)} with the transport's default port filled in."""
        default = 5061 if self.transport.upper() == "TLS" else 5060
        return (self.host.lower(), self.port if self.port is not None else default)

    def param(self, name: str) -> str | None:
        """The value of parameter C{name} (C{""} for a flag), or None."""
        return _paramValue(self.params, name)

    def hasParam(self, name: str) -> bool:
        """Whether parameter C{name} is present (with or without a value)."""
        return _hasParam(self.params, name)

    def withParam(self, name: str, value: str | None) -> Via:
        """A copy with C{name} set (replacing any earlier value)."""
        return attrs.evolve(self, params=_withParam(self.params, name, value))

    @classmethod
    def parse(cls, text: str, offset: int = 0) -> Via:
        """Parse one Via value (no commas)."""
        text = text.strip()
        head, semi, paramText = text.partition(";")
        sentBy = _parsedViaHeads.get(head)
        if sentBy is None:
            return cls._parse(text, head, offset)
        protocol, transport, host, port = sentBy
        params = _parseParams(paramText, offset) if semi else ()
        return cls(transport=transport, host=host, port=port, params=params, protocol=protocol)

    @classmethod
    def _parse(cls, text: str, head: str, offset: int) -> Via:
        """
        Parse the stripped Via value C{text} whose part before the first
        semicolon is C{head}; remember what that part gave when it holds
        the protocol and sent-by whole (it has a blank).
        """
        proto, sp, rest = text.partition(" ")
        if not sp:
            # tolerate tabs or several spaces between protocol and sent-by
            parts = text.split(None, 1)
            if len(parts) != 2:
                raise SIPParseError(f"bad Via: {text[:80]!r}", offset)
            proto, rest = parts
        pieces = proto.split("/")
        if len(pieces) != 3 or not all(p.strip() for p in pieces):
            raise SIPParseError(f"bad Via protocol: {proto[:80]!r}", offset)
        protocol = f"{pieces[0].strip()}/{pieces[1].strip()}"
        transport = pieces[2].strip()
        rest = rest.strip()
        hostport, semi, paramText = rest.partition(";")
        host, port = splitHostPort(hostport.strip(), offset)
        params = _parseParams(paramText, offset) if semi else ()
        if " " in head and len(_parsedViaHeads) < _PARSED_VIA_HEADS_LIMIT:
            _parsedViaHeads[head] = (protocol, transport, host, port)
        return cls(transport=transport, host=host, port=port, params=params, protocol=protocol)


_PARSED_VIA_HEADS_LIMIT = 1024
"""
Most Via heads (C{SIP/2.0/UDP host:port}, the text before the parameters)
L{Via.parse} remembers. A node meets few distinct senders, while each Via
has its own branch: only the parameters are parsed for every message.
"""

_parsedViaHeads: dict[str, tuple[str, str, str, int | None]] = {}
"""Via heads to the C{(protocol, transport, host, port)} they parse to."""


def viaSentByFast(text: str) -> tuple[str, str, int | None] | None:
    """
    C{(transport, host, port)} of the one Via value C{text}, from the
    remembered heads of L{Via.parse}, when C{text} is a valid Via without a
    C{received} or C{rport} parameter; None when that is not known cheaply
    (then parse it with L{Via.parse}).
    """
    head, semi, paramText = text.strip().partition(";")
    sentBy = _parsedViaHeads.get(head)
    if sentBy is None:
        return None
    lowered = paramText.lower()
    if "received" in lowered or "rport" in lowered:
        return None
    if semi:
        try:
            _parseParams(paramText, 0)
        except SIPParseError:
            return None
    return sentBy[1], sentBy[2], sentBy[3]


def nameAddrURI(text: str) -> SIPURI:
    """
    The URI of the To/From-style value C{text}: C{NameAddr.parse(text).uri}
    (raising as it does), without building the L{NameAddr} in the usual
    C{<uri>;params} form.
    """
    text = text.strip()
    if text.startswith("<"):
        gt = text.find(">")
        if gt > 0:
            uri = SIPURI.parse(text[1:gt].strip())
            paramText = text[gt + 1 :].strip()
            if paramText:
                _parseParams(paramText, 0)
            return uri
    return NameAddr.parse(text).uri


def splitCommaValues(text: str) -> list[str]:
    """Split a comma-joined header value (Via, Contact, ...) outside quotes and brackets."""
    return [part.strip() for part in _splitOutsideQuotes(text, ",")]
