"""
Faults on an in-memory bus of dmq-bus nodes with htable peers, on one
Clock: a partition and its heal, a crash and restart under write load, a
node that stops answering (like SIGSTOP) and resumes. What is checked is
what a user sees: who is listed, and which keys every node holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.bus.nodelist import parseNodeLines
from dmq_bus.bus.values import MembershipChange, Node, NodeStatus
from dmq_bus.peers.htable import HashTable, HTableLimits, HTablePeer, TableSpec, syncWinner
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import MemoryNetwork, MemoryNode

FAST: dict[str, Any] = {"pingInterval": 1.0, "pingTimeout": 1.0}
PING = FAST["pingInterval"]
HOLD = 120.0
"""How long removed nodes are held against gossip re-adds (BusConfig.removedHold)."""


def addNode(
    network: MemoryNetwork, host: str, seeds: Sequence[MemoryNode] = ()
) -> tuple[MemoryNode, HTablePeer]:
    """A node with an htable peer (table kv) registered before it starts."""
    node = network.addNode(host, seeds=seeds, start=False, **FAST)
    peer = HTablePeer(node.bus, network.clock, [TableSpec("kv")])
    node.registerPeer(peer)
    node.stack.start()
    return node, peer


def kv(peer: HTablePeer) -> HashTable:
    table = peer.table("kv")
    assert table is not None
    return table


def contents(peer: HTablePeer) -> dict[str, str | int]:
    return {key: value for key, value, _ in kv(peer).items()}


def allActive(nodes: Sequence[MemoryNode]) -> bool:
    expected = {n.uri for n in nodes}
    return all(
        set(n.statuses()) == expected and set(n.statuses().values()) == {"active"} for n in nodes
    )


def runUntil(network: MemoryNetwork, done: Any, limit: float, step: float = 0.1) -> float:
    """Advance the clock until C{done()} or C{limit} seconds; returns the time taken."""
    elapsed = 0.0
    while not done() and elapsed < limit:
        network.run(step)
        elapsed += step
    return elapsed


def freeze(network: MemoryNetwork, node: MemoryNode) -> None:
    """Like SIGSTOP: the node's datagrams are lost both ways, its timers keep running."""
    network.detach(node.endpoint)
    # detach() only stops what comes in; a stopped process sends nothing either
    transport: Any = node.protocol.transport
    transport.write = lambda packet, addr=None: None


def thaw(network: MemoryNetwork, node: MemoryNode) -> None:
    """Like SIGCONT: the node is on the network again, with the state it had."""
    # MemoryNetwork has no public re-attach; its endpoint table is the one place.
    network._protocols[node.endpoint] = node.protocol
    transport: Any = node.protocol.transport
    del transport.write


class PartitionTests(SynchronousTestCase):
    """A 5-node bus split 3/2, written to on both sides, then healed."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        first = addNode(self.network, "127.0.0.1")
        pairs = [first] + [addNode(self.network, f"127.0.0.{i}", [first[0]]) for i in range(2, 6)]
        self.nodes = [n for n, _ in pairs]
        self.peers = [p for _, p in pairs]
        self.network.run(2.0)
        self.assertTrue(allActive(self.nodes))
        self.left, self.right = self.nodes[:3], self.nodes[3:]

    def split(self) -> None:
        self.network.partition(self.left, self.right)
        self.network.run(10.0)
        for side in (self.left, self.right):
            for node in side:
                active = {uri for uri, word in node.statuses().items() if word == "active"}
                self.assertEqual(active, {n.uri for n in side})

    def healAndSettle(self) -> float:
        self.network.heal()
        return runUntil(self.network, lambda: allActive(self.nodes), HOLD + 10 * PING)

    def test_listsReconvergeWithoutGhosts(self) -> None:
        """
        After a 3/2 partition heals, every node lists all five as active
        again (within the removed-node hold, the longest gossip waits), and
        two ping periods later nothing has changed: no ghost, no flapping.
        """
        self.split()
        took = self.healAndSettle()
        self.assertTrue(allActive(self.nodes), [n.statuses() for n in self.nodes])
        self.assertLessEqual(took, HOLD + 10 * PING)
        before = [n.statuses() for n in self.nodes]
        self.network.run(2 * PING)
        self.assertEqual([n.statuses() for n in self.nodes], before)
        self.assertEqual(len(before[0]), 5)

    def test_healedWithinPingPeriodsNotTheHold(self) -> None:
        """
        Once each side has removed the other (and holds them back from
        gossip for C{removedHold}), a heal still brings every node back on
        every list within a few ping periods, not at the end of the hold:
        a node that sees a removed node listed active asks it directly
        (a knock), and its answer lists it again on both ends.
        """
        self.split()
        for node in self.left:
            self.assertFalse({n.uri for n in self.right} & set(node.statuses()))
        took = self.healAndSettle()
        self.assertTrue(allActive(self.nodes), [n.statuses() for n in self.nodes])
        self.assertLessEqual(took, 3 * PING)
        knocks = sum(n.bus.counters["notification.knocks_answered"] for n in self.nodes)
        self.assertGreater(knocks, 0)

    def test_nodeDeadOnTheOtherSideNotReadded(self) -> None:
        """
        A node that dies on the other side just as the partition heals is
        still listed active by its side for a moment; the knocks it gets
        go unanswered, so nobody lists it again (no ghost), and the four
        live nodes list each other active.
        """
        self.split()
        dead, live = self.nodes[4], self.nodes[:4]
        added: list[str] = []
        for node in self.left:
            node.bus.addMembershipObserver(
                lambda e: (
                    added.append(str(e.node.uri)) if e.change is MembershipChange.ADDED else None
                )
            )
        dead.crash()
        self.network.heal()
        runUntil(self.network, lambda: allActive(live), HOLD)
        self.network.run(10 * PING)
        self.assertTrue(allActive(live), [n.statuses() for n in live])
        self.assertIn(self.nodes[3].uri, added)
        self.assertNotIn(dead.uri, added)
        self.assertGreater(sum(n.bus.counters["notification.knocks_sent"] for n in self.left), 0)
        self.assertEqual(sum(n.bus.counters["notification.knocks_answered"] for n in self.left), 0)

    def test_knocksRateLimited(self) -> None:
        """
        However often lists name a removed node as active, it is knocked
        at most once per ping interval by each node.
        """
        self.split()
        notification = self.nodes[0].stack.notification
        lines = parseNodeLines(f"{self.right[0].uri};status=active\r\n".encode())
        counters = self.nodes[0].bus.counters
        sent = counters["notification.knocks_sent"]
        for _ in range(5):
            notification._knockBuried(lines)
        self.assertEqual(counters["notification.knocks_sent"], sent + 1)
        self.network.run(PING / 2)
        notification._knockBuried(lines)
        self.assertEqual(counters["notification.knocks_sent"], sent + 1)
        self.network.run(PING / 2)
        notification._knockBuried(lines)
        self.assertEqual(counters["notification.knocks_sent"], sent + 2)
        self.assertNotIn(self.right[0].uri, self.nodes[0].statuses())

    def oldFailureAfterHeal(self, pinger: MemoryNode, target: MemoryNode, before: str) -> None:
        """
        While partitioned, C{pinger} pings C{target} (listed C{before});
        the ping and its retransmission are lost. The partition heals, and
        C{target} sends C{pinger} a request of its own, which makes it
        active there at once. Then the old ping times out: C{target} must
        stay active (the failure is older than the proof of life).
        """
        here = pinger.bus.findNode(target.uri)
        assert here is not None
        self.assertEqual(here.status.word, before)
        pinger.stack.notification._notify(here, 1, tracked=False)
        self.network.run(FAST["pingTimeout"] * 0.6)  # after its retransmission at T1 = 0.5 s
        self.network.heal()
        there = Node.fromURI(SIPURI.parse(pinger.uri), NodeStatus.ACTIVE)
        target.stack.notification._notify(there, 1, tracked=False)
        self.network.run(0.01)
        self.assertEqual(pinger.statuses().get(target.uri), "active")
        self.network.run(FAST["pingTimeout"] * 0.5)  # the old ping has timed out
        self.assertEqual(pinger.statuses().get(target.uri), "active")
        self.assertGreater(pinger.bus.counters["notification.stale_failures_ignored"], 0)

    def test_oldFailureDoesNotSendRevivedSeedBackToPending(self) -> None:
        """
        The seed, pending on the minority during the partition, revived
        there by its own request after the heal, is not put back to
        pending by a ping the minority sent it before the heal.
        """
        self.split()
        self.oldFailureAfterHeal(self.right[0], self.nodes[0], "pending")

    def test_oldFailureDoesNotRemoveRevivedNode(self) -> None:
        """
        A node disabled during the partition and revived by its own request
        after the heal is not removed (and held out for C{removedHold}) by
        a ping sent to it while it was disabled.
        """
        self.network.partition(self.left, self.right)
        runUntil(self.network, lambda: self.left[0].statuses()[self.right[0].uri] == "disabled", 10)
        self.oldFailureAfterHeal(self.left[0], self.right[0], "disabled")

    def test_writesOnBothSidesEverywhereAfterHeal(self) -> None:
        """
        Keys written on each side during the partition (different keys) are
        held by all five nodes once the partition has healed, and keys
        written before it are still there.
        """
        kv(self.peers[0]).set("before", "1")
        self.network.run(0.1)
        self.split()
        for i, peer in enumerate(self.peers):
            kv(peer).set(f"during-{i}", f"v{i}")
        self.network.run(0.5)
        self.healAndSettle()
        self.network.run(HTableLimits().resyncInterval * (HTableLimits().resyncRetries + 1))
        expected = {"before": "1"} | {f"during-{i}": f"v{i}" for i in range(5)}
        for i, peer in enumerate(self.peers):
            self.assertEqual(contents(peer), expected, f"node {i}")
        self.assertGreater(sum(p.counters["htable.resync.requests_sent"] for p in self.peers), 0)

    def test_conflictGreaterValueEverywhere(self) -> None:
        """
        A key written with different values on the two sides of a partition
        ends with the same value on every node after the heal: the greater
        one (L{syncWinner}), whichever side wrote last. A key deleted on one
        side and kept on the other comes back (a sync carries no deletes).
        """
        kv(self.peers[0]).set("gone", "x")
        self.network.run(0.1)
        self.split()
        kv(self.peers[4]).set("color", "blue")
        kv(self.peers[0]).set("color", "amber")  # written last, but "blue" > "amber"
        kv(self.peers[1]).set("n", 7)
        kv(self.peers[3]).set("n", "seven")  # strings sort after ints
        kv(self.peers[2]).delete("gone")
        self.network.run(0.5)
        self.healAndSettle()
        self.network.run(HTableLimits().resyncInterval * (HTableLimits().resyncRetries + 1))
        for i, peer in enumerate(self.peers):
            self.assertEqual(contents(peer), {"color": "blue", "n": "seven", "gone": "x"}, i)
        self.assertEqual(syncWinner("amber", "blue"), "blue")
        self.assertEqual(syncWinner("seven", 7), "seven")

    def test_resyncRateLimited(self) -> None:
        """
        A node that flaps (comes back twice within the re-sync interval) is
        asked for a copy at most once per interval by each other node; the
        second request waits for the interval's end.
        """
        peer = self.peers[0]
        target = self.nodes[1]
        node = self.nodes[0].bus.findNode(target.uri)
        assert node is not None
        nodeList = self.nodes[0].bus.nodeList
        self.network.run(HTableLimits().resyncInterval)
        sent = peer.counters["htable.resync.requests_sent"]
        for _ in range(3):
            nodeList.setStatus(node.key, type(node.status).DISABLED)
            nodeList.setStatus(node.key, type(node.status).ACTIVE)
        self.assertEqual(peer.counters["htable.resync.requests_sent"], sent + 1)
        self.network.run(HTableLimits().resyncInterval + 0.1)
        self.assertEqual(peer.counters["htable.resync.requests_sent"], sent + 2)
        self.network.run(HTableLimits().resyncInterval * 2)
        self.assertEqual(peer.counters["htable.resync.requests_sent"], sent + 2)


class CrashRestartTests(SynchronousTestCase):
    """A node that crashes and restarts while another node keeps writing."""

    def test_crashAndRestartUnderWriteLoad(self) -> None:
        """
        Node 3 of 4 crashes while node 1 writes a key every 50 ms, and comes
        back empty 8 s later: it is listed again by everybody, it holds every
        key afterwards, and no survivor lost a key.
        """
        network = MemoryNetwork()
        first = addNode(network, "127.0.0.1")
        pairs = [first] + [addNode(network, f"127.0.0.{i}", [first[0]]) for i in range(2, 5)]
        network.run(2.0)
        nodes = [n for n, _ in pairs]
        peers = [p for _, p in pairs]
        written = 0

        def write(seconds: float) -> None:
            nonlocal written
            for _ in range(int(seconds / 0.05)):
                kv(peers[0]).set(f"k{written}", written)
                written += 1
                network.run(0.05)

        write(1.0)
        nodes[2].crash()
        peers[2].stop()
        write(8.0)
        back, peer = addNode(network, "127.0.0.3", [nodes[0]])
        nodes[2], peers[2] = back, peer
        write(5.0)
        network.run(5.0)
        self.assertTrue(allActive(nodes), [n.statuses() for n in nodes])
        expected = {f"k{i}": i for i in range(written)}
        for i, p in enumerate(peers):
            self.assertEqual(contents(p), expected, f"node {i}")


class StoppedNodeTests(SynchronousTestCase):
    """A node that stops answering without stopping (SIGSTOP), then resumes."""

    def test_stoppedNodeRemovedThenBackCleanly(self) -> None:
        """
        A node that goes silent is removed by the others; when it answers
        again it is listed by everyone, lists everyone, and the keys written
        while it was away reach it (and its own reach the others).
        """
        network = MemoryNetwork()
        first = addNode(network, "127.0.0.1")
        pairs = [first] + [addNode(network, f"127.0.0.{i}", [first[0]]) for i in range(2, 4)]
        network.run(2.0)
        nodes = [n for n, _ in pairs]
        peers = [p for _, p in pairs]
        stopped = nodes[2]
        freeze(network, stopped)
        runUntil(
            network,
            lambda: all(stopped.uri not in n.statuses() for n in nodes[:2]),
            20.0,
        )
        for node in nodes[:2]:
            self.assertNotIn(stopped.uri, node.statuses())
        kv(peers[0]).set("while-away", "a")
        kv(peers[2]).set("from-stopped", "s")
        network.run(1.0)
        thaw(network, stopped)
        took = runUntil(network, lambda: allActive(nodes), HOLD + 10 * PING)
        self.assertTrue(allActive(nodes), [n.statuses() for n in nodes])
        self.assertLessEqual(took, HOLD + 10 * PING)
        network.run(HTableLimits().resyncInterval * (HTableLimits().resyncRetries + 1))
        for i, peer in enumerate(peers):
            self.assertEqual(contents(peer), {"while-away": "a", "from-stopped": "s"}, i)
