"""
The bus: routes received KDMQ requests to peers by channel, and sends KDMQ
requests to one node or to every active node, on the wire exactly as
Kamailio 5.6.3's dmq module does.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dmq_bus import __version__
from dmq_bus.bus.guard import AUTH_HEADER, FORBIDDEN_UNKNOWN_NODE, AccessPolicy, Guard, Refusal
from dmq_bus.bus.nodelist import DEFAULT_MAX_NODES, NodeList
from dmq_bus.bus.values import (
    BroadcastResult,
    Delivery,
    DeliveryFailed,
    DMQMessage,
    MembershipEvent,
    Node,
    NodeStatus,
    PeerResponse,
    isIPLiteral,
)
from dmq_bus.interfaces import IDMQBus, IDMQPeer, ISIPClient, ISIPRequestHandler
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import Headers, Request, Response, makeResponse
from dmq_bus.sip.transaction import TooManyTransactions
from dmq_bus.sip.uri import SIPURI, nameAddrURI

KDMQ = "KDMQ"
DEFAULT_CHANNEL = "notification_peer"
USER_AGENT = f"dmq-bus/{__version__}"


@attrs.frozen
class BusConfig:
    """
    How a node takes part in a bus. Names follow Kamailio's dmq modparams
    where there is one.

    @ivar serverAddress: this node's own URI (C{sip:ip:port}); its identity
        on the wire. Must be an IP literal with an explicit port.
    @ivar notificationAddresses: the seeds to join through; they start
        C{pending} and are never removed (a failed seed goes back to pending).
    @ivar channel: the membership channel (Kamailio's C{notification_channel}).
    @ivar pingInterval: seconds between pings to every other node.
    @ivar pingTimeout: seconds a ping (or join) waits for its answer before it
        counts as failed (Kamailio's C{fr_timer}, 30 s by default there).
    @ivar requestTimeout: seconds an application KDMQ waits for its answer
        (None: the SIP default, 64·T1 = 32 s).
    @ivar leaveTimeout: on stop, seconds to wait for the nodes to acknowledge
        that this node leaves.
    @ivar userAgent: the C{User-Agent} of our requests and C{Server} of our
        responses (None: neither header is sent).
    @ivar maxNodes: how many nodes the list holds (see L{DEFAULT_MAX_NODES}).
    @ivar removedHold: seconds during which a node removed for not answering
        cannot be re-added from other nodes' lists, only by contacting us
        itself. Covers the time a Kamailio 5.6.3 node keeps listing a dead
        node (2 × fr_timer + ping_interval: 120 s with its defaults).
    @ivar access: who may take part (source networks, known nodes, shared
        secret); the default accepts everyone and signs nothing, as Kamailio.
    """

    serverAddress: SIPURI = attrs.field()
    notificationAddresses: tuple[SIPURI, ...] = ()
    channel: str = DEFAULT_CHANNEL
    pingInterval: float = 5.0
    pingTimeout: float = 5.0
    requestTimeout: float | None = None
    leaveTimeout: float = 2.0
    userAgent: str | None = USER_AGENT
    maxNodes: int = DEFAULT_MAX_NODES
    removedHold: float = 120.0
    access: AccessPolicy = AccessPolicy()

    @serverAddress.validator
    def _checkServerAddress(self, attribute: object, value: SIPURI) -> None:
        if value.scheme != "sip":
            raise ValueError(f"server address must be a sip: URI, not {value}")
        if not isIPLiteral(value.host):
            raise ValueError(f"server address host must be an IP literal, not {value.host!r}")
        if value.port is None:
            raise ValueError(f"server address needs an explicit port: {value}")


class _Identifiers:
    """Cheap unique Call-IDs and tags for our requests."""

    def __init__(self, host: str) -> None:
        self._counter = int.from_bytes(secrets.token_bytes(6), "big")
        self._suffix = f"-{os.getpid()}@{host}"
        self._tagPrefix = secrets.token_hex(8)

    def next(self) -> tuple[str, str]:
        self._counter += 1
        return (
            f"{self._counter:016x}{self._suffix}",
            f"{self._tagPrefix}-{self._counter & 0xFFFFFFFF:08x}",
        )


@attrs.frozen
class _Addressing:
    """
    What every KDMQ request for one channel to one node shares: its
    Request-URI and the text of its To and From (before the tag) values.
    """

    uri: SIPURI
    to: str
    fromPrefix: str
    address: Address
    """Where the requests go (the node's L{Node.address})."""


def _requestIndex(userAgent: bool, signed: bool = False) -> dict[str, list[int]]:
    """
    The header index of a KDMQ request built by L{DMQBus.buildRequest}
    (with or without User-Agent, signed or not); every such request has its
    fields in the same places, so they share it (a L{Headers} never changes
    its index).
    """
    names = ["to", "from", "cseq", "call-id", "content-length"]
    names += ["user-agent"] if userAgent else []
    names += ["max-forwards", "content-type"]
    names += [AUTH_HEADER.lower()] if signed else []
    return {name: [i] for i, name in enumerate(names)}


_REQUEST_INDEXES = {True: _requestIndex(True), False: _requestIndex(False)}
_SIGNED_REQUEST_INDEXES = {True: _requestIndex(True, True), False: _requestIndex(False, True)}

_ADDRESSING_LIMIT = 4096
"""Most C{(channel, node)} pairs whose L{_Addressing} the bus remembers."""


class _CodeNames(dict[int, str]):
    """Counter names C{prefix + code}, each formatted once."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, code: int) -> str:
        name = f"{self.prefix}{code}"
        if len(self) < 1000:
            self[code] = name
        return name


class _ChannelCounters:
    """
    The names of one channel's per-message counters, built once rather
    than formatted for every message.
    """

    def __init__(self, channel: str) -> None:
        self.outRequests = f"out.requests.{channel}"
        self.outResponses = _CodeNames(f"out.responses.{channel}.")
        self.outFailures = _CodeNames(f"out.failures.{channel}.")
        self.inRequests = f"in.requests.{channel}"
        self.inResponses = _CodeNames(f"in.responses.{channel}.")


_CHANNELS_LIMIT = 1024
"""Most channels whose counter names the bus keeps (beyond it: rebuilt)."""


class _UnauthenticatedResponse(Exception):
    """A response to a signed request that is not signed for it."""


def _isKnownDMQBus(headers: Headers) -> bool:
    agent = headers.get("user-agent")
    return agent is not None and agent.startswith("dmq-bus")


@implementer(IDMQBus, ISIPRequestHandler)
class DMQBus:
    """
    One node's view of the bus: its node list, its peers, and the KDMQ
    requests it sends and answers.
    """

    log = Logger()

    def __init__(self, config: BusConfig, client: ISIPClient, clock: IReactorTime) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.nodeList = NodeList(
            Node.fromURI(config.serverAddress, NodeStatus.ACTIVE),
            maxNodes=config.maxNodes,
            counters=self.counters,
            clock=clock,
        )
        self._peers: dict[str, IDMQPeer] = {}
        self._ids = _Identifiers(config.serverAddress.host)
        self._toTagPrefix = secrets.token_hex(12)
        self._toTagCounter = 0
        self._serverHeader: tuple[tuple[str, str], ...] = (
            (("Server", config.userAgent),) if config.userAgent else ()
        )
        self._addressing: dict[tuple[str, SIPURI], _Addressing] = {}
        self._counterNames: dict[str, _ChannelCounters] = {}
        self.guard: Guard | None = (
            None if config.access.isOpen else Guard(config.access, clock, self.counters)
        )
        """Applies L{BusConfig.access}; None when it is open (the default)."""

    # -- IDMQBus

    @property
    def localNode(self) -> Node:
        """This node's own entry."""
        return self.nodeList.local

    def registerPeer(self, peer: IDMQPeer) -> None:
        channel = peer.channel
        if channel in self._peers:
            raise ValueError(f"channel {channel!r} already has a peer")
        self._peers[channel] = peer

    def unregisterPeer(self, channel: str) -> None:
        self._peers.pop(channel, None)

    def peers(self) -> list[IDMQPeer]:
        """The registered peers, in registration order."""
        return list(self._peers.values())

    def nodes(self) -> Sequence[Node]:
        return self.nodeList.all()

    def findNode(self, uri: str) -> Node | None:
        try:
            return self.nodeList.find(SIPURI.parse(uri))
        except SIPParseError:
            return None

    def addMembershipObserver(
        self, observer: Callable[[MembershipEvent], None]
    ) -> Callable[[], None]:
        return self.nodeList.addObserver(observer)

    def buildRequest(
        self, channel: str, node: Node, body: bytes, contentType: str, maxForwards: int
    ) -> Request:
        """
        A KDMQ request for C{channel} to C{node} with Kamailio 5.6.3's
        header order (the Via is added by the transaction layer).
        """
        addressing = self._addressing.get((channel, node.uri))
        if addressing is None:
            addressing = self._addressingOf(channel, node)
        return self._buildRequest(addressing, body, contentType, maxForwards)[0]

    def _buildRequest(
        self, addressing: _Addressing, body: bytes, contentType: str, maxForwards: int
    ) -> tuple[Request, str | None]:
        """
        L{buildRequest} once the addressing is known, and the nonce of its
        signature (None when unsigned). With a secret the signature is the
        last header, after Kamailio's; without one, nothing is added.
        """
        callID, tag = self._ids.next()
        userAgent = self.config.userAgent
        if userAgent:
            fields: tuple[tuple[str, str], ...] = (
                ("To", addressing.to),
                ("From", f"{addressing.fromPrefix}{tag}"),
                ("CSeq", "10 KDMQ"),
                ("Call-ID", callID),
                ("Content-Length", str(len(body))),
                ("User-Agent", userAgent),
                ("Max-Forwards", str(maxForwards)),
                ("Content-Type", contentType),
            )
        else:
            fields = (
                ("To", addressing.to),
                ("From", f"{addressing.fromPrefix}{tag}"),
                ("CSeq", "10 KDMQ"),
                ("Call-ID", callID),
                ("Content-Length", str(len(body))),
                ("Max-Forwards", str(maxForwards)),
                ("Content-Type", contentType),
            )
        guard = self.guard
        if guard is None or not guard.signs:
            request = Request(
                method=KDMQ,
                uri=addressing.uri,
                headers=Headers._prebuilt(fields, _REQUEST_INDEXES[bool(userAgent)]),
                body=body,
            )
            return request, None
        auth, nonce = guard.signRequest(
            KDMQ,
            str(addressing.uri),
            callID,
            "10 KDMQ",
            fields[1][1],
            str(maxForwards),
            contentType,
            body,
        )
        request = Request(
            method=KDMQ,
            uri=addressing.uri,
            headers=Headers._prebuilt(
                (*fields, (AUTH_HEADER, auth)), _SIGNED_REQUEST_INDEXES[bool(userAgent)]
            ),
            body=body,
        )
        return request, nonce

    def _addressingOf(self, channel: str, node: Node) -> _Addressing:
        """Build (and remember) the L{_Addressing} of C{channel} at C{node}."""
        uri = node.channelURI(channel)
        addressing = _Addressing(
            uri=uri,
            to=f"<{uri}>",
            fromPrefix=f"<{self.localNode.channelURI(channel)}>;tag=",
            address=node.address,
        )
        if len(self._addressing) >= _ADDRESSING_LIMIT:
            self._addressing.clear()
        self._addressing[channel, node.uri] = addressing
        return addressing

    def _channelCounters(self, channel: str) -> _ChannelCounters:
        names = self._counterNames.get(channel)
        if names is None:
            names = _ChannelCounters(channel)
            if len(self._counterNames) >= _CHANNELS_LIMIT:
                self._counterNames.clear()
            self._counterNames[channel] = names
        return names

    def send(
        self,
        channel: str,
        node: Node,
        body: bytes,
        contentType: str,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[Delivery]:
        addressing = self._addressing.get((channel, node.uri))
        if addressing is None:
            addressing = self._addressingOf(channel, node)
        request, nonce = self._buildRequest(addressing, body, contentType, maxForwards)
        names = self._channelCounters(channel)
        self.counters[names.outRequests] += 1
        d = self.client.request(
            request,
            addressing.address,
            timeout if timeout is not None else self.config.requestTimeout,
        )
        if nonce is not None:
            d = d.addCallback(self._verified, nonce, addressing.address)
        return d.addCallbacks(
            self._delivered,
            self._deliveryFailed,
            callbackArgs=(node, names),
            errbackArgs=(node, names),
        )

    def _verified(self, response: Response, nonce: str, address: Address) -> Response:
        """
        C{response} to our request signed with C{nonce}, if it is signed for
        it (or may be unsigned: see L{AccessPolicy.unsignedFrom}); otherwise
        it counts as no answer at all (408), as if it had been lost.
        """
        assert self.guard is not None
        if not self.guard.responseVerified(response, nonce, address.host):
            raise _UnauthenticatedResponse(response.code)
        return response

    def _delivered(self, response: Response, node: Node, names: _ChannelCounters) -> Delivery:
        self.counters[names.outResponses[response.code]] += 1
        return Delivery(
            node=node,
            code=response.code,
            reason=response.reason,
            body=response.body,
            contentType=response.headers.get("content-type"),
            server=response.headers.get("server"),
        )

    def _deliveryFailed(self, failure: Failure, node: Node, names: _ChannelCounters) -> Failure:
        if failure.check(TooManyTransactions):
            code, reason = 503, "Too many open transactions"
        elif failure.check(_UnauthenticatedResponse):
            code, reason = 408, "Request Timeout (unauthenticated response ignored)"
        else:
            code, reason = 408, "Request Timeout"
        self.counters[names.outFailures[code]] += 1
        return Failure(DeliveryFailed(node, code, reason))

    def broadcast(
        self,
        channel: str,
        body: bytes,
        contentType: str,
        exclude: Node | None = None,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[BroadcastResult]:
        excluded = exclude.key if exclude is not None else None
        targets = [n for n in self.nodeList.active() if n.key != excluded]
        sends = [self.send(channel, n, body, contentType, maxForwards, timeout) for n in targets]
        if not sends:
            return defer.succeed(BroadcastResult())

        def collect(results: list[tuple[bool, Any]]) -> BroadcastResult:
            delivered = []
            failed = []
            for node, (ok, value) in zip(targets, results):
                if ok:
                    delivered.append(value)
                else:
                    failed.append((node, value))
            return BroadcastResult(tuple(delivered), tuple(failed))

        return defer.DeferredList(sends, consumeErrors=True).addCallback(collect)

    # -- ISIPRequestHandler

    def _toTag(self) -> str:
        self._toTagCounter += 1
        return f"{self._toTagPrefix}.{self._toTagCounter & 0xFFFFFFFF:08x}"

    def _respond(
        self,
        request: Request,
        code: int,
        reason: str,
        body: bytes = b"",
        contentType: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
        nonce: str | None = None,
    ) -> Response:
        response = makeResponse(
            request.headers,
            code,
            reason,
            toTag=self._toTag(),
            body=body,
            contentType=contentType,
            extra=extra + self._serverHeader,
        )
        if nonce is not None and self.guard is not None:
            return self.guard.signResponse(response, nonce)
        return response

    def _refuse(self, request: Request, refusal: Refusal) -> Response:
        """The answer to a request the access policy refuses (no peer sees it)."""
        return self._respond(request, refusal.code, refusal.reason)

    def requestReceived(self, request: Request, origin: Origin) -> Response | Deferred[Response]:
        """
        Answer a request: KDMQ goes to the peer of its channel (the
        Request-URI user); OPTIONS gets 200; other methods 405. With an
        access policy (L{BusConfig.access}) the request must first pass it,
        whatever its method: a refused one gets 403 and reaches no peer.
        """
        nonce = None
        guard = self.guard
        if guard is not None:
            admission = guard.admit(request, origin)
            if admission.refusal is not None:
                return self._refuse(request, admission.refusal)
            nonce = admission.nonce
        if request.method != KDMQ:
            if request.method == "OPTIONS":
                return self._respond(request, 200, "OK", nonce=nonce)
            self.counters["in.method_not_allowed"] += 1
            return self._respond(
                request,
                405,
                "Method Not Allowed",
                extra=(("Allow", "KDMQ, OPTIONS"),),
                nonce=nonce,
            )
        channel = request.uri.user
        if not channel:
            self.counters["in.no_channel"] += 1
            return self._respond(request, 400, "Missing Peer ID In Request-URI", nonce=nonce)
        sender = self._sender(request)
        if (
            guard is not None
            and guard.policy.knownNodesOnly
            and channel != self.config.channel
            and (sender is None or sender.status is not NodeStatus.ACTIVE)
        ):
            refusal = guard.refuse(FORBIDDEN_UNKNOWN_NODE, request, origin).refusal
            assert refusal is not None
            return self._refuse(request, refusal)
        peer = self._peers.get(channel)
        if peer is None:
            self.counters["in.unknown_channel"] += 1
            return self._respond(request, 404, "User Not Found", nonce=nonce)
        names = self._channelCounters(channel)
        self.counters[names.inRequests] += 1
        message = DMQMessage(
            channel=channel,
            body=request.body,
            contentType=request.headers.get("content-type"),
            sender=sender,
            maxForwards=request.headers.maxForwards(),
            origin=origin,
            request=request,
        )
        try:
            result = peer.messageReceived(message)
        except Exception:
            return self._peerFailed(Failure(), request, channel, nonce)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                lambda answer: self._answer(answer, request, channel, nonce),
                lambda failure: self._peerFailed(failure, request, channel, nonce),
            )
        return self._answer(result, request, channel, nonce)

    def _sender(self, request: Request) -> Node | None:
        value = request.headers.get("from")
        if value is None:
            return None
        try:
            uri = nameAddrURI(value)
        except SIPParseError:
            return None
        return self.nodeList.find(uri)

    def _answer(
        self, answer: PeerResponse, request: Request, channel: str, nonce: str | None = None
    ) -> Response:
        if not isinstance(answer, PeerResponse):
            return self._peerFailed(
                Failure(TypeError(f"peer answered {answer!r}, not a PeerResponse")),
                request,
                channel,
                nonce,
            )
        code, reason = answer.code, answer.reason
        if (
            code == 200
            and answer.body
            and channel != self.config.channel
            and not _isKnownDMQBus(request.headers)
        ):
            # Kamailio 5.6.3 parses the body of a 200 to a cfg-channel request
            # as a node list and locks up on a line it cannot parse: never send it.
            code, reason = 202, "Accepted"
            self.counters["out.downgraded_200_with_body"] += 1
        self.counters[self._channelCounters(channel).inResponses[code]] += 1
        return self._respond(request, code, reason, answer.body, answer.contentType, nonce=nonce)

    def _peerFailed(
        self, failure: Failure, request: Request, channel: str, nonce: str | None = None
    ) -> Response:
        self.counters[f"in.peer_errors.{channel}"] += 1
        self.log.failure(
            "peer for channel {channel} failed on call_id {call_id}",
            failure,
            channel=channel,
            call_id=request.headers.get("call-id"),
        )
        return self._respond(request, 500, "Server Internal Error", nonce=nonce)
