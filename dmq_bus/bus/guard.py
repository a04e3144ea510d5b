"""
Who may take part in a bus: requests over TLS only, source networks,
known nodes, and requests signed with a shared secret.

Kamailio 5.6.3 lets any host that reaches its DMQ port join the bus or
write to its tables. This module holds the access policy of a dmq-bus node
(L{AccessPolicy}) and the object that applies it (L{Guard}): the bus asks
it about every received request before any peer sees it, has it sign every
KDMQ request it sends and every response to a signed request, and has it
check the responses to its own signed requests.

The signature is one header Kamailio ignores, added last:

    X-DMQ-Auth: v1;ts=<unix seconds>;nonce=<32 hex>;sig=<64 hex>

C{sig} is the lower-case hex HMAC-SHA256, keyed with the shared secret, of
these items, each written as a netstring (C{<byte length>:<bytes>,}) and
concatenated: C{dmq-auth-v1-request}, the method, the Request-URI, the
Call-ID, the CSeq, the whole From value (URI and tag), the Max-Forwards,
the Content-Type (empty when absent), C{ts}, C{nonce}, the body. A response
to a signed request carries C{X-DMQ-Auth: v1;sig=<64 hex>} over
C{dmq-auth-v1-response}, the status code, Call-ID, CSeq, From, the whole
To value (with its tag), the request's nonce, Content-Type and body: it is
bound to that one request, so it needs no nonce or time of its own.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import re
import secrets
from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dmq_bus.sip.address import Origin
from dmq_bus.sip.message import Request, Response

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTH_HEADER = "X-DMQ-Auth"
"""The header that carries the signature (Kamailio ignores unknown headers)."""

DEFAULT_SIGNATURE_WINDOW = 60.0
"""
Seconds a signed request's timestamp may be off the receiver's clock, either
way; beyond it the request is refused as stale. Nonces are remembered for as
long as their timestamp is inside it.
"""

DEFAULT_REPLAY_CACHE_SIZE = 200_000
"""
Most nonces remembered at once. Only correctly signed requests enter it, and
each stays until its timestamp leaves the window (at most 2 × window), so the
default holds a sustained ~1,600 signed requests per second with the 60 s
window. When it is full even after dropping the expired nonces, a signed
request is answered C{503 Service Unavailable} (counted
C{in.refused.replay_cache_full}) rather than accepted unchecked.
"""

MIN_SECRET_LENGTH = 16
"""Fewest bytes a shared secret may have (after trailing whitespace is stripped)."""

_LOGGED_LIMIT = 4096
"""Most (source, reason) pairs logged; past it, new ones are only counted."""

_NETWORK_CACHE_LIMIT = 4096
"""Most source addresses whose network membership is remembered."""

_REQUEST_AUTH = re.compile(r"v1;ts=([0-9]{1,12});nonce=([0-9a-f]{32});sig=([0-9a-f]{64})")
_RESPONSE_AUTH = re.compile(r"v1;sig=([0-9a-f]{64})")


def parseNetworks(texts: Iterable[str]) -> tuple[Network, ...]:
    """
    The networks written as C{CIDR} (C{10.0.0.0/8}, C{fd00::/64}, or one
    address). L{ValueError} naming the bad one, also when host bits are set
    (C{10.0.0.5/8}: say C{10.0.0.0/8} or C{10.0.0.5/32}).
    """
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as e:
            raise ValueError(f"not a network (CIDR): {text!r} ({e})") from None
    return tuple(networks)


def loadSecret(path: str) -> bytes:
    """
    The shared secret in the file at C{path}: its bytes, trailing whitespace
    (the newline an editor adds) removed. L{ValueError} when the file cannot
    be read or holds fewer than L{MIN_SECRET_LENGTH} bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().rstrip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"{path} holds {len(secret)} bytes; a secret needs at least {MIN_SECRET_LENGTH}"
        )
    return secret


def _checkNetworks(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) for n in value
    ):
        raise TypeError(f"{attribute.name} must be a tuple of networks (see parseNetworks)")


@attrs.frozen
class AccessPolicy:
    """
    Which requests a node accepts. The default accepts everything, as
    Kamailio 5.6.3 does, and puts nothing extra on the wire.

    @ivar allowNetworks: source networks requests may come from; empty: any.
        Requests from elsewhere get C{403} (C{in.forbidden.network}).
    @ivar knownNodesOnly: requests on application channels (every channel
        but the notification channel) must come from a node listed
        C{active}, by their From-URI; else C{403}
        (C{in.forbidden.unknown_node}).
    @ivar secret: the shared secret; with it, every KDMQ request sent is
        signed and every request received must be (see the module
        docstring); None: nothing is signed or checked.
    @ivar unsignedFrom: networks whose I{unsigned} requests are accepted
        although a secret is set (Kamailio nodes cannot sign); a request
        that carries a bad signature is refused wherever it comes from.
    @ivar signatureWindow: see L{DEFAULT_SIGNATURE_WINDOW}.
    @ivar replayCacheSize: see L{DEFAULT_REPLAY_CACHE_SIZE}.
    @ivar tlsOnly: requests must arrive over TLS (their origin's transport
        is C{tls}: a connection whose peer presented a certificate the CA
        bundle verifies); others, over UDP or plain TCP, get C{403}
        (C{in.forbidden.not_tls}). Checked first. Answers to our own
        requests are not concerned. The node's own server address must
        then be C{;transport=tls} (checked by L{dmq_bus.service.DMQService}
        and the options).
    """

    allowNetworks: tuple[Network, ...] = attrs.field(default=(), validator=_checkNetworks)
    knownNodesOnly: bool = False
    secret: bytes | None = attrs.field(default=None, repr=False)
    unsignedFrom: tuple[Network, ...] = attrs.field(default=(), validator=_checkNetworks)
    signatureWindow: float = DEFAULT_SIGNATURE_WINDOW
    replayCacheSize: int = DEFAULT_REPLAY_CACHE_SIZE
    tlsOnly: bool = False

    def __attrs_post_init__(self) -> None:
        if self.secret is not None and len(self.secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"a secret needs at least {MIN_SECRET_LENGTH} bytes")
        if self.unsignedFrom and self.secret is None:
            raise ValueError("unsigned-from networks only make sense with a secret")
        if not self.signatureWindow > 0:
            raise ValueError("the signature window must be > 0 seconds")
        if self.replayCacheSize < 1:
            raise ValueError("the replay cache needs room for at least one nonce")

    @property
    def isOpen(self) -> bool:
        """Whether this policy accepts everything and signs nothing (the default)."""
        return (
            not self.allowNetworks
            and not self.knownNodesOnly
            and self.secret is None
            and not self.tlsOnly
        )


@attrs.frozen
class Refusal:
    """
    Why a request is refused: the response C{code} and C{reason}, the
    counter to increment and a C{detail} for the log.
    """

    code: int
    reason: str
    counter: str
    detail: str


FORBIDDEN_NOT_TLS = Refusal(403, "Forbidden: TLS Required", "in.forbidden.not_tls", "not over TLS")
FORBIDDEN_NETWORK = Refusal(403, "Forbidden", "in.forbidden.network", "source not allowed")
FORBIDDEN_UNKNOWN_NODE = Refusal(
    403, "Forbidden", "in.forbidden.unknown_node", "sender is not an active node"
)
FORBIDDEN_UNSIGNED = Refusal(403, "Forbidden", "in.forbidden.unsigned", "no signature")
FORBIDDEN_BAD_SIGNATURE = Refusal(
    403, "Forbidden", "in.forbidden.bad_signature", "signature does not verify"
)
FORBIDDEN_STALE = Refusal(403, "Forbidden", "in.forbidden.stale", "timestamp outside the window")
FORBIDDEN_REPLAYED = Refusal(403, "Forbidden", "in.forbidden.replayed", "nonce already seen")
REPLAY_CACHE_FULL = Refusal(
    503, "Service Unavailable", "in.refused.replay_cache_full", "replay cache full"
)


@attrs.frozen
class Admission:
    """
    The guard's answer about one request: a L{Refusal}, or None to go on;
    C{nonce} is the request's nonce when its signature was verified (its
    response is then signed).
    """

    refusal: Refusal | None = None
    nonce: str | None = None


_ADMITTED = Admission()


def _netstrings(items: Iterable[bytes]) -> bytes:
    return b"".join(b"%d:%s," % (len(item), item) for item in items)


def _text(value: str | None) -> bytes:
    return (value or "").encode("utf-8", "surrogateescape")


class _NetworkSet:
    """Networks, and a bounded memory of which hosts are in them."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks
        self._known: dict[str, bool] = {}

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        inside = self._known.get(host)
        if inside is None:
            inside = self._lookup(host)
            if len(self._known) >= _NETWORK_CACHE_LIMIT:
                self._known.clear()
            self._known[host] = inside
        return inside

    def _lookup(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class ReplayCache:
    """
    The nonces of recently accepted signed requests, each until its
    C{expiry}; at most C{size} of them.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._expiries: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiries)

    def add(self, nonce: str, expiry: float, now: float) -> bool | None:
        """
        Remember C{nonce}: True if it is new, False if it was seen (and has
        not expired), None if there is no room even after forgetting the
        expired ones.
        """
        seen = self._expiries.get(nonce)
        if seen is not None and seen >= now:
            return False
        if len(self._expiries) >= self.size:
            self._forget(now)
            if len(self._expiries) >= self.size:
                return None
        self._expiries[nonce] = expiry
        heapq.heappush(self._heap, (expiry, nonce))
        return True

    def _forget(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expiry, nonce = heapq.heappop(heap)
            if self._expiries.get(nonce) == expiry:
                del self._expiries[nonce]


class Guard:
    """
    Applies an L{AccessPolicy} for one bus: admits or refuses received
    requests, signs what the bus sends, verifies the answers. Counts every
    decision in C{counters}; logs each refusal once per source and reason.
    """

    log = Logger()

    def __init__(self, policy: AccessPolicy, clock: IReactorTime, counters: Counter[str]) -> None:
        self.policy = policy
        self.clock = clock
        self.counters = counters
        self._allowed = _NetworkSet(policy.allowNetworks) if policy.allowNetworks else None
        self._unsignedFrom = _NetworkSet(policy.unsignedFrom)
        self._secret = policy.secret
        self.replays = ReplayCache(policy.replayCacheSize)
        self._logged: set[tuple[str, str]] = set()

    @property
    def signs(self) -> bool:
        """Whether requests are signed (a secret is set)."""
        return self._secret is not None

    # -- received requests

    def admit(self, request: Request, origin: Origin | None) -> Admission:
        """
        Whether C{request} from C{origin} may go on: the transport (with
        C{tlsOnly}), the network rule, then (with a secret) the signature.
        Counts and logs a refusal.
        """
        if self.policy.tlsOnly and (origin is None or origin.address.transport != "tls"):
            return self.refuse(FORBIDDEN_NOT_TLS, request, origin)
        host = origin.address.host if origin is not None else None
        if self._allowed is not None and host not in self._allowed:
            return self.refuse(FORBIDDEN_NETWORK, request, origin)
        if self._secret is None:
            return _ADMITTED
        values = request.headers.getAll(AUTH_HEADER)
        if not values:
            if host in self._unsignedFrom:
                self.counters["in.unsigned_accepted"] += 1
                return _ADMITTED
            return self.refuse(FORBIDDEN_UNSIGNED, request, origin)
        match = _REQUEST_AUTH.fullmatch(values[0].strip()) if len(values) == 1 else None
        if match is None:
            return self.refuse(FORBIDDEN_BAD_SIGNATURE, request, origin)
        ts, nonce, sig = match.groups()
        expected = self._requestSignature(request, ts, nonce)
        if not hmac.compare_digest(expected, sig):
            return self.refuse(FORBIDDEN_BAD_SIGNATURE, request, origin)
        now = self.clock.seconds()
        window = self.policy.signatureWindow
        if abs(now - int(ts)) > window:
            return self.refuse(FORBIDDEN_STALE, request, origin)
        fresh = self.replays.add(nonce, int(ts) + window, now)
        if fresh is None:
            return self.refuse(REPLAY_CACHE_FULL, request, origin)
        if not fresh:
            return self.refuse(FORBIDDEN_REPLAYED, request, origin)
        self.counters["in.authenticated"] += 1
        return Admission(nonce=nonce)

    def refuse(self, refusal: Refusal, request: Request, origin: Origin | None) -> Admission:
        """Count C{refusal} of C{request}, log it once per source, and return it."""
        self.counters[refusal.counter] += 1
        source = str(origin.address) if origin is not None else "unknown"
        key = (source, refusal.counter)
        if key not in self._logged and len(self._logged) < _LOGGED_LIMIT:
            self._logged.add(key)
            self.log.warn(
                "Refused {method} from {source} with {code}: {detail} "
                "(further refusals of this source for this reason are only counted)",
                method=request.method,
                source=source,
                code=refusal.code,
                reason=refusal.counter,
                detail=refusal.detail,
                channel=request.uri.user,
                node=request.headers.get("from"),
                call_id=request.headers.get("call-id"),
            )
        return Admission(refusal=refusal)

    # -- signing and verifying

    def _hmac(self, items: Iterable[bytes]) -> str:
        assert self._secret is not None
        return hmac.new(self._secret, _netstrings(items), hashlib.sha256).hexdigest()

    def _requestSignature(self, request: Request, ts: str, nonce: str) -> str:
        headers = request.headers
        return self.requestSignature(
            request.method,
            str(request.uri),
            headers.get("call-id"),
            headers.get("cseq"),
            headers.get("from"),
            headers.get("max-forwards"),
            headers.get("content-type"),
            ts,
            nonce,
            request.body,
        )

    def requestSignature(
        self,
        method: str,
        uri: str,
        callID: str | None,
        cseq: str | None,
        fromValue: str | None,
        maxForwards: str | None,
        contentType: str | None,
        ts: str,
        nonce: str,
        body: bytes,
    ) -> str:
        """The C{sig} of a request with these fields (see the module docstring)."""
        return self._hmac(
            (
                b"dmq-auth-v1-request",
                _text(method),
                _text(uri),
                _text(callID),
                _text(cseq),
                _text(fromValue),
                _text(maxForwards),
                _text(contentType),
                _text(ts),
                _text(nonce),
                body,
            )
        )

    def signRequest(
        self,
        method: str,
        uri: str,
        callID: str,
        cseq: str,
        fromValue: str,
        maxForwards: str,
        contentType: str,
        body: bytes,
    ) -> tuple[str, str]:
        """The C{X-DMQ-Auth} value of a request to send, and its nonce."""
        ts = str(int(self.clock.seconds()))
        nonce = secrets.token_hex(16)
        sig = self.requestSignature(
            method, uri, callID, cseq, fromValue, maxForwards, contentType, ts, nonce, body
        )
        return f"v1;ts={ts};nonce={nonce};sig={sig}", nonce

    def _responseSignature(self, response: Response, nonce: str) -> str:
        headers = response.headers
        return self._hmac(
            (
                b"dmq-auth-v1-response",
                b"%d" % response.code,
                _text(headers.get("call-id")),
                _text(headers.get("cseq")),
                _text(headers.get("from")),
                _text(headers.get("to")),
                _text(nonce),
                _text(headers.get("content-type")),
                response.body,
            )
        )

    def signResponse(self, response: Response, nonce: str) -> Response:
        """C{response} to the signed request with C{nonce}, signed (header added last)."""
        sig = self._responseSignature(response, nonce)
        return attrs.evolve(
            response, headers=response.headers.appending(AUTH_HEADER, f"v1;sig={sig}")
        )

    def responseVerified(self, response: Response, nonce: str, host: str) -> bool:
        """
        Whether C{response}, from a node at C{host}, to our request signed
        with C{nonce} may be believed: it is signed by the secret for that
        request, or unsigned from an C{unsignedFrom} network. Counted.
        """
        values = response.headers.getAll(AUTH_HEADER)
        if not values and host in self._unsignedFrom:
            self.counters["out.unsigned_responses_accepted"] += 1
            return True
        match = _RESPONSE_AUTH.fullmatch(values[0].strip()) if len(values) == 1 else None
        if match is not None and hmac.compare_digest(
            self._responseSignature(response, nonce), match.group(1)
        ):
            return True
        self.counters["out.unauthenticated_responses"] += 1
        key = (host, "out.unauthenticated_responses")
        if key not in self._logged and len(self._logged) < _LOGGED_LIMIT:
            self._logged.add(key)
            self.log.warn(
                "Ignored a {code} response from {source} that is not signed for our request "
                "(counted as no answer; further ones from this source are only counted)",
                code=response.code,
                source=host,
                reason="out.unauthenticated_responses",
                call_id=response.headers.get("call-id"),
            )
        return False
