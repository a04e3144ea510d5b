"""
Tests for L{dmq_bus.sip.transport}: UDP and TCP framing, parsing and
hand-off to the receiver, RFC 3261 §18 routing, connection reuse and
limits, with in-memory transports and a L{Clock}; plus one real-socket
exchange over UDP and one over TCP.
"""

from __future__ import annotations

import builtins
import errno
import itertools
import random
import socket
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import udp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorUDP, IUDPTransport
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactor,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.interfaces import ISIPMessageReceiver, ISIPTransport
from dmq_bus.sip import transport as transportModule
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import Message, Request, Response, makeResponse
from dmq_bus.sip.parser import findHeaderEnd, parseMessage
from dmq_bus.sip.transport import (
    DEFAULT_LIMITS,
    ConnectionLimitReached,
    MessageTooLarge,
    ReusedBufferUDPPort,
    SIPStreamProtocol,
    SIPTransportLayer,
    TransportLimits,
    TransportNotReady,
    UnsupportedTransport,
    listenUDP,
    receivedHeaders,
    responseDestination,
)
from dmq_bus.sip.uri import Via, splitCommaValues, stripBrackets

# ---------------------------------------------------------------------------
# Wire samples (from captures of Kamailio 5.6.3 DMQ traffic)

KDMQ_UDP = (
    b"KDMQ sip:notification_peer@127.0.0.1:15060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;"
    b"branch=z9hG4bK9fe6.c0dadc05000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:15060>\r\n"
    b"From: <sip:notification_peer@127.0.0.1:15061>;"
    b"tag=7d6d56aac8e1c2a2e3b4a7393705d530-6438041a\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afc-4326@127.0.0.1\r\n"
    b"Content-Length: 35\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 2\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"sip:127.0.0.1:15061;status=active\r\n"
)
"""A notification request as Kamailio sends it over UDP."""

OK_UDP = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;"
    b"branch=z9hG4bK9fe6.c0dadc05000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:15060>;"
    b"tag=a45363010201c12697c26728a1ea42a4.5673b235\r\n"
    b"From: <sip:notification_peer@127.0.0.1:15061>;"
    b"tag=7d6d56aac8e1c2a2e3b4a7393705d530-6438041a\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afc-4326@127.0.0.1\r\n"
    b"Content-Type: text/plain\r\n"
    b"Server: kamailio-dmq-interop\r\n"
    b"Content-Length: 70\r\n"
    b"\r\n"
    b"sip:127.0.0.1:15061;status=active\r\n"
    b"sip:127.0.0.1:15060;status=active\r\n"
)
"""Kamailio's 200 OK to L{KDMQ_UDP}."""

KDMQ_TCP = (
    b"KDMQ sip:htable@127.0.0.1:25166;transport=tcp SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:25160;"
    b"branch=z9hG4bK4523.9a24dab2000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:25166;transport=tcp>\r\n"
    b"From: <sip:htable@127.0.0.1:25160>;tag=2aa4aba24b9ff5d4fbc659b8a81f39f5-e3e2700c\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 626893353f5addda-15393@127.0.0.1\r\n"
    b"Content-Length: 71\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
    b'{"action":2,"htname":"kv","cname":"k2","type":2,"strval":"v2","mode":1}'
)
"""An htable request as Kamailio sends it over TCP (the body has no CRLF)."""

OK_TCP = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:25160;"
    b"branch=z9hG4bK4523.9a24dab2000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:25166;transport=tcp>;tag=tcp1\r\n"
    b"From: <sip:htable@127.0.0.1:25160>;tag=2aa4aba24b9ff5d4fbc659b8a81f39f5-e3e2700c\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 626893353f5addda-15393@127.0.0.1\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
"""The 200 OK answering L{KDMQ_TCP}."""


def kdmq(
    via: str = "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKtest",
    body: bytes = b"hello",
    contentLength: str | None = "auto",
    uri: str = "sip:htable@127.0.0.1:15060",
    callID: str = "test-1@127.0.0.1",
    extra: bytes = b"",
) -> bytes:
    """A KDMQ request with the given top Via, body and Content-Length text."""
    head = (
        f"KDMQ {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "To: <sip:htable@127.0.0.1:15060>\r\n"
        "From: <sip:htable@127.0.0.1:15061>;tag=abc\r\n"
        "CSeq: 10 KDMQ\r\n"
        f"Call-ID: {callID}\r\n"
        "Max-Forwards: 1\r\n"
    ).encode()
    if contentLength == "auto":
        contentLength = str(len(body))
    if contentLength is not None:
        head += f"Content-Length: {contentLength}\r\n".encode()
    return head + extra + b"\r\n" + body


# ---------------------------------------------------------------------------
# Test doubles


@implementer(ISIPMessageReceiver)
class RecordingReceiver:
    """Records what the transport hands up; raises when told to."""

    def __init__(self, raises: bool = False) -> None:
        self.messages: list[tuple[Message, Origin]] = []
        self.unparseable: list[tuple[SIPParseError, Origin]] = []
        self.raises = raises

    def messageReceived(self, message: Message, origin: Origin) -> None:
        self.messages.append((message, origin))
        if self.raises:
            raise ZeroDivisionError("receiver bug")

    def unparseableRequest(self, error: SIPParseError, origin: Origin) -> None:
        self.unparseable.append((error, origin))
        if self.raises:
            raise ZeroDivisionError("receiver bug")


@implementer(IUDPTransport)
class FakeUDPSocket:
    """An in-memory UDP socket that records datagrams or fails to send."""

    def __init__(self, error: Exception | None = None) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.error = error

    def write(self, packet: bytes, addr: Any = None) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((packet, addr))

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError()

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 15060)

    def stopListening(self) -> None:
        pass

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def getBroadcastAllowed(self) -> bool:
        return False


def udpLayer(
    receiver: RecordingReceiver | None = None,
    limits: TransportLimits = DEFAULT_LIMITS,
    socket: FakeUDPSocket | None = None,
) -> tuple[SIPTransportLayer, RecordingReceiver, FakeUDPSocket]:
    """A layer whose UDP protocol listens on a fake socket."""
    receiver = receiver if receiver is not None else RecordingReceiver()
    socket = socket if socket is not None else FakeUDPSocket()
    layer = SIPTransportLayer(receiver, Clock(), limits=limits)
    layer.datagramProtocol().makeConnection(socket)
    return layer, receiver, socket


def streamLayer(
    limits: TransportLimits = DEFAULT_LIMITS,
    receiver: RecordingReceiver | None = None,
) -> tuple[SIPTransportLayer, RecordingReceiver, Clock, MemoryReactor]:
    """A layer on a Clock with a memory reactor for outgoing connections."""
    receiver = receiver if receiver is not None else RecordingReceiver()
    clock = Clock()
    reactor = MemoryReactor()
    layer = SIPTransportLayer(receiver, clock, tcpReactor=reactor, limits=limits)
    return layer, receiver, clock, reactor


def accept(
    layer: SIPTransportLayer,
    host: str = "127.0.0.1",
    port: int = 43007,
    disconnecting: bool = False,
) -> tuple[SIPStreamProtocol, StringTransport]:
    """
    Accept an inbound connection from C{host}:C{port}; with C{disconnecting}
    its transport reports the loss at once when closed.
    """
    peer = IPv4Address("TCP", host, port)
    proto = layer.streamFactory().buildProtocol(peer)
    assert proto is not None
    transport: StringTransport
    if disconnecting:
        withLoss = StringTransportWithDisconnection(peerAddress=peer)
        withLoss.protocol = proto
        transport = withLoss
    else:
        transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


def connectOutbound(
    reactor: MemoryReactor, index: int = -1
) -> tuple[SIPStreamProtocol, StringTransport]:
    """Complete the outgoing connection attempt number C{index}."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert isinstance(proto, SIPStreamProtocol)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(transport)
    return proto, transport


def failOutbound(reactor: MemoryReactor, index: int = -1) -> None:
    """Make the outgoing connection attempt number C{index} fail."""
    factory = cast(ClientFactory[Any], reactor.tcpClients[index][2])
    factory.clientConnectionFailed(reactor.connectors[index], failure(ConnectionRefusedError()))


def failure(error: BaseException) -> Failure:
    """A Failure wrapping C{error}."""
    return Failure(error)  # type: ignore[no-untyped-call]


def captureLogs(case: SynchronousTestCase) -> EventLoggingObserver:
    """Collect every log event emitted during the test C{case}."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def warnings(observer: EventLoggingObserver) -> list[Any]:
    """The warning events the transport layer logged."""
    return [
        e
        for e in observer
        if e["log_level"] == LogLevel.warn
        and e.get("log_namespace", "").startswith("dmq_bus.sip.transport")
    ]


# ---------------------------------------------------------------------------
# Limits and interface


class TransportLimitsTests(SynchronousTestCase):
    """L{TransportLimits} values."""

    def test_defaults(self) -> None:
        """
        The defaults are Kamailio's datagram size, 1 MiB per stream message,
        64 KiB of headers, 5 minutes idle, 1024 connections and 10 s to
        connect.
        """
        limits = TransportLimits()
        self.assertEqual(
            (
                limits.maxDatagramSize,
                limits.maxStreamMessageSize,
                limits.maxHeaderBytes,
                limits.tcpIdleTimeout,
                limits.maxConnections,
                limits.connectTimeout,
            ),
            (65535, 1_048_576, 65536, 300.0, 1024, 10.0),
        )

    def test_nonPositiveRejected(self) -> None:
        """A zero or negative limit is a configuration error, caught at once."""
        self.assertRaises(ValueError, TransportLimits, maxConnections=0)
        self.assertRaises(ValueError, TransportLimits, tcpIdleTimeout=-1.0)


class InterfaceTests(SynchronousTestCase):
    """L{SIPTransportLayer} is what the transaction layer expects."""

    def test_providesISIPTransport(self) -> None:
        """The layer fully provides L{ISIPTransport}."""
        layer, _, _ = udpLayer()
        self.assertTrue(verifyObject(ISIPTransport, layer))

    def test_receiverSetLater(self) -> None:
        """
        The receiver can be given after construction; until then messages
        are dropped and counted instead of failing.
        """
        layer = SIPTransportLayer(None, Clock())
        layer.datagramProtocol().makeConnection(FakeUDPSocket())
        layer.datagramProtocol().datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertEqual(layer.counters["dropped_no_receiver"], 1)
        receiver = RecordingReceiver()
        layer.receiver = receiver
        layer.datagramProtocol().datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertEqual(len(receiver.messages), 1)


# ---------------------------------------------------------------------------
# UDP in


class DatagramReceiveTests(SynchronousTestCase):
    """What the UDP protocol hands to the receiver."""

    def test_requestDelivered(self) -> None:
        """
        A KDMQ datagram reaches the receiver parsed, with the sender's
        address as its origin and no connection.
        """
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        [(message, origin)] = receiver.messages
        self.assertEqual(message, parseMessage(KDMQ_UDP))
        self.assertEqual(origin, Origin(Address("udp", "127.0.0.1", 15061)))
        self.assertIsNone(origin.connection)
        self.assertEqual(layer.counters["udp.received"], 1)

    def test_responseDelivered(self) -> None:
        """A response datagram reaches the receiver unchanged."""
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(OK_UDP, ("10.1.1.1", 15060))
        [(message, origin)] = receiver.messages
        self.assertEqual(message, parseMessage(OK_UDP))
        self.assertEqual(origin.address, Address("udp", "10.1.1.1", 15060))

    def test_commonCaseKeepsTheParsedMessage(self) -> None:
        """
        When the Via already names the source and asks for no rport, the
        very message the parser built is handed up (no copy is made).
        """
        parsed = parseMessage(KDMQ_UDP)
        self.patch(transportModule, "parseMessage", lambda data, stream=False: parsed)
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertIs(receiver.messages[0][0], parsed)

    def test_receivedAddedWhenHostDiffers(self) -> None:
        """
        A request whose top Via names another host than the source gets
        C{received=<source ip>} on that Via (RFC 3261 §18.2.1); other Via
        fields and values are kept.
        """
        data = kdmq(via="SIP/2.0/UDP node-a.example:15061;branch=z9hG4bKx, SIP/2.0/UDP 1.2.3.4")
        data = data.replace(b"To:", b"Via: SIP/2.0/UDP 5.6.7.8;branch=z9hG4bKy\r\nTo:")
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(data, ("10.0.0.9", 15061))
        message = receiver.messages[0][0]
        self.assertEqual(
            message.headers.getAll("via"),
            [
                "SIP/2.0/UDP node-a.example:15061;branch=z9hG4bKx;received=10.0.0.9, "
                "SIP/2.0/UDP 1.2.3.4",
                "SIP/2.0/UDP 5.6.7.8;branch=z9hG4bKy",
            ],
        )
        self.assertEqual(message.body, b"hello")

    def test_rportFilledAndReceivedAdded(self) -> None:
        """
        A top Via with an empty C{rport} gets the source port as its value
        and C{received} even when the host matches (RFC 3581 §4).
        """
        data = kdmq(via="SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKx")
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(data, ("127.0.0.1", 40000))
        self.assertEqual(
            receiver.messages[0][0].headers.get("via"),
            "SIP/2.0/UDP 127.0.0.1:5060;rport=40000;branch=z9hG4bKx;received=127.0.0.1",
        )

    def test_viaLeftAloneWhenRight(self) -> None:
        """
        A Via that names the source host (IPv4, or IPv6 in brackets) with
        no rport, or whose rport already has a value, is not touched.
        """
        for via, source in [
            ("SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKx", "127.0.0.1"),
            ("SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx", "127.0.0.1"),
            ("SIP/2.0/UDP [::1]:5060;branch=z9hG4bKx", "::1"),
            ("SIP/2.0/UDP 127.0.0.1;rport=9;branch=z9hG4bKx", "127.0.0.1"),
        ]:
            data = kdmq(via=via)
            layer, receiver, _ = udpLayer()
            layer.datagramProtocol().datagramReceived(data, (source, 15061))
            self.assertEqual(receiver.messages[0][0].headers.get("via"), via)

    def test_prefixOfSourceIsNotTheSource(self) -> None:
        """A Via host that merely starts like the source address gets C{received}."""
        headers = parseMessage(kdmq(via="SIP/2.0/UDP 127.0.0.10;branch=z9hG4bKx")).headers
        fixed = receivedHeaders(headers, "127.0.0.1", 5060)
        assert fixed is not None
        self.assertEqual(
            fixed.get("via"), "SIP/2.0/UDP 127.0.0.10;branch=z9hG4bKx;received=127.0.0.1"
        )

    def test_garbageDropped(self) -> None:
        """
        Random bytes, a truncated start line, a bad status line and zeros
        are dropped: no exception, the receiver is not called, each is
        counted and logged as exactly one warning naming the source, the
        reason and the offset.
        """
        observer = captureLogs(self)
        rng = random.Random(5060)
        garbage = [
            rng.randbytes(300),
            rng.randbytes(1500),
            KDMQ_UDP[:20],
            b"SIP/2.0 2000 OK\r\nVia: x\r\n\r\n",
            b"\x00\x00\x00\x00",
            b"KDMQ sip:a@b SIP/2.0\r\nbad header line\r\n\r\n",
        ]
        layer, receiver, _ = udpLayer()
        for data in garbage:
            layer.datagramProtocol().datagramReceived(data, ("192.0.2.1", 5060))
        self.assertEqual(receiver.messages, [])
        self.assertEqual(receiver.unparseable, [])
        self.assertEqual(layer.counters["udp.parse_errors"], len(garbage))
        events = warnings(observer)
        self.assertEqual(len(events), len(garbage))
        for event in events:
            self.assertEqual(event["source"], "udp:192.0.2.1:5060")
            self.assertIsInstance(event["reason"], str)
            self.assertIsInstance(event["offset"], int)

    def test_badContentLengthIsUnparseable(self) -> None:
        """
        A request whose Content-Length is malformed or larger than its body
        is handed to the receiver to answer, with its headers and status.
        """
        layer, receiver, _ = udpLayer()
        proto = layer.datagramProtocol()
        proto.datagramReceived(kdmq(contentLength="abc"), ("127.0.0.1", 15061))
        proto.datagramReceived(kdmq(contentLength="500"), ("127.0.0.1", 15061))
        self.assertEqual(receiver.messages, [])
        self.assertEqual(len(receiver.unparseable), 2)
        for error, origin in receiver.unparseable:
            self.assertIsNotNone(error.headers)
            self.assertEqual(error.status, 400)
            self.assertEqual(origin.address, Address("udp", "127.0.0.1", 15061))
        self.assertEqual(layer.counters["udp.unparseable_requests"], 2)
        self.assertEqual(layer.counters["udp.parse_errors"], 0)

    def test_unparseableGetsReceived(self) -> None:
        """
        An unparseable request from another host than its Via names gets
        C{received} too, so the stateless answer is routed right.
        """
        layer, receiver, _ = udpLayer()
        data = kdmq(via="SIP/2.0/UDP 10.0.0.1;rport;branch=z9hG4bKx", contentLength="x")
        layer.datagramProtocol().datagramReceived(data, ("192.0.2.7", 3333))
        [(error, _)] = receiver.unparseable
        assert error.headers is not None
        self.assertEqual(
            responseDestination(error.headers.get("via") or ""),
            Address("udp", "192.0.2.7", 3333),
        )

    def test_keepalivesIgnored(self) -> None:
        """CRLF keep-alive datagrams (and empty ones) are counted and ignored."""
        observer = captureLogs(self)
        layer, receiver, _ = udpLayer()
        for data in [b"\r\n", b"\r\n\r\n", b"", b"\n"]:
            layer.datagramProtocol().datagramReceived(data, ("127.0.0.1", 15061))
        self.assertEqual(layer.counters["keepalives"], 4)
        self.assertEqual(layer.counters["udp.parse_errors"], 0)
        self.assertEqual(receiver.messages, [])
        self.assertEqual(warnings(observer), [])

    def test_leadingCRLFBeforeMessage(self) -> None:
        """A message preceded by CRLFs in a datagram is still a message."""
        layer, receiver, _ = udpLayer()
        layer.datagramProtocol().datagramReceived(b"\r\n" + KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertEqual(len(receiver.messages), 1)

    def test_receiverExceptionContained(self) -> None:
        """
        A receiver that raises does not break the UDP socket: the error is
        logged and counted, and the next datagram is delivered too.
        """
        layer, receiver, _ = udpLayer(RecordingReceiver(raises=True))
        proto = layer.datagramProtocol()
        proto.datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        proto.datagramReceived(kdmq(contentLength="x"), ("127.0.0.1", 15061))
        proto.datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertEqual(len(receiver.messages), 2)
        self.assertEqual(layer.counters["receiver_errors"], 3)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 3)

    def test_oversizeDatagramDropped(self) -> None:
        """
        With the datagram limit set below 65535, a bigger datagram is
        dropped and counted; one of exactly the limit is accepted.
        """
        limits = TransportLimits(maxDatagramSize=len(KDMQ_UDP))
        layer, receiver, _ = udpLayer(limits=limits)
        layer.datagramProtocol().datagramReceived(KDMQ_UDP + b"x", ("127.0.0.1", 15061))
        self.assertEqual(layer.counters["oversize"], 1)
        self.assertEqual(receiver.messages, [])
        layer.datagramProtocol().datagramReceived(KDMQ_UDP, ("127.0.0.1", 15061))
        self.assertEqual(len(receiver.messages), 1)

    def test_ipv6Source(self) -> None:
        """An IPv6 source (4-tuple address) becomes an origin without brackets."""
        layer, receiver, _ = udpLayer()
        data = kdmq(via="SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx")
        layer.datagramProtocol().datagramReceived(data, ("2001:db8::1", 5060, 0, 0))
        [(message, origin)] = receiver.messages
        self.assertEqual(origin.address, Address("udp", "2001:db8::1", 5060))
        self.assertEqual(
            message.headers.get("via"), "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx"
        )


# ---------------------------------------------------------------------------
# UDP out


class DatagramSendTests(SynchronousTestCase):
    """Sending datagrams."""

    def test_sendFromTheListeningSocket(self) -> None:
        """
        A UDP send goes out of the one listening socket, to the
        destination's host and port.
        """
        layer, _, socket = udpLayer()
        layer.send(KDMQ_UDP, Address("udp", "127.0.0.1", 15060))
        self.assertEqual(socket.written, [(KDMQ_UDP, ("127.0.0.1", 15060))])
        self.assertEqual(layer.counters["udp.sent"], 1)

    def test_oversizeSendFails(self) -> None:
        """
        A message bigger than the datagram limit is not sent: C{onError}
        gets one L{MessageTooLarge}; one of exactly the limit is sent.
        """
        limits = TransportLimits(maxDatagramSize=100)
        layer, _, socket = udpLayer(limits=limits)
        errors: list[Failure] = []
        layer.send(b"x" * 101, Address("udp", "127.0.0.1", 15060), errors.append)
        layer.send(b"x" * 100, Address("udp", "127.0.0.1", 15060), errors.append)
        [error] = errors
        self.assertTrue(error.check(MessageTooLarge))
        self.assertEqual(len(socket.written), 1)
        self.assertEqual(layer.counters["oversize"], 1)
        self.assertEqual(layer.counters["send_errors"], 1)

    def test_socketErrorGoesToOnError(self) -> None:
        """A socket error while sending reaches C{onError} once, never the caller."""
        layer, _, _ = udpLayer(socket=FakeUDPSocket(OSError(101, "Network is unreachable")))
        errors: list[Failure] = []
        layer.send(KDMQ_UDP, Address("udp", "192.0.2.1", 5060), errors.append)
        [error] = errors
        self.assertTrue(error.check(OSError))
        self.assertEqual(layer.counters["send_errors"], 1)

    def test_notListening(self) -> None:
        """Sending before the UDP socket listens fails through C{onError}."""
        layer = SIPTransportLayer(RecordingReceiver(), Clock())
        errors: list[Failure] = []
        layer.send(KDMQ_UDP, Address("udp", "127.0.0.1", 5060), errors.append)
        self.assertTrue(errors[0].check(TransportNotReady))

    def test_failureWithoutOnErrorIsLogged(self) -> None:
        """A send that fails with no C{onError} is logged as a warning, not raised."""
        observer = captureLogs(self)
        layer, _, _ = udpLayer(socket=FakeUDPSocket(OSError(101, "unreachable")))
        layer.send(KDMQ_UDP, Address("udp", "192.0.2.1", 5060))
        [event] = warnings(observer)
        self.assertEqual(event["destination"], "udp:192.0.2.1:5060")

    def test_raisingOnErrorContained(self) -> None:
        """An C{onError} that raises is logged; the send still returns normally."""
        layer, _, _ = udpLayer(socket=FakeUDPSocket(OSError(101, "unreachable")))

        def onError(reason: Failure) -> None:
            raise ZeroDivisionError("caller bug")

        layer.send(KDMQ_UDP, Address("udp", "192.0.2.1", 5060), onError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_tlsSendFails(self) -> None:
        """Sending over TLS without TLS settings fails through C{onError} with a clear message."""
        layer, _, _ = udpLayer()
        errors: list[Failure] = []
        layer.send(KDMQ_UDP, Address("tls", "127.0.0.1", 5061), errors.append)
        [error] = errors
        self.assertTrue(error.check(UnsupportedTransport))
        self.assertTrue(error.check(NotImplementedError))
        self.assertEqual(error.getErrorMessage(), "TLS not configured (no certificate, key and CA)")

    def test_unknownTransportFails(self) -> None:
        """An unknown transport name fails through C{onError}."""
        layer, _, _ = udpLayer()
        errors: list[Failure] = []
        layer.send(KDMQ_UDP, Address("sctp", "127.0.0.1", 5060), errors.append)
        self.assertTrue(errors[0].check(UnsupportedTransport))


# ---------------------------------------------------------------------------
# Response routing


class ResponseRoutingTests(SynchronousTestCase):
    """Where responses go (RFC 3261 §18.2.2, RFC 3581)."""

    def test_received(self) -> None:
        """The C{received} host wins over the sent-by host."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP node-a:15061;branch=z9hG4bKx;received=10.0.0.9"),
            Address("udp", "10.0.0.9", 15061),
        )

    def test_rportWithValue(self) -> None:
        """An C{rport} with a value wins over the sent-by port."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP 10.0.0.1:5060;rport=40000;received=192.0.2.7"),
            Address("udp", "192.0.2.7", 40000),
        )

    def test_rportWithoutValue(self) -> None:
        """An C{rport} without a value leaves the sent-by port."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP 10.0.0.1:5070;rport;branch=z9hG4bKx"),
            Address("udp", "10.0.0.1", 5070),
        )

    def test_sentBy(self) -> None:
        """Without received and rport the sent-by host and port are used."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKx"),
            Address("udp", "127.0.0.1", 15061),
        )

    def test_defaultPort(self) -> None:
        """A sent-by without a port means 5060."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx"),
            Address("udp", "127.0.0.1", 5060),
        )

    def test_ipv6AndTransport(self) -> None:
        """IPv6 brackets are stripped; the Via's transport is used, in lower case."""
        self.assertEqual(
            responseDestination("SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bKx"),
            Address("tcp", "2001:db8::1", 5070),
        )

    def test_commaJoined(self) -> None:
        """Given a comma-joined Via, the first value is used."""
        self.assertEqual(
            responseDestination("SIP/2.0/UDP 10.0.0.1:5062;branch=a, SIP/2.0/UDP 10.0.0.2"),
            Address("udp", "10.0.0.1", 5062),
        )

    def test_replyOverUDP(self) -> None:
        """A UDP reply leaves the listening socket for the Via's address."""
        layer, _, socket = udpLayer()
        layer.reply(
            OK_UDP,
            Origin(Address("udp", "192.0.2.7", 40000)),
            "SIP/2.0/UDP 10.0.0.1:5060;rport=40000;received=192.0.2.7",
        )
        self.assertEqual(socket.written, [(OK_UDP, ("192.0.2.7", 40000))])

    def test_replyWithBadViaContained(self) -> None:
        """A reply whose Via cannot be parsed is counted and logged, not raised."""
        observer = captureLogs(self)
        layer, _, socket = udpLayer()
        layer.reply(OK_UDP, Origin(Address("udp", "192.0.2.7", 5060)), "garbage")
        self.assertEqual(socket.written, [])
        self.assertEqual(layer.counters["send_errors"], 1)
        self.assertEqual(len(warnings(observer)), 1)

    def test_replyOnOpenConnection(self) -> None:
        """A reply to a TCP request goes back on its connection while it is open."""
        layer, receiver, _, reactor = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(KDMQ_TCP)
        [(_, origin)] = receiver.messages
        layer.reply(OK_TCP, origin, "SIP/2.0/TCP 127.0.0.1:25160;branch=z9hG4bKx")
        self.assertEqual(transport.value(), OK_TCP)
        self.assertEqual(reactor.tcpClients, [])

    def test_replyAfterConnectionClosed(self) -> None:
        """
        Once the request's connection is closed, the reply opens a
        connection to the Via's address (RFC 3261 §18.2.2).
        """
        layer, receiver, _, reactor = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(KDMQ_TCP)
        proto.connectionLost(failure(ConnectionRefusedError()))
        [(_, origin)] = receiver.messages
        layer.reply(OK_TCP, origin, "SIP/2.0/TCP 127.0.0.1:25160;branch=z9hG4bKx")
        self.assertEqual(transport.value(), b"")
        [(host, port, _, _, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 25160))
        _, outbound = connectOutbound(reactor)
        self.assertEqual(outbound.value(), OK_TCP)


# ---------------------------------------------------------------------------
# TCP in


class StreamFramingTests(SynchronousTestCase):
    """How the TCP protocol cuts a byte stream into messages."""

    def test_originIsTheConnection(self) -> None:
        """
        A message on an inbound connection comes from the peer's address,
        with the connection as the origin's connection.
        """
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer, "127.0.0.1", 43007)
        proto.dataReceived(KDMQ_TCP)
        [(message, origin)] = receiver.messages
        self.assertEqual(message, parseMessage(KDMQ_TCP, stream=True))
        self.assertEqual(origin.address, Address("tcp", "127.0.0.1", 43007))
        self.assertIs(origin.connection, proto)
        self.assertEqual(layer.counters["tcp.received"], 1)
        self.assertEqual(layer.counters["tcp.connections_opened"], 1)

    def test_twoMessagesInOneChunk(self) -> None:
        """Two messages arriving together are both delivered, in order."""
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer)
        proto.dataReceived(KDMQ_TCP + OK_TCP)
        self.assertEqual(
            [m for m, _ in receiver.messages],
            [parseMessage(KDMQ_TCP, stream=True), parseMessage(OK_TCP, stream=True)],
        )

    def test_byteByByte(self) -> None:
        """A message arriving one byte at a time is delivered once, whole."""
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer)
        for i in range(len(KDMQ_TCP)):
            self.assertEqual(receiver.messages, [])
            proto.dataReceived(KDMQ_TCP[i : i + 1])
        self.assertEqual([m for m, _ in receiver.messages], [parseMessage(KDMQ_TCP, stream=True)])

    def test_headerSearchIsIncremental(self) -> None:
        """
        Bytes already searched for the end of the headers are not searched
        again: a message fed byte by byte costs a scan linear in its size.
        """
        scanned: list[int] = []
        real = findHeaderEnd

        def counting(data: bytes, start: int = 0) -> tuple[int, int]:
            scanned.append(len(data) - start)
            return real(data, start)

        self.patch(transportModule, "findHeaderEnd", counting)
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer)
        for i in range(len(KDMQ_TCP)):
            proto.dataReceived(KDMQ_TCP[i : i + 1])
        self.assertEqual(len(receiver.messages), 1)
        self.assertLessEqual(sum(scanned), 4 * len(KDMQ_TCP))

    @settings(derandomize=True, max_examples=60, deadline=None)
    @given(st.sets(st.integers(min_value=1, max_value=len(KDMQ_TCP) * 2 + 5)))
    def test_anyChunking(self, cuts: set[int]) -> None:
        """
        However a stream of keep-alives and messages is cut into chunks, the
        same messages come out in the same order.
        """
        stream = b"\r\n" + KDMQ_TCP + b"\r\n\r\n" + OK_TCP + b"\r\n" + KDMQ_TCP
        points = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        for start, end in itertools.pairwise(points):
            proto.dataReceived(stream[start:end])
        self.assertEqual(
            [m for m, _ in receiver.messages],
            [
                parseMessage(KDMQ_TCP, stream=True),
                parseMessage(OK_TCP, stream=True),
                parseMessage(KDMQ_TCP, stream=True),
            ],
        )
        self.assertEqual(transport.value(), b"\r\n")

    def test_keepalivesBetweenMessages(self) -> None:
        """Single CRLFs before and between messages are skipped and counted."""
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(b"\r\n" + KDMQ_TCP + b"\r\n" + OK_TCP + b"\r\n")
        proto.dataReceived(KDMQ_TCP)
        self.assertEqual(len(receiver.messages), 3)
        self.assertEqual(layer.counters["keepalives"], 3)
        self.assertEqual(transport.value(), b"")

    def test_pingPong(self) -> None:
        """
        A double-CRLF ping is answered with a single-CRLF pong (RFC 5626
        §3.5.1), also when the ping arrives in two pieces.
        """
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(b"\r\n\r\n")
        self.assertEqual(transport.value(), b"\r\n")
        transport.clear()
        proto.dataReceived(b"\r\n")
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"\r\n")
        self.assertEqual(transport.value(), b"\r\n")
        self.assertEqual(receiver.messages, [])
        self.assertFalse(transport.disconnecting)

    def test_compactAndOddContentLength(self) -> None:
        """
        The compact C{l:} form, a space before the colon, a folded value and
        lower-case names all frame the message by their Content-Length.
        """
        variants = [
            KDMQ_TCP.replace(b"Content-Length: 71", b"l: 71"),
            KDMQ_TCP.replace(b"Content-Length: 71", b"Content-Length : 71"),
            KDMQ_TCP.replace(b"Content-Length: 71", b"content-length:\r\n 71"),
            KDMQ_TCP.replace(b"Content-Length: 71", b"CONTENT-LENGTH:71"),
            KDMQ_TCP.replace(b"To:", b"Location: <sip:x@y>\r\nTo:"),
            KDMQ_TCP.replace(b"To:", b"Content-Length-X: 9\r\nTo:"),
        ]
        for data in variants:
            layer, receiver, _, _ = streamLayer()
            proto, transport = accept(layer)
            proto.dataReceived(data + OK_TCP)
            self.assertEqual(len(receiver.messages), 2, data)
            self.assertEqual(receiver.messages[0][0].body, KDMQ_TCP[-71:])
            self.assertFalse(transport.disconnecting)

    def test_firstContentLengthCounts(self) -> None:
        """With two Content-Length fields the first frames the message, as the parser reads it."""
        data = kdmq(body=b"abc", extra=b"l: 99\r\n")
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer)
        proto.dataReceived(data + OK_TCP)
        self.assertEqual([m.body for m, _ in receiver.messages], [b"abc", b""])

    def test_tooLargeRequest(self) -> None:
        """
        A request above the stream message limit is answered with 413 as soon
        as its headers are in (the receiver's reply goes out on the
        connection), then the connection is closed; the limit itself is fine.
        """
        atLimit = kdmq(body=b"x" * 100)
        limits = TransportLimits(maxStreamMessageSize=len(atLimit))
        layer, receiver, _, _ = streamLayer(limits)
        proto, transport = accept(layer)
        proto.dataReceived(atLimit)
        self.assertEqual(len(receiver.messages), 1)
        self.assertFalse(transport.disconnecting)

        def answer(error: SIPParseError, origin: Origin) -> None:
            assert error.headers is not None
            response = makeResponse(error.headers, error.status)
            layer.reply(response.toBytes(), origin, error.headers.get("via") or "")

        receiver.unparseableRequest = answer  # type: ignore[method-assign]
        tooLarge = kdmq(body=b"x" * 101)
        proto.dataReceived(tooLarge[: tooLarge.index(b"\r\n\r\n") + 4])
        self.assertTrue(transport.value().startswith(b"SIP/2.0 413 Request Entity Too Large\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(layer.counters["oversize"], 1)

    def test_tooLargeResponse(self) -> None:
        """A response above the limit closes the connection without a word."""
        limits = TransportLimits(maxStreamMessageSize=100)
        layer, receiver, _, _ = streamLayer(limits)
        proto, transport = accept(layer)
        proto.dataReceived(OK_TCP.replace(b"Content-Length: 0", b"Content-Length: 1000"))
        self.assertEqual((receiver.messages, receiver.unparseable), ([], []))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(layer.counters["oversize"], 1)

    def test_headersTooLong(self) -> None:
        """
        When C{maxHeaderBytes} bytes arrive without the end of the headers,
        the connection is closed and counted; headers ending exactly at the
        limit are accepted.
        """
        head = KDMQ_TCP[: KDMQ_TCP.index(b"\r\n\r\n") + 4]
        limits = TransportLimits(maxHeaderBytes=len(head))
        layer, receiver, _, _ = streamLayer(limits)
        proto, transport = accept(layer)
        proto.dataReceived(KDMQ_TCP)
        self.assertEqual(len(receiver.messages), 1)

        proto.dataReceived(b"KDMQ sip:a@b SIP/2.0\r\nX: " + b"y" * (len(head) - 30))
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"y" * 10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(layer.counters["tcp.headers_too_long"], 1)

    def test_headersTooLongInOneChunk(self) -> None:
        """A header block longer than the limit is refused even when it arrives whole."""
        limits = TransportLimits(maxHeaderBytes=100)
        layer, receiver, _, _ = streamLayer(limits)
        proto, transport = accept(layer)
        proto.dataReceived(KDMQ_TCP)
        self.assertEqual(receiver.messages, [])
        self.assertTrue(transport.disconnecting)

    def test_missingContentLength(self) -> None:
        """
        A request without Content-Length on a stream is handed to the
        receiver to answer, then the connection is closed (framing is lost).
        """
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(kdmq(contentLength=None, body=b""))
        [(error, origin)] = receiver.unparseable
        self.assertIn("Content-Length", error.reason)
        self.assertIs(origin.connection, proto)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(layer.counters["tcp.unparseable_requests"], 1)

    def test_badContentLength(self) -> None:
        """A malformed Content-Length on a stream is answered, then the connection closed."""
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(kdmq(contentLength="-1"))
        self.assertEqual(len(receiver.unparseable), 1)
        self.assertTrue(transport.disconnecting)

    def test_garbageClosesStream(self) -> None:
        """
        Bytes that are no SIP message close the connection, counted and
        logged once; the receiver is not called.
        """
        observer = captureLogs(self)
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(b"\x16\x03\x01\x02\x00\x01\r\nno colon here\r\n\r\n")
        self.assertEqual((receiver.messages, receiver.unparseable), ([], []))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(layer.counters["tcp.parse_errors"], 1)
        self.assertEqual(len(warnings(observer)), 1)
        proto.dataReceived(KDMQ_TCP)
        self.assertEqual(receiver.messages, [])

    def test_framedUnparseableKeepsConnection(self) -> None:
        """
        A well-framed request that cannot be accepted (a non-SIP URI) is
        handed up to be answered and the connection stays usable.
        """
        layer, receiver, _, _ = streamLayer()
        proto, transport = accept(layer)
        proto.dataReceived(kdmq(uri="tel:+123") + KDMQ_TCP)
        [(error, _)] = receiver.unparseable
        self.assertEqual(error.status, 416)
        self.assertEqual(len(receiver.messages), 1)
        self.assertFalse(transport.disconnecting)

    def test_receivedAddedOnTCP(self) -> None:
        """A TCP request whose Via names another host gets C{received} too."""
        layer, receiver, _, _ = streamLayer()
        proto, _ = accept(layer, "192.0.2.5", 40001)
        proto.dataReceived(KDMQ_TCP)
        via = receiver.messages[0][0].headers.get("via") or ""
        self.assertTrue(via.endswith(";received=192.0.2.5"))

    def test_receiverExceptionContained(self) -> None:
        """A receiver that raises leaves the connection open and the next message delivered."""
        layer, receiver, _, _ = streamLayer(receiver=RecordingReceiver(raises=True))
        proto, transport = accept(layer)
        proto.dataReceived(KDMQ_TCP + KDMQ_TCP)
        self.assertEqual(len(receiver.messages), 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_idleTimeout(self) -> None:
        """A connection without traffic is closed exactly C{tcpIdleTimeout} after opening."""
        layer, _, clock, _ = streamLayer(TransportLimits(tcpIdleTimeout=300.0))
        _, transport = accept(layer)
        clock.advance(299)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(layer.counters["tcp.idle_closed"], 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_trafficPostponesIdleTimeout(self) -> None:
        """
        Data received or sent restarts the idle time: the connection closes
        exactly C{tcpIdleTimeout} after its last traffic.
        """
        layer, receiver, clock, _ = streamLayer(TransportLimits(tcpIdleTimeout=300.0))
        proto, transport = accept(layer)
        clock.advance(100)
        proto.dataReceived(KDMQ_TCP)
        clock.advance(150)
        layer.reply(OK_TCP, receiver.messages[0][1], "SIP/2.0/TCP 127.0.0.1:25160")
        clock.advance(299)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_lostConnectionCancelsTimer(self) -> None:
        """A connection lost by the peer leaves no timer behind and is counted."""
        layer, _, clock, _ = streamLayer()
        proto, _ = accept(layer)
        proto.connectionLost(failure(ConnectionRefusedError()))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(layer.counters["tcp.connections_closed"], 1)


# ---------------------------------------------------------------------------
# TCP out, limits, stop


class StreamSendTests(SynchronousTestCase):
    """Outgoing TCP: one reused connection per destination."""

    destination = Address("tcp", "127.0.0.1", 25166)

    def test_connectsOnFirstSend(self) -> None:
        """The first send to an address connects to it with the connect timeout."""
        layer, _, _, reactor = streamLayer(TransportLimits(connectTimeout=7.0))
        layer.send(KDMQ_TCP, self.destination)
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 25166, 7.0))

    def test_queuedWhileConnectingThenReused(self) -> None:
        """
        Messages sent while the connection is being made wait and go out in
        order once it is up; later sends reuse it without connecting again.
        """
        layer, _, _, reactor = streamLayer()
        errors: list[Failure] = []
        layer.send(b"one", self.destination, errors.append)
        layer.send(b"two", self.destination, errors.append)
        self.assertEqual(len(reactor.tcpClients), 1)
        _, transport = connectOutbound(reactor)
        self.assertEqual(transport.value(), b"onetwo")
        layer.send(b"three", self.destination, errors.append)
        self.assertEqual(transport.value(), b"onetwothree")
        self.assertEqual(len(reactor.tcpClients), 1)
        self.assertEqual(errors, [])
        self.assertEqual(layer.counters["tcp.sent"], 3)

    def test_responsesOnOutboundConnection(self) -> None:
        """Messages arriving on an outgoing connection reach the receiver too."""
        layer, receiver, _, reactor = streamLayer()
        layer.send(KDMQ_TCP, self.destination)
        proto, _ = connectOutbound(reactor)
        proto.dataReceived(OK_TCP)
        [(message, origin)] = receiver.messages
        self.assertIsInstance(message, Response)
        self.assertEqual(origin.address, self.destination)
        self.assertIs(origin.connection, proto)

    def test_connectFailure(self) -> None:
        """
        When the connection cannot be made, C{onError} is called once for
        every queued message; the next send tries to connect again.
        """
        layer, _, _, reactor = streamLayer()
        first: list[Failure] = []
        second: list[Failure] = []
        layer.send(b"one", self.destination, first.append)
        layer.send(b"two", self.destination, second.append)
        failOutbound(reactor)
        self.assertEqual(len(first), 1)
        self.assertEqual(len(second), 1)
        self.assertTrue(first[0].check(ConnectionRefusedError))
        self.assertEqual(layer.counters["tcp.connect_failed"], 1)
        self.assertEqual(layer.counters["send_errors"], 2)
        failOutbound(reactor)  # a late duplicate report changes nothing
        self.assertEqual((len(first), len(second)), (1, 1))
        layer.send(b"three", self.destination)
        self.assertEqual(len(reactor.tcpClients), 2)

    def test_reconnectAfterLoss(self) -> None:
        """After the connection is lost, the next send opens a new one."""
        layer, _, _, reactor = streamLayer()
        layer.send(b"one", self.destination)
        proto, _ = connectOutbound(reactor)
        proto.connectionLost(failure(ConnectionRefusedError()))
        layer.send(b"two", self.destination)
        self.assertEqual(len(reactor.tcpClients), 2)
        _, transport = connectOutbound(reactor)
        self.assertEqual(transport.value(), b"two")

    def test_inboundConnectionReused(self) -> None:
        """A send to the exact address of an inbound connection goes out on it."""
        layer, _, _, reactor = streamLayer()
        _, transport = accept(layer, "127.0.0.1", 43007)
        layer.send(b"ping", Address("tcp", "127.0.0.1", 43007))
        self.assertEqual(transport.value(), b"ping")
        self.assertEqual(reactor.tcpClients, [])

    def test_closedConnectionNotUsed(self) -> None:
        """A connection this side is closing takes no more messages."""
        layer, _, clock, reactor = streamLayer(TransportLimits(tcpIdleTimeout=10.0))
        _, transport = accept(layer, "127.0.0.1", 43007)
        clock.advance(10)
        layer.send(b"ping", Address("tcp", "127.0.0.1", 43007))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_noTcpReactor(self) -> None:
        """Without a TCP reactor a TCP send fails through C{onError}."""
        layer = SIPTransportLayer(RecordingReceiver(), Clock())
        errors: list[Failure] = []
        layer.send(b"x", self.destination, errors.append)
        self.assertTrue(errors[0].check(TransportNotReady))


class ConnectionLimitTests(SynchronousTestCase):
    """C{maxConnections}, inbound and outbound together."""

    def test_inboundRefusedAtLimit(self) -> None:
        """
        With the limit reached a new inbound connection is refused (its
        factory builds no protocol) and counted; once one closes, a new one
        is accepted again.
        """
        layer, _, _, _ = streamLayer(TransportLimits(maxConnections=2))
        first, _ = accept(layer, port=1)
        accept(layer, port=2)
        factory = layer.streamFactory()
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3)))
        self.assertEqual(layer.counters["tcp.connections_refused_limit"], 1)
        first.connectionLost(failure(ConnectionRefusedError()))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3)))

    def test_outboundFailsAtLimit(self) -> None:
        """
        With the limit reached (connections being made count too) a send
        that needs a new connection fails with L{ConnectionLimitReached};
        sends on existing connections still work.
        """
        layer, _, _, reactor = streamLayer(TransportLimits(maxConnections=2))
        accept(layer, port=1)
        layer.send(b"a", Address("tcp", "127.0.0.1", 25166))
        errors: list[Failure] = []
        layer.send(b"b", Address("tcp", "127.0.0.1", 25167), errors.append)
        [error] = errors
        self.assertTrue(error.check(ConnectionLimitReached))
        self.assertEqual(len(reactor.tcpClients), 1)
        layer.send(b"c", Address("tcp", "127.0.0.1", 25166), errors.append)
        self.assertEqual(len(errors), 1)
        self.assertEqual(layer.counters["tcp.connections_refused_limit"], 1)


class StopTests(SynchronousTestCase):
    """L{SIPTransportLayer.stop}."""

    def test_stopWithNothingOpen(self) -> None:
        """Stopping a layer without connections is done at once."""
        layer, _, _, _ = streamLayer()
        self.assertIsNone(self.successResultOf(layer.stop()))

    def test_stopClosesEverything(self) -> None:
        """
        Stopping closes every connection, fires only when all are closed,
        fails messages waiting for a connection, cancels the timers and
        refuses new connections and sends.
        """
        layer, _, clock, reactor = streamLayer()
        accept(layer, port=1, disconnecting=True)
        slow, slowTransport = accept(layer, port=2)
        errors: list[Failure] = []
        layer.send(b"queued", Address("tcp", "127.0.0.1", 25166), errors.append)
        stopped = layer.stop()
        self.assertNoResult(stopped)
        self.assertTrue(slowTransport.disconnecting)
        self.assertTrue(errors[0].check(TransportNotReady))
        self.assertTrue(reactor.connectors[0].stoppedConnecting)  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls(), [])
        slow.connectionLost(failure(ConnectionRefusedError()))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(layer.streamFactory().buildProtocol(IPv4Address("TCP", "1.2.3.4", 5)))
        layer.send(b"late", Address("tcp", "127.0.0.1", 25166), errors.append)
        self.assertEqual(len(errors), 2)
        failOutbound(reactor)  # the abandoned attempt reports late: ignored
        self.assertEqual(len(errors), 2)


# ---------------------------------------------------------------------------
# Real sockets


@implementer(ISIPMessageReceiver)
class AnsweringReceiver:
    """Answers every request with 200 OK and fires C{arrived} on the first message."""

    def __init__(self) -> None:
        self.layer: SIPTransportLayer | None = None
        self.messages: list[tuple[Message, Origin]] = []
        self.arrived: Deferred[tuple[Message, Origin]] = Deferred()

    def messageReceived(self, message: Message, origin: Origin) -> None:
        self.messages.append((message, origin))
        if isinstance(message, Request) and self.layer is not None:
            response = makeResponse(message.headers, 200, toTag="real")
            via = splitCommaValues(message.headers.get("via") or "")[0]
            self.layer.reply(response.toBytes(), origin, via)
        if not self.arrived.called:
            self.arrived.callback((message, origin))

    def unparseableRequest(self, error: SIPParseError, origin: Origin) -> None:
        pass


class RealSocketTests(TestCase):
    """Two layers exchanging a request and its response over real sockets."""

    timeout = 10

    def test_udpExchange(self) -> Deferred[None]:
        """
        Over UDP on 127.0.0.1, a request from one layer reaches the other
        from the sender's listening port, and the 200 OK comes back.
        """
        from twisted.internet import reactor as _reactor

        reactor = cast(Any, _reactor)
        server, client = AnsweringReceiver(), AnsweringReceiver()
        serverLayer = SIPTransportLayer(server, reactor)
        clientLayer = SIPTransportLayer(client, reactor)
        server.layer = serverLayer
        serverPort = reactor.listenUDP(0, serverLayer.datagramProtocol(), interface="127.0.0.1")
        self.addCleanup(serverPort.stopListening)
        clientPort = reactor.listenUDP(0, clientLayer.datagramProtocol(), interface="127.0.0.1")
        self.addCleanup(clientPort.stopListening)
        clientPortNumber = clientPort.getHost().port
        request = KDMQ_UDP.replace(b"15061;branch", b"%d;branch" % clientPortNumber)
        errors: list[Failure] = []
        clientLayer.send(
            request, Address("udp", "127.0.0.1", serverPort.getHost().port), errors.append
        )

        def check(result: tuple[Message, Origin]) -> None:
            response, _ = result
            assert isinstance(response, Response)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.get("call-id"), "0ba827cb2ced0afc-4326@127.0.0.1")
            [(received, origin)] = server.messages
            self.assertEqual(origin.address, Address("udp", "127.0.0.1", clientPortNumber))
            self.assertEqual(received.body, b"sip:127.0.0.1:15061;status=active\r\n")
            self.assertEqual(errors, [])

        return client.arrived.addCallback(check)

    def test_tcpExchange(self) -> Deferred[None]:
        """
        Over TCP on 127.0.0.1, a request opens a connection, the 200 OK comes
        back on it, and a second request reuses it; stopping both layers
        closes everything.
        """
        from twisted.internet import reactor as _reactor

        reactor = cast(Any, _reactor)
        server = AnsweringReceiver()
        client = AnsweringReceiver()
        serverLayer = SIPTransportLayer(server, reactor, tcpReactor=reactor)
        clientLayer = SIPTransportLayer(client, reactor, tcpReactor=reactor)
        server.layer = serverLayer
        serverPort = reactor.listenTCP(0, serverLayer.streamFactory(), interface="127.0.0.1")
        self.addCleanup(serverPort.stopListening)
        self.addCleanup(serverLayer.stop)
        self.addCleanup(clientLayer.stop)
        destination = Address("tcp", "127.0.0.1", serverPort.getHost().port)
        errors: list[Failure] = []
        clientLayer.send(KDMQ_TCP, destination, errors.append)

        def first(result: tuple[Message, Origin]) -> Deferred[tuple[Message, Origin]]:
            response, origin = result
            assert isinstance(response, Response)
            self.assertEqual(response.code, 200)
            self.assertIsInstance(origin.connection, SIPStreamProtocol)
            [(_, serverOrigin)] = server.messages
            self.assertIsInstance(serverOrigin.connection, SIPStreamProtocol)
            client.arrived = Deferred()
            clientLayer.send(KDMQ_TCP.replace(b"15393@", b"15394@"), destination, errors.append)
            return client.arrived

        def second(result: tuple[Message, Origin]) -> None:
            response, _ = result
            self.assertEqual(response.headers.get("call-id"), "626893353f5addda-15394@127.0.0.1")
            self.assertEqual(clientLayer.counters["tcp.connections_opened"], 1)
            self.assertEqual(serverLayer.counters["tcp.connections_opened"], 1)
            self.assertEqual(errors, [])

        return client.arrived.addCallback(first).addCallback(second)


class _SocketForPort:
    """
    A socket for a real C{udp.Port} that records datagrams, or raises the
    next of C{errors} (None: send that one).
    """

    def __init__(self, *errors: OSError | None) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.errors = list(errors)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        self.sent.append((data, addr))
        return len(data)

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockopt(self, *args: object) -> int:
        return 4 * 1024 * 1024


class DirectDatagramSendTests(SynchronousTestCase):
    """
    Over a real C{udp.Port}, datagrams to a host the port accepted once go
    straight to the socket's C{sendto}, with the errors Twisted would give.
    """

    def setUp(self) -> None:
        from twisted.internet import udp

        self.layer = SIPTransportLayer(RecordingReceiver(), Clock())
        self.protocol = self.layer.datagramProtocol()
        self.port = udp.Port(0, self.protocol, "127.0.0.1", reactor=Clock())  # type: ignore[arg-type]
        self.socket = _SocketForPort()
        self.port.socket = self.socket  # type: ignore[assignment]
        self.protocol.makeConnection(self.port)
        self.destination = Address("udp", "127.0.0.1", 15062)
        self.errors: list[Failure] = []

    def send(self, destination: Address | None = None) -> None:
        self.layer.send(KDMQ_UDP, destination or self.destination, self.errors.append)

    def writeForbidden(self) -> None:
        """Make C{udp.Port.write} fail the test: only the direct path may send."""

        def write(datagram: bytes, addr: Any = None) -> None:
            self.fail("udp.Port.write called for a host already accepted")

        self.port.write = write  # type: ignore[method-assign]

    def test_secondDatagramBypassesWrite(self) -> None:
        """The first datagram to a host goes through C{write}; later ones do not."""
        self.send()
        self.assertEqual(self.protocol.checkedHosts, {"127.0.0.1"})
        self.writeForbidden()
        self.send()
        self.assertEqual(self.socket.sent, [(KDMQ_UDP, ("127.0.0.1", 15062))] * 2)
        self.assertEqual(self.layer.counters["udp.sent"], 2)
        self.assertEqual(self.errors, [])

    def test_hostnameRefusedAndNeverDirect(self) -> None:
        """
        A host name is refused as Twisted refuses it (never resolved), every
        time: it is not remembered as accepted.
        """
        from twisted.internet.error import InvalidAddressError

        for _ in range(2):
            self.send(Address("udp", "example.com", 5060))
        self.assertEqual(len(self.errors), 2)
        self.assertTrue(all(e.check(InvalidAddressError) for e in self.errors))
        self.assertEqual(self.protocol.checkedHosts, set())
        self.assertEqual(self.socket.sent, [])
        self.assertEqual(self.layer.counters["send_errors"], 2)

    def test_fullSendBuffer(self) -> None:
        """
        A full send buffer (EWOULDBLOCK) fails that datagram through
        C{onError}, counted as C{udp.send_buffer_full} and C{send_errors};
        the next datagram goes out.
        """
        self.send()
        self.writeForbidden()
        self.socket.errors = [BlockingIOError(errno.EWOULDBLOCK, "busy")]
        self.send()
        [error] = self.errors
        self.assertTrue(error.check(BlockingIOError))
        self.assertEqual(self.layer.counters["udp.send_buffer_full"], 1)
        self.assertEqual(self.layer.counters["send_errors"], 1)
        self.send()
        self.assertEqual(len(self.socket.sent), 2)
        self.assertEqual(self.layer.counters["udp.sent"], 2)

    def test_fullSendBufferOnFirstWrite(self) -> None:
        """EWOULDBLOCK through C{udp.Port.write} is counted the same way."""
        self.socket.errors = [BlockingIOError(errno.EWOULDBLOCK, "busy")]
        self.send()
        [error] = self.errors
        self.assertTrue(error.check(BlockingIOError))
        self.assertEqual(self.layer.counters["udp.send_buffer_full"], 1)
        self.assertEqual(self.protocol.checkedHosts, set())

    def test_interruptedRetried(self) -> None:
        """A send interrupted by a signal (EINTR) is retried: sent once, no error."""
        self.send()
        self.writeForbidden()
        self.socket.errors = [InterruptedError(errno.EINTR, "interrupted"), None]
        self.send()
        self.assertEqual(len(self.socket.sent), 2)
        self.assertEqual(self.errors, [])
        self.assertEqual(self.layer.counters["udp.sent"], 2)

    def test_refusedIgnored(self) -> None:
        """
        ECONNREFUSED (an earlier datagram was refused) is no failure of this
        one, as in Twisted: counted as sent and as C{udp.send_refused}.
        """
        self.send()
        self.writeForbidden()
        self.socket.errors = [builtins.ConnectionRefusedError(errno.ECONNREFUSED, "refused")]
        self.send()
        self.assertEqual(self.errors, [])
        self.assertEqual(self.layer.counters["udp.send_refused"], 1)
        self.assertEqual(self.layer.counters["udp.sent"], 2)
        self.assertEqual(self.layer.counters["send_errors"], 0)

    def test_messageTooLongForTheSocket(self) -> None:
        """EMSGSIZE fails the datagram with Twisted's L{MessageLengthError}."""
        from twisted.internet.error import MessageLengthError

        self.send()
        self.writeForbidden()
        self.socket.errors = [OSError(errno.EMSGSIZE, "too long")]
        self.send()
        [error] = self.errors
        self.assertTrue(error.check(MessageLengthError))
        self.assertEqual(self.layer.counters["send_errors"], 1)

    def test_otherSocketError(self) -> None:
        """Any other socket error reaches C{onError} as itself, counted once."""
        self.send()
        self.writeForbidden()
        self.socket.errors = [OSError(errno.ENETUNREACH, "Network is unreachable")]
        self.send()
        [error] = self.errors
        value = error.value
        assert isinstance(value, OSError)
        self.assertEqual(value.errno, errno.ENETUNREACH)
        self.assertEqual(self.layer.counters["send_errors"], 1)
        self.assertEqual(self.layer.counters["udp.sent"], 1)

    def test_stoppedPortSendsNothingDirectly(self) -> None:
        """Once the port stops, the direct path is forgotten."""
        self.send()
        self.protocol.doStop()
        self.assertIsNone(self.protocol.sendto)
        self.assertEqual(self.protocol.checkedHosts, set())

    def test_fakeTransportsUseWrite(self) -> None:
        """A transport that is no C{udp.Port} (tests, memory network) gets every write."""
        layer, _, socket = udpLayer()
        for _ in range(3):
            layer.send(KDMQ_UDP, self.destination)
        self.assertIsNone(layer.datagramProtocol().sendto)
        self.assertEqual(len(socket.written), 3)

    def test_responseRoutedAlongAViaSeenBefore(self) -> None:
        """
        The Via heads the parser remembers change nothing: a response goes
        where each Via says, also for a sent-by seen before with other
        parameters (rport, received).
        """
        base = "SIP/2.0/UDP 192.0.2.7:5070"
        self.assertEqual(
            responseDestination(f"{base};branch=z9hG4bKa"), Address("udp", "192.0.2.7", 5070)
        )
        self.assertEqual(
            responseDestination(f"{base};branch=z9hG4bKb;rport=6000;received=192.0.2.9"),
            Address("udp", "192.0.2.9", 6000),
        )
        self.assertEqual(
            responseDestination(f"{base} ;branch=z9hG4bKc"), Address("udp", "192.0.2.7", 5070)
        )
        self.assertRaises(SIPParseError, responseDestination, f"{base};branch=x;;")


class ResponseDestinationShortcutTests(SynchronousTestCase):
    """
    The shortcut L{responseDestination} takes for a Via whose head it has
    met before gives the same address as the full parse, and stays out of
    the way of C{received}, C{rport} and malformed parameters.
    """

    def test_sameAsFullParse(self) -> None:
        """Every form gives the address the full Via parse gives."""
        vias = [
            "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKa",
            "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKb",
            "SIP/2.0/TCP [::1]:5070;branch=z9hG4bKc",
            "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKd;received=10.0.0.2",
            "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKe;RPORT=4000",
            "SIP/2.0/UDP 127.0.0.1:15061",
            "  SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKf  ",
        ]
        for via in vias:
            Via.parse(via)  # remember the head
            parsed = Via.parse(via)
            received = parsed.param("received")
            rport = parsed.param("rport")
            expected = Address(
                parsed.transport.lower(),
                stripBrackets(received or parsed.host),
                int(rport) if rport else parsed.port or 5060,
            )
            self.assertEqual(responseDestination(via), expected, via)

    def test_malformedParametersStillRaise(self) -> None:
        """A known head with a malformed parameter list is refused as before."""
        Via.parse("SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKa")
        for via in ("SIP/2.0/UDP 127.0.0.1:15061;branch=x;;a", "SIP/2.0/UDP 127.0.0.1:15061;=x"):
            self.assertRaises(SIPParseError, responseDestination, via)


# ---------------------------------------------------------------------------
# Receiving into one reused buffer (ReusedBufferUDPPort)


class _Boom(Exception):
    """What a protocol raises from C{datagramReceived} in these tests."""


BOOM_PORT = 666
"""Datagrams from this source port make L{_RecordingDatagrams} raise."""


class _ScriptedSocket:
    """
    A socket whose reads follow C{script}: a C{(data, addr)} datagram or an
    C{OSError} to raise; then EAGAIN. C{recvfrom} and C{recvfrom_into} give
    the same datagrams, cut at the size asked for as the kernel cuts them.
    """

    def __init__(self, script: list[tuple[bytes, Any] | OSError]) -> None:
        self.script = list(script)
        self.reads = 0

    def _next(self) -> tuple[bytes, Any]:
        self.reads += 1
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        data, addr = self._next()
        return data[:size], addr

    def recvfrom_into(self, buffer: bytearray, size: int) -> tuple[int, Any]:
        if size > len(buffer):
            raise ValueError("nbytes is greater than the length of the buffer")
        data, addr = self._next()
        data = data[:size]
        buffer[: len(data)] = data
        return len(data), addr


class _RecordingDatagrams(DatagramProtocol):
    """
    Records what a port hands up: every datagram as the object received and
    a copy of its bytes at that moment, and C{connectionRefused} calls.
    Raises L{_Boom} for datagrams from L{BOOM_PORT}.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.received: list[tuple[bytes, Any]] = []
        self.snapshots: list[bytearray] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []
        self.refused = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        self.snapshots.append(bytearray(datagram))  # a real copy (bytes(b) is b)
        self.events.append(("datagram", type(datagram), bytes(datagram), addr))
        for waiter in [w for w in self.waiters if len(self.received) >= w[0]]:
            self.waiters.remove(waiter)
            waiter[1].callback(None)
        if addr[1] == BOOM_PORT:
            raise _Boom(f"{len(datagram)} bytes")

    def connectionRefused(self) -> None:
        self.refused += 1
        self.events.append(("refused",))

    def waitFor(self, count: int) -> Deferred[None]:
        """Fires once C{count} datagrams in all have arrived."""
        d: Deferred[None] = Deferred()
        if len(self.received) >= count:
            d.callback(None)
        else:
            self.waiters.append((count, d))
        return d

    def assertIntact(self, case: SynchronousTestCase) -> None:
        """Every datagram still holds its bytes and is a distinct bytes object."""
        for (datagram, _), snapshot in zip(self.received, self.snapshots, strict=True):
            case.assertIs(type(datagram), bytes)
            case.assertEqual(datagram, bytes(snapshot))
        nonEmpty = [d for d, _ in self.received if d]  # b"" may be a shared singleton
        case.assertEqual(len({id(d) for d in nonEmpty}), len(nonEmpty))


def _readAll(
    case: SynchronousTestCase,
    portClass: type[udp.Port],
    script: list[tuple[bytes, Any] | OSError],
    *,
    interface: str = "127.0.0.1",
    maxPacketSize: int = 65535,
    maxThroughput: int | None = None,
    connected: bool = False,
) -> tuple[list[tuple[int, int | None]], list[tuple[Any, ...]], int]:
    """
    Call C{doRead} of a C{portClass} over C{script} until it is used up:
    per call the reads made and the errno raised (None: returned); the
    events handed to the protocol; the failures logged.
    """
    protocol = _RecordingDatagrams()
    port = portClass(0, protocol, interface, maxPacketSize, reactor=Clock())
    if maxThroughput is not None:
        port.maxThroughput = maxThroughput
    sock = _ScriptedSocket(script)
    port.socket = sock  # type: ignore[assignment]
    if connected:
        port._connectedAddr = (interface, 9)
    calls: list[tuple[int, int | None]] = []
    while sock.script:
        before = sock.reads
        raised: int | None = None
        try:
            port.doRead()
        except OSError as e:
            raised = e.errno
        calls.append((sock.reads - before, raised))
    protocol.assertIntact(case)
    return calls, protocol.events, len(case.flushLoggedErrors(_Boom))


_ERRNOS = [
    errno.EAGAIN,
    errno.EWOULDBLOCK,
    errno.EINTR,
    errno.ECONNREFUSED,
    errno.ENOBUFS,
    errno.EMSGSIZE,
    errno.ENOMEM,
]


def _datagram(size: int, seed: int, port: int, v6: bool) -> tuple[bytes, Any]:
    data = random.Random(seed).randbytes(size)
    return data, ("::1", port, 0, 0) if v6 else ("127.0.0.1", port)


_scriptItems = st.one_of(
    st.tuples(
        st.sampled_from([0, 1, 2, 999, 1000, 1001, 1472, 8192, 65507, 65535, 70000]),
        st.integers(0, 2**32),
        st.sampled_from([5060, 5060, 5060, BOOM_PORT]),
    ),
    st.sampled_from(_ERRNOS),
)


class ReusedBufferPortSemanticsTests(SynchronousTestCase):
    """
    L{ReusedBufferUDPPort.doRead} does what C{udp.Port.doRead} of the
    installed Twisted does: both run over the same scripted socket and
    their calls, results and logged failures are compared.
    """

    def same(self, script: list[tuple[bytes, Any] | OSError], **kwargs: Any) -> Any:
        theirs = _readAll(self, udp.Port, script, **kwargs)
        ours = _readAll(self, ReusedBufferUDPPort, script, **kwargs)
        self.assertEqual(ours, theirs)
        return ours

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(_scriptItems, max_size=25),
        st.booleans(),
        st.booleans(),
        st.sampled_from([65535, 1000, 8192]),
        st.sampled_from([None, 1, 3000, 70000]),
    )
    def test_sameAsTwisted(
        self,
        items: list[Any],
        v6: bool,
        connected: bool,
        maxPacketSize: int,
        maxThroughput: int | None,
    ) -> None:
        """Any mix of datagrams and errors, IPv4 or IPv6, connected or not."""
        script: list[tuple[bytes, Any] | OSError] = [
            OSError(item, "error")
            if isinstance(item, int)
            else _datagram(item[0], item[1], item[2], v6)
            for item in items
        ]
        self.same(
            script,
            interface="::1" if v6 else "127.0.0.1",
            connected=connected,
            maxPacketSize=maxPacketSize,
            maxThroughput=maxThroughput,
        )

    def test_throughputBound(self) -> None:
        """
        One call reads until at least C{maxThroughput} bytes (256 KiB) are
        read: six 65,535-byte datagrams take two calls, five (four are 4
        bytes short of 256 KiB), then one and the EAGAIN that ends it.
        """
        script: list[tuple[bytes, Any] | OSError] = [
            _datagram(65535, i, 5060, False) for i in range(6)
        ]
        calls, events, _ = self.same(script)
        self.assertEqual(calls, [(5, None), (2, None)])
        self.assertEqual(len(events), 6)
        # exactly at the bound: two 1,000-byte datagrams end a 2,000-byte call
        script = [_datagram(1000, i, 5060, False) for i in range(3)]
        calls, _, _ = self.same(script, maxThroughput=2000)
        self.assertEqual(calls, [(2, None), (2, None)])

    def test_ignoredErrorsEndTheCall(self) -> None:
        """EAGAIN, EWOULDBLOCK and EINTR end the call quietly; the next one goes on."""
        script: list[tuple[bytes, Any] | OSError] = []
        for number in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            script += [_datagram(10, number, 5060, False), OSError(number, "x")]
        calls, events, _ = self.same(script)
        self.assertEqual(calls, [(2, None)] * 3)
        self.assertEqual([e[0] for e in events], ["datagram"] * 3)

    def test_refused(self) -> None:
        """
        ECONNREFUSED ends the call; a connected port also tells its protocol
        (C{connectionRefused}), an unconnected one does not.
        """
        script: list[tuple[bytes, Any] | OSError] = [
            OSError(errno.ECONNREFUSED, "refused"),
            _datagram(5, 1, 5060, False),
        ]
        _, events, _ = self.same(script, connected=True)
        self.assertEqual([e[0] for e in events], ["refused", "datagram"])
        _, events, _ = self.same(script, connected=False)
        self.assertEqual([e[0] for e in events], ["datagram"])

    def test_otherErrorsRaised(self) -> None:
        """Any other socket error is raised to the reactor, as Twisted does."""
        script: list[tuple[bytes, Any] | OSError] = [
            _datagram(5, 1, 5060, False),
            OSError(errno.ENOBUFS, "No buffer space available"),
            _datagram(6, 2, 5060, False),
        ]
        calls, _, _ = self.same(script)
        self.assertEqual(calls, [(2, errno.ENOBUFS), (2, None)])

    def test_protocolErrorLoggedAndNextRead(self) -> None:
        """
        An exception from C{datagramReceived} is logged, and the next
        datagram is read in the same call.
        """
        script: list[tuple[bytes, Any] | OSError] = [
            _datagram(5, 1, BOOM_PORT, False),
            _datagram(6, 2, 5060, False),
        ]
        calls, events, logged = self.same(script)
        self.assertEqual(calls, [(3, None)])
        self.assertEqual([e[2] for e in events], [script[0][0], script[1][0]])  # type: ignore[index]
        self.assertEqual(logged, 1)

    def test_ipv6AddressShortened(self) -> None:
        """An IPv6 source is handed up as (host, port), as Twisted does."""
        _, events, _ = self.same([_datagram(3, 1, 5060, True)], interface="::1")
        self.assertEqual(events[0][3], ("::1", 5060))

    def test_longDatagramCut(self) -> None:
        """A datagram longer than C{maxPacketSize} arrives cut at that size."""
        data, addr = _datagram(1500, 7, 5060, False)
        _, events, _ = self.same([(data, addr)], maxPacketSize=1000)
        self.assertEqual(events, [("datagram", bytes, data[:1000], addr)])

    def test_bufferFollowsMaxPacketSize(self) -> None:
        """
        A C{maxPacketSize} changed after the port was made is followed (as
        C{udp.Port} reads with it each time): the buffer is remade once.
        """
        protocol = _RecordingDatagrams()
        port = ReusedBufferUDPPort(0, protocol, "127.0.0.1", 1000, reactor=Clock())
        data, addr = _datagram(3000, 1, 5060, False)
        port.socket = _ScriptedSocket([(data, addr), (data, addr)])  # type: ignore[assignment]
        port.maxThroughput = 1
        port.doRead()
        port.maxPacketSize = 2000
        port.doRead()
        self.assertEqual([d for d, _ in protocol.received], [data[:1000], data[:2000]])
        self.assertEqual(len(port._readBuffer), 2000)


class ListenUDPTests(SynchronousTestCase):
    """
    L{transportModule.listenUDP} uses L{ReusedBufferUDPPort} only where
    the reactor's own C{listenUDP} would make a C{udp.Port}.
    """

    def test_memoryReactor(self) -> None:
        """An in-memory reactor (no posix reactor) listens its own way."""

        class MemoryUDPReactor(MemoryReactor):
            def __init__(self) -> None:
                super().__init__()
                self.udpPorts: dict[int, tuple[Any, ...]] = {}

            def listenUDP(
                self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
            ) -> Any:
                self.udpPorts[port] = (protocol, interface, maxPacketSize)
                return "listening"

        reactor = MemoryUDPReactor()
        protocol = DatagramProtocol()
        port = listenUDP(
            cast(IReactorUDP, reactor), 5060, protocol, interface="127.0.0.1", maxPacketSize=65535
        )
        self.assertEqual(port, "listening")
        self.assertEqual(reactor.udpPorts, {5060: (protocol, "127.0.0.1", 65535)})

    def test_wrappedReactor(self) -> None:
        """A reactor whose C{listenUDP} is its own (a wrapper) is asked."""
        calls: list[tuple[Any, ...]] = []

        class Wrapper:
            def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
                calls.append((args, kwargs))
                return "listening"

        protocol = DatagramProtocol()
        result = listenUDP(cast(Any, Wrapper()), 5060, protocol, "127.0.0.1", 1000)
        self.assertEqual(result, "listening")
        self.assertEqual(
            calls, [((5060, protocol), {"interface": "127.0.0.1", "maxPacketSize": 1000})]
        )

    def test_posixReactorOverridingListenUDP(self) -> None:
        """A posix reactor that overrides C{listenUDP} keeps its override."""
        from twisted.internet.selectreactor import SelectReactor

        calls: list[int] = []

        class Overriding(SelectReactor):
            def listenUDP(self, port: int, *args: Any, **kwargs: Any) -> Any:
                calls.append(port)
                return "listening"

        reactor = Overriding.__new__(Overriding)  # no waker: only listenUDP is used
        self.assertEqual(listenUDP(reactor, 5070, DatagramProtocol()), "listening")
        self.assertEqual(calls, [5070])


def _forcedReceiveBuffer(port: Any, size: int = 4 * 1024 * 1024) -> int:
    """Ask for a C{size} receive buffer as the node does; the bytes usable."""
    sock = port.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        pass
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def _ipv6Loopback() -> None:
    """Raise C{SkipTest} unless a UDP socket can be bound on ::1."""
    from twisted.trial.unittest import SkipTest

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        raise SkipTest(f"no IPv6 loopback (::1) on this machine: {e}") from e


class ReusedBufferPortRealSocketTests(TestCase):
    """L{ReusedBufferUDPPort} over real sockets, from the global reactor."""

    timeout = 60

    def listen(
        self, interface: str = "127.0.0.1", maxPacketSize: int = 65535
    ) -> tuple[Any, _RecordingDatagrams]:
        from twisted.internet import reactor

        protocol = _RecordingDatagrams()
        port = listenUDP(
            cast(IReactorUDP, reactor), 0, protocol, interface, maxPacketSize=maxPacketSize
        )
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, ReusedBufferUDPPort)
        return port, protocol

    def sender(self, family: int = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return sock

    async def sendAll(
        self,
        sock: socket.socket,
        port: Any,
        protocol: _RecordingDatagrams,
        datagrams: list[bytes],
    ) -> None:
        """
        Send C{datagrams} in windows that fit the port's receive buffer
        (none may be lost), each window read while the next waits.
        """
        window = max(1, _forcedReceiveBuffer(port) // 4)  # Linux reports twice; skb overhead
        destination = port.getHost()
        start = len(protocol.received)
        sent = 0
        while sent < len(datagrams):
            size = 0
            first = sent
            while sent < len(datagrams) and (sent == first or size + len(datagrams[sent]) < window):
                size += len(datagrams[sent])
                sock.sendto(datagrams[sent], (destination.host, destination.port))
                sent += 1
            await protocol.waitFor(start + sent)

    def check(self, protocol: _RecordingDatagrams, datagrams: list[bytes], source: Any) -> None:
        self.assertEqual(len(protocol.received), len(datagrams))
        for index, ((data, addr), expected) in enumerate(zip(protocol.received, datagrams)):
            self.assertIs(type(data), bytes, index)
            self.assertEqual(len(data), len(expected), index)
            self.assertTrue(data == expected, f"datagram {index} of {len(expected)} bytes differs")
            self.assertEqual(addr, source)
        protocol.assertIntact(self)

    def datagrams(self, seed: int, count: int) -> list[bytes]:
        rng = random.Random(seed)
        sizes = [*range(1, 65), 1472, 1473, 8191, 8192, 8193, 65506, 65507]
        sizes += [rng.randint(1, 65507) for _ in range(count)]
        sizes += [rng.randint(1, 1500) for _ in range(count)]
        rng.shuffle(sizes)
        return [rng.randbytes(size) for size in sizes]

    def test_manySizesIntactInOrder(self) -> Deferred[None]:
        """
        Datagrams of 1 to 65,507 bytes (the largest over IPv4) arrive whole,
        in order, each once, as distinct bytes objects that later reads
        leave alone.
        """
        port, protocol = self.listen()
        sock = self.sender()
        datagrams = self.datagrams(1, 300)

        async def run() -> None:
            await self.sendAll(sock, port, protocol, datagrams)
            self.check(protocol, datagrams, sock.getsockname())

        return Deferred.fromCoroutine(run())

    def test_ipv6(self) -> Deferred[None]:
        """Over ::1 as over 127.0.0.1; the source is handed up as (host, port)."""
        _ipv6Loopback()
        port, protocol = self.listen("::1")
        sock = self.sender(socket.AF_INET6)
        datagrams = self.datagrams(2, 50)

        async def run() -> None:
            await self.sendAll(sock, port, protocol, datagrams)
            self.check(protocol, datagrams, sock.getsockname()[:2])

        return Deferred.fromCoroutine(run())

    def test_protocolErrorDoesNotStopThePort(self) -> Deferred[None]:
        """
        A protocol raising from C{datagramReceived} gets the next datagram;
        the failure is logged.
        """
        from twisted.internet import reactor

        protocol = _RecordingDatagrams()
        port: Any = listenUDP(cast(IReactorUDP, reactor), 0, protocol, "127.0.0.1", 65535)
        self.addCleanup(port.stopListening)

        def raising(datagram: bytes, addr: Any) -> None:
            _RecordingDatagrams.datagramReceived(protocol, datagram, addr)
            if datagram == b"boom":
                raise _Boom("boom")

        protocol.datagramReceived = raising  # type: ignore[method-assign]
        sock = self.sender()
        destination = ("127.0.0.1", port.getHost().port)
        sock.sendto(b"boom", destination)

        async def run() -> None:
            await protocol.waitFor(1)
            sock.sendto(b"after", destination)
            await protocol.waitFor(2)
            self.assertEqual([d for d, _ in protocol.received], [b"boom", b"after"])
            self.assertEqual(len(self.flushLoggedErrors(_Boom)), 1)
            self.assertTrue(port.connected)

        return Deferred.fromCoroutine(run())

    def test_longDatagramCutAsBefore(self) -> Deferred[None]:
        """
        With a C{maxPacketSize} below a datagram, this port and Twisted's
        both hand up its first C{maxPacketSize} bytes.
        """
        from twisted.internet import reactor

        ours, ourProtocol = self.listen(maxPacketSize=1000)
        theirProtocol = _RecordingDatagrams()
        theirs = cast(Any, reactor).listenUDP(
            0, theirProtocol, interface="127.0.0.1", maxPacketSize=1000
        )
        self.addCleanup(theirs.stopListening)
        sock = self.sender()
        datagrams = [random.Random(size).randbytes(size) for size in (999, 1000, 1001, 65507)]
        for port in (ours, theirs):
            for datagram in datagrams:
                sock.sendto(datagram, ("127.0.0.1", port.getHost().port))

        async def run() -> None:
            await ourProtocol.waitFor(4)
            await theirProtocol.waitFor(4)
            expected = [d[:1000] for d in datagrams]
            self.assertEqual([d for d, _ in ourProtocol.received], expected)
            self.assertEqual([d for d, _ in theirProtocol.received], expected)

        return Deferred.fromCoroutine(run())

    def test_refusedOnAConnectedPort(self) -> Deferred[None]:
        """
        As Twisted's port does: an ICMP refusal of a connected port's
        datagram, read while a datagram waits, reaches C{connectionRefused};
        the waiting datagram is read next and the port stays open. (Without
        a waiting datagram the epoll reactor sees the error alone and closes
        either port.)
        """
        import time

        from twisted.internet import reactor

        ours, ourProtocol = self.listen()
        theirProtocol = _RecordingDatagrams()
        theirs = cast(Any, reactor).listenUDP(0, theirProtocol, interface="127.0.0.1")
        self.addCleanup(theirs.stopListening)
        for port in (ours, theirs):
            port.stopReading()
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind(("127.0.0.1", 0))
            port.connect("127.0.0.1", peer.getsockname()[1])
            peer.sendto(b"waiting", ("127.0.0.1", port.getHost().port))
            peer.close()
            port.write(b"refused")
        time.sleep(0.05)  # the ICMP error is queued on both sockets
        for port in (ours, theirs):
            port.startReading()

        async def run() -> None:
            await ourProtocol.waitFor(1)
            await theirProtocol.waitFor(1)
            for protocol, port in ((ourProtocol, ours), (theirProtocol, theirs)):
                self.assertEqual([e[0] for e in protocol.events], ["refused", "datagram"])
                self.assertEqual(protocol.received[0][0], b"waiting")
                self.assertTrue(port.connected)

        return Deferred.fromCoroutine(run())

    def test_node(self) -> Deferred[None]:
        """
        A node listens through L{ReusedBufferUDPPort} with a 65,535-byte
        buffer and still enlarges its socket buffers (4 MiB).
        """
        from twisted.internet import reactor

        from dmq_bus.bus.dispatch import BusConfig
        from dmq_bus.service import DMQService, NodeConfig
        from dmq_bus.sip.uri import SIPURI
        from tests.interop.kamailio import allocatePorts

        [number] = allocatePorts(1)
        config = BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{number}"))
        service = DMQService(NodeConfig(bus=config), reactor)
        service.startService()
        port = service._ports[0]
        assert isinstance(port, ReusedBufferUDPPort)
        self.assertEqual(len(port._readBuffer), 65535)
        self.assertEqual(port.maxPacketSize, 65535)
        self.assertGreaterEqual(service.stack.stats()["udp.receive_buffer"], 4 * 1024 * 1024)
        return service.stopService()
