"""
Failure detection between dmq-bus nodes (L{dmq_bus.bus.health}) on the
in-memory network: crashes seen everywhere within 3 s, no live node ever
marked at 5% loss, a probe load per node that does not grow with the bus,
reconvergence after a partition, Kamailio nodes handled as before, and
every knob.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.bus.health import CONTENT_TYPE, HealthConfig, HealthMonitor
from dmq_bus.bus.values import DMQMessage, MembershipChange, MembershipEvent, Node, NodeStatus
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Request
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import Endpoint, MemoryDatagramTransport, MemoryNetwork, MemoryNode

KAMAILIO_SAFE_BODY = re.compile(
    rb"\A(sip:\d{1,3}(\.\d{1,3}){3}:\d{1,5}(;transport=(udp|tcp|tls))?"
    rb";status=(active|disabled|pending|timeout)\r\n)+\Z"
)
"""What Kamailio 5.6.3's node-list parser reads without locking up (spec §2.3)."""

KAMAILIO_AGENT = "kamailio (5.6.3 (x86_64/linux))"


def addNode(
    network: MemoryNetwork,
    host: str,
    seeds: list[MemoryNode] | None = None,
    health: HealthConfig | None = None,
    **busOptions: Any,
) -> MemoryNode:
    """A node with default settings unless told, health configured before it starts."""
    node = network.addNode(host, seeds=seeds or [], start=False, **busOptions)
    if health is not None:
        node.stack.notification.configureHealth(health)
    node.stack.start()
    return node


def bus(
    size: int, network: MemoryNetwork | None = None, settle: float = 15.0, **options: Any
) -> tuple[MemoryNetwork, list[MemoryNode]]:
    """C{size} nodes joined through the first; run C{settle} seconds."""
    network = network if network is not None else MemoryNetwork()
    first = addNode(network, "127.0.0.1", **options)
    nodes = [first] + [
        addNode(network, f"127.0.{i // 250}.{i % 250 + 1}", [first], **options)
        for i in range(1, size)
    ]
    network.run(settle)
    return network, nodes


def sentBy(node: MemoryNode) -> int:
    """Datagrams the node has sent so far."""
    transport = node.protocol.transport
    assert isinstance(transport, MemoryDatagramTransport)
    return transport.sent


def monitor(node: MemoryNode) -> HealthMonitor:
    return node.stack.notification.health


def allActive(nodes: list[MemoryNode]) -> bool:
    expected = {n.uri for n in nodes}
    return all(
        set(n.statuses()) == expected and set(n.statuses().values()) == {"active"} for n in nodes
    )


def untilMarked(
    network: MemoryNetwork, survivors: list[MemoryNode], victim: MemoryNode, limit: float
) -> dict[str, float]:
    """Run until every survivor lists C{victim} other than active; seconds each took."""
    start = network.clock.seconds()
    seen: dict[str, float] = {}
    while len(seen) < len(survivors) and network.clock.seconds() - start < limit:
        network.run(0.01)
        for node in survivors:
            if node.uri not in seen and node.statuses().get(victim.uri) != "active":
                seen[node.uri] = network.clock.seconds() - start
    return seen


def cutLink(network: MemoryNetwork, a: MemoryNode, b: MemoryNode) -> None:
    """Lose every datagram between C{a} and C{b} (and only those)."""
    deliver = network.deliver
    cut = {a.endpoint, b.endpoint}

    def filtered(source: Endpoint, destination: Endpoint, packet: bytes) -> None:
        if {source, destination} == cut:
            network.dropped += 1
            return
        deliver(source, destination, packet)

    network.deliver = filtered  # type: ignore[method-assign]


def near(actual: float, expected: float, within: float = 0.003) -> bool:
    return abs(actual - expected) <= within


def healthRequests(node: MemoryNode) -> int:
    """Health messages this node received."""
    return sum(v for k, v in monitor(node).counters.items() if k.startswith("health.in."))


def recordStatus(node: MemoryNode, into: list[tuple[float, str, str]]) -> Callable[[], None]:
    clock = node.network.clock

    def seen(event: MembershipEvent) -> None:
        if event.change is MembershipChange.STATUS:
            into.append((clock.seconds(), str(event.node.uri), event.node.status.word))
        elif event.change is MembershipChange.REMOVED:
            into.append((clock.seconds(), str(event.node.uri), "removed"))

    return node.bus.addMembershipObserver(seen)


class DetectionTests(SynchronousTestCase):
    """A crashed dmq-bus node is seen by every survivor within 3 s at the defaults."""

    def assertDetected(self, size: int, victims: list[int], phases: list[float]) -> list[float]:
        network, nodes = bus(size)
        self.assertTrue(allActive(nodes))
        worst = []
        alive = list(nodes)
        for index, phase in zip(victims, phases):
            victim = nodes[index]
            network.run(phase)
            victim.crash()
            alive.remove(victim)
            seen = untilMarked(network, alive, victim, 5.0)
            self.assertEqual(set(seen), {n.uri for n in alive}, f"not everybody saw {victim.uri}")
            worst.append(max(seen.values()))
            self.assertLessEqual(max(seen.values()), 3.0)
            expected = "pending" if index == 0 else "disabled"
            self.assertEqual({n.statuses()[victim.uri] for n in alive}, {expected})
            network.run(15.0)
            for n in alive:
                if index == 0:
                    self.assertEqual(n.statuses()[victim.uri], "pending", "a seed stays")
                else:
                    self.assertNotIn(victim.uri, n.statuses(), "removed by the Kamailio rule")
        return worst

    def test_fiveNodes(self) -> None:
        """
        In a bus of 5 dmq-bus nodes with default settings, a crashed node is
        marked disabled by every survivor within 3 s, whatever the moment of
        the crash within the probe interval, and removed after one more
        failed ping; a crashed seed goes back to pending at once instead.
        """
        worst = self.assertDetected(5, [3, 1, 0], [0.0, 0.17, 0.33])
        self.assertLessEqual(max(worst), HealthConfig().detectionBound + 0.05)

    def test_twentyNodes(self) -> None:
        """The same with 20 nodes: every one of 19 survivors sees the crash within 3 s."""
        self.assertDetected(20, [7, 15, 2], [0.0, 0.21, 0.42])

    def test_concurrentJoinsWithJitter(self) -> None:
        """
        Nodes joining at once over a network with delivery jitter (as real
        processes started together do) each learn that every other runs
        dmq-bus, whichever greets first, so that every survivor sees a crash
        within 3 s; before greetings' answers counted, some node never
        heard of some other's probes and fell back to ping timing (~10 s).
        """
        for seed in range(10):
            network = MemoryNetwork(jitter=0.01, seed=seed)
            first = addNode(network, "127.0.0.1")
            nodes = [first] + [addNode(network, f"127.0.0.{i}", [first]) for i in range(2, 7)]
            network.run(1.0)
            for node in nodes:
                nodeList = node.bus.nodeList
                unknown = [str(o.uri) for o in nodeList.others() if not nodeList.isDMQBus(o.key)]
                self.assertEqual(unknown, [], f"seed {seed}: {node.uri} does not know")
            victim = nodes[seed % 5 + 1]
            victim.crash()
            alive = [n for n in nodes if n is not victim]
            seen = untilMarked(network, alive, victim, 5.0)
            self.assertEqual(set(seen), {n.uri for n in alive}, f"seed {seed}: not everybody saw")
            self.assertLessEqual(max(seen.values()), 3.0, f"seed {seed}")

    def test_passiveNodeSkippedOver(self) -> None:
        """
        A dmq-bus node with its probes off answers pings "passive": the node
        before it in the ring then probes the node after it too, so that a
        crash of that node is still seen by the probing survivors within
        3 s (and by the passive node through its own pings, as Kamailio).
        """
        network = MemoryNetwork()
        first = addNode(network, "127.0.0.1")
        nodes = [first] + [
            addNode(
                network,
                f"127.0.0.{i}",
                [first],
                health=HealthConfig(enabled=False) if i == 3 else None,
            )
            for i in range(2, 6)
        ]
        network.run(15.0)
        self.assertTrue(allActive(nodes))
        passive, victim = nodes[2], nodes[3]
        self.assertEqual(
            [str(n.uri) for n in monitor(nodes[1]).targets()], [passive.uri, victim.uri]
        )
        victim.crash()
        probing = [n for n in nodes if n not in (passive, victim)]
        seen = untilMarked(network, probing, victim, 5.0)
        self.assertEqual(len(seen), len(probing))
        self.assertLessEqual(max(seen.values()), 3.0)
        self.assertIn(passive.uri, untilMarked(network, [passive], victim, 10.0))

    def test_withoutHealthKamailioTiming(self) -> None:
        """
        With health probes off, a crash is detected as Kamailio 5.6.3 does
        (ping interval + ping timeout: 5-10 s with the defaults): the
        probes are what make dmq-bus nodes fast.
        """
        network, nodes = bus(5, health=HealthConfig(enabled=False))
        nodes[2].crash()
        seen = untilMarked(network, nodes[:2] + nodes[3:], nodes[2], 15.0)
        self.assertEqual(len(seen), 4)
        self.assertGreater(min(seen.values()), 3.0)
        self.assertLessEqual(max(seen.values()), 10.01)


class FalsePositiveTests(SynchronousTestCase):
    """Packet loss alone never gets a live node marked."""

    def test_tenMinutesAtFivePercentLoss(self) -> None:
        """
        Five dmq-bus nodes, 5% of datagrams lost in every direction, 10
        simulated minutes at the defaults: nobody is ever marked disabled,
        pending or removed by anybody, though probes did fail and nodes were
        suspected (and cleared themselves). Takes about 2-3 s of wall time.
        """
        network = MemoryNetwork(loss=0.05, seed=3)
        network, nodes = bus(5, network)
        self.assertTrue(allActive(nodes))
        changes: list[tuple[float, str, str]] = []
        for node in nodes:
            recordStatus(node, changes)
        began = time.monotonic()
        network.run(600.0)
        wall = time.monotonic() - began
        self.assertEqual(changes, [])
        self.assertTrue(allActive(nodes))
        suspicions = sum(monitor(n).counters["health.suspicions"] for n in nodes)
        refuted = sum(monitor(n).counters["health.suspicions_refuted"] for n in nodes)
        self.assertGreater(network.dropped, 500)
        self.assertGreater(sum(monitor(n).counters["health.indirect_rounds"] for n in nodes), 100)
        self.assertEqual(suspicions, refuted)
        self.assertLess(wall, 20.0)


class LoadTests(SynchronousTestCase):
    """The probe load per node does not grow with the bus."""

    def rates(self, size: int, window: float = 20.0) -> list[float]:
        network, nodes = bus(size, settle=20.0)
        before = [sentBy(n) for n in nodes]
        network.run(window)
        return [(sentBy(n) - b) / window for n, b in zip(nodes, before)]

    def test_boundedAt5And20And50Nodes(self) -> None:
        """
        Datagrams sent per node per second, once the bus settled, stay under
        5 (4 / probeInterval for probes and their answers, plus one
        notification ping every ping interval and its answer) with 5, 20 and
        50 nodes, where pinging every node every 5 s would send 2·(N−1)/5 per
        second (19.6 at 50 nodes, with the answers).
        """
        for size in (5, 20, 50):
            rates = self.rates(size)
            self.assertLessEqual(max(rates), 5.0, f"{size} nodes")
            self.assertGreater(min(rates), 3.5, f"{size} nodes")


class PartitionTests(SynchronousTestCase):
    """A partitioned bus splits, then comes back together once healed."""

    def test_partitionThenHeal(self) -> None:
        """
        Five nodes split 2 | 3: each side marks the other side failed within
        6 s, nodes next to each other in the probe ring one probe round after
        the other (the seed, on the small side, goes pending on the other side)
        and removes it; once the network heals, every node lists all five
        active again (within the hold on removed nodes, 120 s).
        """
        network, nodes = bus(5)
        small, large = nodes[:2], nodes[2:]
        network.partition(small, large)
        network.run(6.0)
        for node in small:
            self.assertEqual({node.statuses()[n.uri] for n in large}, {"disabled"})
        for node in large:
            self.assertEqual(node.statuses()[nodes[0].uri], "pending")
            self.assertEqual(node.statuses()[nodes[1].uri], "disabled")
        network.run(30.0)
        self.assertEqual(set(nodes[1].statuses()), {nodes[0].uri, nodes[1].uri})
        network.heal()
        elapsed = 0.0
        while not allActive(nodes) and elapsed < 200.0:
            network.run(1.0)
            elapsed += 1.0
        self.assertTrue(allActive(nodes), [n.statuses() for n in nodes])
        self.assertLessEqual(elapsed, 130.0)
        network.run(30.0)
        self.assertTrue(allActive(nodes), "and stays so")


class KamailioNodeTests(SynchronousTestCase):
    """
    A node whose User-Agent is not dmq-bus is handled by the Kamailio 5.6.3
    rules: pinged every ping interval, never sent a health message.
    """

    def setUp(self) -> None:
        self.network, self.nodes = bus(4, settle=0.1)
        self.kamailio = addNode(
            self.network,
            "127.0.0.9",
            [self.nodes[0]],
            health=HealthConfig(enabled=False),
            userAgent=KAMAILIO_AGENT,
        )
        self.network.run(15.0)
        self.everyone = [*self.nodes, self.kamailio]
        self.assertTrue(allActive(self.everyone))

    def test_notFlaggedNotProbed(self) -> None:
        """
        The dmq-bus nodes flag each other as dmq-bus but not the
        Kamailio-like node; in 60 s it gets no health message at all, but a
        notification ping from every dmq-bus node every 5 s (12 each), as
        Kamailio 5.6.3 expects.
        """
        kamailioKey = self.kamailio.bus.localNode.key
        for node in self.nodes:
            self.assertFalse(node.bus.nodeList.isDMQBus(kamailioKey))
            others = [n for n in self.nodes if n is not node]
            self.assertTrue(all(node.bus.nodeList.isDMQBus(o.bus.localNode.key) for o in others))
        before = self.kamailio.bus.counters["in.requests.notification_peer"]
        self.network.run(60.0)
        self.assertEqual(healthRequests(self.kamailio), 0)
        pings = self.kamailio.bus.counters["in.requests.notification_peer"] - before
        self.assertEqual(pings, 12 * len(self.nodes))

    def test_crashJudgedByKamailioRules(self) -> None:
        """
        When the Kamailio-like node crashes, the dmq-bus nodes mark it
        disabled only after a failed ping (ping interval + timeout, not
        within 3 s), then remove it after the next one; a dmq-bus node's
        crash meanwhile is seen by the Kamailio-like node by its own pings,
        without any health message reaching it.
        """
        self.kamailio.crash()
        survivors = self.nodes
        seen = untilMarked(self.network, survivors, self.kamailio, 15.0)
        self.assertEqual(len(seen), len(survivors))
        self.assertGreater(min(seen.values()), 3.0)
        self.assertLessEqual(max(seen.values()), 10.01)
        self.network.run(11.0)
        for node in survivors:
            self.assertNotIn(self.kamailio.uri, node.statuses())

    def test_dmqBusCrashSeenByKamailioAsBefore(self) -> None:
        """
        A crashed dmq-bus node: the dmq-bus nodes see it within 3 s, the
        Kamailio-like node through its own failed ping, and no suspicion
        message is sent to the Kamailio-like node.
        """
        victim = self.nodes[2]
        victim.crash()
        fast = untilMarked(self.network, [n for n in self.nodes if n is not victim], victim, 5.0)
        self.assertLessEqual(max(fast.values()), 3.0)
        slow = untilMarked(self.network, [self.kamailio], victim, 15.0)
        self.assertIn(self.kamailio.uri, slow)
        self.assertEqual(healthRequests(self.kamailio), 0)


class KnobTests(SynchronousTestCase):
    """Every knob of L{HealthConfig} does what its docstring says."""

    def crashAndWatch(
        self, health: HealthConfig, size: int = 5
    ) -> tuple[MemoryNetwork, list[MemoryNode], MemoryNode]:
        network, nodes = bus(size, health=health)
        victim = nodes[size - 1]
        victim.crash()
        return network, nodes, victim

    def test_defaults(self) -> None:
        """The defaults and the detection bound formula (2.3 s: within 3 s)."""
        config = HealthConfig()
        self.assertEqual(
            (
                config.enabled,
                config.probeInterval,
                config.probeTimeout,
                config.indirectProbes,
                config.indirectTimeout,
                config.suspicionTimeout,
                config.suspicionProbes,
                config.announceTimeout,
                config.gossipNodes,
            ),
            (None, 0.5, 0.3, 3, 0.5, 1.0, 3, 1.6, 1),
        )
        self.assertAlmostEqual(config.detectionBound, 2.3)
        custom = HealthConfig(probeInterval=1, probeTimeout=0.2, indirectTimeout=0.4)
        self.assertAlmostEqual(custom.detectionBound, 1 + 0.2 + 0.4 + 1.0)

    def test_invalid(self) -> None:
        """Zero or negative durations, negative counts and indirect ≤ direct timeouts are refused."""
        for bad in (
            {"probeInterval": 0},
            {"probeTimeout": -1},
            {"suspicionTimeout": 0},
            {"announceTimeout": 0},
            {"indirectProbes": -1},
            {"suspicionProbes": -1},
            {"gossipNodes": -1},
            {"probeTimeout": 0.5, "indirectTimeout": 0.5},
        ):
            self.assertRaises(ValueError, HealthConfig, **bad)

    def test_enabledAutomatic(self) -> None:
        """
        enabled=None turns probes on only where they beat the Kamailio rules:
        detectionBound (2.3 s) < pingInterval + pingTimeout; True and False
        force it.
        """
        config = HealthConfig()
        self.assertTrue(config.probesWith(5.0, 5.0))
        self.assertFalse(config.probesWith(1.0, 1.0))
        self.assertTrue(HealthConfig(enabled=True).probesWith(1.0, 1.0))
        self.assertFalse(HealthConfig(enabled=False).probesWith(5.0, 5.0))
        network, nodes = bus(3, pingInterval=1.0, pingTimeout=1.0)
        network.run(5.0)
        self.assertEqual(sum(monitor(n).counters["health.pings_sent"] for n in nodes), 0)
        network, nodes = bus(3, pingInterval=1.0, pingTimeout=1.0, health=HealthConfig(True))
        self.assertGreater(sum(monitor(n).counters["health.pings_sent"] for n in nodes), 0)

    def test_probeInterval(self) -> None:
        """Each node sends one direct ping per probeInterval: 20 per 10 s at 0.5 s, 10 at 1 s."""
        for interval, expected in ((0.5, 20), (1.0, 10)):
            network, nodes = bus(5, health=HealthConfig(probeInterval=interval))
            before = monitor(nodes[1]).counters["health.pings_sent"]
            network.run(10.0)
            self.assertEqual(monitor(nodes[1]).counters["health.pings_sent"] - before, expected)

    def probeTimeline(self, health: HealthConfig) -> tuple[float, float, float]:
        """
        Crash the ring successor of node 3; when its prober started the
        indirect round, suspected it, and marked it failed (seconds after
        the probe that failed was sent).
        """
        network, nodes = bus(5, health=health)
        prober = nodes[3]
        target = monitor(prober).successor()
        assert target is not None
        victim = next(n for n in nodes if n.bus.localNode.key == target.key)
        network.run(health.probeInterval / 2)  # between two probes: none in flight
        victim.crash()
        counters = monitor(prober).counters
        base = dict(counters)
        while counters["health.probes"] == base.get("health.probes", 0):
            network.run(0.001)
        sent = network.clock.seconds()
        marks: dict[str, float] = {}
        names = {
            "indirect": "health.indirect_rounds",
            "suspect": "health.suspicions",
            "failed": "health.nodes_failed",
        }
        while "failed" not in marks:
            network.run(0.001)
            for mark, name in names.items():
                if mark not in marks and counters[name] > base.get(name, 0):
                    marks[mark] = network.clock.seconds() - sent
        return marks["indirect"], marks["suspect"], marks["failed"]

    def test_probeIndirectAndSuspicionTimeouts(self) -> None:
        """
        After the direct ping to a crashed node: the indirect round starts at
        probeTimeout, the suspicion at probeTimeout + indirectTimeout, and the
        node is marked failed suspicionTimeout later.
        """
        for health in (
            HealthConfig(),
            HealthConfig(probeTimeout=0.2, indirectTimeout=0.7, suspicionTimeout=1.5),
        ):
            indirect, suspect, failed = self.probeTimeline(health)
            self.assertTrue(near(indirect, health.probeTimeout), indirect)
            self.assertTrue(near(suspect, health.probeTimeout + health.indirectTimeout), suspect)
            self.assertTrue(near(failed - suspect, health.suspicionTimeout), failed - suspect)

    def test_indirectProbes(self) -> None:
        """
        With the direct link between two nodes cut (all else working), the
        k = indirectProbes helpers vouch for the node and nobody marks it;
        with k = 0 the node that cannot reach it marks it (and only that node).
        """
        for k in (3, 0):
            network, nodes = bus(5, health=HealthConfig(indirectProbes=k))
            prober = nodes[3]
            target = monitor(prober).successor()
            assert target is not None
            victim = next(n for n in nodes if n.bus.localNode.key == target.key)
            cutLink(network, prober, victim)
            network.run(4.0)
            counters = monitor(prober).counters
            self.assertGreater(counters["health.indirect_rounds"], 0)
            self.assertEqual(
                counters["health.ping_reqs_sent"], k * counters["health.indirect_rounds"]
            )
            others = [n for n in nodes if n not in (prober, victim)]
            self.assertEqual({n.statuses()[victim.uri] for n in others}, {"active"})
            expected = "active" if k else "disabled"
            self.assertEqual(prober.statuses()[victim.uri], expected)

    def test_suspicionProbes(self) -> None:
        """
        A node hearing that another is suspected pings it suspicionProbes
        times over the suspicion before marking it; with 0 it marks it on the
        suspecter's word after suspicionTimeout.
        """
        for count in (3, 5, 0):
            network, nodes, victim = self.crashAndWatch(HealthConfig(suspicionProbes=count))
            counters = monitor(nodes[0]).counters
            untilMarked(network, [nodes[0]], victim, 3.0)
            self.assertEqual(counters["health.indirect_rounds"], 0, "node 0 is not the prober")
            self.assertEqual(counters["health.confirmations_sent"], count)
            self.assertEqual(nodes[0].statuses()[victim.uri], "disabled")

    def test_refutation(self) -> None:
        """
        A live node told it is suspected answers 'alive' to every node, and
        each clears its suspicion at once: nobody marks it, even with
        confirmation pings off.
        """
        network, nodes = bus(4, health=HealthConfig(suspicionProbes=0))
        suspect = nodes[2]
        uri = suspect.uri
        target = nodes[0].bus.findNode(uri)
        assert target is not None
        monitor(nodes[0]).suspect(target, announce=True)
        network.run(0.05)
        for node in nodes:
            if node is not suspect:
                self.assertFalse(monitor(node).suspected(target.key))
        self.assertEqual(monitor(suspect).counters["health.refutations_sent"], 1)
        network.run(5.0)
        self.assertTrue(allActive(nodes))

    def test_announceTimeout(self) -> None:
        """
        The 'suspect' messages wait announceTimeout for their answer: the
        one sent to the crashed node itself fails exactly then (confirmation
        pings and gossip off, so that it is the only request that fails).
        """
        for timeout in (1.6, 0.8):
            network, nodes, victim = self.crashAndWatch(
                HealthConfig(announceTimeout=timeout, suspicionProbes=0, gossipNodes=0)
            )
            prober = next(
                n
                for n in nodes
                if (s := monitor(n).successor()) is not None and s.key == victim.bus.localNode.key
            )
            counters = monitor(prober).counters
            while not counters["health.suspects_sent"]:
                network.run(0.001)
            sentAt = network.clock.seconds()
            failures = prober.bus.counters
            before = failures["out.failures.notification_peer.408"]
            while failures["out.failures.notification_peer.408"] == before:
                network.run(0.001)
            elapsed = network.clock.seconds() - sentAt
            self.assertTrue(near(elapsed, timeout), elapsed)

    def test_gossipNodes(self) -> None:
        """
        Each ping interval a node sends its list (a notification ping) to
        gossipNodes covered nodes: 1 per 5 s by default, 3 with 3, none with
        0; the probes keep everybody active either way.
        """
        for count in (1, 3, 0):
            network, nodes = bus(5, health=HealthConfig(gossipNodes=count))
            before = nodes[1].bus.counters["out.requests.notification_peer"]
            pings = monitor(nodes[1]).counters["health.pings_sent"]
            pingReqs = monitor(nodes[1]).counters["health.ping_reqs_sent"]
            network.run(20.0)
            sent = nodes[1].bus.counters["out.requests.notification_peer"] - before
            health = (
                monitor(nodes[1]).counters["health.pings_sent"]
                - pings
                + monitor(nodes[1]).counters["health.ping_reqs_sent"]
                - pingReqs
            )
            self.assertEqual(sent - health, 4 * count)
            self.assertTrue(allActive(nodes))


class MessageTests(SynchronousTestCase):
    """What a node answers to health messages, and to whom it sends them."""

    def setUp(self) -> None:
        self.network, self.nodes = bus(3)
        self.a, self.b, self.c = self.nodes

    def ask(self, sender: MemoryNode, receiver: MemoryNode, kind: str, body: bytes = b"") -> int:
        target = sender.bus.findNode(receiver.uri)
        assert target is not None
        body = body or f"{sender.uri};status=active\r\n".encode()
        contentType = f"{CONTENT_TYPE};kind={kind}"
        d = sender.bus.send("notification_peer", target, body, contentType, 1, timeout=1.0)
        self.network.run(0.6)
        return self.successResultOf(d).code

    def test_answers(self) -> None:
        """
        ping → 200; ping-req for a known dmq-bus node → 200, for an unknown
        address → 404 (no reflection toward anything); an unknown kind or a
        body that is not one node line → 400.
        """
        c = f"{self.c.uri};status=active\r\n".encode()
        self.assertEqual(self.ask(self.a, self.b, "ping"), 200)
        self.assertEqual(self.ask(self.a, self.b, "ping-req", c), 200)
        self.assertEqual(
            self.ask(self.a, self.b, "ping-req", b"sip:10.9.9.9:5060;status=active\r\n"), 404
        )
        self.assertEqual(self.ask(self.a, self.b, "ping-req", b"not-a-uri\r\n"), 400)
        self.assertEqual(self.ask(self.a, self.b, "ping-req", c + c), 400)
        self.assertEqual(self.ask(self.a, self.b, "hello"), 400)
        self.assertEqual(monitor(self.b).counters["health.ping_reqs_refused"], 1)

    def test_pingReqForDeadNode(self) -> None:
        """ping-req for a node that does not answer → 480 after probeTimeout."""
        self.c.crash()
        c = f"{self.c.uri};status=active\r\n".encode()
        self.assertEqual(self.ask(self.a, self.b, "ping-req", c), 480)

    def test_bodyNotMergedAsNodeList(self) -> None:
        """A health message is not a node list: nothing is merged, no line counted bad."""
        self.ask(self.a, self.b, "ping", b"sip:127.0.0.77:5060;status=active\r\n")
        self.assertEqual(self.b.bus.counters["nodelist.bad_lines"], 0)
        self.assertNotIn("sip:127.0.0.77:5060", self.b.statuses())

    def test_requestRevivesDisabledNode(self) -> None:
        """A health request from a node this node disabled makes it active again."""
        key = self.a.bus.localNode.key
        self.b.bus.nodeList.setStatus(key, NodeStatus.DISABLED)
        self.ask(self.a, self.b, "ping")
        self.assertEqual(self.b.statuses()[self.a.uri], "active")
        self.assertEqual(monitor(self.b).counters["health.nodes_revived"], 1)

    def test_bodiesAreKamailioSafeNodeLists(self) -> None:
        """
        Every health request on the wire (ping, ping-req, suspect, alive)
        has a body Kamailio 5.6.3 reads as a valid node list, so that a
        Kamailio node wrongly taken for dmq-bus could never lock up on one;
        the kind is in the Content-Type only.
        """
        seen: dict[str, list[bytes]] = {}
        deliver = self.network.deliver

        def record(source: Endpoint, destination: Endpoint, packet: bytes) -> None:
            message = parseMessage(packet)
            contentType = message.headers.get("content-type") or ""
            if contentType.startswith(CONTENT_TYPE) and isinstance(message, Request):
                kind = contentType.partition("kind=")[2]
                seen.setdefault(kind, []).append(message.body)
            deliver(source, destination, packet)

        self.network.deliver = record  # type: ignore[method-assign]
        self.c.crash()
        self.network.run(3.0)
        target = self.a.bus.findNode(self.b.uri)
        assert target is not None
        monitor(self.a).suspect(target, announce=True)
        self.network.run(1.0)
        self.assertEqual(set(seen), {"ping", "ping-req", "suspect", "alive"})
        for bodies in seen.values():
            for body in bodies:
                self.assertRegex(body, KAMAILIO_SAFE_BODY)

    def test_forgedSenderProvesNothing(self) -> None:
        """
        A health request naming a disabled node in its From but sent from
        another host does not make that node active again; from its own
        host it does.
        """
        key = self.a.bus.localNode.key
        self.b.bus.nodeList.setStatus(key, NodeStatus.DISABLED)
        sender = self.b.bus.nodeList.get(key)
        target = self.a.bus.findNode(self.b.uri)
        assert sender is not None and target is not None
        contentType = f"{CONTENT_TYPE};kind=ping"
        request = self.a.bus.buildRequest("notification_peer", target, b"", contentType, 1)

        def fromHost(host: str) -> DMQMessage:
            return DMQMessage(
                channel="notification_peer",
                body=request.body,
                contentType=contentType,
                sender=sender,
                maxForwards=1,
                origin=Origin(Address("udp", host, 5060)),
                request=request,
            )

        monitor(self.b).messageReceived(fromHost("127.0.0.66"))
        self.assertEqual(self.b.statuses()[self.a.uri], "disabled")
        monitor(self.b).messageReceived(fromHost("127.0.0.1"))
        self.assertEqual(self.b.statuses()[self.a.uri], "active")

    def test_leavingNodeAnswers503(self) -> None:
        """A leaving node answers health pings 503, so the others let it go."""
        self.b.stack.notification.leaving = True
        self.assertEqual(self.ask(self.a, self.b, "ping"), 503)

    def test_flagFromUserAgent(self) -> None:
        """
        The dmq-bus flag comes from the User-Agent of notification requests,
        and nothing of it goes on the wire: the node-list body is unchanged.
        """
        network = MemoryNetwork()
        a = addNode(network, "127.0.0.1")
        b = addNode(network, "127.0.0.2", [a], userAgent=KAMAILIO_AGENT)
        network.run(0.1)
        self.assertFalse(a.bus.nodeList.isDMQBus(b.bus.localNode.key))
        self.assertTrue(b.bus.nodeList.isDMQBus(a.bus.localNode.key))
        self.assertEqual(
            a.bus.nodeList.body(),
            b"sip:127.0.0.2:5060;status=active\r\nsip:127.0.0.1:5060;status=active\r\n",
        )

    def test_stopCancelsTimers(self) -> None:
        """Stopping a node ends its probes and suspicions: no timer of them is left."""
        target = self.a.bus.findNode(self.b.uri)
        assert target is not None
        monitor(self.a).suspect(target, announce=False)
        self.assertTrue(monitor(self.a).suspected(target.key))
        self.a.crash()
        self.assertFalse(monitor(self.a).suspected(target.key))
        loop = monitor(self.a)._loop
        assert loop is not None
        self.assertFalse(loop.running)


class NodeListFlagTests(SynchronousTestCase):
    """The node list's dmq-bus flag."""

    def test_markAndForget(self) -> None:
        """
        Only a listed, non-local node can be flagged; flagging twice says so;
        removing the node drops its flag (a node re-added must show it again).
        """
        network = MemoryNetwork()
        a = addNode(network, "127.0.0.1")
        nodes = a.bus.nodeList
        other = Node.fromURI(SIPURI.parse("sip:127.0.0.5:5060"), NodeStatus.ACTIVE)
        self.assertFalse(nodes.markDMQBus(other.key))
        nodes.add(other)
        self.assertTrue(nodes.markDMQBus(other.key))
        self.assertFalse(nodes.markDMQBus(other.key))
        self.assertFalse(nodes.markDMQBus(nodes.local.key))
        self.assertTrue(nodes.isDMQBus(other.key))
        nodes.remove(other.key)
        nodes.add(other)
        self.assertFalse(nodes.isDMQBus(other.key))


class OptionTests(SynchronousTestCase):
    """The health options of C{twistd dmq} reach the node."""

    def test_options(self) -> None:
        """
        --health, --probe-interval, --probe-timeout, --indirect-probes and
        --suspicion-timeout set the node's HealthConfig (indirect timeout:
        probe timeout + 0.2, at least 0.5); the defaults give HealthConfig();
        a bad word is refused.
        """
        from twisted.python import usage

        from dmq_bus import tap
        from dmq_bus.service import DMQService

        def config(*args: str) -> HealthConfig:
            options = tap.Options()
            options.parseOptions(["--control", "none", "--htable", "none", *args])
            service = tap.makeService(options)
            assert isinstance(service, DMQService)
            return service.stack.notification.health.config

        self.assertEqual(config(), HealthConfig())
        custom = config(
            "--health", "off", "--probe-interval", "2", "--probe-timeout", "0.5",
            "--indirect-probes", "5", "--suspicion-timeout", "3",
        )  # fmt: skip
        self.assertEqual(
            custom,
            HealthConfig(
                enabled=False,
                probeInterval=2.0,
                probeTimeout=0.5,
                indirectTimeout=0.7,
                indirectProbes=5,
                suspicionTimeout=3.0,
            ),
        )
        self.assertTrue(config("--health", "on").enabled)
        self.assertRaises(usage.UsageError, config, "--health", "maybe")
