# mypy: disallow-untyped-calls=False
# (twisted.trial's assertions are untyped)
"""
Tests for L{dmq_bus.sip.transaction}: RFC 3261 non-INVITE client and server
transactions, driven on a L{Clock} over an in-memory transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.interfaces import (
    ISIPClient,
    ISIPMessageReceiver,
    ISIPRequestHandler,
    ISIPTransport,
)
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import Request, Response, makeResponse
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.transaction import (
    SWEEP_GRANULARITY,
    TimerPolicy,
    TooManyTransactions,
    TransactionError,
    TransactionLayer,
    TransactionLimits,
    TransactionTimeout,
    TransportFailure,
    _delayUntil,
)

# Captured from Kamailio 5.6.3 (b-ping-032.sip): a notification-peer ping.
PING_UDP = (
    b"KDMQ sip:notification_peer@127.0.0.1:15060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061"
    b";branch=z9hG4bKf0db.17bbd715000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:15060>\r\n"
    b"From: <sip:notification_peer@127.0.0.1:15061>"
    b";tag=7d6d56aac8e1c2a2e3b4a7393705d530-8d87041a\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afd-4328@127.0.0.1\r\n"
    b"Content-Length: 105\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"sip:127.0.0.1:15062;status=active\r\n"
    b"sip:127.0.0.1:15060;status=active\r\n"
    b"sip:127.0.0.1:15061;status=active\r\n"
)

# Captured (c-htable-051.sip): an htable write.
HTABLE_UDP = (
    b"KDMQ sip:htable@127.0.0.1:15062 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061"
    b";branch=z9hG4bK1028.be5f4450000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:15062>\r\n"
    b"From: <sip:htable@127.0.0.1:15061>;tag=7d6d56aac8e1c2a2e3b4a7393705d530-6aa9e7f0\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afe-4331@127.0.0.1\r\n"
    b"Content-Length: 72\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
    b'{"action":2,"htname":"kv","cname":"count","type":0,"intval":42,"mode":1}'
)

# Captured (c-htable-053.sip): Kamailio's answer to HTABLE_UDP.
HTABLE_OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061"
    b";branch=z9hG4bK1028.be5f4450000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:15062>;tag=a32b31e6c6f06a22a3a9930caf67c4c7.1bfcbca4\r\n"
    b"From: <sip:htable@127.0.0.1:15061>;tag=7d6d56aac8e1c2a2e3b4a7393705d530-6aa9e7f0\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afe-4331@127.0.0.1\r\n"
    b"Server: kamailio-dmq-interop\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

# Captured (fake-node-exchanges-udp-025.sip): a ping over TCP.
PING_TCP = (
    b"KDMQ sip:notification_peer@127.0.0.1:25166;transport=tcp SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:25160"
    b";branch=z9hG4bK1825.31b46301000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:25166;transport=tcp>\r\n"
    b"From: <sip:notification_peer@127.0.0.1:25160>"
    b";tag=2aa4aba24b9ff5d4fbc659b8a81f39f5-d80d1b18\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 626893353f5addda-15390@127.0.0.1\r\n"
    b"Content-Length: 119\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"sip:127.0.0.1:25166;transport=tcp;status=active\r\n"
    b"sip:127.0.0.1:25165;status=active\r\n"
    b"sip:127.0.0.1:25160;status=active\r\n"
)

UDP_PEER = Address("udp", "127.0.0.1", 15062)
TCP_PEER = Address("tcp", "127.0.0.1", 25166)
UDP_ORIGIN = Origin(Address("udp", "127.0.0.1", 15061))
TCP_ORIGIN = Origin(Address("tcp", "127.0.0.1", 43007), connection=object())

RFC_SCHEDULE = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]


def parseRequest(data: bytes) -> Request:
    """Parse bytes that hold a request."""
    message = parseMessage(data)
    assert isinstance(message, Request)
    return message


def parseResponse(data: bytes) -> Response:
    """Parse bytes that hold a response."""
    message = parseMessage(data)
    assert isinstance(message, Response)
    return message


def outgoing(data: bytes = HTABLE_UDP) -> Request:
    """A request as the bus hands it to the client side: no Via yet."""
    return parseRequest(data).withHeaders(parseRequest(data).headers.without("Via"))


def answer(sent: bytes, code: int = 200) -> Response:
    """The response a peer sends to the request that went out as C{sent}."""
    return makeResponse(parseRequest(sent).headers, code, toTag="peer-tag")


def withoutHeader(data: bytes, name: str) -> Request:
    """The request in C{data} without header C{name}."""
    request = parseRequest(data)
    return request.withHeaders(request.headers.without(name))


def withHeader(data: bytes, name: str, value: str) -> Request:
    """The request in C{data} with header C{name} set to C{value}."""
    request = parseRequest(data)
    return request.withHeaders(request.headers.replacing(name, value))


@implementer(ISIPTransport)
class RecordingTransport:
    """
    An in-memory transport: records what is sent and replied, with the
    clock's time, and can report send errors (at once, or later).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes, Address]] = []
        self.replies: list[tuple[bytes, Origin, str]] = []
        self.onErrors: list[Callable[[Failure], None] | None] = []
        self.failAtOnce: Exception | None = None

    def send(
        self,
        data: bytes,
        destination: Address,
        onError: Callable[[Failure], None] | None = None,
    ) -> None:
        self.sent.append((self.clock.seconds(), data, destination))
        self.onErrors.append(onError)
        if self.failAtOnce is not None and onError is not None:
            onError(Failure(self.failAtOnce))

    def reply(self, data: bytes, origin: Origin, via: str) -> None:
        self.replies.append((data, origin, via))

    @property
    def sendTimes(self) -> list[float]:
        """When each request was sent."""
        return [when for when, _, _ in self.sent]

    def replied(self) -> list[Response]:
        """Every reply, parsed."""
        return [parseResponse(data) for data, _, _ in self.replies]


@implementer(ISIPRequestHandler)
class RecordingApplication:
    """
    The application above the server transactions: records the requests
    it gets and answers each with what C{answer} returns (by default a
    Deferred that the test fires).
    """

    def __init__(self, answer: Callable[[Request], Any] | None = None) -> None:
        self.received: list[tuple[Request, Origin]] = []
        self.pending: list[Deferred[Response]] = []
        self.answer = answer

    def requestReceived(self, request: Request, origin: Origin) -> Any:
        self.received.append((request, origin))
        if self.answer is not None:
            return self.answer(request)
        d: Deferred[Response] = Deferred()
        self.pending.append(d)
        return d


def ok(request: Request) -> Response:
    """The application's answer to everything: 200 OK with a To-tag."""
    return makeResponse(request.headers, 200, "OK", toTag="app-tag")


class TransactionTestCase(SynchronousTestCase):
    """A layer on a Clock over a L{RecordingTransport}, and helpers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = RecordingTransport(self.clock)
        self.application = RecordingApplication()
        self.layer = self.makeLayer()

    def makeLayer(self, **kwargs: Any) -> TransactionLayer:
        kwargs.setdefault("viaHost", "127.0.0.1")
        kwargs.setdefault("viaPort", 15061)
        return TransactionLayer(self.transport, self.application, self.clock, **kwargs)

    def advanceTo(self, when: float) -> None:
        """
        Move the clock to C{when}, stopping at each scheduled call's exact
        time on the way (no rounding from many small steps).
        """
        clock = self.clock
        while True:
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= when]
            if not due:
                break
            clock.rightNow = max(clock.rightNow, min(due))
            clock.advance(0)
        clock.rightNow = max(clock.rightNow, when)
        clock.advance(0)

    def receive(self, data: bytes | Request | Response, origin: Origin = UDP_ORIGIN) -> None:
        """Hand a message to the layer as a transport would."""
        message = parseMessage(data) if isinstance(data, bytes) else data
        self.layer.messageReceived(message, origin)


class InterfaceTests(TransactionTestCase):
    """What the layer promises to the transports and to the bus."""

    def test_providesInterfaces(self) -> None:
        """The layer is both what transports deliver to and what the bus sends with."""
        self.assertTrue(verifyObject(ISIPClient, self.layer))
        self.assertTrue(verifyObject(ISIPMessageReceiver, self.layer))

    def test_timerPolicyDefaults(self) -> None:
        """The default timers are RFC 3261's: F and J are 32 s, K is 5 s."""
        policy = TimerPolicy()
        self.assertEqual((policy.t1, policy.t2, policy.t4), (0.5, 4.0, 5.0))
        self.assertEqual((policy.timerF, policy.timerJ, policy.timerK), (32.0, 32.0, 5.0))
        self.assertEqual(TimerPolicy(t1=0.1).timerF, 6.4)

    def test_timerPolicyRejectsNonPositive(self) -> None:
        """A zero or negative timer is a configuration error, found at once."""
        for kwargs in ({"t1": 0}, {"t2": -1.0}, {"t4": 0.0}):
            self.assertRaises(ValueError, TimerPolicy, **kwargs)

    def test_limitsDefaultsAndValidation(self) -> None:
        """Limits have documented defaults and refuse non-positive values."""
        limits = TransactionLimits()
        self.assertEqual(limits.maxClientTransactions, 100_000)
        self.assertEqual(limits.maxServerTransactions, 200_000)
        self.assertEqual(limits.serverResponseTimeout, 32.0)
        for name in (
            "maxClientTransactions",
            "maxServerTransactions",
            "serverResponseTimeout",
            "maxCompletedTransactions",
        ):
            self.assertRaises(ValueError, TransactionLimits, **{name: 0})

    def test_errorsAreTransactionErrors(self) -> None:
        """Callers can catch every way a request fails with one exception type."""
        for error in (TransactionTimeout, TransportFailure, TooManyTransactions):
            self.assertTrue(issubclass(error, TransactionError))


class ClientTimerTests(TransactionTestCase):
    """Retransmissions (Timer E) and the timeout (Timer F) of client transactions."""

    def test_udpScheduleWithRFCDefaults(self) -> None:
        """
        An unanswered request over UDP is sent at 0, 0.5, 1.5, 3.5, 7.5,
        11.5, ... 31.5 s, fails with TransactionTimeout at exactly 32 s, and
        nothing is sent after that.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        self.advanceTo(31.95)
        self.assertNoResult(d)
        self.advanceTo(32.0)
        self.failureResultOf(d, TransactionTimeout)
        self.advanceTo(100.0)
        self.assertEqual(self.transport.sendTimes, RFC_SCHEDULE)
        self.assertEqual(len({data for _, data, _ in self.transport.sent}), 1)
        self.assertEqual(self.layer.counters["client.retransmissions"], 10)
        self.assertEqual(self.layer.counters["client.timeouts"], 1)
        self.assertEqual(self.layer.openClientTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_kamailioLikeTimeout(self) -> None:
        """
        With a 5 s timeout (Kamailio's fr_timer set to 5 s) the request is
        sent at 0, 0.5, 1.5 and 3.5 s and fails at exactly 5 s.
        """
        d = self.layer.request(outgoing(), UDP_PEER, timeout=5)
        self.advanceTo(4.95)
        self.assertNoResult(d)
        self.advanceTo(5.0)
        failure = self.failureResultOf(d, TransactionTimeout)
        self.assertIn("5 s", failure.getErrorMessage())
        self.advanceTo(40.0)
        self.assertEqual(self.transport.sendTimes, [0.0, 0.5, 1.5, 3.5])

    def test_timeoutEqualToARetransmissionTime(self) -> None:
        """When the timeout falls on a retransmission time, the timeout wins."""
        d = self.layer.request(outgoing(), UDP_PEER, timeout=3.5)
        self.advanceTo(10.0)
        self.failureResultOf(d, TransactionTimeout)
        self.assertEqual(self.transport.sendTimes, [0.0, 0.5, 1.5])

    def test_reliableTransportNoRetransmissions(self) -> None:
        """Over TCP the request is sent once, and the timeout still fires at 32 s."""
        d = self.layer.request(outgoing(PING_TCP), TCP_PEER)
        self.advanceTo(31.95)
        self.assertNoResult(d)
        self.advanceTo(32.0)
        self.failureResultOf(d, TransactionTimeout)
        self.assertEqual(self.transport.sendTimes, [0.0])

    def test_proceedingRetransmitsEveryT2(self) -> None:
        """
        After a provisional response the request is retransmitted every T2
        (4 s) instead of doubling from T1, and the timeout still fires; the
        provisional response is not a result.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        self.advanceTo(0.2)
        self.receive(answer(self.transport.sent[0][1], 100))
        self.assertNoResult(d)
        self.advanceTo(32.0)
        self.failureResultOf(d, TransactionTimeout)
        self.assertEqual(
            self.transport.sendTimes, [0.0, 0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
        )
        self.assertEqual(self.layer.counters["client.provisional_responses"], 1)

    def test_customPolicy(self) -> None:
        """The schedule follows the configured T1 and T2."""
        self.layer = self.makeLayer(policy=TimerPolicy(t1=0.1, t2=0.4))
        d = self.layer.request(outgoing(), UDP_PEER)
        self.advanceTo(10.0)
        self.failureResultOf(d, TransactionTimeout)
        times = [round(t, 6) for t in self.transport.sendTimes]
        self.assertEqual(times[:6], [0.0, 0.1, 0.3, 0.7, 1.1, 1.5])
        self.assertEqual(times[-1], 6.3)

    def test_nonPositiveTimeoutIsAnError(self) -> None:
        """Asking for a zero timeout is a programming error, raised at once."""
        self.assertRaises(ValueError, self.layer.request, outgoing(), UDP_PEER, 0)
        self.assertEqual(self.transport.sent, [])


class ClientResponseTests(TransactionTestCase):
    """How client transactions match and use responses."""

    def test_finalResponseFiresDeferred(self) -> None:
        """
        The final response is the result of the request, and no
        retransmission follows it.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        self.advanceTo(0.7)
        response = answer(self.transport.sent[0][1])
        self.receive(response)
        self.assertIs(self.successResultOf(d), response)
        self.assertEqual(self.layer.counters["client.completed"], 1)
        self.advanceTo(60.0)
        self.assertEqual(self.transport.sendTimes, [0.0, 0.5])
        self.assertEqual(self.layer.openClientTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_capturedKamailioResponseMatches(self) -> None:
        """A response Kamailio really sent matches the request by its top Via branch."""
        branch = "z9hG4bK1028.be5f4450000000000000000000000000.0"
        self.layer = self.makeLayer(branchSource=lambda: branch)
        d = self.layer.request(outgoing(), UDP_PEER)
        self.receive(HTABLE_OK)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_errorResponseIsAResult(self) -> None:
        """A final error response (here 404) is a result, not a failure."""
        d = self.layer.request(outgoing(), UDP_PEER)
        self.receive(answer(self.transport.sent[0][1], 404))
        self.assertEqual(self.successResultOf(d).code, 404)

    def test_retransmittedFinalResponseAbsorbed(self) -> None:
        """
        Copies of the final response arriving within T4 (5 s) are absorbed
        quietly; after that they are merely counted as unmatched.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        response = answer(self.transport.sent[0][1])
        self.receive(response)
        self.successResultOf(d)
        self.advanceTo(4.9)
        self.receive(response)
        self.assertEqual(self.layer.counters["client.responses_absorbed"], 1)
        self.assertEqual(self.layer.counters["responses.unmatched"], 0)
        self.assertEqual(self.layer.completedClientTransactions, 1)
        self.advanceTo(5.0)
        self.assertEqual(self.layer.completedClientTransactions, 0)
        self.receive(response)
        self.assertEqual(self.layer.counters["responses.unmatched"], 1)

    def test_reliableCompletedForgottenAtOnce(self) -> None:
        """Over TCP no response retransmissions are expected, so nothing is kept (K = 0)."""
        d = self.layer.request(outgoing(PING_TCP), TCP_PEER)
        self.receive(answer(self.transport.sent[0][1]))
        self.successResultOf(d)
        self.assertEqual(self.layer.completedClientTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unmatchedResponseCounted(self) -> None:
        """
        A response for no known transaction, or whose CSeq method differs
        from the request's, is counted and dropped; the real transaction
        carries on.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        self.receive(HTABLE_OK)
        sent = parseRequest(self.transport.sent[0][1])
        otherMethod = makeResponse(sent.headers.replacing("CSeq", "10 OPTIONS"), 200)
        self.receive(otherMethod)
        self.assertEqual(self.layer.counters["responses.unmatched"], 2)
        self.assertNoResult(d)
        self.receive(answer(self.transport.sent[0][1]))
        self.successResultOf(d)

    def test_responseWithoutViaCounted(self) -> None:
        """A response without a Via branch is counted as malformed and dropped."""
        response = parseResponse(HTABLE_OK)
        self.receive(response.__class__(200, "OK", response.headers.without("Via")))
        self.assertEqual(self.layer.counters["responses.malformed"], 1)

    def test_transportErrorFailsAtOnce(self) -> None:
        """
        When the transport reports that it could not send, the request
        fails at once with TransportFailure carrying the cause, and is not
        retransmitted.
        """
        d = self.layer.request(outgoing(), UDP_PEER)
        onError = self.transport.onErrors[0]
        assert onError is not None
        onError(Failure(ConnectionRefusedError("refused")))
        failure = self.failureResultOf(d, TransportFailure)
        self.assertIsInstance(failure.value.failure.value, ConnectionRefusedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advanceTo(40.0)
        self.assertEqual(len(self.transport.sent), 1)
        self.assertEqual(self.layer.counters["client.transport_failures"], 1)
        # a late second report is ignored
        onError(Failure(ConnectionRefusedError("again")))
        self.assertEqual(self.layer.counters["client.transport_failures"], 1)

    def test_transportErrorDuringSend(self) -> None:
        """A transport that reports the error inside send() fails the request at once too."""
        self.transport.failAtOnce = OSError("no route")
        d = self.layer.request(outgoing(), UDP_PEER)
        self.failureResultOf(d, TransportFailure)
        self.assertEqual(self.layer.openClientTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_limitFailsFast(self) -> None:
        """
        At the limit of open client transactions a request fails at once
        with TooManyTransactions and nothing is sent; once one finishes,
        requests go out again.
        """
        self.layer = self.makeLayer(limits=TransactionLimits(maxClientTransactions=2))
        first = self.layer.request(outgoing(), UDP_PEER)
        self.layer.request(outgoing(), UDP_PEER)
        refused = self.layer.request(outgoing(), UDP_PEER)
        self.assertEqual(self.failureResultOf(refused, TooManyTransactions).value.limit, 2)
        self.assertEqual(len(self.transport.sent), 2)
        self.assertEqual(self.layer.counters["client.rejected_limit"], 1)
        self.receive(answer(self.transport.sent[0][1]))
        self.successResultOf(first)
        self.assertNoResult(self.layer.request(outgoing(), UDP_PEER))
        self.assertEqual(len(self.transport.sent), 3)

    def test_cancelStopsRetransmissions(self) -> None:
        """Cancelling the result stops the transaction: no more retransmissions."""
        d = self.layer.request(outgoing(), UDP_PEER)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.advanceTo(40.0)
        self.assertEqual(self.transport.sendTimes, [0.0])
        self.assertEqual(self.layer.openClientTransactions, 0)


class ClientViaTests(TransactionTestCase):
    """The Via header and branch that client transactions add."""

    def test_viaCarriesBranchAndSentBy(self) -> None:
        """
        The request goes out with one new top Via naming the transport, the
        configured sent-by and a z9hG4bK branch; the rest is unchanged.
        """
        request = outgoing()
        self.layer.request(request, UDP_PEER)
        sent = parseRequest(self.transport.sent[0][1])
        via = sent.headers.topVia()
        assert via is not None and via.branch is not None
        self.assertEqual(sent.headers.getAll("Via"), [str(via)])
        self.assertEqual(str(via), f"SIP/2.0/UDP 127.0.0.1:15061;branch={via.branch}")
        self.assertTrue(via.branch.startswith("z9hG4bK"))
        self.assertEqual(sent.headers.without("Via"), request.headers)
        self.assertEqual(sent.body, request.body)
        self.assertEqual(self.transport.sent[0][2], UDP_PEER)

    def test_serializedOnceWithViaFirst(self) -> None:
        """
        The bytes sent are exactly the request serialized with the new Via
        as its first header, and every retransmission repeats them.
        """
        request = outgoing()
        self.layer.request(request, UDP_PEER)
        self.advanceTo(1.5)
        sent = parseRequest(self.transport.sent[0][1])
        via = sent.headers.get("Via")
        assert via is not None
        expected = request.withHeaders(request.headers.prepending("Via", via)).toBytes()
        self.assertEqual([data for _, data, _ in self.transport.sent], [expected] * 3)

    def test_broadcastSharesTheBody(self) -> None:
        """
        Open client transactions keep one copy of a body sent to many nodes,
        not one each: 200 transactions of a 34 kB node list hold less than a
        tenth of 200 copies (about 1.2 kB each beside the shared body), and
        every one still retransmits its whole request.
        """
        import gc
        import tracemalloc

        body = b"sip:127.0.0.1:5060;status=active\r\n" * 1000
        template = outgoing().withHeaders(outgoing().headers.replacing("Content-Length", "0"))
        requests = [
            attrs.evolve(template, body=body, uri=attrs.evolve(template.uri, port=10_000 + i))
            for i in range(200)
        ]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, request in enumerate(requests):
                self.layer.request(request, Address("udp", "127.0.0.1", 10_000 + i))
            self.transport.sent.clear()  # the recording transport's own copies
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(self.layer.openClientTransactions, 200)
        self.assertLess(held, 200 * len(body) / 10)
        self.advanceTo(0.5)
        self.assertEqual(len(self.transport.sent), 200)
        for (_, data, _), request in zip(self.transport.sent, requests):
            sent = parseRequest(data)
            self.assertEqual(sent.body, body)
            self.assertEqual(sent.uri, request.uri)

    def test_viaIPv6Bracketed(self) -> None:
        """An IPv6 sent-by is written in brackets; the transport token is upper case."""
        self.layer = self.makeLayer(viaHost="2001:db8::1", viaPort=5061)
        self.layer.request(outgoing(), Address("tls", "2001:db8::2", 5061))
        sent = parseRequest(self.transport.sent[0][1])
        via = sent.headers.topVia()
        assert via is not None
        self.assertEqual(via.transport, "TLS")
        self.assertEqual((via.host, via.port), ("[2001:db8::1]", 5061))

    def test_branchesUnique(self) -> None:
        """10,000 requests carry 10,000 different branches."""
        branches = set()
        for _ in range(10_000):
            d = self.layer.request(outgoing(), UDP_PEER)
            via = parseRequest(self.transport.sent[-1][1]).headers.topVia()
            assert via is not None and via.branch is not None
            self.assertTrue(via.branch.startswith("z9hG4bK"))
            branches.add(via.branch)
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(len(branches), 10_000)

    def test_branchesDifferAcrossLayers(self) -> None:
        """Two layers (two processes, or a restart) do not reuse each other's branches."""
        self.layer.request(outgoing(), UDP_PEER)
        self.makeLayer().request(outgoing(), UDP_PEER)
        a, b = (parseRequest(data).headers.topVia() for _, data, _ in self.transport.sent)
        assert a is not None and b is not None
        self.assertNotEqual(a.branch, b.branch)

    def test_duplicateBranchRefused(self) -> None:
        """A branch source that repeats itself cannot make two transactions share a branch."""
        self.layer = self.makeLayer(branchSource=lambda: "z9hG4bKsame")
        self.layer.request(outgoing(), UDP_PEER)
        self.failureResultOf(self.layer.request(outgoing(), UDP_PEER), TransactionError)
        self.assertEqual(len(self.transport.sent), 1)


class ServerTransactionTests(TransactionTestCase):
    """Server transactions: every request reaches the application once."""

    def test_retransmissionWhilePendingNotHandedUp(self) -> None:
        """
        While the application works on a request, retransmissions of it are
        absorbed: the application sees the request once.
        """
        self.receive(HTABLE_UDP)
        self.advanceTo(0.5)
        self.receive(HTABLE_UDP)
        self.advanceTo(1.5)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.application.received), 1)
        self.assertEqual(self.transport.replies, [])
        self.assertEqual(self.layer.counters["server.retransmissions_absorbed"], 2)
        self.assertEqual(self.layer.openServerTransactions, 1)

    def test_responseSentWhereTheRequestCameFrom(self) -> None:
        """
        The application's response goes back to the request's origin with
        the request's top Via, exactly once.
        """
        self.receive(HTABLE_UDP)
        request, origin = self.application.received[0]
        self.assertEqual(origin, UDP_ORIGIN)
        response = ok(request)
        self.application.pending[0].callback(response)
        self.assertEqual(
            self.transport.replies,
            [
                (
                    response.toBytes(),
                    UDP_ORIGIN,
                    "SIP/2.0/UDP 127.0.0.1:15061"
                    ";branch=z9hG4bK1028.be5f4450000000000000000000000000.0",
                )
            ],
        )
        self.assertEqual(self.layer.openServerTransactions, 0)
        self.assertEqual(self.layer.completedServerTransactions, 1)

    def test_retransmissionAfterResponseGetsSameBytes(self) -> None:
        """
        A retransmission arriving after the response was sent gets the very
        same bytes again, and the application still sees the request once.
        """
        self.application.answer = ok
        self.receive(HTABLE_UDP)
        self.advanceTo(0.5)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.application.received), 1)
        self.assertEqual(len(self.transport.replies), 2)
        self.assertEqual(self.transport.replies[0], self.transport.replies[1])
        self.assertEqual(self.layer.counters["server.responses_resent"], 1)

    def test_timerJForgetsTheTransaction(self) -> None:
        """
        Over UDP a completed transaction answers retransmissions for 64·T1
        (32 s). After that it is gone, and a request with the same branch is
        a new request: by then its sender gave up on the first one (its own
        timeout is at most 64·T1), so this is a new request that reuses a
        branch, and the application gets it.
        """
        self.application.answer = ok
        self.receive(HTABLE_UDP)
        self.advanceTo(31.9)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.application.received), 1)
        self.advanceTo(32.0)
        self.assertEqual(self.layer.completedServerTransactions, 0)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.application.received), 2)

    def test_reliableTransactionForgottenAtOnce(self) -> None:
        """Over TCP nothing is kept after the response (J = 0): senders never retransmit."""
        self.application.answer = ok
        self.receive(PING_TCP, TCP_ORIGIN)
        self.assertEqual(len(self.transport.replies), 1)
        self.assertIs(self.transport.replies[0][1], TCP_ORIGIN)
        self.assertEqual(self.layer.completedServerTransactions, 0)
        self.assertEqual(self.layer.openServerTransactions, 0)

    def test_synchronousResponse(self) -> None:
        """An application may answer with a Response directly, not a Deferred."""
        self.application.answer = ok
        self.receive(HTABLE_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [200])

    def test_coroutineResponse(self) -> None:
        """An application may answer with a coroutine."""

        async def answer(request: Request) -> Response:
            return await succeed(ok(request))

        self.application.answer = answer
        self.receive(HTABLE_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [200])

    def test_toTagAddedWhenMissing(self) -> None:
        """A response without a To-tag gets one; a response with one keeps it."""
        self.application.answer = lambda request: makeResponse(request.headers, 200)
        self.receive(HTABLE_UDP)
        self.application.answer = ok
        self.receive(PING_UDP)
        untagged, tagged = self.transport.replied()
        toUntagged = untagged.headers.nameAddr("To")
        toTagged = tagged.headers.nameAddr("To")
        assert toUntagged is not None and toTagged is not None
        self.assertTrue(toUntagged.tag)
        self.assertEqual(toTagged.tag, "app-tag")

    def test_sentByIsPartOfTheKey(self) -> None:
        """The same branch from two different senders makes two transactions."""
        self.receive(HTABLE_UDP)
        other = withHeader(
            HTABLE_UDP,
            "Via",
            "SIP/2.0/UDP 127.0.0.1:15063;branch=z9hG4bK1028.be5f4450000000000000000000000000.0",
        )
        self.receive(other)
        self.assertEqual(len(self.application.received), 2)

    def test_keyPartsCannotRunTogether(self) -> None:
        """
        Two senders whose host and branch run together into the same text
        (host C{h} with branch C{z9hG4bKz9hG4bKx}, host C{hz9hG4bK} with
        branch C{z9hG4bKx}) make two transactions, and each retransmission
        is answered with its own response.
        """
        self.application.answer = ok
        first = withHeader(HTABLE_UDP, "Via", "SIP/2.0/UDP h:15061;branch=z9hG4bKz9hG4bKx")
        second = withHeader(HTABLE_UDP, "Via", "SIP/2.0/UDP hz9hG4bK:15061;branch=z9hG4bKx")
        for request in (first, second, first, second):
            self.receive(request)
        self.assertEqual(len(self.application.received), 2)
        branches = [r.headers.get("via") for r in self.transport.replied()]
        self.assertEqual(branches[2:], branches[:2])
        self.assertEqual(self.layer.counters["server.responses_resent"], 2)

    def test_completedKeepsOnlyTheResponse(self) -> None:
        """
        A completed UDP server transaction, kept for Timer J, holds its
        response bytes and a small key, not the request: about 300 bytes
        beside the response here (with a tuple of four parsed objects as its
        key, about 470).
        """
        import gc
        import tracemalloc
        import weakref

        self.application.answer = ok
        request = parseRequest(HTABLE_UDP)
        gone = weakref.ref(request)
        self.receive(request)
        del request
        self.application.received.clear()  # the recording application's own reference
        gc.collect()
        self.assertIsNone(gone(), "the completed transaction keeps the request")
        self.assertEqual(self.layer.completedServerTransactions, 1)

        # a layer whose transport and application keep nothing themselves
        responses = []
        self.transport.reply = lambda data, origin, via: responses.append(len(data))  # type: ignore[method-assign]
        self.application.requestReceived = lambda request, origin: ok(request)  # type: ignore[method-assign]
        layer = self.makeLayer()
        count = 5000
        datas = [
            HTABLE_UDP.replace(b"0000000000000000000000000.0", b"%025d.1" % i) for i in range(count)
        ]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for data in datas:
                layer.messageReceived(parseMessage(data), UDP_ORIGIN)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(layer.completedServerTransactions, count)
        # each response is a bytes object: its length and 33 bytes of header
        besides = (held - sum(responses) - 33 * count) / count
        self.assertLess(besides, 360)

    def test_rfc2543Matching(self) -> None:
        """
        Requests whose branch lacks the z9hG4bK cookie are matched by
        Call-ID, CSeq, From-tag and top Via: a retransmission is absorbed,
        another From-tag is a new request.
        """
        old = withHeader(HTABLE_UDP, "Via", "SIP/2.0/UDP 127.0.0.1:15061;branch=1")
        self.receive(old)
        self.receive(old)
        self.assertEqual(len(self.application.received), 1)
        otherTag = old.withHeaders(
            old.headers.replacing("From", "<sip:htable@127.0.0.1:15061>;tag=other")
        )
        self.receive(otherTag)
        self.assertEqual(len(self.application.received), 2)


class ServerErrorTests(TransactionTestCase):
    """What a server transaction answers when the application fails."""

    def test_handlerExceptionAnswered500(self) -> None:
        """
        An exception in the application is answered 500 Server Internal
        Error and logged, and the next request is served normally.
        """

        def explode(request: Request) -> Response:
            raise ZeroDivisionError("oops")

        self.application.answer = explode
        self.receive(HTABLE_UDP)
        self.application.answer = ok
        self.receive(PING_UDP)
        self.assertEqual(
            [(r.code, r.reason) for r in self.transport.replied()],
            [(500, "Server Internal Error"), (200, "OK")],
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.layer.counters["server.handler_errors"], 1)

    def test_handlerDeferredFailureAnswered500(self) -> None:
        """A Deferred from the application that fails is answered 500 too."""
        self.application.answer = lambda request: fail(ZeroDivisionError("later"))
        self.receive(HTABLE_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [500])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_handlerReturningNonFinalAnswered500(self) -> None:
        """An application answering something other than a final response gets 500."""
        self.application.answer = lambda request: makeResponse(request.headers, 100)
        self.receive(HTABLE_UDP)
        self.application.answer = lambda request: None
        self.receive(PING_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [500, 500])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)

    def test_retransmissionAfter500GetsSame500(self) -> None:
        """The 500 is stored like any response: a retransmission gets it again."""
        self.application.answer = lambda request: fail(ZeroDivisionError())
        self.receive(HTABLE_UDP)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.application.received), 1)
        self.assertEqual(self.transport.replies[0][0], self.transport.replies[1][0])
        self.flushLoggedErrors(ZeroDivisionError)

    def test_applicationTooSlow(self) -> None:
        """
        An application that does not answer within serverResponseTimeout
        gets its request answered 500; its late answer is dropped and a
        retransmission gets the 500.
        """
        self.receive(HTABLE_UDP)
        self.advanceTo(31.95)
        self.assertEqual(self.transport.replies, [])
        self.advanceTo(32.0)
        self.assertEqual([r.code for r in self.transport.replied()], [500])
        self.assertEqual(self.layer.counters["server.response_timeouts"], 1)
        request, _ = self.application.received[0]
        self.application.pending[0].callback(ok(request))
        self.assertEqual(self.layer.counters["server.late_responses"], 1)
        self.receive(HTABLE_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [500, 500])

    def test_noApplicationYet(self) -> None:
        """Before the application is attached, requests are answered 503."""
        self.layer.handler = None
        self.receive(HTABLE_UDP)
        self.assertEqual([r.code for r in self.transport.replied()], [503])
        self.layer.handler = self.application
        self.receive(PING_UDP)
        self.assertEqual(len(self.application.received), 1)


class ServerValidationTests(TransactionTestCase):
    """Requests the layer answers or drops without bothering the application."""

    def assertRejected(self, request: Request, code: int, reason: str) -> None:
        self.transport.replies.clear()
        self.receive(request)
        self.assertEqual([(r.code, r.reason) for r in self.transport.replied()], [(code, reason)])
        self.assertEqual(self.application.received, [])

    def test_missingCallID(self) -> None:
        """A request without Call-ID is answered 400 Missing Call-ID."""
        self.assertRejected(withoutHeader(HTABLE_UDP, "Call-ID"), 400, "Missing Call-ID")
        self.assertEqual(self.layer.counters["requests.rejected"], 1)

    def test_missingMandatoryHeaders(self) -> None:
        """Each missing mandatory header is named in the 400's reason."""
        for name in ("From", "To", "CSeq"):
            self.assertRejected(withoutHeader(HTABLE_UDP, name), 400, f"Missing {name}")

    def test_badCSeq(self) -> None:
        """A malformed CSeq, or one naming another method, is answered 400."""
        self.assertRejected(withHeader(HTABLE_UDP, "CSeq", "ten KDMQ"), 400, "Bad CSeq")
        self.assertRejected(
            withHeader(HTABLE_UDP, "CSeq", "10 OPTIONS"), 400, "CSeq method mismatch"
        )

    def test_missingBranch(self) -> None:
        """A top Via without a branch is answered 400."""
        self.assertRejected(
            withHeader(HTABLE_UDP, "Via", "SIP/2.0/UDP 127.0.0.1:15061"),
            400,
            "Missing Via branch",
        )

    def test_maxForwardsZero(self) -> None:
        """A request with Max-Forwards 0 is answered 483 Too Many Hops."""
        self.assertRejected(withHeader(HTABLE_UDP, "Max-Forwards", "0"), 483, "Too Many Hops")

    def test_badMaxForwards(self) -> None:
        """A malformed Max-Forwards is answered 400; a missing one is fine."""
        self.assertRejected(withHeader(HTABLE_UDP, "Max-Forwards", "x"), 400, "Bad Max-Forwards")
        self.receive(withoutHeader(HTABLE_UDP, "Max-Forwards"))
        self.assertEqual(len(self.application.received), 1)

    def test_noViaDropped(self) -> None:
        """A request without Via cannot be answered: it is dropped and counted."""
        self.receive(withoutHeader(HTABLE_UDP, "Via"))
        self.receive(withHeader(HTABLE_UDP, "Via", "garbage"))
        self.assertEqual(self.transport.replies, [])
        self.assertEqual(self.application.received, [])
        self.assertEqual(self.layer.counters["requests.dropped_no_via"], 1)
        self.assertEqual(self.layer.counters["requests.dropped_bad_via"], 1)

    def test_ackDropped(self) -> None:
        """An ACK (meaningless for non-INVITE transactions) is dropped silently."""
        request = parseRequest(HTABLE_UDP)
        ack = Request("ACK", request.uri, request.headers.replacing("CSeq", "10 ACK"))
        self.receive(ack)
        self.assertEqual(self.transport.replies, [])
        self.assertEqual(self.application.received, [])
        self.assertEqual(self.layer.counters["requests.ack_dropped"], 1)

    def test_serverLimit(self) -> None:
        """
        At the limit of requests waiting for the application, a new request
        is answered 503 without reaching the application; retransmissions of
        waiting requests are still absorbed.
        """
        self.layer = self.makeLayer(limits=TransactionLimits(maxServerTransactions=1))
        self.receive(HTABLE_UDP)
        self.application.received.clear()
        self.assertRejected(parseRequest(PING_UDP), 503, "Service Unavailable")
        self.application.received.clear()
        self.transport.replies.clear()
        self.receive(HTABLE_UDP)
        self.assertEqual(self.transport.replies, [])
        self.assertEqual(self.layer.counters["server.rejected_limit"], 1)

    def test_unparseableRequestAnswered(self) -> None:
        """A request the parser refused but could read the headers of gets its status."""
        headers = parseRequest(HTABLE_UDP).headers
        self.layer.unparseableRequest(
            SIPParseError("bad Content-Length", 0, headers, status=400), UDP_ORIGIN
        )
        self.layer.unparseableRequest(SIPParseError("too big", 0, headers, status=413), UDP_ORIGIN)
        self.assertEqual(
            [(r.code, r.reason) for r in self.transport.replied()],
            [(400, "bad Content-Length"), (413, "too big")],
        )
        self.assertEqual(self.transport.replies[0][2], headers.get("Via"))

    def test_unparseableRequestWithoutViaDropped(self) -> None:
        """A refused request without headers or without Via is dropped and counted."""
        self.layer.unparseableRequest(SIPParseError("garbage"), UDP_ORIGIN)
        noVia = parseRequest(HTABLE_UDP).headers.without("Via")
        self.layer.unparseableRequest(SIPParseError("bad", 0, noVia), UDP_ORIGIN)
        self.assertEqual(self.transport.replies, [])
        self.assertEqual(self.layer.counters["requests.unparseable_dropped"], 2)


class SharedTimerTests(TransactionTestCase):
    """Timers shared by many transactions stay cheap and still on time."""

    def manyRequests(self, count: int) -> None:
        request = parseRequest(HTABLE_UDP)
        for i in range(count):
            self.receive(
                request.withHeaders(
                    request.headers.replacing(
                        "Via", f"SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK-{i}"
                    )
                )
            )

    def test_oneTimerForManyTransactions(self) -> None:
        """A thousand completed server transactions need one timer, not a thousand."""
        self.application.answer = ok
        self.manyRequests(1000)
        self.assertEqual(self.layer.completedServerTransactions, 1000)
        self.assertLessEqual(len(self.clock.getDelayedCalls()), 2)

    def test_laterTransactionsExpireOnTime(self) -> None:
        """A transaction completed later is forgotten 32 s after it completed, not before."""
        self.application.answer = ok
        self.manyRequests(1)
        self.advanceTo(10.0)
        self.receive(PING_UDP)
        self.advanceTo(32.0)
        self.assertEqual(self.layer.completedServerTransactions, 1)
        self.advanceTo(41.95)
        self.assertEqual(self.layer.completedServerTransactions, 1)
        self.advanceTo(42.0 + SWEEP_GRANULARITY)
        self.assertEqual(self.layer.completedServerTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_completedLimit(self) -> None:
        """
        Beyond maxCompletedTransactions the oldest completed transaction is
        forgotten early (counted): memory stays bounded under any load.
        """
        self.layer = self.makeLayer(limits=TransactionLimits(maxCompletedTransactions=10))
        self.application.answer = ok
        self.manyRequests(15)
        self.assertEqual(self.layer.completedServerTransactions, 10)
        self.assertEqual(self.layer.counters["server.completed_evicted"], 5)


class RobustnessTests(TransactionTestCase):
    """The layer never lets an error escape into the transports."""

    def test_transportErrorOnReplyContained(self) -> None:
        """
        A transport that raises while replying does not break the layer:
        the error is logged and counted, and the next request is served.
        """
        replies: list[bytes] = []

        def brokenReply(data: bytes, origin: Origin, via: str) -> None:
            replies.append(data)
            if len(replies) == 1:
                raise RuntimeError("socket gone")

        self.transport.reply = brokenReply  # type: ignore[method-assign]
        self.application.answer = ok
        self.receive(HTABLE_UDP)
        self.receive(PING_UDP)
        self.assertEqual(len(replies), 2)
        self.assertEqual(self.layer.counters["errors.internal"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_lateFailureAfterTimeoutLoggedOnly(self) -> None:
        """An application failing after its request was already answered 500 sends nothing more."""
        self.receive(HTABLE_UDP)
        self.advanceTo(32.0)
        self.application.pending[0].errback(ZeroDivisionError("late"))
        self.assertEqual([r.code for r in self.transport.replied()], [500])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class StopTests(TransactionTestCase):
    """Stopping the layer."""

    def test_stopFailsPendingRequests(self) -> None:
        """
        stop() fails every request still waiting with TransactionError (not
        a timeout), cancels every timer, and refuses later requests.
        """
        first = self.layer.request(outgoing(), UDP_PEER)
        second = self.layer.request(outgoing(PING_TCP), TCP_PEER)
        self.application.answer = ok
        self.receive(PING_UDP)
        self.receive(HTABLE_UDP)
        self.assertIsNone(self.successResultOf(self.layer.stop()))
        for d in (first, second):
            failure = self.failureResultOf(d, TransactionError)
            self.assertNotIsInstance(failure.value, TransactionTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(self.layer.request(outgoing(), UDP_PEER), TransactionError)
        self.receive(HTABLE_UDP)
        self.assertEqual(len(self.transport.replies), 2)

    def test_stopWithApplicationWorking(self) -> None:
        """An answer the application gives after stop() is dropped, not sent."""
        self.receive(HTABLE_UDP)
        self.layer.stop()
        request, _ = self.application.received[0]
        self.application.pending[0].callback(ok(request))
        self.assertEqual(self.transport.replies, [])


class LoopbackTests(SynchronousTestCase):
    """Two layers talking to each other through in-memory transports."""

    def test_requestAndResponseRoundTrip(self) -> None:
        """
        A request from one layer reaches the other's application once, even
        when the datagram is duplicated, and its response is the result.
        """
        clock = Clock()
        transportA = RecordingTransport(clock)
        transportB = RecordingTransport(clock)
        application = RecordingApplication(ok)
        a = TransactionLayer(transportA, None, clock, "127.0.0.1", 15061)
        b = TransactionLayer(transportB, application, clock, "127.0.0.1", 15062)
        d = a.request(outgoing(), UDP_PEER)
        _, data, _ = transportA.sent[0]
        b.messageReceived(parseMessage(data), UDP_ORIGIN)
        b.messageReceived(parseMessage(data), UDP_ORIGIN)
        self.assertEqual(len(application.received), 1)
        for reply, _, _ in transportB.replies:
            a.messageReceived(parseMessage(reply), Origin(UDP_PEER))
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(a.counters["client.responses_absorbed"], 1)


class SharedFirstRetransmissionTests(TransactionTestCase):
    """
    The first retransmission of every UDP request is watched by one shared
    timer; each request still goes out again at exactly its own T1.
    """

    def test_staggeredRequestsKeepTheirOwnSchedule(self) -> None:
        """
        Requests sent at 0, 0.1 and 1.7 s and never answered follow the RFC
        schedule each from its own start, exactly.
        """
        starts = [0.0, 0.1, 1.7]
        pending = []
        for start in starts:
            self.advanceTo(start)
            pending.append(self.layer.request(outgoing(), UDP_PEER))
        self.advanceTo(40.0)
        byRequest: dict[bytes, list[float]] = {}
        for when, data, _ in self.transport.sent:
            byRequest.setdefault(data, []).append(round(when, 9))
        self.assertEqual(
            sorted(byRequest.values()),
            [[round(start + t, 9) for t in RFC_SCHEDULE] for start in starts],
        )
        for d in pending:
            self.failureResultOf(d, TransactionTimeout)

    def test_answeredRequestsLeaveNoTimer(self) -> None:
        """
        Many requests answered before T1 share one timer while they wait,
        none is retransmitted, and no timer is left once all are answered.
        """
        ds = [self.layer.request(outgoing(), UDP_PEER) for _ in range(100)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for _, data, _ in list(self.transport.sent):
            self.receive(answer(data))
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # Timer K, shared
        self.advanceTo(0.5)
        self.assertEqual(len(self.transport.sent), 100)

    def test_answeredOldestThenRetransmitYoungest(self) -> None:
        """
        When the oldest waiting request is answered, a younger one is still
        retransmitted at its own T1, not at the oldest one's.
        """
        self.layer.request(outgoing(), UDP_PEER)
        self.advanceTo(0.3)
        self.layer.request(outgoing(), UDP_PEER)
        self.receive(answer(self.transport.sent[0][1]))
        self.advanceTo(0.79)
        self.assertEqual(len(self.transport.sent), 2)
        self.advanceTo(0.8)
        self.assertEqual(self.transport.sendTimes, [0.0, 0.3, 0.8])

    def test_requestStartedWhileRetransmitting(self) -> None:
        """
        A request started from within a retransmission (a failing send
        whose errback sends again) gets its own T1, and one timer waits.
        """
        later: list[Deferred[Response]] = []

        def again(_: Failure) -> None:
            later.append(self.layer.request(outgoing(), UDP_PEER))

        self.layer.request(outgoing(), UDP_PEER).addErrback(again)
        self.advanceTo(0.4)
        self.transport.failAtOnce = OSError("no route")
        self.advanceTo(0.5)
        self.transport.failAtOnce = None
        self.assertEqual(len(later), 1)
        self.failureResultOf(later[0], TransportFailure)
        self.assertEqual(self.layer.openClientTransactions, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delayNeverOvershoots(self) -> None:
        """
        The shared timer is armed with a delay that lands on the deadline
        or just before it, never after, whatever the rounding.
        """
        for now, deadline in [(0.5, 1.7), (0.1, 0.6), (3.3, 1e9 + 0.1), (0.7, 0.7), (2.0, 1.0)]:
            delay = _delayUntil(now, deadline)
            self.assertGreaterEqual(delay, 0.0)
            self.assertLessEqual(now + delay, max(deadline, now))


class StrictClock(Clock):
    """A Clock that, like a real reactor, refuses negative delays."""

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        assert delay >= 0, f"negative delay {delay}"
        return super().callLater(delay, callable, *args, **kw)


class LateTimerTests(TransactionTestCase):
    """Timers that fire late, as they do on a loaded machine."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = StrictClock()
        self.transport = RecordingTransport(self.clock)
        self.layer = self.makeLayer()

    def test_lateRetransmissionStillTimesOut(self) -> None:
        """
        When the process is busy and Timer E fires after the transaction's
        deadline has passed, the transaction still fails with a timeout at
        once; it is never left waiting forever (a real reactor refuses the
        negative delay that used to be computed).
        """
        d = self.layer.request(outgoing(), UDP_PEER, timeout=1.0)
        self.clock.advance(5.0)
        self.clock.advance(0)
        self.failureResultOf(d, TransactionTimeout)
        self.assertEqual(self.layer.openClientTransactions, 0)
