"""
C{GET /events}: membership changes as Server-Sent Events. The exact event
format, order, heartbeats on a clock, the per-client backlog limit for
slow clients, the client limit, clean-up on disconnect, and a real HTTP
client on 127.0.0.1 reading the stream (and C{/metrics}).
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IResponse
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from dmq_bus.bus.nodelist import parseNodeLines
from dmq_bus.bus.values import NodeStatus
from dmq_bus.control import (
    HEARTBEAT_INTERVAL,
    MAX_EVENT_BACKLOG,
    MAX_EVENT_CLIENTS,
    ControlAPI,
    ControlService,
    EventClient,
    EventsResource,
    MembershipEvents,
)
from dmq_bus.sip.uri import SIPURI

from .test_control import makeBus
from .test_metrics import parse


class StreamRequest(DummyRequest):
    """A DummyRequest that keeps a push producer (DummyRequest pulls) and can be cut."""

    def __init__(self) -> None:
        super().__init__([b"events"])
        self.producer: Any = None
        self.cut = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        """The connection closes: the client is gone."""
        self.cut = True
        self.processingFailed(Failure(ConnectionDone()))

    def text(self) -> str:
        return b"".join(self.written).decode()


def events(text: str) -> list[dict[str, Any]]:
    """The events of a stream's text: their fields, C{data} decoded."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
        if fields:
            found.append(fields)
    return found


class StreamTests(SynchronousTestCase):
    """The event stream of node 27132 of a joined 2-node in-memory bus."""

    def setUp(self) -> None:
        self.network, self.nodes = makeBus(2)
        self.bus = self.nodes[0].bus
        self.clock = self.network.clock
        self.stream = MembershipEvents(self.bus.addMembershipObserver, self.clock, maxBacklog=5)
        self.other = self.bus.nodes()[0]

    def attach(self) -> StreamRequest:
        request = StreamRequest()
        self.assertIsInstance(self.stream.attach(request), EventClient)  # type: ignore[arg-type]
        return request

    def test_headersAndPreamble(self) -> None:
        """A client gets text/event-stream, no caching, and a first comment at once."""
        request = self.attach()
        headers = request.responseHeaders
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"]
        )
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(request.written, [b": dmq-bus membership events\n\n"])
        self.assertTrue(verifyObject(IPushProducer, request.producer))

    def test_eventFormat(self) -> None:
        """A status change is one event: id, event: membership, JSON data on one line."""
        request = self.attach()
        self.clock.advance(0.5)
        self.bus.nodeList.setStatus(self.other.key, NodeStatus.DISABLED)
        when = self.clock.seconds()
        data = json.dumps(
            {
                "change": "status",
                "node": "sip:127.0.0.1:27133",
                "status": "disabled",
                "previous": "active",
                "time": when,
            },
            separators=(",", ":"),
        )
        self.assertEqual(
            request.written[-1], f"id: 1\nevent: membership\ndata: {data}\n\n".encode()
        )

    def test_everyChangeInOrder(self) -> None:
        """Added, status changes and removal arrive in the order they happened, ids rising."""
        request = self.attach()
        nodeList = self.bus.nodeList
        nodeList.merge(parseNodeLines(b"sip:127.0.0.1:27140;status=pending\r\n"))
        added = nodeList.find(SIPURI.parse("sip:127.0.0.1:27140"))
        assert added is not None
        nodeList.setStatus(added.key, NodeStatus.ACTIVE)
        nodeList.remove(added.key)
        got = events(request.text())
        self.assertEqual([e["id"] for e in got], ["1", "2", "3"])
        self.assertEqual({e["event"] for e in got}, {"membership"})
        self.assertEqual(
            [(e["data"]["change"], e["data"]["status"], e["data"]["previous"]) for e in got],
            [
                ("added", "pending", None),
                ("status", "active", "pending"),
                ("removed", "active", None),
            ],
        )
        self.assertEqual(self.stream.counters["events.sent"], 3)

    def test_rpcChangesAreEvents(self) -> None:
        """dmq.add and dmq.change_status on the control API show up on its own stream."""
        api = ControlAPI(self.bus, None, self.nodes[0].stack.stats)
        request = StreamRequest()
        api.events.attach(request)  # type: ignore[arg-type]
        api.call("dmq.add", ["sip:127.0.0.1:27150"])
        api.call("dmq.change_status", ["sip:127.0.0.1:27150", "disabled"])
        self.assertEqual(
            [(e["data"]["change"], e["data"]["node"]) for e in events(request.text())],
            [("added", "sip:127.0.0.1:27150"), ("status", "sip:127.0.0.1:27150")],
        )

    def test_realFailureIsAnEvent(self) -> None:
        """A node that stops answering reaches the stream as disabled, then removed."""
        request = self.attach()
        self.nodes[1].crash()
        self.network.run(10.0)
        got = [(e["data"]["change"], e["data"]["status"]) for e in events(request.text())]
        self.assertEqual(got, [("status", "disabled"), ("removed", "disabled")])

    def test_heartbeats(self) -> None:
        """Every 15 s of the injected clock each client gets a comment line, nothing else."""
        self.assertEqual(HEARTBEAT_INTERVAL, 15.0)
        clock = Clock()
        stream = MembershipEvents(self.bus.addMembershipObserver, clock)
        request = StreamRequest()
        stream.attach(request)  # type: ignore[arg-type]
        clock.advance(14.9)
        self.assertEqual(len(request.written), 1)
        clock.advance(0.1)
        self.assertEqual(request.written[1:], [b": heartbeat\n\n"])
        clock.pump([15.0, 15.0])
        self.assertEqual(request.written[1:], [b": heartbeat\n\n"] * 3)
        self.assertEqual(events(request.text()), [])

    def test_slowClientQueuedThenFlushed(self) -> None:
        """While the connection is full, events wait; when it drains they follow in order."""
        request = self.attach()
        request.producer.pauseProducing()
        for status in (NodeStatus.DISABLED, NodeStatus.PENDING, NodeStatus.ACTIVE):
            self.bus.nodeList.setStatus(self.other.key, status)
        self.assertEqual(len(request.written), 1)
        self.assertEqual(self.stream.backlog, 3)
        request.producer.resumeProducing()
        self.assertEqual([e["id"] for e in events(request.text())], ["1", "2", "3"])
        self.assertEqual(self.stream.backlog, 0)

    def test_slowClientDropped(self) -> None:
        """
        A client that falls more than maxBacklog writes behind is
        disconnected and counted; a client that keeps up gets everything.
        """
        slow, fast = self.attach(), self.attach()
        slow.producer.pauseProducing()
        statuses = [NodeStatus.DISABLED, NodeStatus.ACTIVE] * 3
        for status in statuses[:5]:
            self.bus.nodeList.setStatus(self.other.key, status)
        self.assertFalse(slow.cut)
        self.bus.nodeList.setStatus(self.other.key, statuses[5])
        self.assertTrue(slow.cut)
        self.assertEqual(self.stream.counters["events.clients_dropped_slow"], 1)
        self.assertEqual((self.stream.clientCount, self.stream.backlog), (1, 0))
        self.assertEqual(len(events(fast.text())), 6)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_defaultLimits(self) -> None:
        """The named limits: 1000 writes of backlog per client, 64 clients."""
        self.assertEqual((MAX_EVENT_BACKLOG, MAX_EVENT_CLIENTS), (1000, 64))
        stream = MembershipEvents(self.bus.addMembershipObserver, self.clock)
        self.assertEqual((stream.maxBacklog, stream.maxClients), (1000, 64))

    def test_disconnectCleansUp(self) -> None:
        """When the last client goes, the stream stops observing the bus and beating."""
        observers = len(self.bus.nodeList._observers)
        request = self.attach()
        self.assertEqual(len(self.bus.nodeList._observers), observers + 1)
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(self.stream.clientCount, 0)
        self.assertEqual(len(self.bus.nodeList._observers), observers)
        self.assertIsNone(request.producer)
        self.clock.advance(60.0)
        self.assertEqual(len(request.written), 1)
        request.producer = None
        self.bus.nodeList.setStatus(self.other.key, NodeStatus.DISABLED)
        self.assertEqual(len(request.written), 1)

    def test_clientLimit(self) -> None:
        """One client over the limit is answered 503 and counted; the others stay."""
        stream = MembershipEvents(self.bus.addMembershipObserver, self.clock, maxClients=2)
        resource = EventsResource(stream)
        for _ in range(2):
            self.assertIsNotNone(stream.attach(StreamRequest()))  # type: ignore[arg-type]
        extra = StreamRequest()
        body = resource.render_GET(extra)  # type: ignore[arg-type]
        self.assertEqual(extra.responseCode, 503)
        self.assertIn(b"at most 2", body)  # type: ignore[operator]
        self.assertEqual(stream.counters["events.clients_refused_limit"], 1)
        self.assertEqual(stream.clientCount, 2)

    def test_close(self) -> None:
        """Closing (the service stops) ends every stream cleanly."""
        request = self.attach()
        self.stream.close()
        self.assertEqual(request.finished, 1)
        self.assertEqual(self.stream.clientCount, 0)


class ReadUntil(Protocol):
    """Collects a response body until C{done(text)} is true, then fires C{finished}."""

    def __init__(self, done: Any) -> None:
        self.done = done
        self.data = b""
        self.finished: Deferred[str] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.finished.called and self.done(self.data.decode()):
            self.finished.callback(self.data.decode())

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.finished.called:
            self.finished.callback(self.data.decode())


class RealHTTPTests(TestCase):
    """The control service on 127.0.0.1, a real HTTP client on /events and /metrics."""

    timeout = 20

    def setUp(self) -> None:
        self.network, self.nodes = makeBus(2)
        self.api = ControlAPI(self.nodes[0].bus, None, self.nodes[0].stack.stats)
        self.service = ControlService(self.api, "tcp:0:interface=127.0.0.1", reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    @inlineCallbacks
    def get(self, path: str) -> Any:
        port = yield self.service.whenListening()
        response: IResponse = yield self.agent.request(
            b"GET", f"http://127.0.0.1:{port.getHost().port}{path}".encode()
        )
        return response

    @inlineCallbacks
    def test_eventsInOrder(self) -> Any:
        """Membership changes made through the API reach an HTTP client, in order, as SSE."""
        response = yield self.get("/events")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"]
        )
        reader = ReadUntil(lambda text: len(events(text)) == 4)
        response.deliverBody(reader)
        self.assertEqual(self.api.events.clientCount, 1)
        uri = "sip:127.0.0.1:27160"
        for method, params in [
            ("dmq.add", [uri]),
            ("dmq.change_status", [uri, "active"]),
            ("dmq.change_status", [uri, "disabled"]),
            ("dmq.remove", [uri]),
        ]:
            yield self.api.call(method, params)
        text = yield reader.finished
        self.assertTrue(text.startswith(": dmq-bus membership events\n\n"))
        got = events(text)
        self.assertEqual([e["id"] for e in got], ["1", "2", "3", "4"])
        self.assertEqual(
            [(e["data"]["change"], e["data"]["status"]) for e in got],
            [
                ("added", "pending"),
                ("status", "active"),
                ("status", "disabled"),
                ("removed", "disabled"),
            ],
        )
        response._transport.stopProducing()  # the client hangs up
        yield self.waitForNoClients()

    @inlineCallbacks
    def waitForNoClients(self) -> Any:
        from twisted.internet.task import deferLater

        for _ in range(200):
            if self.api.events.clientCount == 0:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("the client was not removed")

    @inlineCallbacks
    def test_stopEndsStreams(self) -> Any:
        """Stopping the service ends an open stream: the client sees the response end."""
        response = yield self.get("/events")
        reader = ReadUntil(lambda text: False)
        response.deliverBody(reader)
        yield self.service.stopService()
        text = yield reader.finished
        self.assertEqual(text, ": dmq-bus membership events\n\n")
        self.assertEqual(self.api.events.clientCount, 0)

    @inlineCallbacks
    def test_metricsOverHTTP(self) -> Any:
        """GET /metrics over real HTTP is Prometheus text the real parser reads."""
        response = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        body = yield readBody(response)
        _, samples = parse(body)
        self.assertEqual(samples["dmq_nodes"][(("status", "active"),)], 2)


class ClockTests(SynchronousTestCase):
    """The heartbeat runs on the clock given, only while there are clients."""

    def test_noClientsNoTimer(self) -> None:
        """A stream without clients schedules nothing and observes nothing."""
        clock = Clock()
        subscribed: list[Any] = []

        def subscribe(observer: Any) -> Any:
            subscribed.append(observer)
            return lambda: subscribed.remove(observer)

        stream = MembershipEvents(subscribe, clock, heartbeat=2.0)
        self.assertEqual((clock.getDelayedCalls(), subscribed), ([], []))
        request = StreamRequest()
        stream.attach(request)  # type: ignore[arg-type]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2.0)
        self.assertEqual(request.written[-1], b": heartbeat\n\n")
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual((clock.getDelayedCalls(), subscribed), ([], []))
