"""
The SIP transport layer (RFC 3261 §18): a UDP protocol and TCP protocols
that frame and parse SIP messages and hand every one of them to a single
L{ISIPMessageReceiver} (the transaction layer), and the sending side that
routes requests to addresses and responses back along their Via.

Like twisted.names, nothing above this module knows which transport
carried a message: it gets a parsed message and an L{Origin}.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import udp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import (
    ClientFactory,
    DatagramProtocol,
    Protocol,
    ServerFactory,
    connectionDone,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dmq_bus.interfaces import ISIPMessageReceiver, ISIPTransport
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import Headers, Request, canonicalName
from dmq_bus.sip.parser import findHeaderEnd, parseContentLength, parseHead, parseMessage
from dmq_bus.sip.uri import (
    Via,
    findOutsideQuotes,
    splitCommaValues,
    stripBrackets,
    viaSentByFast,
)

if TYPE_CHECKING:
    from dmq_bus.sip.tls import TLSContexts

OnError = Callable[[Failure], None]
"""What L{SIPTransportLayer.send} calls when a message could not be sent."""


# ---------------------------------------------------------------------------
# Limits and errors


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class TransportLimits:
    """
    Every size, count and time limit of the transport layer, each with its
    behaviour at the edge. All must be positive.
    """

    maxDatagramSize: int = attrs.field(default=65535, validator=_positive)
    """
    Largest datagram sent or accepted, in bytes (65535, Kamailio's
    C{BUF_SIZE}: a bigger one cannot arrive anyway). A bigger outgoing
    message is not sent: C{onError} gets L{MessageTooLarge}, counted as
    C{oversize} and C{send_errors}. A bigger incoming datagram (possible
    only when this is set lower) is dropped and counted as C{oversize}.
    """

    maxStreamMessageSize: int = attrs.field(default=1_048_576, validator=_positive)
    """
    Largest message (start line, headers, blank line and body) accepted on
    a TCP connection, in bytes; a message of exactly this size is accepted.
    Known as soon as its headers have arrived: a bigger request is handed
    to the receiver as unparseable with status 413 (Request Entity Too
    Large), then the connection is closed; a bigger response just closes
    it. Counted as C{oversize}.
    """

    maxHeaderBytes: int = attrs.field(default=65536, validator=_positive)
    """
    Bytes within which the header block of a TCP message (up to and
    including its blank line) must end. When that many bytes have arrived
    without the blank line, the connection is closed, counted as
    C{tcp.headers_too_long}.
    """

    tcpIdleTimeout: float = attrs.field(default=300.0, validator=_positive)
    """
    Seconds a TCP connection may go without traffic in either direction;
    it is closed exactly that long after its last traffic, counted as
    C{tcp.idle_closed}.
    """

    maxConnections: int = attrs.field(default=1024, validator=_positive)
    """
    TCP connections open or being opened at once, inbound and outbound
    together. At the limit a new inbound connection is closed at once and
    a send that needs a new connection fails (C{onError} gets
    L{ConnectionLimitReached}); both are counted as
    C{tcp.connections_refused_limit}.
    """

    connectTimeout: float = attrs.field(default=10.0, validator=_positive)
    """
    Seconds an outgoing TCP connection may take to be established, and
    then (for TLS) again for its handshake; after that every message queued
    for it fails (C{onError}), counted as C{tcp.connect_failed} (and
    C{tls.handshake_failed}).
    """

    udpSocketBuffer: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """
    Bytes asked for the UDP socket's kernel receive and send buffers (as
    Kamailio enlarges its own). The kernel's default (~208 KiB) holds only
    ~200 small datagrams, so a burst of requests overflows it and every
    lost datagram costs a 0.5 s retransmission. Past the system maximum
    (C{net.core.rmem_max}) it is forced when running as root, otherwise
    capped; the size obtained is logged and kept in C{udp.receive_buffer}.
    """


DEFAULT_LIMITS = TransportLimits()
"""The limits used when none are given."""


class TransportError(Exception):
    """A message could not be sent; the text says why."""


class MessageTooLarge(TransportError):
    """The message is bigger than the transport's limit."""


class ConnectionLimitReached(TransportError):
    """A new connection was needed but L{TransportLimits.maxConnections} are open."""


class UnsupportedTransport(TransportError, NotImplementedError):
    """The destination's transport cannot be used (TLS without TLS settings)."""


class TransportNotReady(TransportError):
    """The socket is not listening yet, or the layer has been stopped."""


class TLSRefused(TransportError):
    """
    The TLS peer closed the connection with an alert after our side of the
    handshake had completed, before answering anything: with TLS 1.3 that
    is how a server refuses our client certificate. Nothing written on the
    connection was processed.
    """


# ---------------------------------------------------------------------------
# Pure helpers


def _failure(error: BaseException | None = None) -> Failure:
    """A L{Failure} of C{error}, or of the exception being handled."""
    return Failure(error)  # type: ignore[no-untyped-call]


def responseDestination(via: str) -> Address:
    """
    Where a response to a request whose top Via value is C{via} goes when
    there is no open connection to send it on (RFC 3261 §18.2.2 with RFC
    3581): the host of the C{received} parameter, else the sent-by host;
    the port of an C{rport} parameter that has a value, else the sent-by
    port, else 5060; the Via's transport.

    @raise SIPParseError: C{via} is not a Via value.
    """
    if "," in via:
        via = splitCommaValues(via)[0]
    sentBy = viaSentByFast(via)
    if sentBy is not None:
        transport, host, sentPort = sentBy
        return Address(
            transport.lower(), stripBrackets(host), 5060 if sentPort is None else sentPort
        )
    parsed = Via.parse(via)
    received = parsed.param("received")
    host = stripBrackets(received if received else parsed.host)
    rport = parsed.param("rport")
    port: int
    if (
        rport
        and rport.isdigit()
        and rport.isascii()
        and len(rport) <= 5
        and 0 < int(rport) <= 65535
    ):
        port = int(rport)
    elif parsed.port is not None:
        port = parsed.port
    else:
        port = 5060
    return Address(parsed.transport.lower(), host, port)


_SENT_BY_ENDS = ("", ":", ";", ",", " ", "\t")


def receivedHeaders(headers: Headers, host: str, port: int) -> Headers | None:
    """
    The headers of a request that arrived from C{host}:C{port}, with the
    top Via completed per RFC 3261 §18.2.1 and RFC 3581: C{received=host}
    when the sent-by host is not C{host} (or an empty C{rport} is there),
    and an empty C{rport} given the value C{port}. None when nothing needs
    to change, which is the common case and costs no parsing.
    """
    index = -1
    raw = ""
    fields = headers.fields
    for i, (name, text) in enumerate(fields):
        if name == "Via" or canonicalName(name) == "via":
            index, raw = i, text
            break
    if index < 0:
        return None
    # Fast path: "SIP/2.0/UDP <host>..." with the source host and no rport.
    space = raw.find(" ")
    if (
        space > 0
        and raw.startswith(host, space + 1)
        and raw[space + 1 + len(host) : space + 2 + len(host)] in _SENT_BY_ENDS
        and "rport" not in raw.lower()
    ):
        return None

    firstEnd = _firstItemEnd(raw)
    try:
        via = Via.parse(raw[:firstEnd])
    except SIPParseError:
        return None  # the transaction layer rejects it
    params = list(via.params)
    emptyRport = False
    for i, (key, rport) in enumerate(params):
        if key.lower() == "rport":
            if not rport:
                params[i] = (key, str(port))
                emptyRport = True
            break
    if emptyRport or stripBrackets(via.host).lower() != host.lower():
        for i, (key, _) in enumerate(params):
            if key.lower() == "received":
                params[i] = (key, host)
                break
        else:
            params.append(("received", host))
    else:
        return None
    newRaw = str(attrs.evolve(via, params=tuple(params))) + raw[firstEnd:]
    return Headers((*fields[:index], (fields[index][0], newRaw), *fields[index + 1 :]))


def _firstItemEnd(raw: str) -> int:
    """Index of the first comma outside quotes in C{raw}, or its length."""
    comma = findOutsideQuotes(raw, ",")
    return len(raw) if comma < 0 else comma


_CONTENT_LENGTH_NAMES = (b"\ncontent-length", b"\nl")


def _scanContentLength(buffer: bytearray, end: int) -> int | None:
    """
    The Content-Length of the header block C{buffer[:end]} found without
    parsing the headers, or None when it is absent, malformed or written in
    a way only the real parser settles (folded, oddly spaced); then the
    caller parses. Never disagrees with L{parseMessage} when it answers.
    """
    head = buffer[:end].lower()
    best = -1
    valueStart = -1
    for name in _CONTENT_LENGTH_NAMES:
        at = head.find(name)
        if at < 0:
            continue
        colon = at + len(name)
        while colon < end and head[colon] in b" \t":
            colon += 1
        if colon >= end or head[colon] != 0x3A:  # ':'
            if name == b"\nl":
                # "\nl" also starts other names (Location...); look for a
                # real compact field only the parser can tell apart
                if head.find(b"\nl:") >= 0 or head.find(b"\nl ") >= 0 or head.find(b"\nl\t") >= 0:
                    return None
                continue
            return None
        if best < 0 or at < best:
            best, valueStart = at, colon + 1
    if best < 0:
        return None
    lineEnd = head.find(b"\n", valueStart)
    if lineEnd < 0:
        lineEnd = end
    elif lineEnd + 1 < end and head[lineEnd + 1] in b" \t":
        return None  # folded value
    value = bytes(head[valueStart:lineEnd]).strip()
    if not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def _contentLengthOfHead(head: bytes, end: int) -> int:
    """
    The Content-Length of the header block C{head[:end]} by a full parse
    (C{head} runs to the start of the body).

    @raise SIPParseError: the header block does not parse, or has no valid
        Content-Length (with the headers of a request set, to answer it).
    """
    _, headers = parseHead(head[:end])
    try:
        length = parseContentLength(headers.get("content-length"))
    except ValueError:
        length = None
    if length is None:
        parseMessage(head, stream=True)  # raises the error that answers it
        raise SIPParseError("missing Content-Length on a stream", 0)
    return length


# ---------------------------------------------------------------------------
# The layer


@attrs.define
class _Connecting:
    """An outgoing connection being established and what waits for it."""

    factory: _OutboundFactory
    queue: list[tuple[bytes, OnError | None]]
    connector: IConnector | None = None


@implementer(ISIPTransport)
class SIPTransportLayer:
    """
    The transport layer of one node: one UDP socket (through
    L{datagramProtocol}), TCP connections in and out, every received
    message handed to C{receiver}, and L{ISIPTransport} for sending.

    @ivar receiver: who gets the parsed messages; may be set after
        construction. Messages arriving while it is None are dropped and
        counted as C{dropped_no_receiver}.
    @ivar counters: event counts by name: C{udp.received}, C{udp.sent},
        C{udp.parse_errors}, C{udp.unparseable_requests}, C{tcp.received},
        C{tcp.sent}, C{tcp.parse_errors}, C{tcp.unparseable_requests},
        C{tcp.headers_too_long}, C{tcp.connections_opened},
        C{tcp.connections_closed}, C{tcp.connections_refused_limit},
        C{tcp.connect_failed}, C{tcp.idle_closed}, C{keepalives} (CRLF
        keep-alives in and pings answered), C{oversize}, C{send_errors}
        (every message that could not be sent, whatever the reason),
        C{receiver_errors}, C{dropped_no_receiver}; C{tls.handshake_failed}
        (an outgoing TLS connection whose handshake failed: its queued
        messages fail; TLS connections otherwise count as C{tcp.*}),
        C{tls.refused_by_peer} (an outgoing TLS connection closed by a TLS
        alert after the handshake, before the peer answered anything: the
        messages written on it fail with L{TLSRefused}) and
        C{tls.inbound_failed} (an incoming TLS connection ended by a TLS
        error: a handshake we refused, or an alert from the client);
        C{udp.send_buffer_full}
        (a datagram not sent because the socket's send buffer was full, also
        a send error) and C{udp.send_refused} (the kernel reported an
        earlier datagram refused; the datagram counts as sent, as Twisted
        treats it).
    """

    log = Logger()

    def __init__(
        self,
        receiver: ISIPMessageReceiver | None,
        clock: IReactorTime,
        tcpReactor: IReactorTCP | None = None,
        limits: TransportLimits = DEFAULT_LIMITS,
        tls: TLSContexts | None = None,
    ) -> None:
        self.receiver = receiver
        self.tls = tls
        self.clock = clock
        self.tcpReactor = tcpReactor
        self.limits = limits
        self.counters: Counter[str] = Counter()
        self._udp = SIPDatagramProtocol(self)
        self._streamFactory = _InboundFactory(self, "tcp")
        self._udpOrigins: dict[Any, Origin] = {}
        self._streams: set[SIPStreamProtocol] = set()
        self._byAddress: dict[Address, SIPStreamProtocol] = {}
        self._connecting: dict[Address, _Connecting] = {}
        self._stopped = False
        self._stopWaiters: list[Deferred[None]] = []
        self._refusingLogged = False
        self._tlsFailuresLogged: set[str] = set()

    # -- what the service wires up

    def datagramProtocol(self) -> SIPDatagramProtocol:
        """
        The protocol to pass to L{listenUDP} (or C{reactor.listenUDP});
        UDP requests and responses are sent from that same socket.
        """
        return self._udp

    def streamFactory(self) -> ServerFactory[SIPStreamProtocol]:
        """The factory to pass to C{reactor.listenTCP}."""
        return self._streamFactory

    def tlsStreamFactory(self) -> IProtocolFactory:
        """
        The factory to pass to C{reactor.listenTCP} to accept TLS
        connections (peers must present a certificate the CA bundle
        verifies).

        @raise UnsupportedTransport: the layer has no TLS settings.
        """
        if self.tls is None:
            raise UnsupportedTransport("TLS not configured (no certificate, key and CA)")
        return self.tls.serverFactory(_InboundFactory(self, "tls"))

    def stop(self) -> Deferred[None]:
        """
        Close every TCP connection and abandon those being opened (their
        queued messages fail); refuse new ones. Fires once all are closed.
        The UDP socket belongs to whoever listened with it.
        """
        self._stopped = True
        for address, pending in list(self._connecting.items()):
            del self._connecting[address]
            pending.factory.abandoned = True
            if pending.connector is not None:
                try:
                    pending.connector.stopConnecting()
                except Exception:
                    pass  # already connected or failed: the factory ignores it
            for _, onError in pending.queue:
                self._sendFailed(onError, TransportNotReady("transport layer stopped"), address)
        for stream in list(self._streams):
            stream.close()
        if not self._streams:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopWaiters.append(waiter)
        return waiter

    # -- ISIPTransport

    def send(self, data: bytes, destination: Address, onError: OnError | None = None) -> None:
        """
        Send one serialized message to C{destination}: a datagram from our
        UDP socket, or over the one TCP connection kept per destination
        (opened on first use; messages wait while it connects, and for TLS
        until the handshake has verified the peer). C{onError}
        is called at most once, at once or later, when it could not be
        sent; without one the failure is logged. Never raises.
        """
        transport = destination.transport
        if transport == "udp":
            self._sendDatagram(data, destination, onError)
        elif transport == "tcp":
            self._sendStream(data, destination, onError)
        elif transport == "tls":
            if self.tls is None:
                self._sendFailed(
                    onError,
                    UnsupportedTransport("TLS not configured (no certificate, key and CA)"),
                    destination,
                )
            else:
                self._sendStream(data, destination, onError)
        else:
            self._sendFailed(
                onError,
                UnsupportedTransport(f"transport {transport!r} not supported"),
                destination,
            )

    def reply(self, data: bytes, origin: Origin, via: str) -> None:
        """
        Send a serialized response to a request from C{origin} whose top
        Via value is C{via}: on the connection it came on while that is
        open, else to L{responseDestination}C{(via)} (opening or reusing a
        connection for TCP). Failures are logged and counted. Never raises.
        """
        connection = origin.connection
        if isinstance(connection, SIPStreamProtocol) and connection.isOpen:
            connection.sendBytes(data)
            self.counters["tcp.sent"] += 1
            return
        try:
            destination = responseDestination(via)
        except SIPParseError as e:
            self.counters["send_errors"] += 1
            self.log.warn(
                "Cannot route a response to {source}: bad Via {via!r}: {reason}",
                source=str(origin.address),
                via=via,
                reason=e.reason,
            )
            return
        self.send(data, destination)

    # -- sending

    def _sendDatagram(self, data: bytes, destination: Address, onError: OnError | None) -> None:
        if len(data) > self.limits.maxDatagramSize:
            self.counters["oversize"] += 1
            self._sendFailed(
                onError,
                MessageTooLarge(
                    f"{len(data)} bytes exceed the datagram limit of {self.limits.maxDatagramSize}"
                ),
                destination,
            )
            return
        udpProtocol = self._udp
        transport = udpProtocol.transport
        if transport is None:
            self._sendFailed(onError, TransportNotReady("UDP socket not listening"), destination)
            return
        host = destination.host
        sendto = udpProtocol.sendto
        if sendto is not None and host in udpProtocol.checkedHosts:
            self._sendto(sendto, data, (host, destination.port), destination, onError)
            return
        try:
            transport.write(data, (host, destination.port))
        except BlockingIOError:
            self.counters["udp.send_buffer_full"] += 1
            self._sendFailed(onError, _failure(), destination)
            return
        except Exception:
            self._sendFailed(onError, _failure(), destination)
            return
        if sendto is not None:
            udpProtocol.hostChecked(host)
        self.counters["udp.sent"] += 1

    def _sendto(
        self,
        sendto: Callable[[bytes, tuple[str, int]], int],
        data: bytes,
        addr: tuple[str, int],
        destination: Address,
        onError: OnError | None,
    ) -> None:
        """
        Send a datagram straight through the socket (what C{udp.Port.write}
        does once the address is known to suit the socket, without checking
        the address again), with Twisted's error handling: retried on
        EINTR, L{MessageLengthError} on EMSGSIZE, ECONNREFUSED ignored.
        """
        while True:
            try:
                sendto(data, addr)
            except InterruptedError:
                continue
            except BlockingIOError:
                self.counters["udp.send_buffer_full"] += 1
                self._sendFailed(onError, _failure(), destination)
                return
            except ConnectionRefusedError:
                self.counters["udp.send_refused"] += 1
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    self._sendFailed(onError, MessageLengthError("message too long"), destination)
                else:
                    self._sendFailed(onError, _failure(), destination)
                return
            self.counters["udp.sent"] += 1
            return

    def _sendStream(self, data: bytes, destination: Address, onError: OnError | None) -> None:
        stream = self._byAddress.get(destination)
        if stream is not None:
            stream.sendBytes(data)
            self.counters["tcp.sent"] += 1
            if onError is not None:
                stream.watchSent(onError)
            return
        pending = self._connecting.get(destination)
        if pending is not None:
            pending.queue.append((data, onError))
            return
        if self._stopped:
            self._sendFailed(onError, TransportNotReady("transport layer stopped"), destination)
            return
        if self.tcpReactor is None:
            self._sendFailed(
                onError,
                TransportNotReady("no TCP reactor: cannot open TCP connections"),
                destination,
            )
            return
        if self._connectionCount() >= self.limits.maxConnections:
            self.counters["tcp.connections_refused_limit"] += 1
            self._sendFailed(
                onError,
                ConnectionLimitReached(
                    f"{self.limits.maxConnections} TCP connections open: "
                    f"cannot connect to {destination}"
                ),
                destination,
            )
            return
        factory = _OutboundFactory(self, destination)
        pending = _Connecting(factory, [(data, onError)])
        self._connecting[destination] = pending
        try:
            wire: Any = factory
            if destination.transport == "tls" and self.tls is not None:
                wire = self.tls.clientFactory(destination, factory)
            pending.connector = self.tcpReactor.connectTCP(
                destination.host, destination.port, wire, timeout=self.limits.connectTimeout
            )
        except Exception:
            self._connectFailed(destination, factory, _failure())

    def _sendFailed(
        self, onError: OnError | None, reason: Failure | Exception, destination: Address
    ) -> None:
        """Count a message that could not be sent and tell its sender."""
        self.counters["send_errors"] += 1
        failure = reason if isinstance(reason, Failure) else _failure(reason)
        if onError is None:
            self.log.warn(
                "Could not send to {destination}: {error}",
                destination=str(destination),
                error=failure.getErrorMessage(),
            )
            return
        try:
            onError(failure)
        except Exception:
            self.log.failure(
                "Send error callback for {destination} raised", destination=str(destination)
            )

    def _connectFailed(self, address: Address, factory: _OutboundFactory, reason: Failure) -> None:
        pending = self._connecting.get(address)
        if pending is None or pending.factory is not factory:
            return
        del self._connecting[address]
        self.counters["tcp.connect_failed"] += 1
        for _, onError in pending.queue:
            self._sendFailed(onError, reason, address)

    def _handshakeFailed(self, stream: SIPTLSStreamProtocol, reason: Failure) -> None:
        """An outgoing TLS connection closed before its handshake completed."""
        self.counters["tls.handshake_failed"] += 1
        error = None if self.tls is None else self.tls.errorText(reason)
        self.log.warn(
            "TLS handshake with {destination} failed: {error}",
            destination=str(stream.address),
            error=error or reason.getErrorMessage(),
        )
        if isinstance(stream.factory, _OutboundFactory):
            self._connectFailed(stream.address, stream.factory, reason)

    def _refusedAfterHandshake(
        self, stream: SIPTLSStreamProtocol, reason: Failure, unanswered: list[OnError]
    ) -> None:
        """
        An outgoing TLS connection on which C{unanswered} messages were
        written was lost before the peer sent anything: if a TLS alert
        ended it, the peer refused us and those messages fail at once.
        """
        alert = None if self.tls is None else self.tls.errorText(reason)
        if alert is None:
            return
        self.counters["tls.refused_by_peer"] += 1
        self.log.warn(
            "TLS peer {destination} refused the connection after the handshake: {error}",
            destination=str(stream.address),
            error=alert,
        )
        error = TLSRefused(
            f"{stream.address} refused the TLS connection after the handshake ({alert}); "
            "does it trust our certificate?"
        )
        for onError in unanswered:
            self._sendFailed(onError, error, stream.address)

    def _inboundLost(self, stream: SIPTLSStreamProtocol, reason: Failure) -> None:
        """
        Count an incoming TLS connection that a TLS error ended (most often
        a client certificate our CA bundle does not verify); the first
        from each host is logged.
        """
        error = None if self.tls is None else self.tls.errorText(reason)
        if error is None:
            return
        self.counters["tls.inbound_failed"] += 1
        host = stream.address.host
        if host in self._tlsFailuresLogged:
            return
        if len(self._tlsFailuresLogged) >= 256:
            self._tlsFailuresLogged.clear()
        self._tlsFailuresLogged.add(host)
        self.log.warn(
            "TLS connection from {source} failed: {error} (further failures from this "
            "host are only counted, as tls.inbound_failed)",
            source=str(stream.address),
            error=error,
        )

    def _connectionCount(self) -> int:
        return len(self._streams) + len(self._connecting)

    # -- connections

    def _acceptConnection(
        self, addr: IAddress | None, transport: str = "tcp"
    ) -> SIPStreamProtocol | None:
        """
        The protocol for a new inbound C{transport} (C{"tcp"} or C{"tls"})
        connection, or None to close it.
        """
        if isinstance(addr, (IPv4Address, IPv6Address)):
            address = Address(transport, addr.host, addr.port)
        else:
            address = Address(transport, str(addr), 0)
        if self._stopped:
            return None
        if self._connectionCount() >= self.limits.maxConnections:
            self.counters["tcp.connections_refused_limit"] += 1
            if not self._refusingLogged:
                self._refusingLogged = True
                self.log.warn(
                    "Refusing TCP connections (first: {source}): {limit} are open",
                    source=str(address),
                    limit=self.limits.maxConnections,
                )
            return None
        self._refusingLogged = False
        if transport == "tls":
            return SIPTLSStreamProtocol(self, address, outbound=False)
        return SIPStreamProtocol(self, address, outbound=False)

    def _streamOpened(self, stream: SIPStreamProtocol) -> None:
        self._streams.add(stream)
        self.counters["tcp.connections_opened"] += 1
        address = stream.address
        if not stream.outbound:
            self._byAddress.setdefault(address, stream)
            return
        self._byAddress[address] = stream
        pending = self._connecting.pop(address, None)
        if pending is not None and pending.queue:
            stream.sendMany([data for data, _ in pending.queue])
            self.counters["tcp.sent"] += len(pending.queue)
            for _, onError in pending.queue:
                if onError is not None:
                    stream.watchSent(onError)

    def _streamClosing(self, stream: SIPStreamProtocol) -> None:
        if self._byAddress.get(stream.address) is stream:
            del self._byAddress[stream.address]

    def _streamLost(self, stream: SIPStreamProtocol) -> None:
        self._streamClosing(stream)
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        self.counters["tcp.connections_closed"] += 1
        if self._stopped and not self._streams:
            waiters, self._stopWaiters = self._stopWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- receiving

    def _udpOrigin(self, addr: Any) -> Origin:
        origin = self._udpOrigins.get(addr)
        if origin is None:
            if len(self._udpOrigins) >= 4096:
                self._udpOrigins.clear()
            origin = Origin(Address("udp", addr[0], addr[1]))
            self._udpOrigins[addr] = origin
        return origin

    def _messageArrived(self, data: bytes, origin: Origin, stream: bool) -> bool:
        """
        Parse one whole message and hand it to the receiver. False when the
        bytes are no SIP message that can be answered (the caller closes a
        stream then).
        """
        try:
            message = parseMessage(data, stream=stream)
        except SIPParseError as error:
            if error.headers is not None:
                self.counters[
                    "tcp.unparseable_requests" if stream else "udp.unparseable_requests"
                ] += 1
                self._unparseable(error, origin)
                return True
            self._dropped(error, origin, stream)
            return False
        except Exception:
            self.counters["tcp.parse_errors" if stream else "udp.parse_errors"] += 1
            self.log.failure(
                "The parser failed on a message from {source}", source=str(origin.address)
            )
            return False
        if type(message) is Request:
            address = origin.address
            headers = receivedHeaders(message.headers, address.host, address.port)
            if headers is not None:
                message = message.withHeaders(headers)
        receiver = self.receiver
        if receiver is None:
            self.counters["dropped_no_receiver"] += 1
            return True
        try:
            receiver.messageReceived(message, origin)
        except Exception:
            self.counters["receiver_errors"] += 1
            self.log.failure(
                "The receiver raised on a message from {source}", source=str(origin.address)
            )
        return True

    def _unparseable(self, error: SIPParseError, origin: Origin) -> None:
        """Hand a request that cannot be accepted to the receiver to answer."""
        if error.headers is not None:
            address = origin.address
            headers = receivedHeaders(error.headers, address.host, address.port)
            if headers is not None:
                error.headers = headers
        receiver = self.receiver
        if receiver is None:
            self.counters["dropped_no_receiver"] += 1
            return
        try:
            receiver.unparseableRequest(error, origin)
        except Exception:
            self.counters["receiver_errors"] += 1
            self.log.failure(
                "The receiver raised on an unparseable request from {source}",
                source=str(origin.address),
            )

    def _dropped(self, error: SIPParseError, origin: Origin, stream: bool) -> None:
        """Count and log bytes that are no answerable SIP message."""
        self.counters["tcp.parse_errors" if stream else "udp.parse_errors"] += 1
        self.log.warn(
            "Dropped unparseable bytes from {source}: {reason} (at byte {offset})",
            source=str(origin.address),
            reason=error.reason,
            offset=error.offset,
        )


# ---------------------------------------------------------------------------
# UDP


class SIPDatagramProtocol(DatagramProtocol):
    """
    The UDP socket of a L{SIPTransportLayer}: every datagram is one message
    (or a CRLF keep-alive, ignored). Never raises into the reactor.
    """

    noisy = False

    CHECKED_HOSTS_LIMIT = 4096
    """Most destination hosts remembered in L{checkedHosts}."""

    def __init__(self, layer: SIPTransportLayer) -> None:
        self._layer = layer
        self.sendto: Callable[[bytes, tuple[str, int]], int] | None = None
        """
        The C{sendto} of the socket when the transport is a real unconnected
        C{udp.Port}, to send without its per-datagram address checks; None
        otherwise (every datagram then goes through C{transport.write}).
        """
        self.checkedHosts: set[str] = set()
        """
        Destination hosts C{transport.write} accepted once (IP literals of
        the socket's family): datagrams to them go straight to L{sendto}.
        """

    def hostChecked(self, host: str) -> None:
        """Remember that C{transport.write} accepted C{host}."""
        checked = self.checkedHosts
        if len(checked) >= self.CHECKED_HOSTS_LIMIT:
            checked.clear()
        checked.add(host)

    def startProtocol(self) -> None:
        """
        Enlarge the socket's buffers (L{TransportLimits.udpSocketBuffer})
        and find its C{sendto} (see L{sendto}).
        """
        transport = self.transport
        self.checkedHosts = set()
        self.sendto = None
        # a connected port (never ours) checks each address against its peer
        if isinstance(transport, udp.Port) and not transport._connectedAddr:
            self.sendto = transport.socket.sendto
        sock = getattr(transport, "socket", None)
        if sock is None:
            return
        layer = self._layer
        wanted = layer.limits.udpSocketBuffer
        for option, forced in (
            (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
            (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None)),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, wanted)
                # Linux reports twice what was set; compare with that in mind
                if forced is not None and sock.getsockopt(socket.SOL_SOCKET, option) < wanted:
                    sock.setsockopt(socket.SOL_SOCKET, forced, wanted)
            except OSError:
                pass
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        layer.counters["udp.receive_buffer"] = got
        layer.log.debug("UDP receive buffer: {size} bytes", size=got)

    def stopProtocol(self) -> None:
        """The socket is closed: send nothing more through it."""
        self.sendto = None
        self.checkedHosts = set()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Parse one datagram from C{addr} and hand it to the receiver."""
        layer = self._layer
        if not datagram or datagram[0] in (13, 10):
            if not datagram.strip(b"\r\n"):
                layer.counters["keepalives"] += 1
                return
        try:
            if len(datagram) > layer.limits.maxDatagramSize:
                layer.counters["oversize"] += 1
                layer.log.warn(
                    "Dropped a datagram of {size} bytes from {source}: over {limit}",
                    size=len(datagram),
                    source=str(layer._udpOrigin(addr).address),
                    limit=layer.limits.maxDatagramSize,
                )
                return
            layer.counters["udp.received"] += 1
            layer._messageArrived(datagram, layer._udpOrigin(addr), False)
        except Exception:
            layer.counters["udp.parse_errors"] += 1
            layer.log.failure("Failed on a datagram from {source}", source=repr(addr))


class ReusedBufferUDPPort(udp.Port):
    """
    Twisted's UDP port, reading every datagram into one buffer of its own
    (C{recvfrom_into}) instead of a new C{maxPacketSize} bytes object per
    datagram (C{recvfrom}). C{recvfrom(65535)} mallocs 64 KiB and shrinks
    the block to the datagram; under a flood the leftovers, between
    longer-lived blocks, fragment glibc's heap: after 10^6 fuzz inputs
    (bench/fuzz_node.py) it held 89.8 MiB, 71 MiB of it free, against
    41.1 MiB (22.6 free) with this port. The datagram handed to the
    protocol is a copy of its bytes only (C{bytes}, never the buffer).

    Everything else is C{udp.Port}'s, and L{doRead} is its C{doRead}
    (Twisted 26.10) step for step: the same buffer size (C{maxPacketSize}:
    a longer datagram is cut there by the kernel, as before), the same
    bound on the bytes read per call (C{maxThroughput}), the same errors
    handled alike. Only the log of a protocol's exception differs in form:
    through C{twisted.logger} (a failure event) rather than C{log.err}.
    """

    _log = Logger()

    def __init__(
        self,
        port: int,
        proto: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: Any = None,
    ) -> None:
        super().__init__(port, proto, interface, maxPacketSize, reactor)  # type: ignore[no-untyped-call]
        self._readBuffer = bytearray(maxPacketSize)
        self._readView = memoryview(self._readBuffer)

    def doRead(self) -> None:
        """
        Called when the socket is ready for reading: hand each waiting
        datagram to the protocol until C{maxThroughput} bytes were read or
        none is left. EAGAIN, EWOULDBLOCK and EINTR end the call; so does
        ECONNREFUSED (an earlier datagram was refused), which a connected
        port also reports to C{protocol.connectionRefused}; any other
        socket error is raised to the reactor (which logs it and closes
        the port). An exception from C{datagramReceived} is logged and the
        next datagram read.
        """
        buffer = self._readBuffer
        if len(buffer) != self.maxPacketSize:  # changed since: udp.Port reads with the new size
            buffer = self._readBuffer = bytearray(self.maxPacketSize)
            self._readView = memoryview(buffer)
        view = self._readView
        read = 0
        while read < self.maxThroughput:
            try:
                size, addr = self.socket.recvfrom_into(buffer, self.maxPacketSize)
            except OSError as se:
                no = se.args[0]
                if no in udp._sockErrReadIgnore:
                    return
                if no in udp._sockErrReadRefuse:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            else:
                read += size
                if self.addressFamily == socket.AF_INET6:
                    # (host, port) without the flow and scope IDs, as udp.Port
                    addr = addr[:2]
                try:
                    self.protocol.datagramReceived(view[:size].tobytes(), addr)
                except BaseException:
                    self._log.failure(
                        "Unhandled error in {protocol}.datagramReceived",
                        protocol=self._getLogPrefix(self.protocol),
                    )


def listenUDP(
    reactor: IReactorUDP,
    port: int,
    protocol: DatagramProtocol,
    interface: str = "",
    maxPacketSize: int = 8192,
) -> IListeningPort:
    """
    Listen on UDP as C{reactor.listenUDP} does, through a
    L{ReusedBufferUDPPort} when C{reactor.listenUDP} is the posix
    reactors' own (epoll, poll, select, asyncio: it makes a C{udp.Port});
    any other reactor (a wrapper, an in-memory one, IOCP) listens its own
    way.
    """
    method = getattr(reactor.listenUDP, "__func__", None)
    if isinstance(reactor, PosixReactorBase) and method is PosixReactorBase.listenUDP:
        listening = ReusedBufferUDPPort(port, protocol, interface, maxPacketSize, reactor)
        listening.startListening()  # type: ignore[no-untyped-call]
        return listening
    return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)


# ---------------------------------------------------------------------------
# TCP


class SIPStreamProtocol(Protocol):
    """
    One TCP connection of a L{SIPTransportLayer}, inbound or outbound:
    frames messages by their mandatory Content-Length, skips CRLF
    keep-alives between them (answering a double-CRLF ping with a CRLF
    pong, RFC 5626 §3.5.1) and closes itself after
    L{TransportLimits.tcpIdleTimeout} without traffic.

    @ivar address: the remote address (the destination for outbound ones).
    @ivar origin: the L{Origin} of every message received on it.
    """

    def __init__(self, layer: SIPTransportLayer, address: Address, outbound: bool) -> None:
        self._layer = layer
        self.address = address
        self.outbound = outbound
        self.origin = Origin(address, connection=self)
        self._buffer = bytearray()
        self._searchFrom = 0
        self._messageEnd = -1
        self._open = False
        self._lastTraffic = 0.0
        self._idleTimer: IDelayedCall | None = None

    @property
    def isOpen(self) -> bool:
        """Whether messages can still be written on this connection."""
        return self._open

    def connectionMade(self) -> None:
        """Register with the layer and start the idle timer."""
        self._open = True
        clock = self._layer.clock
        self._lastTraffic = clock.seconds()
        self._idleTimer = clock.callLater(self._layer.limits.tcpIdleTimeout, self._idleCheck)
        self._layer._streamOpened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Unregister from the layer."""
        self._open = False
        self._cancelIdleTimer()
        self._buffer.clear()
        self._layer._streamLost(self)

    def close(self) -> None:
        """Stop using this connection and close it once written data is flushed."""
        if not self._open:
            return
        self._open = False
        self._cancelIdleTimer()
        self._buffer.clear()
        self._layer._streamClosing(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def sendBytes(self, data: bytes) -> None:
        """Write C{data} on the connection."""
        if self.transport is not None:
            self.transport.write(data)
        self._lastTraffic = self._layer.clock.seconds()

    def sendMany(self, chunks: list[bytes]) -> None:
        """Write several messages on the connection at once."""
        if self.transport is not None:
            self.transport.writeSequence(chunks)
        self._lastTraffic = self._layer.clock.seconds()

    def watchSent(self, onError: OnError) -> None:
        """
        A message whose sender waits on C{onError} was just written here.
        Over TCP a written message counts as sent: nothing is kept.
        """

    def dataReceived(self, data: bytes) -> None:
        """Buffer C{data} and hand every whole message in it to the receiver."""
        if not self._open:
            return
        self._lastTraffic = self._layer.clock.seconds()
        self._buffer += data
        try:
            self._frame()
        except Exception:
            self._layer.counters["tcp.parse_errors"] += 1
            self._layer.log.failure(
                "Failed on data from {source}; closing", source=str(self.address)
            )
            self.close()

    def _frame(self) -> None:
        """Take whole messages and keep-alives off the front of the buffer."""
        buf = self._buffer
        layer = self._layer
        limits = layer.limits
        whole = b""  # the buffer as bytes, when a header search copied all of it
        while self._open and buf:
            if self._messageEnd < 0:
                if buf[0] == 13 or buf[0] == 10:
                    if not self._keepalive():
                        return
                    continue
                searchFrom = self._searchFrom
                if searchFrom == 0:
                    whole = bytes(buf)
                    end, bodyStart = findHeaderEnd(whole)
                else:
                    end, bodyStart = findHeaderEnd(bytes(buf[searchFrom:]))
                if end < 0:
                    if len(buf) >= limits.maxHeaderBytes:
                        self._headersTooLong()
                    else:
                        self._searchFrom = max(0, len(buf) - 3)
                    return
                end += searchFrom
                bodyStart += searchFrom
                if bodyStart > limits.maxHeaderBytes:
                    self._headersTooLong()
                    return
                length = _scanContentLength(buf, end)
                if length is None:
                    try:
                        length = _contentLengthOfHead(bytes(buf[:bodyStart]), end)
                    except SIPParseError as error:
                        # no usable Content-Length: the framing is lost
                        if error.headers is not None:
                            layer.counters["tcp.unparseable_requests"] += 1
                            layer._unparseable(error, self.origin)
                        else:
                            layer._dropped(error, self.origin, True)
                        self.close()
                        return
                messageEnd = bodyStart + length
                if messageEnd > limits.maxStreamMessageSize:
                    self._tooLarge(end, messageEnd)
                    return
                self._messageEnd = messageEnd
            messageEnd = self._messageEnd
            if len(buf) < messageEnd:
                return
            if len(buf) == messageEnd:
                # the usual case: the chunk held exactly one message
                message = whole if len(whole) == messageEnd else bytes(buf)
                buf.clear()
            else:
                message = bytes(buf[:messageEnd])
                del buf[:messageEnd]
            whole = b""
            self._messageEnd = -1
            self._searchFrom = 0
            layer.counters["tcp.received"] += 1
            if not layer._messageArrived(message, self.origin, True):
                self.close()

    def _keepalive(self) -> bool:
        """
        Skip the CR/LF keep-alive at the front of the buffer, answering a
        ping. False when it may be the start of a ping still arriving.
        """
        buf = self._buffer
        if buf.startswith(b"\r\n\r\n"):
            del buf[:4]
            self._layer.counters["keepalives"] += 1
            self.sendBytes(b"\r\n")
            return True
        if len(buf) < 4 and b"\r\n\r\n".startswith(buf):
            return False
        if buf.startswith(b"\r\n"):
            del buf[:2]
            self._layer.counters["keepalives"] += 1
        else:
            del buf[:1]
        return True

    def _headersTooLong(self) -> None:
        layer = self._layer
        layer.counters["tcp.headers_too_long"] += 1
        layer.log.warn(
            "Closing the connection from {source}: no end of headers within {limit} bytes",
            source=str(self.address),
            limit=layer.limits.maxHeaderBytes,
        )
        self.close()

    def _tooLarge(self, end: int, size: int) -> None:
        layer = self._layer
        layer.counters["oversize"] += 1
        limit = layer.limits.maxStreamMessageSize
        head = bytes(self._buffer[:end])
        if not head.startswith(b"SIP/"):
            try:
                _, headers = parseHead(head)
            except SIPParseError:
                pass
            else:
                layer._unparseable(
                    SIPParseError(
                        f"message of {size} bytes exceeds the limit of {limit}", 0, headers, 413
                    ),
                    self.origin,
                )
        layer.log.warn(
            "Closing the connection from {source}: a message of {size} bytes exceeds {limit}",
            source=str(self.address),
            size=size,
            limit=limit,
        )
        self.close()

    def _idleCheck(self) -> None:
        """Close the connection if it has been idle long enough, else look again later."""
        self._idleTimer = None
        if not self._open:
            return
        clock = self._layer.clock
        timeout = self._layer.limits.tcpIdleTimeout
        remaining = self._lastTraffic + timeout - clock.seconds()
        if remaining > 0:
            self._idleTimer = clock.callLater(remaining, self._idleCheck)
            return
        self._layer.counters["tcp.idle_closed"] += 1
        self.close()

    def _cancelIdleTimer(self) -> None:
        _cancel(self._idleTimer)
        self._idleTimer = None


@implementer(IHandshakeListener)
class SIPTLSStreamProtocol(SIPStreamProtocol):
    """
    A L{SIPStreamProtocol} inside TLS. An outbound one counts as open (and
    its queued messages are written) only once the handshake has verified
    the peer; if the connection closes before that, the queued messages
    fail with the handshake's error. An inbound one is open at once: what
    arrives is delivered only after the handshake anyway.

    With TLS 1.3 our side of the handshake completes before the server has
    checked our certificate; a server that refuses it sends an alert and
    closes. So an outbound connection keeps the error callbacks of the
    messages written on it until the peer sends its first bytes (at most
    L{TransportLimits.connectTimeout} seconds after the handshake): if a
    TLS alert ends the connection before that, those messages fail at once
    with L{TLSRefused} instead of waiting for their transactions' timeout.
    """

    _handshakeTimer: IDelayedCall | None = None
    _verdictTimer: IDelayedCall | None = None
    _unanswered: list[OnError] | None = None

    def connectionMade(self) -> None:
        """
        Open an inbound connection; an outbound one waits for the handshake,
        at most L{TransportLimits.connectTimeout} seconds (then it is
        aborted and its queued messages fail).
        """
        if not self.outbound:
            super().connectionMade()
            return
        layer = self._layer
        self._handshakeTimer = layer.clock.callLater(
            layer.limits.connectTimeout, self._handshakeTimedOut
        )

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        """The peer is verified: an outbound connection is now open."""
        _cancel(self._handshakeTimer)
        self._handshakeTimer = None
        if not self.outbound or self._open:
            return
        layer = self._layer
        if layer._stopped:
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self._unanswered = []
        self._verdictTimer = layer.clock.callLater(layer.limits.connectTimeout, self._answered)
        super().connectionMade()

    def watchSent(self, onError: OnError) -> None:
        """Keep C{onError} until the peer has shown it accepted the connection."""
        if self._unanswered is not None:
            self._unanswered.append(onError)

    def _answered(self) -> None:
        """The peer accepted us (or had time enough to refuse): keep nothing more."""
        _cancel(self._verdictTimer)
        self._verdictTimer = None
        self._unanswered = None

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the peer: it accepted the connection."""
        if self._unanswered is not None:
            self._answered()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Unregister; before the handshake of an outbound one, fail its queue;
        after it, fail what was written if a TLS alert came before any answer.
        """
        layer = self._layer
        _cancel(self._handshakeTimer)
        self._handshakeTimer = None
        if self.outbound and self not in layer._streams:
            if not layer._stopped:
                layer._handshakeFailed(self, reason)
            return
        unanswered = self._unanswered
        self._answered()
        super().connectionLost(reason)
        if layer._stopped:
            return
        if unanswered:
            layer._refusedAfterHandshake(self, reason, unanswered)
        elif not self.outbound:
            layer._inboundLost(self, reason)


def _cancel(timer: IDelayedCall | None) -> None:
    """Cancel C{timer} unless it is None or has run."""
    if timer is not None and timer.active():
        timer.cancel()


class _InboundFactory(ServerFactory[SIPStreamProtocol]):
    """Builds the protocol of each accepted connection, or refuses it."""

    noisy = False

    def __init__(self, layer: SIPTransportLayer, transport: str) -> None:
        self._layer = layer
        self._transport = transport

    def buildProtocol(self, addr: IAddress | None) -> SIPStreamProtocol | None:
        """The protocol for a connection from C{addr}, None to close it at once."""
        return self._layer._acceptConnection(addr, self._transport)


class _OutboundFactory(ClientFactory[SIPStreamProtocol]):
    """Builds the protocol of one outgoing connection and reports its failure."""

    noisy = False

    def __init__(self, layer: SIPTransportLayer, address: Address) -> None:
        self._layer = layer
        self.address = address
        self.abandoned = False

    def buildProtocol(self, addr: IAddress | None) -> SIPStreamProtocol | None:
        """The protocol of the connection, None when it was abandoned meanwhile."""
        if self.abandoned:
            return None
        protocol: SIPStreamProtocol
        if self.address.transport == "tls":
            protocol = SIPTLSStreamProtocol(self._layer, self.address, outbound=True)
        else:
            protocol = SIPStreamProtocol(self._layer, self.address, outbound=True)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        """Fail the messages queued for the connection."""
        if not self.abandoned:
            self._layer._connectFailed(self.address, self, reason)
