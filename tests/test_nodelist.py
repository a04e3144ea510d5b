"""
Tests for the node list: Kamailio 5.6.3 merge rules, the body format a 5.6.3
node can read, lenient parsing of what others send, limits and events.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.bus.nodelist import NodeList, parseNodeLines
from dmq_bus.bus.values import MembershipChange, MembershipEvent, Node, NodeStatus
from dmq_bus.sip.uri import SIPURI

# What Kamailio 5.6.3's strict parser accepts without locking up (spec §2.3, §10).
KAMAILIO_SAFE_LINE = re.compile(
    rb"sip:(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}(;transport=(udp|tcp|tls))?"
    rb";status=(active|disabled|pending|timeout)\r\n"
)


def node(text: str, status: NodeStatus = NodeStatus.ACTIVE) -> Node:
    return Node.fromURI(SIPURI.parse(text), status)


def nodeList(local: str = "sip:127.0.0.1:15060", **kwargs: Any) -> NodeList:
    return NodeList(node(local), **kwargs)


def assertKamailioSafe(test: SynchronousTestCase, body: bytes) -> None:
    test.assertTrue(body.endswith(b"\r\n"), f"last line must end in CRLF: {body!r}")
    test.assertNotIn(b"\r\n\r\n", body)
    lines = body.split(b"\r\n")[:-1]
    for line in lines:
        test.assertIsNotNone(KAMAILIO_SAFE_LINE.fullmatch(line + b"\r\n"), f"unsafe line {line!r}")


class BodyTests(SynchronousTestCase):
    """The node-list body we send."""

    def test_matchesKamailioBytes(self) -> None:
        """
        With the same nodes, our body is byte for byte what Kamailio 5.6.3
        sent (captured a-join #4: newest first, self last, CRLF everywhere).
        """
        nodes = nodeList("sip:127.0.0.1:15060")
        nodes.add(node("sip:127.0.0.1:15061"))
        self.assertEqual(
            nodes.body(),
            b"sip:127.0.0.1:15061;status=active\r\nsip:127.0.0.1:15060;status=active\r\n",
        )

    def test_onlyActiveAndLocal(self) -> None:
        """Pending, disabled and timeout nodes are left out, as Kamailio does."""
        nodes = nodeList()
        nodes.add(node("sip:127.0.0.1:1", NodeStatus.PENDING))
        nodes.add(node("sip:127.0.0.1:2", NodeStatus.DISABLED))
        nodes.add(node("sip:127.0.0.1:3", NodeStatus.TIMEOUT))
        nodes.add(node("sip:127.0.0.1:4"))
        self.assertEqual(
            nodes.body(),
            b"sip:127.0.0.1:4;status=active\r\nsip:127.0.0.1:15060;status=active\r\n",
        )

    def test_transportAndIPv6(self) -> None:
        """
        TCP nodes carry ;transport=tcp; IPv6 hosts keep their brackets; a
        node of the other address family than ours is left out (we cannot
        reach it, and a 5.6.3 node that cannot stops its broadcasts there).
        """
        nodes = nodeList()
        nodes.add(node("sip:127.0.0.1:5;transport=tcp"))
        nodes.add(node("sip:[::1]:6"))
        body = nodes.body()
        self.assertIn(b"sip:127.0.0.1:5;transport=tcp;status=active\r\n", body)
        self.assertNotIn(b"[::1]", body)
        assertKamailioSafe(self, body)
        v6 = nodeList("sip:[::1]:5060")
        v6.add(node("sip:[::2]:6"))
        v6.add(node("sip:127.0.0.1:7"))
        self.assertEqual(
            v6.body(), b"sip:[::2]:6;status=active\r\nsip:[::1]:5060;status=active\r\n"
        )

    def test_hostNamesNeverSent(self) -> None:
        """
        A node known by host name is never written: a 5.6.3 receiver would
        resolve it and lock up for good if resolution failed.
        """
        nodes = nodeList()
        nodes.add(node("sip:kamailio.example:5060"))
        self.assertEqual(nodes.body(), b"sip:127.0.0.1:15060;status=active\r\n")

    def test_announceDisabled(self) -> None:
        """When leaving, our own line says status=disabled."""
        nodes = nodeList()
        self.assertEqual(
            nodes.body(announce=NodeStatus.DISABLED), b"sip:127.0.0.1:15060;status=disabled\r\n"
        )

    @given(
        st.lists(
            st.tuples(
                st.integers(1, 254),
                st.integers(1, 65535),
                st.sampled_from(list(NodeStatus)),
                st.sampled_from([None, "tcp", "tls", "udp"]),
            ),
            max_size=40,
        )
    )
    def test_everyBodyIsKamailioSafe(
        self, entries: list[tuple[int, int, NodeStatus, str | None]]
    ) -> None:
        """Whatever the list holds, every line of our body is one a 5.6.3 node can parse."""
        nodes = nodeList()
        for last, port, status, transport in entries:
            text = f"sip:10.0.0.{last}:{port}" + (f";transport={transport}" if transport else "")
            nodes.add(node(text, status))
        assertKamailioSafe(self, nodes.body())


class ParseTests(SynchronousTestCase):
    """Reading other nodes' bodies leniently."""

    def test_kamailioBody(self) -> None:
        """A captured Kamailio body gives its nodes and statuses."""
        lines = parseNodeLines(
            b"sip:127.0.0.1:15062;status=active\r\nsip:127.0.0.1:15061;status=active\r\n"
        )
        self.assertEqual(
            [str(line.uri) for line in lines],
            [
                "sip:127.0.0.1:15062;status=active",
                "sip:127.0.0.1:15061;status=active",
            ],
        )
        self.assertEqual([line.status for line in lines], [NodeStatus.ACTIVE] * 2)

    def test_lenient(self) -> None:
        """
        LF-only ends, a missing last line end, blank lines and spaces are
        accepted; bad lines are skipped and counted, the rest still counts.
        """
        from collections import Counter

        counters: Counter[str] = Counter()
        lines = parseNodeLines(
            b"  sip:127.0.0.1:1;status=active\n\n\r\nnot a uri\r\n"
            b"sip:127.0.0.1:2;status=bogus\r\nsip:127.0.0.1:3;status=pending",
            counters,
        )
        self.assertEqual([line.uri.port for line in lines], [1, 3])
        self.assertEqual(counters["nodelist.bad_lines"], 2)

    def test_notActive(self) -> None:
        """Kamailio 6.1's not_active is read as timeout (and never written)."""
        (line,) = parseNodeLines(b"sip:127.0.0.1:1;status=not_active\r\n")
        self.assertIs(line.status, NodeStatus.TIMEOUT)

    def test_noStatus(self) -> None:
        """A line without status parses with status None (pending when new)."""
        (line,) = parseNodeLines(b"sip:127.0.0.1:1\r\n")
        self.assertIsNone(line.status)

    def test_unknownTransportSkipped(self) -> None:
        """A line naming a transport we cannot use is skipped."""
        self.assertEqual(parseNodeLines(b"sip:127.0.0.1:1;transport=xyz;status=active\r\n"), [])

    @given(st.binary(max_size=300))
    def test_garbageNeverRaises(self, data: bytes) -> None:
        """Any bytes parse to a (maybe empty) list of lines, never an exception."""
        parseNodeLines(data)


class MergeTests(SynchronousTestCase):
    """Kamailio 5.6.3's merge rules (spec §2.3, §2.4)."""

    def test_unknownAdded(self) -> None:
        """Unknown nodes are added with the line's status, or pending without one."""
        nodes = nodeList()
        changed = nodes.merge(
            parseNodeLines(b"sip:127.0.0.1:1;status=active\r\nsip:127.0.0.1:2\r\n")
        )
        self.assertTrue(changed)
        self.assertEqual(nodes.get(("127.0.0.1", 1, None)).status, NodeStatus.ACTIVE)  # type: ignore[union-attr]
        self.assertEqual(nodes.get(("127.0.0.1", 2, None)).status, NodeStatus.PENDING)  # type: ignore[union-attr]

    def test_newestFirst(self) -> None:
        """New nodes go first, as Kamailio prepends them."""
        nodes = nodeList()
        nodes.merge(
            parseNodeLines(b"sip:127.0.0.1:1;status=active\r\nsip:127.0.0.1:2;status=active\r\n")
        )
        self.assertEqual([n.uri.port for n in nodes.all()], [2, 1, 15060])

    def test_disabledNotRevived(self) -> None:
        """Gossip cannot make a node we disabled active again."""
        nodes = nodeList()
        nodes.add(node("sip:127.0.0.1:1", NodeStatus.DISABLED))
        changed = nodes.merge(parseNodeLines(b"sip:127.0.0.1:1;status=active\r\n"))
        self.assertFalse(changed)
        self.assertEqual(nodes.get(("127.0.0.1", 1, None)).status, NodeStatus.DISABLED)  # type: ignore[union-attr]

    def test_statusFollowsLine(self) -> None:
        """A known, non-disabled node takes the status its line gives."""
        nodes = nodeList()
        nodes.add(node("sip:127.0.0.1:1", NodeStatus.PENDING))
        self.assertTrue(nodes.merge(parseNodeLines(b"sip:127.0.0.1:1;status=active\r\n")))
        self.assertTrue(nodes.merge(parseNodeLines(b"sip:127.0.0.1:1;status=disabled\r\n")))
        self.assertEqual(nodes.get(("127.0.0.1", 1, None)).status, NodeStatus.DISABLED)  # type: ignore[union-attr]

    def test_lineWithoutStatusChangesNothing(self) -> None:
        """A known node's status is kept when its line has no status."""
        nodes = nodeList()
        nodes.add(node("sip:127.0.0.1:1", NodeStatus.ACTIVE))
        self.assertFalse(nodes.merge(parseNodeLines(b"sip:127.0.0.1:1\r\n")))

    def test_localNeverChanged(self) -> None:
        """Nobody can mark us disabled in our own list."""
        nodes = nodeList()
        self.assertFalse(nodes.merge(parseNodeLines(b"sip:127.0.0.1:15060;status=disabled\r\n")))
        self.assertEqual(nodes.local.status, NodeStatus.ACTIVE)
        self.assertIsNone(nodes.remove(nodes.local.key))

    def test_identityIsExactStrings(self) -> None:
        """
        As in Kamailio, identity is host string, port and transport:
        no port, ;transport=udp and a different host spelling are other nodes.
        """
        nodes = nodeList()
        nodes.merge(
            parseNodeLines(
                b"sip:127.0.0.1:1;status=active\r\nsip:127.0.0.1:1;transport=udp;status=active\r\n"
                b"sip:127.0.0.1:1;transport=tcp;status=active\r\nsip:127.0.0.1;status=active\r\n"
            )
        )
        self.assertEqual(len(nodes), 5)

    def test_maxNodes(self) -> None:
        """
        At the node limit new nodes are refused and counted; known nodes are
        still updated.
        """
        nodes = nodeList(maxNodes=3)
        nodes.merge(
            parseNodeLines(
                b"".join(b"sip:127.0.0.1:%d;status=pending\r\n" % p for p in range(1, 6))
            )
        )
        self.assertEqual(len(nodes), 3)
        self.assertEqual(nodes.counters["nodes.rejected_limit"], 3)
        self.assertTrue(nodes.merge(parseNodeLines(b"sip:127.0.0.1:1;status=active\r\n")))

    def test_events(self) -> None:
        """Observers see additions, status changes and removals, and can stop observing."""
        nodes = nodeList()
        seen: list[MembershipEvent] = []
        remove = nodes.addObserver(seen.append)
        nodes.merge(parseNodeLines(b"sip:127.0.0.1:1;status=active\r\n"))
        nodes.setStatus(("127.0.0.1", 1, None), NodeStatus.DISABLED)
        nodes.remove(("127.0.0.1", 1, None))
        remove()
        nodes.add(node("sip:127.0.0.1:2"))
        self.assertEqual(
            [(e.change, e.node.uri.port, e.previous) for e in seen],
            [
                (MembershipChange.ADDED, 1, None),
                (MembershipChange.STATUS, 1, NodeStatus.ACTIVE),
                (MembershipChange.REMOVED, 1, None),
            ],
        )

    def test_failingObserverIgnored(self) -> None:
        """An observer that raises is logged; the list and other observers go on."""
        nodes = nodeList()
        seen: list[MembershipEvent] = []

        def broken(event: MembershipEvent) -> None:
            raise RuntimeError("observer bug")

        nodes.addObserver(broken)
        nodes.addObserver(seen.append)
        nodes.add(node("sip:127.0.0.1:1"))
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_localMustBeIPLiteral(self) -> None:
        """The local node's host must be an IP literal (it goes into every body)."""
        self.assertRaises(ValueError, NodeList, node("sip:example.com:5060"))


class CacheTests(SynchronousTestCase):
    """Bodies are built once per change and parsed once per distinct body."""

    def test_bodyFollowsChanges(self) -> None:
        """The cached body is rebuilt after every addition, status change and removal."""
        nodes = nodeList()
        first = nodes.body()
        self.assertIs(nodes.body(), first)
        nodes.add(node("sip:127.0.0.1:1"))
        self.assertIn(b"sip:127.0.0.1:1;status=active", nodes.body())
        nodes.setStatus(("127.0.0.1", 1, None), NodeStatus.DISABLED)
        self.assertEqual(nodes.body(), first)
        nodes.setStatus(("127.0.0.1", 1, None), NodeStatus.ACTIVE)
        nodes.remove(("127.0.0.1", 1, None))
        self.assertEqual(nodes.body(), first)
        self.assertIn(b"status=disabled", nodes.body(announce=NodeStatus.DISABLED))
        self.assertEqual(nodes.body(), first, "an announcement does not replace the cache")

    def test_badLinesCountedEveryTime(self) -> None:
        """A remembered body still counts its bad lines each time it arrives."""
        from collections import Counter

        counters: Counter[str] = Counter()
        body = b"sip:127.0.0.1:1;status=active\r\nnonsense\r\n"
        for _ in range(3):
            self.assertEqual(len(parseNodeLines(body, counters)), 1)
        self.assertEqual(counters["nodelist.bad_lines"], 3)


class TombstoneTests(SynchronousTestCase):
    """Removed nodes held back from gossip are forgotten once their hold ends."""

    def test_expiredSweptWithoutBeingSeenAgain(self) -> None:
        """
        Tombstones of nodes never named again do not pile up: with a steady
        churn the count stays about the removals of one hold, not all of them.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        nodes = nodeList(clock=clock)
        for port in range(1, 10_001):
            key = ("127.0.0.1", port, None)
            nodes.add(node(f"sip:127.0.0.1:{port}"))
            nodes.remove(key, hold=120.0)
            clock.advance(0.1)  # 1,200 removals per hold
        self.assertLessEqual(nodes.tombstones, 2 * 1_200 + 1)
        self.assertGreaterEqual(nodes.tombstones, 1_200)

    def test_heldNodesStillHeldAfterSweep(self) -> None:
        """A sweep keeps every tombstone whose hold is not over: those nodes stay out."""
        from twisted.internet.task import Clock

        clock = Clock()
        nodes = nodeList(clock=clock)
        for port in range(1, 201):
            nodes.add(node(f"sip:127.0.0.1:{port}"))
            nodes.remove(("127.0.0.1", port, None), hold=1000.0 if port <= 10 else 1.0)
            clock.advance(0.5)
        # ports 1-10 held until ~1000 s; every other one expired and swept or expiring
        changed = nodes.merge(
            parseNodeLines(
                b"".join(b"sip:127.0.0.1:%d;status=active\r\n" % p for p in range(1, 11))
            )
        )
        self.assertFalse(changed)
        self.assertEqual(len(nodes.all()), 1)
        self.assertLess(nodes.tombstones, 64 + 10)
        nodes.merge(parseNodeLines(b"sip:127.0.0.1:150;status=active\r\n"))
        self.assertIsNotNone(nodes.get(("127.0.0.1", 150, None)), "an expired hold re-adds")
