"""
Nothing dmq-bus sends can hurt a real Kamailio 5.6.3 node.

A 5.6.3 node locks up for good on a node-list line it cannot parse (its
node-list lock stays held: every later notification, C{dmq.list_nodes}
and htable replication hangs) and crashes on C{{}} sent to htable
(spec C{kdmq-wire.md} §7). These tests send a real Kamailio node every
kind of body and request dmq-bus produces, each built by dmq-bus's own
code (L{NodeList.body}, the notification peer, the health monitor, the
htable encoders, the bus's answers), over UDP and over TCP, and check
after each that the node still answers C{core.version} and
C{dmq.list_nodes} within the RPC timeout, and that its DMQ still
replicates htable writes to and from a second Kamailio node.

Every bus here is on 127.0.0.0/8; made-up nodes use 127.0.1.x-127.0.3.x,
where nothing listens. Skipped, loudly, only where Kamailio is missing.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.nodelist import NodeList
from dmq_bus.bus.notification import JOIN_MAX_FORWARDS, PING_MAX_FORWARDS, TEXT_PLAIN
from dmq_bus.bus.values import DeliveryFailed, Node, NodeStatus
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.peers.htable import (
    CONTENT_TYPE as HTABLE_TYPE,
)
from dmq_bus.peers.htable import (
    DEFAULT_CHUNK_SIZE,
    HTableLimits,
    HTablePeer,
    TableSpec,
    encodeCell,
    encodeCells,
    encodeDelete,
    encodeRemove,
    encodeSet,
    encodeSetExpire,
    encodeSyncRequest,
    iterChunks,
)
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import SIPURI

from .kamailio import (
    SKIP_REASON,
    KamailioError,
    KamailioNode,
    allocatePorts,
    kamailioAvailable,
    waitFor,
)

log = Logger()

FAKE_ACTIVE = 40
"""How many made-up active IPv4 nodes the big node lists name."""

#: Kamailio log lines that would mean it choked on what we sent
_PARSE_TROUBLE = re.compile(r"(?i)dmq.*(pars|invalid|bad (node|body|status)|malformed)")

_labels = itertools.count(1)


def fakeNodes() -> dict[str, list[Node]]:
    """
    Made-up nodes for a big node list, by what L{NodeList.body} must do
    with them: C{"listed"} nodes must appear, C{"left out"} ones must not.
    """
    listed = [
        Node.fromURI(SIPURI.parse(f"sip:127.0.1.{i}:{5060 + i}"), NodeStatus.ACTIVE)
        for i in range(1, FAKE_ACTIVE + 1)
    ]
    listed.append(Node.fromURI(SIPURI.parse("sip:127.0.2.1:5060;transport=tcp"), NodeStatus.ACTIVE))
    leftOut = [
        Node.fromURI(SIPURI.parse("sip:127.0.3.1:5060"), NodeStatus.PENDING),
        Node.fromURI(SIPURI.parse("sip:127.0.3.2:5060"), NodeStatus.DISABLED),
        Node.fromURI(SIPURI.parse("sip:127.0.3.3:5060"), NodeStatus.TIMEOUT),
    ]
    return {"listed": listed, "left out": leftOut}


HOST_NAME_NODE = Node.fromURI(SIPURI.parse("sip:dmq-peer.invalid:5060"), NodeStatus.ACTIVE)
"""An active node named by host name: a 5.6.3 receiver would resolve it by DNS."""


class _NeverHurt:
    """The scenarios; subclasses choose the transport."""

    transport = "udp"
    timeout = 120
    skip = None if kamailioAvailable() else SKIP_REASON

    # supplied by TestCase
    addCleanup: Any
    assertEqual: Any
    assertIn: Any
    assertNotIn: Any
    assertTrue: Any
    assertGreaterEqual: Any
    assertLessEqual: Any
    assertGreater: Any

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="dmqn-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.k1Port, self.k2Port, self.ourPort, self.otherPort = allocatePorts(4)
        self.kamailios: list[KamailioNode] = []

    # -- the bus

    def address(self, port: int) -> str:
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:127.0.0.1:{port}{suffix}"

    def kamailio(self, port: int, seed: int | None = None) -> KamailioNode:
        node = KamailioNode(port, seed, baseDir=self.base, transport=self.transport)
        self.addCleanup(node.stop)
        node.start()
        self.kamailios.append(node)
        return node

    def dmqBus(
        self,
        port: int,
        seed: int,
        peer: Callable[[DMQService], IDMQPeer] | None = None,
        **busOptions: Any,
    ) -> DMQService:
        config = BusConfig(
            serverAddress=SIPURI.parse(self.address(port)),
            notificationAddresses=(SIPURI.parse(self.address(seed)),),
            **busOptions,
        )
        service = DMQService(NodeConfig(bus=config), reactor)
        if peer is not None:
            made = peer(service)
            service.bus.registerPeer(made)
            stop = getattr(made, "stop", None)
            if callable(stop):
                self.addCleanup(stop)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @staticmethod
    def htablePeer(service: DMQService) -> HTablePeer:
        return HTablePeer(service.bus, reactor, (TableSpec("kv"),))  # type: ignore[arg-type]

    @staticmethod
    def weSee(service: DMQService, port: int) -> str | None:
        for node in service.bus.nodes():
            if node.uri.port == port:
                return node.status.word
        return None

    @staticmethod
    def node(service: DMQService, port: int) -> Node:
        """The entry of our node list for the node on C{port}."""
        return next(n for n in service.bus.nodes() if n.uri.port == port)

    @inlineCallbacks
    def bus(self, peer: Callable[[DMQService], IDMQPeer] | None = None, **busOptions: Any) -> Any:
        """
        Kamailio K1, Kamailio K2 seeded with K1, and a dmq-bus node seeded
        with K1 (its join: Max-Forwards 2), all three active everywhere.
        """
        k1 = self.kamailio(self.k1Port)
        k2 = self.kamailio(self.k2Port, self.k1Port)
        service = self.dmqBus(
            self.ourPort, self.k1Port, self.htablePeer if peer is None else peer, **busOptions
        )
        ours, k1p, k2p = self.ourPort, self.k1Port, self.k2Port

        def everyoneActive() -> bool:
            s1, s2 = k1.nodeStatuses(), k2.nodeStatuses()
            return (
                s1.get(k2p) == "active"
                and s1.get(ours) == "active"
                and s2.get(k1p) == "active"
                and s2.get(ours) == "active"
                and self.weSee(service, k1p) == "active"
                and self.weSee(service, k2p) == "active"
            )

        yield waitFor(everyoneActive, 20, interval=0.2, description="K1, K2 and us all active")
        return k1, k2, service

    # -- the check

    @inlineCallbacks
    def assertUnhurt(self, k1: KamailioNode, k2: KamailioNode, after: str) -> Any:
        """
        K1 (and K2) still run, answer core.version and dmq.list_nodes
        within the RPC timeout, and K1's DMQ replicates an htable set to K2
        and applies one from K2: its node-list lock is free and its DMQ
        workers work.
        """
        label = f"{after}-{next(_labels)}"
        for node in (k1, k2):
            self.assertTrue(node.running, f"Kamailio {node.port} died after {after}")
            try:
                self.assertIn("kamailio", node.rpc("core.version").lower())
                node.listNodes()
            except KamailioError as e:
                raise AssertionError(f"Kamailio {node.port} stuck after {after}: {e}") from e
        k1.htSets(f"from-k1-{label}", label)
        yield waitFor(
            lambda: k2.htGet(f"from-k1-{label}") == label,
            10,
            description=f"K1 replicates to K2 after {after}",
        )
        k2.htSets(f"from-k2-{label}", label)
        yield waitFor(
            lambda: k1.htGet(f"from-k2-{label}") == label,
            10,
            description=f"K1 applies K2's replication after {after}",
        )
        for node in (k1, k2):
            trouble = [
                line
                for line in node.log().splitlines()
                if ("ERROR" in line or "CRITICAL" in line) and _PARSE_TROUBLE.search(line)
            ]
            self.assertEqual(trouble, [], f"Kamailio {node.port} complained after {after}")

    @inlineCallbacks
    def sendAll(
        self, service: DMQService, target: Node, bodies: list[tuple[str, bytes, str, int]]
    ) -> Any:
        """Send each (channel, body, content type, Max-Forwards); their answer codes."""
        codes = []
        for channel, body, contentType, maxForwards in bodies:
            try:
                delivery = yield service.bus.send(
                    channel, target, body, contentType, maxForwards, timeout=10
                )
                codes.append(delivery.code)
            except DeliveryFailed as e:
                codes.append(e.code)
        return codes

    # -- the scenarios

    def bigList(self, service: DMQService, active: int) -> tuple[NodeList, list[Node]]:
        """
        A node list with our node, C{active} made-up active IPv4 nodes, a
        TCP node, and pending, disabled, timed-out and host-name nodes;
        and the nodes its body must leave out.
        """
        nodeList = NodeList(service.bus.nodeList.local)
        fakes = fakeNodes()
        leftOut = [*fakes["left out"], HOST_NAME_NODE]
        for node in [*fakes["listed"][:active], fakes["listed"][-1], *leftOut]:
            nodeList.add(node)
        return nodeList, leftOut

    def checkBody(self, body: bytes, lines: int, leftOut: list[Node]) -> None:
        text = body.decode("ascii")
        self.assertTrue(text.endswith("\r\n"))
        self.assertEqual(text.count("\r\n"), lines)
        self.assertNotIn("\r\n\r\n", text)
        for node in leftOut:
            self.assertNotIn(str(node.uri) + ";", text)

    @inlineCallbacks
    def test_nodeListsWithinKamailiosCeiling(self) -> Any:
        """
        A node list of 20 IPv4 nodes, a TCP node and our own, written by
        NodeList.body() from a list that also holds pending, disabled,
        timed-out and host-name nodes (which it leaves out), sent as a ping
        and as a join (Max-Forwards 2: Kamailio rebroadcasts it to K2):
        Kamailio answers 200 to both, K2 learns the made-up nodes, and
        neither is hurt.
        """
        k1, k2, service = yield self.bus()
        nodeList, leftOut = self.bigList(service, 20)
        body = nodeList.body()
        self.checkBody(body, 22, leftOut)
        log.info("never-hurt: 22-line node-list body of {n} bytes", n=len(body))
        channel = service.bus.config.channel
        target = self.node(service, self.k1Port)
        codes = yield self.sendAll(
            service,
            target,
            [
                (channel, body, TEXT_PLAIN, PING_MAX_FORWARDS),
                (channel, body, TEXT_PLAIN, JOIN_MAX_FORWARDS),
            ],
        )
        self.assertEqual(codes, [200, 200])
        yield waitFor(
            lambda: all(p in k2.nodeStatuses() for p in (5061, 5080)),
            10,
            description="K2 learned the made-up nodes from K1's rebroadcast",
        )
        yield self.assertUnhurt(k1, k2, "node lists within the ceiling")

    @inlineCallbacks
    def test_nodeListsPastKamailiosCeiling(self) -> Any:
        """
        A node list of 40 IPv4 nodes, a TCP node and our own (pending,
        disabled, timed-out and host-name nodes left out), sent as a ping,
        as a join and as a leave announcement (status=disabled). Kamailio
        5.6.3 learns the 41 made-up nodes, and then, past its 1024-byte
        node-list buffer (spec section 2.12, about 28 nodes), can no longer
        build a node list: it answers no notification (we see 408) and
        stops pinging. It still answers core.version and dmq.list_nodes,
        and still replicates htable writes both ways: it is not locked.
        """
        k1, k2, service = yield self.bus()
        nodeList, leftOut = self.bigList(service, FAKE_ACTIVE)
        body = nodeList.body()
        leave = nodeList.body(announce=NodeStatus.DISABLED)
        self.checkBody(body, FAKE_ACTIVE + 2, leftOut)
        self.checkBody(leave, FAKE_ACTIVE + 2, leftOut)
        log.info("never-hurt: 42-line node-list body of {n} bytes", n=len(body))
        channel = service.bus.config.channel
        target = self.node(service, self.k1Port)
        outcomes = []
        for what, payload, maxForwards in (
            ("ping", body, PING_MAX_FORWARDS),
            ("join", body, JOIN_MAX_FORWARDS),
            ("leave", leave, PING_MAX_FORWARDS),
        ):
            try:
                delivery = yield service.bus.send(
                    channel, target, payload, TEXT_PLAIN, maxForwards, timeout=5
                )
                outcomes.append((what, delivery.code))
            except DeliveryFailed as e:
                outcomes.append((what, e.code))
            yield self.assertUnhurt(k1, k2, f"42-node {what}")
        log.info("never-hurt: Kamailio answered the 42-node lists {o}", o=outcomes)
        # 5.6.3 cannot build its answer past ~28 nodes: no 200, only 408s
        self.assertEqual(outcomes, [("ping", 408), ("join", 408), ("leave", 408)])
        self.assertGreaterEqual(len(k1.listNodes()), FAKE_ACTIVE + 4)
        yield waitFor(lambda: k1.nodeStatuses().get(self.ourPort) == "disabled", 10)
        self.assertTrue(
            "could not build notification body" in k1.log()
            or "cannot build_node_string" in k1.log()
        )

    @inlineCallbacks
    def test_ipv6NodeInList(self) -> Any:
        """
        An IPv6 node known to an IPv4 dmq-bus node is left out of the lists
        it sends (an IPv4-only Kamailio 5.6.3 cannot send to [::1] and its
        broadcasts stop at such a node), so the list Kamailio gets is
        answered 200 and hurts nothing.
        """
        k1, k2, service = yield self.bus()
        nodeList = NodeList(service.bus.nodeList.local)
        nodeList.add(Node.fromURI(SIPURI.parse("sip:[::1]:5062"), NodeStatus.ACTIVE))
        body = nodeList.body()
        self.assertNotIn(b"[::1]", body)
        target = self.node(service, self.k1Port)
        codes = yield self.sendAll(
            service, target, [(service.bus.config.channel, body, TEXT_PLAIN, PING_MAX_FORWARDS)]
        )
        self.assertEqual(codes, [200])
        yield self.assertUnhurt(k1, k2, "IPv6 node line")

    @inlineCallbacks
    def test_joinPingRebroadcastAndLeave(self) -> Any:
        """
        The notification peer's own messages: the join (done by the bus
        set-up, Max-Forwards 2), a ping round, a rebroadcast (a second
        dmq-bus node joins through us, so we send our changed list to K1
        and K2), and the leave announcement (status=disabled) when we stop:
        Kamailio takes each in and is not hurt.
        """
        k1, k2, service = yield self.bus()
        counters = service.bus.counters
        channel = service.bus.config.channel
        yield self.assertUnhurt(k1, k2, "join")
        before = counters[f"out.responses.{channel}.200"]
        service.stack.notification.ping()
        yield waitFor(
            lambda: counters[f"out.responses.{channel}.200"] >= before + 2,
            10,
            description="both Kamailio nodes answered our ping 200",
        )
        yield self.assertUnhurt(k1, k2, "ping")
        other = self.dmqBus(self.otherPort, self.ourPort)
        yield waitFor(
            lambda: (
                counters["notification.rebroadcasts"] >= 1
                and k1.nodeStatuses().get(self.otherPort) is not None
                and k2.nodeStatuses().get(self.otherPort) is not None
            ),
            15,
            description="our rebroadcast told K1 and K2 of the second dmq-bus node",
        )
        yield self.assertUnhurt(k1, k2, "rebroadcast")
        yield other.stopService()
        yield service.stopService()
        self.assertGreaterEqual(counters["notification.leave_sent"], 2)
        yield waitFor(
            lambda: (
                k1.nodeStatuses().get(self.ourPort) == "disabled"
                and k2.nodeStatuses().get(self.ourPort) == "disabled"
            ),
            10,
            description="K1 and K2 took our leave announcement",
        )
        yield self.assertUnhurt(k1, k2, "leave announcement")

    @inlineCallbacks
    def test_healthMessages(self) -> Any:
        """
        Every kind of health message (ping, ping-req, suspect, alive), built
        by the health monitor exactly as it sends them to dmq-bus nodes,
        sent to Kamailio as if it were one: it reads each as a one-line
        node list, answers 200, and is not hurt.
        """
        k1, k2, service = yield self.bus()
        monitor = service.stack.notification.health
        target = self.node(service, self.k1Port)
        about = self.node(service, self.k2Port)
        sent = []
        for kind, subject in (
            ("ping", None),
            ("ping-req", about),
            ("suspect", about),
            ("alive", None),
        ):
            # the monitor's own encoder and sender (it sends only to dmq-bus nodes)
            delivery = yield monitor._send(target, kind, subject, 10)
            sent.append((kind, delivery.code))
        self.assertEqual(sent, [(k, 200) for k in ("ping", "ping-req", "suspect", "alive")])
        yield self.assertUnhurt(k1, k2, "health messages")

    @inlineCallbacks
    def test_everyHtableAction(self) -> Any:
        """
        Every htable body our encoders produce (sets of strings, integers
        and awkward text, set-expire, delete, removes by regex and prefix on
        names and values, sync request, empty sync chunk, a full sync chunk as our
        peer sizes it: 60,000 bytes over UDP, 15,000 over TCP) and the peer's own replication of table
        changes: Kamailio answers 200 to each, applies them, and is not hurt.
        """
        k1, k2, service = yield self.bus()
        peer = next(p for p in service.bus.peers() if p.channel == "htable")
        assert isinstance(peer, HTablePeer)
        table = peer.table("kv")
        assert table is not None
        table.set("p1", 'x\x01\n"\\/\x7f\xe9\u2603')
        table.set("p2", -(2**31), expire=100)
        table.setExpire("p2", 50)
        table.set("p3", "y")
        table.delete("p3")
        table.removeMatching("^q.$")
        table.removeMatching("zz", byValue=True)
        table.removeMatching("r", prefix=True)
        table.removeMatching("s", prefix=True, byValue=True)
        table.set("p9", "last")
        # (kamcmd prints a value holding a newline on two lines: check p9)
        yield waitFor(lambda: k1.htGet("p9") == "last", 10)
        cells = (
            encodeCell("kv", f"chunk:{i:05}", f"value {i} of the big sync chunk", 0)
            for i in range(10_000)
        )
        # the chunk size our peer uses toward this node: 60,000 over UDP,
        # 15,000 over TCP (Kamailio 5.6.3 drops TCP messages over 16 KiB)
        size = HTableLimits().streamChunkSize if self.transport == "tcp" else DEFAULT_CHUNK_SIZE
        chunk = next(iterChunks(cells, size))
        self.assertGreater(len(chunk), size - 1_000)
        self.assertLessEqual(len(chunk), size)
        last = chunk.rsplit(b'"cname":"', 1)[1].split(b'"', 1)[0].decode()
        log.info("never-hurt: sync chunk of {n} bytes, last key {k}", n=len(chunk), k=last)
        bodies = [
            encodeSet("kv", "e1", "plain"),
            encodeSet("kv", "e2", 2**31 - 1),
            encodeSet("kv", "e3", '\x00\x1f"\\ é ☃ \U0001f600'),
            encodeSet("kv", "e4", ""),
            encodeSetExpire("kv", "e1", 3600),
            encodeDelete("kv", "e4"),
            encodeDelete("kv", "never-there"),
            encodeRemove("kv", "^nothing[0-9]+$"),
            encodeRemove("kv", "nothing", byValue=True),
            encodeRemove("kv", "nothing:", prefix=True),
            encodeRemove("kv", "nothing:", prefix=True, byValue=True),
            encodeSyncRequest(),
            encodeCells([]),
            encodeCells([encodeCell("kv", "c1", "v", 0), encodeCell("kv", "c2", 9, 0)]),
            chunk,
        ]
        target = self.node(service, self.k1Port)
        codes = yield self.sendAll(
            service, target, [("htable", body, HTABLE_TYPE, 1) for body in bodies]
        )
        log.info("never-hurt: htable answers {codes}", codes=codes)
        yield self.assertUnhurt(k1, k2, "htable bodies")
        self.assertEqual(codes, [200] * len(bodies))
        yield waitFor(lambda: k1.htGet(last) is not None, 10, description="big chunk applied")
        self.assertEqual((k1.htGet("e2"), k1.htGet("c2")), (2**31 - 1, 9))
        yield self.assertUnhurt(k1, k2, "htable bodies")

    @inlineCallbacks
    def test_ourAnswersToKamailio(self) -> Any:
        """
        Our answers to Kamailio's own requests: its pings get our 200 with
        a node list of 40 made-up IPv4 nodes, a TCP node and ourselves
        (pending, disabled and timed-out nodes left out), which it reads and
        learns; its htable replication, answered by a peer that returns a
        body, gets 202 instead of 200 (the downgrade that keeps a 5.6.3
        sender from parsing the body as a node list). Kamailio is not hurt.
        """
        # no pings of ours (3600 s) and no early failures (60 s): Kamailio
        # can learn the made-up nodes only from our answers to its pings
        k1, k2, service = yield self.bus(
            peer=lambda _: EchoPeer("htable"), pingInterval=3600, pingTimeout=60
        )
        nodeList = service.bus.nodeList
        fakes = fakeNodes()
        for node in [*fakes["listed"], *fakes["left out"]]:
            nodeList.add(node)
        body = nodeList.body()
        self.assertEqual(len(body.split(b"\r\n")) - 1, FAKE_ACTIVE + 4)  # + K1, K2, us
        counters = service.bus.counters
        channel = service.bus.config.channel
        before = counters[f"in.responses.{channel}.200"]
        yield waitFor(
            lambda: (
                counters[f"in.responses.{channel}.200"] > before
                and all(p in k1.nodeStatuses() for p in (5060 + 1, 5060 + FAKE_ACTIVE))
            ),
            20,
            interval=0.2,
            description="K1 pinged us and learned the made-up nodes from our answer",
        )
        hosts = {n["host"] for n in k1.listNodes()}
        for node in fakes["left out"]:
            self.assertNotIn(node.uri.host, hosts)
        yield self.assertUnhurt(k1, k2, "our answers to its pings")
        k1.htSets("echoed", "value")
        yield waitFor(
            lambda: counters["out.downgraded_200_with_body"] >= 1,
            10,
            description="our echo of Kamailio's htable KDMQ downgraded to 202",
        )
        self.assertGreaterEqual(counters["in.responses.htable.202"], 1)
        self.assertEqual(counters["in.responses.htable.200"], 0)
        yield self.assertUnhurt(k1, k2, "202 answer to its htable KDMQ")


class NeverHurtKamailioUDPTests(_NeverHurt, TestCase):
    """Everything we send reaches Kamailio 5.6.3 over UDP without hurting it."""

    transport = "udp"


class NeverHurtKamailioTCPTests(_NeverHurt, TestCase):
    """Everything we send reaches Kamailio 5.6.3 over TCP without hurting it."""

    transport = "tcp"
