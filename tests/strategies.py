"""
Hypothesis strategies for SIP values.

Every strategy here builds values that serialize and parse back equal:
C{SIPURI.parse(str(uri)) == uri}, C{parseMessage(request.toBytes()) ==
request}, and so on. Where the wire form cannot tell two values apart (an
empty display name and none, a Content-Length that disagrees with the body)
the strategies only build the canonical one.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

from dmq_bus.sip.message import Headers, Request, Response, canonicalName
from dmq_bus.sip.uri import SIPURI, NameAddr, Params, Via

TOKEN_ALPHABET = string.ascii_letters + string.digits + "-.!%*_+`'~"
"""RFC 3261 C{token} characters."""

USER_ALPHABET = string.ascii_letters + string.digits + "-_.!~*'+"
"""Characters safe in a URI user or password part in every context."""

QUOTED_ALPHABET = string.ascii_letters + string.digits + " ,;:=<>@?/&'()[]{}!#$%*+-._~"
"""Quoted-string content: commas, semicolons and brackets included."""

HEADER_NAMES = [
    "Via",
    "v",
    "VIA",
    "To",
    "t",
    "From",
    "f",
    "Call-ID",
    "i",
    "call-id",
    "CSeq",
    "Max-Forwards",
    "Content-Type",
    "c",
    "Contact",
    "m",
    "Subject",
    "s",
    "Supported",
    "k",
    "User-Agent",
    "Server",
    "X-Custom",
]
"""Header names as they appear on the wire, in several spellings."""

tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=12)
"""RFC 3261 tokens (method names, parameter names, transports...)."""

methods = st.one_of(st.sampled_from(["KDMQ", "OPTIONS", "MESSAGE", "INVITE"]), tokens)
"""Request methods: the usual ones and any token."""

ports = st.integers(min_value=0, max_value=65535)
"""Port numbers."""

ipv4Hosts = st.ip_addresses(v=4).map(str)
"""Dotted-quad IPv4 hosts."""

ipv6Hosts = st.ip_addresses(v=6).map(lambda address: f"[{address}]")
"""IPv6 references, in brackets as they are written in SIP."""

_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)

dnsHosts = st.lists(_labels, min_size=1, max_size=4).map(".".join)
"""DNS names."""

hosts = st.one_of(ipv4Hosts, ipv6Hosts, dnsHosts)
"""Any host a SIP URI or Via may name."""


def _quoted(content: str) -> str:
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


quotedStrings = st.text(QUOTED_ALPHABET + '"\\', max_size=20).map(_quoted)
"""Quoted strings, with escaped quotes and backslashes inside."""

uriParams: st.SearchStrategy[Params] = st.lists(
    st.tuples(tokens, st.none() | tokens), max_size=4
).map(tuple)
"""URI parameters in order, C{None} for a flag (C{;lr})."""

headerParams: st.SearchStrategy[Params] = st.lists(
    st.tuples(tokens, st.none() | tokens | quotedStrings | ipv6Hosts), max_size=4
).map(tuple)
"""Header parameters (To/From/Via), values possibly quoted."""

_users = st.text(USER_ALPHABET, min_size=1, max_size=12)
_uriHeaders = st.lists(st.tuples(tokens, tokens), min_size=1, max_size=3).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)
)


@st.composite
def sipURIs(draw: st.DrawFn, *, withParams: bool = True, withHeaders: bool = True) -> SIPURI:
    """C{sip:}/C{sips:} URIs, with or without user, password, port, params, headers."""
    user = draw(st.none() | _users)
    return SIPURI(
        scheme=draw(st.sampled_from(["sip", "sips", "SIP"])),
        user=user,
        password=None if user is None else draw(st.none() | _users),
        host=draw(hosts),
        port=draw(st.none() | ports),
        params=draw(uriParams) if withParams else (),
        headers=draw(st.none() | _uriHeaders) if withHeaders else None,
    )


_displayNames = st.one_of(
    st.lists(tokens, min_size=1, max_size=3).map(" ".join),
    quotedStrings,
)


@st.composite
def nameAddrs(draw: st.DrawFn) -> NameAddr:
    """
    To/From values: C{"Display" <uri>;params}, C{<uri>;params} or a bare
    C{uri;params} (which cannot carry URI parameters or a display name).
    """
    if draw(st.booleans()):
        return NameAddr(
            uri=draw(sipURIs()),
            display=draw(st.none() | _displayNames),
            params=draw(headerParams),
            bracketed=True,
        )
    return NameAddr(
        uri=draw(sipURIs(withParams=False, withHeaders=False)),
        params=draw(headerParams),
        bracketed=False,
    )


vias = st.builds(
    Via,
    transport=st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "udp"]) | tokens,
    host=hosts,
    port=st.none() | ports,
    params=headerParams,
)
"""Via values (C{SIP/2.0/UDP host:port;params})."""

_headerText = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
        blacklist_characters="\r\n",
    ),
    max_size=40,
).map(lambda text: text.strip(" \t"))
"""Free header text: any printable Unicode, no line breaks, no edge blanks."""


@st.composite
def headerFields(draw: st.DrawFn) -> tuple[str, str]:
    """One header field: a structured Via/To/From or free text under any name."""
    kind = draw(st.sampled_from(["via", "nameaddr", "text", "token-name"]))
    if kind == "via":
        values = draw(st.lists(vias, min_size=1, max_size=3))
        return draw(st.sampled_from(["Via", "v", "via"])), ", ".join(map(str, values))
    if kind == "nameaddr":
        return draw(st.sampled_from(["To", "t", "From", "f"])), str(draw(nameAddrs()))
    if kind == "text":
        return draw(st.sampled_from(HEADER_NAMES)), draw(_headerText)
    name = draw(tokens.filter(lambda n: canonicalName(n) != "content-length"))
    return name, draw(_headerText)


headerLists = st.lists(headerFields(), max_size=12)
"""Header fields in order, names repeated at will; never a Content-Length."""

headers = headerLists.map(Headers.of)
"""L{Headers} without Content-Length."""

bodies = st.binary(max_size=300)
"""Bodies: any bytes."""


@st.composite
def _withContentLength(draw: st.DrawFn, body: bytes) -> Headers:
    """Headers holding exactly one Content-Length (right for C{body}), anywhere."""
    fields = draw(headerLists)
    name = draw(st.sampled_from(["Content-Length", "l", "content-length"]))
    at = draw(st.integers(min_value=0, max_value=len(fields)))
    fields.insert(at, (name, str(len(body))))
    return Headers.of(fields)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Requests with any token method, a SIP Request-URI, any headers and body."""
    body = draw(bodies)
    return Request(
        method=draw(methods),
        uri=draw(sipURIs()),
        headers=draw(_withContentLength(body)),
        body=body,
    )


_reasons = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\r\n"),
    max_size=30,
)


@st.composite
def responses(draw: st.DrawFn) -> Response:
    """Responses with any code 100-699, any reason phrase, any headers and body."""
    body = draw(bodies)
    return Response(
        code=draw(st.integers(min_value=100, max_value=699)),
        reason=draw(_reasons),
        headers=draw(_withContentLength(body)),
        body=body,
    )


messages = st.one_of(requests(), responses())
"""Requests and responses."""
