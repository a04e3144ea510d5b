"""
The bus on an in-memory network driven by one Clock: joins, convergence,
failure handling, leave, dispatch to peers, and the bytes it sends.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.bus.health import HealthConfig
from dmq_bus.bus.values import (
    BroadcastResult,
    Delivery,
    DeliveryFailed,
    DMQMessage,
    MembershipChange,
    MembershipEvent,
    NodeStatus,
    PeerResponse,
)
from dmq_bus.interfaces import IDMQBus, IDMQPeer, IDMQPeerFactory, ISIPRequestHandler
from dmq_bus.peers.echo import EchoPeer, EchoPeerFactory
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Headers, Request
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import MemoryNetwork, MemoryNode

FAST: dict[str, Any] = {"pingInterval": 1.0, "pingTimeout": 1.0}


@implementer(IDMQPeer)
class RecordingPeer:
    """A peer that records what it gets and answers as told."""

    description = "records messages"

    def __init__(self, channel: str = "app", answer: Any = None) -> None:
        self.channel = channel
        self.messages: list[DMQMessage] = []
        self.joins = 0
        self.answer = answer

    def messageReceived(self, message: DMQMessage) -> Any:
        self.messages.append(message)
        if callable(self.answer):
            return self.answer(message)
        return PeerResponse(200, "OK")

    def busJoined(self) -> None:
        self.joins += 1


def statuses(node: MemoryNode) -> dict[str, str]:
    return node.statuses()


def allActive(nodes: list[MemoryNode]) -> bool:
    expected = {n.uri for n in nodes}
    return all(
        set(n.statuses()) == expected and set(n.statuses().values()) == {"active"} for n in nodes
    )


class InterfaceTests(SynchronousTestCase):
    """The bus and the bundled peers provide the interfaces they claim."""

    def test_verify(self) -> None:
        """The bus, the notification peer and the echo peer and factory verify."""
        network = MemoryNetwork()
        node = network.addNode("127.0.0.1")
        verifyObject(IDMQBus, node.bus)
        verifyObject(ISIPRequestHandler, node.bus)
        verifyObject(IDMQPeer, node.stack.notification)
        verifyObject(IDMQPeer, EchoPeer())
        verifyObject(IDMQPeerFactory, EchoPeerFactory())
        verifyObject(IDMQPeer, RecordingPeer())


class MembershipTests(SynchronousTestCase):
    """Joining, convergence, failures and leaving."""

    def test_joinViaSeed(self) -> None:
        """A node seeded with another lists it active, and is listed active, at once."""
        network = MemoryNetwork()
        seed = network.addNode("127.0.0.1")
        joiner = network.addNode("127.0.0.2", seeds=[seed])
        network.run(0.05)
        self.assertTrue(allActive([seed, joiner]), (statuses(seed), statuses(joiner)))
        entry = seed.bus.findNode(joiner.uri)
        assert entry is not None
        self.assertGreater(entry.lastNotification, 0, "the join itself is a notification")

    def test_threeNodesConverge(self) -> None:
        """
        A third node joining through the seed is learned by the second at
        once, through the seed's rebroadcast (Max-Forwards 2 → 1).
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1")
        b = network.addNode("127.0.0.2", seeds=[a])
        network.run(0.05)
        c = network.addNode("127.0.0.3", seeds=[a])
        network.run(0.05)
        self.assertTrue(allActive([a, b, c]), [statuses(n) for n in (a, b, c)])

    def test_twentyNodesConverge(self) -> None:
        """Twenty nodes started together through one seed all list all twenty active."""
        network = MemoryNetwork()
        seed = network.addNode("127.0.0.1", **FAST)
        nodes = [seed] + [
            network.addNode(f"127.0.0.{i}", seeds=[seed], **FAST) for i in range(2, 21)
        ]
        elapsed = 0.0
        while not allActive(nodes) and elapsed < 10:
            network.run(0.1)
            elapsed += 0.1
        self.assertTrue(allActive(nodes))
        # convergence is bounded by one ping period after the joins
        self.assertLessEqual(elapsed, 1.2)

    def test_crashDisabledThenRemoved(self) -> None:
        """
        A crashed node is marked disabled by every survivor after its ping
        fails, then removed after a ping sent while disabled fails too.
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        c = network.addNode("127.0.0.3", seeds=[a], **FAST)
        network.run(0.1)
        self.assertTrue(allActive([a, b, c]))
        c.crash()
        network.run(2.05)
        self.assertEqual(statuses(a).get(c.uri), "disabled")
        self.assertEqual(statuses(b).get(c.uri), "disabled")
        network.run(2.0)
        self.assertNotIn(c.uri, statuses(a))
        self.assertNotIn(c.uri, statuses(b))
        network.run(5.0)
        self.assertEqual(set(statuses(a)), {a.uri, b.uri}, "no ghost re-add")

    def test_seedOutageAndReturn(self) -> None:
        """
        A seed that dies goes back to pending and is never removed; when it
        comes back on the same address, everybody is active again.
        """
        network = MemoryNetwork()
        seed = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[seed], **FAST)
        c = network.addNode("127.0.0.3", seeds=[seed], **FAST)
        network.run(0.1)
        seed.crash()
        network.run(10.0)
        self.assertEqual(statuses(b).get(seed.uri), "pending")
        self.assertEqual(statuses(c).get(seed.uri), "pending")
        self.assertEqual(statuses(b).get(c.uri), "active")
        back = network.addNode("127.0.0.1", **FAST)
        network.run(2.1)
        self.assertTrue(allActive([back, b, c]), [statuses(n) for n in (back, b, c)])

    def test_gracefulLeaveSeenAtOnce(self) -> None:
        """
        A node that stops announces it: every other node marks it disabled
        within milliseconds, and removes it after its next ping fails.
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        c = network.addNode("127.0.0.3", seeds=[a], **FAST)
        network.run(0.1)
        done = c.stop()
        network.run(0.01)
        self.successResultOf(done)
        self.assertEqual(statuses(a).get(c.uri), "disabled")
        self.assertEqual(statuses(b).get(c.uri), "disabled")
        network.run(3.0)
        self.assertNotIn(c.uri, statuses(a))
        self.assertNotIn(c.uri, statuses(b))

    def test_leavingNodeAnswers503(self) -> None:
        """While leaving, a node answers notifications 503 so nobody revives it."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        network.run(0.1)
        b.stack.notification.leaving = True
        target = a.bus.findNode(b.uri)
        assert target is not None
        d = a.bus.send("notification_peer", target, a.bus.nodeList.body(), "text/plain")
        network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 503)

    def test_ghostNodeNotReadded(self) -> None:
        """
        A dead node removed by one node but still listed active by a slower
        one is not re-added from the slower node's list (Kamailio 5.6.3 does
        re-add it: issue #1840), and the bus settles without it.
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        slow = network.addNode(
            "127.0.0.2", seeds=[a], start=False, pingInterval=1.0, pingTimeout=6.0
        )
        # slow by Kamailio's ping rules: its own health probes would notice in 2.3 s
        slow.stack.notification.configureHealth(HealthConfig(enabled=False))
        slow.stack.start()
        dead = network.addNode("127.0.0.3", seeds=[a], **FAST)
        network.run(0.1)
        self.assertTrue(allActive([a, slow, dead]))
        dead.crash()
        network.run(4.0)
        self.assertNotIn(dead.uri, statuses(a))
        self.assertEqual(statuses(slow).get(dead.uri), "active", "slow node has not noticed yet")
        readded: list[MembershipEvent] = []
        a.bus.addMembershipObserver(
            lambda e: readded.append(e) if e.change is MembershipChange.ADDED else None
        )
        network.run(30.0)
        self.assertEqual(readded, [])
        self.assertNotIn(dead.uri, statuses(slow))
        self.assertGreater(a.bus.counters["nodelist.ghosts_ignored"], 0)

    def test_removedNodeComesBackByItself(self) -> None:
        """
        A removed node that restarts is listed again as soon as it contacts
        the others itself (the hold only stops gossip from re-adding it).
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        c = network.addNode("127.0.0.3", seeds=[a], **FAST)
        network.run(0.1)
        c.crash()
        network.run(6.0)
        self.assertNotIn(c.uri, statuses(a))
        self.assertNotIn(c.uri, statuses(b))
        back = network.addNode("127.0.0.3", seeds=[a], **FAST)
        network.run(1.1)
        self.assertTrue(allActive([a, b, back]), [statuses(n) for n in (a, b, back)])

    def test_rejoinWhenAlone(self) -> None:
        """
        A node whose list shrank to itself joins again through its seed and
        runs its peers' join hooks again.
        """
        network = MemoryNetwork()
        seed = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", **FAST)
        peer = RecordingPeer()
        b.registerPeer(peer)
        network.run(0.1)
        self.assertEqual(peer.joins, 0, "alone and no seed: never joined")
        seed.bus.nodeList.add(b.bus.localNode)  # seed learns b out of band
        network.run(1.1)
        self.assertEqual(peer.joins, 1)
        self.assertEqual(statuses(b).get(seed.uri), "active")

    def test_membershipEvents(self) -> None:
        """Applications see nodes added, becoming active and being removed."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        events: list[MembershipEvent] = []
        a.bus.addMembershipObserver(events.append)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        network.run(0.1)
        b.crash()
        network.run(5.0)
        kinds = [(e.change, e.node.uri.host, e.node.status.word) for e in events]
        self.assertEqual(
            kinds,
            [
                (MembershipChange.ADDED, "127.0.0.2", "active"),
                (MembershipChange.STATUS, "127.0.0.2", "disabled"),
                (MembershipChange.REMOVED, "127.0.0.2", "disabled"),
            ],
        )

    def test_joinHooksRunOnce(self) -> None:
        """A peer's join hook runs once when the node joins, not on every ping."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], start=False, **FAST)
        peer = RecordingPeer()
        b.registerPeer(peer)
        b.stack.start()
        network.run(5.0)
        self.assertEqual(peer.joins, 1)


class DispatchTests(SynchronousTestCase):
    """KDMQ requests reach the right peer exactly once, and answers come back."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.a = self.network.addNode("127.0.0.1", **FAST)
        self.b = self.network.addNode("127.0.0.2", seeds=[self.a], **FAST)
        self.network.run(0.1)

    def nodeB(self) -> Any:
        node = self.a.bus.findNode(self.b.uri)
        assert node is not None
        return node

    def test_sendToPeer(self) -> None:
        """A message sent to a node reaches its peer with the sender identified by From."""
        peer = RecordingPeer(answer=lambda m: PeerResponse(200, "OK", b"pong", "text/x"))
        self.b.registerPeer(peer)
        d = self.a.bus.send("app", self.nodeB(), b"ping", "application/x-test")
        self.network.run(0.01)
        delivery = self.successResultOf(d)
        self.assertIsInstance(delivery, Delivery)
        self.assertEqual(
            (delivery.code, delivery.body, delivery.contentType), (200, b"pong", "text/x")
        )
        (message,) = peer.messages
        self.assertEqual(message.body, b"ping")
        self.assertEqual(message.contentType, "application/x-test")
        self.assertEqual(message.maxForwards, 1)
        self.assertIsNotNone(message.sender)
        self.assertEqual(str(message.sender.uri), self.a.uri)  # type: ignore[union-attr]

    def test_unknownChannel404(self) -> None:
        """A channel nobody registered is answered 404 User Not Found, as Kamailio does."""
        d = self.a.bus.send("nosuchpeer", self.nodeB(), b"x", "text/plain")
        self.network.run(0.01)
        delivery = self.successResultOf(d)
        self.assertEqual((delivery.code, delivery.reason), (404, "User Not Found"))

    def test_peerErrorsBecome500(self) -> None:
        """A peer that raises, or whose Deferred fails, gives 500; the bus keeps serving."""

        def answer(message: DMQMessage) -> Any:
            if message.body == b"raise":
                raise RuntimeError("peer bug")
            if message.body == b"fail":
                return defer.fail(RuntimeError("async peer bug"))
            return PeerResponse()

        self.b.registerPeer(RecordingPeer(answer=answer))
        results = [
            self.a.bus.send("app", self.nodeB(), body, "text/plain")
            for body in (b"raise", b"fail", b"fine")
        ]
        self.network.run(0.01)
        self.assertEqual([self.successResultOf(d).code for d in results], [500, 500, 200])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_slowPeer(self) -> None:
        """A peer answering later through a Deferred is waited for."""
        pending: Deferred[PeerResponse] = Deferred()
        self.b.registerPeer(RecordingPeer(answer=lambda m: pending))
        d = self.a.bus.send("app", self.nodeB(), b"x", "text/plain")
        self.network.run(0.2)
        self.assertNoResult(d)
        pending.callback(PeerResponse(202, "Accepted"))
        self.network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 202)

    def test_retransmissionsHandledOnce(self) -> None:
        """
        With every datagram duplicated and a third of them lost, each message
        reaches the peer exactly once and every send completes.
        """
        peer = RecordingPeer()
        self.b.registerPeer(peer)
        self.network.duplicate = 1.0
        self.network.loss = 0.33
        sends = [self.a.bus.send("app", self.nodeB(), b"%d" % i, "text/plain") for i in range(200)]
        self.network.run(40.0)
        outcomes = [self.successResultOf(d) if d.called else None for d in sends]
        delivered = [o for o in outcomes if isinstance(o, Delivery)]
        self.assertEqual(len(delivered), 200)
        self.assertEqual(
            sorted(m.body for m in peer.messages), sorted(b"%d" % i for i in range(200))
        )

    def test_sendToDeadNodeFails(self) -> None:
        """A message to a node that does not answer fails with DeliveryFailed 408."""
        self.b.crash()
        d = self.a.bus.send("app", self.nodeB(), b"x", "text/plain", timeout=2.0)
        self.network.run(2.1)
        failure = self.failureResultOf(d, DeliveryFailed)
        self.assertEqual(failure.value.code, 408)

    def test_broadcast(self) -> None:
        """A broadcast reaches every active node and reports each outcome."""
        c = self.network.addNode("127.0.0.3", seeds=[self.a], **FAST)
        self.network.run(0.1)
        for node in (self.b, c):
            node.registerPeer(EchoPeer("app"))
        d = self.a.bus.broadcast("app", b"hello", "text/plain")
        self.network.run(0.01)
        result = self.successResultOf(d)
        self.assertIsInstance(result, BroadcastResult)
        self.assertTrue(result.allDelivered)
        self.assertEqual({str(x.node.uri) for x in result.delivered}, {self.b.uri, c.uri})
        excluded = self.a.bus.broadcast("app", b"hello", "text/plain", exclude=self.nodeB())
        self.network.run(0.01)
        self.assertEqual(
            [str(x.node.uri) for x in self.successResultOf(excluded).delivered], [c.uri]
        )

    def test_broadcastNoNodes(self) -> None:
        """A broadcast with nobody to reach fires at once with an empty result."""
        alone = MemoryNetwork().addNode("127.0.0.9")
        self.assertEqual(
            self.successResultOf(alone.bus.broadcast("x", b"", "text/plain")), BroadcastResult()
        )

    def test_duplicateChannelRefused(self) -> None:
        """Two peers cannot share a channel."""
        self.b.registerPeer(RecordingPeer("app"))
        self.assertRaises(ValueError, self.b.registerPeer, RecordingPeer("app"))
        self.b.bus.unregisterPeer("app")
        self.b.registerPeer(RecordingPeer("app"))

    def test_200WithBodyDowngradedForKamailio(self) -> None:
        """
        A 200 with a body on an application channel would be parsed as a node
        list by a Kamailio 5.6.3 sender (and lock it up): for requests not
        sent by dmq-bus it goes out as 202 instead.
        """
        self.b.registerPeer(EchoPeer("app"))
        request = self.a.bus.buildRequest("app", self.nodeB(), b"x", "text/plain", 1)
        kamailioLike = request.withHeaders(
            request.headers.replacing("User-Agent", "kamailio (5.6.3)")
        )
        response = self.b.bus.requestReceived(kamailioLike, None)  # type: ignore[arg-type]
        self.assertEqual(response.code, 202)  # type: ignore[union-attr]
        ours = self.b.bus.requestReceived(request, None)  # type: ignore[arg-type]
        self.assertEqual(ours.code, 200)  # type: ignore[union-attr]

    def test_otherMethods(self) -> None:
        """OPTIONS is answered 200; other methods 405 with Allow."""
        request = self.a.bus.buildRequest("app", self.nodeB(), b"", "text/plain", 1)
        options = self.b.bus.requestReceived(Request("OPTIONS", request.uri, request.headers), None)  # type: ignore[arg-type]
        self.assertEqual(options.code, 200)  # type: ignore[union-attr]
        invite = self.b.bus.requestReceived(Request("MESSAGE", request.uri, request.headers), None)  # type: ignore[arg-type]
        self.assertEqual(invite.code, 405)  # type: ignore[union-attr]
        self.assertEqual(invite.headers.get("Allow"), "KDMQ, OPTIONS")  # type: ignore[union-attr]


# Captured a-join #1: node 15061 joining through 15060 (Kamailio 5.6.3).
KAMAILIO_JOIN = (
    b"KDMQ sip:notification_peer@127.0.0.1:15060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK9fe6.c0dadc05000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:15060>\r\n"
    b"From: <sip:notification_peer@127.0.0.1:15061>;tag=7d6d56aac8e1c2a2e3b4a7393705d530-6438041a\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afc-4326@127.0.0.1\r\n"
    b"Content-Length: 35\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 2\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"sip:127.0.0.1:15061;status=active\r\n"
)


class WireTests(SynchronousTestCase):
    """The bytes the bus puts on the wire."""

    def test_requestLikeKamailio(self) -> None:
        """
        Our join request has Kamailio 5.6.3's exact header order and forms:
        with the same identifiers, branch and User-Agent, the bytes are equal.
        """
        network = MemoryNetwork()
        node = network.addNode("127.0.0.1", 15061, userAgent="kamailio-dmq-interop", start=False)
        seed = node.bus.nodeList.add(
            type(node.bus.localNode).fromURI(parseMessage(KAMAILIO_JOIN).uri)  # type: ignore[union-attr]
        )
        assert seed is not None
        request = node.bus.buildRequest(
            "notification_peer", seed, node.bus.nodeList.body(), "text/plain", 2
        )
        captured = parseMessage(KAMAILIO_JOIN)
        headers = (
            request.headers.replacing("From", captured.headers.get("From") or "")
            .replacing("Call-ID", captured.headers.get("Call-ID") or "")
            .prepending("Via", captured.headers.get("Via") or "")
        )
        self.assertEqual(request.withHeaders(headers).toBytes(), KAMAILIO_JOIN)

    def test_sentJoinBytes(self) -> None:
        """
        The join that leaves a starting node: Max-Forwards 2, text/plain, a
        Via with our address and a z9hG4bK branch, and a body of CRLF lines.
        """
        network = MemoryNetwork()
        sent: list[bytes] = []
        original = network.deliver

        def spy(source: Any, destination: Any, packet: bytes) -> None:
            sent.append(packet)
            original(source, destination, packet)

        network.deliver = spy  # type: ignore[method-assign]
        network.addNode("127.0.0.2", seeds=["sip:127.0.0.1:5060"])
        join = parseMessage(sent[0])
        assert isinstance(join, Request)
        self.assertEqual(str(join.uri), "sip:notification_peer@127.0.0.1:5060")
        self.assertEqual(
            [name for name, _ in join.headers],
            [
                "Via",
                "To",
                "From",
                "CSeq",
                "Call-ID",
                "Content-Length",
                "User-Agent",
                "Max-Forwards",
                "Content-Type",
            ],
        )
        via = join.headers.topVia()
        assert via is not None
        self.assertEqual((via.host, via.port, via.transport), ("127.0.0.2", 5060, "UDP"))
        self.assertTrue((via.branch or "").startswith("z9hG4bK"))
        self.assertEqual(join.headers.get("Max-Forwards"), "2")
        self.assertEqual(join.headers.get("CSeq"), "10 KDMQ")
        self.assertEqual(join.body, b"sip:127.0.0.2:5060;status=active\r\n")
        self.assertIsInstance(join.headers, Headers)


class RequestAddressingTests(SynchronousTestCase):
    """
    The Request-URI, To and From the bus remembers per channel and node
    are those of each request: nothing leaks between channels or nodes.
    """

    def test_eachChannelAndNodeItsOwn(self) -> None:
        """Requests for two channels to two nodes, built twice, name the right ones."""
        network = MemoryNetwork()
        node = network.addNode("127.0.0.1", 15061, start=False)
        local = node.bus.localNode
        others = [
            type(local).fromURI(parseMessage(KAMAILIO_JOIN).uri),  # type: ignore[union-attr]
            type(local).fromURI(SIPURI.parse("sip:127.0.0.9:5070;transport=tcp")),
        ]
        for _ in range(2):
            for channel in ("htable", "app"):
                for other in others:
                    request = node.bus.buildRequest(channel, other, b"x", "text/plain", 1)
                    target = other.channelURI(channel)
                    self.assertEqual(request.uri, target)
                    self.assertEqual(request.headers.get("To"), f"<{target}>")
                    fromValue = request.headers.get("From") or ""
                    self.assertTrue(
                        fromValue.startswith(f"<{local.channelURI(channel)}>;tag="), fromValue
                    )
        tags = {
            node.bus.buildRequest("app", others[0], b"", "text/plain", 1).headers.get("From")
            for _ in range(3)
        }
        self.assertEqual(len(tags), 3)

    def test_countersPerChannelAndCode(self) -> None:
        """Per-channel counters keep their names: out/in requests and responses by code."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        network.run(0.1)
        b.registerPeer(EchoPeer("app"))
        target = a.bus.findNode(b.uri)
        assert target is not None
        for channel in ("app", "app", "nosuch"):
            a.bus.send(channel, target, b"x", "text/plain")
        network.run(0.1)
        self.assertEqual(a.bus.counters["out.requests.app"], 2)
        self.assertEqual(a.bus.counters["out.responses.app.200"], 2)
        self.assertEqual(a.bus.counters["out.requests.nosuch"], 1)
        self.assertEqual(a.bus.counters["out.responses.nosuch.404"], 1)
        self.assertEqual(b.bus.counters["in.requests.app"], 2)
        self.assertEqual(b.bus.counters["in.responses.app.200"], 2)


class StatsTests(SynchronousTestCase):
    """The counters a node reports (dmq.stats)."""

    def test_layersAndPeers(self) -> None:
        """Stats hold every layer's counters, each peer's own counters once, and gauges."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        peer = RecordingPeer()
        peer.counters = Counter({"app.custom": 3})  # type: ignore[attr-defined]
        a.registerPeer(peer)
        network.run(0.1)
        stats = a.stack.stats()
        self.assertEqual(stats["app.custom"], 3)
        self.assertEqual(stats["membership.added"], 1)
        self.assertEqual(stats["nodes.total"], 2)
        self.assertGreater(stats["udp.received"], 0)
        self.assertGreater(stats["client.started"], 0)
        self.assertEqual(stats["transactions.client_open"], 0)
        del b


class RevivalTests(SynchronousTestCase):
    """A node that talks to us is alive, whatever our last ping said."""

    def test_restartedNodeActiveAtOnce(self) -> None:
        """
        A node that left (announced disabled) and restarted within a ping
        interval is active on the others as soon as its join arrives, so
        writes made there reach it (Kamailio 5.6.3 waits for its own ping).
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", pingInterval=30.0, pingTimeout=5.0)
        b = network.addNode("127.0.0.2", seeds=[a], pingInterval=30.0, pingTimeout=5.0)
        network.run(0.1)
        stopped = b.stop()
        network.run(0.01)
        self.successResultOf(stopped)
        self.assertEqual(statuses(a).get(b.uri), "disabled")
        network.addNode("127.0.0.2", seeds=[a], pingInterval=30.0, pingTimeout=5.0)
        network.run(0.05)
        self.assertEqual(statuses(a).get(b.uri), "active")
        self.assertEqual(a.bus.counters["notification.revived_by_request"], 1)

    def test_leavingAnnouncementNotRevival(self) -> None:
        """The leave announcement itself (own line disabled) does not make the node active."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        network.run(0.1)
        b.stack.notification.leave()
        network.run(0.01)
        self.assertEqual(statuses(a).get(b.uri), "disabled")
        self.assertEqual(a.bus.counters["notification.revived_by_request"], 0)

    def test_otherHostCannotRevive(self) -> None:
        """A notification naming a disabled node but sent from another host revives nothing."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", **FAST)
        b = network.addNode("127.0.0.2", seeds=[a], **FAST)
        network.run(0.1)
        entry = a.bus.findNode(b.uri)
        assert entry is not None
        a.bus.nodeList.setStatus(entry.key, NodeStatus.DISABLED)
        forged = b.bus.buildRequest("notification_peer", a.bus.localNode, b"", "text/plain", 1)
        origin = Origin(Address("udp", "127.0.0.9", 5060))
        a.bus.requestReceived(forged, origin)
        self.assertEqual(statuses(a).get(b.uri), "disabled")
